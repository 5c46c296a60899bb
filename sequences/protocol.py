"""Protocols: what a physicist asks for, independent of any scanner.

A protocol is a TOML file with a ``builder`` key naming the sequence and the builder's
parameters, each with its unit in the name::

    builder = "gre2d"
    name = "t1w-gre"
    fov_mm = [256, 256]
    matrix = [128, 128]
    slice_thickness_mm = 5
    te_ms = 4.5
    tr_ms = 12
    flip_deg = 15

:func:`load_protocol` validates it into the frozen protocol class of that builder
(unknown keys, wrong units, wrong types and out-of-range values are errors naming the
key). Whether the protocol is *possible* on a given scanner is decided by the builder,
which raises :class:`~mrharmony.errors.ProtocolError` naming the parameter and limit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mrharmony.config import from_mapping, load_toml, param
from mrharmony.errors import ConfigError, ProtocolError

__all__ = [
    "FAT_SUPPRESSION_MODES",
    "MULTIBAND_PHASES",
    "PROTOCOL_CLASSES",
    "BSSFPProtocol",
    "DWIEPIProtocol",
    "EPIProtocol",
    "Gre2DProtocol",
    "Gre3DProtocol",
    "IRSEProtocol",
    "MPRAGEProtocol",
    "MultiEchoSEProtocol",
    "Protocol",
    "RadialProtocol",
    "SpiralProtocol",
    "TSEProtocol",
    "check_receive_channels",
    "load_protocol",
    "protocol_from_mapping",
]

#: Partial-Fourier fractions a protocol may ask for (5/8, 6/8, 7/8, off), as vendors offer.
PARTIAL_FOURIER_FRACTIONS: tuple[float, ...] = (5 / 8, 6 / 8, 7 / 8, 1.0)

#: Default number of integrated calibration (ACS) lines per accelerated axis (capped at
#: half the axis' lines for small matrices).
DEFAULT_ACS_LINES = 24


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """Parameters shared by every builder."""

    builder: str = param(doc="sequence builder name (see `mrharmony seq list`)")
    name: str = param(doc="protocol name, written to the .seq [DEFINITIONS]")
    te_ms: float = param(doc="echo time", unit="ms", gt=0, le=1000)
    tr_ms: float = param(doc="repetition time", unit="ms", gt=0, le=60000)
    readout_bandwidth_hz_per_px: float = param(
        260.0, doc="receiver bandwidth per pixel along the readout", unit="Hz/px", gt=10, le=20000
    )
    readout_oversampling: int = param(
        1, doc="readout oversampling factor (1 or 2)", ge=1, le=2
    )
    rf_duration_ms: float = param(
        2.0, doc="duration of the excitation pulse", unit="ms", gt=0.05, le=20
    )
    rf_time_bw_product: float = param(
        4.0, doc="time-bandwidth product of slice-selective pulses", gt=0.5, le=20
    )
    rf_apodization: float = param(
        0.5, doc="window of the sinc pulses: 0.5 Hanning, 0.46 Hamming, 0 none", ge=0, le=1
    )
    dummy_scans: int = param(0, doc="repetitions played without ADC before the scan", ge=0)

    #: Number of spatial dimensions of the encoding (2 for slices, 3 for slabs).
    ndim: int = 2
    #: True when the builder acquires a Cartesian grid of ``matrix`` points.
    cartesian: bool = True

    def __post_init__(self) -> None:
        if len(getattr(self, "fov_mm", ())) not in (0, self.ndim) or len(
            getattr(self, "matrix", ())
        ) not in (0, self.ndim):
            raise ConfigError(
                f"fov_mm and matrix need {self.ndim} values for builder '{self.builder}'"
            )

    @property
    def resolution_mm(self) -> tuple[float, ...]:
        """Nominal voxel size ``fov_mm / matrix`` in mm."""
        return tuple(f / n for f, n in zip(self.fov_mm, self.matrix, strict=True))


@dataclass(frozen=True, kw_only=True)
class _Slices2D(Protocol):
    fov_mm: tuple[float, ...] = param(
        doc="in-plane field of view [readout, phase]", unit="mm", gt=1, le=600, length=2
    )
    matrix: tuple[int, ...] = param(
        doc="in-plane matrix [readout, phase]", ge=8, le=1024, length=2
    )
    slice_thickness_mm: float = param(doc="slice thickness", unit="mm", gt=0.2, le=100)
    n_slices: int = param(1, doc="number of slices", ge=1, le=256)
    slice_gap_mm: float = param(0.0, doc="gap between slices", unit="mm", ge=0, le=100)


@dataclass(frozen=True, kw_only=True)
class _Volume3D(Protocol):
    fov_mm: tuple[float, ...] = param(
        doc="field of view [readout, phase, partition]", unit="mm", gt=1, le=600, length=3
    )
    matrix: tuple[int, ...] = param(
        doc="matrix [readout, phase, partition]", ge=4, le=1024, length=3
    )
    ndim: int = 3


@dataclass(frozen=True, kw_only=True)
class _SpoilerMoments:
    """Spoiler and crusher moments (vendors choose different ones: see simulation.native)."""

    spoiler_cycles_per_voxel: float = param(
        2.0, doc="readout-axis spoiler after the readout, in cycles across a voxel", ge=0, le=20
    )
    crusher_cycles_per_slice: float = param(
        4.0, doc="slice-axis spoiler / crusher area, in cycles across the slice", ge=0, le=40
    )


#: Fat suppression methods a protocol may ask for (see ``builders/_fat.py``).
FAT_SUPPRESSION_MODES: tuple[str, ...] = ("none", "chemsat", "water_excitation")


@dataclass(frozen=True, kw_only=True)
class _FatSuppression:
    """Fat suppression: spectrally selective fat saturation or binomial water excitation."""

    fat_suppression: Literal["none", "chemsat", "water_excitation"] = param(
        "none", doc="fat suppression: none, chemsat (spectrally selective fat saturation + "
        "spoiler before each excitation) or water_excitation (binomial slice-selective "
        "sub-pulses 1/(2 x fat-water shift) apart; rf_duration_ms is each sub-pulse's)",
    )
    fat_sat_flip_deg: float = param(
        90.0, doc="flip angle of the chemsat fat-saturation pulse", unit="deg", ge=45, le=180
    )
    water_excitation_binomial: Literal["1-1", "1-2-1"] = param(
        "1-1", doc="binomial water-excitation pulse: 1-1 (two halves) or 1-2-1 (quarters, a "
        "broader fat null)",
    )


def _check_axis(
    *, n: int, r: int, acs: int | None, pf: float, keys: tuple[str, str, str], axis: str
) -> None:
    """Refuse an acceleration / ACS / partial-Fourier setting one encoding axis cannot have."""
    r_key, acs_key, pf_key = keys
    if not any(abs(pf - f) < 1e-9 for f in PARTIAL_FOURIER_FRACTIONS):
        raise ProtocolError(
            f"{pf_key}: {pf:g} is not an offered partial-Fourier fraction (5/8 = 0.625, "
            f"6/8 = 0.75, 7/8 = 0.875, or 1 for off)"
        )
    if r > max(n // 2, 1):
        raise ProtocolError(
            f"{r_key}: {r} is above the maximum {max(n // 2, 1)} for the {n} {axis} lines "
            f"(an acceleration keeps at least two lines)"
        )
    if acs is None:
        return
    if r == 1 and acs > 0:
        raise ProtocolError(
            f"{acs_key}: {acs} calibration lines need {r_key} > 1 (the {axis} axis is fully "
            f"sampled)"
        )
    if acs > n:
        raise ProtocolError(f"{acs_key}: {acs} is above the {n} {axis} lines of the matrix")
    n_keep = partial_fourier_lines(n, pf)
    top = n // 2 - acs // 2 + acs - 1
    if acs > 0 and top >= n_keep:
        most = 2 * (n_keep - n // 2)  # symmetric ACS block inside the kept lines
        raise ProtocolError(
            f"{acs_key}: {acs} calibration lines reach {axis} line {top}, beyond the "
            f"{n_keep} lines {pf_key} = {pf:g} keeps (maximum {most} calibration lines)"
        )


def partial_fourier_lines(n: int, fraction: float) -> int:
    """Number of lines ``ceil(fraction * n)`` partial Fourier keeps (from ``-k_max``).

    Parameters
    ----------
    n : int
        Lines of the full matrix along the axis.
    fraction : float
        Partial-Fourier fraction (1 keeps every line).

    Returns
    -------
    int
        Lines ``0 .. n_keep - 1`` are sampled (FFT convention: the centre ``n // 2`` is
        always among them for fractions >= 5/8).
    """
    return min(n, math.ceil(fraction * n - 1e-9))


@dataclass(frozen=True, kw_only=True)
class _Accelerated2D:
    """In-plane undersampling along phase: GRAPPA/SENSE-style regular pattern + ACS + PF."""

    acceleration: int = param(
        1, doc="in-plane acceleration R along phase (every R-th line; 1: fully sampled)",
        ge=1, le=16,
    )
    acs_lines: int | None = param(
        None, doc="integrated fully sampled calibration lines at the k-space centre "
        "(default 24 when acceleration > 1, at most half the phase lines)", ge=0, le=1024,
    )
    partial_fourier_fraction: float = param(
        1.0, doc="partial Fourier along phase: 0.625, 0.75, 0.875 or 1 (off); the lines from "
        "-ky_max are kept", gt=0.5, le=1,
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        _check_axis(
            n=int(self.matrix[1]), r=self.acceleration, acs=self.acs_lines,  # type: ignore[attr-defined]
            pf=self.partial_fourier_fraction,
            keys=("acceleration", "acs_lines", "partial_fourier_fraction"), axis="phase",
        )

    @property
    def calibration_lines(self) -> tuple[int, ...]:
        """ACS lines per accelerated axis (phase[, partition]) after the defaults."""
        return (_acs_default(int(self.matrix[1]), self.acceleration, self.acs_lines),)  # type: ignore[attr-defined]

    @property
    def accelerations(self) -> tuple[int, ...]:
        """Acceleration per phase-encoding axis (phase[, partition])."""
        return (self.acceleration,)

    @property
    def partial_fourier(self) -> tuple[float, ...]:
        """Partial-Fourier fraction per phase-encoding axis (phase[, partition])."""
        return (self.partial_fourier_fraction,)


@dataclass(frozen=True, kw_only=True)
class _Accelerated3D:
    """Undersampling along phase and partition: a regular 2D pattern + ACS block + PF."""

    acceleration: int = param(
        1, doc="acceleration R along phase (every R-th line; 1: fully sampled)", ge=1, le=16,
    )
    acceleration_partition: int = param(
        1, doc="acceleration along partitions (every R-th partition; 1: fully sampled)",
        ge=1, le=16,
    )
    acs_lines: int | None = param(
        None, doc="calibration lines along phase in the fully sampled k-space-centre block "
        "(default 24 when acceleration > 1, at most half the lines; all lines when phase is "
        "not accelerated)", ge=0, le=1024,
    )
    acs_lines_partition: int | None = param(
        None, doc="calibration partitions in the fully sampled k-space-centre block "
        "(default 24 when acceleration_partition > 1, at most half the partitions; all "
        "partitions when partitions are not accelerated)", ge=0, le=1024,
    )
    partial_fourier_fraction: float = param(
        1.0, doc="partial Fourier along phase: 0.625, 0.75, 0.875 or 1 (off)", gt=0.5, le=1,
    )
    partial_fourier_fraction_partition: float = param(
        1.0, doc="partial Fourier along partitions: 0.625, 0.75, 0.875 or 1 (off)", gt=0.5,
        le=1,
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        ny, nz = int(self.matrix[1]), int(self.matrix[2])  # type: ignore[attr-defined]
        _check_axis(
            n=ny, r=self.acceleration, acs=self.acs_lines, pf=self.partial_fourier_fraction,
            keys=("acceleration", "acs_lines", "partial_fourier_fraction"), axis="phase",
        )
        _check_axis(
            n=nz, r=self.acceleration_partition, acs=self.acs_lines_partition,
            pf=self.partial_fourier_fraction_partition,
            keys=("acceleration_partition", "acs_lines_partition",
                  "partial_fourier_fraction_partition"), axis="partition",
        )

    @property
    def calibration_lines(self) -> tuple[int, ...]:
        """ACS lines per accelerated axis (phase, partition) after the defaults."""
        ny, nz = int(self.matrix[1]), int(self.matrix[2])  # type: ignore[attr-defined]
        return (_acs_default(ny, self.acceleration, self.acs_lines),
                _acs_default(nz, self.acceleration_partition, self.acs_lines_partition))

    @property
    def accelerations(self) -> tuple[int, ...]:
        """Acceleration per phase-encoding axis (phase, partition)."""
        return (self.acceleration, self.acceleration_partition)

    @property
    def partial_fourier(self) -> tuple[float, ...]:
        """Partial-Fourier fraction per phase-encoding axis (phase, partition)."""
        return (self.partial_fourier_fraction, self.partial_fourier_fraction_partition)


#: Multiband (SMS) band-phase schedules (see ``builders/_sms.py``).
MULTIBAND_PHASES: tuple[str, ...] = ("zero", "wong")


@dataclass(frozen=True, kw_only=True)
class _Multiband:
    """Simultaneous multi-slice: multiband excitation with CAIPI by RF phase cycling."""

    multiband_factor: int = param(
        1, doc="slices excited together by one multiband pulse (1: off; n_slices must be a "
        "multiple)", ge=1, le=4,
    )
    caipi_shift: float | None = param(
        None, doc="CAIPI shift of slice j of a group, j x caipi_shift x FOV along phase, as "
        "a fraction of the FOV (default 1 / multiband_factor; x matrix[1] must be whole "
        "pixels)", ge=0, lt=1,
    )
    multiband_phases: Literal["zero", "wong"] = param(
        "wong", doc="band phases of the multiband pulse: zero (plain sum) or wong (Wong 2012 "
        "peak-B1-minimising schedule; same as zero for multiband_factor 2)",
    )
    multiband_reference_lines: int | None = param(
        None, doc="centre phase lines of the single-band reference (each slice alone, the "
        "slice-GRAPPA/SENSE calibration; default all lines)", ge=8, le=1024,
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]
        mb = self.multiband_factor
        if mb == 1:
            for key in ("caipi_shift", "multiband_reference_lines"):
                if getattr(self, key) is not None:
                    raise ProtocolError(f"{key}: needs multiband_factor > 1")
            return
        n = int(self.n_slices)  # type: ignore[attr-defined]
        ny = int(self.matrix[1])  # type: ignore[attr-defined]
        if n % mb:
            raise ProtocolError(
                f"n_slices: {n} is not a multiple of multiband_factor {mb} (each slice group "
                f"holds {mb} slices)")
        pixels = self.caipi_shift_fraction * ny
        if abs(pixels - round(pixels)) > 1e-6:
            raise ProtocolError(
                f"caipi_shift: {self.caipi_shift_fraction:g} x {ny} phase lines = {pixels:g} "
                f"pixels; the shift must be a whole number of pixels")
        if self.acceleration > 1 or self.partial_fourier_fraction < 1:  # type: ignore[attr-defined]
            raise ProtocolError(
                "multiband_factor: in-plane acceleration or partial Fourier together with "
                "multiband is not supported (the slice separation needs full k-space)")
        if getattr(self, "fat_suppression", "none") == "water_excitation":
            raise ProtocolError(
                "multiband_factor: water_excitation sub-pulses are single-band; use "
                "fat_suppression = 'chemsat' with multiband")
        if self.reference_lines > ny:
            raise ProtocolError(
                f"multiband_reference_lines: {self.reference_lines} is above the {ny} phase "
                "lines of the matrix")

    @property
    def caipi_shift_fraction(self) -> float:
        """CAIPI shift per slice of a group, fraction of the phase FOV (after the default)."""
        if self.caipi_shift is not None:
            return float(self.caipi_shift)
        return 1.0 / self.multiband_factor if self.multiband_factor > 1 else 0.0

    @property
    def reference_lines(self) -> int:
        """Phase lines of the single-band reference (0 without multiband)."""
        if self.multiband_factor <= 1:
            return 0
        if self.multiband_reference_lines is not None:
            return int(self.multiband_reference_lines)
        return int(self.matrix[1])  # type: ignore[attr-defined]


def _acs_default(n: int, r: int, acs: int | None) -> int:
    """ACS lines of an axis: as given, else 24 (at most ``n // 2``) when accelerated, else 0."""
    if acs is not None:
        return int(acs)
    return min(DEFAULT_ACS_LINES, n // 2) if r > 1 else 0


def check_receive_channels(protocol: Protocol, channels: int) -> None:
    """Refuse a protocol whose total acceleration exceeds a site's receive channels.

    The scanner profile does not know the coil; the site does. Call this where a protocol
    meets a site (study preflight, simulation).

    Parameters
    ----------
    protocol : Protocol
        Any protocol (those without acceleration keys always pass).
    channels : int
        Receive channels of the site's coil.

    Raises
    ------
    ProtocolError
        If ``acceleration`` (x ``acceleration_partition``) is above ``channels``.
    """
    total = 1
    for r in getattr(protocol, "accelerations", (1,)):
        total *= int(r)
    if total > 1 and total > channels:
        key = ("acceleration x acceleration_partition"
               if getattr(protocol, "acceleration_partition", 1) > 1 else "acceleration")
        raise ProtocolError(
            f"{key}: total acceleration {total} is above the {channels} receive channel(s) of "
            f"the site's coil (parallel imaging needs at least R channels)"
        )


@dataclass(frozen=True, kw_only=True)
class Gre2DProtocol(_Multiband, _Accelerated2D, _Slices2D, _SpoilerMoments, _FatSuppression):
    """2D multi-slice RF-spoiled gradient echo."""

    builder: Literal["gre2d"] = param(doc="sequence builder name")
    flip_deg: float = param(doc="excitation flip angle", unit="deg", gt=0, le=90)
    rf_spoiling_inc_deg: float = param(
        117.0, doc="quadratic RF-spoiling phase increment", unit="deg", ge=0, lt=360
    )


@dataclass(frozen=True, kw_only=True)
class Gre3DProtocol(_Accelerated3D, _Volume3D, _SpoilerMoments, _FatSuppression):
    """3D RF-spoiled gradient echo with slab-selective excitation."""

    builder: Literal["gre3d"] = param(doc="sequence builder name")
    flip_deg: float = param(doc="excitation flip angle", unit="deg", gt=0, le=90)
    rf_spoiling_inc_deg: float = param(
        117.0, doc="quadratic RF-spoiling phase increment", unit="deg", ge=0, lt=360
    )


@dataclass(frozen=True, kw_only=True)
class MultiEchoSEProtocol(_Slices2D, _SpoilerMoments):
    """Multi-echo spin echo (CPMG) for T2 mapping: echoes at ``te_ms * (1..n_echoes)``."""

    builder: Literal["mese"] = param(doc="sequence builder name")
    n_echoes: int = param(doc="number of echoes per excitation", ge=1, le=64)
    refocusing_flip_deg: float = param(
        180.0, doc="refocusing flip angle", unit="deg", gt=0, le=180
    )


@dataclass(frozen=True, kw_only=True)
class IRSEProtocol(_Slices2D, _SpoilerMoments):
    """Inversion-recovery spin echo with a list of inversion times (T1 mapping)."""

    builder: Literal["irse"] = param(doc="sequence builder name")
    ti_ms: tuple[float, ...] = param(
        doc="inversion times, one contrast each", unit="ms", gt=0, le=30000, min_length=1
    )


@dataclass(frozen=True, kw_only=True)
class MPRAGEProtocol(_Accelerated3D, _Volume3D, _FatSuppression):
    """3D MPRAGE (T1-weighted): one inversion per partition, a spoiled GRE train after it."""

    builder: Literal["mprage"] = param(doc="sequence builder name")
    ti_ms: float = param(
        doc="inversion time to the centre of k-space", unit="ms", gt=0, le=5000
    )
    flip_deg: float = param(9.0, doc="readout flip angle", unit="deg", gt=0, le=90)
    echo_spacing_ms: float | None = param(
        None, doc="GRE repetition time inside the train (default: minimum)", unit="ms", gt=0,
        le=100,
    )
    rf_spoiling_inc_deg: float = param(
        117.0, doc="quadratic RF-spoiling phase increment", unit="deg", ge=0, lt=360
    )


@dataclass(frozen=True, kw_only=True)
class TSEProtocol(_Accelerated2D, _Slices2D, _SpoilerMoments, _FatSuppression):
    """2D turbo spin echo; ``te_ms`` is the effective TE (ky = 0)."""

    builder: Literal["tse"] = param(doc="sequence builder name")
    turbo_factor: int = param(doc="echoes per excitation", ge=1, le=256)
    refocusing_flip_deg: float = param(
        180.0, doc="refocusing flip angle", unit="deg", gt=0, le=180
    )


@dataclass(frozen=True, kw_only=True)
class EPIProtocol(_Accelerated2D, _Slices2D, _FatSuppression):
    """Single-shot 2D gradient-echo EPI with navigator lines for ghost correction."""

    builder: Literal["epi"] = param(doc="sequence builder name")
    flip_deg: float = param(90.0, doc="excitation flip angle", unit="deg", gt=0, le=90)
    readout_bandwidth_hz_per_px: float = param(
        1500.0, doc="receiver bandwidth per pixel along the readout", unit="Hz/px", gt=10,
        le=20000,
    )
    ramp_sampling: bool = param(False, doc="sample on the readout ramps")
    navigator_lines: int = param(3, doc="non-phase-encoded lines for ghost correction", ge=0, le=8)
    acs_lines: int | None = param(
        None, doc="calibration lines of the separate reference scan at the k-space centre "
        "(default 24 when acceleration > 1, at most half the phase lines)", ge=0, le=1024,
    )
    acs_mode: Literal["separate"] = param(
        "separate", doc="calibration: a separate non-accelerated segmented EPI reference "
        "(acceleration shots per slice, same echo spacing) before the imaging",
    )


@dataclass(frozen=True, kw_only=True)
class DWIEPIProtocol(_Accelerated2D, _Slices2D, _FatSuppression):
    """Diffusion-weighted single-shot spin-echo EPI (Stejskal-Tanner PGSE)."""

    builder: Literal["dwi_epi"] = param(doc="sequence builder name")
    b_values_s_per_mm2: tuple[float, ...] = param(
        doc="b-values; 0 gives a non-diffusion-weighted image", unit="s/mm2", ge=0, le=20000,
        min_length=1,
    )
    n_directions: int = param(
        6, doc="diffusion directions per non-zero b-value (electrostatic-repulsion set)",
        ge=1, le=256,
    )
    readout_bandwidth_hz_per_px: float = param(
        1500.0, doc="receiver bandwidth per pixel along the readout", unit="Hz/px", gt=10,
        le=20000,
    )
    ramp_sampling: bool = param(False, doc="sample on the readout ramps")
    navigator_lines: int = param(3, doc="non-phase-encoded lines for ghost correction", ge=0, le=8)
    acs_lines: int | None = param(
        None, doc="calibration lines of the separate reference scan at the k-space centre "
        "(default 24 when acceleration > 1, at most half the phase lines)", ge=0, le=1024,
    )
    acs_mode: Literal["separate"] = param(
        "separate", doc="calibration: a separate non-accelerated segmented EPI reference "
        "(acceleration shots per slice, same echo spacing) before the imaging",
    )


@dataclass(frozen=True, kw_only=True)
class BSSFPProtocol(_Slices2D):
    """2D balanced SSFP; TE is TR/2 by construction."""

    builder: Literal["bssfp"] = param(doc="sequence builder name")
    flip_deg: float = param(doc="excitation flip angle", unit="deg", gt=0, le=180)
    rf_time_bw_product: float = param(
        2.0, doc="time-bandwidth product of the excitation", gt=0.5, le=20
    )
    rf_duration_ms: float = param(0.8, doc="duration of the excitation", unit="ms", gt=0.05, le=20)
    readout_bandwidth_hz_per_px: float = param(
        800.0, doc="receiver bandwidth per pixel along the readout", unit="Hz/px", gt=10,
        le=20000,
    )


@dataclass(frozen=True, kw_only=True)
class RadialProtocol(_Slices2D):
    """2D radial spoiled GRE; each spoke passes through the k-space centre."""

    builder: Literal["radial"] = param(doc="sequence builder name")
    flip_deg: float = param(doc="excitation flip angle", unit="deg", gt=0, le=90)
    n_spokes: int = param(doc="number of spokes", ge=1, le=100000)
    angle_ordering: Literal["linear", "golden"] = param(
        "linear", doc="spoke angle ordering: linear over 180 deg, or golden angle (111.25 deg)"
    )
    rf_spoiling_inc_deg: float = param(
        117.0, doc="quadratic RF-spoiling phase increment", unit="deg", ge=0, lt=360
    )
    cartesian: bool = False


@dataclass(frozen=True, kw_only=True)
class SpiralProtocol(_Slices2D):
    """2D spiral-out spoiled GRE with interleaves, gradient- and slew-limited design."""

    builder: Literal["spiral"] = param(doc="sequence builder name")
    flip_deg: float = param(doc="excitation flip angle", unit="deg", gt=0, le=90)
    n_interleaves: int = param(doc="number of spiral interleaves", ge=1, le=1024)
    readout_bandwidth_hz_per_px: float = param(
        0.0, doc="unused for spirals (the ADC dwell is the gradient raster)", unit="Hz/px", ge=0
    )
    adc_dwell_us: float = param(
        4.0, doc="ADC dwell time along the spiral", unit="us", gt=0.1, le=100
    )
    rf_spoiling_inc_deg: float = param(
        117.0, doc="quadratic RF-spoiling phase increment", unit="deg", ge=0, lt=360
    )
    cartesian: bool = False


PROTOCOL_CLASSES: dict[str, type[Protocol]] = {
    "gre2d": Gre2DProtocol,
    "gre3d": Gre3DProtocol,
    "mese": MultiEchoSEProtocol,
    "irse": IRSEProtocol,
    "mprage": MPRAGEProtocol,
    "tse": TSEProtocol,
    "epi": EPIProtocol,
    "dwi_epi": DWIEPIProtocol,
    "bssfp": BSSFPProtocol,
    "radial": RadialProtocol,
    "spiral": SpiralProtocol,
}


def protocol_from_mapping(data: Mapping[str, Any], *, source: str = "protocol") -> Protocol:
    """Validate a mapping (e.g. parsed TOML) into the protocol class its ``builder`` names.

    Raises
    ------
    ConfigError
        Missing or unknown ``builder``, or any invalid key of that builder.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table of keys")
    builder = data.get("builder")
    if builder is None:
        raise ConfigError(
            f"{source}: builder: missing required key (one of {', '.join(PROTOCOL_CLASSES)})"
        )
    if builder not in PROTOCOL_CLASSES:
        import difflib

        close = difflib.get_close_matches(str(builder), PROTOCOL_CLASSES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"{source}: builder: unknown builder {builder!r}{hint} "
            f"(one of {', '.join(PROTOCOL_CLASSES)})"
        )
    cls = PROTOCOL_CLASSES[builder]
    hidden = {"ndim", "cartesian"} & set(data)
    if hidden:
        raise ConfigError(f"{source}: {sorted(hidden)[0]}: unknown key (set by the builder)")
    return from_mapping(cls, data, source=source)


def load_protocol(path: str | Path) -> Protocol:
    """Read and validate a protocol TOML file.

    Parameters
    ----------
    path : str or Path
        The protocol file.

    Returns
    -------
    Protocol
        A frozen instance of the builder's protocol class.

    Raises
    ------
    ConfigError
        If the file is missing, not TOML, or any key is invalid (the message names it).
    """
    return protocol_from_mapping(load_toml(path), source=str(path))

