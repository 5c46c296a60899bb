"""Biological associations before and after harmonization: OLS effects, permutation tests.

Model: ``feature ~ 1 + variable + others`` (categorical covariates dummy-coded), one
least-squares solve for all features; :func:`spurious_association_test` permutes the
variable (Westfall--Young max-T for the family-wise p-value).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mrharmony.errors import HarmonizeError

from ._inputs import _frame

__all__ = ["association_effects", "preservation_of_associations",
           "spurious_association_test"]


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
