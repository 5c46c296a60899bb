"""Evaluation of harmonization: site effects removed, biology kept.

Feature inputs are samples x features (pandas DataFrame or 2-D array, float64 stats);
``batch`` holds one site label per sample. Every function returns pandas objects indexed
by feature name so that before/after tables line up.

Site discriminability (:func:`site_discriminability`) fits the harmonizer **inside each
cross-validation fold** on the training samples only and applies it to the held-out
fold; harmonizing the whole table first and then cross-validating leaks the test fold
into the harmonizer (it makes harmonization look better than it is). The function takes
a harmonizer *factory* (any callable returning an object with ``fit(X, batch,
covariates=...)`` and ``transform(X, batch, covariates=...)``, e.g. ``ComBat`` or
:class:`MeanCentering`), never a harmonized table.

Conventions (documented choices):

- Kolmogorov--Smirnov: ``mode="vs_rest"`` compares each site with all *other* sites
  pooled (independent samples, K tests per feature); ``mode="pairwise"`` runs all
  K(K-1)/2 site pairs. p-values are unadjusted.
- ICC(2,1) (two-way random, absolute agreement) and ICC(3,1) (two-way mixed,
  consistency) follow Shrout & Fleiss (1979) with subjects as targets and sites as
  raters, from the two-way ANOVA mean squares (complete subjects only).
- CoV: with subjects (traveling subjects) the within-subject between-site SD over the
  within-subject mean, averaged over subjects; without, the SD of site means over their
  mean. Percent; ddof=1.
- Bland--Altman: bias = mean(a - b), limits = bias +/- 1.96 SD(a - b) (ddof=1).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from mrharmony.errors import HarmonizeError

from .image import image_similarity  # re-exported: an evaluation metric for images

__all__ = [
    "Discriminability",
    "MeanCentering",
    "association_effects",
    "bland_altman",
    "bland_altman_sites",
    "cov_across_sites",
    "evaluate_tables",
    "feature_columns",
    "icc",
    "image_similarity",
    "ks_tests",
    "preservation_of_associations",
    "site_discriminability",
    "site_effect_tests",
    "spurious_association_test",
]

HarmonizerFactory = Callable[[], Any]


# --------------------------------------------------------------------------------------
# input helpers
# --------------------------------------------------------------------------------------
def _frame(X: Any, name: str = "X") -> pd.DataFrame:
    if isinstance(X, pd.DataFrame):
        df = X
    else:
        arr = np.asarray(X)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise HarmonizeError(f"{name}: expected samples x features, got shape {arr.shape}")
        df = pd.DataFrame(arr, columns=[f"f{i}" for i in range(arr.shape[1])])
    if df.shape[0] == 0 or df.shape[1] == 0:
        raise HarmonizeError(f"{name}: empty table of shape {df.shape}")
    try:
        return df.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise HarmonizeError(f"{name}: non-numeric feature values ({exc})") from exc


def _labels(batch: Any, n: int, name: str = "batch") -> np.ndarray:
    b = np.asarray(batch).ravel()
    if b.size != n:
        raise HarmonizeError(f"{name}: {b.size} labels for {n} samples")
    if pd.isna(b).any():
        raise HarmonizeError(f"{name}: {int(pd.isna(b).sum())} missing labels")
    return b


def _groups(df: pd.DataFrame, batch: np.ndarray, min_size: int = 1) -> dict[Any, np.ndarray]:
    sites = pd.unique(batch)
    if sites.size < 2:
        raise HarmonizeError(f"batch: only one site ({sites[0]!r}); need >= 2 to compare sites")
    out = {s: df.to_numpy()[batch == s] for s in sites}
    small = {s: len(v) for s, v in out.items() if len(v) < min_size}
    if small:
        raise HarmonizeError(f"batch: sites with fewer than {min_size} samples: {small}")
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence SciPy's warnings on constant or tiny groups.

    The statistic is then NaN, which we report; without this one degenerate feature
    would turn into an error (pytest runs with warnings as errors).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", getattr(stats, "SmallSampleWarning", RuntimeWarning))
        yield


# --------------------------------------------------------------------------------------
# a minimal harmonizer (per-site location) used as a baseline and in tests
# --------------------------------------------------------------------------------------
class MeanCentering:
    """Remove per-site means (add back the grand mean). ``fit/transform`` like ComBat."""

    def fit(self, X: Any, batch: Any, covariates: Any = None) -> MeanCentering:
        """Learn per-site feature means on (X, batch); covariates are ignored."""
        df = _frame(X)
        b = _labels(batch, len(df))
        self.columns_ = list(df.columns)
        self.grand_mean_ = df.mean(axis=0).to_numpy()
        self.site_means_ = {s: df.to_numpy()[b == s].mean(axis=0) for s in pd.unique(b)}
        return self

    def transform(self, X: Any, batch: Any, covariates: Any = None) -> pd.DataFrame:
        """Subtract each sample's site mean and add the grand mean."""
        df = _frame(X)
        b = _labels(batch, len(df))
        unknown = sorted(set(pd.unique(b)) - set(self.site_means_), key=str)
        if unknown:
            raise HarmonizeError(f"batch: sites {unknown} were not seen in fit")
        shift = np.stack([self.site_means_[s] for s in b]) - self.grand_mean_
        return pd.DataFrame(df.to_numpy() - shift, index=df.index, columns=df.columns)


