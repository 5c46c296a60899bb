"""Building blocks shared by the sequence builders.

Conventions every builder follows (the simulator and the reconstruction rely on them):

- Cartesian sampling uses the FFT convention: readout sample ``i`` of ``N`` and phase
  line ``j`` of ``M`` sit at ``k = (i - N//2) * dk`` and ``(j - M//2) * dk``, so the
  k-space centre is sample ``N//2`` of line ``M//2``. With oversampling ``os`` the ADC
  takes ``os * N`` samples at ``dk / os`` spacing, centre at ``os * N // 2``.
- TE is measured from the centre of the excitation pulse to the ADC sample at the
  k-space centre; TR between successive excitations of the same slice (or, with an
  inversion, between inversions); TI from the inversion centre to the excitation centre
  (MPRAGE: to the excitation of the k-space centre line).
- Every ADC block carries Pulseq labels: ``LIN`` (phase line), ``SLC`` (slice),
  ``PAR`` (3D partition), ``ECO`` (echo), ``SET`` (TI or diffusion-encoding index),
  ``NAV`` / ``REV`` (EPI navigators and reversed lines). The first block of each TR
  carries ``TRID`` (segment id, as the GE interpreter needs).
- Acceleration, calibration (ACS) lines and partial Fourier follow :class:`Sampling`:
  ``LIN``/``PAR`` stay the true line indices, calibration lines carry ``REF``/``IMA``
  and :func:`sampling_definitions` writes ``Acceleration``, ``PartialFourier``,
  ``ACSLines``, ``CalibrationMode`` and ``kSpaceCenterLine`` (only when something is
  left out, so unaccelerated files are unchanged).
- All timing is on the scanner's rasters; a request that cannot be met raises
  :class:`~mrharmony.errors.ProtocolError` *before* anything is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pypulseq as pp

from mrharmony.errors import ProtocolError
from mrharmony.sequences.protocol import Protocol, partial_fourier_lines
from mrharmony.sequences.scanner import ScannerProfile

__all__ = [
    "Readout",
    "Sampling",
    "acs_labels",
    "check_positive_delay",
    "excitation_pulse",
    "fill_delay",
    "finalize",
    "label",
    "make_readout",
    "new_sequence",
    "phase_encode_areas",
    "rf_center_time",
    "round_down",
    "round_to",
    "round_up",
    "sampling",
    "sampling_definitions",
    "set_slice_offset",
    "slice_positions_m",
]

#: Golden angle for radial spoke ordering (degrees): 180 / golden ratio.
GOLDEN_ANGLE_DEG = 180.0 * (math.sqrt(5) - 1) / 2


def round_up(t: float, raster: float) -> float:
    """Smallest multiple of ``raster`` that is >= ``t`` (tolerant to float noise)."""
    return math.ceil(t / raster - 1e-9) * raster


def round_down(t: float, raster: float) -> float:
    """Largest multiple of ``raster`` that is <= ``t`` (tolerant to float noise)."""
    return math.floor(t / raster + 1e-9) * raster


def round_to(t: float, raster: float) -> float:
    """Nearest multiple of ``raster``."""
    return round(t / raster) * raster


def trapezoid(*, channel: str, area: float, duration: float, system: pp.Opts) -> SimpleNamespace:
    """Trapezoid of ``area`` (1/m) lasting ``duration`` (s), also when that is the shortest.

    pypulseq compares the requested duration with its own float sum of ramp and flat
    times; when ``duration`` is exactly the shortest design it can refuse by 1e-19 s.
    """
    try:
        return pp.make_trapezoid(channel=channel, area=area, duration=duration, system=system)
    except AssertionError:
        shortest = pp.make_trapezoid(channel=channel, area=area, system=system)
        if pp.calc_duration(shortest) > duration + 1e-9:
            raise
        return shortest


def new_sequence(scanner: ScannerProfile) -> tuple[pp.Sequence, pp.Opts]:
    """A fresh pypulseq Sequence bound to this scanner's limits (no global defaults)."""
    system = scanner.to_opts()
    return pp.Sequence(system=system), system


def label(name: str, value: int, kind: str = "SET") -> SimpleNamespace:
    """A Pulseq label event (``kind`` is ``"SET"`` or ``"INC"``)."""
    return pp.make_label(label=name, type=kind, value=int(value))


def slice_positions_m(protocol: Any) -> np.ndarray:
    """Slice centre positions in metres, centred on isocentre, in acquisition order."""
    n = protocol.n_slices
    spacing = (protocol.slice_thickness_mm + protocol.slice_gap_mm) * 1e-3
    return (np.arange(n) - (n - 1) / 2) * spacing


