"""Parallel imaging and compressed sensing: GRAPPA, CG-SENSE, L1-wavelet and TV SENSE.

All operators use the unitary centred FFT of :mod:`mrharmony.recon.cartesian` and run on
NumPy or CuPy arrays (whatever the input is). Shapes: k-space ``(coils, *spatial)``,
maps ``(coils, *spatial)``, sampling mask broadcastable to ``spatial``.

Regularisation weights ``lamda`` are *relative*: the absolute weight is
``lamda * max|A^H y|`` (L1/TV) or ``lamda`` times the largest eigenvalue bound of
``A^H A`` (L2), so the same value works for any data scaling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mrharmony.backend import get_array_module, to_numpy
from mrharmony.errors import ReconError
from mrharmony.recon.cartesian import fft_c, ifft_c

__all__ = [
    "Wavelet",
    "acceleration_from_mask",
    "grappa",
    "sense_cg",
    "sense_l1_wavelet",
    "sense_tv",
]


def _axes(spatial_ndim: int) -> tuple[int, ...]:
    return tuple(range(-spatial_ndim, 0))


def _check(kspace, maps, mask) -> None:
    if kspace.shape != maps.shape:
        raise ReconError(f"SENSE: k-space {kspace.shape} and maps {maps.shape} differ in shape")
    try:
        np.broadcast_shapes(tuple(mask.shape), tuple(kspace.shape[1:]))
    except ValueError as exc:
        raise ReconError(
            f"SENSE: mask {tuple(mask.shape)} does not broadcast to {kspace.shape[1:]}"
        ) from exc


class _Sense:
    """``A = M F S`` with its adjoint and normal operator (unitary FFT)."""

    def __init__(self, maps, mask):
        xp = get_array_module(maps)
        self.xp = xp
        self.maps = maps.astype(np.complex64)
        self.maps_conj = xp.conj(self.maps)
        self.mask = xp.asarray(mask).astype(np.float32)
        self.axes = _axes(maps.ndim - 1)
        self.lipschitz = float(xp.max(xp.sum(xp.abs(self.maps) ** 2, axis=0)))

    def adjoint(self, y):
        return self.xp.sum(self.maps_conj * ifft_c(y * self.mask, axes=self.axes), axis=0)

    def normal(self, x):
        k = fft_c(self.maps * x[None], axes=self.axes) * self.mask
        return self.xp.sum(self.maps_conj * ifft_c(k, axes=self.axes), axis=0)


def _vdot(xp, a, b) -> float:
    return float(xp.real(xp.vdot(a, b)))


def sense_cg(
    kspace,
    maps,
    mask,
    *,
    lamda: float = 0.0,
    max_iter: int = 30,
    tol: float = 1e-6,
    x0=None,
):
    """CG-SENSE (Pruessmann et al. 2001): conjugate gradients on the normal equations.

    Solves ``(A^H A + lamda I) x = A^H y`` with ``A = M F S``.

    Parameters
    ----------
    kspace : array
        complex ``(coils, *spatial)``, zeros where not sampled (prewhitened).
    maps : array
        Sensitivity maps, same shape.
    mask : array
        Sampling mask (bool or weights) broadcastable to ``spatial``.
    lamda : float
        Tikhonov weight (absolute, in the units of ``A^H A``; maps normalised to
        ``sum|S|^2 = 1`` make ``A^H A`` of order 1).
    max_iter : int
        Maximum CG iterations.
    tol : float
        Stop when ``||r|| / ||A^H y|| < tol``.
    x0 : array, optional
        Starting image.

    Returns
    -------
    array
        complex64 image ``spatial``.
    """
    _check(kspace, maps, mask)
    op = _Sense(maps, mask)
    xp = op.xp
    b = op.adjoint(kspace.astype(np.complex64))
    x = xp.zeros_like(b) if x0 is None else x0.astype(np.complex64)
    r = b - (op.normal(x) + lamda * x) if x0 is not None else b.copy()
    p = r.copy()
    rr = _vdot(xp, r, r)
    bnorm = np.sqrt(_vdot(xp, b, b)) or 1.0
    for _ in range(max_iter):
        if np.sqrt(rr) / bnorm < tol:
            break
        ap = op.normal(p)
        if lamda:
            ap = ap + lamda * p
        alpha = rr / max(_vdot(xp, p, ap), 1e-30)
        x += alpha * p
        r -= alpha * ap
        rr_new = _vdot(xp, r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x.astype(np.complex64)


class Wavelet:
    """Orthonormal periodic Daubechies wavelet transform (default ``db4``), NumPy or CuPy.

    The transform is an orthogonal matrix, so its inverse is its adjoint and the
    proximal operator of ``||W x||_1`` is exact. The number of levels is limited so that
    every axis length is divisible by ``2**levels`` (axes of length 1 are left alone).

    Parameters
    ----------
    shape : tuple of int
        Spatial shape.
    levels : int
        Maximum decomposition levels.
    name : str
        PyWavelets name of an orthogonal wavelet (filters only are taken from PyWavelets).
    """

    def __init__(self, shape: Sequence[int], *, levels: int = 4, name: str = "db4"):
        import pywt

        w = pywt.Wavelet(name)
        if not w.orthogonal:
            raise ReconError(f"Wavelet: {name!r} is not orthogonal")
        self.lo = np.asarray(w.dec_lo, dtype=np.float32)
        self.hi = np.asarray(w.dec_hi, dtype=np.float32)
        self.shape = tuple(int(n) for n in shape)
        axes_len = [n for n in self.shape if n > 1]
        lev = levels
        for n in axes_len:
            tz = (n & -n).bit_length() - 1  # 2-adic valuation
            lev = min(lev, tz, max(int(np.log2(n / len(self.lo))) + 1, 0))
        self.levels = max(lev, 0)
        self.axes = [i for i, n in enumerate(self.shape) if n > 1]

    def _analysis(self, x, axis, n):
        xp = get_array_module(x)
        sl = [slice(None)] * x.ndim
        sl[axis] = slice(0, n)
        part = x[tuple(sl)]
        lo = 0
        hi = 0
        for k in range(len(self.lo)):
            shifted = xp.roll(part, -k, axis=axis)
            sub = [slice(None)] * x.ndim
            sub[axis] = slice(0, n, 2)
            s = shifted[tuple(sub)]
            lo = lo + self.lo[k] * s
            hi = hi + self.hi[k] * s
        out = x.copy()
        sl_lo = list(sl)
        sl_lo[axis] = slice(0, n // 2)
        sl_hi = list(sl)
        sl_hi[axis] = slice(n // 2, n)
        out[tuple(sl_lo)] = lo
        out[tuple(sl_hi)] = hi
        return out

    def _synthesis(self, c, axis, n):
        xp = get_array_module(c)
        sl_lo = [slice(None)] * c.ndim
        sl_lo[axis] = slice(0, n // 2)
        sl_hi = list(sl_lo)
        sl_hi[axis] = slice(n // 2, n)
        lo, hi = c[tuple(sl_lo)], c[tuple(sl_hi)]
        shape = list(lo.shape)
        shape[axis] = n
        up_lo = xp.zeros(shape, dtype=c.dtype)
        up_hi = xp.zeros(shape, dtype=c.dtype)
        even = [slice(None)] * c.ndim
        even[axis] = slice(0, n, 2)
        up_lo[tuple(even)] = lo
        up_hi[tuple(even)] = hi
        rec = 0
        for k in range(len(self.lo)):
            rec = rec + xp.roll(self.lo[k] * up_lo + self.hi[k] * up_hi, k, axis=axis)
        out = c.copy()
        sl = [slice(None)] * c.ndim
        sl[axis] = slice(0, n)
        out[tuple(sl)] = rec
        return out

    def forward(self, x):
        """Wavelet coefficients (same shape as ``x``; approximation in the low corner)."""
        c = x
        sizes = list(self.shape)
        for _ in range(self.levels):
            for ax in self.axes:
                c = self._analysis(c, ax, sizes[ax])
            sizes = [s // 2 if i in self.axes else s for i, s in enumerate(sizes)]
        return c

    def adjoint(self, c):
        """Inverse (= adjoint) transform."""
        x = c
        for lev in reversed(range(self.levels)):
            sizes = [s // 2**lev if i in self.axes else s for i, s in enumerate(self.shape)]
            for ax in reversed(self.axes):
                x = self._synthesis(x, ax, sizes[ax])
        return x

    def detail_mask(self):
        """bool array, False on the coarsest approximation (which is not penalised)."""
        m = np.ones(self.shape, dtype=bool)
        sl = tuple(
            slice(0, n // 2**self.levels) if i in self.axes else slice(None)
            for i, n in enumerate(self.shape)
        )
        m[sl] = False
        return m


def _soft(xp, c, thresh):
    mag = xp.abs(c)
    return c * (xp.maximum(mag - thresh, 0) / xp.where(mag > 0, mag, 1))


def sense_l1_wavelet(
    kspace,
    maps,
    mask,
    *,
    lamda: float = 3e-4,
    max_iter: int = 50,
    levels: int = 4,
    random_shift: bool = True,
    seed: int = 0,
    wavelet: str = "db2",
):
    """L1-wavelet regularised SENSE by FISTA (Beck & Teboulle 2009).

    Minimises ``0.5 ||M F S x - y||^2 + lam ||W x||_1`` with ``W`` an orthonormal (db2)
    wavelet (approximation band not penalised) and ``lam = lamda * max|A^H y|``. The step
    is ``1 / L`` with ``L = max sum_c |S_c|^2``, an exact bound of ``||A^H A||`` for the
    unitary FFT.

    Parameters
    ----------
    kspace, maps, mask
        As in :func:`sense_cg`.
    lamda : float
        Relative regularisation weight.
    max_iter : int
        FISTA iterations.
    levels : int
        Wavelet levels (reduced automatically for small or odd sizes).
    random_shift : bool
        Shift the wavelet grid randomly (cyclically) in every iteration, as BART does.
    seed : int
        Seed of those shifts (the result is deterministic for a given seed).
    wavelet : str
        Orthogonal wavelet (PyWavelets name, e.g. ``"db4"``, ``"db2"``, ``"haar"``).

    Returns
    -------
    array
        complex64 image.
    """
    _check(kspace, maps, mask)
    op = _Sense(maps, mask)
    xp = op.xp
    spatial = maps.shape[1:]
    wav = Wavelet(spatial, levels=levels, name=wavelet)
    detail = xp.asarray(wav.detail_mask())
    b = op.adjoint(kspace.astype(np.complex64))
    step = 1.0 / max(op.lipschitz, 1e-12)
    thresh = float(lamda) * float(xp.max(xp.abs(b))) * step
    x = b * step
    z = x.copy()
    t = 1.0
    rng = np.random.default_rng(seed)
    axes = tuple(range(x.ndim))
    block = 2**wav.levels
    for _ in range(max_iter):
        grad = op.normal(z) - b
        # random cyclic shift of the wavelet grid each iteration (as BART), which removes
        # the blockiness of a fixed decimated transform
        shift = tuple(int(v) for v in rng.integers(0, block, size=len(axes))) if (
            random_shift) else (0,) * len(axes)
        c = wav.forward(xp.roll(z - step * grad, shift, axis=axes))
        c = xp.where(detail, _soft(xp, c, thresh), c)
        x_new = xp.roll(wav.adjoint(c), tuple(-v for v in shift), axis=axes)
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        z = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x.astype(np.complex64)


def _grad(xp, x, axes):
    return xp.stack([xp.roll(x, -1, axis=a) - x for a in axes])


def _div(xp, p, axes):
    return sum(p[i] - xp.roll(p[i], 1, axis=a) for i, a in enumerate(axes))


def _tv_prox(xp, b, lam: float, p, axes, n_inner: int):
    """Isotropic TV denoising ``argmin 0.5||x - b||^2 + lam TV(x)`` by FGP (Beck &
    Teboulle 2009) on the dual ``p`` (warm-started); periodic forward differences."""
    if lam <= 0:
        return b, p
    lip = 4.0 * len(axes)  # ||grad||^2 bound
    r = p
    t = 1.0
    for _ in range(n_inner):
        q = r + _grad(xp, b + lam * _div(xp, r, axes), axes) / np.float32(lip * lam)
        norm = xp.sqrt(xp.sum(xp.abs(q) ** 2, axis=0, keepdims=True))
        p_new = q / xp.maximum(norm, 1.0)
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        r = p_new + np.float32((t - 1) / t_new) * (p_new - p)
        p, t = p_new, t_new
    return b + lam * _div(xp, p, axes), p


def sense_tv(
    kspace,
    maps,
    mask,
    *,
    lamda: float = 3e-4,
    max_iter: int = 50,
    n_inner: int = 10,
):
    """Total-variation regularised SENSE by FISTA with an FGP inner TV prox.

    Minimises ``0.5 ||M F S x - y||^2 + lam TV(x)`` (isotropic TV of the complex image,
    periodic forward differences), ``lam = lamda * max|A^H y|``; step ``1 / L`` as in
    :func:`sense_l1_wavelet`. The dual variable of the prox is warm-started across outer
    iterations, so ``n_inner`` can stay small.

    Parameters
    ----------
    kspace, maps, mask
        As in :func:`sense_cg`.
    lamda : float
        Relative regularisation weight.
    max_iter : int
        Outer FISTA iterations.
    n_inner : int
        FGP iterations of the TV prox per outer iteration.

    Returns
    -------
    array
        complex64 image.
    """
    _check(kspace, maps, mask)
    op = _Sense(maps, mask)
    xp = op.xp
    axes = tuple(i for i, n in enumerate(maps.shape[1:]) if n > 1)
    b = op.adjoint(kspace.astype(np.complex64))
    step = 1.0 / max(op.lipschitz, 1e-12)
    lam = float(lamda) * float(xp.max(xp.abs(b))) * step
    x = b * step
    z = x.copy()
    p = xp.zeros((len(axes), *b.shape), dtype=np.complex64)
    t = 1.0
    for _ in range(max_iter):
        grad = op.normal(z) - b
        x_new, p = _tv_prox(xp, z - step * grad, lam, p, axes, n_inner)
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        z = x_new + np.float32((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x.astype(np.complex64)


def acceleration_from_mask(mask: np.ndarray) -> tuple[int, ...]:
    """Acceleration factor per axis of a sampling mask, from its line pattern.

    Along each axis the mask is projected (any sample over the other axes) and the most
    common gap larger than 1 between consecutive sampled lines is taken; an axis without
    such gaps, or where fewer than 5 % of the lines inside the sampled extent are missing
    (elliptical corners, a stray line), has factor 1. A fully sampled calibration block
    inside the pattern does not change the answer (its gaps are 1).

    Parameters
    ----------
    mask : numpy.ndarray
        bool, one axis per phase-encoding direction (``(ny,)`` or ``(ny, nz)``).

    Returns
    -------
    tuple of int
        One factor per axis of ``mask``.
    """
    mask = np.asarray(mask, dtype=bool)
    out = []
    for ax in range(mask.ndim):
        line = mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)) if (
            mask.ndim > 1) else mask
        idx = np.flatnonzero(line)
        if idx.size < 2:
            out.append(1)
            continue
        extent = idx[-1] - idx[0] + 1
        gaps = np.diff(idx)
        gaps = gaps[gaps > 1]
        if not gaps.size or 1.0 - idx.size / extent < 0.05:
            out.append(1)
            continue
        out.append(int(np.argmax(np.bincount(gaps))))
    return tuple(out)


def _window(
    accel: tuple[int, ...], phase: tuple[int, ...], kernel_blocks: int
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (n, ndim) of the neighbourhood searched for source points (centre left out):
    ``R * kernel_blocks // 2`` either side along accelerated axes, 1 along the others."""
    half = [r * kernel_blocks // 2 if r > 1 else (1 if n > 1 and len(phase) > 1 else 0)
            for r, n in zip(accel, phase, strict=True)]
    grid = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), -1)
    grid = grid.reshape(-1, len(phase))
    return grid[np.any(grid != 0, axis=1)], np.array(half)