# --------------------------------------------------------------------------------------
# site discriminability
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Discriminability:
    """Cross-validated site-prediction result.

    ``chance_accuracy`` is the majority-class proportion (what accuracy a constant
    prediction reaches); ``chance_balanced_accuracy`` is 1 / n_sites. ``p_value`` is the
    permutation p-value of the accuracy, ``(1 + #{perm >= observed}) / (1 + n_perm)``
    (NaN when ``n_permutations == 0``), with the whole pipeline (harmonizer included)
    re-run on permuted site labels.
    """

    accuracy: float
    balanced_accuracy: float
    chance_accuracy: float
    chance_balanced_accuracy: float
    p_value: float
    fold_accuracy: tuple[float, ...]
    n_sites: int
    n_samples: int
    n_splits: int
    n_permutations: int
    classifier: str
    harmonizer: str

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (fold accuracies as a string) for tables."""
        d = asdict(self)
        d["fold_accuracy"] = " ".join(f"{a:.3f}" for a in self.fold_accuracy)
        return d


def _classifier(kind: str, seed: int) -> Any:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    if kind == "random_forest":
        return RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=1)
    raise HarmonizeError(f"classifier: {kind!r} is not 'logistic' or 'random_forest'")


def _new_harmonizer(harmonizer: Any) -> Any:
    if harmonizer is None:
        return None
    if not isinstance(harmonizer, type) and hasattr(harmonizer, "fit") and hasattr(
            harmonizer, "transform"):
        return copy.deepcopy(harmonizer)  # a template object
    if callable(harmonizer):  # a factory (a class or a function)
        obj = harmonizer()
        if not (hasattr(obj, "fit") and hasattr(obj, "transform")):
            raise HarmonizeError(f"harmonizer: the factory returned {type(obj).__name__}, "
                                 "which has no fit/transform")
        return obj
    raise HarmonizeError(f"harmonizer: {type(harmonizer).__name__} is neither a factory nor "
                         "an object with fit/transform")


def _cv_predictions(X: pd.DataFrame, y: np.ndarray, cov: pd.DataFrame | None,
                    splits: list[tuple[np.ndarray, np.ndarray]], harmonizer: Any,
                    classifier: str, seed: int) -> np.ndarray:
    from threadpoolctl import threadpool_limits

    pred = np.empty(len(y), dtype=object)
    for train, test in splits:
        Xtr, Xte = X.iloc[train], X.iloc[test]
        if harmonizer is not None:
            h = _new_harmonizer(harmonizer)
            ytr = pd.Series(y[train], index=Xtr.index, name="site")
            yte = pd.Series(y[test], index=Xte.index, name="site")
            ctr = None if cov is None else cov.iloc[train]
            cte = None if cov is None else cov.iloc[test]
            h.fit(Xtr, ytr, covariates=ctr)
            Xtr = _frame(h.transform(Xtr, ytr, covariates=ctr), "harmonized train fold")
            Xte = _frame(h.transform(Xte, yte, covariates=cte), "harmonized test fold")
        xtr, xte = Xtr.to_numpy(), Xte.to_numpy()
        if np.isnan(xtr).any() or np.isnan(xte).any():  # impute with the training means
            means = np.nan_to_num(np.nanmean(np.where(np.isnan(xtr).all(0), 0.0, xtr.T).T,
                                             axis=0))
            xtr = np.where(np.isnan(xtr), means, xtr)
            xte = np.where(np.isnan(xte), means, xte)
        # small dense problems: BLAS threads only add contention (5x slower on 2 cores)
        with threadpool_limits(1):
            model = _classifier(classifier, seed).fit(xtr, y[train])
            pred[test] = model.predict(xte)
    return pred


def site_discriminability(
    X: Any,
    batch: Any,
    *,
    covariates: pd.DataFrame | None = None,
    harmonizer: HarmonizerFactory | Any | None = None,
    classifier: Literal["logistic", "random_forest"] = "logistic",
    n_splits: int = 5,
    n_permutations: int = 100,
    seed: int = 0,
) -> Discriminability:
    """How well a classifier predicts the site from the features (lower is better).

    Parameters
    ----------
    X
        Samples x features (unharmonized when ``harmonizer`` is given).
    batch
        Site label per sample.
    covariates
        Per-sample covariates handed to the harmonizer (never to the classifier).
    harmonizer
        Factory (e.g. ``lambda: ComBat()`` or the class itself) or a template object
        (deep-copied per fold). Fitted on each training fold only, then applied to the
        training and the held-out fold. ``None``: classify ``X`` as given.
    classifier
        ``"logistic"`` (standardised L2 logistic regression) or ``"random_forest"``.
    n_splits
        Stratified K-fold splits (shuffled with ``seed``); every site needs >= n_splits
        samples.
    n_permutations
        Label permutations for the p-value (0 to skip).
    seed
        Seed of the fold shuffling, the permutations and the random forest.

    Returns
    -------
    Discriminability
    """
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold

    df = _frame(X)
    y = _labels(batch, len(df)).astype(str)
    sites, counts = np.unique(y, return_counts=True)
    if sites.size < 2:
        raise HarmonizeError("batch: only one site; discriminability needs >= 2")
    if n_splits < 2:
        raise HarmonizeError(f"n_splits: {n_splits} must be >= 2")
    if counts.min() < n_splits:
        raise HarmonizeError(f"batch: site {sites[np.argmin(counts)]!r} has {counts.min()} "
                             f"samples, fewer than n_splits={n_splits}")
    if n_permutations < 0:
        raise HarmonizeError(f"n_permutations: {n_permutations} must be >= 0")
    cov = None
    if covariates is not None:
        cov = pd.DataFrame(covariates)
        if len(cov) != len(df):
            raise HarmonizeError(f"covariates: {len(cov)} rows for {len(df)} samples")
        cov = cov.set_axis(df.index)
    skf = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    splits = list(skf.split(np.zeros(len(y)), y))
    pred = _cv_predictions(df, y, cov, splits, harmonizer, classifier, seed)
    acc = float(np.mean(pred == y))
    folds = tuple(float(np.mean(pred[t] == y[t])) for _, t in splits)
    p_value = float("nan")
    if n_permutations:
        rng = np.random.default_rng(seed)
        null = np.empty(n_permutations)
        for i in range(n_permutations):
            yp = rng.permutation(y)
            sp = list(skf.split(np.zeros(len(yp)), yp))
            null[i] = np.mean(_cv_predictions(df, yp, cov, sp, harmonizer, classifier,
                                              seed) == yp)
        p_value = float((1 + np.sum(null >= acc - 1e-12)) / (1 + n_permutations))
    name = "none" if harmonizer is None else getattr(harmonizer, "__name__",
                                                     type(harmonizer).__name__)
    return Discriminability(
        accuracy=acc, balanced_accuracy=float(balanced_accuracy_score(y, pred.astype(str))),
        chance_accuracy=float(counts.max() / counts.sum()),
        chance_balanced_accuracy=1.0 / sites.size, p_value=p_value, fold_accuracy=folds,
        n_sites=int(sites.size), n_samples=len(y), n_splits=n_splits,
        n_permutations=n_permutations, classifier=classifier, harmonizer=str(name))


# --------------------------------------------------------------------------------------
# per-feature site tests
# --------------------------------------------------------------------------------------
def site_effect_tests(X: Any, batch: Any) -> pd.DataFrame:
    """ANOVA, Kruskal--Wallis, Levene (median-centred) and Bartlett tests per feature.

    Returns
    -------
    DataFrame indexed by feature: ``anova_f, anova_p, kruskal_h, kruskal_p, levene_w,
    levene_p, bartlett_t, bartlett_p`` (NaNs omitted per feature; NaN statistic for a
    constant feature).
    """
    df = _frame(X)
    groups = list(_groups(df, _labels(batch, len(df)), min_size=2).values())
    with _quiet():
        out = {}
        for key, fn in (("anova", stats.f_oneway), ("kruskal", stats.kruskal),
                        ("levene", stats.levene), ("bartlett", stats.bartlett)):
            res = fn(*groups, axis=0, nan_policy="omit")
            out[key] = (np.atleast_1d(res.statistic), np.atleast_1d(res.pvalue))
    names = {"anova": "anova_f", "kruskal": "kruskal_h", "levene": "levene_w",
             "bartlett": "bartlett_t"}
    cols = {}
    for key, (stat, p) in out.items():
        cols[names[key]] = stat
        cols[f"{key}_p"] = p
    return pd.DataFrame(cols, index=df.columns)


def ks_tests(X: Any, batch: Any, *, mode: Literal["vs_rest", "pairwise"] = "vs_rest",
             ) -> pd.DataFrame:
    """Two-sample Kolmogorov--Smirnov tests per feature between sites.

    Parameters
    ----------
    mode
        ``"vs_rest"``: each site against all other sites pooled; ``"pairwise"``: every
        pair of sites.

    Returns
    -------
    Long DataFrame: ``feature, site_a, site_b, statistic, p_value`` (``site_b`` is
    ``"rest"`` in vs_rest mode).
    """
    df = _frame(X)
    b = _labels(batch, len(df))
    groups = _groups(df, b, min_size=1)
    data = df.to_numpy()
    if mode == "vs_rest":
        pairs = [(s, "rest", g, data[b != s]) for s, g in groups.items()]
    elif mode == "pairwise":
        pairs = [(s, t, groups[s], groups[t]) for s, t in combinations(groups, 2)]
    else:
        raise HarmonizeError(f"mode: {mode!r} is not 'vs_rest' or 'pairwise'")
    frames = []
    with _quiet():
        for s, t, a, c in pairs:
            res = stats.ks_2samp(a, c, axis=0, nan_policy="omit")
            frames.append(pd.DataFrame({"feature": df.columns, "site_a": s, "site_b": t,
                                        "statistic": np.atleast_1d(res.statistic),
                                        "p_value": np.atleast_1d(res.pvalue)}))
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------
# reliability: ICC, CoV, Bland-Altman
# --------------------------------------------------------------------------------------
def _cube(X: Any, subject: Any, site: Any) -> tuple[np.ndarray, pd.Index, list, list]:
    """(subjects x sites x features) array of the subjects measured at every site."""
    df = _frame(X)
    subj = _labels(subject, len(df), "subject")
    site = _labels(site, len(df), "site")
    key = pd.DataFrame({"subject": subj, "site": site})
    dup = key.duplicated()
    if dup.any():
        raise HarmonizeError(f"subject/site: {int(dup.sum())} repeated (subject, site) scans, "
                             f"first {tuple(key[dup].iloc[0])}; average repeats first")
    sites = list(pd.unique(site))
    per_subject = key.groupby("subject", sort=False)["site"].nunique()
    complete = list(per_subject.index[per_subject == len(sites)])
    if len(complete) < 2:
        raise HarmonizeError(f"subject: {len(complete)} subjects were measured at all "
                             f"{len(sites)} sites; need >= 2 traveling subjects")
    sub_idx = pd.Index(complete).get_indexer(subj)
    site_idx = pd.Index(sites).get_indexer(site)
    keep = sub_idx >= 0
    cube = np.full((len(complete), len(sites), df.shape[1]), np.nan)
    cube[sub_idx[keep], site_idx[keep]] = df.to_numpy()[keep]
    return cube, df.columns, complete, sites


def icc(X: Any, subject: Any, site: Any) -> pd.DataFrame:
    """ICC(2,1) and ICC(3,1) per feature (Shrout & Fleiss 1979), sites as raters.

    Parameters
    ----------
    X
        Samples x features of traveling subjects (one scan per subject and site).
    subject, site
        Subject and site label per sample. Subjects not measured at every site are left
        out (the count used is reported).

    Returns
    -------
    DataFrame indexed by feature: ``icc2_1, icc3_1, ms_subject, ms_site, ms_error,
    n_subjects, n_sites``.
    """
    cube, columns, _, _ = _cube(X, subject, site)
    n, k = cube.shape[:2]
    grand = cube.mean(axis=(0, 1))
    ss_rows = k * ((cube.mean(axis=1) - grand) ** 2).sum(axis=0)
    ss_cols = n * ((cube.mean(axis=0) - grand) ** 2).sum(axis=0)
    ss_total = ((cube - grand) ** 2).sum(axis=(0, 1))
    msr = ss_rows / (n - 1)
    msc = ss_cols / (k - 1)
    mse = (ss_total - ss_rows - ss_cols) / ((n - 1) * (k - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        icc2 = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
        icc3 = (msr - mse) / (msr + (k - 1) * mse)
    return pd.DataFrame({"icc2_1": icc2, "icc3_1": icc3, "ms_subject": msr, "ms_site": msc,
                         "ms_error": mse, "n_subjects": n, "n_sites": k}, index=columns)


def cov_across_sites(X: Any, batch: Any, *, subject: Any | None = None) -> pd.Series:
    """Coefficient of variation across sites, percent (see module notes)."""
    df = _frame(X)
    b = _labels(batch, len(df))
    with np.errstate(invalid="ignore", divide="ignore"):
        if subject is None:
            means = df.groupby(b, sort=False).mean()
            if len(means) < 2:
                raise HarmonizeError("batch: only one site; CoV across sites needs >= 2")
            return (100 * means.std(ddof=1) / means.mean().abs()).rename("cov_pct")
        cube, columns, _, _ = _cube(df, subject, b)
        cv = cube.std(axis=1, ddof=1) / np.abs(cube.mean(axis=1))
    return pd.Series(100 * np.nanmean(cv, axis=0), index=columns, name="cov_pct")


def bland_altman(a: Any, b: Any, *, z: float = 1.96) -> pd.DataFrame:
    """Bland--Altman agreement of paired measurements (rows are pairs).

    Returns
    -------
    DataFrame indexed by feature: ``bias`` (mean of a - b), ``sd_diff`` (ddof=1),
    ``loa_lower``, ``loa_upper`` (bias -/+ z sd), ``mean`` (of the pair means), ``n``.
    """
    fa, fb = _frame(a, "a"), _frame(b, "b")
    if fa.shape != fb.shape:
        raise HarmonizeError(f"bland_altman: shapes {fa.shape} and {fb.shape} differ")
    d = fa.to_numpy() - fb.to_numpy()
    n = np.sum(~np.isnan(d), axis=0)
    if n.min() < 2:
        raise HarmonizeError("bland_altman: a feature has fewer than 2 complete pairs")
    bias = np.nanmean(d, axis=0)
    sd = np.nanstd(d, axis=0, ddof=1)
    mean = np.nanmean((fa.to_numpy() + fb.to_numpy()) / 2, axis=0)
    return pd.DataFrame({"bias": bias, "sd_diff": sd, "loa_lower": bias - z * sd,
                         "loa_upper": bias + z * sd, "mean": mean, "n": n}, index=fa.columns)


def bland_altman_sites(X: Any, subject: Any, site: Any, site_a: Any, site_b: Any,
                       ) -> pd.DataFrame:
    """Bland--Altman of site_a against site_b over the subjects scanned at both."""
    df = _frame(X)
    subj = _labels(subject, len(df), "subject")
    st = _labels(site, len(df), "site")
    a = df[st == site_a].set_axis(subj[st == site_a])
    b = df[st == site_b].set_axis(subj[st == site_b])
    common = a.index.intersection(b.index)
    if len(common) < 2:
        raise HarmonizeError(f"bland_altman_sites: {len(common)} subjects scanned at both "
                             f"{site_a!r} and {site_b!r}; need >= 2")
    return bland_altman(a.loc[common], b.loc[common])


# --------------------------------------------------------------------------------------
# biological associations
# --------------------------------------------------------------------------------------
def _design(covariates: pd.DataFrame, variable: str) -> tuple[np.ndarray, int]:
    cov = pd.DataFrame(covariates).reset_index(drop=True)
    if variable not in cov.columns:
        raise HarmonizeError(f"variable: {variable!r} is not a covariate ({list(cov.columns)})")
    if not pd.api.types.is_numeric_dtype(cov[variable]):
        raise HarmonizeError(f"variable: {variable!r} must be numeric (code it 0/1)")
    rest = cov.drop(columns=variable)
    others = (pd.get_dummies(rest, drop_first=True, dtype=np.float64).to_numpy(np.float64)
              if rest.shape[1] else np.empty((len(cov), 0)))
    design = np.column_stack([np.ones(len(cov)), cov[variable].to_numpy(np.float64), others])
    if not np.isfinite(design).all():
        raise HarmonizeError("covariates: missing values in the association model")
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise HarmonizeError(f"covariates: the design for {variable!r} is rank deficient "
                             "(collinear or constant covariates)")
    return design, 1


def _ols_t(design: np.ndarray, y: np.ndarray, col: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Coefficient and t of column ``col`` for every column of y (no NaN), one solve."""
    beta, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ beta
    dof = design.shape[0] - design.shape[1]
    xtx_inv = np.linalg.inv(design.T @ design)
    se = np.sqrt((resid**2).sum(axis=0) / dof * xtx_inv[col, col])
    with np.errstate(invalid="ignore", divide="ignore"):
        return beta[col], beta[col] / se, dof


