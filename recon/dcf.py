"""Density compensation for non-Cartesian k-space (Pipe–Menon iterative, radial ramp).

Weights are returned in **(cycles/FOV)^ndim per sample**, i.e. ``w_j ~ 1 / rho(k_j)``
with ``rho`` the number of samples per unit k-area. With the orthonormal NUFFT of
:mod:`mrharmony.recon.nufft`, ``nufft_adjoint(w * nufft_forward(x))`` is then ``x``
itself (band-limited to the sampled k-region) with no further scaling: a fully sampled
Cartesian grid has ``w = 1``.

The Pipe–Menon scale comes from the kernel integral; it is exact to about 1 % for
radial and spiral sampling. On a regular lattice aligned with the k-space grid (full
Cartesian) the lattice sum of the kernel differs from its integral and the weights come
out about 8 % low (0.92 instead of 1) — use no weights there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from scipy.special import i0

from mrharmony.backend import get_array_module, to_numpy
from mrharmony.errors import ReconError

__all__ = ["density_compensation", "pipe_menon_dcf", "radial_dcf"]

#: Grid oversampling and Kaiser–Bessel width (oversampled grid points) of the gridding
#: kernel used by the Pipe–Menon iteration (Beatty 2005 beta for these values).
_OVERSAMPLING = 2.0
_WIDTH = 4


def _kb_beta(width: float, oversampling: float) -> float:
    """Kaiser–Bessel shape parameter of Beatty et al. (2005) for these grid settings."""
    return math.pi * math.sqrt((width / oversampling) ** 2 * (oversampling - 0.5) ** 2 - 0.8)


def _kb(u: np.ndarray, width: float, beta: float) -> np.ndarray:
    """Kaiser–Bessel kernel (peak 1 at u = 0, zero for |u| >= width / 2)."""
    arg = 1.0 - (2.0 * u / width) ** 2
    return np.where(arg > 0, i0(beta * np.sqrt(np.clip(arg, 0.0, None))), 0.0) / i0(beta)


def _gridding_matrix(
    coords: np.ndarray, shape: tuple[int, ...], oversampling: float, width: int
) -> tuple[sp.csr_matrix, float]:
    """Sparse (M, G) Kaiser–Bessel gridding matrix and the kernel's 1-D integral."""
    m, ndim = coords.shape
    beta = _kb_beta(width, oversampling)
    grid = [math.ceil(oversampling * n) + width + 2 for n in shape]
    offsets = np.arange(width) - (width // 2 - 1)  # neighbouring grid points
    idx_total = np.zeros((m, 1), dtype=np.int64)
    w_total = np.ones((m, 1))
    for d in range(ndim):
        g = (coords[:, d] + shape[d] / 2) * oversampling + width / 2 + 1  # >= width/2 + 1
        base = np.floor(g).astype(np.int64)
        idx = base[:, None] + offsets[None, :]
        wts = _kb(idx - g[:, None], width, beta)
        idx_total = (idx_total[:, :, None] * grid[d] + idx[:, None, :]).reshape(m, -1)
        w_total = (w_total[:, :, None] * wts[:, None, :]).reshape(m, -1)
    rows = np.repeat(np.arange(m), w_total.shape[1])
    mat = sp.csr_matrix(
        (w_total.ravel(), (rows, idx_total.ravel())), shape=(m, math.prod(grid))
    )
    fine = np.linspace(-width / 2, width / 2, 20001)
    integral = float(np.sum(_kb(fine, width, beta)) * (fine[1] - fine[0]))
    return mat, integral


def pipe_menon_dcf(
    coords: Any,
    shape: Sequence[int],
    *,
    max_iter: int = 30,
    oversampling: float = _OVERSAMPLING,
    width: int = _WIDTH,
) -> Any:
    """Iterative density compensation of Pipe and Menon (1999).

    Iterates ``w <- w / (C * w)`` where ``C`` is the sample-to-sample convolution with a
    Kaiser–Bessel kernel (gridding onto a ``oversampling`` x grid and back), then scales
    the converged weights to ``1 / rho`` in (cycles/FOV)^ndim (see the module docstring).

    Parameters
    ----------
    coords : ndarray, shape (M, ndim)
        Sample positions in cycles per FOV (NumPy or CuPy; computed on the CPU).
    shape : sequence of int
        Image shape; sets the k-space extent ``[-N/2, N/2)``.
    max_iter : int
        Iterations (20–40 converge to < 1 % for radial and spiral).
    oversampling : float
        Grid oversampling of the gridding kernel.
    width : int
        Kernel width in oversampled grid points.

    Returns
    -------
    ndarray, shape (M,)
        float64 weights on the same device as ``coords``.

    Raises
    ------
    ReconError
        If ``coords`` does not match ``shape`` or the options are out of range.

    References
    ----------
    J. G. Pipe and P. Menon, "Sampling density compensation in MRI: rationale and an
    iterative numerical solution", Magn. Reson. Med. 41:179–186 (1999).
    """
    xp = get_array_module(coords)
    c = np.asarray(to_numpy(coords), dtype=np.float64)
    shape = tuple(int(n) for n in shape)
    if c.ndim != 2 or c.shape[1] != len(shape) or c.shape[0] == 0:
        raise ReconError(
            f"coords: expected shape (M, {len(shape)}) for image shape {shape}, "
            f"got {c.shape}"
        )
    if max_iter < 1 or oversampling < 1.25 or width < 2:
        raise ReconError(
            f"pipe_menon_dcf: need max_iter >= 1, oversampling >= 1.25, width >= 2 "
            f"(got {max_iter}, {oversampling}, {width})"
        )
    outside = np.abs(c) > np.asarray(shape) / 2 + 1
    if outside.any():
        j = int(np.flatnonzero(outside.any(axis=1))[0])
        raise ReconError(
            f"coords: sample {j} at {c[j].tolist()} lies outside [-N/2, N/2] cycles/FOV "
            f"for shape {shape}"
        )
    mat, integral = _gridding_matrix(c, shape, oversampling, width)
    mat_t = mat.T.tocsr()
    w = np.ones(c.shape[0])
    for _ in range(int(max_iter)):
        denom = mat @ (mat_t @ w)
        w = w / np.maximum(denom, 1e-12 * denom.max())
    # Converged: sum_i w_i C(k_j - k_i) = 1 with integral(C) = (integral K)^(2 ndim) in
    # oversampled grid units, one cycle/FOV being `oversampling` grid units.
    w *= integral ** (2 * len(shape)) / oversampling ** len(shape)
    return xp.asarray(w)


def radial_dcf(coords: Any, n_spokes: int, *, full_spokes: bool = True) -> Any:
    """Analytic ramp density compensation for 2-D radial sampling.

    ``w = pi * |k| * dk / n_diameters`` for equally spaced angles, where ``dk`` is the
    sample spacing along a spoke and ``n_diameters`` the number of full diameters
    (``n_spokes`` for centre-through spokes, ``n_spokes / 2`` for centre-out ones); the
    k = 0 sample gets its share of the central disk, ``pi * dk**2 / (4 * n_spokes)``.

    Parameters
    ----------
    coords : ndarray, shape (n_spokes * n_samples, 2)
        Spoke after spoke, in cycles per FOV.
    n_spokes : int
        Number of spokes.
    full_spokes : bool
        True for diameters through k = 0, False for centre-out radii.

    Returns
    -------
    ndarray, shape (M,)
        float64 weights in (cycles/FOV)^2 on the device of ``coords``.

    Raises
    ------
    ReconError
        If ``coords`` cannot be split into ``n_spokes`` equal spokes.
    """
    xp = get_array_module(coords)
    c = np.asarray(to_numpy(coords), dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 2 or n_spokes < 1 or c.shape[0] % n_spokes:
        raise ReconError(
            f"coords: expected (n_spokes * n_samples, 2) with n_spokes = {n_spokes}, "
            f"got {c.shape}"
        )
    spokes = c.reshape(n_spokes, -1, 2)
    if spokes.shape[1] < 2:
        raise ReconError("coords: radial spokes need at least 2 samples each")
    dk = float(np.median(np.linalg.norm(np.diff(spokes, axis=1), axis=-1)))
    r = np.linalg.norm(c, axis=1)
    n_diam = n_spokes if full_spokes else n_spokes / 2
    w = np.pi * r * dk / n_diam
    w[r < 1e-6 * dk] = np.pi * dk**2 / (4 * n_spokes)
    return xp.asarray(w)


def density_compensation(
    coords: Any,
    shape: Sequence[int],
    *,
    method: str = "pipe",
    n_spokes: int | None = None,
    max_iter: int = 30,
) -> Any:
    """Density-compensation weights in (cycles/FOV)^ndim, one per sample.

    Parameters
    ----------
    coords : ndarray, shape (M, ndim)
        Sample positions in cycles per FOV.
    shape : sequence of int
        Image shape.
    method : {"pipe", "radial"}
        Pipe–Menon iteration (any trajectory) or the analytic radial ramp (2-D spokes
        through the centre, stored spoke after spoke; needs ``n_spokes``).
    n_spokes : int, optional
        Spoke count for ``method="radial"``.
    max_iter : int
        Pipe–Menon iterations.

    Returns
    -------
    ndarray, shape (M,)

    Raises
    ------
    ReconError
        For an unknown method or a missing ``n_spokes``.
    """
    if method == "pipe":
        return pipe_menon_dcf(coords, shape, max_iter=max_iter)
    if method == "radial":
        if n_spokes is None:
            raise ReconError("density_compensation: method='radial' needs n_spokes")
        return radial_dcf(coords, n_spokes)
    raise ReconError(f"method: expected 'pipe' or 'radial', got {method!r}")
