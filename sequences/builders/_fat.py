"""Fat suppression for the Cartesian and EPI builders: chemsat and binomial water excitation.

Both methods act on the fat-water chemical shift ``Δf = -3.4 ppm x γ̄ x B0`` (Hz) of the
scanner's field (:func:`fat_offset_hz`: -217 Hz at 1.5 T, -434 Hz at 3 T):

- **chemsat** (:class:`ChemSat`): a non-selective Gaussian pulse (Pulseq RF use
  ``saturation``) centred on fat (``freq_offset = Δf``), of bandwidth
  ``CHEMSAT_BANDWIDTH_FRACTION x |Δf|`` (the Gaussian's ``exp(-π (f / BW)^2)`` spectral
  profile: FWHM 0.94 BW; at the water frequency the small-tip flip is
  ``exp(-π / 0.8^2) = 0.7 %`` of the fat flip) and time-bandwidth product
  ``CHEMSAT_TIME_BW_PRODUCT`` (duration ``TBW / BW``: 14.4 ms at 1.5 T, 7.2 ms at 3 T),
  flip ``fat_sat_flip_deg``, followed by a spoiler of ``CHEMSAT_SPOILER_CYCLES`` cycles
  across a voxel on x and y and across the slice (3-D: the partition) on z. Its RF phase
  is cycled quadratically (117 deg) from pulse to pulse, so that successive saturation
  pulses form no stimulated echoes. The builders play it right before every excitation
  (2-D: every slice excitation; 3-D GRE: every TR); it is refused (``ProtocolError``)
  when its peak B1 exceeds the scanner's ``max_b1_ut`` and, by the builders' own TR
  checks, when it does not fit in TR.
- **water excitation** (:class:`WaterExcitation`): the excitation becomes a binomial
  train (1-1: two sub-pulses of flip/2; 1-2-1: flip/4, flip/2, flip/4), each a
  slice-/slab-selective sinc of ``rf_duration_ms`` with its own select gradient, a
  rewinder of area ``-gz.area`` between them, centres ``1 / (2 |Δf|)`` apart (on the
  block raster; ``3 / (2 |Δf|)`` when the sub-pulses do not fit into the shorter spacing,
  :data:`WATER_EXCITATION_SPACINGS`), so fat precesses by 180 deg (540 deg) between
  sub-pulses and ends where it began
  (on resonance: exactly, ``Rx(a) Rz(π) Rx(a)`` leaves ``Mz`` unchanged) while water
  receives the full flip. The composite's centre (the midpoint of its first and last
  sub-pulse centres) is the excitation centre TE is measured from. Every sub-pulse has RF
  use ``excitation`` (pypulseq stores identical sub-pulses as one library event, so they
  cannot carry different uses); readers that reset k-space at each excitation see the
  same k-space whichever sub-pulse they start from, because the gradient area from any
  sub-pulse centre to the end of the rephaser is zero, and slice offsets are taken from
  the last excitation before each readout. Refused when a sub-pulse block (dead time, ramps,
  ``rf_duration_ms``, ring-down) and the rewinder do not fit into the spacing, naming the
  longest sub-pulse that fits.

``[DEFINITIONS]`` (only when fat suppression is on, so other files are unchanged):
``FatSuppression`` (``chemsat`` / ``water_excitation``), ``FatWaterShift`` (Hz), and
``FatSatFlipAngle`` (deg), ``FatSatBandwidth`` (Hz), ``FatSatDuration`` (s), or
``WaterExcitation`` (``1-1`` / ``1-2-1``), ``WaterExcitationSpacing`` (s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pypulseq as pp

from mrharmony.errors import ProtocolError
from mrharmony.sequences.builders._common import (
    excitation_pulse,
    rf_center_time,
    round_to,
    round_up,
    set_slice_offset,
    trapezoid,
)
from mrharmony.sequences.scanner import GAMMA_HZ_PER_T, ScannerProfile

__all__ = [
    "CHEMSAT_BANDWIDTH_FRACTION",
    "CHEMSAT_SPOILER_CYCLES",
    "CHEMSAT_TIME_BW_PRODUCT",
    "FAT_SHIFT_PPM",
    "WATER_EXCITATION_SPACINGS",
    "ChemSat",
    "WaterExcitation",
    "add_excitation",
    "fat_definitions",
    "fat_modules",
    "fat_offset_hz",
    "make_chemsat",
    "make_water_excitation",
]

#: Chemical shift of the main (methylene) fat peak relative to water, ppm.
FAT_SHIFT_PPM = -3.4
#: Bandwidth of the chemsat pulse as a fraction of the fat-water shift.
CHEMSAT_BANDWIDTH_FRACTION = 0.8
#: Time-bandwidth product of the Gaussian chemsat pulse (edges at exp(-π 1.25^2) = 0.7 %).
CHEMSAT_TIME_BW_PRODUCT = 2.5
#: Spoiler after the chemsat pulse: cycles across a voxel (x, y) and the slice/partition (z).
CHEMSAT_SPOILER_CYCLES = 8.0
#: Quadratic phase increment of successive chemsat pulses, rad.
_CHEMSAT_PHASE_INC = math.radians(117.0)
_BINOMIALS = {"1-1": (1, 1), "1-2-1": (1, 2, 1)}
#: Sub-pulse spacings tried, in units of 1/(2 |Δf|): fat precesses by an odd multiple of
#: 180 deg between sub-pulses; 3x only when the sub-pulses do not fit 1x (the water pass
#: band narrows with the spacing: |cos(π f τ)| for 1-1).
WATER_EXCITATION_SPACINGS: tuple[int, ...] = (1, 3)


def fat_offset_hz(scanner: ScannerProfile) -> float:
    """Fat-water chemical shift at the scanner's field, Hz (negative: fat below water).

    ``FAT_SHIFT_PPM x 1e-6 x γ̄ x B0`` with γ̄ = 42.576 MHz/T (-434.3 Hz at 3 T).
    """
    return FAT_SHIFT_PPM * 1e-6 * GAMMA_HZ_PER_T * scanner.field_strength_t


def _peak_b1_ut(rf: SimpleNamespace) -> float:
    return float(np.max(np.abs(rf.signal))) / GAMMA_HZ_PER_T * 1e6


def _check_b1(rf: SimpleNamespace, scanner: ScannerProfile, *, what: str, key: str) -> None:
    b1 = _peak_b1_ut(rf)
    if b1 > scanner.max_b1_ut:
        raise ProtocolError(
            f"{key}: the {what} needs a peak B1 of {b1:.1f} uT, above the "
            f"{scanner.max_b1_ut:g} uT {scanner.name} allows (max_b1_ut)"
        )


@dataclass
class ChemSat:
    """A spectrally selective fat-saturation module: Gaussian pulse + spoiler block."""

    rf: SimpleNamespace
    spoilers: list[SimpleNamespace]
    t_rf: float
    t_spoil: float
    bandwidth_hz: float
    offset_hz: float
    flip_deg: float
    _phase: float = field(default=0.0, repr=False)
    _inc: float = field(default=0.0, repr=False)

    @property
    def duration(self) -> float:
        """Module duration (s): pulse block + spoiler block."""
        return self.t_rf + self.t_spoil

    def add_to(self, seq: pp.Sequence, labels: list[SimpleNamespace] | None = None) -> None:
        """Append the pulse (with ``labels``, e.g. TRID) and its spoiler to ``seq``."""
        self.rf.phase_offset = self._phase
        self._inc = (self._inc + _CHEMSAT_PHASE_INC) % (2 * math.pi)
        self._phase = (self._phase + self._inc) % (2 * math.pi)
        seq.add_block(self.rf, pp.make_delay(self.t_rf), *(labels or []))
        seq.add_block(*self.spoilers, pp.make_delay(self.t_spoil))

    def definitions(self) -> dict[str, Any]:
        """``[DEFINITIONS]`` of the module."""
        return {
            "FatSuppression": "chemsat",
            "FatWaterShift": self.offset_hz,
            "FatSatFlipAngle": self.flip_deg,
            "FatSatBandwidth": self.bandwidth_hz,
            "FatSatDuration": float(self.rf.shape_dur),
        }


def make_chemsat(
    system: pp.Opts,
    scanner: ScannerProfile,
    protocol: Any,
    *,
    voxel_m: tuple[float, float, float],
) -> ChemSat:
    """Design the chemsat module for a protocol on a scanner (see the module docstring).

    Parameters
    ----------
    system : pypulseq.Opts
        Scanner limits.
    scanner : ScannerProfile
        The scanner (field strength, B1 limit, name for errors).
    protocol : Protocol
        With ``fat_sat_flip_deg``.
    voxel_m : (float, float, float)
        Voxel size along x, y and z (slice thickness or partition), m: the spoiler winds
        ``CHEMSAT_SPOILER_CYCLES`` cycles across each.

    Raises
    ------
    ProtocolError
        If the pulse's peak B1 exceeds the scanner's ``max_b1_ut``.
    """
    offset = fat_offset_hz(scanner)
    bandwidth = CHEMSAT_BANDWIDTH_FRACTION * abs(offset)
    duration = round_up(CHEMSAT_TIME_BW_PRODUCT / bandwidth, system.block_duration_raster)
    rf = pp.make_gauss_pulse(
        flip_angle=math.radians(protocol.fat_sat_flip_deg),
        duration=duration,
        bandwidth=bandwidth,
        freq_offset=offset,
        delay=system.rf_dead_time,
        system=system,
        use="saturation",
    )
    _check_b1(rf, scanner, what=f"chemsat pulse ({duration * 1e3:.3g} ms Gaussian, "
              f"{protocol.fat_sat_flip_deg:g} deg)", key="fat_suppression")
    raster = system.block_duration_raster
    t_rf = round_up(pp.calc_duration(rf), raster)
    grads = [pp.make_trapezoid(channel=ch, area=CHEMSAT_SPOILER_CYCLES / v, system=system)
             for ch, v in zip("xyz", voxel_m, strict=True)]
    t_spoil = round_up(max(pp.calc_duration(g) for g in grads), raster)
    spoilers = [trapezoid(channel=g.channel, area=g.area, duration=t_spoil, system=system)
                for g in grads]
    return ChemSat(rf=rf, spoilers=spoilers, t_rf=t_rf, t_spoil=t_spoil,
                   bandwidth_hz=bandwidth, offset_hz=offset,
                   flip_deg=float(protocol.fat_sat_flip_deg))


@dataclass
class WaterExcitation:
    """A binomial, slice-/slab-selective water-excitation train."""

    rfs: list[SimpleNamespace]
    #: The select gradient of every sub-pulse (its ``area`` sizes the rephaser, -area/2).
    gz: SimpleNamespace
    gz_rew: SimpleNamespace
    t_sub: float
    t_rew: float
    spacing_s: float
    target_spacing_s: float
    binomial: str

    @property
    def duration(self) -> float:
        """Total duration of the train's blocks (s)."""
        n = len(self.rfs)
        return n * self.t_sub + (n - 1) * self.t_rew

    @property
    def centre_s(self) -> float:
        """Time from the start of the first block to the composite centre (s)."""
        return rf_center_time(self.rfs[0]) + (len(self.rfs) - 1) / 2 * self.spacing_s

    def add_to(
        self,
        seq: pp.Sequence,
        *,
        position_m: float = 0.0,
        phase_rad: float = 0.0,
        labels: list[SimpleNamespace] | None = None,
    ) -> None:
        """Append the train for a slice at ``position_m`` with RF phase ``phase_rad``."""
        for i, rf in enumerate(self.rfs):
            set_slice_offset(rf, self.gz.amplitude, position_m)
            rf.phase_offset += phase_rad
            if i > 0:
                seq.add_block(self.gz_rew, pp.make_delay(self.t_rew))
            first = (labels or []) if i == 0 else []
            seq.add_block(rf, self.gz, pp.make_delay(self.t_sub), *first)

    def definitions(self, scanner: ScannerProfile) -> dict[str, Any]:
        """``[DEFINITIONS]`` of the train."""
        return {
            "FatSuppression": "water_excitation",
            "FatWaterShift": fat_offset_hz(scanner),
            "WaterExcitation": self.binomial,
            "WaterExcitationSpacing": self.spacing_s,
        }