def association_effects(X: Any, covariates: pd.DataFrame, variable: str) -> pd.DataFrame:
    """OLS effect of ``variable`` on each feature, adjusted for the other covariates.

    Model: ``feature ~ 1 + variable + others`` (categorical others dummy-coded). Rows with
    a missing feature value are dropped for that feature only.

    Returns
    -------
    DataFrame indexed by feature: ``beta`` (feature units per unit of variable), ``se``,
    ``t``, ``p``, ``std_beta`` (beta x SD(variable) / SD(feature)), ``n``.
    """
    df = _frame(X)
    if len(pd.DataFrame(covariates)) != len(df):
        raise HarmonizeError(f"covariates: {len(pd.DataFrame(covariates))} rows for "
                             f"{len(df)} samples")
    design, col = _design(covariates, variable)
    y = df.to_numpy()
    beta = np.full(y.shape[1], np.nan)
    tval = np.full(y.shape[1], np.nan)
    dof = np.full(y.shape[1], design.shape[0] - design.shape[1])
    complete = ~np.isnan(y).any(axis=0)
    if complete.any():
        beta[complete], tval[complete], _ = _ols_t(design, y[:, complete], col)
    for j in np.flatnonzero(~complete):  # only features with missing values
        keep = ~np.isnan(y[:, j])
        if keep.sum() > design.shape[1] + 1:
            b_, t_, d_ = _ols_t(design[keep], y[keep, j][:, None], col)
            beta[j], tval[j], dof[j] = b_[0], t_[0], d_
    with np.errstate(invalid="ignore", divide="ignore"):
        se = beta / tval
        p = 2 * stats.t.sf(np.abs(tval), dof)
        std_beta = beta * design[:, col].std(ddof=1) / np.nanstd(y, axis=0, ddof=1)
    return pd.DataFrame({"beta": beta, "se": se, "t": tval, "p": p, "std_beta": std_beta,
                         "n": dof + design.shape[1]}, index=df.columns)