def rf_center_time(rf: SimpleNamespace) -> float:
    """Time of the RF pulse's centre from the start of its block, in seconds."""
    return rf.delay + pp.calc_rf_center(rf)[0]


def set_slice_offset(rf: SimpleNamespace, gz_amplitude: float, position_m: float) -> None:
    """Shift a slice-selective pulse to ``position_m`` (frequency and matching phase)."""
    rf.freq_offset = gz_amplitude * position_m
    rf.phase_offset = -2 * math.pi * rf.freq_offset * pp.calc_rf_center(rf)[0]


def excitation_pulse(
    system: pp.Opts,
    scanner: ScannerProfile,
    *,
    flip_deg: float,
    duration_s: float,
    time_bw_product: float,
    thickness_m: float,
    use: str = "excitation",
    apodization: float = 0.5,
    phase_offset_rad: float = 0.0,
    parameter: str = "slice_thickness_mm",
) -> tuple[SimpleNamespace, SimpleNamespace, SimpleNamespace]:
    """Slice- or slab-selective sinc pulse with its select gradient and rephaser.

    Parameters
    ----------
    system : pypulseq.Opts
        Scanner limits.
    scanner : ScannerProfile
        The scanner, for error messages.
    flip_deg : float
        Flip angle in degrees.
    duration_s : float
        Pulse duration in seconds.
    time_bw_product : float
        Time-bandwidth product (dimensionless).
    thickness_m : float
        Slice (or slab) thickness in metres.
    use : str
        Pulseq RF use: ``"excitation"``, ``"refocusing"`` or ``"inversion"``.
    parameter : str
        Protocol key named in the error when the thickness needs too strong a gradient.

    Returns
    -------
    rf, gz, gz_rephase
        The RF event (delay includes the dead time), the select trapezoid and a
        rephasing trapezoid of area ``-gz.area / 2`` (for excitation).

    Raises
    ------
    ProtocolError
        If the select gradient ``bandwidth / thickness`` exceeds the scanner maximum.
    """
    duration_s = round_up(duration_s, system.rf_raster_time)
    bandwidth_hz = time_bw_product / duration_s
    amplitude = bandwidth_hz / thickness_m
    if amplitude > system.max_grad:
        min_mm = bandwidth_hz / system.max_grad * 1e3
        raise ProtocolError(
            f"{parameter}: {thickness_m * 1e3:.3g} mm is below the minimum {min_mm:.3g} mm "
            f"this pulse (time-bandwidth {time_bw_product:g}, {duration_s * 1e3:.3g} ms) "
            f"allows on {scanner.name} ({scanner.max_grad_mt_per_m:g} mT/m)"
        )
    rf, gz, gzr = pp.make_sinc_pulse(
        flip_angle=math.radians(flip_deg),
        duration=duration_s,
        slice_thickness=thickness_m,
        apodization=apodization,
        time_bw_product=time_bw_product,
        phase_offset=phase_offset_rad,
        system=system,
        return_gz=True,
        delay=system.rf_dead_time,
        use=use,
    )
    return rf, gz, gzr


@dataclass(frozen=True)
class Readout:
    """A Cartesian readout: the flat-top gradient, its ADC and timing facts."""

    gx: SimpleNamespace
    adc: SimpleNamespace
    n_samples: int
    dwell_s: float
    #: Area from the start of ``gx`` to the k-space-centre sample (Hz/m * s = 1/m).
    area_to_center: float
    #: Time from the start of ``gx``'s block to the k-space-centre sample (s).
    time_to_center_s: float
    bandwidth_hz_per_px: float


