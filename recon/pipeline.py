"""The reconstruction pipeline: dispatch on trajectory, method and backend.

:func:`reconstruct_acquisitions` is the incremental entry point (the streaming server
calls it with all acquisitions of one slice, or with a whole dataset); noise scans in
the list are used for prewhitening. :func:`reconstruct` runs it on a :class:`RawData`
and optionally fits quantitative maps.

Methods: ``fft`` (zero-filled FFT, POCS partial Fourier, sum of squares), ``grappa``,
``sense`` (CG-SENSE with ESPIRiT maps), ``cs`` (L1-wavelet SENSE), ``tv`` (TV SENSE),
``nufft`` (non-Cartesian gridding). ``auto`` picks ``fft`` for fully sampled Cartesian
data, ``sense`` for undersampled Cartesian data and the trajectory's own recon otherwise.
Backends: ``numpy``, ``cupy`` (GPU), ``bart`` (ESPIRiT + ``pics`` through
:mod:`mrharmony.recon.bart`), ``auto`` (``cupy`` when a GPU is usable, else ``numpy``).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from mrharmony.backend import cupy_available, get_xp, to_numpy
from mrharmony.errors import ReconError
from mrharmony.formats.raw import RawData, encoding_of
from mrharmony.recon.cartesian import crop_center, ifft_c, pocs
from mrharmony.recon.coils import espirit_maps, sos
from mrharmony.recon.image import ReconImage
from mrharmony.recon.io import (
    _sort_cartesian,
    apply_prewhitening,
    noise_prewhitener,
    split_special,
)

__all__ = [
    "BACKENDS",
    "METHODS",
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


def _central_block(mask_y: np.ndarray) -> tuple[int, int]:
    """Largest run of sampled lines containing the centre ``n // 2`` (start, stop)."""
    n = mask_y.size
    c = n // 2
    if not mask_y[c]:
        return c, c
    lo = c
    while lo > 0 and mask_y[lo - 1]:
        lo -= 1
    hi = c
    while hi < n - 1 and mask_y[hi + 1]:
        hi += 1
    return lo, hi + 1


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


def _sens_maps(k, calib_k, method_backend: str, shape):
    if method_backend == "bart":
        from mrharmony.recon.bart import ecalib

        width = min(24, calib_k.shape[2])
        kk = to_numpy(calib_k)
        return ecalib(kk if kk.shape[3] > 1 else kk[..., 0], calib_width=width).reshape(k.shape)
    cal_lines = int(np.count_nonzero(np.any(to_numpy(calib_k != 0), axis=(0, 1, 3))))
    width = max(6, min(24, cal_lines))
    spatial = tuple(s for s in shape if s > 1)
    maps = espirit_maps(calib_k.reshape(k.shape[0], *spatial), spatial, calib_width=width)
    return maps.reshape(k.shape)


def _calibration(buf: Any, k, lines_y: np.ndarray, xp):
    """Calibration k-space and its ky lines: separate ACS lines, or the fully sampled
    centre of the data."""
    if buf.calib is not None:
        return xp.asarray(buf.calib), buf.calib_mask.any(axis=1)
    lo, hi = _central_block(lines_y)
    cal_y = np.zeros(lines_y.size, bool)
    cal_y[lo:hi] = True
    return k * xp.asarray(cal_y)[None, None, :, None], cal_y


