"""The reconstruction pipeline: dispatch on trajectory, method and backend.

:func:`reconstruct_acquisitions` is the incremental entry point (the streaming server
calls it with all acquisitions of one slice, or with a whole dataset); noise scans in
the list are used for prewhitening. :func:`reconstruct` runs it on a :class:`RawData`
and optionally fits quantitative maps.

Methods: ``fft`` (zero-filled FFT, POCS partial Fourier, sum of squares), ``grappa``,
``sense`` (CG-SENSE with ESPIRiT maps), ``cs`` (L1-wavelet SENSE), ``tv`` (TV SENSE),
``nufft`` (non-Cartesian gridding). ``auto`` picks ``fft`` for fully sampled Cartesian
data, ``sense`` for undersampled Cartesian data and the trajectory's own recon otherwise.

Accelerated Cartesian data are read from the header and the flags alone: the
acceleration factor is ``encoding.parallelImaging.accelerationFactor`` where it says more
than 1, else the most common gap of the sampled lines; lines flagged
``IS_PARALLEL_CALIBRATION`` (only) never enter the image k-space; the calibration of an
image is the first fully sampled centre block large enough for the kernel among: its own
calibration lines (``..._CALIBRATION`` and ``..._CALIBRATION_AND_IMAGING``: embedded), those
of all repetitions of the slice/contrast/set, those of the slice (a separate reference
scan under other counters), the fully sampled centre of its own lines, and all lines of
all its repetitions (interleaved offsets); ``calibrationMode`` "interleaved" puts the
pooled repetitions first. Each repetition is reconstructed from its own lines. A fully
sampled readout loses its oversampling before GRAPPA/SENSE (encoded -> recon matrix x).
The method, acceleration, calibration, kernel, regularisation and coil combination go to
``meta["recon"]`` (the sidecar's ``ReconstructionSettings``).
Backends: ``numpy``, ``cupy`` (GPU; the same code through :mod:`mrharmony.backend`),
``bart`` (ESPIRiT + ``pics`` through :mod:`mrharmony.recon.bart`: Cartesian ``sense`` and
``cs``; ``fft`` runs on NumPy and the sidecar says so; anything else is refused), ``auto``
(``cupy`` when a GPU is usable, else ``numpy``). Options (``lamda``, ``max_iter``) a
method does not take are refused (:data:`METHOD_OPTIONS`). EPI data run the EPI recon
(:data:`EPI_METHODS`): ``fft`` (and ``auto`` when fully sampled) regrids, corrects the
Nyquist ghost and FFTs; ``grappa``, ``sense`` (and ``auto`` when undersampled) turn the
corrected lines into Cartesian k-space and run the path above; others are refused.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mrharmony.backend import cupy_available, get_array_module, get_xp, to_numpy
from mrharmony.errors import ReconError
from mrharmony.formats.kspace_filter import (
    KSPACE_FILTERS,
    kspace_window,
    normalised_kspace_radius,
)
from mrharmony.formats.raw import RawData, encoding_of
from mrharmony.recon.cartesian import crop_center, fft_c, homodyne, ifft_c, pocs
from mrharmony.recon.coils import combine, espirit_maps, prescan_gain, sos, walsh_maps
from mrharmony.recon.image import ReconImage
from mrharmony.recon.io import (
    _sort_cartesian,
    apply_prewhitening,
    check_not_empty,
    noise_prewhitener,
    split_special,
)

__all__ = [
    "BACKENDS",
    "GRAPPA_EDGES",
    "METHODS",
    "METHOD_OPTIONS",
    "RECON_CHAIN_DEFAULTS",
    "RECON_CHAIN_VALUES",
    "fit_maps",
    "reconstruct",
    "reconstruct_acquisitions",
    "resolve_backend",
]

METHODS = ("auto", "fft", "grappa", "sense", "cs", "tv", "nufft")
BACKENDS = ("auto", "numpy", "cupy", "bart")
MAPS = ("t1", "t2", "adc", "dti")


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``cupy`` when CuPy sees a GPU, else ``numpy``; others are checked."""
    if backend not in BACKENDS:
        raise ReconError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "cupy" if cupy_available() else "numpy"
    if backend == "cupy" and not cupy_available():
        raise ReconError("backend 'cupy': CuPy with a CUDA device is not available")
    if backend == "bart":
        from mrharmony.recon.bart import bart_available

        if not bart_available():
            raise ReconError("backend 'bart': the 'bart' executable is not on PATH")
    return backend


def _trajectory(header: Any) -> str:
    traj = encoding_of(header).trajectory
    return str(getattr(traj, "value", traj)).lower()


#: header user parameters (formats.layout) -> image meta: a spin-echo train's pulses
_PULSE_KEYS = {"RefocusingFlipAngle": "refocusing_flip_deg",
               "RfTimeBwProduct": "rf_time_bw_product", "RfApodization": "rf_apodization"}


def _meta(header: Any, *, contrast: int, set_: int) -> dict[str, Any]:
    """TE/TR/TI (ms), flip, sequence name, field strength from the header."""
    meta: dict[str, Any] = {}
    params = getattr(header, "sequenceParameters", None)

    def pick(values, index):
        if not values:
            return None
        return float(values[min(index, len(values) - 1)])

    if params is not None:
        te = pick(params.TE, contrast)
        tr = pick(params.TR, 0)
        ti = pick(params.TI, set_)
        flip = pick(params.flipAngle_deg, 0)
        for key, val in (("te_ms", te), ("tr_ms", tr), ("ti_ms", ti), ("flip_deg", flip)):
            if val is not None:
                meta[key] = val
        if params.sequence_type:
            meta["sequence_name"] = str(params.sequence_type)
        if params.diffusion:
            d = params.diffusion[min(set_, len(params.diffusion) - 1)]
            meta["bvalue_s_mm2"] = float(d.bvalue)
            g = d.gradientDirection
            meta["bvec"] = [float(g.rl), float(g.ap), float(g.fh)]
    user = getattr(header, "userParameters", None)
    for par in (getattr(user, "userParameterDouble", None) or []):
        key = _PULSE_KEYS.get(str(par.name))
        if key is not None:
            meta[key] = float(par.value)
    system = getattr(header, "acquisitionSystemInformation", None)
    if system is not None:
        if system.systemFieldStrength_T:
            meta["field_strength_t"] = float(system.systemFieldStrength_T)
        if system.systemVendor:
            meta["manufacturer"] = str(system.systemVendor)
        if system.systemModel:
            meta["model"] = str(system.systemModel)
    return meta


def _image(header: Any, ref: Any, data: np.ndarray, meta: dict[str, Any]) -> ReconImage:
    enc = encoding_of(header, ref)
    fov = enc.reconSpace.fieldOfView_mm
    return ReconImage(
        data=data,
        slice=int(ref.idx.slice),
        contrast=int(ref.idx.contrast),
        repetition=int(ref.idx.repetition),
        set=int(ref.idx.set),
        average=0,
        position=np.asarray(ref.position[:], dtype=np.float64),
        read_dir=np.asarray(ref.read_dir[:]),
        phase_dir=np.asarray(ref.phase_dir[:]),
        slice_dir=np.asarray(ref.slice_dir[:]),
        field_of_view_mm=np.array([fov.x, fov.y, fov.z or 1.0], dtype=np.float64),
        meta=meta,
    )


