"""ComBat feature harmonization, vectorised over features, NaN-aware, Dask-ready.

Model (Johnson, Li & Rabinovic 2007; Fortin et al. 2017/2018), for feature ``v``, scan
``j`` of batch (site) ``i``::

    y_ijv = alpha_v + x_ij^T beta_v + gamma_iv + delta_iv * eps_ijv,  eps ~ N(0, sigma_v^2)

The estimator follows R ``sva::ComBat`` and neuroCombat 0.2.12 (and agrees with the latter
to 1e-8, see ``tests/test_harmonize_combat.py``). Choices where implementations differ:

* **Design**: batch one-hot (all levels, sorted) + categorical covariates one-hot with the
  first (sorted) level dropped + continuous covariates as float64 (neuroCombat casts them
  to float32; identical for values exactly representable in float32).
* **Grand mean**: batch coefficients weighted by batch size (``n_b / n``); with a reference
  batch, the reference batch's coefficient (the batch column of the reference is all ones,
  as in ``sva``). With missing values the weights are the per-feature observed counts.
* **Variance pooling**: ``sigma_v^2`` = mean of squared residuals over (observed) scans,
  divisor ``n`` (not ``n - p``), as ``sva``/neuroCombat; with a reference batch, over the
  reference batch's scans only.
* **EB convergence**: the parametric fixed point stops, per batch, when
  ``max(|g_new - g_old| / g_old, |d_new - d_old| / d_old) <= conv`` over features
  (``conv = 1e-4``; the signed denominator is the ``sva`` rule, kept for agreement).
* **Mean-only**: ``gamma* = postmean(gamma_hat, gamma_bar, n=1, d=1, tau^2)`` as ``sva``
  (neuroHarmonize follows the same rule); ``delta* = 1``.
* **Non-parametric EB**: the leave-one-feature-out Monte-Carlo integration of ``sva``,
  computed in log space (no underflow for large batches, where neuroCombat returns NaN)
  and chunked: ``O(n_batches * n_features^2)`` flops but bounded memory.
* **Reference batch**: its data are returned unchanged (``gamma* = 0, delta* = 1``).

Fixes over the anchors: NaNs are ignored per feature (weighted normal equations, one
``k x k`` system per feature that has missing values, solved batched with ``np.einsum``;
features without NaN share one solve) and stay NaN only where they were; a batch with one
scan falls back to mean-only for that batch (warning); constant features pass through
unchanged; covariates confounded with batch raise :class:`HarmonizeError` naming them;
:meth:`ComBat.transform` uses the new scans' own covariates; :meth:`ComBat.add_batch`
adds a site without refitting the others; :meth:`ComBat.save` / :meth:`ComBat.load`.

Memory: features are processed in chunks (``chunk_features``), so the peak is the input,
the output and a few ``n_samples x chunk`` float64 temporaries; ``copy=False`` writes the
result into a float64 input in place. Dask arrays (features may be chunked, samples must
fit one chunk) are processed in two passes: per-chunk sufficient statistics, then a lazy
per-chunk adjustment (the result is a Dask array).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mrharmony.errors import HarmonizeError
from mrharmony.harmonize.combat_design import (
    CovariateEncoder,
    aligned,
    as_matrix,
    bspline_basis,
    check_confounding,
    is_dask,
    isnull,
    json_scalar,
    sort_levels,
)
from mrharmony.harmonize.combat_math import (
    Design,
    HarmonizeWarning,
    adjust_linear,
    chunk_stats,
    eb_mean_only,
    eb_nonparametric,
    eb_parametric,
    linear_coefs,
)

__all__ = ["ComBat", "CovariateEncoder", "HarmonizeWarning", "bspline_basis"]


# --------------------------------------------------------------------------- estimator


class ComBat:
    """ComBat harmonization of a samples x features table (scikit-learn style).

    Parameters
    ----------
    parametric : bool
        Parametric (default) or non-parametric empirical Bayes priors.
    eb : bool
        Shrink the batch estimates with empirical Bayes (default); ``False`` uses the
        per-batch least-squares estimates.
    mean_only : bool
        Adjust only the batch means (``delta* = 1``).
    ref_batch : hashable, optional
        Reference batch: returned unchanged, other batches are mapped onto it.
    categorical : sequence of str
        Numeric covariate columns to treat as categorical (object, category, bool and
        string columns are categorical anyway).
    conv : float
        Relative-change tolerance of the parametric EB iteration (``sva``: 1e-4).
    max_iter : int
        Iteration cap of the parametric EB (a warning is issued when reached).
    chunk_features : int, optional
        Features per chunk for NumPy input (bounds the temporaries); default
        ``2**19 // n_samples`` (4 MiB per float64 temporary).
    copy : bool
        ``False`` writes the result into a float64 NumPy input in place.

    Attributes
    ----------
    batches_ : list
        Sorted batch levels (after fit). ``n_features_in_``, ``feature_names_in_`` (pandas input),
        ``grand_mean_`` (p,), ``beta_`` (k_cov, p), ``var_pooled_`` (p,), ``gamma_star_``
        and ``delta_star_`` (n_batches, p), ``gamma_hat_``/``delta_hat_`` (n_batches, p),
        ``degenerate_`` (p,) bool: features passed through unchanged.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 5)) + np.repeat([0.0, 2.0], 20)[:, None]
    >>> site = np.repeat(["a", "b"], 20)
    >>> Xh = ComBat().fit_transform(X, site)
    >>> bool(abs(Xh[:20].mean() - Xh[20:].mean()) < 0.5)
    True
    """

    model_kind = "ComBat"

    def __init__(self, *, parametric: bool = True, eb: bool = True, mean_only: bool = False,
                 ref_batch: Any = None, categorical: Sequence[str] = (), conv: float = 1e-4,
                 max_iter: int = 1000, chunk_features: int | None = None,
                 copy: bool = True) -> None:
        self.parametric = bool(parametric)
        self.eb = bool(eb)
        self.mean_only = bool(mean_only)
        self.ref_batch = ref_batch
        self.categorical = list(categorical)
        self.conv = float(conv)
        self.max_iter = int(max_iter)
        self.chunk_features = None if chunk_features is None else int(chunk_features)
        self.copy = bool(copy)
        if self.chunk_features is not None and self.chunk_features < 1:
            raise HarmonizeError(f"chunk_features: {chunk_features} < 1")
        if not self.conv > 0:
            raise HarmonizeError(f"conv: {conv} must be > 0")

    # ---- helpers shared with the variants
    def _make_encoder(self) -> CovariateEncoder:
        return CovariateEncoder(categorical=self.categorical)

    def _batch_codes(self, batch: Any, n: int, *, fit: bool) -> np.ndarray:
        values = np.asarray(batch.to_numpy() if isinstance(batch, pd.Series | pd.Index)
                            else batch, dtype=object).ravel()
        if values.shape[0] != n:
            raise HarmonizeError(f"batch: {values.shape[0]} labels for {n} samples")
        if isnull(values).any():
            raise HarmonizeError(f"batch: {int(isnull(values).sum())} missing labels")
        if fit:
            self.batches_ = [json_scalar(v) for v in sort_levels(values)]
        codes = np.asarray(pd.Categorical(values, categories=self.batches_).codes, np.intp)
        if (codes < 0).any():
            unknown = sorted({str(v) for v, c in zip(values, codes, strict=True) if c < 0})
            raise HarmonizeError(f"batch: unknown batch level(s) {unknown} (fitted: "
                                 f"{self.batches_}); use add_batch() to add a new site")
        return codes

    def _ref_index(self) -> int | None:
        if self.ref_batch is None:
            return None
        ref = json_scalar(self.ref_batch)
        if ref not in self.batches_:
            raise HarmonizeError(f"ref_batch: {self.ref_batch!r} is not a batch level "
                                 f"({self.batches_})")
        return self.batches_.index(ref)

    def _check_fitted(self) -> None:
        if not hasattr(self, "gamma_star_"):
            raise HarmonizeError(f"{type(self).__name__}: not fitted (call fit first)")

    def _check_features(self, X: Any, columns: pd.Index | None) -> None:
        if X.shape[1] != self.n_features_in_:
            raise HarmonizeError(f"X: {X.shape[1]} features, the model was fitted on "
                                 f"{self.n_features_in_}")
        if columns is not None and self.feature_names_in_ is not None:
            names = [str(c) for c in columns]
            if names != self.feature_names_in_:
                missing = [c for c in self.feature_names_in_ if c not in names][:5]
                raise HarmonizeError(f"X: feature columns differ from the fitted ones "
                                     f"(missing or reordered, e.g. {missing})")

    def _chunks(self, p: int, n: int) -> list[slice]:
        # default: ~2**19 elements (4 MiB float64, cache-sized) per n x chunk temporary
        step = self.chunk_features or int(np.clip(2**19 // max(n, 1), 16, 16384))
        return [slice(s, min(p, s + step)) for s in range(0, p, step)]

    # ---- fitting
    def _stats(self, X: Any, D: np.ndarray, Z: np.ndarray, ref: int | None
               ) -> dict[str, np.ndarray]:
        ds = Design(D, Z, ref)
        fn = self._chunk_function()
        if is_dask(X):
            import dask

            X = X.rechunk({0: -1})
            blocks = X.to_delayed().ravel().tolist()
            dsd = dask.delayed(ds)
            parts = dask.compute(*[dask.delayed(fn)(b, dsd) for b in blocks])
        else:
            chunks = self._chunks(X.shape[1], X.shape[0])
            work = np.empty(X.shape[0] * (chunks[0].stop - chunks[0].start))
            parts = [fn(X[:, sl], ds, work) for sl in chunks]
        return {k: np.concatenate([pt[k] for pt in parts], axis=-1) for k in parts[0]}

    def _chunk_function(self) -> Any:
        """Pass-1 function ``(Y, design) -> moments`` (variants override)."""
        return chunk_stats

    def _estimate(self, st: dict[str, np.ndarray], single: Sequence[int], *,
                  ref_row: int | None, offset: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Batch effects (gamma_hat, delta_hat, gamma*, delta*) from pass-1 moments.

        ``offset`` (the reference batch's standardised mean) is subtracted from the batch
        means, as the ``sva`` batch design with an all-ones reference column does.
        """
        n, xbar, ss = st["n_obs"], st["xbar"], st["ss"]
        ok = ~st["degenerate"]
        g_hat = np.where(n > 0, xbar, np.nan)
        if offset is not None:
            g_hat = g_hat - offset[None, :]
        with np.errstate(invalid="ignore", divide="ignore"):
            d_hat = np.where(n > 1, ss / (n - 1), np.nan)
        d_hat = np.where(d_hat == 0, 1.0, d_hat)
        if self.mean_only:
            d_hat = np.where(np.isfinite(d_hat), 1.0, np.nan)
        g_hat = np.where(ok, g_hat, np.nan)
        d_hat = np.where(ok, d_hat, np.nan)
        rows = [r for r in range(g_hat.shape[0]) if r != ref_row]
        B, p = g_hat.shape
        g_star, d_star = np.zeros((B, p)), np.ones((B, p))
        full_rows = [r for r in rows if r not in single]
        mo_rows = [r for r in rows if r in single]
        eb = self.eb and int(ok.sum()) >= 2
        if self.eb and not eb:
            warnings.warn("ComBat: fewer than 2 usable features, empirical Bayes disabled",
                          HarmonizeWarning, stacklevel=3)
        if not eb:
            g_star[rows] = np.nan_to_num(g_hat[rows])
            d_star[rows] = np.where(np.isfinite(d_hat[rows]), d_hat[rows], 1.0)
            d_star[mo_rows] = 1.0
        elif self.mean_only:
            if self.parametric:
                g_star = eb_mean_only(g_hat, rows)
            else:
                ones = np.where(np.isfinite(g_hat), 1.0, np.nan)
                g_star, _ = eb_nonparametric(g_hat, ones, n, xbar, ss, rows)
        else:
            if self.parametric:
                g_star, d_star = eb_parametric(g_hat, d_hat, n, xbar, ss, full_rows,
                                                conv=self.conv, max_iter=self.max_iter)
            else:
                g_star, d_star = eb_nonparametric(g_hat, d_hat, n, xbar, ss, full_rows)
            if mo_rows:
                g_star[mo_rows] = eb_mean_only(g_hat, mo_rows)[mo_rows]
                d_star[mo_rows] = 1.0
        g_star[:, ~ok] = 0.0
        d_star[:, ~ok] = 1.0
        return g_hat, d_hat, g_star, d_star

    @aligned
    def fit(self, X: Any, batch: Any, covariates: Any = None) -> ComBat:
        """Estimate the location/scale model and the batch effects.

        Parameters
        ----------
        X : ndarray, DataFrame or dask array, shape (n_samples, n_features)
            Feature values (any unit; NaN marks a missing value).
        batch : array-like, shape (n_samples,)
            Batch (site/scanner) label of each sample.
        covariates : DataFrame, optional
            Biological covariates to preserve (categorical and continuous columns); no
            missing values. pandas inputs are matched to a DataFrame ``X`` by index
            (reordered if needed, refused if the labels differ), arrays by position.

        Returns
        -------
        ComBat
            ``self``.

        Raises
        ------
        HarmonizeError
            Bad shapes, fewer than two batches, covariates confounded with batch (exactly,
            or nearly: scaled design condition number above
            :data:`~mrharmony.harmonize.combat_design.CONDITION_REFUSE`; a
            :class:`HarmonizeWarning` above ``CONDITION_WARN``), too few samples for the
            design, a pandas input whose index does not match ``X``.
        """
        Xm, _, columns = as_matrix(X)
        n, p = Xm.shape
        codes = self._batch_codes(batch, n, fit=True)
        n_batch = len(self.batches_)
        if n_batch < 2:
            raise HarmonizeError(f"batch: need at least 2 batches, got {self.batches_}")
        self._ref = self._ref_index()
        self.encoder_ = self._make_encoder()
        cov = self.encoder_.fit(covariates, n)
        Z = (codes[:, None] == np.arange(n_batch)[None, :]).astype(np.float64)
        check_confounding(Z, cov, self.encoder_)
        if n <= Z.shape[1] + cov.shape[1]:
            raise HarmonizeError(f"X: {n} samples for {Z.shape[1] + cov.shape[1]} design "
                                 "columns (batches + covariate columns)")
        counts = Z.sum(axis=0).astype(int)
        single = [i for i in range(n_batch) if counts[i] < 2]
        if single and not self.mean_only:
            warnings.warn(f"ComBat: batch(es) {[self.batches_[i] for i in single]} have one "
                          "sample; their scale cannot be estimated, using mean-only "
                          "adjustment for them", HarmonizeWarning, stacklevel=2)
        Zd = Z.copy()
        if self._ref is not None:
            Zd[:, self._ref] = 1.0
        D = np.hstack([Zd, cov])
        st = self._stats(Xm, D, Z, self._ref)
        self._ref_xbar = (np.nan_to_num(st["xbar"][self._ref]) if self._ref is not None
                          else None)
        g_hat, d_hat, g_star, d_star = self._estimate(st, single, ref_row=self._ref,
                                                      offset=self._ref_xbar)
        self.n_features_in_ = p
        self.feature_names_in_ = [str(c) for c in columns] if columns is not None else None
        self.grand_mean_ = st["grand_mean"]
        self.beta_ = st["B_hat"][n_batch:]
        self.var_pooled_ = st["var_pooled"]
        self.degenerate_ = st["degenerate"]
        self.gamma_hat_, self.delta_hat_ = g_hat, d_hat
        self.gamma_star_, self.delta_star_ = g_star, d_star
        self.batch_counts_ = counts
        self._store_extra(st, n_batch)
        n_deg = int(self.degenerate_.sum())
        if n_deg:
            self._warn_degenerate(n_deg)
        return self

    def _store_extra(self, st: dict[str, np.ndarray], n_batch: int) -> None:
        """Hook for variants that keep more of the pass-1 statistics."""

    def _warn_degenerate(self, n_deg: int) -> None:
        first = int(np.flatnonzero(self.degenerate_)[0])
        name = self.feature_names_in_[first] if self.feature_names_in_ else first
        warnings.warn(f"ComBat: {n_deg} feature(s) are constant or have no residual variance "
                      f"(first: {name!r}); they are passed through unchanged",
                      HarmonizeWarning, stacklevel=3)

    def _params(self) -> dict[str, np.ndarray]:
        return {"grand_mean": self.grand_mean_, "beta": self.beta_,
                "var_pooled": self.var_pooled_, "gamma_star": self.gamma_star_,
                "delta_star": self.delta_star_, "degenerate": self.degenerate_}

    @aligned
    def transform(self, X: Any, batch: Any, covariates: Any = None) -> Any:
        """Harmonize samples of fitted batches using their own covariates.

        Parameters
        ----------
        X : ndarray, DataFrame or dask array, shape (n_samples, n_features)
            Feature values; NaNs stay NaN.
        batch : array-like, shape (n_samples,)
            Batch labels (must be fitted batches, see :meth:`add_batch`).
        covariates : DataFrame, optional
            The samples' covariates (same columns as at fit).

        Returns
        -------
        Same type as ``X``
            Harmonized features (float64); pandas index/columns kept.
        """
        self._check_fitted()
        Xm, index, columns = as_matrix(X)
        self._check_features(Xm, columns)
        n = Xm.shape[0]
        codes = self._batch_codes(batch, n, fit=False)
        cov = self.encoder_.transform(covariates, n)
        return self._apply(Xm, index, columns, codes, cov)

    def _apply(self, Xm: Any, index: Any, columns: Any, codes: np.ndarray,
               cov: np.ndarray | None) -> Any:
        """Pass 2 over feature chunks; ``cov=None`` means covariates at zero effect."""
        n = Xm.shape[0]
        A, C, Bx = linear_coefs(self._params(), self._ref_index())
        Z = (codes[:, None] == np.arange(len(self.batches_))[None, :]).astype(np.float64)
        if cov is None:
            WX, Bx = np.zeros((n, 0)), Bx[:0]
        else:
            WX = (Z[:, :, None] * cov[:, None, :]).reshape(n, -1)
        if is_dask(Xm):
            return self._transform_dask(Xm, Z, WX, (A, C, Bx))
        if not self.copy and Xm.dtype == np.float64 and Xm.flags.writeable and index is None:
            out = Xm
        else:
            out = np.empty(Xm.shape, dtype=np.float64)
        chunks = self._chunks(Xm.shape[1], n)
        work = np.empty(n * (chunks[0].stop - chunks[0].start))
        for sl in chunks:
            adjust_linear(Xm[:, sl], Z, WX, A[:, sl], C[:, sl], Bx[:, sl], out=out[:, sl],
                          work=work)
        if index is not None:
            return pd.DataFrame(out, index=index, columns=columns)
        return out

    @staticmethod
    def _transform_dask(Xm: Any, Z: np.ndarray, WX: np.ndarray,
                        coefs: tuple[np.ndarray, ...]) -> Any:
        Xm = Xm.rechunk({0: -1})
        bounds = np.cumsum((0, *Xm.chunks[1]))

        def block(y: np.ndarray, block_info: dict | None = None) -> np.ndarray:
            j = block_info[0]["chunk-location"][1]
            sl = slice(bounds[j], bounds[j + 1])
            return adjust_linear(y, Z, WX, *(c[:, sl] for c in coefs))

        return Xm.map_blocks(block, dtype=np.float64)

    @aligned
    def fit_transform(self, X: Any, batch: Any, covariates: Any = None) -> Any:
        """:meth:`fit` then :meth:`transform` on the same samples."""
        return self.fit(X, batch, covariates).transform(X, batch, covariates)

    def add_batch(self, X: Any, batch: Any, covariates: Any = None) -> ComBat:
        """Add new batch level(s) without refitting the fitted ones.

        The new batches' effects are estimated against the fitted standardisation (grand
        mean, covariate effects and pooled variance), with their own empirical Bayes
        priors (in ComBat, each batch's priors come from its own features only, so this is
        the estimate a joint fit with a reference batch would give).

        Parameters
        ----------
        X : array-like, shape (n_samples, n_features)
            Samples of the new batch(es) only.
        batch : array-like, shape (n_samples,)
            Their labels, none of which may be fitted already.
        covariates : DataFrame, optional
            Their covariates.

        Returns
        -------
        ComBat
            ``self``, with ``batches_`` extended.
        """
        self._check_fitted()
        Xm, _, columns = as_matrix(X)
        self._check_features(Xm, columns)
        n = Xm.shape[0]
        values = np.asarray(batch, dtype=object).ravel()
        new_levels = [json_scalar(v) for v in sort_levels(values)]
        clash = [lev for lev in new_levels if lev in self.batches_]
        if clash:
            raise HarmonizeError(f"batch: {clash} already fitted; add_batch takes new "
                                 "sites only")
        cov = self.encoder_.transform(covariates, n)
        codes = np.asarray(pd.Categorical(values, categories=new_levels).codes, np.intp)
        Z = (codes[:, None] == np.arange(len(new_levels))[None, :]).astype(np.float64)
        counts = Z.sum(axis=0).astype(int)
        single = [i for i in range(len(new_levels)) if counts[i] < 2]
        if single and not self.mean_only:
            warnings.warn(f"ComBat: new batch(es) {[new_levels[i] for i in single]} have one "
                          "sample; using mean-only adjustment for them",
                          HarmonizeWarning, stacklevel=2)
        Y = np.asarray(Xm, dtype=np.float64)
        M = np.isfinite(Y)
        S = np.where(M, (np.where(M, Y, 0.0) - self.grand_mean_ - cov @ self.beta_)
                     / np.sqrt(self.var_pooled_), 0.0)
        n_obs = Z.T @ M.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            xbar = (Z.T @ S) / n_obs
        dev = np.where(M, S - np.nan_to_num(xbar)[codes], 0.0)
        st = {"n_obs": n_obs, "xbar": xbar, "ss": Z.T @ dev**2, "degenerate": self.degenerate_}
        g_hat, d_hat, g_star, d_star = self._estimate(st, single, ref_row=None,
                                                      offset=self._ref_xbar)
        self.batches_ = self.batches_ + new_levels
        self.gamma_hat_ = np.vstack([self.gamma_hat_, g_hat])
        self.delta_hat_ = np.vstack([self.delta_hat_, d_hat])
        self.gamma_star_ = np.vstack([self.gamma_star_, g_star])
        self.delta_star_ = np.vstack([self.delta_star_, d_star])
        self.batch_counts_ = np.concatenate([self.batch_counts_, counts])
        return self

    # ---- persistence
    def _get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self._check_fitted()
        meta = {"options": self._options(),
                "batches": self.batches_, "covariate_terms": self.encoder_.terms,
                "feature_names": self.feature_names_in_, "n_features": self.n_features_in_}
        arrays = {"grand_mean": self.grand_mean_, "beta": self.beta_,
                  "var_pooled": self.var_pooled_, "gamma_star": self.gamma_star_,
                  "delta_star": self.delta_star_, "gamma_hat": self.gamma_hat_,
                  "delta_hat": self.delta_hat_, "degenerate": self.degenerate_,
                  "batch_counts": self.batch_counts_,
                  "ref_xbar": (self._ref_xbar if self._ref_xbar is not None
                               else np.zeros(0))}
        return meta, arrays

    def _options(self) -> dict[str, Any]:
        """Constructor options (JSON-serialisable), as stored in model files."""
        return {"parametric": self.parametric, "eb": self.eb, "mean_only": self.mean_only,
                "ref_batch": json_scalar(self.ref_batch), "categorical": self.categorical,
                "conv": self.conv, "max_iter": self.max_iter}

    def _set_state(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        self.batches_ = list(meta["batches"])
        self.encoder_ = CovariateEncoder.from_terms(meta["covariate_terms"])
        self.feature_names_in_ = meta["feature_names"]
        self.n_features_in_ = int(meta["n_features"])
        for key in ("grand_mean", "beta", "var_pooled", "gamma_star", "delta_star",
                    "gamma_hat", "delta_hat", "batch_counts"):
            setattr(self, f"{key}_", arrays[key])
        self.degenerate_ = arrays["degenerate"].astype(bool)
        self._ref = self._ref_index()
        self._ref_xbar = arrays["ref_xbar"] if arrays["ref_xbar"].size else None

    @classmethod
    def _from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> ComBat:
        obj = cls(**meta["options"])
        obj._set_state(meta, arrays)
        return obj

    def save(self, path: str | Path, *, force: bool = False,
             extra: dict[str, Any] | None = None) -> Path:
        """Write the fitted model (see :mod:`mrharmony.harmonize.model_io`); returns the path."""
        from mrharmony.harmonize.model_io import save_model

        return save_model(self, path, force=force, extra=extra)

    @classmethod
    def load(cls, path: str | Path) -> ComBat:
        """Read a model written by :meth:`save` (refuses other kinds and versions)."""
        from mrharmony.harmonize.model_io import load_model

        model = load_model(path)
        if not isinstance(model, cls):
            raise HarmonizeError(f"{path}: holds a {type(model).__name__}, not a {cls.__name__}")
        return model
