"""Simultaneous multi-slice (SMS) reconstruction: slice-SENSE and split-slice GRAPPA.

An SMS dataset (header ``parallelImaging.multiband``, user parameters
``MultibandFactor``, ``CaipiShift``, ``MultibandGroups``, ``MultibandSlicePosition_<s>``;
see :mod:`mrharmony.sequences.builders._sms`) holds, per slice group ``g`` (ISMRMRD
``slice`` counter of the imaging lines), the collapsed k-space of its ``MB`` slices
``s_j = g + j G`` excited together, and a single-band reference of every slice (lines
flagged ``ACQ_IS_PARALLEL_CALIBRATION``, ``slice`` = the true slice index).

Signal model (CAIPI by RF phase cycling). Slice ``j`` of a group is excited with the
extra RF phase ``theta_j(m) = 2 pi j shift m`` on the centred phase line ``m``; its data
carry ``exp(-i theta_j(m))`` (Pulseq RF phases enter the signal conjugated, as in
:mod:`mrharmony.simulation.timeline`: :data:`CAIPI_SIGN`). Per coil ``c``::

    K_c(m) = sum_j K_{j,c}(m) exp(-i 2 pi j shift m)      (k-space)
    I_c(x) = sum_j roll(C_{j,c} rho_j, d_j)(x),  d_j = j shift ny   (image, along phase)

so every slice is a shifted copy in the collapsed image (FOV/2 for MB 2 by default).

- **slice-SENSE** (:func:`slice_sense`): coil maps of every slice from its single-band
  reference (coil images over their root sum of squares, zero where the reference is
  below :data:`MAP_THRESHOLD` of its maximum), shifted as the data; per pixel the
  ``coils x MB`` system ``I(x) = A(x) r(x)`` is solved in the least-squares sense with
  Tikhonov weight ``lamda x max sum|C|^2`` (``lamda`` default :data:`SENSE_LAMDA`), and
  each ``r_j`` is shifted back. With maps normalised to ``sum_c |C|^2 = 1`` the slice
  images have the scale of the root sum of squares of their single-band coil images.
- **split-slice GRAPPA** (:func:`slice_grappa`, Cauley et al., MRM 72:93, 2014): for each
  slice ``j`` a ``kx x ky`` kernel over all coils maps the collapsed k-space to that
  slice's (shifted) k-space; it is fitted on the single-band references, shifted as the
  data, by minimising ``sum_i || S(K_i) W_j - delta_ij T(K_i) ||^2`` (the leak-block
  condition: the kernel of slice ``j`` applied to any other slice gives zero), with
  Tikhonov weight ``lamda x trace(S^H S) / n`` (default :data:`GRAPPA_LAMDA`). The slice
  coil images are combined by root sum of squares.

The single-band reference may be low resolution (its centre lines; the header's
``MultibandReferenceLines``): maps come from the Hann-windowed block, GRAPPA is fitted
on its lines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrharmony.errors import ReconError
from mrharmony.formats.flags import has_flag
from mrharmony.formats.raw import encoding_of
from mrharmony.recon.cartesian import crop_center, ifft_c
from mrharmony.recon.coils import sos
from mrharmony.recon.image import ReconImage

__all__ = [
    "CAIPI_SIGN",
    "GRAPPA_KERNEL",
    "GRAPPA_LAMDA",
    "MAP_THRESHOLD",
    "SENSE_LAMDA",
    "SMS_METHODS",
    "MultibandInfo",
    "caipi_shifts",
    "collapse",
    "multiband_factor",
    "multiband_info",
    "reconstruct_sms",
    "reference_maps",
    "slice_grappa",
    "slice_sense",
    "sort_sms",
]

#: Sign of the CAIPI phase in the data: slice ``j`` carries ``exp(CAIPI_SIGN i theta_j)``.
CAIPI_SIGN = -1
#: Reference below this fraction of its maximum root sum of squares: no coil map (0).
MAP_THRESHOLD = 0.005
#: Default relative Tikhonov weight of slice-SENSE.
SENSE_LAMDA = 1e-4
#: Default relative Tikhonov weight of the split-slice GRAPPA kernel fit.
GRAPPA_LAMDA = 1e-4
#: Split-slice GRAPPA kernel (readout points, phase lines).
GRAPPA_KERNEL = (5, 5)
#: Methods on SMS data -> what runs (``fft``: the collapsed image of each group).
SMS_METHODS = {"auto": "slice-sense", "sense": "slice-sense", "grappa": "slice-grappa",
               "fft": "collapsed"}


@dataclass(frozen=True)
class MultibandInfo:
    """What the header says about an SMS acquisition."""

    factor: int
    shift: float
    n_groups: int
    positions_mm: np.ndarray

    def members(self, group: int) -> np.ndarray:
        """True slice indices of group ``group`` (``g + j G``)."""
        return group + self.n_groups * np.arange(self.factor)


def _user_doubles(header: Any) -> dict[str, float]:
    params = getattr(header, "userParameters", None)
    if params is None:
        return {}
    return {p.name: float(p.value) for p in (params.userParameterDouble or [])}


def multiband_factor(header: Any) -> int:
    """Multiband factor of a dataset (1 when the header states none)."""
    enc = encoding_of(header)
    par = getattr(enc, "parallelImaging", None)
    mb = getattr(par, "multiband", None) if par is not None else None
    if mb is not None and getattr(mb, "multiband_factor", None):
        return int(mb.multiband_factor)
    return int(_user_doubles(header).get("MultibandFactor", 1))


def multiband_info(header: Any) -> MultibandInfo:
    """Multiband factor, CAIPI shift, group count and slice positions from the header.

    Raises
    ------
    ReconError
        If the header states multiband but not the user parameters slice separation
        needs (``CaipiShift``, ``MultibandGroups``, ``MultibandSlicePosition_<s>``).
    """
    mb = multiband_factor(header)
    user = _user_doubles(header)
    missing = [k for k in ("CaipiShift", "MultibandGroups") if k not in user]
    if missing:
        raise ReconError(f"multiband data: the header lacks the user parameter(s) "
                         f"{', '.join(missing)} slice separation needs")
    groups = int(user["MultibandGroups"])
    pos = np.array([user.get(f"MultibandSlicePosition_{s}", np.nan)
                    for s in range(groups * mb)])
    return MultibandInfo(factor=mb, shift=float(user["CaipiShift"]), n_groups=groups,
                         positions_mm=pos)


def caipi_shifts(factor: int, shift: float, ny: int) -> np.ndarray:
    """Shift (pixels along phase, ``np.roll`` convention) of each slice in the collapsed
    image: ``-CAIPI_SIGN x j x shift x ny``."""
    return np.round(-CAIPI_SIGN * np.arange(factor) * shift * ny).astype(int)


def collapse(slice_kspace: np.ndarray, shift: float) -> np.ndarray:
    """The collapsed k-space of ``MB`` slices excited together with CAIPI phases.

    Parameters
    ----------
    slice_kspace : ndarray
        ``(MB, coils, nx, ny)`` single-band k-space of each slice (FFT convention).
    shift : float
        CAIPI shift per slice (fraction of the phase FOV).

    Returns
    -------
    ndarray
        ``(coils, nx, ny)``: ``sum_j K_j exp(CAIPI_SIGN i 2 pi j shift m)``,
        ``m = line - ny // 2``.
    """
    mb, _, _, ny = slice_kspace.shape
    m = np.arange(ny) - ny // 2
    ph = np.exp(CAIPI_SIGN * 2j * np.pi * np.arange(mb)[:, None] * shift * m[None, :])
    return np.einsum("jcxy,jy->cxy", slice_kspace, ph)


def _shift_kspace(k: np.ndarray, j: int, shift: float) -> np.ndarray:
    m = np.arange(k.shape[-1]) - k.shape[-1] // 2
    return k * np.exp(CAIPI_SIGN * 2j * np.pi * j * shift * m)


def reference_maps(ref_kspace: np.ndarray, lines: np.ndarray, *,
                   threshold: float = MAP_THRESHOLD) -> np.ndarray:
    """Coil maps of each slice from its single-band reference.

    Parameters
    ----------
    ref_kspace : ndarray
        ``(MB, coils, nx, ny)`` reference k-space (zero outside the reference lines).
    lines : ndarray of bool
        ``(ny,)`` lines the reference holds; a block shorter than ``ny`` is
        Hann-windowed along phase (low-resolution maps without ringing).
    threshold : float
        Fraction of each slice's maximum root sum of squares below which the map is 0.

    Returns
    -------
    ndarray
        ``(MB, coils, nx, ny)`` complex maps, ``sum_c |C|^2 = 1`` inside the object.
    """
    k = np.array(ref_kspace, dtype=np.complex128)
    idx = np.flatnonzero(lines)
    if idx.size < k.shape[-1]:
        win = np.zeros(k.shape[-1])
        win[idx] = np.hanning(idx.size + 2)[1:-1]
        k = k * win
    img = ifft_c(k, axes=(-2, -1))
    rss = np.sqrt(np.sum(np.abs(img) ** 2, axis=1, keepdims=True))
    keep = rss > threshold * rss.max(axis=(1, 2, 3), keepdims=True)
    return np.where(keep, img / np.where(keep, rss, 1.0), 0.0)


def slice_sense(collapsed_img: np.ndarray, maps: np.ndarray, shift: float, *,
                lamda: float = SENSE_LAMDA) -> np.ndarray:
    """Separate the slices of a collapsed image by SENSE with CAIPI-shifted coil maps.

    Parameters
    ----------
    collapsed_img : ndarray
        ``(coils, nx, ny)`` coil images of the collapsed k-space.
    maps : ndarray
        ``(MB, coils, nx, ny)`` coil maps of each slice (:func:`reference_maps`).
    shift : float
        CAIPI shift per slice (fraction of the phase FOV).
    lamda : float
        Tikhonov weight relative to ``max_x sum_jc |C_jc(x)|^2``.

    Returns
    -------
    ndarray
        ``(MB, nx, ny)`` complex slice images.
    """
    mb, nc, nx, ny = maps.shape
    d = caipi_shifts(mb, shift, ny)
    a = np.stack([np.roll(maps[j], d[j], axis=-1) for j in range(mb)], axis=-1)
    a = a.transpose(1, 2, 0, 3).reshape(nx * ny, nc, mb)  # (pixels, coils, MB)
    y = collapsed_img.transpose(1, 2, 0).reshape(nx * ny, nc, 1)
    ah = a.conj().transpose(0, 2, 1)
    gram = ah @ a
    reg = lamda * float(np.max(np.real(np.trace(gram, axis1=1, axis2=2))))
    r = np.linalg.solve(gram + reg * np.eye(mb), ah @ y)[..., 0]  # (pixels, MB)
    r = r.reshape(nx, ny, mb).transpose(2, 0, 1)
    return np.stack([np.roll(r[j], -d[j], axis=-1) for j in range(mb)])


def _patches(k: np.ndarray, kernel: tuple[int, int]) -> np.ndarray:
    """``(nx, ny, coils * kx * ky)`` source patches of zero-padded k-space ``(coils, nx, ny)``."""
    kx, ky = kernel
    pad = np.pad(k, ((0, 0), (kx // 2, kx // 2), (ky // 2, ky // 2)))
    win = np.lib.stride_tricks.sliding_window_view(pad, (kx, ky), axis=(1, 2))
    nc, nx, ny = k.shape
    return win.transpose(1, 2, 0, 3, 4).reshape(nx, ny, nc * kx * ky)


def slice_grappa(collapsed_k: np.ndarray, ref_kspace: np.ndarray, lines: np.ndarray,
                 shift: float, *, kernel: tuple[int, int] = GRAPPA_KERNEL,
                 lamda: float = GRAPPA_LAMDA) -> np.ndarray:
    """Split-slice GRAPPA: the (shifted) k-space of each slice from the collapsed k-space.

    Parameters
    ----------
    collapsed_k : ndarray
        ``(coils, nx, ny)`` collapsed k-space.
    ref_kspace : ndarray
        ``(MB, coils, nx, ny)`` single-band references (zero outside ``lines``).
    lines : ndarray of bool
        ``(ny,)`` lines of the reference.
    shift : float
        CAIPI shift per slice (fraction of the phase FOV).
    kernel : (int, int)
        Kernel size (readout points, phase lines), odd.
    lamda : float
        Tikhonov weight of the fit relative to ``trace(S^H S) / n``.

    Returns
    -------
    ndarray
        ``(MB, coils, nx, ny)`` k-space of every slice, unshifted (its own FOV position).

    Raises
    ------
    ReconError
        If the reference has fewer lines than the kernel or fewer fit points than
        kernel coefficients.
    """
    mb, nc, nx, ny = ref_kspace.shape
    kx, ky = kernel
    idx = np.flatnonzero(lines)
    if idx.size < ky + 2 or nx < kx:
        raise ReconError(f"slice-grappa: the single-band reference has {idx.size} lines, too "
                         f"few for a {kx} x {ky} kernel")
    rows_y = idx[ky // 2:idx.size - ky // 2]  # kernel fully inside the reference block
    rows_x = np.arange(kx // 2, nx - kx // 2)
    src, tgt = [], []
    for j in range(mb):
        kj = _shift_kspace(ref_kspace[j], j, shift)
        src.append(_patches(kj, kernel)[np.ix_(rows_x, rows_y)].reshape(-1, nc * kx * ky))
        tgt.append(kj[:, rows_x][:, :, rows_y].reshape(nc, -1).T)
    n_coef = nc * kx * ky
    if sum(s.shape[0] for s in src) < n_coef:
        raise ReconError(f"slice-grappa: {sum(s.shape[0] for s in src)} fit points for "
                         f"{n_coef} kernel coefficients (a larger reference is needed)")
    gram = sum(s.conj().T @ s for s in src)
    gram = gram + lamda * np.real(np.trace(gram)) / n_coef * np.eye(n_coef)
    patches = _patches(collapsed_k, kernel).reshape(nx * ny, n_coef)
    out = np.zeros((mb, nc, nx, ny), dtype=np.complex128)
    for j in range(mb):
        w = np.linalg.solve(gram, src[j].conj().T @ tgt[j])  # leak-block: others' target 0
        kj = (patches @ w).T.reshape(nc, nx, ny)
        out[j] = _shift_kspace(kj, j, -shift)  # back to the slice's own position
    return out


def sort_sms(header: Any, acqs: list[Any]) -> tuple[dict, dict, int, int]:
    """Sort SMS acquisitions into k-space arrays.

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
    acqs : list of ismrmrd.Acquisition
        Imaging and single-band reference lines (no noise scans).

    Returns
    -------
    groups : dict
        Slice group -> ``(coils, nx_encoded, ny)`` collapsed k-space.
    refs : dict
        True slice -> ``(coils, nx_encoded, ny)`` single-band reference (zero outside its
        lines).
    nx, ny : int
        Encoded readout samples and phase lines.
    """
    enc = encoding_of(header)
    ny = int(enc.encodedSpace.matrixSize.y)
    lim = getattr(enc.encodingLimits, "kspace_encoding_step_1", None)
    offset = ny // 2 - int(lim.center) if lim is not None and lim.center is not None else 0
    flags = np.fromiter((int(a.flags) for a in acqs), dtype=np.uint64, count=len(acqs))
    is_ref = has_flag(flags, "IS_PARALLEL_CALIBRATION")
    nx = max(int(a.number_of_samples) for a in acqs)
    nc = int(acqs[0].active_channels)
    groups: dict[int, np.ndarray] = {}
    refs: dict[int, np.ndarray] = {}
    for a, ref in zip(acqs, is_ref, strict=True):
        table = refs if ref else groups
        s = int(a.idx.slice)
        if s not in table:
            table[s] = np.zeros((nc, nx, ny), dtype=np.complex64)
        line = int(a.idx.kspace_encode_step_1) + offset
        if not 0 <= line < ny:
            raise ReconError(f"multiband data: line {line} outside the {ny} encoded lines")
        table[s][:, :, line] = np.asarray(a.data)
    return groups, refs, nx, ny


def reconstruct_sms(
    header: Any,
    acquisitions: list[Any],
    *,
    method: str = "auto",
    backend: str = "numpy",
    whitener: np.ndarray | None = None,
    **options: Any,
) -> list[ReconImage]:
    """Reconstruct an SMS dataset: every true slice from the collapsed groups.

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
        With ``parallelImaging.multiband`` and the multiband user parameters.
    acquisitions : list of ismrmrd.Acquisition
        Imaging lines (collapsed, ``slice`` = group) and the single-band reference
        (``ACQ_IS_PARALLEL_CALIBRATION``, ``slice`` = true slice); no noise scans.
    method : {"auto", "sense", "grappa", "fft"}
        ``auto``/``sense``: slice-SENSE; ``grappa``: split-slice GRAPPA; ``fft``: no
        separation, the collapsed root-sum-of-squares image of each group (``slice`` =
        the group's first slice).
    backend : str
        Recorded; the separation runs on NumPy.
    whitener : ndarray, optional
        Noise prewhitening matrix (coils x coils).
    **options
        ``lamda`` (sense, grappa): relative Tikhonov weight.

    Returns
    -------
    list of ReconImage
        One per true slice (``slice`` = its index, its own position), sorted.

    Raises
    ------
    ReconError
        A method or option SMS data do not support, a missing single-band reference.
    """
    if method not in SMS_METHODS:
        raise ReconError(f"method {method!r} is not available for multiband (SMS) data: use "
                         f"{', '.join(repr(m) for m in SMS_METHODS)}")
    used = SMS_METHODS[method]
    extra = sorted(set(options) - ({"lamda"} if used != "collapsed" else set()))
    if extra:
        raise ReconError(f"option(s) {', '.join(extra)}: not available for multiband data "
                         f"with method {method!r} ({used})")
    from mrharmony.recon.pipeline import _image, _meta

    t0 = time.perf_counter()
    info = multiband_info(header)
    if whitener is not None:
        from mrharmony.recon.io import apply_prewhitening

        acquisitions = apply_prewhitening(acquisitions, whitener)
    groups, refs, _, _ = sort_sms(header, acquisitions)
    enc = encoding_of(header)
    nx = int(enc.reconSpace.matrixSize.x)
    first = {}
    for a in acquisitions:
        first.setdefault((int(a.idx.slice), has_flag(np.array([int(a.flags)], np.uint64),
                                                     "IS_PARALLEL_CALIBRATION")[0]), a)

    def crop(img: np.ndarray) -> np.ndarray:
        return crop_center(img, nx, -2) if img.shape[-2] > nx else img

    lamda = float(options.get("lamda", SENSE_LAMDA if used == "slice-sense" else GRAPPA_LAMDA))
    settings: dict[str, Any] = {
        "method": used, "backend": "numpy", "trajectory": "cartesian",
        "prewhitened": whitener is not None, "multiband_factor": info.factor,
        "caipi_shift": info.shift,
    }
    if backend != "numpy":
        settings["backend_requested"] = backend
    images: list[ReconImage] = []
    for g in sorted(groups):
        k = groups[g].astype(np.complex128)
        acq = first[(g, False)]
        meta = _meta(header, contrast=int(acq.idx.contrast), set_=int(acq.idx.set))
        if used == "collapsed":
            img = crop(np.asarray(sos(ifft_c(k, axes=(-2, -1)))))
            meta["recon"] = {**settings, "seconds": round(time.perf_counter() - t0, 4)}
            images.append(_image(header, acq, img[:, :, None], meta))
            continue
        members = info.members(g)
        missing = [int(s) for s in members if int(s) not in refs]
        if missing:
            raise ReconError(f"multiband data: no single-band reference for slice(s) "
                             f"{missing} (lines flagged ACQ_IS_PARALLEL_CALIBRATION)")
        ref = np.stack([refs[int(s)] for s in members]).astype(np.complex128)
        lines = np.any(ref != 0, axis=(0, 1, 2))
        if used == "slice-sense":
            maps = reference_maps(ref, lines)
            slices = slice_sense(ifft_c(k, axes=(-2, -1)), maps, info.shift, lamda=lamda)
            detail = {"coil_combine": "sense (reference maps)", "map_threshold": MAP_THRESHOLD}
        else:
            kj = slice_grappa(k, ref, lines, info.shift, lamda=lamda)
            slices = np.stack([sos(ifft_c(kj[j], axes=(-2, -1))) for j in range(info.factor)])
            detail = {"coil_combine": "rss", "kernel": list(GRAPPA_KERNEL)}
        for j, s in enumerate(members):
            s = int(s)
            img = crop(np.abs(slices[j]) if used == "slice-sense" else slices[j])
            out = _image(header, acq, img[:, :, None], dict(meta))
            out.slice = s
            out.position = (np.asarray(acq.position[:], dtype=np.float64)
                            + np.asarray(acq.slice_dir[:], dtype=np.float64)
                            * (info.positions_mm[s] - info.positions_mm[g]))
            out.meta["recon"] = {
                **settings, **detail, "lamda": lamda, "slice_group": g,
                "calibration": f"single-band reference, {int(lines.sum())} lines",
                "seconds": round(time.perf_counter() - t0, 4)}
            images.append(out)
    return sorted(images, key=lambda im: (im.slice, im.contrast, im.repetition, im.set))