def _crop_to_recon(x, header: Any, ref: Any, first_spatial: int):
    """Crop readout oversampling (and any larger encoded y/z) to the recon matrix."""
    enc = encoding_of(header, ref)
    target = (enc.reconSpace.matrixSize.x, enc.reconSpace.matrixSize.y,
              enc.reconSpace.matrixSize.z or 1)
    for i, n in enumerate(target):
        ax = first_spatial + i
        if n and x.shape[ax] > n:
            x = crop_center(x, int(n), ax)
    return x


def _drop_readout_oversampling(k, size: int):
    """k-space ``(coils, nx, ...)`` with the readout cut to the central ``size`` points of
    the image (FFT along x, crop, FFT back; image amplitudes unchanged)."""
    if k.shape[1] <= size:
        return k
    return fft_c(crop_center(ifft_c(k, axes=(1,)), size, 1), axes=(1,)).astype(np.complex64)


# -------------------------------------------------------------- parallel imaging

_PARALLEL = ("grappa", "sense", "cs", "tv")

#: The recon chain around a method (coil combination, k-space filter, partial-Fourier
#: completion, intensity normalisation): each option's allowed values. Numeric options
#: (``filter_radius``, ``filter_width``: the Fermi filter's, fractions of ``k_max``) are
#: checked to be > 0.
RECON_CHAIN_VALUES: dict[str, tuple[str, ...]] = {
    "coil_combine": ("rss", "adaptive", "sense"),
    "filter": KSPACE_FILTERS,
    "partial_fourier_method": ("zero", "pocs", "homodyne"),
    "intensity_normalization": ("none", "prescan", "max"),
}
#: What the recon does when an option is not given (today's behaviour): sum of squares,
#: no filter, POCS where lines are missing on one side, no normalisation.
RECON_CHAIN_DEFAULTS: dict[str, Any] = {
    "coil_combine": "rss", "filter": "none", "filter_radius": 0.9, "filter_width": 0.05,
    "partial_fourier_method": "pocs", "intensity_normalization": "none",
}
_FILTER = ("filter", "filter_radius", "filter_width")
_CHAIN = ("coil_combine", *_FILTER, "partial_fourier_method", "intensity_normalization")

#: Options each method takes (``**options`` of :func:`reconstruct_acquisitions`); any
#: other is refused with a :class:`ReconError` naming it. SENSE-type methods combine the
#: coils through their maps and fill missing lines by the model, so they take neither
#: ``coil_combine`` nor ``partial_fourier_method``. EPI and gridded non-Cartesian coil
#: images get the partial-Fourier completion only when it is asked for (then along ky
#: where whole k-space rows are empty on one side; gridded data have none), so that
#: their default stays the EPI recon's zero filling.
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "fft": _CHAIN,
    "nufft": _CHAIN,
    "epi": _CHAIN,
    "grappa": ("lamda", "grappa_edge", *_CHAIN),
    **dict.fromkeys(("sense", "cs", "tv"),
                    ("lamda", "max_iter", *_FILTER, "intensity_normalization")),
}
_METHOD_ONLY = ("lamda", "max_iter")
#: GRAPPA's matrix-edge handling (:func:`mrharmony.recon.parallel.grappa`'s ``edge``):
#: "fit" one-sided edge kernels (default), "zero" interior kernels with zeros outside.
GRAPPA_EDGES = ("fit", "zero")  # the first is the default


