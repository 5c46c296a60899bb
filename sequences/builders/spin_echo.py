"""Spin-echo builders: multi-echo CPMG (T2 mapping), inversion-recovery SE (T1 mapping), TSE.

All three share one CPMG echo-train engine:

- 90° excitation along x, refocusing pulses along y (CPMG), slice-selective sincs.
- Every refocusing pulse sits between two identical slice-axis crushers, so the
  gradient area between successive refocusing pulses is the same in every interval and
  twice the area between the excitation and the first refocusing pulse (CPMG condition).
- The readout prephaser is played before the first refocusing pulse; after each readout a
  small readout-axis lobe restores the pre-refocusing k_x, so the k-space centre falls on
  ADC sample ``os * Nx // 2`` in every echo (FFT convention of ``_common``).
- Phase encoding is played after each refocusing pulse and rewound before the next one.
- Echo centres sit midway between refocusing pulses; fill delays are rounded to the
  block raster, so echo times are exact multiples of the achieved echo spacing.
- After the last echo, a spoiler (2 cycles per voxel along x, 4 across the slice along
  z) and the phase-encode rewinder end the train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pypulseq as pp

from mrharmony.errors import ProtocolError
from mrharmony.sequences.builders._common import (
    Readout,
    acs_labels,
    check_positive_delay,
    excitation_pulse,
    finalize,
    label,
    make_readout,
    new_sequence,
    phase_encode_areas,
    rf_center_time,
    round_to,
    round_up,
    sampling,
    sampling_definitions,
    set_slice_offset,
    slice_positions_m,
    trapezoid,
)
from mrharmony.sequences.builders._fat import (
    ChemSat,
    WaterExcitation,
    add_excitation,
    fat_definitions,
    fat_modules,
)
from mrharmony.sequences.protocol import IRSEProtocol, MultiEchoSEProtocol, TSEProtocol
from mrharmony.sequences.scanner import ScannerProfile

__all__ = [
    "build_irse",
    "build_mese",
    "build_tse",
    "interleaved_slice_order",
    "tse_echo_segments",
    "tse_ordering",
]

#: The IR-SE inversion slab is this much thicker than the imaging slice (flat inversion
#: across the excited profile; slices are acquired sequentially, so no cross-talk).
INVERSION_THICKNESS_FACTOR = 1.5


def interleaved_slice_order(n_slices: int) -> list[int]:
    """Interleaved acquisition order of slice indices: even indices first, then odd.

    Parameters
    ----------
    n_slices : int
        Number of slices.

    Returns
    -------
    list of int
        Spatial slice indices (0 = most negative position) in the order they are excited.
    """
    return list(range(0, n_slices, 2)) + list(range(1, n_slices, 2))


def tse_ordering(
    n_lines: int, turbo_factor: int, center_echo: int, center_index: int | None = None
) -> np.ndarray:
    """Phase-encode table of a segmented TSE with the k-space centre at one echo.

    k-space (lines ``0..n_lines-1``, centre ``n_lines // 2``) is cut into ``turbo_factor``
    contiguous segments of ``n_shots = ceil(n_lines / turbo_factor)`` lines. Echo ``e``
    of every shot acquires segment ``sigma(e)``, and shot ``s`` takes line
    ``sigma(e) * n_shots + s`` of it. ``sigma`` matches echoes ordered by their distance
    from ``center_echo`` to segments ordered by their distance from the centre segment
    (ties: earlier echo with lower segment), so the centre line is acquired at
    ``center_echo`` and |ky| grows monotonically with |echo - center_echo|. When the
    centre echo is in the middle of the train this is plain linear ordering.

    Parameters
    ----------
    n_lines : int
        Phase-encoding lines.
    turbo_factor : int
        Echoes per excitation.
    center_echo : int
        1-based echo index that acquires ky = 0 (1 <= center_echo <= turbo_factor).
    center_index : int, optional
        Index of the k-space-centre line among the ``n_lines`` acquired lines (default
        ``n_lines // 2``; with acceleration or partial Fourier the acquired lines are a
        subset of the matrix and the centre is elsewhere in the list).

    Returns
    -------
    numpy.ndarray
        Integer array ``(n_shots, turbo_factor)`` of line indices (into the acquired
        lines), -1 where the echo acquires no line (when ``n_lines`` is not a multiple
        of ``turbo_factor``).
    """
    n_shots = math.ceil(n_lines / turbo_factor)
    sigma = np.asarray(tse_echo_segments(n_lines, turbo_factor, center_echo, center_index))
    table = sigma[None, :] * n_shots + np.arange(n_shots)[:, None]
    table[table >= n_lines] = -1
    return table


def tse_echo_segments(
    n_lines: int, turbo_factor: int, center_echo: int, center_index: int | None = None
) -> list[int]:
    """k-space segment acquired by each echo of a TSE train (see :func:`tse_ordering`)."""
    n_shots = math.ceil(n_lines / turbo_factor)
    s0 = (n_lines // 2 if center_index is None else center_index) // n_shots
    e0 = center_echo - 1
    echoes = sorted(range(turbo_factor), key=lambda e: (abs(e - e0), e))
    segments = sorted(range(turbo_factor), key=lambda s: (abs(s - s0), s))
    sigma = [0] * turbo_factor
    for e, s in zip(echoes, segments, strict=True):
        sigma[e] = s
    return sigma


@dataclass(frozen=True)
class _TrainParts:
    """Events and fixed durations of a CPMG spin-echo train (no fill delays)."""

    system: pp.Opts
    rf_exc: SimpleNamespace
    gz_exc: SimpleNamespace
    rf_ref: SimpleNamespace
    gz_ref: SimpleNamespace
    ro: Readout
    t_exc: float  # excitation block
    exc_c: float  # excitation centre from block start
    t_p: float  # post-excitation block: slice rephaser + crusher, readout prephaser
    gx_p: SimpleNamespace
    gz_p: SimpleNamespace
    t_ref: float  # refocusing block
    ref_c: float
    t_c1: float  # before each refocusing pulse (after the first): crusher, PE rewind, dx
    t_c2: float  # after each refocusing pulse: crusher, PE
    gz_c1: SimpleNamespace
    gz_c2: SimpleNamespace
    gx_c1: SimpleNamespace | None
    t_ro: float
    t_spoil: float
    gx_spoil: SimpleNamespace
    gz_spoil: SimpleNamespace
    #: Fat suppression (TSE): a chemsat module before each excitation, or a binomial
    #: water excitation in place of ``rf_exc`` (``t_exc`` / ``exc_c`` are then its own).
    chemsat: ChemSat | None = None
    water: WaterExcitation | None = None

    @property
    def t_fat(self) -> float:
        """Duration of the chemsat module before each excitation (0 without)."""
        return self.chemsat.duration if self.chemsat is not None else 0.0

    @property
    def half_min(self) -> float:
        """Smallest half echo spacing the three half-intervals allow (s)."""
        return max(self.half_exc, self.half_after, self.half_before)

    @property
    def half_exc(self) -> float:
        return self.t_exc - self.exc_c + self.t_p + self.ref_c

    @property
    def half_after(self) -> float:
        return self.t_ref - self.ref_c + self.t_c2 + self.ro.time_to_center_s

    @property
    def half_before(self) -> float:
        return self.t_ro - self.ro.time_to_center_s + self.t_c1 + self.ref_c


@dataclass(frozen=True)
class _TrainTiming:
    fill0: float  # between post-excitation block and first refocusing block
    fill1: float  # between C2 block and readout
    fill2: float  # between readout and C1 block
    esp: float  # achieved echo spacing (s)
    te_first: float  # excitation centre to first echo centre sample (s)
    duration: float  # excitation block start to end of the spoiler (s)
    n_echoes: int

    @property
    def echo_times(self) -> list[float]:
        return [self.te_first + i * self.esp for i in range(self.n_echoes)]



def _blk(t: float, system: pp.Opts) -> float:
    return round_up(t, system.block_duration_raster)


def _train_parts(
    protocol: MultiEchoSEProtocol | IRSEProtocol | TSEProtocol,
    scanner: ScannerProfile,
    system: pp.Opts,
    *,
    refocusing_flip_deg: float,
) -> _TrainParts:
    fov_m = np.asarray(protocol.fov_mm) * 1e-3
    nx, ny = protocol.matrix
    thickness = protocol.slice_thickness_mm * 1e-3
    rf_exc, gz_exc, _ = excitation_pulse(
        system,
        scanner,
        apodization=protocol.rf_apodization,
        flip_deg=90.0,
        duration_s=protocol.rf_duration_ms * 1e-3,
        time_bw_product=protocol.rf_time_bw_product,
        thickness_m=thickness,
    )
    rf_ref, gz_ref, _ = excitation_pulse(
        system,
        scanner,
        apodization=protocol.rf_apodization,
        flip_deg=refocusing_flip_deg,
        duration_s=protocol.rf_duration_ms * 1e-3,
        time_bw_product=protocol.rf_time_bw_product,
        thickness_m=thickness,
        use="refocusing",
    )
    ro = make_readout(
        system,
        scanner,
        fov_m=fov_m[0],
        n=nx,
        bandwidth_hz_per_px=protocol.readout_bandwidth_hz_per_px,
        oversampling=protocol.readout_oversampling,
    )
    chemsat, water = fat_modules(
        system, scanner, protocol, flip_deg=90.0, thickness_m=thickness,
        voxel_m=(fov_m[0] / nx, fov_m[1] / ny, thickness),
    )
    if water is not None:
        gz_exc = water.gz  # every sub-pulse's select gradient: rephaser -gz.area / 2
    crusher_area = protocol.crusher_cycles_per_slice / thickness
    pe_max = float(np.max(np.abs(phase_encode_areas(fov_m[1], ny))))
    a = ro.area_to_center
    delta_x = 2 * a - ro.gx.area  # restores k_x = +a before the next refocusing pulse
    if abs(delta_x) < 1e-6:
        delta_x = 0.0

    # Post-excitation: slice rephaser merged with the first crusher, readout prephaser.
    gz_p_area = -gz_exc.area / 2 + crusher_area
    t_p = _blk(
        max(
            pp.calc_duration(pp.make_trapezoid(channel="z", area=gz_p_area, system=system)),
            pp.calc_duration(pp.make_trapezoid(channel="x", area=a, system=system)),
        ),
        system,
    )
    gz_p = trapezoid(channel="z", area=gz_p_area, duration=t_p, system=system)
    gx_p = trapezoid(channel="x", area=a, duration=t_p, system=system)

    crusher = pp.make_trapezoid(channel="z", area=crusher_area, system=system)
    pe = pp.make_trapezoid(channel="y", area=pe_max, system=system)
    t_c2 = _blk(max(pp.calc_duration(crusher), pp.calc_duration(pe)), system)
    t_c1 = t_c2
    if delta_x:
        dx = pp.make_trapezoid(channel="x", area=delta_x, system=system)
        t_c1 = _blk(max(t_c2, pp.calc_duration(dx)), system)
    gz_c1 = trapezoid(channel="z", area=crusher_area, duration=t_c1, system=system)
    gz_c2 = trapezoid(channel="z", area=crusher_area, duration=t_c2, system=system)
    gx_c1 = (
        trapezoid(channel="x", area=delta_x, duration=t_c1, system=system)
        if delta_x
        else None
    )

    spoil_x = pp.make_trapezoid(
        channel="x", area=protocol.spoiler_cycles_per_voxel * nx / fov_m[0], system=system
    )
    spoil_z = pp.make_trapezoid(channel="z", area=protocol.crusher_cycles_per_slice / thickness,
                                system=system)
    t_spoil = _blk(
        max(pp.calc_duration(spoil_x), pp.calc_duration(spoil_z), pp.calc_duration(pe)), system
    )
    gx_spoil = trapezoid(channel="x", area=spoil_x.area, duration=t_spoil, system=system)
    gz_spoil = trapezoid(channel="z", area=spoil_z.area, duration=t_spoil, system=system)

    return _TrainParts(
        system=system,
        rf_exc=rf_exc,
        gz_exc=gz_exc,
        rf_ref=rf_ref,
        gz_ref=gz_ref,
        ro=ro,
        t_exc=(water.duration if water is not None
               else _blk(pp.calc_duration(rf_exc, gz_exc), system)),
        exc_c=water.centre_s if water is not None else rf_center_time(rf_exc),
        t_p=t_p,
        gx_p=gx_p,
        gz_p=gz_p,
        t_ref=_blk(pp.calc_duration(rf_ref, gz_ref), system),
        ref_c=rf_center_time(rf_ref),
        t_c1=t_c1,
        t_c2=t_c2,
        gz_c1=gz_c1,
        gz_c2=gz_c2,
        gx_c1=gx_c1,
        t_ro=_blk(pp.calc_duration(ro.gx, ro.adc), system),
        t_spoil=t_spoil,
        gx_spoil=gx_spoil,
        gz_spoil=gz_spoil,
        chemsat=chemsat,
        water=water,
    )


def _train_timing(parts: _TrainParts, esp_s: float, n_echoes: int) -> _TrainTiming:
    """Fill delays for echo spacing ``esp_s`` (caller checked ``esp_s >= 2 * half_min``)."""
    raster = parts.system.block_duration_raster
    half = esp_s / 2
    fill0 = max(round_to(half - parts.half_exc, raster), 0.0)
    fill1 = max(round_to(half - parts.half_after, raster), 0.0)
    total = max(round_to(esp_s - parts.half_after - parts.half_before, raster), fill1)
    fill2 = total - fill1
    esp = (
        parts.t_ref + parts.t_c2 + fill1 + parts.t_ro + fill2 + parts.t_c1
    )
    t_to_ref = parts.t_exc - parts.exc_c + parts.t_p + fill0 + parts.ref_c
    te_first = t_to_ref + parts.half_after + fill1
    duration = (
        parts.t_fat
        + parts.t_exc
        + parts.t_p
        + fill0
        + n_echoes * (parts.t_ref + parts.t_c2 + fill1 + parts.t_ro)
        + (n_echoes - 1) * (fill2 + parts.t_c1)
        + parts.t_spoil
    )
    return _TrainTiming(
        fill0=fill0, fill1=fill1, fill2=fill2, esp=esp, te_first=te_first, duration=duration,
        n_echoes=n_echoes,
    )


class _PECache:
    """Phase-encode trapezoids of fixed duration, made once per area."""

    def __init__(self, system: pp.Opts, duration: float) -> None:
        self.system = system
        self.duration = duration
        self._cache: dict[float, SimpleNamespace | None] = {}

    def get(self, area: float) -> SimpleNamespace | None:
        if area not in self._cache:
            self._cache[area] = (
                trapezoid(
                    channel="y", area=area, duration=self.duration, system=self.system
                )
                if area != 0.0
                else None
            )
        return self._cache[area]


def _events(*items: SimpleNamespace | None) -> list[SimpleNamespace]:
    return [i for i in items if i is not None]


def _play_train(
    seq: pp.Sequence,
    parts: _TrainParts,
    timing: _TrainTiming,
    *,
    position_m: float,
    ky_areas: list[float],
    adc_labels: list[list[SimpleNamespace] | None],
    first_labels: list[SimpleNamespace],
    pe_c2: _PECache,
    pe_c1: _PECache,
    pe_spoil: _PECache,
) -> None:
    """Play one excitation and its echo train for one slice.

    ``ky_areas[i]`` is the phase-encode area of echo ``i``; ``adc_labels[i]`` the labels
    of its ADC block, or ``None`` to play the echo without ADC (dummy or padding echo).
    """
    rf_exc, rf_ref = parts.rf_exc, parts.rf_ref
    set_slice_offset(rf_exc, parts.gz_exc.amplitude, position_m)
    set_slice_offset(rf_ref, parts.gz_ref.amplitude, position_m)
    rf_ref.phase_offset += math.pi / 2  # CPMG: refocusing along y
    add_excitation(seq, rf_exc, parts.gz_exc, chemsat=parts.chemsat, water=parts.water,
                   position_m=position_m, labels=first_labels,
                   events=(pp.make_delay(parts.t_exc),))
    seq.add_block(parts.gx_p, parts.gz_p)
    if timing.fill0 > 0:
        seq.add_block(pp.make_delay(timing.fill0))
    n = len(ky_areas)
    for i, ky in enumerate(ky_areas):
        if i > 0:
            seq.add_block(*_events(parts.gz_c1, parts.gx_c1, pe_c1.get(-ky_areas[i - 1])))
        seq.add_block(rf_ref, parts.gz_ref, pp.make_delay(parts.t_ref))
        seq.add_block(*_events(parts.gz_c2, pe_c2.get(ky)))
        if timing.fill1 > 0:
            seq.add_block(pp.make_delay(timing.fill1))
        labels = adc_labels[i]
        if labels is None:
            seq.add_block(parts.ro.gx, pp.make_delay(parts.t_ro))
        else:
            seq.add_block(parts.ro.gx, parts.ro.adc, pp.make_delay(parts.t_ro), *labels)
        if i < n - 1 and timing.fill2 > 0:
            seq.add_block(pp.make_delay(timing.fill2))
    seq.add_block(*_events(parts.gx_spoil, parts.gz_spoil, pe_spoil.get(-ky_areas[-1])))


def _pe_caches(parts: _TrainParts) -> tuple[_PECache, _PECache, _PECache]:
    s = parts.system
    return _PECache(s, parts.t_c2), _PECache(s, parts.t_c1), _PECache(s, parts.t_spoil)


def _check_esp(parts: _TrainParts, te_s: float, *, what: str, requested_ms: float,
               scanner: ScannerProfile) -> None:
    """Refuse ``te_ms`` when it is below the minimum echo spacing."""
    check_positive_delay(
        te_s - 2 * parts.half_min,
        what=what,
        key="te_ms",
        requested_ms=requested_ms,
        scanner=scanner,
    )


def _slot_fill(
    tr_s: float, n_per_tr: int, slot_min: float, *, what: str, key: str, requested_ms: float,
    scanner: ScannerProfile, system: pp.Opts
) -> float:
    """Per-slot fill delay so that ``n_per_tr`` equal slots make up TR; refuse a short TR."""
    check_positive_delay(
        tr_s - n_per_tr * slot_min, what=what, key=key, requested_ms=requested_ms,
        scanner=scanner,
    )
    slot = round_to(tr_s / n_per_tr, system.block_duration_raster)
    return max(slot - slot_min, 0.0)


def build_mese(protocol: MultiEchoSEProtocol, scanner: ScannerProfile) -> pp.Sequence:
    """Build a 2D multi-slice multi-echo spin echo (CPMG) for T2 mapping.

    One 90°x excitation per slice and TR is followed by ``n_echoes`` refocusing pulses
    (phase y, ``refocusing_flip_deg``) with crushers on both sides; echo ``n`` is at
    ``n * te_ms``. Every echo of a train acquires the same phase-encode line (ECO label =
    echo index), so each echo gives one image. Slices are interleaved within each TR
    (even slice indices first, then odd; SLC label = spatial index) and equally spaced
    in time over the TR. Phase-encode lines run linearly (outer loop), slices inner.

    Parameters
    ----------
    protocol : MultiEchoSEProtocol
        First TE and echo spacing ``te_ms`` (ms), TR (ms), ``n_echoes``, FOV (mm),
        matrix, slices.
    scanner : ScannerProfile
        Hardware limits to build within.

    Returns
    -------
    pypulseq.Sequence
        ``[DEFINITIONS]`` ``TE`` lists all echo times (s), ``EchoSpacing`` (s).

    Raises
    ------
    ProtocolError
        TE below the minimum echo spacing, TR too short for all slices' echo trains,
        slice too thin, or bandwidth too high for the scanner.
    """
    seq, system = new_sequence(scanner)
    fov_m = np.asarray(protocol.fov_mm) * 1e-3
    ny = protocol.matrix[1]
    parts = _train_parts(protocol, scanner, system,
                         refocusing_flip_deg=protocol.refocusing_flip_deg)
    te_s = protocol.te_ms * 1e-3
    _check_esp(parts, te_s, what="TE", requested_ms=protocol.te_ms, scanner=scanner)
    timing = _train_timing(parts, te_s, protocol.n_echoes)
    n_sl = protocol.n_slices
    fill_slot = _slot_fill(
        protocol.tr_ms * 1e-3, n_sl, timing.duration, what="TR", key="tr_ms",
        requested_ms=protocol.tr_ms, scanner=scanner, system=system,
    )
    tr = n_sl * (timing.duration + fill_slot)

    ky_areas = phase_encode_areas(fov_m[1], ny)
    positions = slice_positions_m(protocol)
    order = interleaved_slice_order(n_sl)
    caches = _pe_caches(parts)
    n_e = protocol.n_echoes
    lines: list[int | None] = [None] * protocol.dummy_scans + list(range(ny))
    for iy in lines:
        for n_in_tr, i_slice in enumerate(order):
            first = [label("TRID", 1 if iy is None else 2)] if n_in_tr == 0 else []
            if iy is None:
                kys = [0.0] * n_e
                adc_labels: list[list[SimpleNamespace] | None] = [None] * n_e
            else:
                kys = [float(ky_areas[iy])] * n_e
                adc_labels = [
                    [label("LIN", iy), label("SLC", i_slice), label("ECO", e)]
                    for e in range(n_e)
                ]
            _play_train(
                seq, parts, timing, position_m=float(positions[i_slice]), ky_areas=kys,
                adc_labels=adc_labels, first_labels=first, pe_c2=caches[0], pe_c1=caches[1],
                pe_spoil=caches[2],
            )
            if fill_slot > 0:
                seq.add_block(pp.make_delay(fill_slot))

    return finalize(
        seq,
        protocol,
        scanner,
        te_s=timing.echo_times,
        tr_s=tr,
        trajectory="cartesian",
        ordering="linear-interleaved-slices",
        extra={
            "ReadoutBandwidth": parts.ro.bandwidth_hz_per_px,
            "EchoSpacing": timing.esp,
            "NumberOfEchoes": n_e,
            "RefocusingFlipAngle": protocol.refocusing_flip_deg,
            "RfTimeBwProduct": protocol.rf_time_bw_product,
            "RfApodization": protocol.rf_apodization,
            "SliceOrder": order,
            "DummyScans": protocol.dummy_scans,
        },
    )


def build_irse(protocol: IRSEProtocol, scanner: ScannerProfile) -> pp.Sequence:
    """Build a 2D inversion-recovery spin echo with one contrast per inversion time.

    Each TR: a slice-selective 180° sinc inversion (slab ``1.5 x`` the slice thickness, RF
    use ``inversion``) followed by a spoiler, the inversion delay, then a single-echo spin
    echo (90°x, 180°y with crushers) at ``te_ms``. The inversion spoiler winds three crusher
    units across the slice, one more than the end-of-train spoiler and the last crusher
    together: with equal areas the inversion pulse would refocus the magnetisation left over
    from the previous TR into a spin echo at the next readout (in long-T2 fluid, an
    off-resonance-dependent banding worth up to 30 % of the signal). Slices are acquired
    **sequentially** (all TIs and lines of slice 0, then slice 1, ...), so the most recent
    inversion before every excitation is that slice's own; inside a slice the TIs are the
    outer loop (SET label = TI index) and phase-encode lines the inner loop, with
    ``dummy_scans`` unlabelled TRs before each (slice, TI) block. TR is measured between
    inversions of the same slice and is the same for every TI.

    Parameters
    ----------
    protocol : IRSEProtocol
        TE, TR, TIs (ms; TI from the inversion centre to the excitation centre), FOV
        (mm), matrix, slices.
    scanner : ScannerProfile
        Hardware limits to build within.

    Returns
    -------
    pypulseq.Sequence
        ``[DEFINITIONS]`` ``TI`` lists the achieved inversion times (s) in SET order.

    Raises
    ------
    ProtocolError
        TE, TI or TR below the minimum, slice too thin, or bandwidth too high.
    """
    seq, system = new_sequence(scanner)
    fov_m = np.asarray(protocol.fov_mm) * 1e-3
    ny = protocol.matrix[1]
    thickness = protocol.slice_thickness_mm * 1e-3
    parts = _train_parts(protocol, scanner, system, refocusing_flip_deg=180.0)
    te_s = protocol.te_ms * 1e-3
    _check_esp(parts, te_s, what="TE", requested_ms=protocol.te_ms, scanner=scanner)
    timing = _train_timing(parts, te_s, 1)

    rf_inv, gz_inv, _ = excitation_pulse(
        system,
        scanner,
        apodization=protocol.rf_apodization,
        flip_deg=180.0,
        duration_s=protocol.rf_duration_ms * 1e-3,
        time_bw_product=protocol.rf_time_bw_product,
        thickness_m=INVERSION_THICKNESS_FACTOR * thickness,
        use="inversion",
    )
    t_inv = _blk(pp.calc_duration(rf_inv, gz_inv), system)
    inv_c = rf_center_time(rf_inv)
    # Not 2 units: the z moment from the last refocusing pulse to the next inversion is
    # crusher + end spoiler (2 units), and an inversion between equal moments is a
    # refocusing pulse for the previous TR's leftover transverse magnetisation.
    isp_z = pp.make_trapezoid(channel="z", area=3 * protocol.crusher_cycles_per_slice / thickness,
                              system=system)
    isp_x = pp.make_trapezoid(
        channel="x", area=protocol.spoiler_cycles_per_voxel * protocol.matrix[0] / fov_m[0],
        system=system,
    )
    t_isp = _blk(max(pp.calc_duration(isp_z), pp.calc_duration(isp_x)), system)
    isp_z = trapezoid(channel="z", area=isp_z.area, duration=t_isp, system=system)
    isp_x = trapezoid(channel="x", area=isp_x.area, duration=t_isp, system=system)

    ti_fixed = t_inv - inv_c + t_isp + parts.exc_c
    ti_list = [t * 1e-3 for t in protocol.ti_ms]
    i_min = int(np.argmin(ti_list))
    check_positive_delay(
        ti_list[i_min] - ti_fixed, what="TI", key="ti_ms",
        requested_ms=protocol.ti_ms[i_min], scanner=scanner,
    )
    delays_ti = [max(round_to(t - ti_fixed, system.block_duration_raster), 0.0)
                 for t in ti_list]
    tis = [ti_fixed + d for d in delays_ti]
    slot_min = t_inv + t_isp + max(delays_ti) + timing.duration
    tr_s = protocol.tr_ms * 1e-3
    check_positive_delay(
        tr_s - slot_min, what="TR", key="tr_ms", requested_ms=protocol.tr_ms, scanner=scanner
    )
    tr = max(round_to(tr_s, system.block_duration_raster), slot_min)

    ky_areas = phase_encode_areas(fov_m[1], ny)
    positions = slice_positions_m(protocol)
    caches = _pe_caches(parts)
    for i_slice, pos in enumerate(positions):
        set_slice_offset(rf_inv, gz_inv.amplitude, float(pos))
        for i_ti, delay_ti in enumerate(delays_ti):
            fill_tr = tr - (t_inv + t_isp + delay_ti + timing.duration)
            lines: list[int | None] = [None] * protocol.dummy_scans + list(range(ny))
            for iy in lines:
                dummy = iy is None
                seq.add_block(
                    rf_inv, gz_inv, pp.make_delay(t_inv),
                    label("TRID", 2 * i_ti + (1 if dummy else 2)),
                )
                seq.add_block(isp_x, isp_z)
                if delay_ti > 0:
                    seq.add_block(pp.make_delay(delay_ti))
                adc = None if dummy else [label("LIN", iy), label("SLC", i_slice),
                                          label("SET", i_ti)]
                _play_train(
                    seq, parts, timing, position_m=float(pos),
                    ky_areas=[0.0 if dummy else float(ky_areas[iy])], adc_labels=[adc],
                    first_labels=[], pe_c2=caches[0], pe_c1=caches[1], pe_spoil=caches[2],
                )
                if fill_tr > 1e-9:
                    seq.add_block(pp.make_delay(fill_tr))

    return finalize(
        seq,
        protocol,
        scanner,
        te_s=timing.te_first,
        tr_s=tr,
        ti_s=tis,
        trajectory="cartesian",
        ordering="linear-sequential-slices-ti-outer",
        extra={
            "ReadoutBandwidth": parts.ro.bandwidth_hz_per_px,
            "InversionSliceThickness": INVERSION_THICKNESS_FACTOR * thickness,
            "SliceOrder": "sequential",
            "DummyScans": protocol.dummy_scans,
        },
    )


def build_tse(protocol: TSEProtocol, scanner: ScannerProfile) -> pp.Sequence:
    """Build a 2D multi-slice turbo spin echo with effective TE ``te_ms`` at ky = 0.

    The echo spacing is ``te / k`` with ``k = floor(te / esp_min)`` (the shortest echo
    spacing the hardware allows that puts an echo exactly at TE); echo ``k`` (1-based)
    acquires ky = 0. Phase encoding follows :func:`tse_ordering` (segmented, echo
    distance from ``k`` matched to segment distance from the k-space centre; linear when
    ``k`` is mid-train). Each echo's phase encoding is rewound before the next
    refocusing pulse. Shots are the outer loop; slices are interleaved within each TR
    (even indices first, then odd) and equally spaced in time.

    Parameters
    ----------
    protocol : TSEProtocol
        Effective TE, TR (ms), ``turbo_factor``, refocusing flip (deg), FOV (mm),
        matrix, slices.
    scanner : ScannerProfile
        Hardware limits to build within.

    Returns
    -------
    pypulseq.Sequence
        ``[DEFINITIONS]`` ``TE`` = effective TE, ``EchoSpacing`` (s),
        ``EffectiveEchoIndex`` (1-based), ``EchoTrainOrder`` (k-space segment acquired by
        each echo; shot ``s`` takes line ``segment * NumberOfShots + s``).

    Raises
    ------
    ProtocolError
        ``te_ms`` below the minimum echo spacing or so long that ky = 0 would fall
        after the last echo (``k > turbo_factor``), TR too short, slice too thin, or
        bandwidth too high.
    """
    seq, system = new_sequence(scanner)
    fov_m = np.asarray(protocol.fov_mm) * 1e-3
    ny = protocol.matrix[1]
    etl = protocol.turbo_factor
    parts = _train_parts(protocol, scanner, system,
                         refocusing_flip_deg=protocol.refocusing_flip_deg)
    te_s = protocol.te_ms * 1e-3
    esp_min = 2 * parts.half_min
    k = math.floor(te_s / esp_min + 1e-9)
    if k == 0:
        _check_esp(parts, te_s, what="effective TE", requested_ms=protocol.te_ms,
                   scanner=scanner)
    if k > etl:
        te_max = (etl + 1) * esp_min * 1e3
        raise ProtocolError(
            f"te_ms: effective TE {protocol.te_ms:g} ms puts ky = 0 at echo {k} (minimum echo "
            f"spacing {esp_min * 1e3:.3g} ms on {scanner.name}), beyond turbo_factor {etl}; "
            f"use te_ms < {te_max:.4g} ms or turbo_factor >= {k}"
        )
    timing = _train_timing(parts, te_s / k, etl)
    n_sl = protocol.n_slices
    fill_slot = _slot_fill(
        protocol.tr_ms * 1e-3, n_sl, timing.duration, what="TR", key="tr_ms",
        requested_ms=protocol.tr_ms, scanner=scanner, system=system,
    )
    tr = n_sl * (timing.duration + fill_slot)
    te_eff = timing.echo_times[k - 1]

    samp = sampling(protocol)
    acquired = samp.lines()  # true line indices of the acquired lines, ascending
    center_index = int(np.searchsorted(acquired, ny // 2))
    positions_table = tse_ordering(acquired.size, etl, k, center_index)
    table = np.where(positions_table >= 0, acquired[np.maximum(positions_table, 0)], -1)
    n_shots = table.shape[0]
    ky_all = phase_encode_areas(fov_m[1], ny)
    positions = slice_positions_m(protocol)
    order = interleaved_slice_order(n_sl)
    caches = _pe_caches(parts)
    shots: list[int | None] = [None] * protocol.dummy_scans + list(range(n_shots))
    for shot in shots:
        row = np.full(etl, -1) if shot is None else table[shot]
        kys = [float(ky_all[j]) if j >= 0 else 0.0 for j in row]
        for n_in_tr, i_slice in enumerate(order):
            first = [label("TRID", 1 if shot is None else 2)] if n_in_tr == 0 else []
            adc_labels = [
                None if j < 0 else [label("LIN", int(j)), label("SLC", i_slice),
                                    *acs_labels(samp, bool(samp.acs[j]))] for j in row
            ]
            _play_train(
                seq, parts, timing, position_m=float(positions[i_slice]), ky_areas=kys,
                adc_labels=adc_labels, first_labels=first, pe_c2=caches[0], pe_c1=caches[1],
                pe_spoil=caches[2],
            )
            if fill_slot > 0:
                seq.add_block(pp.make_delay(fill_slot))

    segments = tse_echo_segments(acquired.size, etl, k, center_index)
    ordering = "linear" if segments == list(range(etl)) else "centre-at-echo-k"
    return finalize(
        seq,
        protocol,
        scanner,
        te_s=te_eff,
        tr_s=tr,
        trajectory="cartesian",
        ordering=f"tse-segmented-{ordering}-interleaved-slices",
        extra={
            "ReadoutBandwidth": parts.ro.bandwidth_hz_per_px,
            "EchoSpacing": timing.esp,
            "TurboFactor": etl,
            "EffectiveEchoIndex": k,
            "NumberOfShots": n_shots,
            "EchoTrainOrder": segments,
            "RefocusingFlipAngle": protocol.refocusing_flip_deg,
            "RfTimeBwProduct": protocol.rf_time_bw_product,
            "RfApodization": protocol.rf_apodization,
            "SliceOrder": order,
            "DummyScans": protocol.dummy_scans,
            **sampling_definitions(samp),
            **fat_definitions(parts.chemsat, parts.water, scanner),
        },
    )
