"""Site discriminability: how well a classifier predicts the site from the features.

:func:`site_discriminability` fits the harmonizer **inside each cross-validation fold**
on the training samples only and applies it to the held-out fold; harmonizing the whole
table first and then cross-validating leaks the test fold into the harmonizer (it makes
harmonization look better than it is). The function takes a harmonizer *factory* (any
callable returning an object with ``fit(X, batch, covariates=...)`` and
``transform(X, batch, covariates=...)``, e.g. ``ComBat`` or
:class:`~.baseline.MeanCentering`), never a harmonized table.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from mrharmony.errors import HarmonizeError

from ._inputs import HarmonizerFactory, _frame, _labels

__all__ = ["Discriminability", "site_discriminability"]


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