def preservation_of_associations(before: Any, after: Any, covariates: pd.DataFrame,
                                 variable: str, *, truth: Mapping[str, float] | pd.Series
                                 | None = None) -> pd.DataFrame:
    """Effect of ``variable`` per feature before and after harmonization (and vs truth).

    Returns
    -------
    DataFrame indexed by feature: ``beta_before, beta_after, t_before, t_after,
    p_before, p_after`` and, with ``truth`` (true coefficient per feature, in feature
    units per unit of variable), ``beta_true, abs_error_before, abs_error_after``.
    """
    eb = association_effects(before, covariates, variable)
    ea = association_effects(after, covariates, variable)
    out = pd.DataFrame({"beta_before": eb["beta"], "beta_after": ea["beta"],
                        "t_before": eb["t"], "t_after": ea["t"], "p_before": eb["p"],
                        "p_after": ea["p"]})
    if truth is not None:
        true = pd.Series(truth, dtype=np.float64).reindex(out.index)
        out["beta_true"] = true
        out["abs_error_before"] = (out["beta_before"] - true).abs()
        out["abs_error_after"] = (out["beta_after"] - true).abs()
    return out


def spurious_association_test(X: Any, covariates: pd.DataFrame, variable: str, *,
                              n_permutations: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Permutation test of ``variable`` -> feature associations (family-wise).

    The variable's column is permuted (the other covariates stay); the per-feature
    p-value is the share of permutations with ``|t_perm| >= |t|`` and ``p_fwer`` the
    Westfall--Young max-T adjusted p-value. Exact under the null when the variable is
    independent of the other covariates. Features with missing values are dropped.

    Returns
    -------
    DataFrame indexed by feature: ``t``, ``p_perm``, ``p_fwer``.
    """
    if n_permutations < 1:
        raise HarmonizeError(f"n_permutations: {n_permutations} must be >= 1")
    df = _frame(X).dropna(axis=1)
    if df.shape[1] == 0:
        raise HarmonizeError("X: every feature has missing values")
    design, col = _design(covariates, variable)
    y = df.to_numpy()
    _, t_obs, _ = _ols_t(design, y, col)
    rng = np.random.default_rng(seed)
    exceed = np.zeros(y.shape[1])
    exceed_max = np.zeros(y.shape[1])
    perm_design = design.copy()
    for _ in range(n_permutations):
        perm_design[:, col] = rng.permutation(design[:, col])
        _, t_p, _ = _ols_t(perm_design, y, col)
        abs_t = np.abs(t_p)
        exceed += abs_t >= np.abs(t_obs)
        exceed_max += abs_t.max() >= np.abs(t_obs)
    return pd.DataFrame({"t": t_obs, "p_perm": (1 + exceed) / (1 + n_permutations),
                         "p_fwer": (1 + exceed_max) / (1 + n_permutations)}, index=df.columns)


# --------------------------------------------------------------------------------------
# the one-call evaluation of two tables
# --------------------------------------------------------------------------------------
def feature_columns(table: pd.DataFrame, exclude: Sequence[str]) -> list[str]:
    """Numeric columns of a wide table that are not ids or covariates."""
    return [c for c in table.columns
            if c not in set(exclude) and pd.api.types.is_numeric_dtype(table[c])]


def _traveling(table: pd.DataFrame, subject: str, batch: str, feats: list[str]) -> bool:
    """True when >= 2 subjects were scanned once at every site (ICC design)."""
    if subject not in table.columns:
        return False
    try:
        _cube(table[feats[:1]], table[subject].to_numpy(), table[batch].to_numpy())
    except HarmonizeError:
        return False
    return True


def evaluate_tables(
    before: pd.DataFrame,
    after: pd.DataFrame,
    *,
    batch: str = "site",
    covariates: Sequence[str] = (),
    subject: str = "subject",
    truth: pd.DataFrame | None = None,
    harmonizer: HarmonizerFactory | Any | None = None,
    classifier: Literal["logistic", "random_forest"] = "logistic",
    n_splits: int = 5,
    n_permutations: int = 100,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Evaluate a harmonized wide table against the unharmonized one.

    Parameters
    ----------
    before, after
        Wide tables with the same rows (scans) in the same order: id columns
        (``subject``, ``batch``), covariates and feature columns.
    batch, subject, covariates
        Column names. Numeric covariates are tested for preservation of association.
    truth
        True effects (simulation): index = feature, one column per covariate, in feature
        units per covariate unit.
    harmonizer
        Harmonizer factory (e.g. ``ComBat``). When given, the discriminability row
        ``"before + harmonizer in CV"`` refits it inside every fold on ``before``: the
        unbiased figure. The ``"after table"`` row classifies the harmonized table as
        given; if that table was harmonized on all scans at once it is optimistic
        (the harmonizer saw the test folds), and it is labelled so.

    Returns
    -------
    dict of DataFrames: ``discriminability``, ``site_tests``, ``ks``, ``cov``, ``summary``
    and, when applicable, ``icc`` and ``bland_altman`` (when >= 2 subjects were scanned
    once at every site; the CoV is then the within-subject CoV),
    ``associations`` (numeric covariates) and ``spurious`` (permutation test after).
    """
    for nm, tab in (("before", before), ("after", after)):
        missing = sorted({batch, *covariates} - set(tab.columns))
        if missing:
            raise HarmonizeError(f"{nm}: missing columns {missing}")
    if len(before) != len(after):
        raise HarmonizeError(f"after: {len(after)} rows, before: {len(before)}; the tables "
                             "must hold the same scans in the same order")
    ids = [c for c in (subject, batch) if c in before.columns and c in after.columns]
    if not all(np.array_equal(before[c].astype(str), after[c].astype(str)) for c in ids):
        raise HarmonizeError(f"after: columns {ids} differ from before; same scans, same order")
    exclude = [batch, subject, *covariates]
    feats = feature_columns(before, exclude)
    missing = sorted(set(feats) - set(after.columns))
    if not feats or missing:
        raise HarmonizeError(f"after: feature columns missing: {missing[:5]}" if missing
                             else "before: no numeric feature column")
    xb, xa = before[feats], after[feats]
    site = before[batch].astype(str).to_numpy()
    cov = before[list(covariates)] if covariates else None
    tables: dict[str, pd.DataFrame] = {}

    after_key = "after table (harmonized before the split: optimistic if fitted on all scans)"
    opts = {"classifier": classifier, "n_splits": n_splits, "n_permutations": n_permutations,
            "seed": seed}
    rows = {"before": site_discriminability(xb, site, **opts),
            after_key: site_discriminability(xa, site, **opts)}
    if harmonizer is not None:
        rows["before + harmonizer in CV"] = site_discriminability(
            xb, site, covariates=cov, harmonizer=harmonizer, **opts)
    tables["discriminability"] = pd.DataFrame({k: v.as_dict() for k, v in rows.items()}).T

    tb, ta = site_effect_tests(xb, site), site_effect_tests(xa, site)
    tables["site_tests"] = pd.concat({"before": tb, "after": ta}, axis=1)
    kb, ka = ks_tests(xb, site), ks_tests(xa, site)
    tables["ks"] = kb.rename(columns={"statistic": "ks_before", "p_value": "p_before"}).assign(
        ks_after=ka["statistic"].to_numpy(), p_after=ka["p_value"].to_numpy())
    trav = _traveling(before, subject, batch, feats)
    subj = before[subject].to_numpy() if trav else None
    tables["cov"] = pd.DataFrame({"cov_pct_before": cov_across_sites(xb, site, subject=subj),
                                  "cov_pct_after": cov_across_sites(xa, site, subject=subj)})
    summary = {
        "site accuracy before": rows["before"].accuracy,
        "site accuracy after (table)": rows[after_key].accuracy,
        "chance accuracy": rows["before"].chance_accuracy,
        "features with ANOVA p<0.05 before (%)": 100 * float((tb["anova_p"] < 0.05).mean()),
        "features with ANOVA p<0.05 after (%)": 100 * float((ta["anova_p"] < 0.05).mean()),
        "features with Levene p<0.05 before (%)": 100 * float((tb["levene_p"] < 0.05).mean()),
        "features with Levene p<0.05 after (%)": 100 * float((ta["levene_p"] < 0.05).mean()),
        "mean KS statistic before": float(kb["statistic"].mean()),
        "mean KS statistic after": float(ka["statistic"].mean()),
        "median CoV before (%)": float(tables["cov"]["cov_pct_before"].median()),
        "median CoV after (%)": float(tables["cov"]["cov_pct_after"].median()),
    }
    if harmonizer is not None:
        summary["site accuracy, harmonizer in CV"] = rows["before + harmonizer in CV"].accuracy
    if trav:
        ib, ia = icc(xb, subj, site), icc(xa, subj, site)
        tables["icc"] = pd.concat({"before": ib, "after": ia}, axis=1)
        summary["median ICC(2,1) before"] = float(ib["icc2_1"].median())
        summary["median ICC(2,1) after"] = float(ia["icc2_1"].median())
        sites = sorted(pd.unique(site))
        ba = []
        for other in sites[1:]:
            for nm, x in (("before", xb), ("after", xa)):
                try:
                    r = bland_altman_sites(x, subj, site, other, sites[0])
                except HarmonizeError:
                    continue
                ba.append(r.assign(site_a=other, site_b=sites[0], table=nm))
        if ba:
            tables["bland_altman"] = pd.concat(ba).rename_axis("feature").reset_index()
    numeric = [c for c in covariates if pd.api.types.is_numeric_dtype(before[c])]
    assoc = []
    for var in numeric:
        t = None if truth is None or var not in truth.columns else truth[var]
        try:
            res = preservation_of_associations(xb, xa, before[list(covariates)], var, truth=t)
        except HarmonizeError:
            continue
        assoc.append(res.assign(variable=var))
        if t is not None:
            summary[f"mean |beta error| {var} before"] = float(res["abs_error_before"].mean())
            summary[f"mean |beta error| {var} after"] = float(res["abs_error_after"].mean())
    if assoc:
        tables["associations"] = pd.concat(assoc).rename_axis("feature").reset_index()
    tables["summary"] = pd.DataFrame({"value": summary}).rename_axis("metric")
    return tables