def _recon_cartesian(header: Any, buf: Any, *, method: str, backend: str, options: dict):
    xp = get_xp("cuda") if backend == "cupy" else np
    k = xp.asarray(buf.kspace)
    nc, nx, ny, nz = k.shape
    mask = buf.mask  # (ny, nz)
    lines_y = mask.any(axis=1)
    lo_y, hi_y = np.flatnonzero(lines_y)[[0, -1]]
    block = lines_y[lo_y:hi_y + 1]
    undersampled = block.mean() < 0.95 or (nz > 1 and mask[lines_y].mean() < 0.95)
    partial_y = (ny // 2 - lo_y) - (hi_y - ny // 2) > 2 or (hi_y - ny // 2) - (ny // 2 - lo_y) > 2
    ro = buf.readout_mask
    ro_idx = np.flatnonzero(ro)
    partial_x = abs((nx // 2 - ro_idx[0]) - (ro_idx[-1] - nx // 2)) > 2
    if method == "auto":
        method = "sense" if undersampled and nc > 1 else "fft"
    if method in ("sense", "cs", "tv", "grappa") and nc == 1:
        raise ReconError(f"method {method!r} needs several receive coils; the data have 1")
    if method == "nufft":
        raise ReconError("method 'nufft' needs non-Cartesian data; these data are Cartesian")
    if method != "fft":  # the plain FFT needs no calibration data
        calib_k, cal_y = _calibration(buf, k, lines_y, xp)
    settings: dict[str, Any] = {"method": method, "backend": backend}
    t0 = time.perf_counter()
    if method == "fft":
        if partial_y:
            k = pocs(k, lines_y, axis=2, image_axes=(1, 2, 3))
            settings["partial_fourier"] = "pocs-ky"
        if partial_x:
            k = pocs(k, ro, axis=1, image_axes=(1, 2, 3))
            settings["partial_fourier_readout"] = "pocs-kx"
        coil_img = ifft_c(k, axes=(1, 2, 3))
        img = coil_img[0] if nc == 1 else sos(coil_img)
    elif method == "grappa":
        from mrharmony.recon.parallel import grappa

        cal_idx = np.flatnonzero(cal_y)
        hybrid = ifft_c(k, axes=(3,)) if nz > 1 else k
        hcal = ifft_c(calib_k, axes=(3,)) if nz > 1 else calib_k
        out = xp.empty_like(hybrid)
        for z in range(nz):
            out[..., z] = grappa(
                hybrid[..., z], hcal[:, :, cal_idx, z], mask=lines_y,
                lamda=options.get("grappa_lamda", 1e-2),
            )
        coil_img = ifft_c(out, axes=(1, 2))
        img = sos(coil_img)
        settings["calibration_lines"] = int(cal_idx.size)
    else:
        maps = _sens_maps(k, calib_k, backend, (nx, ny, nz))
        settings["coil_maps"] = "espirit (bart ecalib)" if backend == "bart" else "espirit"
        img = _iterative(k, xp.asarray(maps), mask, method=method, backend=backend,
                         options=options)
        settings.update({k2: v for k2, v in options.items() if k2 in ("lamda", "max_iter")})
    settings["seconds"] = round(time.perf_counter() - t0, 4)
    img = _crop_to_recon(img, header, buf.reference, 0)
    return to_numpy(img), settings


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
        else:
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
        ``lamda`` (regularisation), ``max_iter``, ``grappa_lamda``.

    Returns
    -------
    list of ReconImage
        One per ``(slice, contrast, repetition, set)``, sorted by those counters.

    Raises
    ------
    ReconError
        Unknown method/backend, or a method the data do not support.
    RawDataError
        Inconsistent acquisitions.
    """
    if method not in METHODS:
        raise ReconError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    backend = resolve_backend(backend)
    parts = split_special(acquisitions)
    if not parts["imaging"]:
        raise ReconError("no imaging acquisitions to reconstruct")
    dwell = float(parts["imaging"][0].sample_time_us) or None
    whitener = noise_prewhitener(parts["noise"] + list(noise or []), dwell_us=dwell)
    traj = _trajectory(header)
    images: list[ReconImage] = []
    prewhitened = whitener is not None
    if traj == "cartesian":
        # navigators play no part in a Cartesian recon; the imaging lines are stacked,
        # whitened (one batched product per buffer) and placed in one pass
        buffers = _sort_cartesian(header, parts["imaging"], whitener=whitener)
        for key, buf in sorted(buffers.items()):
            data, settings = _recon_cartesian(header, buf, method=method, backend=backend,
                                              options=options)
            meta = _meta(header, contrast=key[1], set_=key[3])
            meta["recon"] = {**settings, "prewhitened": prewhitened, "trajectory": traj}
            images.append(_image(header, buf.reference, data, meta))
        return images
    usable = apply_prewhitening(parts["imaging"] + parts["navigation"], whitener)
    imaging_ids = {id(a) for a in usable[:len(parts["imaging"])]}
    xp_backend = "cupy" if backend == "cupy" else "numpy"
    for key, acqs in sorted(_group(usable).items()):
        t0 = time.perf_counter()
        if traj == "epi":
            from mrharmony.recon.epi import reconstruct_epi

            coil_img = reconstruct_epi(header, acqs, backend=xp_backend)
            used = "epi"
        else:
            from mrharmony.recon.noncartesian import reconstruct_noncartesian

            nc_method = {"auto": "gridding", "nufft": "gridding", "fft": "gridding",
                         "sense": "sense", "cs": "cs"}.get(method)
            if nc_method is None:
                raise ReconError(f"method {method!r} is not available for {traj} data")
            coil_img = reconstruct_noncartesian(header, acqs, method=nc_method,
                                                backend=xp_backend)
            used = nc_method
        coil_img = np.asarray(to_numpy(coil_img))
        if coil_img.ndim == 3:
            coil_img = coil_img[..., None]
        img = _combine_coils(coil_img, coil_img.shape[0])
        img = _crop_to_recon(img, header, acqs[0], 0)
        meta = _meta(header, contrast=key[1], set_=key[3])
        meta["recon"] = {"method": used, "backend": xp_backend, "prewhitened": prewhitened,
                         "trajectory": traj, "seconds": round(time.perf_counter() - t0, 4)}
        ref = next((a for a in acqs if id(a) in imaging_ids), acqs[0])
        images.append(_image(header, ref, img, meta))
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
            fit = qmaps.fit_t2_mese(signal, values, mask=mask)
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
            out.append(
                ReconImage(
                    data=np.nan_to_num(np.asarray(fit[name], dtype=np.float32)),
                    slice=ref.slice, contrast=0, repetition=ref.repetition, set=0,
                    position=ref.position, read_dir=ref.read_dir, phase_dir=ref.phase_dir,
                    slice_dir=ref.slice_dir, field_of_view_mm=ref.field_of_view_mm, meta=meta,
                )
            )
    return out
