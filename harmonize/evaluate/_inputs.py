"""Input checks shared by the evaluation modules: tables, labels, site groups."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mrharmony.errors import HarmonizeError

#: A callable returning a fresh harmonizer (``fit``/``transform``), e.g. ``ComBat``.
HarmonizerFactory = Callable[[], Any]


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
