"""Coil combination and sensitivity maps: sum of squares, Walsh adaptive, ESPIRiT;
prescan-like intensity normalisation (:func:`prescan_gain`).

Images are ``(coils, *spatial)``. Sensitivity maps have the same shape and are
normalised so that ``sum_c |S_c|^2 = 1`` inside the object (``0`` outside for ESPIRiT).
"""

from __future__ import annotations

import math

import numpy as np

from mrharmony.backend import get_array_module, to_numpy
from mrharmony.errors import ReconError

__all__ = ["combine", "espirit_maps", "prescan_gain", "sos", "walsh_maps"]


def sos(images, *, axis: int = 0):
    """Root sum of squares over the coil axis (float32).

    Magnitudes above 1e18 (whose squares would overflow float32) are first scaled by a
    power of two, which is exact, so the result is finite for every finite input.
    """
    xp = get_array_module(images)
    mag = xp.abs(images)
    peak = float(xp.max(mag)) if mag.size else 0.0
    if not peak > 1e18:
        return xp.sqrt(xp.sum(mag**2, axis=axis)).astype(np.float32)
    scale = 2.0 ** math.ceil(math.log2(peak))
    mag = mag / mag.dtype.type(scale)
    return (xp.sqrt(xp.sum(mag**2, axis=axis)) * scale).astype(np.float32)


def combine(images, maps):
    """Optimal (Roemer) combination ``sum_c conj(S_c) x_c / sum_c |S_c|^2`` (complex64)."""
    xp = get_array_module(images)
    num = xp.sum(xp.conj(maps) * images, axis=0)
    den = xp.sum(xp.abs(maps) ** 2, axis=0)
    return xp.where(den > 0, num / xp.where(den > 0, den, 1), 0).astype(np.complex64)


def walsh_maps(images, *, kernel: int = 7, n_power: int = 8):
    """Walsh adaptive sensitivity maps (Walsh et al. 2000) from coil images.

    The coil covariance ``R = x x^H`` is smoothed over a ``kernel``-wide box in every
    spatial direction; the map at each voxel is the dominant eigenvector of its smoothed
    ``R`` (power iteration, vectorised over voxels), phase-referenced to the coil with
    the largest total signal.

    Parameters
    ----------
    images : array
        complex ``(coils, *spatial)``.
    kernel : int
        Smoothing box width in voxels.
    n_power : int
        Power iterations.

    Returns
    -------
    array
        complex64 maps, unit norm over coils at every voxel.
    """
    from scipy.ndimage import uniform_filter

    x = to_numpy(images).astype(np.complex64)
    nc = x.shape[0]
    spatial = x.shape[1:]
    size = [kernel if n > 1 else 1 for n in spatial]
    cov = x[:, None] * np.conj(x[None, :])  # (c, c, *spatial)
    flat = cov.reshape(nc * nc, *spatial)
    smoothed = np.empty_like(flat)
    for i in range(nc * nc):  # c^2 small filters; the voxel work is vectorised
        smoothed[i].real = uniform_filter(flat[i].real, size=size, mode="nearest")
        smoothed[i].imag = uniform_filter(flat[i].imag, size=size, mode="nearest")
    r = np.moveaxis(smoothed.reshape(nc, nc, -1), -1, 0)  # (v, c, c)
    ref = int(np.argmax(np.sum(np.abs(x) ** 2, axis=tuple(range(1, x.ndim)))))
    v = np.ones((r.shape[0], nc), np.complex64) / np.sqrt(nc)
    for _ in range(n_power):
        v = np.einsum("vij,vj->vi", r, v)
        v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-30)
    v *= np.exp(-1j * np.angle(v[:, ref : ref + 1]))
    maps = np.moveaxis(v, 0, -1).reshape(nc, *spatial).astype(np.complex64)
    return get_array_module(images).asarray(maps)


