"""ComBat inputs and design: array coercion, batch levels, covariate encoding, confounding.

Part of :mod:`mrharmony.harmonize.combat` (split out to keep modules small).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from mrharmony.errors import HarmonizeError

__all__ = [
    "CONDITION_REFUSE",
    "CONDITION_WARN",
    "CovariateEncoder",
    "align_inputs",
    "aligned",
    "as_matrix",
    "bspline_basis",
    "check_confounding",
    "design_condition",
    "is_dask",
    "isnull",
    "json_scalar",
    "sort_levels",
]


# --------------------------------------------------------------------------- inputs


def is_dask(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "dask"


def as_matrix(X: Any, name: str = "X") -> tuple[Any, pd.Index | None, pd.Index | None]:
    """Return (2-D float array or dask array, index, columns) from X."""
    if isinstance(X, pd.DataFrame):
        bad = [c for c in X.columns if not pd.api.types.is_numeric_dtype(X[c])]
        if bad:
            raise HarmonizeError(f"{name}: non-numeric feature columns {bad[:5]}"
                                 f"{' ...' if len(bad) > 5 else ''}")
        return X.to_numpy(dtype=np.float64), X.index, X.columns
    if is_dask(X):
        if X.ndim != 2:
            raise HarmonizeError(f"{name}: expected a 2-D (samples x features) array, "
                                 f"got shape {X.shape}")
        return X, None, None
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise HarmonizeError(f"{name}: expected a 2-D (samples x features) array, "
                             f"got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise HarmonizeError(f"{name}: dtype {arr.dtype} is not numeric")
    return arr, None, None


def sort_levels(values: np.ndarray) -> list[Any]:
    uniq = pd.unique(pd.Series(values, dtype=object))
    try:
        return sorted(uniq.tolist())
    except TypeError:
        return sorted(uniq.tolist(), key=str)


def json_scalar(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def isnull(values: np.ndarray) -> np.ndarray:
    return np.asarray(pd.isna(pd.Series(values, dtype=object)))


# --------------------------------------------------------------------------- design


def bspline_basis(x: np.ndarray, knots: np.ndarray, degree: int = 3) -> np.ndarray:
    """Evaluate a clamped B-spline basis (linear extrapolation is not applied).

    Parameters
    ----------
    x : ndarray, shape (n,)
        Covariate values (any unit); values outside the boundary knots are clipped.
    knots : ndarray
        Boundary and interior knots, sorted (same unit as ``x``).
    degree : int
        Spline degree (3 = cubic).

    Returns
    -------
    ndarray, shape (n, len(knots) + degree - 1)
        The basis; rows sum to one.
    """
    from scipy.interpolate import BSpline

    t = np.concatenate([[knots[0]] * degree, knots, [knots[-1]] * degree]).astype(np.float64)
    xc = np.clip(np.asarray(x, dtype=np.float64), knots[0], knots[-1])
    return BSpline.design_matrix(xc, t, degree, extrapolate=True).toarray()


class CovariateEncoder:
    """Turn a covariate table into design columns, remembering the encoding.

    Categorical columns (object, category, bool or string dtype, or named in
    ``categorical``) are one-hot encoded with the first sorted level dropped; numeric
    columns are used as they are (float64); columns named in ``smooth`` get a cubic
    B-spline basis with ``smooth_df`` columns (knots at quantiles; the first basis column is
    dropped because the basis sums to one, like the batch indicators).
    """

    def __init__(self, *, categorical: Sequence[str] = (), smooth: Sequence[str] = (),
                 smooth_df: int = 5) -> None:
        self.categorical = list(categorical)
        self.smooth = list(smooth)
        self.smooth_df = int(smooth_df)
        self.terms: list[dict[str, Any]] = []

    @classmethod
    def from_terms(cls, terms: list[dict[str, Any]]) -> CovariateEncoder:
        """Rebuild a fitted encoder from its JSON-serialisable ``terms``."""
        enc = cls()
        enc.terms = [dict(t) for t in terms]
        return enc

    @property
    def names(self) -> list[str]:
        """Covariate (column) names, in design order."""
        return [t["name"] for t in self.terms]

    @property
    def column_labels(self) -> list[str]:
        """One label per design column (``name[level]``, ``name``, ``name[s3]``)."""
        out: list[str] = []
        for t in self.terms:
            if t["kind"] == "categorical":
                out += [f"{t['name']}[{lev}]" for lev in t["levels"][1:]]
            elif t["kind"] == "continuous":
                out.append(t["name"])
            else:
                out += [f"{t['name']}[s{i}]" for i in range(1, t["n_columns"] + 1)]
        return out

    @staticmethod
    def _frame(covariates: Any, n: int) -> pd.DataFrame:
        if covariates is None:
            return pd.DataFrame(index=range(n))
        if isinstance(covariates, pd.Series):
            covariates = covariates.to_frame()
        if not isinstance(covariates, pd.DataFrame):
            arr = np.asarray(covariates)
            arr = arr.reshape(n, -1) if arr.ndim == 1 else arr
            covariates = pd.DataFrame(arr, columns=[f"cov{i}" for i in range(arr.shape[1])])
        if len(covariates) != n:
            raise HarmonizeError(f"covariates: {len(covariates)} rows for {n} samples")
        for c in covariates.columns:
            miss = int(isnull(covariates[c].to_numpy()).sum())
            if miss:
                raise HarmonizeError(f"covariates: column {c!r} has {miss} missing values")
        return covariates.reset_index(drop=True)

    def fit(self, covariates: Any, n: int) -> np.ndarray:
        """Learn the encoding from ``covariates`` (n rows) and return the design columns."""
        df = self._frame(covariates, n)
        self.terms = []
        for c in df.columns:
            col = df[c]
            name = str(c)
            if name in self.smooth:
                if not pd.api.types.is_numeric_dtype(col):
                    raise HarmonizeError(f"covariates: smooth term {name!r} is not numeric")
                n_inner = max(self.smooth_df - 3, 0)
                qs = np.linspace(0, 1, n_inner + 2)
                knots = np.unique(np.quantile(col.to_numpy(np.float64), qs))
                if knots.size < 2:
                    raise HarmonizeError(f"covariates: smooth term {name!r} is constant")
                self.terms.append({"name": name, "kind": "spline", "knots": knots.tolist(),
                                   "degree": 3, "n_columns": knots.size + 3 - 2})
            elif (name in self.categorical or not pd.api.types.is_numeric_dtype(col)
                  or pd.api.types.is_bool_dtype(col)):
                levels = [json_scalar(v) for v in sort_levels(col.to_numpy())]
                self.terms.append({"name": name, "kind": "categorical", "levels": levels})
            else:
                self.terms.append({"name": name, "kind": "continuous"})
        return self.transform(df, n)

    def transform(self, covariates: Any, n: int) -> np.ndarray:
        """Design columns for new rows, with the fitted encoding."""
        df = self._frame(covariates, n)
        missing = [t["name"] for t in self.terms if t["name"] not in map(str, df.columns)]
        if missing:
            raise HarmonizeError(f"covariates: missing column(s) {missing} "
                                 f"(the model was fitted with {self.names})")
        df.columns = [str(c) for c in df.columns]
        cols: list[np.ndarray] = []
        for t in self.terms:
            values = df[t["name"]].to_numpy()
            if t["kind"] == "categorical":
                levels = t["levels"]
                codes = np.asarray(pd.Categorical(values, categories=levels).codes)
                if (codes < 0).any():
                    unknown = sorted({str(v) for v, c in zip(values, codes, strict=True)
                                      if c < 0})
                    raise HarmonizeError(f"covariates: column {t['name']!r} has level(s) "
                                         f"{unknown} not seen at fit (known: {levels})")
                onehot = codes[:, None] == np.arange(1, len(levels))[None, :]
                cols.append(onehot.astype(np.float64))
            elif t["kind"] == "continuous":
                try:
                    cols.append(values.astype(np.float64)[:, None])
                except (TypeError, ValueError) as exc:
                    raise HarmonizeError(f"covariates: column {t['name']!r} is not "
                                         f"numeric") from exc
            else:
                basis = bspline_basis(values.astype(np.float64), np.asarray(t["knots"]),
                                      t["degree"])
                cols.append(basis[:, 1:])
        if not cols:
            return np.zeros((n, 0))
        return np.hstack(cols)

    def term_slices(self) -> list[tuple[str, slice]]:
        """(name, column slice) of each term in the design block."""
        out, start = [], 0
        for t in self.terms:
            width = {"categorical": lambda t: len(t["levels"]) - 1,
                     "continuous": lambda t: 1,
                     "spline": lambda t: t["n_columns"]}[t["kind"]](t)
            out.append((t["name"], slice(start, start + width)))
            start += width
        return out


#: Scaled condition number of the design (batch indicators + centred covariates, columns
#: at unit norm) above which near-confounding is warned about: Belsley's "strong
#: collinearity" index 30, reached when a covariate is ~99.9 % explained by site.
CONDITION_WARN = 30.0
#: ... and above which the fit is refused: the covariate is then explained by site to
#: ~1 - 1e-6 and its coefficient (hence the harmonized values) is noise amplified ~1000x.
CONDITION_REFUSE = 1.0e3


def design_condition(batch_onehot: np.ndarray, cov: np.ndarray) -> float:
    """Scaled condition number of the ComBat design ``[batch indicators, covariates]``.

    Covariate columns are centred (their collinearity with the overall mean is harmless:
    the batch indicators span it) and every column is scaled to unit norm (Belsley,
    Kuh & Welsch 1980), so the number measures only how well batch and covariates can be
    told apart, in any units.

    Returns
    -------
    float
        ``s_max / s_min`` of the scaled design (``inf`` if rank-deficient).
    """
    if cov.shape[1] == 0:
        return 1.0
    c = cov - cov.mean(axis=0, keepdims=True)
    full = np.hstack([batch_onehot, c])
    norms = np.linalg.norm(full, axis=0)
    if np.any(norms == 0):
        return float("inf")
    s = np.linalg.svd(full / norms, compute_uv=False)
    return float(s[0] / s[-1]) if s[-1] > 0 else float("inf")


def align_inputs(X: Any, batch: Any, covariates: Any = None, **others: Any
                 ) -> tuple[Any, Any, dict[str, Any]]:
    """Match ``batch``, ``covariates`` (and other per-sample inputs) to ``X``'s rows.

    pandas inputs are matched by index when ``X`` is a DataFrame: an index in another
    order is reordered to ``X``'s; an index with other labels is refused. Arrays, pandas
    inputs with the default index ``0..n-1``, and any input when ``X`` is an array are
    matched by position.

    Raises
    ------
    HarmonizeError
        If a pandas input's index holds labels ``X``'s index does not (or vice versa).
    """
    if not isinstance(X, pd.DataFrame):
        return batch, covariates, others

    def align(obj: Any, name: str) -> Any:
        if not isinstance(obj, pd.Series | pd.DataFrame) or obj.index.equals(X.index):
            return obj
        if obj.index.equals(pd.RangeIndex(len(obj))) and len(obj) == len(X):
            return obj  # a default 0..n-1 index carries no labels: matched by position
        if (len(obj) == len(X) and obj.index.is_unique and X.index.is_unique
                and set(obj.index) == set(X.index)):
            return obj.reindex(X.index)
        extra = [v for v in obj.index if v not in set(X.index)][:5]
        raise HarmonizeError(
            f"{name}: its index does not match the rows of X (labels not in X: {extra}; "
            f"{len(obj)} rows vs {len(X)}); pass arrays to match by position or reindex")

    return (align(batch, "batch"), align(covariates, "covariates"),
            {k: align(v, k) for k, v in others.items()})


def aligned(method: Any) -> Any:
    """Decorate ``fit``/``transform``/``fit_transform(X, batch, covariates, ...)`` so that
    pandas ``batch``, ``covariates`` and ``subject`` are matched to ``X`` by index
    (:func:`align_inputs`)."""

    @functools.wraps(method)
    def wrapper(self: Any, X: Any, batch: Any, covariates: Any = None, *args: Any,
                **kwargs: Any) -> Any:
        extra = {k: kwargs[k] for k in ("subject",) if k in kwargs}
        batch, covariates, extra = align_inputs(X, batch, covariates, **extra)
        kwargs.update(extra)
        return method(self, X, batch, covariates, *args, **kwargs)

    return wrapper


def check_confounding(batch_onehot: np.ndarray, cov: np.ndarray,
                      encoder: CovariateEncoder) -> None:
    """Raise :class:`HarmonizeError` naming covariates that are confounded with batch."""
    if cov.shape[1] == 0:
        return
    base = np.linalg.matrix_rank(batch_onehot)
    confounded = []
    for name, sl in encoder.term_slices():
        block = cov[:, sl]
        if block.shape[1] and (np.linalg.matrix_rank(np.hstack([batch_onehot, block]))
                               < base + block.shape[1]):
            confounded.append(name)
    if confounded:
        raise HarmonizeError(
            f"covariates confounded with batch: {confounded} are linear combinations of "
            "the batch indicators (constant within each batch), so their effect cannot be "
            "separated from the site effect; drop them or pool sites")
    full = np.hstack([batch_onehot, cov])
    if np.linalg.matrix_rank(full) < full.shape[1]:
        raise HarmonizeError(
            f"covariates confounded with batch: {encoder.names} are jointly collinear with "
            "the batch indicators (the design matrix is rank-deficient)")
    cond = design_condition(batch_onehot, cov)
    if cond > CONDITION_REFUSE:
        raise HarmonizeError(
            f"covariates nearly confounded with batch: the scaled design condition number is "
            f"{cond:.3g} (refused above {CONDITION_REFUSE:g}): {encoder.names} are almost "
            "fully explained by site, so their effect cannot be separated from the site "
            "effect; drop them or pool sites")
    if cond > CONDITION_WARN:
        from mrharmony.harmonize.combat_math import HarmonizeWarning

        warnings.warn(
            f"covariates {encoder.names} are strongly collinear with batch: scaled design "
            f"condition number {cond:.3g} (warned above {CONDITION_WARN:g}, refused above "
            f"{CONDITION_REFUSE:g}); covariate effects and harmonized values are unstable",
            HarmonizeWarning, stacklevel=3)
