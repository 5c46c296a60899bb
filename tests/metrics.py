"""Error measures the tests share (one definition each)."""

from __future__ import annotations

import numpy as np


def nrmse(x: np.ndarray, ref: np.ndarray) -> float:
    """Normalised root-mean-square error ``||x - ref|| / ||ref||`` (no rescaling)."""
    x, ref = np.asarray(x), np.asarray(ref)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def scaled_nrmse(x: np.ndarray, ref: np.ndarray) -> float:
    """:func:`nrmse` after the least-squares complex scale ``s`` that best maps x to ref."""
    x, ref = np.asarray(x), np.asarray(ref)
    s = np.vdot(x, ref) / np.vdot(x, x)
    return nrmse(s * x, ref)