def _check_chain_values(options: dict[str, Any]) -> None:
    """Refuse an unknown value of a recon-chain option, naming the option and the choices."""
    for name, allowed in {**RECON_CHAIN_VALUES, "grappa_edge": GRAPPA_EDGES}.items():
        if name in options and options[name] not in allowed:
            raise ReconError(f"option {name} = {options[name]!r}: expected one of "
                             f"{', '.join(allowed)}")
    for name in ("filter_radius", "filter_width"):
        if name in options:
            value = options[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 < float(value) <= 2:
                raise ReconError(f"option {name} = {value!r}: expected a number in (0, 2] "
                                 "(fraction of k_max)")
            if options.get("filter") != "fermi":
                raise ReconError(f"option {name} is the Fermi filter's: give filter = "
                                 "'fermi' with it")


def _chain(options: dict[str, Any]) -> dict[str, Any]:
    """The recon-chain options in effect: the caller's, else :data:`RECON_CHAIN_DEFAULTS`."""
    return {k: options.get(k, v) for k, v in RECON_CHAIN_DEFAULTS.items()}


def _filter_weights(shape: tuple[int, ...], chain: dict[str, Any]) -> np.ndarray | None:
    """Apodisation weights on a centred k-space grid of ``shape`` (None: no filter)."""
    if chain["filter"] == "none":
        return None
    return kspace_window(normalised_kspace_radius(tuple(shape)), chain["filter"],
                         radius=float(chain["filter_radius"]),
                         width=float(chain["filter_width"]))


def _filter_images(x, chain: dict[str, Any], *, first_spatial: int):
    """Apply the k-space filter to images ``(..., *spatial)`` (FFT, window, inverse FFT)."""
    spatial = tuple(x.shape[first_spatial:])
    w = _filter_weights(spatial, chain)
    if w is None:
        return x
    xp = get_array_module(x)
    axes = tuple(first_spatial + i for i, n in enumerate(spatial) if n > 1)
    return ifft_c(fft_c(x, axes=axes) * xp.asarray(w), axes=axes)


def _complete_partial(k, sampled: np.ndarray, *, axis: int, how: str):
    """Complete one-sided k-space along ``axis``: ``zero`` (as it is), ``pocs``,
    ``homodyne`` (its image, phase kept, back to k-space)."""
    if how == "pocs":
        return pocs(k, sampled, axis=axis, image_axes=(1, 2, 3))
    if how == "homodyne":
        img = homodyne(k, sampled, axis=axis, image_axes=(1, 2, 3), keep_phase=True)
        return fft_c(img, axes=(1, 2, 3)).astype(np.complex64)
    return k


def _complete_images(coil_img, how: str, settings: dict[str, Any]):
    """Partial-Fourier completion of coil images ``(coils, nx, ny, nz)`` whose k-space rows
    (ky) are empty on one side (EPI with partial Fourier); others are returned as they are."""
    k = fft_c(coil_img, axes=(1, 2, 3))
    ny = k.shape[2]
    rows = np.asarray(to_numpy(get_array_module(k).abs(k).sum(axis=(0, 1, 3)))) > 0
    if ny < 4 or not rows.any():
        return coil_img
    lo, hi = np.flatnonzero(rows)[[0, -1]]
    if abs((ny // 2 - lo) - (hi - ny // 2)) <= 2:
        settings["partial_fourier_method"] = how
        return coil_img
    k = _complete_partial(k, rows, axis=2, how=how)
    settings["partial_fourier_method"] = how
    settings["partial_fourier"] = _pf_label(how, "ky")
    return ifft_c(k, axes=(1, 2, 3))


def _pf_label(how: str, axis: str) -> str:
    return {"pocs": "pocs", "homodyne": "homodyne", "zero": "zero-filled"}[how] + f"-{axis}"


def _combine_chain(coil_img, chain: dict[str, Any], backend: str, settings: dict[str, Any]):
    """Coil combination by ``chain["coil_combine"]`` of ``(coils, nx, ny, nz)`` images;
    the magnitude (float32; one coil: the coil image as it is)."""
    nc = coil_img.shape[0]
    how = chain["coil_combine"]
    if nc == 1:
        settings["coil_combination"] = "single coil"
        return coil_img[0]
    if how == "rss":
        settings["coil_combination"] = "sum of squares"
        return sos(coil_img)
    xp = get_array_module(coil_img)
    if how == "adaptive":
        maps = walsh_maps(coil_img)
        settings["coil_combination"] = "adaptive (walsh maps, roemer)"
    else:
        kk = fft_c(coil_img, axes=(1, 2, 3))
        full = ((0, kk.shape[2]), (0, kk.shape[3]))
        maps, widths = _sens_maps(kk, full, backend, tuple(kk.shape[1:]))
        settings["coil_combination"] = "sense (espirit maps, roemer)"
        settings["coil_maps"] = {"method": "espirit",
                                 "calib_width": [int(w) for w in widths],
                                 **{n: v for n, v in _ESPIRIT.items()
                                    if n != "max_calib_width"}}
    return xp.abs(combine(coil_img, xp.asarray(maps))).astype(np.float32)


def _normalise(img, chain: dict[str, Any], profile_images, settings: dict[str, Any]):
    """Intensity normalisation of the combined image: ``prescan`` (receive-profile gain
    from ``profile_images``, :func:`~mrharmony.recon.coils.prescan_gain`) or ``max``."""
    how = chain["intensity_normalization"]
    xp = get_array_module(img)
    if how == "prescan":
        gain = prescan_gain(profile_images)
        settings["intensity_normalization_gain_range"] = [
            round(float(gain.min()), 4), round(float(gain.max()), 4)]
        return img * xp.asarray(gain)
    if how == "max":
        peak = float(xp.max(xp.abs(img)))
        return img / peak if peak > 0 else img
    return img


def _image_from_kspace(k, chain: dict[str, Any], backend: str, settings: dict[str, Any]):
    """The recon chain after k-space is complete (Cartesian ``fft`` and ``grappa``): the
    k-space filter, the inverse FFT, the coil combination and the intensity
    normalisation of coil k-space ``(coils, nx, ny, nz)``."""
    w = _filter_weights(tuple(k.shape[1:]), chain)
    if w is not None:
        k = k * get_array_module(k).asarray(w)[None]
    coil_img = ifft_c(k, axes=(1, 2, 3))
    img = _combine_chain(coil_img, chain, backend, settings)
    if chain["intensity_normalization"] != "none":
        img = _normalise(img, chain, coil_img, settings)
    return img


def _record_chain(settings: dict[str, Any], chain: dict[str, Any], taken: tuple[str, ...],
                  ) -> None:
    """The recon-chain choices in effect, for the sidecar."""
    for name in ("coil_combine", "filter", "partial_fourier_method",
                 "intensity_normalization"):
        if name in taken:
            settings[name] = chain[name]
    if chain["filter"] == "fermi":
        settings["filter_radius"] = float(chain["filter_radius"])
        settings["filter_width"] = float(chain["filter_width"])


#: Methods for EPI data: ``fft`` (and ``auto`` on fully sampled data) runs
#: :func:`mrharmony.recon.epi.reconstruct_epi` (ramp regridding, Nyquist-ghost correction,
#: FFT, missing lines zero); ``grappa`` and ``sense`` (and ``auto`` on undersampled data)
#: turn the lines into Cartesian k-space (:func:`mrharmony.recon.epi.epi_kspace`) and run
#: the Cartesian parallel-imaging recon on them. Any other method is refused.
EPI_METHODS = ("auto", "fft", "grappa", "sense")

#: Methods each backend runs itself (``bart``: ESPIRiT maps and ``pics`` on Cartesian data).
_BART_METHODS = ("sense", "cs")


def _check_options(method: str, options: dict[str, Any], *, asked: str | None = None) -> None:
    """Refuse options that ``method`` does not take (``asked``: the method requested,
    when it resolved to another)."""
    extra = sorted(set(options) - set(METHOD_OPTIONS[method]))
    if extra:
        via = f" (from {asked!r})" if asked and asked != method else ""
        takes = ", ".join(METHOD_OPTIONS[method]) or "none"
        raise ReconError(f"method {method!r}{via} does not take option(s) "
                         f"{', '.join(extra)} (it takes: {takes})")
_GRAPPA_KERNEL = {"kernel_x": 5, "kernel_blocks": 4}
_ESPIRIT = {"kernel_width": 6, "thresh": 0.02, "crop": 0.95, "max_calib_width": 24}


def _parallel_header(header: Any, ref: Any) -> tuple[tuple[int, int] | None, str | None]:
    """``(accelerationFactor step_1, step_2)`` and ``calibrationMode`` of the encoding."""
    pi = getattr(encoding_of(header, ref), "parallelImaging", None)
    if pi is None:
        return None, None
    factor = None
    af = getattr(pi, "accelerationFactor", None)
    if af is not None:
        factor = (int(af.kspace_encoding_step_1 or 1), int(af.kspace_encoding_step_2 or 1))
    mode = getattr(pi, "calibrationMode", None)
    return factor, None if mode is None else str(getattr(mode, "value", mode)).lower()


def _acceleration(header: Any, ref: Any, mask: np.ndarray) -> tuple[tuple[int, int], str]:
    """Acceleration along (ky, kz): the header's ``accelerationFactor`` where it says more
    than 1, else inferred from the sampled lines; and where it came from."""
    from mrharmony.recon.parallel import acceleration_from_mask

    factor, _ = _parallel_header(header, ref)
    inferred = acceleration_from_mask(mask) if mask.shape[1] > 1 else (
        acceleration_from_mask(mask[:, 0])[0], 1)
    accel, source = [], []
    for ax in range(2):
        if factor is not None and (factor[ax] > 1 or inferred[ax] == 1):
            accel.append(factor[ax])
            source.append("header")
        else:  # no factor in the header, or it says 1 where lines are missing
            accel.append(int(inferred[ax]))
            source.append("sampling pattern")
    return (accel[0], accel[1]), " / ".join(dict.fromkeys(source))


def _has_gaps(mask: np.ndarray) -> bool:
    """Whether lines are missing inside the bounding box of the sampled ones (> 5 %)."""
    ys, zs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, zs.min():zs.max() + 1]
    return bool(box.mean() < 0.95)


def _centre_box(mask: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """A maximal fully sampled box of ``(ny, nz)`` cells around the centre
    ``(ny // 2, nz // 2)``, as ``((y0, y1), (z0, z1))`` half-open; None if the centre is
    not sampled."""
    ny, nz = mask.shape
    lo = [ny // 2, nz // 2]
    hi = [ny // 2 + 1, nz // 2 + 1]
    if not mask[lo[0], lo[1]]:
        return None
    grown = True
    while grown:
        grown = False
        for ax, n in ((0, ny), (1, nz)):
            for side in (-1, 1):
                new = lo[ax] - 1 if side < 0 else hi[ax]
                if not 0 <= new < n:
                    continue
                edge = mask[new, lo[1]:hi[1]] if ax == 0 else mask[lo[0]:hi[0], new]
                if edge.all():
                    if side < 0:
                        lo[ax] = new
                    else:
                        hi[ax] = new + 1
                    grown = True
    return (lo[0], hi[0]), (lo[1], hi[1])


def _mean_of(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray] | None:
    """Average of several zero-filled k-spaces ``(k, mask)``, per sampled cell."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    total = np.zeros_like(parts[0][0])
    count = np.zeros(parts[0][1].shape, np.float32)
    for k, m in parts:
        total += k
        count += m
    hit = count > 0
    total[:, :, hit] /= count[hit]
    return total, hit


def _select_calibration(key, buf, buffers, calibration, mode: str | None, need: tuple[int, int]):
    """Calibration k-space for one image: the first candidate whose fully sampled centre
    box is at least ``need`` lines (ky, kz).

    Candidates: this image's calibration lines (``IS_PARALLEL_CALIBRATION`` and
    ``..._AND_IMAGING``); those of all repetitions of its slice/contrast/set; those of its
    slice (a separate reference scan with other counters); the fully sampled centre of
    its own lines; all lines of all its repetitions (each with another offset). With
    ``calibrationMode`` "interleaved" the pooled repetitions come first.

    Returns
    -------
    tuple
        ``(kspace (coils, nx, ny, nz), box, description)``.
    """
    slc, con, _rep, st = key
    same = [kk for kk in calibration if (kk[0], kk[1], kk[3]) == (slc, con, st)]
    cands = {
        "calibration lines of this image": lambda: (
            (calibration[key].kspace, calibration[key].mask) if key in calibration else None),
        "calibration lines of all repetitions": lambda: _mean_of(
            [(calibration[kk].kspace, calibration[kk].mask) for kk in same]),
        "calibration lines of the slice": lambda: _mean_of(
            [(c.kspace, c.mask) for kk, c in calibration.items() if kk[0] == slc]),
        "fully sampled centre of this image": lambda: (buf.kspace, buf.mask),
        "lines of all repetitions": lambda: _mean_of(
            [(b.kspace, b.mask) for kk, b in buffers.items()
             if (kk[0], kk[1], kk[3]) == (slc, con, st)]
            + [(calibration[kk].kspace, calibration[kk].mask) for kk in same
               if kk not in buffers]),
    }
    order = list(cands)
    if mode == "interleaved":
        order = [order[1], order[4], order[0], order[2], order[3]]
    tried = []
    for name in order:
        got = cands[name]()
        if got is None:
            continue
        k, m = got
        box = _centre_box(m)
        widths = (0, 0) if box is None else (box[0][1] - box[0][0], box[1][1] - box[1][0])
        tried.append(f"{name}: {widths[0]} x {widths[1]}")
        if box is not None and widths[0] >= need[0] and widths[1] >= need[1]:
            return k, box, name
    raise ReconError(
        f"slice {slc}: no calibration region of at least {need[0]} x {need[1]} fully sampled "
        f"lines (ky x kz) around the k-space centre for parallel imaging ({'; '.join(tried)})"
    )


def _centred_width(lo: int, hi: int, n: int, cap: int) -> int:
    """Largest width <= cap whose centred window ``n//2 - w//2 ...`` lies in ``[lo, hi)``."""
    c = n // 2
    w = min(cap, hi - lo)
    while w > 1 and not (c - w // 2 >= lo and c - w // 2 + w <= hi):
        w -= 1
    return max(w, 1)


def _sens_maps(calib_k, box, backend: str, shape: tuple[int, int, int]):
    """ESPIRiT maps ``(coils, nx, ny, nz)`` from the calibration box of ``calib_k``."""
    xp = get_array_module(calib_k)
    (y0, y1), (z0, z1) = box
    cal = xp.zeros_like(calib_k)
    cal[:, :, y0:y1, z0:z1] = calib_k[:, :, y0:y1, z0:z1]
    cap = _ESPIRIT["max_calib_width"]
    widths = (min(cap, shape[0]), _centred_width(y0, y1, shape[1], cap),
              _centred_width(z0, z1, shape[2], cap))
    nc = calib_k.shape[0]
    if backend == "bart":
        from mrharmony.recon.bart import ecalib

        kk = to_numpy(cal)
        width = min(widths[:2] + ((widths[2],) if shape[2] > 1 else ()))
        maps = ecalib(kk if kk.shape[3] > 1 else kk[..., 0], calib_width=width)
        return maps.reshape(nc, *shape), widths
    keep = [i for i, n in enumerate(shape) if n > 1]
    spatial = tuple(shape[i] for i in keep)
    maps = espirit_maps(cal.reshape(nc, *spatial), spatial,
                        calib_width=tuple(widths[i] for i in keep),
                        kernel_width=_ESPIRIT["kernel_width"], thresh=_ESPIRIT["thresh"],
                        crop=_ESPIRIT["crop"])
    return maps.reshape(nc, *shape), widths


def _grappa_blocks(accel: tuple[int, int]) -> int | tuple[int, int]:
    """GRAPPA source blocks: ``kernel_blocks`` along one accelerated axis, 2 x 2 (as many
    sources) when ky and kz are both accelerated (see :func:`_grappa_fill`)."""
    return (2, 2) if min(accel) > 1 else _GRAPPA_KERNEL["kernel_blocks"]


def _grappa_fill(k, calib_k, box, mask: np.ndarray, accel: tuple[int, int], lamda: float,
                 edge: str):
    """GRAPPA on ``(coils, nx, ny, nz)``: 2-D; 3-D in hybrid (x, ky, z) space when kz is
    fully sampled in the data and the calibration; else with 3-D (kx, ky, kz) kernels,
    of 2 x 2 source blocks when ky and kz are both undersampled: 4 x 4 blocks (16 sources
    x 5 kx x coils unknowns) overfit a calibration block of 8 partitions (retrospective
    R = 2 x 2 of the gre3d brain simulated with 128 isochromats, 32 coils, ACS 24 x 8:
    NRMSE 0.090 with 4 x 4, 0.029 with 2 x 2)."""
    from mrharmony.recon.parallel import grappa

    xp = get_array_module(k)
    (y0, y1), (z0, z1) = box
    cal = calib_k[:, :, y0:y1, z0:z1]
    nz = k.shape[3]
    opts = dict(_GRAPPA_KERNEL, lamda=lamda, edge=edge)
    if nz == 1:
        return grappa(k[..., 0], cal[..., 0], mask=mask[:, 0], acceleration=accel[0],
                      **opts)[..., None], "2d (kx, ky)"
    if accel[1] == 1 and z1 - z0 == nz and bool(np.all(mask == mask[:, :1])):
        hybrid, hcal = ifft_c(k, axes=(3,)), ifft_c(cal, axes=(3,))
        out = xp.empty_like(hybrid)
        for z in range(nz):
            out[..., z] = grappa(hybrid[..., z], hcal[..., z], mask=mask[:, 0],
                                 acceleration=accel[0], **opts)
        return fft_c(out, axes=(3,)), "hybrid (kx, ky) per z"
    opts["kernel_blocks"] = _grappa_blocks(accel)
    return grappa(k, cal, mask=mask, acceleration=accel, **opts), "3d (kx, ky, kz)"


def _recon_cartesian(header: Any, key, buf: Any, buffers, calibration, *, method: str,
                     backend: str, options: dict):
    xp = get_xp("cuda") if backend == "cupy" else np
    k = xp.asarray(buf.kspace)
    nc, nx, ny, nz = k.shape
    mask = buf.mask  # (ny, nz)
    lines_y = mask.any(axis=1)
    lo_y, hi_y = np.flatnonzero(lines_y)[[0, -1]]
    accel, accel_source = _acceleration(header, buf.reference, mask)
    undersampled = max(accel) > 1 and _has_gaps(mask)
    tol = max(2, accel[0])
    partial_y = abs((ny // 2 - lo_y) - (hi_y - ny // 2)) > tol
    ro = buf.readout_mask
    ro_idx = np.flatnonzero(ro)
    partial_x = abs((nx // 2 - ro_idx[0]) - (ro_idx[-1] - nx // 2)) > 2
    settings: dict[str, Any] = {}
    if method == "auto":
        if undersampled and nc == 1:
            raise ReconError(
                f"slice {key[0]}: the data are undersampled (R={accel[0]}x{accel[1]}) and "
                "have 1 receive coil: parallel imaging needs several (a zero-filled FFT "
                "would alias; choose --method fft to get it anyway)")
        method = "sense" if undersampled else "fft"
        settings["auto"] = (f"undersampled (R={accel[0]}x{accel[1]}), {nc} coils: sense"
                            if undersampled else "fully sampled: fft")
        _check_options(method, options, asked="auto")
    if method in _PARALLEL and nc == 1:
        raise ReconError(f"method {method!r} needs several receive coils; the data have 1")
    if method == "nufft":
        raise ReconError("method 'nufft' needs non-Cartesian data; these data are Cartesian")
    if backend == "bart" and method in ("grappa", "tv"):
        raise ReconError(f"backend 'bart': method {method!r} is not available there (bart "
                         f"runs {', '.join(_BART_METHODS)}); use backend numpy or cupy")
    settings.update({"method": method, "backend": backend})
    if backend == "bart" and method == "fft":  # no bart step in an FFT recon: say so
        settings.update({"backend": "numpy", "backend_requested": "bart"})
    if undersampled or method in _PARALLEL:
        settings["acceleration"] = [int(accel[0]), int(accel[1])]
        settings["acceleration_source"] = accel_source
    t0 = time.perf_counter()
    chain = _chain(options)
    _record_chain(settings, chain, METHOD_OPTIONS[method])
    pf = chain["partial_fourier_method"]
    if method == "fft":
        if partial_y:
            k = _complete_partial(k, lines_y, axis=2, how=pf)
            settings["partial_fourier"] = _pf_label(pf, "ky")
        if partial_x:
            k = _complete_partial(k, ro, axis=1, how=pf)
            settings["partial_fourier_readout"] = _pf_label(pf, "kx")
        img = _image_from_kspace(k, chain, backend, settings)
        if undersampled:
            settings["zero_filled"] = True
    else:
        kb = _GRAPPA_KERNEL["kernel_blocks"]
        need = tuple(max(8, r * (kb - 1) + 2) if r > 1 else min(n, 3)
                     for r, n in zip(accel, (ny, nz), strict=True))
        calibrate = method != "grappa" or undersampled
        if calibrate:
            _, mode = _parallel_header(header, buf.reference)
            cal_np, box, source = _select_calibration(key, buf, buffers, calibration, mode,
                                                      need)
            settings["calibration"] = {
                "mode": mode or "not stated", "source": source,
                "lines": [int(box[0][1] - box[0][0]), int(box[1][1] - box[1][0])],
            }
            calib_k = xp.asarray(cal_np)
        enc = encoding_of(header, buf.reference)
        rx = int(enc.reconSpace.matrixSize.x or nx)
        if rx < nx and bool(ro.all()):  # readout fully sampled: drop oversampling first
            k = _drop_readout_oversampling(k, rx)
            if calibrate:
                calib_k = _drop_readout_oversampling(calib_k, rx)
            settings["readout_oversampling"] = f"removed before reconstruction ({nx} -> {rx})"
        if method == "grappa":
            lamda = float(options.get("lamda", 1e-3))
            edge = options.get("grappa_edge", GRAPPA_EDGES[0])
            if undersampled:
                k, geometry = _grappa_fill(k, calib_k, box, mask, accel, lamda, edge)
                blocks = _grappa_blocks(accel)
                settings["grappa"] = {
                    "kernel_kx": _GRAPPA_KERNEL["kernel_x"],
                    "kernel_lines": list(blocks) if isinstance(blocks, tuple) else blocks,
                    "lamda": lamda, "kernel": geometry, "edge": edge,
                }
            if partial_y:
                k = _complete_partial(
                    k, np.abs(np.arange(ny) - (lo_y + hi_y) / 2) <= (hi_y - lo_y) / 2,
                    axis=2, how=pf)
                settings["partial_fourier"] = _pf_label(pf, "ky")
            img = _image_from_kspace(k, chain, backend, settings)
        else:
            maps, widths = _sens_maps(calib_k, box, backend, tuple(k.shape[1:]))
            settings["coil_maps"] = {
                "method": "espirit (bart ecalib)" if backend == "bart" else "espirit",
                "calib_width": [int(w) for w in widths],
                **{n: v for n, v in _ESPIRIT.items() if n != "max_calib_width"},
            }
            if backend != "bart":  # the kernel per axis: at most half the calibration width
                settings["coil_maps"]["kernel_width"] = [
                    min(_ESPIRIT["kernel_width"], max(1, int(w) // 2)) for w in widths]
            opts = _iterative_defaults(method, backend, options)
            img = _iterative(k, xp.asarray(maps), mask, method=method, backend=backend,
                             options=opts)
            settings.update(opts)
            settings["coil_combination"] = "sense (espirit maps)"
            img = _filter_images(img, chain, first_spatial=0)
            if chain["intensity_normalization"] != "none":
                (y0, y1), (z0, z1) = box
                low = xp.zeros_like(calib_k)
                low[:, :, y0:y1, z0:z1] = calib_k[:, :, y0:y1, z0:z1]
                img = _normalise(img, chain, ifft_c(low, axes=(1, 2, 3)), settings)
    settings["seconds"] = round(time.perf_counter() - t0, 4)
    img = _crop_to_recon(img, header, buf.reference, 0)
    return to_numpy(img), settings


def _iterative_defaults(method: str, backend: str, options: dict) -> dict[str, Any]:
    """``lamda`` and ``max_iter`` of an iterative method, the caller's or the default."""
    from mrharmony.recon.parallel import LAMDA_DEFAULTS

    defaults = {m: (LAMDA_DEFAULTS[m], it) for m, it in (("sense", 30), ("cs", 50), ("tv", 50))}
    if backend == "bart":  # passed to BART pics as they are (its own data scaling)
        defaults = {"sense": (1e-4, 30), "cs": (1e-3, 50), "tv": (1e-3, 50)}
    lamda, iters = defaults[method]
    return {"lamda": float(options.get("lamda", lamda)),
            "max_iter": int(options.get("max_iter", iters))}


def _iterative(k, maps, mask, *, method: str, backend: str, options: dict):
    from mrharmony.recon import parallel

    nz = k.shape[3]
    squeeze = nz == 1
    kk = k[..., 0] if squeeze else k
    mm = maps[..., 0] if squeeze else maps
    msk = mask[:, 0][None, :] if squeeze else mask
    if backend == "bart":
        from mrharmony.recon.bart import pics

        if method == "sense":
            img = pics(to_numpy(kk), to_numpy(mm), l2=options.get("lamda", 1e-4),
                       iterations=options.get("max_iter", 30))
        elif method == "cs":
            img = pics(to_numpy(kk), to_numpy(mm), l1_wavelet=options.get("lamda", 1e-3),
                       iterations=options.get("max_iter", 50))
        else:  # pragma: no cover - refused in _recon_cartesian
            raise ReconError(f"backend 'bart': method {method!r} is not available (sense, cs)")
    elif method == "sense":
        img = parallel.sense_cg(kk, mm, msk, lamda=options.get("lamda", 0.0),
                                max_iter=options.get("max_iter", 30))
    elif method == "cs":
        img = parallel.sense_l1_wavelet(kk, mm, msk, lamda=options.get("lamda", 3e-4),
                                        max_iter=options.get("max_iter", 50))
    elif method == "tv":
        img = parallel.sense_tv(kk, mm, msk, lamda=options.get("lamda", 3e-4),
                                max_iter=options.get("max_iter", 50))
    else:
        raise ReconError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    return img[..., None] if squeeze else img


def _group(acqs: list[Any]) -> dict[tuple[int, int, int, int], list[Any]]:
    groups: dict[tuple[int, int, int, int], list[Any]] = {}
    for a in acqs:
        key = (int(a.idx.slice), int(a.idx.contrast), int(a.idx.repetition), int(a.idx.set))
        groups.setdefault(key, []).append(a)
    return groups


def _combine_coils(coil_img, nc: int):
    if coil_img.shape[0] == 1:
        return coil_img[0]
    return sos(coil_img)


def reconstruct_acquisitions(
    header: Any,
    acquisitions: list[Any],
    *,
    method: str = "auto",
    backend: str = "numpy",
    noise: list[Any] | None = None,
    **options: Any,
) -> list[ReconImage]:
    """Reconstruct a list of acquisitions (one slice or a whole dataset) into images.

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
        Dataset header (encoding, sequence parameters, system).
    acquisitions : list of ismrmrd.Acquisition
        Imaging, calibration and navigator lines; noise scans among them are used for
        prewhitening.
    method : str
        One of :data:`METHODS`.
    backend : str
        One of :data:`BACKENDS`.
    noise : list of ismrmrd.Acquisition, optional
        Noise scans received earlier (a streaming server keeps them from the start of
        the measurement and passes them with every slice); added to those in the list.
    **options
        Per method (:data:`METHOD_OPTIONS`): ``lamda`` (relative regularisation weight,
        :mod:`mrharmony.recon.parallel`; GRAPPA: Tikhonov weight of the kernel fit
        relative to ``trace(A^H A) / n``; BART: passed to ``pics`` as it is), ``max_iter``,
        ``grappa_edge`` (GRAPPA's matrix-edge kernels, :data:`GRAPPA_EDGES`: "fit"
        one-sided kernels, the default; "zero" the interior kernels with zeros outside,
        whose noise follows :func:`~mrharmony.recon.parallel.grappa_g_factor`).
        The recon chain (:data:`RECON_CHAIN_VALUES`; defaults
        :data:`RECON_CHAIN_DEFAULTS`, today's behaviour): ``coil_combine`` ("rss",
        "adaptive": Walsh maps + Roemer, "sense": ESPIRiT maps + Roemer), ``filter``
        (k-space apodisation "none", "hamming", "hanning", "fermi", the windows of
        :mod:`mrharmony.formats.kspace_filter`, with ``filter_radius``/``filter_width``
        for "fermi"), ``partial_fourier_method`` ("zero", "pocs", "homodyne"),
        ``intensity_normalization`` ("none", "prescan": receive-profile correction against
        a virtual body coil, :func:`~mrharmony.recon.coils.prescan_gain`; "max": peak 1).
        An option the method does not take is refused, never dropped; with ``auto`` it
        is checked against the method chosen. The choices in effect go to the sidecar.

    Returns
    -------
    list of ReconImage
        One per ``(slice, contrast, repetition, set)``, sorted by those counters.

    Raises
    ------
    ReconError
        Unknown method/backend, a method the data or the backend do not support (``bart``
        runs Cartesian ``fft`` (on NumPy, as the sidecar says), ``sense`` and ``cs``), or
        an option the method does not take.
    RawDataError
        Inconsistent acquisitions.
    """
    if method not in METHODS:
        raise ReconError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    known = list(dict.fromkeys(o for opts in METHOD_OPTIONS.values() for o in opts))
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ReconError(f"option(s) {', '.join(unknown)}: no method takes them (options: "
                         f"{', '.join(known)})")
    _check_chain_values(options)
    if method != "auto" and method in METHOD_OPTIONS:
        _check_options(method, options)
    backend = resolve_backend(backend)
    check_not_empty(acquisitions)
    parts = split_special(acquisitions)
    if not parts["imaging"]:
        raise ReconError("no imaging acquisitions to reconstruct")
    dwell = float(parts["imaging"][0].sample_time_us) or None
    whitener = noise_prewhitener(parts["noise"] + list(noise or []), dwell_us=dwell)
    traj = _trajectory(header)
    from mrharmony.recon.sms import multiband_factor, reconstruct_sms
    if traj == "cartesian" and multiband_factor(header) > 1:  # SMS: slice separation
        return reconstruct_sms(header, parts["imaging"], method=method, backend=backend,
                               whitener=whitener, **options)
    if traj == "epi" and method not in EPI_METHODS:
        raise ReconError(
            f"method {method!r} is not available for epi data: the EPI recon (ramp "
            "regridding, Nyquist-ghost correction, then FFT or GRAPPA/SENSE on the "
            f"Cartesian lines) runs with method {', '.join(repr(m) for m in EPI_METHODS)}")
    images: list[ReconImage] = []
    prewhitened = whitener is not None
    if traj == "cartesian":
        # navigators play no part in a Cartesian recon; the imaging lines are stacked,
        # whitened (one batched product per buffer) and placed in one pass
        calibration: dict[tuple[int, int, int, int], Any] = {}
        buffers = _sort_cartesian(header, parts["imaging"], whitener=whitener,
                                  calibration=calibration)
        if not buffers:
            raise ReconError("only parallel-calibration lines, no imaging lines to reconstruct")
        for key, buf in sorted(buffers.items()):
            data, settings = _recon_cartesian(header, key, buf, buffers, calibration,
                                              method=method, backend=backend, options=options)
            meta = _meta(header, contrast=key[1], set_=key[3])
            meta["recon"] = {**settings, "prewhitened": prewhitened, "trajectory": traj}
            images.append(_image(header, buf.reference, data, meta))
        return images
    if backend == "bart":
        raise ReconError(f"backend 'bart': {traj} data are not supported (bart runs Cartesian "
                         f"{', '.join(_BART_METHODS)} here); use backend numpy or cupy")
    usable = apply_prewhitening(parts["imaging"] + parts["navigation"], whitener)
    imaging_ids = {id(a) for a in usable[:len(parts["imaging"])]}
    xp_backend = "cupy" if backend == "cupy" else "numpy"
    if traj == "epi" and _epi_parallel(header, usable, method):
        return _recon_epi_parallel(header, usable, imaging_ids, method=method,
                                   backend=backend, options=options, prewhitened=prewhitened)
    for key, acqs in sorted(_group(usable).items()):
        t0 = time.perf_counter()
        if traj == "epi":
            from mrharmony.recon.epi import reconstruct_epi

            _check_options("epi", options, asked=method)
            coil_img = reconstruct_epi(header, acqs, backend=xp_backend)
            used = "epi"
            extra: dict[str, Any] = {}
            method_options: dict[str, Any] = {}
        else:
            from mrharmony.recon.noncartesian import reconstruct_noncartesian

            nc_method = {"auto": "gridding", "nufft": "gridding", "fft": "gridding",
                         "sense": "sense", "cs": "cs", "tv": "tv"}.get(method)
            if nc_method is None:
                raise ReconError(f"method {method!r} is not available for {traj} data")
            _check_options("nufft" if nc_method == "gridding" else nc_method, options,
                           asked=method)
            method_options = {k: v for k, v in options.items() if k in _METHOD_ONLY}
            extra = dict(method_options)
            coil_img = reconstruct_noncartesian(header, acqs, method=nc_method,
                                                backend=xp_backend, **method_options)
            used = nc_method
        coil_img = np.asarray(to_numpy(coil_img))
        if coil_img.ndim == 3:
            coil_img = coil_img[..., None]
        chain = _chain(options)
        chain_settings: dict[str, Any] = {}
        taken = METHOD_OPTIONS["epi" if used == "epi" else (
            "nufft" if used == "gridding" else used)]
        _record_chain(chain_settings, chain,
                      tuple(t for t in taken if t != "partial_fourier_method"))
        if used in ("gridding", "epi"):  # coil images: complete, filter each, combine
            if "partial_fourier_method" in options:
                coil_img = _complete_images(coil_img, options["partial_fourier_method"],
                                            chain_settings)
            coil_img = _filter_images(coil_img, chain, first_spatial=1)
            img = _combine_chain(coil_img, chain, "numpy", chain_settings)
        else:  # SENSE-type: one image, combined through the maps
            img = _combine_coils(coil_img, coil_img.shape[0])
            img = _filter_images(img, chain, first_spatial=0)
        if chain["intensity_normalization"] != "none":
            img = _normalise(img, chain, coil_img, chain_settings)
        img = _crop_to_recon(img, header, acqs[0], 0)
        meta = _meta(header, contrast=key[1], set_=key[3])
        meta["recon"] = {"method": used, "backend": xp_backend, "prewhitened": prewhitened,
                         "trajectory": traj, "seconds": round(time.perf_counter() - t0, 4),
                         **extra, **chain_settings}
        ref = next((a for a in acqs if id(a) in imaging_ids), acqs[0])
        images.append(_image(header, ref, img, meta))
    return images


def _epi_image_lines(acqs: list[Any]) -> list[Any]:
    """EPI lines that enter the image k-space (no navigators, no calibration-only lines)."""
    from mrharmony.formats.flags import has_flag

    return [a for a in acqs if not has_flag(a.flags, "IS_PHASECORR_DATA")
            and not (has_flag(a.flags, "IS_PARALLEL_CALIBRATION")
                     and not has_flag(a.flags, "IS_PARALLEL_CALIBRATION_AND_IMAGING"))]


def _epi_parallel(header: Any, acqs: list[Any], method: str) -> bool:
    """Whether EPI data go to the parallel-imaging path: ``grappa``/``sense``, or
    ``auto`` on undersampled data (the Cartesian rule: R > 1 and lines missing)."""
    if method in ("grappa", "sense"):
        return True
    if method != "auto":
        return False
    for group in _group(acqs).values():
        lines = _epi_image_lines(group)
        if not lines:
            continue
        ny = max(int(encoding_of(header, lines[0]).encodedSpace.matrixSize.y or 1),
                 1 + max(int(a.idx.kspace_encode_step_1) for a in lines))
        mask = np.zeros((ny, 1), bool)
        mask[[int(a.idx.kspace_encode_step_1) for a in lines], 0] = True
        accel, _ = _acceleration(header, lines[0], mask)
        if max(accel) > 1 and _has_gaps(mask):
            return True
    return False


def _recon_epi_parallel(header: Any, usable: list[Any], imaging_ids: set[int], *,
                        method: str, backend: str, options: dict,
                        prewhitened: bool) -> list[ReconImage]:
    """EPI through the Cartesian parallel-imaging recon: every image's lines (and the
    calibration lines, e.g. a separate reference scan) to k-space with
    :func:`~mrharmony.recon.epi.epi_kspace`, then :func:`_recon_cartesian` as for
    Cartesian data (calibration selection, GRAPPA, ESPIRiT + SENSE, recon chain)."""
    from mrharmony.formats.flags import has_flag
    from mrharmony.recon.epi import epi_kspace
    from mrharmony.recon.io import CalibrationLines, CartesianBuffer

    groups = sorted(_group(usable).items())
    slice_navs: dict[int, list[Any]] = {}
    for key, acqs in groups:
        navs = [a for a in acqs if has_flag(a.flags, "IS_PHASECORR_DATA")]
        if navs:
            slice_navs.setdefault(key[0], navs)
    buffers: dict[tuple[int, int, int, int], Any] = {}
    calibration: dict[tuple[int, int, int, int], Any] = {}
    ghost: dict[tuple[int, int, int, int], str] = {}
    for key, acqs in groups:
        ek = epi_kspace(header, acqs, navigators=slice_navs.get(key[0]))
        ro = np.ones(ek.kspace.shape[1], bool)
        if ek.calibration is not None:
            calibration[key] = CalibrationLines(ek.calibration[..., None],
                                                ek.calibration_mask[:, None], ro)
        lines = [a for a in _epi_image_lines(acqs) if id(a) in imaging_ids]
        if ek.mask.any() and lines:
            buffers[key] = CartesianBuffer(ek.kspace[..., None], ek.mask[:, None], None, None,
                                           ro, lines[0])
            ghost[key] = ek.ghost_correction
    if not buffers:
        raise ReconError("only parallel-calibration lines, no imaging lines to reconstruct")
    images = []
    for key, buf in sorted(buffers.items()):
        data, settings = _recon_cartesian(header, key, buf, buffers, calibration,
                                          method=method, backend=backend, options=options)
        meta = _meta(header, contrast=key[1], set_=key[3])
        meta["recon"] = {**settings, "epi": "ramp regridding, Nyquist-ghost correction ("
                         f"{ghost[key]}), lines to Cartesian k-space",
                         "prewhitened": prewhitened, "trajectory": "epi"}
        images.append(_image(header, buf.reference, data, meta))
    return images


def reconstruct(
    raw: RawData,
    *,
    method: str = "auto",
    backend: str = "auto",
    maps: str | None = None,
    **options: Any,
) -> list[ReconImage]:
    """Reconstruct a dataset read by :func:`~mrharmony.formats.raw.load_raw`.

    Parameters
    ----------
    raw : RawData
    method, backend : str
        See :func:`reconstruct_acquisitions`.
    maps : {"t1", "t2", "adc", "dti"}, optional
        Also fit quantitative maps across the image series (TI = ``set``, echoes =
        ``contrast``, diffusion encodings = ``set``); map images are appended with
        ``meta["map"]`` naming the quantity (e.g. ``"t1_ms"``).

    Returns
    -------
    list of ReconImage
    """
    if maps is not None and maps not in MAPS:
        raise ReconError(f"maps {maps!r}: expected one of {', '.join(MAPS)}")
    images = reconstruct_acquisitions(
        raw.header, list(raw.noise) + list(raw.acquisitions), method=method, backend=backend,
        **options,
    )
    if maps is not None:
        images = images + fit_maps(images, maps)
    return images


_MAP_SERIES = {  # map kind -> (counter that indexes the series, fitted outputs to keep)
    "t1": ("set", ("t1_ms",)),
    "t2": ("contrast", ("t2_ms",)),
    "adc": ("set", ("adc_mm2_s",)),
    "dti": ("set", ("fa", "md_mm2_s")),
}


def _fit_t2(qmaps: Any, signal: np.ndarray, te_ms: np.ndarray, mask: np.ndarray,
            meta: dict[str, Any]) -> tuple[dict[str, np.ndarray], str]:
    """T2 of one echo series: the stimulated-echo (EPG) model for a CPMG train whose
    header names its refocusing pulse, else a mono-exponential decay."""
    order = np.sort(te_ms)
    cpmg = order.size >= 3 and np.allclose(order, order[0] * np.arange(1, order.size + 1),
                                           rtol=1e-3, atol=1e-3)
    if cpmg and "refocusing_flip_deg" in meta:
        tbw = meta.get("rf_time_bw_product")
        fit = qmaps.fit_t2_epg(
            signal, te_ms, mask=mask, refocusing_flip_deg=meta["refocusing_flip_deg"],
            excitation_flip_deg=float(meta.get("flip_deg", 90.0)),
            time_bw_product=tbw, apodization=float(meta.get("rf_apodization", 0.5)))
        return fit, "epg-slice-profile" if tbw is not None else "epg"
    return qmaps.fit_t2_mese(signal, te_ms, mask=mask), "mono-exponential"


def fit_maps(
    images: list[ReconImage], kind: str, *, mask_fraction: float = 0.05
) -> list[ReconImage]:
    """Fit quantitative maps across an image series with :mod:`mrharmony.recon.maps`.

    Parameters
    ----------
    images : list of ReconImage
        Reconstructed images with ``meta`` carrying ``ti_ms`` (T1), ``te_ms`` (T2) or
        ``bvalue_s_mm2``/``bvec`` (ADC, DTI).
    kind : {"t1", "t2", "adc", "dti"}
        T2 of a CPMG train (echo times ``esp, 2 esp, ...``) whose header names its
        refocusing pulse (``RefocusingFlipAngle``, ``RfTimeBwProduct``: every mrharmony
        spin-echo build) is fitted with the stimulated-echo model
        (:func:`~mrharmony.recon.maps.fit_t2_epg`, slice profile included); other echo
        series mono-exponentially. ``meta["t2_model"]`` says which.
    mask_fraction : float
        Voxels below this fraction of the series' maximum magnitude are not fitted.

    Returns
    -------
    list of ReconImage
        One per slice (and repetition) and fitted quantity; ``meta["map"]`` names it.

    Raises
    ------
    ReconError
        If the series has fewer than 2 images or lacks the needed TI/TE/b-values.
    """
    from mrharmony.recon import maps as qmaps

    counter, keep = _MAP_SERIES[kind]
    need = {"t1": "ti_ms", "t2": "te_ms", "adc": "bvalue_s_mm2", "dti": "bvalue_s_mm2"}[kind]
    groups: dict[tuple[int, int], list[ReconImage]] = {}
    for im in images:
        if "map" not in im.meta:
            groups.setdefault((im.slice, im.repetition), []).append(im)
    out = []
    for (_slc, _rep), series in sorted(groups.items()):
        series = sorted(series, key=lambda im: getattr(im, counter))
        if len(series) < 2:
            raise ReconError(f"maps {kind!r}: need at least 2 images along {counter}, got 1")
        missing = [getattr(im, counter) for im in series if need not in im.meta]
        if missing:
            raise ReconError(f"maps {kind!r}: {counter} {missing[0]} has no {need} in the header")
        signal = np.stack([np.abs(im.data) for im in series]).astype(np.float64)
        mask = signal.max(axis=0) > mask_fraction * signal.max()
        values = np.array([im.meta[need] for im in series], dtype=np.float64)
        if kind == "t1":
            fit = qmaps.fit_t1_ir(signal, values, mask=mask)
        elif kind == "t2":
            fit, t2_model = _fit_t2(qmaps, signal, values, mask, series[0].meta)
        elif kind == "adc":
            fit = qmaps.fit_adc(signal, values, mask=mask)
        else:
            bvecs = np.array([im.meta.get("bvec", [0.0, 0.0, 0.0]) for im in series])
            fit = qmaps.fit_dti(signal, values, bvecs, mask=mask)
        for name in keep:
            ref = series[0]
            meta = {k: v for k, v in ref.meta.items() if k not in ("te_ms", "ti_ms")}
            meta["map"] = name
            meta["map_inputs"] = {need: values.tolist()}
            if kind == "t2":
                meta["t2_model"] = t2_model
            out.append(
                ReconImage(
                    data=np.nan_to_num(np.asarray(fit[name], dtype=np.float32)),
                    slice=ref.slice, contrast=0, repetition=ref.repetition, set=0,
                    position=ref.position, read_dir=ref.read_dir, phase_dir=ref.phase_dir,
                    slice_dir=ref.slice_dir, field_of_view_mm=ref.field_of_view_mm, meta=meta,
                )
            )
    return out