def espirit_maps(
    calib,
    shape: tuple[int, ...],
    *,
    calib_width: int | tuple[int, ...] = 24,
    kernel_width: int = 6,
    thresh: float = 0.02,
    crop: float = 0.95,
    max_iter: int = 30,
    return_eigenvalues: bool = False,
):
    """ESPIRiT sensitivity maps (Uecker et al. 2014), one set of maps.

    Same model as BART ``ecalib -m 1`` and SigPy ``EspiritCalib``: the calibration matrix
    of ``kernel_width``-wide patches of the central ``calib_width`` region is decomposed
    (SVD, singular values above ``thresh * max`` kept); the image-space operator
    ``G(x) = sum_j k_j(x) k_j(x)^H`` of the kept kernels has the maps as its eigenvector
    of eigenvalue ~1. ``G`` is a trigonometric polynomial of bandwidth
    ``2 * kernel_width - 1``, so it is computed exactly on a small grid and Fourier-
    interpolated to ``shape`` (instead of one full-size FFT per kernel); the dominant
    eigenvector per voxel comes from ``max_iter`` batched power iterations. Maps are
    phase-referenced to coil 0 and zeroed where the eigenvalue is ``<= crop``.

    Parameters
    ----------
    calib : array
        complex k-space ``(coils, *spatial)`` with a fully sampled centre (other samples
        may be zero), NumPy or CuPy.
    shape : tuple of int
        Spatial shape of the maps.
    calib_width : int or tuple of int
        Width of the central calibration region (one per spatial axis, or one for all),
        as BART ``ecalib -r``.
    kernel_width, thresh, crop, max_iter
        As in BART ``ecalib`` (``-k``, ``-t``, ``-c``); along an axis whose calibration
        width ``w`` is below ``2 * kernel_width`` the kernel is ``w // 2`` wide.
    return_eigenvalues : bool
        Also return the eigenvalue map.

    Returns
    -------
    array
        complex64 ``(coils, *shape)`` maps (and float32 eigenvalues) on the input device.
    """
    from mrharmony.recon.cartesian import crop_center, fft_c, ifft_c

    xp = get_array_module(calib)
    nc = calib.shape[0]
    spatial = tuple(int(n) for n in calib.shape[1:])
    if len(spatial) != len(shape):
        raise ReconError(f"espirit_maps: k-space has {len(spatial)} spatial axes, shape {shape}")
    ndim = len(shape)
    # central calibration block (axes of length 1 stay 1)
    cal = calib
    widths = []
    per_axis = (calib_width,) * ndim if np.ndim(calib_width) == 0 else tuple(calib_width)
    if len(per_axis) != ndim:
        raise ReconError(f"espirit_maps: calib_width {calib_width} for {ndim} spatial axes")
    for ax, n in enumerate(spatial):
        w = min(int(per_axis[ax]), n)
        widths.append(w)
        cal = crop_center(cal, w, ax + 1)
    # at most half the calibration width along each axis: a kernel as long as the region
    # fits it at only a few positions, the calibration matrix then misses part of the
    # signal subspace and the eigenvalues drop below ``crop`` (a 6-wide kernel on an
    # 8-partition 3-D calibration region left 9 % of the object with maps)
    kw = [min(kernel_width, max(1, w // 2)) for w in widths]
    if any(w < k for w, k in zip(widths, kw, strict=True)) or all(k == 1 for k in kw):
        raise ReconError(f"espirit_maps: calibration region {widths} is smaller than the kernel")
    # calibration matrix: rows = patch positions, columns = (coil, patch offsets)
    win = np.lib.stride_tricks.sliding_window_view if xp is np else (
        xp.lib.stride_tricks.sliding_window_view)
    blocks = win(cal, kw, axis=tuple(range(1, ndim + 1)))  # (c, *positions, *kw)
    npos = int(np.prod(blocks.shape[1:1 + ndim]))
    mat = xp.moveaxis(blocks.reshape(nc, npos, -1), 1, 0).reshape(npos, -1)
    # right singular vectors from the eigendecomposition of the smaller Gram matrix (the
    # same subspace as the SVD); 3-D regions give wide matrices (32 coils, a 24 x 24 x 8
    # region and a 6 x 6 x 4 kernel: 1805 patches x 4608 columns)
    if mat.shape[0] > mat.shape[1]:
        eig, vec = xp.linalg.eigh(mat.conj().T @ mat)
        order = xp.argsort(eig)[::-1]
        sv = xp.sqrt(xp.maximum(eig[order], 0))
        keep = sv > thresh * sv.max()
        vh = vec[:, order].conj().T[keep]
    else:  # fewer patch positions than columns: V^H = S^-1 U^H A from A A^H = U S^2 U^H
        eig, vec = xp.linalg.eigh(mat @ mat.conj().T)
        order = xp.argsort(eig)[::-1]
        sv = xp.sqrt(xp.maximum(eig[order], 0))
        keep = sv > thresh * sv.max()
        vh = (vec[:, order[keep]].conj().T @ mat) / sv[keep][:, None].astype(mat.real.dtype)
    kernels = vh.reshape(-1, nc, *kw)  # (r, c, *kw)
    # G on a small grid that holds its bandwidth (2 kw - 1) exactly
    small = tuple(min(n, 2 * k + 2) if n > 1 else 1 for n, k in zip(shape, kw, strict=True))
    pad = [(0, 0), (0, 0)]
    padded = kernels
    for ax, (m, k) in enumerate(zip(small, kw, strict=True)):
        before = m // 2 - k // 2
        padded = xp.pad(padded, pad + [(0, 0)] * ax + [(before, m - k - before)] +
                        [(0, 0)] * (ndim - ax - 1))
    axes = tuple(range(-ndim, 0))
    kimg = ifft_c(padded.astype(np.complex64), axes=axes)  # (r, c, *small)
    g_small = xp.einsum("rc...,rd...->cd...", kimg, xp.conj(kimg))
    # Fourier-interpolate the upper triangle of G to the full grid
    iu = np.triu_indices(nc)
    upper = g_small[iu[0], iu[1]]  # (p, *small)
    kup = fft_c(upper, axes=axes)
    for ax, (n, m) in enumerate(zip(shape, small, strict=True)):
        before = n // 2 - m // 2
        kup = xp.pad(kup, [(0, 0)] + [(0, 0)] * ax + [(before, n - m - before)] +
                     [(0, 0)] * (ndim - ax - 1))
    scale = float(np.prod(shape)) / float(np.prod(kw))  # as BART/SigPy: eigenvalue ~1
    scale *= float(np.sqrt(np.prod(small) / np.prod(shape)))  # unitary FFT size change
    full_upper = ifft_c(kup, axes=axes) * np.float32(scale)
    nvox = int(np.prod(shape))
    g = xp.zeros((nvox, nc, nc), np.complex64)
    fu = full_upper.reshape(len(iu[0]), nvox).T
    g[:, iu[0], iu[1]] = fu
    g[:, iu[1], iu[0]] = xp.conj(fu)
    v = xp.ones((nvox, nc, 1), np.complex64) / np.float32(np.sqrt(nc))
    eig = xp.zeros((nvox, 1, 1), np.float32)
    for _ in range(max_iter):
        v = g @ v
        eig = xp.linalg.norm(v, axis=1, keepdims=True)
        v = v / xp.maximum(eig, 1e-30)
    ref = v[:, :1, :]
    v = v * xp.conj(ref / xp.maximum(xp.abs(ref), 1e-30))
    eig = eig[:, 0, 0]
    maps = (v[:, :, 0] * (eig > crop)[:, None]).T.reshape(nc, *shape).astype(np.complex64)
    if return_eigenvalues:
        return maps, eig.reshape(shape).astype(np.float32)
    return maps


def prescan_gain(images, *, sigma: float = 0.1, threshold: float = 0.1,
                 max_gain: float = 10.0):
    """Receive-profile correction of a coil array, as the vendors' prescan normalisation.

    A vendor's prescan normalisation (Siemens Prescan Normalize, GE PURE, Philips CLEAR)
    divides the array image by the ratio of the array's and the body coil's receive
    profiles, measured in a low-resolution prescan. Without a body-coil scan the ratio is
    estimated from the data: low-resolution coil images ``l_c`` (a Gaussian k-space window
    of width ``sigma`` of ``k_max``), the array's root sum of squares ``sqrt(sum |l_c|^2)``
    and a virtual body coil ``|sum_c w_c l_c|`` (every coil phase-aligned to the strongest
    one with one constant weight ``w_c``, i.e. a coherent sum as a volume coil receives).
    The object cancels in the ratio, so the result is the profile ratio alone: the image
    keeps the virtual body coil's (flatter) shading instead of the array's.

    Parameters
    ----------
    images : array
        complex coil images ``(coils, *spatial)`` (low resolution is enough: a calibration
        region zero-filled to the image grid works).
    sigma : float
        Width of the Gaussian low-pass, as a fraction of ``k_max`` on every axis.
    threshold : float
        Voxels whose low-resolution RSS is below this fraction of its maximum are left
        unchanged (gain 1), as the vendors clip the correction outside the object.
    max_gain : float
        The gain is clipped to ``[1 / max_gain, max_gain]``.

    Returns
    -------
    numpy.ndarray
        float32 gain of shape ``spatial``, with median 1 over the object (the image scale
        is kept); multiply the combined image by it.
    """
    from mrharmony.formats.kspace_filter import normalised_kspace_radius
    from mrharmony.recon.cartesian import fft_c, ifft_c

    x = to_numpy(images).astype(np.complex64)
    spatial = x.shape[1:]
    if x.shape[0] == 1:
        return np.ones(spatial, np.float32)
    axes = tuple(1 + i for i, n in enumerate(spatial) if n > 1)
    window = np.exp(-0.5 * (normalised_kspace_radius(spatial) / sigma) ** 2)
    low = ifft_c(fft_c(x, axes=axes) * window.astype(np.float32)[None], axes=axes)
    rss = np.sqrt(np.sum(np.abs(low) ** 2, axis=0))
    ref = int(np.argmax(np.sum(np.abs(low) ** 2, axis=tuple(range(1, low.ndim)))))
    overlap = np.sum(low * np.conj(low[ref])[None], axis=tuple(range(1, low.ndim)))
    weights = np.exp(-1j * np.angle(overlap)).astype(np.complex64)
    body = np.abs(np.tensordot(weights, low, axes=(0, 0)))
    inside = rss > threshold * rss.max()
    ratio = np.ones(spatial, np.float64)
    ratio[inside] = rss[inside] / np.maximum(body[inside], 1e-30)
    if inside.any():
        ratio[inside] /= np.median(ratio[inside])
    gain = np.clip(1.0 / ratio, 1.0 / max_gain, max_gain)
    gain[~inside] = 1.0
    return gain.astype(np.float32)
