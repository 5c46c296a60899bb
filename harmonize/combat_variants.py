"""ComBat variants: ComBat-GAM, CovBat, longitudinal ComBat, traveling-subject ComBat.

All share :class:`~mrharmony.harmonize.combat.ComBat`'s API, empirical Bayes and file
format; what each changes:

* :class:`ComBatGAM` (Pomponio et al. 2020): covariates named in ``smooth`` enter as an
  unpenalised cubic regression spline (B-spline basis, knots at quantiles, ``smooth_df``
  columns); neuroHarmonize fits a penalised GAM instead. Outside the fitted range the
  covariate is clipped to the boundary knots (constant extrapolation).
* :class:`CovBat` (Chen et al. 2022): after ComBat, the residuals standardised by the
  pooled SD are rotated onto their principal components; the first components (explaining
  ``pct_var`` of the variance, or ``n_pc``) get a location/scale ComBat across sites
  (``eb=False`` on the scores, as the authors' code) and the residuals are rebuilt.
  Missing values are not supported (PCA needs complete data).
* :class:`LongitudinalComBat` (Beer et al. 2020): a subject random intercept. Instead of
  one REML fit per feature, variance components come from a vectorised one-way ANOVA
  moment estimator on OLS residuals (``sigma_e^2`` from within-subject deviations,
  ``sigma_u^2 = max(0, (sum_i n_i rbar_i^2 - m sigma_e^2) / n)``), then the fixed effects
  are re-estimated by GLS per feature, vectorised through the closed-form inverse of a
  random-intercept covariance (``V_i^-1 ∝ I - lambda/(1 + n_i lambda) 11^T``), and the
  subject BLUPs ``eta_i`` are removed before standardisation and added back after, as in
  Beer et al. Transforming new scans needs their subject labels (BLUPs from their data).
* :class:`TravelingComBat`: site effects estimated from traveling subjects only (each
  scanned at two or more sites), with subject as a fixed effect so that biology cancels
  exactly; then applied to any scan of those sites. By default location-only
  (``mean_only=True``: the "measurement bias" of the traveling-subject method); with
  ``mean_only=False`` the scale is also corrected, about the traveling-subject grand mean.
"""

from __future__ import annotations

import functools
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
from mrharmony.harmonize.combat_math import adjust_chunk

__all__ = ["ComBatGAM", "CovBat", "LongitudinalComBat", "TravelingComBat"]


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


class CovBat(ComBat):
    """ComBat followed by harmonization of the residual principal components.

    Parameters
    ----------
    pct_var : float
        Fraction of residual variance whose components are harmonized (0 < pct_var <= 1).
    n_pc : int, optional
        Number of components (overrides ``pct_var``).
    **kwargs
        As :class:`~mrharmony.harmonize.combat.ComBat` (applies to the first stage).
    """

    model_kind = "CovBat"

    def __init__(self, *, pct_var: float = 0.95, n_pc: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.copy = True  # the first stage's output is reused; never write into X
        if not 0 < pct_var <= 1:
            raise HarmonizeError(f"pct_var: {pct_var} not in (0, 1]")
        if n_pc is not None and n_pc < 1:
            raise HarmonizeError(f"n_pc: {n_pc} < 1")
        self.pct_var = float(pct_var)
        self.n_pc = None if n_pc is None else int(n_pc)

    def _residuals(self, Xc: np.ndarray, cov: np.ndarray) -> np.ndarray:
        mean = self.grand_mean_[None, :] + cov @ self.beta_
        res = (Xc - mean) / np.sqrt(self.var_pooled_)[None, :]
        res[:, self.degenerate_] = 0.0
        return res

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
        """Fit ComBat, then the PCA of its residuals and the score harmonizer."""
        Xm, _, _ = self._dense(X)
        super().fit(X, batch, covariates)
        first = ComBat.transform(self, Xm, batch, covariates)
        cov = self.encoder_.transform(covariates, Xm.shape[0])
        res = self._residuals(first, cov)
        self.pc_center_ = res.mean(axis=0)
        _, sv, vt = np.linalg.svd(res - self.pc_center_, full_matrices=False)
        if self.n_pc is not None:
            k = min(self.n_pc, vt.shape[0])
        else:
            frac = np.cumsum(sv**2) / max(float((sv**2).sum()), np.finfo(float).tiny)
            k = int(np.searchsorted(frac, self.pct_var - 1e-12) + 1)
        self.components_ = vt[:k].T.copy()
        scores = (res - self.pc_center_) @ self.components_
        self.scores_model_ = ComBat(eb=False, ref_batch=self.ref_batch).fit(scores, batch)
        return self

    @aligned
    def transform(self, X: Any, batch: Any, covariates: Any = None) -> Any:
        """ComBat, then harmonize the residual component scores."""
        self._check_fitted()
        Xm, index, columns = self._dense(X)
        first = ComBat.transform(self, Xm, batch, covariates)
        cov = self.encoder_.transform(covariates, Xm.shape[0])
        res = self._residuals(first, cov)
        scores = (res - self.pc_center_) @ self.components_
        new_scores = self.scores_model_.transform(scores, batch)
        res += (new_scores - scores) @ self.components_.T
        out = first.copy()
        ok = ~self.degenerate_
        mean = self.grand_mean_[None, :] + cov @ self.beta_
        out[:, ok] = (res * np.sqrt(self.var_pooled_)[None, :] + mean)[:, ok]
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
        return {**super()._options(), "pct_var": self.pct_var, "n_pc": self.n_pc}

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = super()._get_state()
        smeta, sarrays = self.scores_model_._get_state()
        meta["scores_model"] = smeta
        arrays.update({f"scores/{k}": v for k, v in sarrays.items()})
        arrays["pc_center"] = self.pc_center_
        arrays["components"] = self.components_
        return meta, arrays

    def _set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        super()._set_state(meta, arrays)
        sarrays = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("scores/")}
        self.scores_model_ = ComBat._from_state(meta["scores_model"], sarrays)
        self.pc_center_ = arrays["pc_center"]
        self.components_ = arrays["components"]