def make_water_excitation(
    system: pp.Opts,
    scanner: ScannerProfile,
    protocol: Any,
    *,
    flip_deg: float,
    thickness_m: float,
    parameter: str = "slice_thickness_mm",
) -> WaterExcitation:
    """Design the binomial water excitation of a protocol (see the module docstring).

    Parameters
    ----------
    system : pypulseq.Opts
        Scanner limits.
    scanner : ScannerProfile
        The scanner (field strength for the spacing, name for errors).
    protocol : Protocol
        ``rf_duration_ms`` (each sub-pulse), ``rf_time_bw_product``, ``rf_apodization``,
        ``water_excitation_binomial``.
    flip_deg : float
        Total flip angle for water (deg).
    thickness_m : float
        Slice or slab thickness (m).
    parameter : str
        Protocol key named when the thickness is too thin for the sub-pulses.

    Raises
    ------
    ProtocolError
        If a sub-pulse and the rewinder fit into neither ``1 / (2 |Δf|)`` nor
        ``3 / (2 |Δf|)`` (names the longest ``rf_duration_ms`` that fits the latter), a
        sub-pulse's B1 is above the scanner's limit, or the slice is too thin for it.
    """
    weights = _BINOMIALS[protocol.water_excitation_binomial]
    raster = system.block_duration_raster
    shift = abs(fat_offset_hz(scanner))

    def design(duration_s: float) -> tuple[list[SimpleNamespace], SimpleNamespace, float, float]:
        rfs = []
        gz = None
        for w in weights:
            rf, gz, _ = excitation_pulse(
                system, scanner, apodization=protocol.rf_apodization,
                flip_deg=flip_deg * w / sum(weights), duration_s=duration_s,
                time_bw_product=protocol.rf_time_bw_product, thickness_m=thickness_m,
                parameter=parameter, use="excitation",
            )
            rfs.append(rf)
        t_sub = round_up(pp.calc_duration(rfs[0], gz), raster)
        rew = pp.make_trapezoid(channel="z", area=-gz.area, system=system)
        return rfs, gz, t_sub, round_up(pp.calc_duration(rew), raster)

    def shortest_spacing(duration_s: float) -> float:
        try:
            _, _, t_sub, t_rew = design(duration_s)
        except ProtocolError:
            return math.inf
        return t_sub + t_rew

    duration = protocol.rf_duration_ms * 1e-3
    rfs, gz, t_sub, t_rew_min = design(duration)
    for odd in WATER_EXCITATION_SPACINGS:
        target = odd / (2.0 * shift)
        t_rew = round_to(target - t_sub, raster)
        if t_rew >= t_rew_min - 1e-12:
            break
    else:
        # longest sub-pulse (RF raster steps) that fits the longest spacing tried
        odd = WATER_EXCITATION_SPACINGS[-1]
        target = odd / (2.0 * shift)
        lo, hi = 0, round(duration / system.rf_raster_time)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if shortest_spacing(mid * system.rf_raster_time) <= target + raster / 2:
                lo = mid
            else:
                hi = mid
        hint = (f"rf_duration_ms <= {lo * system.rf_raster_time * 1e3:.3g} ms fits "
                f"{odd}/(2 x {shift:.0f} Hz)" if lo > 0 else "no sub-pulse fits (dead time, "
                "ramps and rewinder alone are longer, or the slice is too thin for short "
                "sub-pulses)")
        spacings = " or ".join(f"{k}/(2 x {shift:.0f} Hz) = {k / (2 * shift) * 1e3:.3g} ms"
                               for k in WATER_EXCITATION_SPACINGS)
        raise ProtocolError(
            f"rf_duration_ms: {protocol.rf_duration_ms:g} ms water-excitation sub-pulses "
            f"({t_sub * 1e3:.3g} ms blocks + {t_rew_min * 1e3:.3g} ms rewinder) fit neither "
            f"sub-pulse spacing {spacings} at {scanner.field_strength_t:g} T on "
            f"{scanner.name}; {hint}"
        )
    for rf in rfs:
        _check_b1(rf, scanner, what=f"water-excitation sub-pulse ({protocol.rf_duration_ms:g}"
                  " ms)", key="rf_duration_ms")
    gz_rew = trapezoid(channel="z", area=-gz.area, duration=t_rew, system=system)
    return WaterExcitation(rfs=rfs, gz=gz, gz_rew=gz_rew, t_sub=t_sub, t_rew=t_rew,
                           spacing_s=t_sub + t_rew, target_spacing_s=target,
                           binomial=protocol.water_excitation_binomial)


