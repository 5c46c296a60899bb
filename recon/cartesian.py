"""Cartesian reconstruction: centred FFTs, oversampling removal, partial Fourier, filters.

FFT convention (that of the sequence library): the k-space centre is index ``n // 2``
and ``image = fftshift(ifftn(ifftshift(k)))`` with ``norm="ortho"`` (unitary, so that
the SENSE operators built on it are exact adjoints). On NumPy arrays the transforms run
through :mod:`scipy.fft` with all cores; on CuPy arrays through :mod:`cupy.fft`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from mrharmony.backend import get_array_module
from mrharmony.errors import ReconError

__all__ = [
    "crop_center",
    "fft_c",
    "homodyne",
    "ifft_c",
    "kspace_filter",
    "pocs",
    "remove_oversampling",
]

_WORKERS = max(1, os.cpu_count() or 1)


def ifft_c(k, axes: Sequence[int] = (-2, -1)):
    """Centred unitary inverse FFT over ``axes`` (k-space -> image)."""
    xp = get_array_module(k)
    axes = tuple(axes)
    if xp is np:
        import scipy.fft as sfft

        x = sfft.ifftshift(k, axes=axes)
        x = sfft.ifftn(x, axes=axes, norm="ortho", workers=_WORKERS, overwrite_x=True)
        return sfft.fftshift(x, axes=axes)
    x = xp.fft.ifftshift(k, axes=axes)
    x = xp.fft.ifftn(x, axes=axes, norm="ortho")
    return xp.fft.fftshift(x, axes=axes)


def fft_c(x, axes: Sequence[int] = (-2, -1)):
    """Centred unitary forward FFT over ``axes`` (image -> k-space)."""
    xp = get_array_module(x)
    axes = tuple(axes)
    if xp is np:
        import scipy.fft as sfft

        k = sfft.ifftshift(x, axes=axes)
        k = sfft.fftn(k, axes=axes, norm="ortho", workers=_WORKERS, overwrite_x=True)
        return sfft.fftshift(k, axes=axes)
    k = xp.fft.ifftshift(x, axes=axes)
    k = xp.fft.fftn(k, axes=axes, norm="ortho")
    return xp.fft.fftshift(k, axes=axes)


def crop_center(x, size: int, axis: int):
    """Central ``size`` entries of ``x`` along ``axis`` (index ``n//2`` stays at ``size//2``)."""
    n = x.shape[axis]
    if size > n:
        raise ReconError(f"crop: size {size} is larger than axis {axis} of length {n}")
    start = n // 2 - size // 2
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, start + size)
    return x[tuple(index)]


def remove_oversampling(kspace, factor_or_size: float | int, *, axis: int = 1):
    """Remove readout oversampling: image-space crop of the central part, back to k-space.

    Parameters
    ----------
    kspace : array
        k-space with the readout along ``axis``.
    factor_or_size : float or int
        Oversampling factor (``<= 8``, e.g. 2) or, if larger, the target readout size.
    axis : int
        Readout axis.

    Returns
    -------
    array
        k-space with ``n / factor`` readout samples, same centre convention.
    """
    n = kspace.shape[axis]
    size = int(factor_or_size) if factor_or_size > 8 else round(n / factor_or_size)
    if size == n:
        return kspace
    img = ifft_c(kspace, axes=(axis,))
    img = crop_center(img, size, axis)
    # unitary FFTs: keep the image-domain amplitude by rescaling with sqrt(n/size)
    return fft_c(img, axes=(axis,)) * np.float32(np.sqrt(size / n))


def kspace_filter(kspace, *, kind: str = "hann", axes: Sequence[int] = (1, 2), alpha: float = 0.5):
    """Apodise k-space with a separable window (``hann``, ``hamming`` or ``tukey``).

    Parameters
    ----------
    kind : str
        Window; ``tukey`` uses ``alpha`` (fraction of the window that is tapered).
    axes : sequence of int
        Axes to filter (the window is centred at ``n // 2``).
    """
    import scipy.signal.windows as win

    xp = get_array_module(kspace)
    out = kspace
    for ax in axes:
        n = kspace.shape[ax]
        if n < 2:
            continue
        sym = n % 2 == 1  # peak at index n // 2 for even (periodic) and odd (symmetric) n
        if kind == "hann":
            w = win.hann(n, sym=sym)
        elif kind == "hamming":
            w = win.hamming(n, sym=sym)
        elif kind == "tukey":
            w = win.tukey(n, alpha=alpha, sym=sym)
        else:
            raise ReconError(f"kspace_filter: kind {kind!r} is not hann, hamming or tukey")
        shape = [1] * kspace.ndim
        shape[ax] = n
        out = out * xp.asarray(w.astype(np.float32)).reshape(shape)
    return out