def grappa(
    kspace,
    calib,
    *,
    mask: np.ndarray,
    acceleration: int | Sequence[int] | None = None,
    kernel_x: int = 5,
    kernel_blocks: int = 4,
    lamda: float = 1e-3,
    max_rows: int = 60000,
    max_kernels: int | None = None,
):
    """GRAPPA (Griswold et al. 2002) for undersampling along one or two phase axes.

    Every missing point inside the sampled extent is filled from the sampled points of
    its neighbourhood (``R * kernel_blocks // 2`` lines either side along accelerated
    axes, one along the other phase axis of 3-D data, ``kernel_x`` points along kx) by
    weights fitted on the calibration block. Missing points are grouped by which
    neighbours are sampled: a regular pattern needs one kernel per offset from the
    lattice (``R - 1`` in 1-D); points next to a fully sampled ACS block, a partial-
    Fourier edge, the matrix edge or an irregular pattern reuse a kernel whose sources
    they have, or get their own (most frequent patterns first, at most ``max_kernels``;
    rarer edge patterns then count points outside the matrix as sampled zeros, the usual
    GRAPPA edge handling). Missing points farther than ``R - 1`` lines beyond the first
    or last sampled line (partial Fourier) are left empty.

    Parameters
    ----------
    kspace : array
        complex ``(coils, nx, *phase)`` with one or two phase axes, zeros where missing.
    calib : array
        complex ``(coils, nx, *cal)``: a fully sampled calibration block (ACS), centred
        on the same kx grid.
    mask : numpy.ndarray
        bool ``phase``: sampled points (imaging and calibration-and-imaging lines).
    acceleration : int or sequence of int, optional
        Factor per phase axis (an int is the first axis); default: from ``mask``
        (:func:`acceleration_from_mask`).
    kernel_x : int
        Kernel width along kx (odd).
    kernel_blocks : int
        Source lines per accelerated axis in a regular pattern.
    lamda : float
        Tikhonov weight relative to ``trace(A^H A) / n_columns``.
    max_rows : int
        At most this many calibration rows are fitted per kernel (evenly spread).
    max_kernels : int, optional
        At most this many fitted kernels (default 16 for one phase axis, ``3 Ry Rz`` for
        two).

    Returns
    -------
    array
        complex64 k-space with the missing points filled; sampled points untouched.

    Raises
    ------
    ReconError
        If fewer than 2 points are sampled, or the calibration block is too small for a
        kernel.
    """
    xp = get_array_module(kspace)
    nc, nx = kspace.shape[:2]
    phase = tuple(int(n) for n in kspace.shape[2:])
    nd = len(phase)
    if nd not in (1, 2) or calib.ndim != kspace.ndim or calib.shape[0] != nc:
        raise ReconError(f"grappa: k-space {kspace.shape} and calibration {calib.shape} must "
                         "be (coils, nx, ny[, nz]) with the same coils")
    mask = np.asarray(mask, dtype=bool).reshape(phase)
    if mask.sum() < 2:
        raise ReconError("grappa: fewer than 2 sampled lines")
    if acceleration is None:
        accel = acceleration_from_mask(mask)
    elif np.ndim(acceleration) == 0:
        accel = (int(acceleration),) + (1,) * (nd - 1)
    else:
        accel = tuple(int(a) for a in acceleration)
    offsets, half = _window(accel, phase, kernel_blocks)
    # points to fill: missing, inside the sampled extent widened by R - 1
    inside = np.ones(phase, bool)
    for ax in range(nd):
        line = mask.any(axis=tuple(a for a in range(nd) if a != ax)) if nd > 1 else mask
        idx = np.flatnonzero(line)
        keep = np.zeros(phase[ax], bool)
        keep[max(0, idx[0] - accel[ax] + 1):idx[-1] + accel[ax]] = True
        inside &= keep.reshape([-1 if a == ax else 1 for a in range(nd)])
    cells = np.argwhere(~mask & inside)
    out = kspace.astype(np.complex64).copy()
    if not cells.size:
        return out
    pad = [(int(h), int(h)) for h in half]
    sampled_or_outside = np.pad(mask, pad, constant_values=True)
    sampled = np.pad(mask, pad, constant_values=False)
    where = tuple(cells[:, None, a] + half[a] + offsets[None, :, a] for a in range(nd))
    pattern = sampled[where]
    real = pattern.any(axis=1)
    cells, pattern = cells[real], pattern[real]
    if not cells.size:
        return out
    # with outside points as sampled zeros: the fallback of rare patterns at the edges
    loose = sampled_or_outside[tuple(w[real] for w in where)]
    uniq, first, inverse, counts = np.unique(pattern, axis=0, return_index=True,
                                             return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if max_kernels is None:
        max_kernels = 16 if nd == 1 else 3 * int(np.prod(accel))
    n_src = int(np.prod([kernel_blocks if r > 1 else 2 * h + 1
                         for r, h in zip(accel, half, strict=True)]))
    scale = np.maximum(np.array(accel, float), 1.0)
    dist = np.sum((offsets / scale) ** 2, axis=1)
    dx = np.arange(kernel_x) - kernel_x // 2
    hx = kernel_x // 2
    cal = calib.astype(np.complex64)
    cal_shape = tuple(int(n) for n in cal.shape[2:])
    cal_flat = cal.reshape(nc, cal.shape[1], -1)
    ro = np.flatnonzero(to_numpy(xp.any(cal != 0, axis=(0, *range(2, cal.ndim)))))
    kp = xp.pad(out, [(0, 0), (hx, hx), *pad]).reshape(nc, nx + 2 * hx, -1)
    padded_shape = tuple(n + 2 * int(h) for n, h in zip(phase, half, strict=True))
    out_flat = out.reshape(nc, nx, -1)
    xwin = xp.asarray(np.arange(nx)[:, None] + dx[None, :] + hx)
    kernels: list[tuple[np.ndarray, Any]] = []
    for u in np.argsort(-counts, kind="stable"):
        have = uniq[u]
        use = next((j for j, (src, _) in enumerate(kernels) if not np.any(src & ~have)), None)
        if use is None and len(kernels) >= max_kernels:
            have = loose[first[u]]
            use = next((j for j, (src, _) in enumerate(kernels) if not np.any(src & ~have)),
                       None)
        if use is None:
            src = have.copy()
            if src.sum() > n_src:  # the nearest sources (in units of R) of a dense region
                order = np.flatnonzero(src)[np.argsort(dist[src], kind="stable")]
                src[:] = False
                src[order[:n_src]] = True
            kernels.append((src, _grappa_fit(xp, cal_flat, cal_shape, offsets[src], dx, ro,
                                             lamda, max_rows, accel)))
            use = len(kernels) - 1
        src, w = kernels[use]
        targets = cells[inverse == u]
        pos = targets[:, None, :] + half[None, None, :] + offsets[src][None, :, :]
        src_flat = np.ravel_multi_index(tuple(np.moveaxis(pos, -1, 0)), padded_shape)
        dst_flat = xp.asarray(np.ravel_multi_index(tuple(targets.T), phase))
        ncols = w.shape[0]
        step = max(1, (128 * 2**20) // (8 * nx * ncols))
        for lo in range(0, targets.shape[0], step):
            g = kp[:, :, xp.asarray(src_flat[lo:lo + step])][:, xwin]  # (c, nx, kx, m, s)
            m = g.shape[3]
            a = xp.transpose(g, (1, 3, 0, 4, 2)).reshape(nx * m, ncols)
            filled = (a @ w).reshape(nx, m, nc)
            out_flat[:, :, dst_flat[lo:lo + step]] = xp.transpose(filled, (2, 0, 1))
    return out


def _grappa_fit(xp, cal_flat, cal_shape, src_offsets, dx, ro, lamda, max_rows, accel):
    """Weights ``(coils * sources * kx, coils)`` of one source pattern, fitted on every
    position of the calibration block where the target and all sources lie inside it."""
    nc = cal_flat.shape[0]
    hx = dx.size // 2
    lo = np.maximum(0, -np.minimum(src_offsets.min(axis=0), 0))
    hi = np.array(cal_shape) - np.maximum(src_offsets.max(axis=0), 0)
    if ro.size == 0 or np.any(hi <= lo) or ro[-1] - ro[0] + 1 <= 2 * hx:
        span = (src_offsets.max(axis=0) - np.minimum(src_offsets.min(axis=0), 0) + 1)
        raise ReconError(
            f"grappa: the calibration block {list(cal_shape)} is too small for R="
            f"{'x'.join(map(str, accel))} (a kernel spans {span.tolist()} lines)"
        )
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
    t = np.stack([g.ravel() for g in grids], axis=1)
    xs = np.arange(ro[0] + hx, ro[-1] - hx + 1)
    if t.shape[0] * xs.size > max_rows:  # evenly thinned rows (the kernel is shift invariant)
        keep_x = max(1, min(xs.size, max_rows // t.shape[0]))
        xs = xs[np.linspace(0, xs.size - 1, keep_x).round().astype(int)]
        if t.shape[0] * xs.size > max_rows:
            t = t[np.linspace(0, t.shape[0] - 1, max_rows // xs.size).round().astype(int)]
    src = np.ravel_multi_index(tuple(np.moveaxis(t[:, None, :] + src_offsets[None], -1, 0)),
                               cal_shape)
    tgt = xp.asarray(np.ravel_multi_index(tuple(t.T), cal_shape))
    xwin = xp.asarray(xs[:, None] + dx[None, :])
    g = cal_flat[:, :, xp.asarray(src)][:, xwin]  # (c, x, kx, t, s)
    a = xp.transpose(g, (1, 3, 0, 4, 2)).reshape(xs.size * t.shape[0], -1)
    b = xp.transpose(cal_flat[:, xp.asarray(xs)][:, :, tgt], (1, 2, 0)).reshape(-1, nc)
    aha = a.conj().T @ a
    reg = lamda * float(xp.real(xp.trace(aha))) / aha.shape[0]
    return xp.linalg.solve(aha + reg * xp.eye(aha.shape[0], dtype=aha.dtype),
                           a.conj().T @ b).astype(np.complex64)
