"""The simulator against a real measurement: ``mrharmony validate MEAS --seq SEQ -o DIR``.

A measured raw-data file (a Siemens twix ``.dat`` with the Pulseq ``.seq`` the scanner
played, or any format :func:`mrharmony.formats.raw.load_raw` reads) is compared with a
Bloch simulation of the same ``.seq`` on a matching phantom:

1. :func:`classify_sequence` reads the sequence's own k-space and RF events: the readout
   axis (largest k-space travel in an ADC), phase encoding (k at the readout centres
   varies on another axis), and the excitation's slice-select axis (gradient at the
   centre of the first excitation pulse). When the excitation selects along the readout
   axis, every readout images the excitation's slice profile: ``kind = "slice_profile"``;
   otherwise ``kind = "image"``.
2. :func:`matching_phantom` builds a uniform doped-water sphere (cylinder for an
   elongated FOV) filling 90 % of the in-plane FOV, as one plane through the centre:
   4 x finer than the image pixels along the readout (so the slice profile and its side
   lobes are sampled as in a continuous object; 8 x changes the profile by < 0.2 % of
   its peak), 2 x finer along the phase axis for an image, and at the pixel grid along
   the phase axis for a slice profile (the profile does not depend on it); images above
   128 x 128 pixels at 2 x by 1 x. The relaxation times belong to the measured field
   strength (twix header). One isochromat per grid point: the grid is regular, so no
   random sub-voxel positions blur the profile; gradient spoilers and crushers still
   dephase unwanted coherences because they wind many cycles across the object.
3. The simulation runs at an ideal virtual site (:func:`ideal_site`: one uniform receive
   coil, nominal B1+, no B0 residual, no gradient errors, no receiver filter), noiseless.
4. Measured and simulated raw data are reconstructed the same way, from the same
   acquisition headers (the simulated samples take the measured counters, flags and
   geometry: both are one acquisition per ADC of the ``.seq``). Phase-encoded data: the
   recon pipeline's plain FFT with root-sum-of-squares coil combination (noise scans
   dropped on both sides, so neither is prewhitened), magnitude averaged over
   repetitions, averages and echoes, the central partition of a 3-D image; a slice
   profile is this image averaged along the phase axis. A slice profile without phase
   encoding: the FFT of every readout, root-sum-of-squares over coils, the mean over
   readouts.
5. Metrics (:func:`profile_metrics`, :func:`compare_images`) go to ``validation.json``
   and a figure to ``validation.png`` in the output folder, with the simulated raw data
   (``simulated.h5``).

Profiles are normalised to their maximum; FWHM is measured with linear interpolation
between pixels; the side-lobe level is the highest point outside the main lobe (beyond
the first minimum on each side of the half-maximum region) relative to the maximum.
Images are scaled to unit mean over the simulated object (its pixels above half the
maximum); NRMSE = RMS(simulated - measured) / RMS(measured); correlation is Pearson's r
over all pixels (over all positions for a profile).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mrharmony.errors import RawDataError, SequenceFileError
from mrharmony.fileio import atomic_directory

__all__ = [
    "SequenceInfo",
    "classify_sequence",
    "compare_images",
    "ideal_site",
    "matching_phantom",
    "profile_metrics",
    "validate_measurement",
]

_LOG = logging.getLogger(__name__)

#: Gyromagnetic ratio of 1H over 2 pi (Hz/T), CODATA 2018.
_GAMMA_BAR_HZ_PER_T = 42.577478518e6
_AXIS_NAMES = ("x", "y", "z")
#: Phantom grid points per image pixel along the readout (resolves the slice profile's
#: side lobes and the object's edges as a continuous object would).
READOUT_OVERSAMPLING = 4
#: Above this many image pixels, an image is simulated at 2 x (readout) by 1 x (phase)
#: instead of 4 x by 2 x, to bound the simulation time.
_LARGE_IMAGE_PIXELS = 128 * 128


@dataclass(frozen=True)
class SequenceInfo:
    """What :func:`classify_sequence` found in a ``.seq`` (axes are physical LPS 0, 1, 2).

    Attributes
    ----------
    kind : {"slice_profile", "image"}
        ``"slice_profile"`` when the excitation selects along the readout axis.
    readout_axis : int
        Physical axis of the readout gradient.
    phase_axis : int
        Physical axis of phase encoding; without phase encoding, the in-plane axis the
        phantom extends along (not the thin axis).
    slice_axis : int
        The third axis: the phantom is one plane through the centre across it.
    phase_encoded : bool
        Whether the k-space position at the readout centres varies off the readout axis.
    excitation_axis : int or None
        Slice-select axis of the excitation (None: non-selective).
    excitation_flip_deg : float
        Nominal flip angle of the excitation (deg).
    n_readouts : int
        Number of ADC events.
    """

    kind: Literal["slice_profile", "image"]
    readout_axis: int
    phase_axis: int
    slice_axis: int
    phase_encoded: bool
    excitation_axis: int | None
    excitation_flip_deg: float
    n_readouts: int

    def to_mapping(self) -> dict[str, Any]:
        """JSON-ready description (axes named x, y, z)."""
        return {
            "kind": self.kind,
            "readout_axis": _AXIS_NAMES[self.readout_axis],
            "phase_axis": _AXIS_NAMES[self.phase_axis],
            "slice_axis": _AXIS_NAMES[self.slice_axis],
            "phase_encoded": self.phase_encoded,
            "excitation_axis": None if self.excitation_axis is None
            else _AXIS_NAMES[self.excitation_axis],
            "excitation_flip_deg": round(self.excitation_flip_deg, 3),
            "n_readouts": self.n_readouts,
        }


def _gradient_at(block: Any, t_rel_s: float) -> np.ndarray:
    t, g = block.gradient_waveform()
    return np.array([np.interp(t_rel_s, t, g[:, a]) for a in range(3)])


def classify_sequence(seq: str | Path | Any) -> SequenceInfo:
    """Find the readout, phase-encoding and excitation axes of a Pulseq sequence.

    Parameters
    ----------
    seq : str, Path or PulseqSequence
        A ``.seq`` file or a sequence read by :func:`mrharmony.formats.pulseq.read_pulseq`.

    Returns
    -------
    SequenceInfo

    Raises
    ------
    SequenceFileError
        If the file cannot be read, has no ADC or RF event, or no readout gradient.
    """
    from mrharmony.formats.pulseq import read_pulseq

    if isinstance(seq, (str, Path)):
        seq = read_pulseq(seq)
    records = seq.adc_records()
    if not records:
        raise SequenceFileError(f"{seq.source}: no ADC events, nothing to compare")
    k = seq.kspace_at_adc()  # (samples, 3) 1/m, physical axes
    travel = np.zeros(3)
    centres = []
    for r in records:
        a, n = r.sample_offset, r.num_samples
        travel = np.maximum(travel, np.abs(k[a + n - 1] - k[a]))
        centres.append(k[a + n // 2])
    readout = int(np.argmax(travel))
    ns = max(r.num_samples for r in records)
    if ns < 2 or travel[readout] <= 0:
        raise SequenceFileError(f"{seq.source}: the ADCs play no readout gradient")
    dk = travel[readout] / (ns - 1)  # readout k-space step (1/m)
    spread = np.ptp(np.asarray(centres), axis=0)
    spread[readout] = 0.0
    phase_encoded = bool(spread.max() > 0.5 * dk)

    _, blocks, uses = seq.rf_times()
    if len(blocks) == 0:
        raise SequenceFileError(f"{seq.source}: no RF pulse, nothing was excited")
    exc = [i for i, u in enumerate(uses) if u == "excitation"]
    exc = exc or [i for i, u in enumerate(uses) if u == "undefined"] or [0]
    first = int(blocks[exc[0]])
    block = seq.blocks[first]
    rf = block.rf
    g_exc = np.abs(_gradient_at(block, rf.center_s))
    g_ro = np.abs(_readout_gradient(seq, records[0], readout))
    selective = g_exc.max() > 1e-3 * max(g_ro, 1.0)
    exc_axis = int(np.argmax(g_exc)) if selective else None

    others = [a for a in range(3) if a != readout]
    if phase_encoded:
        phase = max(others, key=lambda a: spread[a])
    else:
        # the thin axis is the one another selective pulse (e.g. the refocusing) selects
        thin = None
        for i, b in enumerate(blocks):
            if i == exc[0]:
                continue
            blk = seq.blocks[int(b)]
            g = np.abs(_gradient_at(blk, blk.rf.center_s))
            g[readout] = 0.0
            if g.max() > 1e-3 * max(g_ro, 1.0):
                thin = int(np.argmax(g))
                break
        if thin is None:
            thin = exc_axis if exc_axis in others else others[-1]
        phase = next(a for a in others if a != thin)
    slice_axis = next(a for a in others if a != phase)
    kind = "slice_profile" if exc_axis == readout else "image"
    return SequenceInfo(
        kind=kind, readout_axis=readout, phase_axis=phase, slice_axis=slice_axis,
        phase_encoded=phase_encoded, excitation_axis=exc_axis,
        excitation_flip_deg=float(rf.flip_angle_deg()), n_readouts=len(records),
    )


def _readout_gradient(seq: Any, record: Any, axis: int) -> float:
    block = seq.blocks[record.block_index - 1]
    t_mid = record.t_start_s - block.start_s + 0.5 * record.num_samples * record.dwell_s
    return float(_gradient_at(block, t_mid)[axis])


# ----------------------------------------------------------------------------- inputs
def _field_t(header: Any, source: str) -> float:
    system = getattr(header, "acquisitionSystemInformation", None)
    field = getattr(system, "systemFieldStrength_T", None) if system is not None else None
    if field:
        return float(field)
    cond = getattr(header, "experimentalConditions", None)
    f0 = getattr(cond, "H1resonanceFrequency_Hz", None) if cond is not None else None
    if f0:
        return float(f0) / _GAMMA_BAR_HZ_PER_T
    raise RawDataError(f"{source}: the header gives no field strength (systemFieldStrength_T "
                       "or H1resonanceFrequency_Hz)")


def _recon_geometry(header: Any) -> tuple[np.ndarray, np.ndarray]:
    enc = header.encoding[0]
    rs = enc.reconSpace
    fov = np.array([rs.fieldOfView_mm.x, rs.fieldOfView_mm.y, rs.fieldOfView_mm.z], float)
    mat = np.array([rs.matrixSize.x, rs.matrixSize.y, rs.matrixSize.z], int)
    return fov, mat


def matching_phantom(
    info: SequenceInfo,
    header: Any,
    field_t: float,
    *,
    shape: Literal["auto", "sphere", "cylinder"] = "auto",
    diameter_mm: float | None = None,
    t1_ms: float | None = None,
    t2_ms: float | None = None,
) -> Any:
    """The uniform phantom a measurement is compared with (one plane through its centre).

    Parameters
    ----------
    info : SequenceInfo
        Axes of the sequence (:func:`classify_sequence`).
    header : ismrmrd.xsd.ismrmrdHeader
        Header of the measured raw data: its recon-space FOV (mm) and matrix size the
        grid (logical read/phase/slice mapped to the physical axes of ``info``).
    field_t : float
        Field strength (T) of the measurement.
    shape : {"auto", "sphere", "cylinder"}
        ``"auto"``: a sphere when the in-plane FOV is square within 25 %, else a cylinder
        along the longer in-plane axis.
    diameter_mm : float, optional
        Default 90 % of the smaller in-plane FOV.
    t1_ms, t2_ms : float, optional
        Default: doped water (:mod:`mrharmony.phantoms.uniform`).

    Returns
    -------
    mrharmony.phantoms.Phantom
        Grid ``(nx, ny, 1)``-like along the physical axes (one voxel along the slice
        axis), centred on the isocentre.
    """
    from mrharmony.phantoms.uniform import make_uniform_phantom

    fov_log, mat_log = _recon_geometry(header)
    fov_ro = float(fov_log[0]) if fov_log[0] > 0 else 256.0
    n_ro = max(int(mat_log[0]), 8)
    fov_ph = float(fov_log[1]) if fov_log[1] > 0 else fov_ro
    os_ro, os_ph = READOUT_OVERSAMPLING, 1 if info.kind == "slice_profile" else 2
    if info.kind == "image" and n_ro * max(int(mat_log[1]), 1) > _LARGE_IMAGE_PIXELS:
        os_ro, os_ph = 2, 1
    if info.phase_encoded:
        n_ph = max(int(mat_log[1]), 1) * os_ph
    else:
        n_ph = max(16, round(fov_ph / (fov_ro / n_ro)))
    thick = float(fov_log[2]) if fov_log[2] > 0 else 5.0
    fov = [0.0, 0.0, 0.0]
    mat = [1, 1, 1]
    fov[info.readout_axis], mat[info.readout_axis] = fov_ro, os_ro * n_ro
    fov[info.phase_axis], mat[info.phase_axis] = fov_ph, n_ph
    fov[info.slice_axis], mat[info.slice_axis] = thick, 1
    long_ax = info.readout_axis if fov_ro >= fov_ph else info.phase_axis
    aspect = max(fov_ro, fov_ph) / min(fov_ro, fov_ph)
    if shape == "auto":
        shape = "sphere" if aspect <= 1.25 else "cylinder"
    diameter = diameter_mm if diameter_mm is not None else 0.9 * min(fov_ro, fov_ph)
    kwargs: dict[str, Any] = {}
    if shape == "cylinder":
        kwargs["axis"] = _AXIS_NAMES[long_ax] if aspect > 1.25 else _AXIS_NAMES[info.slice_axis]
        if aspect > 1.25:
            kwargs["length_mm"] = 0.9 * max(fov_ro, fov_ph)
    return make_uniform_phantom(shape, tuple(fov), tuple(mat), field_t, t1_ms=t1_ms,
                                t2_ms=t2_ms, diameter_mm=diameter, **kwargs)


def ideal_site(base: str = "siemens-prisma-3t") -> Any:
    """A virtual site without imperfections, for comparing physics with a measurement.

    Parameters
    ----------
    base : str
        Site preset whose scanner profile (gradient/RF limits) is kept.

    Returns
    -------
    mrharmony.simulation.site.Site
        One uniform receive coil, nominal B1+ (scale 1, no centre brightening or tilt),
        no B0 shim residual, no gradient delay or scale error, no receiver filter.
    """
    from mrharmony.simulation.site import load_site

    site = load_site(base)
    rep = dataclasses.replace
    return rep(
        site,
        name="validate-ideal",
        description=f"ideal site on the {site.scanner} profile (mrharmony validate)",
        b0=rep(site.b0, residual_ppm=0.0),
        b1=rep(site.b1, scale=1.0, center_pct=0.0, tilt_pct=0.0),
        coil=rep(site.coil, channels=1),
        gradients=rep(site.gradients, delay_us=(0.0, 0.0, 0.0),
                      scale_error_pct=(0.0, 0.0, 0.0)),
        receiver=rep(site.receiver, readout_filter="none", gain_db=0.0),
    )


# ------------------------------------------------------------------------------ recon
def _simulated_like(measured: Any, sim_path: Path) -> Any:
    """The simulated samples with the measured acquisition headers and XML header.

    Both files hold one acquisition per ADC of the same ``.seq`` in playing order; giving
    the simulated samples the measured counters, flags and geometry makes the two
    reconstructions identical in every respect but the data.
    """
    import h5py
    import ismrmrd

    from mrharmony.formats.flags import has_flag
    from mrharmony.formats.header import header_to_xml, parse_ismrmrd_header
    from mrharmony.formats.raw import RawData, acquisitions_from_records

    with h5py.File(sim_path, "r") as f:
        records = f["dataset"]["data"][()]
    sim = [a for a in acquisitions_from_records(records, str(sim_path))
           if not has_flag(a.flags, "IS_NOISE_MEASUREMENT")]
    meas = list(measured.acquisitions)
    if len(sim) != len(meas):
        raise RawDataError(f"{measured.path}: {len(meas)} measured readouts, the simulation of "
                           f"its .seq has {len(sim)}")
    out = []
    for i, (m, s) in enumerate(zip(meas, sim, strict=True)):
        if int(m.number_of_samples) != int(s.number_of_samples):
            raise RawDataError(f"{measured.path}: readout {i} has {m.number_of_samples} "
                               f"samples measured, {s.number_of_samples} simulated")
        head = ismrmrd.AcquisitionHeader.from_buffer_copy(bytes(m.getHead()))
        head.active_channels = head.available_channels = int(s.active_channels)
        out.append(ismrmrd.Acquisition(head, data=np.asarray(s.data).copy(),
                                       trajectory=np.asarray(m.traj).copy()))
    header = parse_ismrmrd_header(header_to_xml(measured.header), source=str(sim_path))
    system = header.acquisitionSystemInformation
    if system is not None:
        system.receiverChannels = int(sim[0].active_channels)
        system.coilLabel = []
    return RawData(header=header, acquisitions=out, noise=[], path=sim_path)


def _image_2d(raw: Any) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude image (readout, phase) by the pipeline's FFT + RSS, and its pixel (mm)."""
    from mrharmony.formats.raw import RawData
    from mrharmony.recon.pipeline import reconstruct

    bare = RawData(header=raw.header, acquisitions=list(raw.acquisitions), noise=[],
                   path=raw.path)
    images = reconstruct(bare, method="fft", backend="numpy")
    planes = []
    for im in images:  # repetitions, averages, echoes: the mean magnitude
        data = np.abs(np.asarray(im.data))
        if data.ndim == 4:
            data = data[..., 0]
        planes.append(data[:, :, data.shape[2] // 2])
    shape = planes[0].shape
    if any(p.shape != shape for p in planes):
        raise RawDataError(f"{raw.path}: the reconstructed images differ in size")
    data = np.mean(planes, axis=0)
    pixel = np.asarray(images[0].field_of_view_mm[:2], float) / np.array(shape, float)
    return data.astype(np.float64), pixel


def _readout_profile(raw: Any) -> tuple[np.ndarray, float]:
    """Mean over readouts of the RSS magnitude of every readout's FFT, and its pixel (mm)."""
    import ismrmrd

    from mrharmony.recon.io import split_special

    acqs = split_special(list(raw.acquisitions))["imaging"]
    if not acqs:
        raise RawDataError(f"{raw.path}: no imaging readouts")
    enc = raw.header.encoding[0]
    ns_set = {int(a.number_of_samples) for a in acqs}
    if len(ns_set) != 1:
        raise RawDataError(f"{raw.path}: readouts of different lengths {sorted(ns_set)}")
    ns = ns_set.pop()
    fov_enc = float(enc.encodedSpace.fieldOfView_mm.x)
    fov_rec = float(enc.reconSpace.fieldOfView_mm.x) or fov_enc
    total = np.zeros(ns)
    for a in acqs:
        d = np.asarray(a.data, dtype=np.complex128)
        if a.is_flag_set(ismrmrd.ACQ_IS_REVERSE):
            d = d[:, ::-1]
        c = int(a.center_sample) if 0 < int(a.center_sample) < ns else ns // 2
        d = np.roll(d, ns // 2 - c, axis=1)
        img = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(d, axes=1), axis=1), axes=1)
        total += np.sqrt(np.sum(np.abs(img) ** 2, axis=0))
    prof = total / len(acqs)
    pixel = fov_enc / ns
    n_keep = round(fov_rec / pixel)
    if 0 < n_keep < ns:
        start = ns // 2 - n_keep // 2
        prof = prof[start:start + n_keep]
    return prof, pixel


def _profile_and_image(raw: Any, info: SequenceInfo) -> tuple[np.ndarray, float, np.ndarray | None]:
    if info.kind == "slice_profile" and not info.phase_encoded:
        prof, pixel = _readout_profile(raw)
        return prof, pixel, None
    img, pixel = _image_2d(raw)
    return img.mean(axis=1), float(pixel[0]), img


# ---------------------------------------------------------------------------- metrics
def profile_metrics(profile: np.ndarray, pixel_mm: float) -> dict[str, float]:
    """FWHM, centre and side-lobe level of a 1-D profile.

    Parameters
    ----------
    profile : ndarray (n,)
        Non-negative profile (any scale).
    pixel_mm : float
        Sample spacing (mm).

    Returns
    -------
    dict
        ``fwhm_mm`` (linear interpolation of the half-maximum crossings around the
        maximum), ``centre_mm`` (midpoint of those crossings, relative to sample
        ``n // 2``), ``sidelobe_level`` (highest sample beyond the first minimum on
        either side of the half-maximum region, relative to the maximum; 0 when none),
        ``sidelobe_left``, ``sidelobe_right``, ``peak_index``.

    Raises
    ------
    RawDataError
        If the profile is empty, not finite, or has no positive maximum.
    """
    p = np.asarray(profile, dtype=np.float64)
    if p.ndim != 1 or p.size < 3 or not np.all(np.isfinite(p)) or p.max() <= 0:
        raise RawDataError("profile: empty, not finite or without a positive maximum")
    p = p / p.max()
    n = p.size
    i0 = int(np.argmax(p))
    lo = i0
    while lo > 0 and p[lo - 1] >= 0.5:
        lo -= 1
    hi = i0
    while hi < n - 1 and p[hi + 1] >= 0.5:
        hi += 1
    x_lo = lo - (p[lo] - 0.5) / (p[lo] - p[lo - 1]) if lo > 0 else float(lo)
    x_hi = hi + (p[hi] - 0.5) / (p[hi] - p[hi + 1]) if hi < n - 1 else float(hi)
    left, right = lo, hi
    while left > 0 and p[left - 1] <= p[left]:
        left -= 1
    while right < n - 1 and p[right + 1] <= p[right]:
        right += 1
    side_l = float(p[:left].max()) if left > 0 else 0.0
    side_r = float(p[right + 1:].max()) if right < n - 1 else 0.0
    return {
        "fwhm_mm": float((x_hi - x_lo) * pixel_mm),
        "centre_mm": float((0.5 * (x_lo + x_hi) - n // 2) * pixel_mm),
        "sidelobe_level": max(side_l, side_r),
        "sidelobe_left": side_l,
        "sidelobe_right": side_r,
        "peak_index": i0,
    }


def _nrmse(ref: np.ndarray, test: np.ndarray) -> float:
    return float(np.sqrt(np.mean((test - ref) ** 2)) / np.sqrt(np.mean(ref ** 2)))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel(), b.ravel()
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def compare_images(measured: np.ndarray, simulated: np.ndarray) -> dict[str, Any]:
    """Normalise two magnitude images over the simulated object and compare them.

    Parameters
    ----------
    measured, simulated : ndarray
        Same shape, non-negative; ``simulated`` is noiseless, so its pixels above half
        its maximum are the object.

    Returns
    -------
    dict
        ``nrmse`` (RMS difference / RMS measured over all pixels, after scaling each
        image to unit mean over the object), ``correlation`` (Pearson r over all pixels),
        ``object_pixels``, and the normalised arrays ``measured_n``, ``simulated_n``.

    Raises
    ------
    RawDataError
        If the shapes differ or an image is empty over the object.
    """
    m = np.asarray(measured, dtype=np.float64)
    s = np.asarray(simulated, dtype=np.float64)
    if m.shape != s.shape:
        raise RawDataError(f"measured image {m.shape} and simulated image {s.shape} differ "
                           "in shape")
    mask = s > 0.5 * s.max() if s.max() > 0 else np.zeros(s.shape, bool)
    mean_m = m[mask].mean() if mask.any() else 0.0
    mean_s = s[mask].mean() if mask.any() else 0.0
    if not (mean_m > 0 and mean_s > 0):
        raise RawDataError("an image is empty over the simulated object")
    mn, sn = m / mean_m, s / mean_s
    return {"nrmse": _nrmse(mn, sn), "correlation": _corr(mn, sn),
            "object_pixels": int(mask.sum()), "measured_n": mn, "simulated_n": sn}


# ----------------------------------------------------------------------------- figure
def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _figure(path: Path, result: dict[str, Any], arrays: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = arrays.get("images")
    profile = result["kind"] == "slice_profile"
    ncols = (1 if profile else 0) + (3 if imgs is not None else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 4.2), squeeze=False)
    axes = list(axes[0])
    if profile:
        ax = axes.pop(0)
        x = arrays["position_mm"]
        ax.plot(x, arrays["measured"], "o-", ms=3, label="measured")
        ax.plot(x, arrays["simulated"], "s-", ms=3, label="simulated")
        ax.plot(x, arrays["simulated"] - arrays["measured"], "-", color="0.5", lw=1,
                label="simulated - measured")
        fw = result["fwhm_mm"]
        sl = result["sidelobe_level"]
        ax.set_title(f"slice profile: FWHM {_fmt(fw['measured'], '.1f')} / "
                     f"{_fmt(fw['simulated'], '.1f')} mm\n"
                     f"side lobes {_fmt(sl['measured'], '.2f')} / "
                     f"{_fmt(sl['simulated'], '.2f')}, r = {_fmt(result['correlation'], '.3f')}",
                     fontsize=9)
        ax.set_xlabel("position along the readout (mm)")
        ax.set_ylabel("normalised magnitude")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if imgs is not None and min(imgs[0].shape) == 1:  # one line: a projection, not an image
        m, s = (np.ravel(a) for a in imgs)
        x = np.arange(m.size) - m.size // 2
        axes[0].plot(x, m, "o-", ms=3, label="measured")
        axes[1].plot(x, s, "s-", ms=3, color="C1", label="simulated")
        axes[2].plot(x, s - m, "-", color="0.4", label="simulated - measured")
        for ax in axes[:3]:
            ax.set_xlabel("readout (pixel)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        img_stats = result.get("image", result)
        axes[2].set_title(f"NRMSE {_fmt(img_stats['nrmse'], '.3f')}, "
                          f"r = {_fmt(img_stats['correlation'], '.3f')}", fontsize=9)
    elif imgs is not None:
        m, s = imgs
        vmax = max(float(m.max()), float(s.max()))
        for ax, im, title in ((axes[0], m, "measured"), (axes[1], s, "simulated")):
            h = ax.imshow(im.T, origin="lower", cmap="gray", vmin=0, vmax=vmax)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("readout (pixel)")
            ax.set_ylabel("phase (pixel)")
            fig.colorbar(h, ax=ax, fraction=0.046)
        diff = s - m
        lim = float(np.abs(diff).max()) or 1.0
        h = axes[2].imshow(diff.T, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        img_stats = result.get("image", result)
        axes[2].set_title(f"simulated - measured: NRMSE {_fmt(img_stats['nrmse'], '.3f')}, "
                          f"r = {_fmt(img_stats['correlation'], '.3f')}", fontsize=9)
        fig.colorbar(h, ax=axes[2], fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- driver
def _json_ready(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), recursively."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _round(x: float, nd: int = 5) -> float:
    return float(round(float(x), nd)) if math.isfinite(float(x)) else float("nan")


def validate_measurement(
    meas: str | Path,
    seq: str | Path,
    out_dir: str | Path,
    *,
    measurement: int | None = None,
    force: bool = False,
    seed: int = 0,
    shape: Literal["auto", "sphere", "cylinder"] = "auto",
    diameter_mm: float | None = None,
    t1_ms: float | None = None,
    t2_ms: float | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Compare a measured scan with a Bloch simulation of its ``.seq`` on a uniform phantom.

    Parameters
    ----------
    meas : str or Path
        Measured raw data: a Siemens twix ``.dat`` (with ``seq``) or anything
        :func:`mrharmony.formats.raw.load_raw` reads.
    seq : str or Path
        The Pulseq file the scanner played.
    out_dir : str or Path
        Output folder (created; written atomically): ``validation.json``,
        ``validation.png``, ``simulated.h5``.
    measurement : int, optional
        twix: measurement of a multi-measurement file (default: the last image one).
    force : bool
        Replace an existing non-empty ``out_dir``.
    seed : int
        Seed of the simulation (recorded; the simulation is noiseless).
    shape, diameter_mm, t1_ms, t2_ms
        Phantom options, see :func:`matching_phantom`.
    progress : bool
        Show the simulation's progress bar.

    Returns
    -------
    dict
        What ``validation.json`` holds: ``kind``, ``measured``/``simulated`` (file,
        metrics), ``fwhm_mm``, ``fwhm_rel_diff`` ((simulated - measured) / measured),
        ``sidelobe_level``, ``correlation``, ``nrmse``, ``field_t``, ``phantom``,
        ``sequence``, ``site``, ``pixel_mm``, ``recon``; for a slice profile also
        ``centre_offset_mm`` and ``profiles`` (positions in mm, both normalised
        profiles); for a phase-encoded acquisition also ``image`` (NRMSE and correlation
        of the 2-D images). The profile keys are None for an image. Lengths in mm,
        levels relative to the profile maximum.

    Raises
    ------
    FileExistsError
        ``out_dir`` exists, is not empty, and ``force`` is false.
    RawDataError, SequenceFileError, PhantomError, SimulationError
        Unreadable or mismatched inputs.
    """
    from mrharmony.formats.raw import load_raw, sniff_format
    from mrharmony.simulation.raw import simulate_raw

    meas, seq, out_dir = Path(meas), Path(seq), Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not force:
            raise FileExistsError(f"{out_dir}: exists and is not empty (use --force / "
                                  "force=True to replace it)")
    if not seq.is_file():
        raise SequenceFileError(f"{seq}: no such sequence file")
    if not out_dir.parent.is_dir():
        raise FileNotFoundError(f"{out_dir.parent}: no such folder")

    info = classify_sequence(seq)
    _LOG.info("%s: %s (readout %s, phase encoded: %s)", seq.name, info.kind,
              _AXIS_NAMES[info.readout_axis], info.phase_encoded)
    # the .seq goes to the twix reader (it lays out the readouts); other formats carry
    # their own layout and load_raw refuses a .seq for them
    if sniff_format(meas) == "twix":
        measured = load_raw(meas, seq=seq, measurement=measurement)
    else:
        measured = load_raw(meas, measurement=measurement)
    field_t = _field_t(measured.header, str(meas))
    phantom = matching_phantom(info, measured.header, field_t, shape=shape,
                               diameter_mm=diameter_mm, t1_ms=t1_ms, t2_ms=t2_ms)
    site = ideal_site()
    n_coils_meas = int(np.asarray(measured.acquisitions[0].data).shape[0])

    with atomic_directory(out_dir) as tmp:
        sim_path = tmp / "simulated.h5"
        _LOG.info("simulating %s on a %s phantom (%s grid points)", seq.name,
                  phantom.metadata["shape"], int(phantom.mask.sum()))
        simulate_raw(seq, phantom, site, sim_path, seed=seed, noise=False,
                     isochromats_per_voxel=1, progress=progress)
        simulated = _simulated_like(measured, sim_path)
        prof_m, pix_m, img_m = _profile_and_image(measured, info)
        prof_s, pix_s, img_s = _profile_and_image(simulated, info)
        if prof_m.shape != prof_s.shape or not math.isclose(pix_m, pix_s, rel_tol=1e-3):
            raise RawDataError(
                f"{meas}: measured ({prof_m.size} x {pix_m:.4g} mm) and simulated "
                f"({prof_s.size} x {pix_s:.4g} mm) reconstructions differ in geometry"
            )
        result: dict[str, Any] = {
            "kind": info.kind,
            "measured": {"path": str(meas), "seq": str(seq), "coils": n_coils_meas},
            "simulated": {"path": "simulated.h5", "coils": 1, "seed": int(seed),
                          "noise": False, "isochromats_per_grid_point": 1},
        }
        arrays: dict[str, Any] = {}
        if img_m is not None:
            cmp_img = compare_images(img_m, img_s)
            arrays["images"] = (cmp_img["measured_n"], cmp_img["simulated_n"])
            img_stats = {"nrmse": _round(cmp_img["nrmse"]),
                         "correlation": _round(cmp_img["correlation"]),
                         "object_pixels": cmp_img["object_pixels"],
                         "shape": list(img_m.shape)}
        if info.kind == "slice_profile":
            pm, ps = prof_m / prof_m.max(), prof_s / prof_s.max()
            met_m, met_s = profile_metrics(pm, pix_m), profile_metrics(ps, pix_s)
            for key, met in (("measured", met_m), ("simulated", met_s)):
                result[key].update({k: (_round(v) if isinstance(v, float) else v)
                                    for k, v in met.items()})
            position = (np.arange(pm.size) - pm.size // 2) * pix_m
            result["fwhm_mm"] = {"measured": _round(met_m["fwhm_mm"]),
                                 "simulated": _round(met_s["fwhm_mm"])}
            result["fwhm_rel_diff"] = _round((met_s["fwhm_mm"] - met_m["fwhm_mm"])
                                             / met_m["fwhm_mm"])
            result["sidelobe_level"] = {"measured": _round(met_m["sidelobe_level"]),
                                        "simulated": _round(met_s["sidelobe_level"])}
            result["centre_offset_mm"] = _round(met_s["centre_mm"] - met_m["centre_mm"])
            result["correlation"] = _round(_corr(pm, ps))
            result["nrmse"] = _round(_nrmse(pm, ps))
            result["profiles"] = {"position_mm": [_round(v, 4) for v in position],
                                  "measured": [_round(v) for v in pm],
                                  "simulated": [_round(v) for v in ps]}
            arrays.update(position_mm=position, measured=pm, simulated=ps)
            if img_m is not None:
                result["image"] = img_stats
        else:
            result.update(fwhm_mm=None, fwhm_rel_diff=None, sidelobe_level=None)
            result["correlation"] = img_stats["correlation"]
            result["nrmse"] = img_stats["nrmse"]
            result["image"] = img_stats
        result["pixel_mm"] = _round(pix_m)
        result["field_t"] = _round(field_t)
        result["phantom"] = {k: v for k, v in phantom.metadata.items() if k != "generator"}
        result["phantom"]["name"] = phantom.name
        result["phantom"]["plane"] = ("through the centre, normal to the "
                                      f"{_AXIS_NAMES[info.slice_axis]} axis")
        result["sequence"] = info.to_mapping()
        result["site"] = {"name": site.name, "scanner": site.scanner, "receive_coils": 1,
                          "b1": "nominal", "b0_residual_ppm": 0.0,
                          "gradient_errors": "none", "readout_filter": "none"}
        result["recon"] = ("pipeline fft + root-sum-of-squares, no prewhitening"
                           if img_m is not None else
                           "FFT of every readout, root-sum-of-squares, mean over readouts")
        result = _json_ready(result)
        (tmp / "validation.json").write_text(json.dumps(result, indent=2, allow_nan=False)
                                             + "\n")
        _figure(tmp / "validation.png", result, arrays)
    return result