# --------------------------------------------------------------------------- longitudinal


def _long_chunk_stats(Y: np.ndarray, ds: Any, work: np.ndarray | None = None, *,
                      subj: np.ndarray) -> dict[str, np.ndarray]:
    """Pass 1 with a subject random intercept (moment estimator + vectorised GLS)."""
    D, n_batch, Z, ref = ds.D, ds.n_batch, ds.Z, ds.ref
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
    R = Y - D @ B
    shrink = n_i[:, None] * lam[None, :] / (1.0 + n_i[:, None] * lam[None, :])
    eta = shrink * (U.T @ R) / n_i[:, None]
    E = R - eta[subj]
    rows = np.ones(n, bool) if ref is None else Z[:, ref] > 0
    var_pooled = (E[rows] ** 2).mean(axis=0)
    degenerate = (np.ptp(Y, axis=0) == 0) | (var_pooled <= 1e-24 * (Y**2).mean(axis=0))
    var_pooled = np.where(degenerate, 1.0, var_pooled)
    n_obs = np.repeat(Z.sum(axis=0)[:, None], Y.shape[1], axis=1)
    grand = (Z.sum(axis=0)[:, None] / n * B[:n_batch]).sum(axis=0) if ref is None else B[ref]
    Sd = (Y - grand - D[:, n_batch:] @ B[n_batch:] - eta[subj]) / np.sqrt(var_pooled)
    xbar = (Z.T @ Sd) / n_obs
    codes = Z.argmax(axis=1)
    ss = Z.T @ (Sd - xbar[codes]) ** 2
    return {"B_hat": B, "grand_mean": grand, "var_pooled": var_pooled, "n_obs": n_obs,
            "xbar": xbar, "ss": ss, "degenerate": degenerate, "lam": lam}


class LongitudinalComBat(ComBat):
    """ComBat with a subject random intercept, for repeated scans (Beer et al. 2020).

    ``fit``/``transform`` take ``subject`` (one label per scan); at least one subject must
    have two or more scans. Missing values and Dask arrays are not supported.
    """

    model_kind = "LongitudinalComBat"

    def _chunk_function(self) -> Any:
        return functools.partial(_long_chunk_stats, subj=self._subj)

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
        """As :meth:`ComBat.fit`, with ``subject`` labels (array-like, one per scan)."""
        Xm, _, _ = self._dense(X)
        self._subj = self._subject_codes(subject, Xm.shape[0])
        if np.bincount(self._subj).max() < 2:
            raise HarmonizeError("subject: every subject has one scan; the within-subject "
                                 "variance cannot be estimated (use ComBat)")
        try:
            return super().fit(X, batch, covariates)
        finally:
            del self._subj

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

    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = super()._get_state()
        arrays.update(lambda_=self.lambda_, batch_coef=self.batch_coef_)
        return meta, arrays

    def _set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        super()._set_state(meta, arrays)
        self.lambda_ = arrays["lambda_"]
        self.batch_coef_ = arrays["batch_coef"]


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
