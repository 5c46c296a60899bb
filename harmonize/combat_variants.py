"""ComBat variants: ComBat-GAM, CovBat, longitudinal ComBat, traveling-subject ComBat.

All share :class:`~mrharmony.harmonize.combat.ComBat`'s API, empirical Bayes and file
format; what each changes:

* :class:`ComBatGAM` (Pomponio et al. 2020): covariates named in ``smooth`` enter as an
  unpenalised cubic regression spline (B-spline basis, knots at quantiles, ``smooth_df``
  columns); neuroHarmonize fits a penalised GAM instead. Outside the fitted range the
  covariate is clipped to the boundary knots (constant extrapolation).
* :class:`CovBat` (Chen et al. 2022): after ComBat, the residuals are rotated onto their
  principal components; the first components (explaining more than ``pct_var`` of the
  variance, or ``n_pc``) get a location/scale ComBat across sites (``eb=False`` on the
  scores, as the authors' code) and the residuals are rebuilt. ``mode="reference"``
  (default) is the authors' algorithm (each feature scaled by its residual SD before the
  PCA, R ``prcomp(scale.=TRUE)``); ``mode="pooled"`` is a documented variant (scaled by the
  ComBat pooled SD, components counted with ``>=``). Missing values are not supported
  (PCA needs complete data).
* :class:`LongitudinalComBat` (Beer et al. 2020): a subject random intercept.
  ``mode="reference"`` (default) is longCombat (R, ``method="REML"``): one REML mixed
  model per feature (statsmodels ``MixedLM``), standardisation by the REML residual SD,
  longCombat's fixed-count EB iteration. ``mode="moments"`` is a documented, vectorised
  variant: variance components from a one-way ANOVA moment estimator, GLS fixed effects,
  the scale from the squared conditional residuals. Both remove the subject BLUPs
  ``eta_i`` before standardisation and add them back after; transforming new scans needs
  their subject labels (BLUPs from their data).
* :class:`TravelingComBat`: site effects estimated from traveling subjects only (each
  scanned at two or more sites), with subject as a fixed effect so that biology cancels
  exactly; then applied to any scan of those sites. By default location-only
  (``mean_only=True``: the "measurement bias" of the traveling-subject method); with
  ``mean_only=False`` the scale is also corrected, about the traveling-subject grand mean.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from mrharmony.errors import HarmonizeError
from mrharmony.harmonize.combat import ComBat
from mrharmony.harmonize.combat_design import (
    CovariateEncoder,
    aligned,
    as_matrix,
    is_dask,
    sort_levels,
)
from mrharmony.harmonize.combat_math import HarmonizeWarning, adjust_chunk, priors

__all__ = ["COVBAT_MODES", "LONGITUDINAL_MODES", "ComBatGAM", "CovBat", "LongitudinalComBat",
           "TravelingComBat", "n_components"]


class ComBatGAM(ComBat):
    """ComBat with smooth (spline) covariate effects.

    Parameters
    ----------
    smooth : sequence of str
        Numeric covariate columns modelled with a cubic B-spline (e.g. ``("age",)``).
    smooth_df : int
        Basis columns per smooth term (>= 4; one is absorbed by the batch indicators).
    **kwargs
        As :class:`~mrharmony.harmonize.combat.ComBat`.
    """

    model_kind = "ComBatGAM"

    def __init__(self, *, smooth: Sequence[str] = ("age",), smooth_df: int = 5,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(smooth_df) < 4:
            raise HarmonizeError(f"smooth_df: {smooth_df} < 4 (a cubic spline needs 4)")
        self.smooth = list(smooth)
        self.smooth_df = int(smooth_df)

    def _make_encoder(self) -> CovariateEncoder:
        return CovariateEncoder(categorical=self.categorical, smooth=self.smooth,
                                smooth_df=self.smooth_df)

    @aligned
    def fit(self, X: Any, batch: Any, covariates: Any = None) -> ComBatGAM:
        """As :meth:`ComBat.fit`; the ``smooth`` columns must be in ``covariates``."""
        cols = [] if covariates is None else [str(c) for c in covariates.columns]
        missing = [s for s in self.smooth if s not in cols]
        if missing:
            raise HarmonizeError(f"covariates: smooth term(s) {missing} not among {cols}")
        return super().fit(X, batch, covariates)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "smooth": self.smooth, "smooth_df": self.smooth_df}


# --------------------------------------------------------------------------- CovBat

COVBAT_MODES = ("reference", "pooled")
LONGITUDINAL_MODES = ("reference", "moments")


def _check_mode(mode: str, modes: tuple[str, ...], cls: str) -> str:
    if mode not in modes:
        raise HarmonizeError(f"{cls}: mode {mode!r} is not one of {list(modes)}")
    return mode


def n_components(explained: np.ndarray, pct_var: float, *, strict: bool = True) -> int:
    """Number of leading principal components that explain ``pct_var`` of the variance.

    Parameters
    ----------
    explained : ndarray, shape (k,)
        Variance of each component, in decreasing order (any unit; only ratios matter).
    pct_var : float
        Fraction of the total variance (0 < pct_var <= 1).
    strict : bool
        ``True``: the first count whose cumulative fraction is *greater than* ``pct_var``
        (R ``CovBat``: ``which(cumsum(sdev^2 / sum(sdev^2)) > percent.var)[1]``; the
        authors' ``covbat.py``: ``min(where(cumsum(ratio) > pct_var)) + 1``).
        ``False``: the first count whose fraction reaches ``pct_var`` (``>=``, 1e-12
        slack; the ``pooled`` variant).

    Returns
    -------
    int
        Between 1 and ``k``; ``k`` when no count qualifies (``pct_var = 1`` with strict
        ``>``, where the authors' code fails).
    """
    ev = np.asarray(explained, dtype=np.float64)
    frac = np.cumsum(ev) / max(float(ev.sum()), np.finfo(float).tiny)
    hit = np.flatnonzero(frac > pct_var) if strict else np.flatnonzero(frac >= pct_var - 1e-12)
    return int(hit[0]) + 1 if hit.size else int(ev.size)


class CovBat(ComBat):
    """ComBat followed by harmonization of the residual principal components.

    ``mode="reference"`` (default) is the authors' algorithm (Chen et al. 2022, R package
    ``CovBat`` ``covbat()`` with ``std.var=TRUE``, ``score.eb=FALSE``; their ``covbat.py``):

    1. ComBat; residuals ``r = ComBat(y) - (grand mean + covariate part)``;
    2. ``prcomp(r, center=TRUE, scale.=TRUE)``: centre each feature on its mean and divide
       by its sample SD (``ddof=1``) over all scans;
    3. ``k`` = the smallest count whose cumulative explained variance is *greater than*
       ``pct_var`` (:func:`n_components`), or ``n_pc``;
    4. ComBat without covariates and without empirical Bayes on the first ``k`` scores;
    5. rebuild from all scores, undo the scaling and centring, add the mean back.

    ``mode="pooled"`` is a deliberate variant (mrharmony's earlier estimator, not the
    authors'): the residuals are divided by the ComBat pooled SD ``sqrt(var_pooled_)``
    instead of their own SD, and ``k`` is the first count that *reaches* ``pct_var``
    (``>=``). Both modes are affine in the data and give the same result when all
    components are harmonized; with fewer, they pick different directions.

    Parameters
    ----------
    mode : {"reference", "pooled"}
        Estimator (see above).
    pct_var : float
        Fraction of residual variance whose components are harmonized (0 < pct_var <= 1;
        ``1`` harmonizes all components).
    n_pc : int, optional
        Number of components (overrides ``pct_var``).
    **kwargs
        As :class:`~mrharmony.harmonize.combat.ComBat` (applies to the first stage).

    Notes
    -----
    Scans of new sites cannot be added (the PCA depends on every site); ``transform`` of
    new scans of fitted sites uses the fitted centre, scale, components and score model.
    Missing values and Dask arrays are not supported (PCA needs the whole matrix). With
    ``ref_batch`` (not in the authors' code) the reference scans are returned unchanged.
    """

    model_kind = "CovBat"
    _legacy_mode = "pooled"  # model files written before modes existed

    def __init__(self, *, mode: str = "reference", pct_var: float = 0.95,
                 n_pc: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.copy = True  # the first stage's output is reused; never write into X
        self.mode = _check_mode(mode, COVBAT_MODES, "CovBat")
        if not 0 < pct_var <= 1:
            raise HarmonizeError(f"pct_var: {pct_var} not in (0, 1]")
        if n_pc is not None and n_pc < 1:
            raise HarmonizeError(f"n_pc: {n_pc} < 1")
        self.pct_var = float(pct_var)
        self.n_pc = None if n_pc is None else int(n_pc)

    def _residuals(self, first: np.ndarray, cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ComBat output minus its mean part (zero for pass-through features), and the mean."""
        mean = self.grand_mean_[None, :] + cov @ self.beta_
        res = first - mean
        res[:, self.degenerate_] = 0.0
        return res, mean

    @staticmethod
    def _dense(X: Any) -> tuple[np.ndarray, Any, Any]:
        Xm, index, columns = as_matrix(X)
        if is_dask(Xm):
            raise HarmonizeError("CovBat: Dask arrays are not supported (PCA needs the "
                                 "whole residual matrix); use ComBat")
        Xm = np.asarray(Xm, dtype=np.float64)
        if not np.isfinite(Xm).all():
            raise HarmonizeError(f"X: CovBat needs complete data, {int((~np.isfinite(Xm)).sum())}"
                                 " missing values")
        return Xm, index, columns

    @aligned
    def fit(self, X: Any, batch: Any, covariates: Any = None) -> CovBat:
        """Fit ComBat, then the PCA of its residuals and the score harmonizer.

        Arguments as :meth:`ComBat.fit`. Sets ``pc_center_``, ``pc_scale_`` (p,) (feature
        units), ``components_`` (p, k) and ``n_components_`` (k).
        """
        Xm, _, _ = self._dense(X)
        super().fit(X, batch, covariates)
        first = ComBat.transform(self, Xm, batch, covariates)
        cov = self.encoder_.transform(covariates, Xm.shape[0])
        res, _ = self._residuals(first, cov)
        self.pc_center_ = res.mean(axis=0)
        # reference: prcomp(scale.=TRUE) divides by sd() (n - 1); pooled: ComBat's SD
        scale = (res.std(axis=0, ddof=1) if self.mode == "reference"
                 else np.sqrt(self.var_pooled_))
        self.pc_scale_ = np.where((scale > 0) & ~self.degenerate_, scale, 1.0)
        U = (res - self.pc_center_) / self.pc_scale_
        _, sv, vt = np.linalg.svd(U, full_matrices=False)
        if self.n_pc is not None:
            k = min(self.n_pc, vt.shape[0])
        else:
            k = n_components(sv**2, self.pct_var, strict=self.mode == "reference")
        self.n_components_ = k
        self.components_ = vt[:k].T.copy()
        scores = U @ self.components_
        self.scores_model_ = ComBat(eb=False, ref_batch=self.ref_batch).fit(scores, batch)
        return self

    @aligned
    def transform(self, X: Any, batch: Any, covariates: Any = None) -> Any:
        """ComBat, then harmonize the residual component scores (arguments as ComBat)."""
        self._check_fitted()
        Xm, index, columns = self._dense(X)
        first = ComBat.transform(self, Xm, batch, covariates)
        cov = self.encoder_.transform(covariates, Xm.shape[0])
        res, mean = self._residuals(first, cov)
        U = (res - self.pc_center_) / self.pc_scale_
        scores = U @ self.components_
        new_scores = self.scores_model_.transform(scores, batch)
        # all scores rebuild U exactly (U lies in the span of the SVD's components)
        U += (new_scores - scores) @ self.components_.T
        out = first.copy()
        ok = ~self.degenerate_
        out[:, ok] = (U * self.pc_scale_ + self.pc_center_ + mean)[:, ok]
        ref = self._ref_index()
        if ref is not None:
            rows = self._batch_codes(batch, Xm.shape[0], fit=False) == ref
            out[rows] = Xm[rows]
        if index is not None:
            import pandas as pd

            return pd.DataFrame(out, index=index, columns=columns)
        return out

    def add_batch(self, X: Any, batch: Any, covariates: Any = None) -> CovBat:
        """Not available: the residual PCA depends on all fitted sites."""
        raise HarmonizeError("CovBat.add_batch: the residual PCA depends on every fitted "
                             "site; refit with the new site")

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "mode": self.mode, "pct_var": self.pct_var,
                "n_pc": self.n_pc}

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = super()._get_state()
        smeta, sarrays = self.scores_model_._get_state()
        meta["scores_model"] = smeta
        arrays.update({f"scores/{k}": v for k, v in sarrays.items()})
        arrays["pc_center"] = self.pc_center_
        arrays["pc_scale"] = self.pc_scale_
        arrays["components"] = self.components_
        return meta, arrays

    def _set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        super()._set_state(meta, arrays)
        sarrays = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("scores/")}
        self.scores_model_ = ComBat._from_state(meta["scores_model"], sarrays)
        self.components_ = arrays["components"]
        self.n_components_ = int(self.components_.shape[1])
        if "pc_scale" in arrays:
            self.pc_scale_ = arrays["pc_scale"]
            self.pc_center_ = arrays["pc_center"]
        else:  # files written before modes: centre stored in pooled-SD units
            self.pc_scale_ = np.sqrt(self.var_pooled_)
            self.pc_center_ = arrays["pc_center"] * self.pc_scale_

    @classmethod
    def _from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> ComBat:
        meta = {**meta, "options": {"mode": cls._legacy_mode, **meta["options"]}}
        return super()._from_state(meta, arrays)


# --------------------------------------------------------------------------- longitudinal


def _long_finish(Y: np.ndarray, ds: Any, subj: np.ndarray, B: np.ndarray, lam: np.ndarray,
                 var_pooled: np.ndarray | None) -> dict[str, np.ndarray]:
    """Pass-1 moments given the fixed effects ``B`` and variance ratios ``lam``.

    The subject BLUPs ``eta_i = n_i lam / (1 + n_i lam) * mean_i(y - D B)`` (exact for a
    random intercept) are removed before standardising, as in Beer et al.;
    ``var_pooled=None`` takes the mean squared conditional residual.
    """
    n_batch, Z, ref = ds.n_batch, ds.Z, ds.ref
    n = Y.shape[0]
    m = int(subj.max()) + 1
    n_i = np.bincount(subj, minlength=m).astype(np.float64)[:, None]
    R = Y - ds.D @ B
    sums = np.zeros((m, Y.shape[1]))
    np.add.at(sums, subj, R)
    shrink = n_i * lam[None, :] / (1.0 + n_i * lam[None, :])
    eta = shrink * sums / n_i
    if var_pooled is None:
        E = R - eta[subj]
        rows = np.ones(n, bool) if ref is None else Z[:, ref] > 0
        var_pooled = (E[rows] ** 2).mean(axis=0)
    degenerate = (np.ptp(Y, axis=0) == 0) | (var_pooled <= 1e-24 * (Y**2).mean(axis=0))
    var_pooled = np.where(degenerate, 1.0, var_pooled)
    n_obs = np.repeat(Z.sum(axis=0)[:, None], Y.shape[1], axis=1)
    grand = (Z.sum(axis=0)[:, None] / n * B[:n_batch]).sum(axis=0) if ref is None else B[ref]
    Sd = (Y - grand - ds.D[:, n_batch:] @ B[n_batch:] - eta[subj]) / np.sqrt(var_pooled)
    xbar = (Z.T @ Sd) / n_obs
    ss = Z.T @ (Sd - xbar[ds.codes]) ** 2
    return {"B_hat": B, "grand_mean": grand, "var_pooled": var_pooled, "n_obs": n_obs,
            "xbar": xbar, "ss": ss, "degenerate": degenerate, "lam": lam}


def _long_chunk_stats(Y: np.ndarray, ds: Any, work: np.ndarray | None = None, *,
                      subj: np.ndarray) -> dict[str, np.ndarray]:
    """Pass 1, ``mode="moments"``: moment estimator + vectorised GLS."""
    D = ds.D
    Y = np.asarray(Y, dtype=np.float64)
    n = Y.shape[0]
    m = int(subj.max()) + 1
    U = (subj[:, None] == np.arange(m)[None, :]).astype(np.float64)
    n_i = U.sum(axis=0)
    DtD, DtY = D.T @ D, D.T @ Y
    R = Y - D @ np.linalg.solve(DtD, DtY)
    rbar = (U.T @ R) / n_i[:, None]
    s2e = ((R - rbar[subj]) ** 2).sum(axis=0) / (n - m)
    s2u = np.maximum(0.0, ((n_i[:, None] * rbar**2).sum(axis=0) - m * s2e) / n)
    with np.errstate(invalid="ignore", divide="ignore"):
        lam = np.where(s2e > 0, s2u / s2e, 0.0)
    W = lam[None, :] / (1.0 + n_i[:, None] * lam[None, :])  # (m, c)
    S = U.T @ D  # (m, k)
    G = DtD[None] - np.einsum("if,ia,ib->fab", W, S, S, optimize=True)
    rhs = DtY.T - np.einsum("if,ia,if->fa", W, S, U.T @ Y, optimize=True)
    B = np.linalg.solve(G, rhs[:, :, None])[:, :, 0].T
    return _long_finish(Y, ds, subj, B, lam, None)


_REML_GTOL = 1e-10  # BFGS gradient tolerance of the polishing step


def _reml_fit(y: np.ndarray, D: np.ndarray, subj: np.ndarray, polish: bool
              ) -> tuple[Any, bool]:
    """REML fit of ``y ~ D + (1 | subject)`` with statsmodels ``MixedLM``.

    L-BFGS first (statsmodels' default optimizer and longcombat-py's), then BFGS or
    Powell if it fails; ``polish`` restarts BFGS from that optimum with a tight gradient
    tolerance (L-BFGS stops up to ~1e-4 relative from the optimum in the variance ratio).
    Returns the fit (None if every optimizer failed) and whether the first stage converged.
    """
    from statsmodels.regression.mixed_linear_model import MixedLM

    model = MixedLM(y, D, groups=subj)
    fit = None
    for method in ("lbfgs", "bfgs", "powell"):
        try:
            fit = model.fit(reml=True, method=[method])
            break
        except (np.linalg.LinAlgError, ValueError):
            continue
    if fit is None:
        return None, False
    converged = bool(fit.converged)
    if polish:
        try:
            tight = model.fit(reml=True, start_params=fit.params_object, method=["bfgs"],
                              gtol=_REML_GTOL)
        except (np.linalg.LinAlgError, ValueError):
            tight = None
        # BFGS often ends on "precision loss" at this tolerance: keep any improvement
        if tight is not None and np.isfinite(tight.llf) and tight.llf >= fit.llf:
            fit = tight
    return fit, converged


def _reml_chunk_stats(Y: np.ndarray, ds: Any, work: np.ndarray | None = None, *,
                      subj: np.ndarray, polish: bool, report: dict[str, Any]
                      ) -> dict[str, np.ndarray]:
    """Pass 1, ``mode="reference"``: one REML mixed model per feature (longCombat).

    ``report``: ``{"offset": first column of this chunk, "issues": [...]}``; chunks come in
    order (NumPy input only), fit problems are appended with their feature index.
    """
    # statsmodels adds "always" filters for its warnings when first imported: import it
    # before the "ignore" below, or they would take precedence over it
    import statsmodels.regression.mixed_linear_model  # noqa: F401
    from threadpoolctl import threadpool_limits

    D = ds.D
    Y = np.asarray(Y, dtype=np.float64)
    c = Y.shape[1]
    # OLS (no random effect) for constant features and fits where every optimizer failed
    B = np.linalg.lstsq(D, Y, rcond=None)[0]
    s2 = ((Y - D @ B) ** 2).sum(axis=0) / max(Y.shape[0] - D.shape[1], 1)
    lam = np.zeros(c)
    constant = np.ptp(Y, axis=0) == 0
    # tiny per-group solves: BLAS threads only add overhead (4x on two cores)
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' optimizer chatter; checked below
        for j in np.flatnonzero(~constant):
            fit, converged = _reml_fit(Y[:, j], D, subj, polish)
            if fit is None or not converged:
                report["issues"].append((report["offset"] + int(j),
                                         "failed" if fit is None else "not converged"))
            if fit is None:
                continue
            B[:, j] = np.asarray(fit.fe_params, dtype=np.float64)
            s2[j] = float(fit.scale)
            lam[j] = float(np.asarray(fit.cov_re)[0, 0]) / s2[j] if s2[j] > 0 else 0.0
    report["offset"] += c
    return _long_finish(Y, ds, subj, B, lam, s2)


def _eb_jacobi(g_hat: np.ndarray, d_hat: np.ndarray, n: np.ndarray, xbar: np.ndarray,
               ss: np.ndarray, rows: Sequence[int], niter: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """longCombat's empirical Bayes: ``niter`` simultaneous (Jacobi) updates, no stopping
    rule; ``gamma*`` starts from ``delta_hat``, each ``delta*`` uses the previous
    ``gamma*`` (``sva`` iterates to convergence, updating ``delta*`` with the new one).
    """
    g_bar, t2, a, b = priors(g_hat, d_hat)
    g_star, d_star = np.zeros_like(g_hat), np.ones_like(d_hat)
    for i in rows:
        gh, ni, xb, s = (np.nan_to_num(v[i]) for v in (g_hat, n, xbar, ss))

        def post_g(d: np.ndarray, i: int = i, gh: np.ndarray = gh,
                   ni: np.ndarray = ni) -> np.ndarray:
            return (ni * t2[i] * gh + d * g_bar[i]) / (ni * t2[i] + d)

        def post_d(g: np.ndarray, i: int = i, ni: np.ndarray = ni, xb: np.ndarray = xb,
                   s: np.ndarray = s) -> np.ndarray:
            return (b[i] + 0.5 * (s + ni * (xb - g) ** 2)) / (ni / 2.0 + a[i] - 1.0)

        g = post_g(np.nan_to_num(d_hat[i], nan=1.0))
        d = post_d(g)
        for _ in range(niter):
            g, d = post_g(d), post_d(g)
        g_star[i], d_star[i] = g, d
    return g_star, d_star


class LongitudinalComBat(ComBat):
    """ComBat with a subject random intercept, for repeated scans (Beer et al. 2020).

    ``fit``/``transform`` take ``subject`` (one label per scan); at least one subject must
    have two or more scans. Missing values and Dask arrays are not supported.

    ``mode="reference"`` (default) is longCombat (R, ``method="REML"``), feature by
    feature: a REML linear mixed model ``y ~ batch + covariates + (1 | subject)``
    (statsmodels ``MixedLM``; longCombat uses ``lme4::lmer``), the standardised data
    ``(y - fitted + batch effect) / sigma`` with ``fitted`` including the subject BLUPs
    and ``sigma`` the REML residual SD, the batch effects about the size-weighted mean
    of the batch coefficients, then empirical Bayes as longCombat: ``niter``
    simultaneous updates of ``gamma*`` and ``delta*`` (no convergence test). Cost: one
    mixed-model fit per feature (~0.1-0.3 s each).

    ``mode="moments"`` is a deliberate, vectorised variant (not the authors' estimator;
    it agrees with the reference to within the sampling error of the variance
    components, not to numerical precision): variance components from a one-way ANOVA
    moment estimator on OLS residuals (``sigma_e^2`` from within-subject deviations,
    ``sigma_u^2 = max(0, (sum_i n_i rbar_i^2 - m sigma_e^2) / n)``), fixed effects by GLS
    through the closed-form inverse of a random-intercept covariance
    (``V_i^-1 ∝ I - lambda/(1 + n_i lambda) 11^T``), the scale from the mean squared
    conditional residual (not REML ``sigma``) and the ``sva`` EB iteration (to ``conv``).
    Thousands of features in seconds; ``ref_batch`` is supported.

    In both modes the subject BLUPs ``eta_i`` are removed before standardisation and
    added back after; transforming new scans needs their subject labels (BLUPs from
    their data, with the fitted ``lambda_``).

    Parameters
    ----------
    mode : {"reference", "moments"}
        Estimator (see above).
    niter : int
        Empirical Bayes iterations of ``mode="reference"`` (longCombat's ``niter``).
    polish : bool
        ``mode="reference"``: refine each REML optimum with BFGS to a gradient tolerance
        of 1e-10 (default). statsmodels' L-BFGS, which longcombat-py uses as is, stops up
        to ~1e-4 relative from the optimum in the variance ratio; ``False`` reproduces
        longcombat-py.
    **kwargs
        As :class:`~mrharmony.harmonize.combat.ComBat`. ``mode="reference"`` has no
        reference batch (refused, as in longCombat); ``mean_only`` and
        ``parametric=False`` (not in longCombat) use ComBat's rules.
    """

    model_kind = "LongitudinalComBat"
    _legacy_mode = "moments"  # model files written before modes existed

    def __init__(self, *, mode: str = "reference", niter: int = 30, polish: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mode = _check_mode(mode, LONGITUDINAL_MODES, "LongitudinalComBat")
        if int(niter) < 1:
            raise HarmonizeError(f"niter: {niter} < 1")
        self.niter = int(niter)
        self.polish = bool(polish)
        if self.mode == "reference" and self.ref_batch is not None:
            raise HarmonizeError("LongitudinalComBat: mode 'reference' (longCombat) has no "
                                 "reference batch; use mode 'moments' (CLI: --mode moments)"
                                 " for one")

    def _chunk_function(self) -> Any:
        if self.mode == "reference":
            return functools.partial(_reml_chunk_stats, subj=self._subj, polish=self.polish,
                                     report=self._report)
        return functools.partial(_long_chunk_stats, subj=self._subj)

    def _estimate(self, st: dict[str, np.ndarray], single: Sequence[int], *,
                  ref_row: int | None, offset: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        g_hat, d_hat, g_star, d_star = super()._estimate(st, single, ref_row=ref_row,
                                                         offset=offset)
        ok = ~st["degenerate"]
        if (self.mode == "reference" and self.eb and self.parametric and not self.mean_only
                and int(ok.sum()) >= 2):
            rows = [r for r in range(g_hat.shape[0]) if r not in single and r != ref_row]
            g, d = _eb_jacobi(np.where(ok, g_hat, np.nan), np.where(ok, d_hat, np.nan),
                              st["n_obs"], st["xbar"], st["ss"], rows, self.niter)
            g_star[rows], d_star[rows] = g[rows], d[rows]
            g_star[:, ~ok], d_star[:, ~ok] = 0.0, 1.0
        return g_hat, d_hat, g_star, d_star

    def _subject_codes(self, subject: Any, n: int) -> np.ndarray:
        if subject is None:
            raise HarmonizeError(f"{type(self).__name__}: subject labels are required")
        values = np.asarray(subject, dtype=object).ravel()
        if values.shape[0] != n:
            raise HarmonizeError(f"subject: {values.shape[0]} labels for {n} samples")
        levels = sort_levels(values)
        lookup = {lev: i for i, lev in enumerate(levels)}
        return np.array([lookup[v] for v in values], dtype=np.intp)

    def _dense(self, X: Any) -> tuple[np.ndarray, Any, Any]:
        Xm, index, columns = as_matrix(X)
        if is_dask(Xm):
            raise HarmonizeError(f"{type(self).__name__}: Dask arrays are not supported")
        Xm = np.asarray(Xm, dtype=np.float64)
        if not np.isfinite(Xm).all():
            raise HarmonizeError(f"X: {type(self).__name__} needs complete data, "
                                 f"{int((~np.isfinite(Xm)).sum())} missing values")
        return Xm, index, columns

    @aligned
    def fit(self, X: Any, batch: Any, covariates: Any = None, *,
            subject: Any = None) -> LongitudinalComBat:
        """As :meth:`ComBat.fit`, with ``subject`` labels (array-like, one per scan).

        Sets ``lambda_`` (p,): the fitted variance ratio ``sigma_u^2 / sigma_e^2`` per
        feature, and ``var_pooled_``: ``sigma_e^2`` (REML) or the mean squared conditional
        residual (moments). A :class:`HarmonizeWarning` lists REML fits that did not
        converge (their feature keeps the last iterate) or failed (OLS, no random effect).
        """
        Xm, _, _ = self._dense(X)
        self._subj = self._subject_codes(subject, Xm.shape[0])
        self._report: dict[str, Any] = {"offset": 0, "issues": []}
        if np.bincount(self._subj).max() < 2:
            raise HarmonizeError("subject: every subject has one scan; the within-subject "
                                 "variance cannot be estimated (use ComBat)")
        try:
            super().fit(X, batch, covariates)
        finally:
            del self._subj
        issues = self._report.pop("issues")
        del self._report
        if issues:
            names = self.feature_names_in_
            first = [f"{names[j] if names else j}: {why}" for j, why in issues[:5]]
            warnings.warn(f"LongitudinalComBat: {len(issues)} REML fit(s) had problems "
                          f"(first: {first}); a failed fit keeps OLS without a random "
                          "effect, an unconverged one its last iterate", HarmonizeWarning,
                          stacklevel=2)
        return self

    def _store_extra(self, st: dict[str, np.ndarray], n_batch: int) -> None:
        self.lambda_ = st["lam"]
        self.batch_coef_ = st["B_hat"][:n_batch]

    @aligned
    def transform(self, X: Any, batch: Any, covariates: Any = None, *,
                  subject: Any = None) -> Any:
        """Harmonize scans; subject BLUPs are computed from the given scans."""
        self._check_fitted()
        Xm, index, columns = self._dense(X)
        self._check_features(Xm, columns)
        n = Xm.shape[0]
        subj = self._subject_codes(subject, n)
        codes = self._batch_codes(batch, n, fit=False)
        cov = self.encoder_.transform(covariates, n)
        ref = self._ref_index()
        Zd = (codes[:, None] == np.arange(len(self.batches_))[None, :]).astype(np.float64)
        if ref is not None:
            Zd[:, ref] = 1.0
        U = (subj[:, None] == np.arange(subj.max() + 1)[None, :]).astype(np.float64)
        n_i = U.sum(axis=0)[:, None]
        R = Xm - Zd @ self.batch_coef_ - cov @ self.beta_
        shrink = n_i * self.lambda_[None, :] / (1.0 + n_i * self.lambda_[None, :])
        eta = (shrink * (U.T @ R) / n_i)[subj]
        out = adjust_chunk(Xm, cov, codes, self._params(), ref, offset=eta)
        if index is not None:
            import pandas as pd

            return pd.DataFrame(out, index=index, columns=columns)
        return out

    @aligned
    def fit_transform(self, X: Any, batch: Any, covariates: Any = None, *,
                      subject: Any = None) -> Any:
        """:meth:`fit` then :meth:`transform` on the same scans."""
        return self.fit(X, batch, covariates, subject=subject).transform(
            X, batch, covariates, subject=subject)

    def add_batch(self, X: Any, batch: Any, covariates: Any = None) -> LongitudinalComBat:
        """Not available for the longitudinal model (the BLUPs need the new subjects)."""
        raise HarmonizeError("LongitudinalComBat.add_batch: not supported; refit")

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "mode": self.mode, "niter": self.niter,
                "polish": self.polish}

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = super()._get_state()
        arrays.update(lambda_=self.lambda_, batch_coef=self.batch_coef_)
        return meta, arrays

    def _set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        super()._set_state(meta, arrays)
        self.lambda_ = arrays["lambda_"]
        self.batch_coef_ = arrays["batch_coef"]

    @classmethod
    def _from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> ComBat:
        meta = {**meta, "options": {"mode": cls._legacy_mode, **meta["options"]}}
        return super()._from_state(meta, arrays)


# --------------------------------------------------------------------------- traveling


class TravelingComBat(ComBat):
    """Site effects from traveling subjects (each scanned at >= 2 sites).

    ``fit(X_ts, site, subject=...)`` takes the traveling subjects' scans only; subject is
    a fixed effect, so the site effects are within-subject differences. ``transform``
    applies them to any scan of the fitted sites (no covariates needed).

    Parameters
    ----------
    mean_only : bool
        Location-only correction (default, the traveling-subject method).
    **kwargs
        As :class:`~mrharmony.harmonize.combat.ComBat` (``eb``, ``parametric``, ...).
    """

    model_kind = "TravelingComBat"

    def __init__(self, *, mean_only: bool = True, **kwargs: Any) -> None:
        super().__init__(mean_only=mean_only, **kwargs)

    @aligned
    def fit(self, X: Any, batch: Any, covariates: Any = None, *,
            subject: Any = None) -> TravelingComBat:
        """Estimate site effects from paired scans of traveling subjects."""
        if covariates is not None:
            raise HarmonizeError("TravelingComBat: covariates are not used (the subject "
                                 "effect absorbs them); pass subject= instead")
        if subject is None:
            raise HarmonizeError("TravelingComBat: subject labels are required")
        import pandas as pd

        subj = pd.Series(np.asarray(subject, dtype=object).ravel(), name="subject")
        site = pd.Series(np.asarray(batch, dtype=object).ravel())
        if len(subj) != len(site):
            raise HarmonizeError(f"subject: {len(subj)} labels for {len(site)} samples")
        n_sites = pd.DataFrame({"s": subj, "b": site}).groupby("s")["b"].nunique()
        lonely = n_sites.index[n_sites < 2].tolist()
        if lonely:
            raise HarmonizeError(f"subject: {len(lonely)} subject(s) scanned at one site only "
                                 f"(e.g. {lonely[:3]}); traveling subjects need >= 2 sites")
        super().fit(X, batch, subj.to_frame().astype(str))
        return self

    @aligned
    def transform(self, X: Any, batch: Any, covariates: Any = None) -> Any:
        """Remove the fitted site effects from scans of fitted sites."""
        self._check_fitted()
        Xm, index, columns = as_matrix(X)
        self._check_features(Xm, columns)
        n = Xm.shape[0]
        codes = self._batch_codes(batch, n, fit=False)
        return self._apply(Xm, index, columns, codes, None)

    def add_batch(self, X: Any, batch: Any, covariates: Any = None) -> TravelingComBat:
        """Not available: a new site needs traveling-subject scans; refit with them."""
        raise HarmonizeError("TravelingComBat.add_batch: a new site's effect comes from "
                             "traveling subjects scanned there; refit with their scans")

    @aligned
    def fit_transform(self, X: Any, batch: Any, covariates: Any = None, *,
                      subject: Any = None) -> Any:
        """:meth:`fit` on traveling-subject scans, then :meth:`transform` them."""
        return self.fit(X, batch, subject=subject).transform(X, batch)
