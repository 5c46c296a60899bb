"""Balanced steady-state free precession (bSSFP / TrueFISP / FIESTA / balanced FFE)."""

from __future__ import annotations

import math

import numpy as np
import pypulseq as pp

from mrharmony.errors import ProtocolError
from mrharmony.sequences.builders._common import (
    excitation_pulse,
    finalize,
    label,
    make_readout,
    new_sequence,
    phase_encode_areas,
    rf_center_time,
    round_to,
    round_up,
    set_slice_offset,
    slice_positions_m,
    trapezoid,
)
from mrharmony.sequences.protocol import BSSFPProtocol
from mrharmony.sequences.scanner import ScannerProfile

__all__ = ["build_bssfp"]

#: TRID of the alpha/2 preparation, of dummy TRs and of imaging TRs.
_TRID_PREP, _TRID_DUMMY, _TRID_IMAGING = 1, 2, 3


def _floor_to(t: float, raster: float) -> float:
    return math.floor(t / raster + 1e-9) * raster



def build_bssfp(protocol: BSSFPProtocol, scanner: ScannerProfile) -> pp.Sequence:
    """Build a 2D multi-slice balanced SSFP sequence (TE = TR/2 by construction).

    Each TR is four blocks: the slice-selective excitation, a combined prephaser
    (readout prephaser, phase encoding and slice rephaser, then a fill delay), the
    readout, and a combined rewinder (readout rewinder, phase-encoding rewinder and
    slice rephaser, then a fill delay). Every gradient axis has zero net area between
    the centres of successive excitations: on z the two rephasers each carry half of
    the select gradient's area, on y the rewinder undoes the phase encoding and on x
    the prephaser and rewinder cancel the readout. The two fill delays are chosen so
    that the k-space-centre sample sits half-way between the RF centres (TE = TR/2, to
    within one block raster).

    The RF phase alternates 0, 180, 0, ... deg from the first full pulse of each slice,
    and the ADC phase follows it (which demodulates the alternation so the image is not
    shifted by FOV/2). Before the first full pulse of each slice an ``alpha/2``
    catalysation pulse of opposite phase (180 deg) is played with its centre TR/2 before
    the first full pulse's centre; between the two only a z gradient of area
    ``-select_area`` is played, so that interval is balanced too. It damps the
    approach-to-steady-state oscillation. Dummy TRs (``dummy_scans``, no ADC, ky = 0)
    follow the preparation. Slices are acquired sequentially, each with a linear
    phase-encoding order.

    Parameters
    ----------
    protocol : BSSFPProtocol
        TE and TR (ms; TE must be TR/2 within 1 %), flip (deg), FOV (mm), matrix,
        slices, receiver bandwidth (Hz/px), RF duration (ms) and time-bandwidth product.
    scanner : ScannerProfile
        Hardware limits to build within.

    Returns
    -------
    pypulseq.Sequence
        With the standard ``[DEFINITIONS]`` (achieved TE/TR in seconds) plus
        ``ReadoutBandwidth`` (Hz/px), ``DummyScans``, ``RFPhaseCycling`` (deg),
        ``PreparationPulse`` and ``PreparationInterval`` (s).

    Raises
    ------
    ProtocolError
        ``te_ms`` not TR/2 within 1 %, ``tr_ms`` below the minimum (including the
        interval the alpha/2 preparation needs), slice too thin, or bandwidth too high.
    """
    seq, system = new_sequence(scanner)
    raster = system.block_duration_raster
    fov_m = np.asarray(protocol.fov_mm) * 1e-3
    nx, ny = protocol.matrix[0], protocol.matrix[1]
    thickness = protocol.slice_thickness_mm * 1e-3
    half_tr_ms = protocol.tr_ms / 2
    if abs(protocol.te_ms - half_tr_ms) > 0.01 * half_tr_ms:
        raise ProtocolError(
            f"te_ms: bSSFP has TE = TR/2 by construction; TE {protocol.te_ms:g} ms is not "
            f"within 1 % of TR/2 = {half_tr_ms:g} ms (tr_ms {protocol.tr_ms:g}) on "
            f"{scanner.name}"
        )

    # RF duration on the gradient raster so that the select flat top is on it too.
    rf_duration = round_up(protocol.rf_duration_ms * 1e-3, system.grad_raster_time)
    common = {
        "duration_s": rf_duration,
        "time_bw_product": protocol.rf_time_bw_product,
        "thickness_m": thickness,
        "apodization": protocol.rf_apodization,
    }
    rf, gz, _ = excitation_pulse(system, scanner, flip_deg=protocol.flip_deg, **common)
    rf_half, _, _ = excitation_pulse(system, scanner, flip_deg=protocol.flip_deg / 2, **common)
    ro = make_readout(
        system,
        scanner,
        fov_m=fov_m[0],
        n=nx,
        bandwidth_hz_per_px=protocol.readout_bandwidth_hz_per_px,
        oversampling=protocol.readout_oversampling,
    )
    ky_areas = phase_encode_areas(fov_m[1], ny)
    ky_max = float(np.max(np.abs(ky_areas)))
    gz_reph_area = -gz.area / 2
    pre_x_area = -ro.area_to_center
    rew_x_area = -(ro.gx.area - ro.area_to_center)

    def min_duration(*areas: float) -> float:
        return round_up(
            max(pp.calc_duration(pp.make_trapezoid(channel="x", area=a, system=system))
                for a in areas),
            raster,
        )

    t_pre = min_duration(pre_x_area, ky_max, gz_reph_area)
    t_rew = min_duration(rew_x_area, ky_max, gz_reph_area)
    exc_block = round_up(pp.calc_duration(rf, gz), raster)
    t_rf_center = rf_center_time(rf)
    t_ro = round_up(pp.calc_duration(ro.gx, ro.adc), raster)
    # Shortest RF-centre -> echo and echo -> next RF-centre intervals.
    first_min = exc_block - t_rf_center + t_pre + ro.time_to_center_s
    second_min = t_ro - ro.time_to_center_s + t_rew + t_rf_center
    fixed = exc_block + t_pre + t_ro + t_rew
    min_tr = 2 * max(first_min, second_min)
    tr = round_to(protocol.tr_ms * 1e-3, raster)
    # The alpha/2 preparation: excitation block, then a z gradient of area -select_area
    # in a block that ends TR/2 after the preparation's centre, i.e. at the start of the
    # first full excitation block.
    prep_area = -gz.area
    t_prep_grad = min_duration(prep_area)
    min_tr_prep = 2 * (exc_block + t_prep_grad)
    min_allowed = max(min_tr, min_tr_prep)
    if tr < min_allowed - 1e-9:
        why = "the alpha/2 preparation at TR/2" if min_tr_prep > min_tr else "this protocol"
        raise ProtocolError(
            f"tr_ms: TR {protocol.tr_ms:.4g} ms is below the minimum "
            f"{round_up(min_allowed, raster) * 1e3:.4g} ms {why} allows on {scanner.name}"
        )
    slack = tr - fixed
    delay_pre = min(max(round_to(tr / 2 - first_min, raster), 0.0), _floor_to(slack, raster))
    delay_rew = round_to(slack - delay_pre, raster)
    te = first_min + delay_pre
    t_prep_block = max(round_to(tr / 2 - exc_block, raster), t_prep_grad)
    gz_prep = trapezoid(channel="z", area=prep_area, duration=t_prep_grad, system=system)

    gx_pre = trapezoid(channel="x", area=pre_x_area, duration=t_pre, system=system)
    gx_rew = trapezoid(channel="x", area=rew_x_area, duration=t_rew, system=system)
    gz_pre = trapezoid(channel="z", area=gz_reph_area, duration=t_pre, system=system)
    gz_rew = trapezoid(channel="z", area=gz_reph_area, duration=t_rew, system=system)

    for i_slice, pos in enumerate(slice_positions_m(protocol)):
        set_slice_offset(rf, gz.amplitude, float(pos))
        set_slice_offset(rf_half, gz.amplitude, float(pos))
        base_phase = rf.phase_offset
        # alpha/2 with the phase opposite to the first full pulse, TR/2 before it.
        rf_half.phase_offset = rf_half.phase_offset + math.pi
        seq.add_block(rf_half, gz, label("TRID", _TRID_PREP), pp.make_delay(exc_block))
        seq.add_block(gz_prep, pp.make_delay(t_prep_block))
        lines: list[int | None] = [None] * protocol.dummy_scans + list(range(ny))
        for n_pulse, iy in enumerate(lines):
            dummy = iy is None
            ky = 0.0 if dummy else float(ky_areas[iy])
            alt = math.pi * (n_pulse % 2)
            rf.phase_offset = base_phase + alt
            ro.adc.phase_offset = alt
            seq.add_block(
                rf, gz, label("TRID", _TRID_DUMMY if dummy else _TRID_IMAGING),
                pp.make_delay(exc_block),
            )
            gy_pre = trapezoid(channel="y", area=ky, duration=t_pre, system=system)
            seq.add_block(gx_pre, gy_pre, gz_pre, pp.make_delay(t_pre + delay_pre))
            if dummy:
                seq.add_block(ro.gx, pp.make_delay(t_ro))
            else:
                seq.add_block(
                    ro.gx, ro.adc, label("LIN", iy), label("SLC", i_slice),
                    pp.make_delay(t_ro),
                )
            gy_rew = trapezoid(channel="y", area=-ky, duration=t_rew, system=system)
            seq.add_block(gx_rew, gy_rew, gz_rew, pp.make_delay(t_rew + delay_rew))

    return finalize(
        seq,
        protocol,
        scanner,
        te_s=te,
        tr_s=tr,
        trajectory="cartesian",
        ordering="linear-sequential-slices",
        extra={
            "ReadoutBandwidth": ro.bandwidth_hz_per_px,
            "DummyScans": protocol.dummy_scans,
            "RFPhaseCycling": [0.0, 180.0],
            "PreparationPulse": "alpha/2",
            "PreparationInterval": exc_block + t_prep_block,
        },
    )