def make_readout(
    system: pp.Opts,
    scanner: ScannerProfile,
    *,
    fov_m: float,
    n: int,
    bandwidth_hz_per_px: float,
    oversampling: int = 1,
    channel: str = "x",
    sign: float = 1.0,
) -> Readout:
    """Design a flat-top readout of ``n`` pixels over ``fov_m`` at a receiver bandwidth.

    The dwell is rounded to the ADC raster (the achieved bandwidth is reported), the ADC
    is centred on the flat top, and the k-space centre falls exactly on sample
    ``oversampling * n // 2``.

    Raises
    ------
    ProtocolError
        If the readout gradient exceeds the scanner maximum (bandwidth too high for the
        FOV) or the dwell is below the ADC raster.
    """
    n_samples = n * oversampling
    dwell = round_to(1.0 / (bandwidth_hz_per_px * n_samples), system.adc_raster_time)
    if dwell < system.adc_raster_time:
        raise ProtocolError(
            f"readout_bandwidth_hz_per_px: {bandwidth_hz_per_px:g} Hz/px needs a dwell below "
            f"the {system.adc_raster_time * 1e6:g} us ADC raster of {scanner.name}"
        )
    adc_duration = dwell * n_samples
    delta_k = 1.0 / fov_m
    amplitude = n * delta_k / adc_duration
    if amplitude > system.max_grad:
        max_bw = system.max_grad * fov_m / n
        raise ProtocolError(
            f"readout_bandwidth_hz_per_px: {bandwidth_hz_per_px:g} Hz/px needs a readout "
            f"gradient of {amplitude / scanner.max_grad_hz_per_m * scanner.max_grad_mt_per_m:.1f}"
            f" mT/m over a {fov_m * 1e3:g} mm FOV, above the {scanner.max_grad_mt_per_m:g} mT/m "
            f"{scanner.name} allows (maximum {max_bw:.0f} Hz/px)"
        )
    # Margin for the ADC dead time and for starting the ADC on the RF raster (Pulseq rule).
    flat_time = round_up(
        adc_duration + 2 * (system.adc_dead_time + system.rf_raster_time), system.grad_raster_time
    )
    gx = pp.make_trapezoid(
        channel=channel, amplitude=sign * amplitude, flat_time=flat_time, system=system
    )
    adc_delay = round_to(gx.rise_time + (flat_time - adc_duration) / 2, system.rf_raster_time)
    adc = pp.make_adc(num_samples=n_samples, dwell=dwell, delay=adc_delay, system=system)
    center_time = adc_delay + (n_samples // 2 + 0.5) * dwell
    area_to_center = sign * amplitude * (center_time - gx.rise_time / 2)
    return Readout(
        gx=gx,
        adc=adc,
        n_samples=n_samples,
        dwell_s=dwell,
        area_to_center=area_to_center,
        time_to_center_s=center_time,
        bandwidth_hz_per_px=1.0 / (dwell * n_samples),
    )


def phase_encode_areas(fov_m: float, n: int) -> np.ndarray:
    """Phase-encoding areas (1/m) of lines ``0..n-1`` in the FFT convention."""
    return (np.arange(n) - n // 2) / fov_m


@dataclass(frozen=True)
class Sampling:
    """Which phase-encoding lines (and partitions) an accelerated protocol acquires.

    Every axis follows the same rule, around the k-space centre ``n // 2`` (FFT
    convention): partial Fourier keeps lines ``0 .. ceil(fraction * n) - 1`` (from
    ``-k_max``; the high-k end is omitted), of which the lines ``l`` with
    ``(l - n // 2) % R == 0`` (the centre is always one of them) and the calibration
    (ACS) block ``n // 2 - acs // 2 .. n // 2 - acs // 2 + acs - 1`` are sampled. On an
    axis that is not accelerated the calibration block spans all kept lines. In 3D a
    point ``(ky, kz)`` is sampled when it is on both regular patterns or inside both
    calibration ranges (a centre block, as GRAPPA/ESPIRiT calibrate on).

    Attributes
    ----------
    shape : tuple of int
        Full matrix along the phase-encoding axes (phase[, partition]).
    accelerations, calibration, partial_fourier : tuple
        Per axis: R, ACS lines, partial-Fourier fraction.
    mask : ndarray of bool
        ``shape``: sampled points (pattern and calibration block).
    acs : ndarray of bool
        ``shape``: points of the calibration block (empty when not accelerated).
    """

    shape: tuple[int, ...]
    accelerations: tuple[int, ...]
    calibration: tuple[int, ...]
    partial_fourier: tuple[float, ...]
    mask: np.ndarray
    acs: np.ndarray
    #: ``shape``: points of the regular pattern alone (without the calibration block).
    pattern: np.ndarray

    @property
    def accelerated(self) -> bool:
        """Whether any axis is undersampled by a regular pattern (R > 1)."""
        return any(r > 1 for r in self.accelerations)

    @property
    def reduced(self) -> bool:
        """Whether anything is left out (acceleration or partial Fourier)."""
        return self.accelerated or any(f < 1 for f in self.partial_fourier)

    @property
    def has_acs(self) -> bool:
        """Whether the scan carries calibration lines (accelerated, with ACS)."""
        return self.accelerated and bool(self.acs.any())

    def lines(self) -> np.ndarray:
        """Sampled phase lines of a 2D protocol, ascending."""
        return np.flatnonzero(self.mask)


def _axis_masks(n: int, r: int, acs: int, pf: float) -> tuple[np.ndarray, np.ndarray]:
    keep = np.arange(n) < partial_fourier_lines(n, pf)
    on = ((np.arange(n) - n // 2) % r == 0) & keep
    if r == 1:
        return on, keep
    start = n // 2 - acs // 2
    block = (np.arange(n) >= start) & (np.arange(n) < start + acs) & keep
    return on, block


def sampling(protocol: Protocol) -> Sampling:
    """The sampled phase-encoding points of a Cartesian protocol (see :class:`Sampling`).

    Protocols without acceleration keys sample every point.
    """
    ndim_pe = 2 if protocol.ndim == 3 else 1
    shape = tuple(int(m) for m in protocol.matrix[1:1 + ndim_pe])
    rs = tuple(getattr(protocol, "accelerations", (1,) * ndim_pe))
    acs = tuple(getattr(protocol, "calibration_lines", (0,) * ndim_pe))
    pfs = tuple(float(f) for f in getattr(protocol, "partial_fourier", (1.0,) * ndim_pe))
    axes = [_axis_masks(n, r, a, f) for n, r, a, f in zip(shape, rs, acs, pfs, strict=True)]
    if ndim_pe == 1:
        on, block = axes[0]
    else:
        on = axes[0][0][:, None] & axes[1][0][None, :]
        block = axes[0][1][:, None] & axes[1][1][None, :]
    if not any(r > 1 for r in rs):
        block = np.zeros_like(block)
    return Sampling(shape=shape, accelerations=rs, calibration=acs, partial_fourier=pfs,
                    mask=on | block, acs=block, pattern=on)


def acs_labels(samp: Sampling, is_acs: bool, *, reference_only: bool = False
               ) -> list[SimpleNamespace]:
    """Pulseq ``REF`` / ``IMA`` labels of one readout of an accelerated scan.

    ``REF = 1, IMA = 1``: a calibration line that is also imaging data (integrated ACS,
    ISMRMRD ``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING``); ``REF = 1, IMA = 0``: a line
    of a separate reference scan (``ACQ_IS_PARALLEL_CALIBRATION``); both 0 otherwise.
    Unaccelerated scans carry no such labels (the file stays as it was).
    """
    if not samp.accelerated:
        return []
    if reference_only:
        return [label("REF", 1), label("IMA", 0)]
    return [label("REF", int(is_acs)), label("IMA", int(is_acs))]


def sampling_definitions(samp: Sampling, *, calibration_mode: str = "embedded"
                         ) -> dict[str, Any]:
    """``[DEFINITIONS]`` of an accelerated or partial-Fourier scan (empty otherwise).

    ``Acceleration``, ``PartialFourier``, ``ACSLines`` (per phase-encoding axis),
    ``CalibrationMode`` (``embedded``, ``separate``, or ``external`` when the scan
    carries no calibration lines), ``kSpaceCenterLine`` (and ``kSpaceCenterPartition``
    in 3D): the centre of the full matrix, which stays ``n // 2`` whatever is left out.
    """
    if not samp.reduced:
        return {}
    out: dict[str, Any] = {
        "Acceleration": [int(r) for r in samp.accelerations],
        "PartialFourier": [float(f) for f in samp.partial_fourier],
        "ACSLines": [int(samp.acs.sum())] if samp.acs.ndim == 1 else [
            int(samp.acs.any(axis=1).sum()), int(samp.acs.any(axis=0).sum())],
        "CalibrationMode": calibration_mode if samp.has_acs else "external",
        "kSpaceCenterLine": samp.shape[0] // 2,
    }
    if len(samp.shape) == 2:
        out["kSpaceCenterPartition"] = samp.shape[1] // 2
    return out


def check_positive_delay(
    delay_s: float,
    *,
    what: str,
    key: str,
    requested_ms: float,
    scanner: ScannerProfile,
    below: bool = True,
) -> None:
    """Refuse a protocol whose ``key`` leaves a negative fill delay.

    ``delay_s`` is the fill time left (requested minus minimum). The error names the
    parameter, the requested value and the minimum this protocol allows on the scanner.
    """
    if delay_s < -1e-9:
        minimum = requested_ms - delay_s * 1e3
        raise ProtocolError(
            f"{key}: {what} {requested_ms:.4g} ms is below the minimum {minimum:.4g} ms this "
            f"protocol allows on {scanner.name}"
        )


def fill_delay(
    minimum_s: float,
    *,
    what: str,
    key: str,
    requested_ms: float,
    scanner: ScannerProfile,
    raster_s: float,
) -> float:
    """Fill delay (s) that brings a time from its minimum to the requested value.

    Refuses the protocol (naming ``key``, the request and the minimum) when the request
    is below ``minimum_s``; otherwise returns the difference rounded to ``raster_s``,
    never negative.
    """
    requested_s = requested_ms * 1e-3
    check_positive_delay(
        requested_s - minimum_s, what=what, key=key, requested_ms=requested_ms, scanner=scanner
    )
    return max(round_to(requested_s - minimum_s, raster_s), 0.0)


def te_tr_fill(
    *,
    min_te_s: float,
    fixed_tr_s: float,
    protocol: Protocol,
    scanner: ScannerProfile,
    raster_s: float,
) -> tuple[float, float, float, float]:
    """Fill delays that bring TE and TR to the protocol's values (single-echo builders).

    Parameters
    ----------
    min_te_s : float
        Shortest TE the events allow (s).
    fixed_tr_s : float
        TR without the TE fill delay (s); the shortest TR is this plus the TE fill.
    raster_s : float
        Raster the fill delays are rounded to (s), usually the block-duration raster.

    Returns
    -------
    delay_te, delay_tr, te, tr : float
        The two fill delays and the achieved TE and TR, in seconds.

    Raises
    ------
    ProtocolError
        If ``te_ms`` or ``tr_ms`` is below its minimum (named, with the minimum).
    """
    delay_te = fill_delay(
        min_te_s, what="TE", key="te_ms", requested_ms=protocol.te_ms, scanner=scanner,
        raster_s=raster_s,
    )
    min_tr = fixed_tr_s + delay_te
    delay_tr = fill_delay(
        min_tr, what="TR", key="tr_ms", requested_ms=protocol.tr_ms, scanner=scanner,
        raster_s=raster_s,
    )
    return delay_te, delay_tr, min_te_s + delay_te, min_tr + delay_tr


def finalize(
    seq: pp.Sequence,
    protocol: Protocol,
    scanner: ScannerProfile,
    *,
    te_s: float | list[float],
    tr_s: float,
    trajectory: str,
    ordering: str,
    ti_s: float | list[float] | None = None,
    extra: dict[str, Any] | None = None,
) -> pp.Sequence:
    """Write the standard ``[DEFINITIONS]`` and verify timing and gradient limits.

    Definitions written (SI units, as Pulseq does): ``Name``, ``Builder``, ``FOV`` (m),
    ``MatrixSize``, ``TE``, ``TR``, ``TI`` (s), ``FlipAngle`` (deg, when defined),
    ``Trajectory``, ``KSpaceOrdering``, ``ReadoutOversampling``, ``SliceThickness`` (m),
    ``NumberOfSlices``, ``SlicePositions`` (m), ``Scanner``, ``Vendor``, ``B0`` (T),
    plus the builder's ``extra`` keys.

    Raises
    ------
    RuntimeError
        If the built sequence violates a raster or dead-time rule (a builder bug, not a
        user error).
    """
    fov = [float(f) * 1e-3 for f in protocol.fov_mm]
    matrix = [int(m) for m in protocol.matrix]
    if protocol.ndim == 2:
        fov.append(protocol.slice_thickness_mm * 1e-3)
        matrix.append(1)
    seq.set_definition("Name", protocol.name)
    seq.set_definition("Builder", protocol.builder)
    seq.set_definition("FOV", fov)
    seq.set_definition("MatrixSize", matrix)
    seq.set_definition("TE", [float(t) for t in np.atleast_1d(te_s)])
    seq.set_definition("TR", float(tr_s))
    if ti_s is not None:
        seq.set_definition("TI", [float(t) for t in np.atleast_1d(ti_s)])
    flip = getattr(protocol, "flip_deg", None)
    if flip is not None:
        seq.set_definition("FlipAngle", float(flip))
    seq.set_definition("Trajectory", trajectory)
    seq.set_definition("KSpaceOrdering", ordering)
    seq.set_definition("ReadoutOversampling", int(protocol.readout_oversampling))
    if protocol.ndim == 2:
        seq.set_definition("SliceThickness", protocol.slice_thickness_mm * 1e-3)
        seq.set_definition("NumberOfSlices", int(protocol.n_slices))
        seq.set_definition("SlicePositions", [float(p) for p in slice_positions_m(protocol)])
    seq.set_definition("Scanner", scanner.name)
    seq.set_definition("Vendor", scanner.vendor)
    seq.set_definition("B0", float(scanner.field_strength_t))
    for key, value in (extra or {}).items():
        seq.set_definition(key, value)
    ok, report = seq.check_timing()
    if not ok:
        first = report[0]
        raise RuntimeError(
            f"builder '{protocol.builder}' produced a timing error on {scanner.name} "
            f"(block {first.block}, {first.event}.{first.field}: {first.error_type})"
        )
    return seq