def _partial_fourier_axis(mask: np.ndarray) -> tuple[int, int]:
    """First and last sampled index of a 1-D mask."""
    idx = np.flatnonzero(mask)
    return int(idx[0]), int(idx[-1])


def homodyne(kspace, sampled: np.ndarray, *, axis: int = 2, image_axes=None,
             keep_phase: bool = False):
    """Homodyne partial-Fourier reconstruction along one axis (returns an image).

    Uses the symmetric centre for a low-resolution phase estimate and a ramp weighting
    of the asymmetric data (0 -> 2 across the symmetric centre, 1 at the centre, 2 on the
    sampled side, 0 on the missing side; Noll et al. 1991); the image is the real part
    after removing the estimated phase.

    Parameters
    ----------
    kspace : array
        Zero-filled k-space, ``(..., n, ...)`` with ``n`` along ``axis``.
    sampled : numpy.ndarray
        bool ``(n,)``: sampled positions along ``axis`` (one contiguous block).
    axis : int
        Partial-Fourier axis.
    image_axes : sequence of int, optional
        All spatial axes (default: every axis of ``kspace``).
    keep_phase : bool
        Return the complex image ``real part x low-resolution phase`` (complex64) instead
        of the real part alone (float32), so that per-coil images can still be combined
        with coil maps or transformed back to k-space.
    """
    xp = get_array_module(kspace)
    axes = tuple(image_axes) if image_axes is not None else tuple(range(kspace.ndim))
    n = kspace.shape[axis]
    lo, hi = _partial_fourier_axis(sampled)
    c = n // 2
    half = min(c - lo, hi - c)
    if half <= 0:
        raise ReconError("homodyne: the sampled block does not cover the k-space centre")
    shape = [1] * kspace.ndim
    shape[axis] = n
    pos = np.arange(n)
    sym = (pos >= c - half) & (pos <= c + half)
    low = kspace * xp.asarray(sym.astype(np.float32)).reshape(shape)
    # Noll's ramp: 0 -> 2 across the symmetric centre (1 at the centre), 2 on the
    # sampled high side, 0 on the missing side
    w = np.where(sampled, 2.0, 0.0)
    side = 1.0 if hi - c >= c - lo else -1.0
    w[sym] = 1.0 + side * (pos[sym] - c) / (half + 1.0)
    phase = xp.exp(-1j * xp.angle(ifft_c(low, axes=axes)))
    img = ifft_c(kspace * xp.asarray(w.astype(np.float32)).reshape(shape), axes=axes)
    real = (img * phase).real
    if keep_phase:
        return (real * xp.conj(phase)).astype(np.complex64)
    return real.astype(np.float32)


def pocs(kspace, sampled: np.ndarray, *, axis: int = 2, n_iter: int = 10, image_axes=None):
    """POCS partial-Fourier reconstruction (Haacke et al. 1991) along one axis.

    Iterates: image with the low-resolution phase imposed, back to k-space, measured
    samples restored. Returns the completed k-space.

    Parameters
    ----------
    kspace : array
        Zero-filled k-space.
    sampled : numpy.ndarray
        bool ``(n,)`` along ``axis``.
    axis : int
        Partial-Fourier axis.
    n_iter : int
        Iterations (10 is plenty for 5/8 and above).
    image_axes : sequence of int, optional
        All spatial axes (default: the last ``kspace.ndim - 1`` axes).
    """
    xp = get_array_module(kspace)
    axes = tuple(image_axes) if image_axes is not None else tuple(range(1, kspace.ndim))
    n = kspace.shape[axis]
    lo, hi = _partial_fourier_axis(sampled)
    c = n // 2
    half = min(c - lo, hi - c)
    if half <= 0:
        raise ReconError("pocs: the sampled block does not cover the k-space centre")
    shape = [1] * kspace.ndim
    shape[axis] = n
    pos = np.arange(n)
    tri = np.clip(1.0 - np.abs(pos - c) / max(half, 1), 0.0, 1.0).astype(np.float32)
    low = kspace * xp.asarray(tri).reshape(shape)
    phase = xp.exp(1j * xp.angle(ifft_c(low, axes=axes))).astype(np.complex64)
    m = xp.asarray(sampled).reshape(shape)
    k = kspace.copy()
    for _ in range(n_iter):
        img = ifft_c(k, axes=axes)
        img = xp.abs(img) * phase
        k = xp.where(m, kspace, fft_c(img, axes=axes))
    return k.astype(np.complex64)