def fat_definitions(
    chemsat: ChemSat | None, water: WaterExcitation | None, scanner: ScannerProfile
) -> dict[str, Any]:
    """``[DEFINITIONS]`` of the fat suppression in use (empty when off)."""
    if chemsat is not None:
        return chemsat.definitions()
    if water is not None:
        return water.definitions(scanner)
    return {}


def fat_modules(
    system: pp.Opts,
    scanner: ScannerProfile,
    protocol: Any,
    *,
    flip_deg: float,
    thickness_m: float,
    voxel_m: tuple[float, float, float],
    parameter: str = "slice_thickness_mm",
) -> tuple[ChemSat | None, WaterExcitation | None]:
    """The chemsat module or the water excitation a protocol asks for (``None`` otherwise)."""
    mode = getattr(protocol, "fat_suppression", "none")
    if mode == "chemsat":
        return make_chemsat(system, scanner, protocol, voxel_m=voxel_m), None
    if mode == "water_excitation":
        return None, make_water_excitation(system, scanner, protocol, flip_deg=flip_deg,
                                           thickness_m=thickness_m, parameter=parameter)
    return None, None


def add_excitation(
    seq: pp.Sequence,
    rf: SimpleNamespace,
    gz: SimpleNamespace,
    *,
    chemsat: ChemSat | None,
    water: WaterExcitation | None,
    position_m: float = 0.0,
    phase_rad: float = 0.0,
    labels: list[SimpleNamespace] | None = None,
    events: tuple[SimpleNamespace, ...] = (),
) -> None:
    """Append one excitation with the fat suppression of :func:`fat_modules` to ``seq``.

    The chemsat module (when on) comes first and carries ``labels``; then either the
    water-excitation train for the slice at ``position_m`` (m) with the extra RF phase
    ``phase_rad`` (rad), or the plain excitation block ``rf``, ``gz`` and ``events``
    (e.g. a block delay), with ``labels`` when no chemsat took them. ``rf`` must already
    carry the slice's frequency offset and the RF phase (:func:`set_slice_offset`); the
    water train sets its own.

    Parameters
    ----------
    seq : pypulseq.Sequence
        The sequence to append to.
    rf, gz : SimpleNamespace
        The plain excitation pulse and its select gradient (not played with ``water``).
    chemsat, water : ChemSat or WaterExcitation or None
        The modules :func:`fat_modules` returned for the protocol.
    position_m : float
        Slice position along z (m), for the water train's sub-pulses.
    phase_rad : float
        RF phase added to the water train's sub-pulses (rad; RF spoiling).
    labels : list of SimpleNamespace, optional
        Labels (e.g. ``TRID``) of the first block played.
    events : tuple of SimpleNamespace
        Extra events of the plain excitation block.
    """
    first = list(labels or [])
    if chemsat is not None:
        chemsat.add_to(seq, first)
        first = []
    if water is not None:
        water.add_to(seq, position_m=position_m, phase_rad=phase_rad, labels=first)
    else:
        seq.add_block(rf, gz, *events, *first)
