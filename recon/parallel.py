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

import numpy as np

from mrharmony.backend import get_array_module
from mrharmony.errors import ReconError
from mrharmony.recon.cartesian import fft_c, ifft_c

__all__ = [
    "Wavelet",
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


def grappa(
    kspace,
    calib,
    *,
    mask: np.ndarray,
    kernel_x: int = 5,
    kernel_blocks: int = 4,
    lamda: float = 1e-2,
):
    """GRAPPA (Griswold et al. 2002) for 1-D undersampling along ky.

    Parameters
    ----------
    kspace : array
        complex ``(coils, nx, ny)``, zeros on the missing lines.
    calib : array
        complex ``(coils, nx, n_cal)``: fully sampled calibration lines (ACS).
    mask : numpy.ndarray
        bool ``(ny,)`` sampled lines (imaging and calibration-and-imaging lines).
    kernel_x : int
        Kernel width along kx (odd).
    kernel_blocks : int
        Source lines along ky (sampled lines around each missing line).
    lamda : float
        Tikhonov weight relative to ``trace(A^H A) / n_columns``.

    Returns
    -------
    array
        complex64 k-space with the missing lines filled; sampled lines untouched.

    Raises
    ------
    ReconError
        If the calibration region is too small for the kernel.
    """
    xp = get_array_module(kspace)
    nc, nx, _ny = kspace.shape
    mask = np.asarray(mask, dtype=bool)
    sampled = np.flatnonzero(mask)
    if sampled.size < 2:
        raise ReconError("grappa: fewer than 2 sampled lines")
    gaps = np.diff(sampled)
    r = int(np.max(gaps))
    if r == 1:
        return kspace.astype(np.complex64)
    ncal = calib.shape[2]
    j_off = np.arange(kernel_blocks) - (kernel_blocks // 2 - 1)  # e.g. -1, 0, 1, 2
    dx = np.arange(kernel_x) - kernel_x // 2
    span = r * (j_off[-1] - j_off[0])
    if ncal < span + 2:
        raise ReconError(
            f"grappa: {ncal} calibration lines are too few for R={r} with {kernel_blocks} "
            f"kernel blocks (need at least {span + 2})"
        )
    out = kspace.astype(np.complex64).copy()
    pad_y = r * kernel_blocks
    kp = xp.pad(out, ((0, 0), (kernel_x // 2, kernel_x // 2), (pad_y, pad_y)))
    ix = np.arange(nx)[:, None] + dx[None, :] + kernel_x // 2  # (nx, kx) in padded coords
    cal = calib.astype(np.complex64)
    cp = xp.pad(cal, ((0, 0), (kernel_x // 2, kernel_x // 2), (0, 0)))
    missing = np.flatnonzero(~mask)
    # distance of each missing line from the regular R pattern (the most common residue of
    # the sampled lines modulo R; calibration lines off the pattern do not count)
    base = int(np.argmax(np.bincount(sampled % r, minlength=r)))
    t_of = (missing - base) % r
    for t in range(1, r):
        targets = missing[t_of == t]
        if targets.size == 0:
            continue
        # training: target y in calib with all sources inside calib
        ty = np.arange(ncal)
        src_y = ty[:, None] - t + r * j_off[None, :]
        ok = np.all((src_y >= 0) & (src_y < ncal), axis=1)
        ty, src_y = ty[ok], src_y[ok]
        a = cp[:, ix][:, :, :, src_y]  # (c, nx, kx, L, nb)
        a = xp.transpose(a, (3, 1, 0, 2, 4)).reshape(ty.size * nx, -1)
        bmat = xp.transpose(cal[:, :, ty], (2, 1, 0)).reshape(ty.size * nx, nc)
        aha = a.conj().T @ a
        reg = lamda * float(xp.real(xp.trace(aha))) / aha.shape[0]
        w = xp.linalg.solve(aha + reg * xp.eye(aha.shape[0], dtype=aha.dtype), a.conj().T @ bmat)
        # application
        sy = targets[:, None] - t + r * j_off[None, :] + pad_y
        s = kp[:, ix][:, :, :, sy]
        s = xp.transpose(s, (3, 1, 0, 2, 4)).reshape(targets.size * nx, -1)
        filled = (s @ w).reshape(targets.size, nx, nc)
        out[:, :, targets] = xp.transpose(filled, (2, 1, 0))
    return out
