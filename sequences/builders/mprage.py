"""3D MPRAGE builder: non-selective adiabatic inversion + one RF-spoiled GRE train per partition."""

from __future__ import annotations

import math

import numpy as np
import pypulseq as pp

from mrharmony.errors import ProtocolError
from mrharmony.sequences.builders._common import (
    acs_labels,
    check_positive_delay,
    excitation_pulse,
    fill_delay,
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
    trapezoid,
)
from mrharmony.sequences.builders._fat import add_excitation, fat_definitions, fat_modules
from mrharmony.sequences.protocol import MPRAGEProtocol
from mrharmony.sequences.scanner import ScannerProfile

__all__ = ["build_mprage"]

#: Hyperbolic-secant inversion: duration (s), beta (rad/s) and mu (Siemens-like 10 ms HS1).
INVERSION_DURATION_S = 10e-3
INVERSION_BETA = 800.0
INVERSION_MU = 4.9



def build_mprage(protocol: MPRAGEProtocol, scanner: ScannerProfile) -> pp.Sequence:
    """Build a 3D MPRAGE (magnetization-prepared rapid gradient echo).

    For every partition (outer loop, ``matrix[2]``): a non-selective adiabatic
    hyperbolic-secant inversion (RF use ``inversion``, 10 ms) followed by a spoiler,
    the inversion delay, and one RF-spoiled, slab-selective GRE train over all
    ``matrix[1]`` phase-encoding lines of that partition in linear order (ky from
    ``-N/2`` up), so the k-space-centre line is excitation ``N // 2`` of the train. TI is
    measured from the inversion centre to the centre of that excitation; TR is the
    time between inversions; the GRE repetition time inside the train is
    ``echo_spacing_ms`` (the minimum when not given). Quadratic RF spoiling runs
    continuously over the whole scan; each line ends with a readout spoiler and
    phase-encode rewinders. ``dummy_scans`` are whole inversion periods without ADC.

    Parameters
    ----------
    protocol : MPRAGEProtocol
        TE, TR (inversion repetition), TI, echo spacing (ms), flip (deg), FOV (mm,
        3 values; the third is the excited slab), matrix (3 values).
    scanner : ScannerProfile
        Hardware limits to build within.

    Returns
    -------
    pypulseq.Sequence
        With ``[DEFINITIONS]`` ``TE``, ``TR``, ``TI`` (s) and ``EchoSpacing`` (s).

    Raises
    ------
    ProtocolError
        TE, echo spacing, TI or TR below the minimum, slab too thin, or bandwidth too
        high for the scanner.
    """
    seq, system = new_sequence(scanner)
    raster = system.block_duration_raster
    fov_m = np.asarray(protocol.fov_mm) * 1e-3
    nx, ny, nz = protocol.matrix

    # --- events -------------------------------------------------------------------
    rf_inv = pp.make_adiabatic_pulse(
        pulse_type="hypsec",
        beta=INVERSION_BETA,
        mu=INVERSION_MU,
        duration=INVERSION_DURATION_S,
        delay=system.rf_dead_time,
        system=system,
        use="inversion",
    )
    t_inv = round_up(pp.calc_duration(rf_inv), raster)
    inv_c = rf_center_time(rf_inv)
    isp_x = pp.make_trapezoid(channel="x", area=4 * nx / fov_m[0], system=system)
    isp_y = pp.make_trapezoid(channel="y", area=4 * ny / fov_m[1], system=system)
    isp_z = pp.make_trapezoid(channel="z", area=4 * nz / fov_m[2], system=system)
    t_isp = round_up(
        max(pp.calc_duration(isp_x), pp.calc_duration(isp_y), pp.calc_duration(isp_z)), raster
    )
    isp = [trapezoid(channel=g.channel, area=g.area, duration=t_isp, system=system)
           for g in (isp_x, isp_y, isp_z)]

    rf, gz, _ = excitation_pulse(
        system,
        scanner,
        apodization=protocol.rf_apodization,
        flip_deg=protocol.flip_deg,
        duration_s=protocol.rf_duration_ms * 1e-3,
        time_bw_product=protocol.rf_time_bw_product,
        thickness_m=fov_m[2],
        parameter="fov_mm",
    )
    t_exc = round_up(pp.calc_duration(rf, gz), raster)
    exc_c = rf_center_time(rf)
    if protocol.fat_suppression == "chemsat":
        raise ProtocolError(
            "fat_suppression: chemsat is not offered for mprage (one saturation per "
            "inversion recovers with fat's short T1 before the k-space centre line, and one "
            "per line would lengthen the echo spacing by the pulse); use water_excitation"
        )
    _, water = fat_modules(
        system, scanner, protocol, flip_deg=protocol.flip_deg, thickness_m=fov_m[2],
        voxel_m=(fov_m[0] / nx, fov_m[1] / ny, fov_m[2] / nz), parameter="fov_mm",
    )
    if water is not None:
        gz = water.gz  # every sub-pulse's select gradient: rephaser -gz.area / 2
        t_exc, exc_c = water.duration, water.centre_s
    ro = make_readout(
        system,
        scanner,
        fov_m=fov_m[0],
        n=nx,
        bandwidth_hz_per_px=protocol.readout_bandwidth_hz_per_px,
        oversampling=protocol.readout_oversampling,
    )
    t_ro = round_up(pp.calc_duration(ro.gx, ro.adc), raster)
    ky_areas = phase_encode_areas(fov_m[1], ny)
    kz_areas = phase_encode_areas(fov_m[2], nz)
    gz_reph_area = -gz.area / 2
    pre_x = pp.make_trapezoid(channel="x", area=-ro.area_to_center, system=system)
    pre_y = pp.make_trapezoid(channel="y", area=float(np.max(np.abs(ky_areas))), system=system)
    pre_z = pp.make_trapezoid(
        channel="z",
        area=float(np.max(np.abs(kz_areas + gz_reph_area))),
        system=system,
    )
    t_pre = round_up(
        max(pp.calc_duration(pre_x), pp.calc_duration(pre_y), pp.calc_duration(pre_z)), raster
    )
    gx_pre = trapezoid(channel="x", area=-ro.area_to_center, duration=t_pre, system=system)
    spoil_x = pp.make_trapezoid(channel="x", area=2 * nx / fov_m[0], system=system)
    spoil_z = pp.make_trapezoid(channel="z", area=4 * nz / fov_m[2], system=system)
    rew_z = pp.make_trapezoid(
        channel="z", area=float(np.max(np.abs(spoil_z.area - kz_areas))), system=system
    )
    t_spoil = round_up(
        max(pp.calc_duration(spoil_x), pp.calc_duration(rew_z), pp.calc_duration(pre_y)), raster
    )
    gx_spoil = trapezoid(channel="x", area=spoil_x.area, duration=t_spoil, system=system)

    # --- timing -------------------------------------------------------------------
    min_te = t_exc - exc_c + t_pre + ro.time_to_center_s
    delay_te = fill_delay(
        min_te, what="TE", key="te_ms", requested_ms=protocol.te_ms, scanner=scanner,
        raster_s=raster,
    )
    te = min_te + delay_te
    esp_min = t_exc + t_pre + delay_te + t_ro + t_spoil
    if protocol.echo_spacing_ms is None:
        esp = esp_min
    else:
        check_positive_delay(
            protocol.echo_spacing_ms * 1e-3 - esp_min, what="echo spacing",
            key="echo_spacing_ms", requested_ms=protocol.echo_spacing_ms, scanner=scanner,
        )
        esp = max(round_to(protocol.echo_spacing_ms * 1e-3, raster), esp_min)
    fill_esp = esp - esp_min

    # Sampled lines of each partition (all of them without acceleration / partial
    # Fourier). Trains may differ in length (calibration partitions have more lines):
    # each partition's TI fill keeps TI (to its centre line) and TR fixed.
    samp = sampling(protocol)
    train_lines = {iz: np.flatnonzero(samp.mask[:, iz]) for iz in range(nz)
                   if samp.mask[:, iz].any()}
    before = {iz: int(np.sum(lines < ny // 2)) for iz, lines in train_lines.items()}
    n_before_center = max(before.values())
    min_ti = t_inv - inv_c + t_isp + exc_c + n_before_center * esp
    delay_ti = fill_delay(
        min_ti, what="TI", key="ti_ms", requested_ms=protocol.ti_ms, scanner=scanner,
        raster_s=raster,
    )
    ti = min_ti + delay_ti
    # per partition: the TI fill grows by the lines its train lacks before the centre;
    # the longest inversion period (train + that fill) sets the minimum TR
    extra_ti = {iz: round_to((n_before_center - before[iz]) * esp, raster)
                for iz in train_lines}
    extra_period = max(extra_ti[iz] + round_to((lines.size - ny) * esp, raster)
                       for iz, lines in train_lines.items())
    min_tr = t_inv + t_isp + delay_ti + ny * esp + extra_period
    fill_tr = fill_delay(
        min_tr, what="TR", key="tr_ms", requested_ms=protocol.tr_ms, scanner=scanner,
        raster_s=raster,
    )
    tr = min_tr + fill_tr

    # --- blocks -------------------------------------------------------------------
    gy_pre = {iy: trapezoid(channel="y", area=float(a), duration=t_pre, system=system)
              for iy, a in enumerate(ky_areas)}
    gy_rew = {iy: trapezoid(channel="y", area=-float(a), duration=t_spoil, system=system)
              for iy, a in enumerate(ky_areas)}
    rf_phase = 0.0
    rf_inc = 0.0
    inc = math.radians(protocol.rf_spoiling_inc_deg)
    partitions: list[int | None] = [None] * protocol.dummy_scans + list(train_lines)
    for iz in partitions:
        dummy = iz is None
        lines = np.arange(ny) if dummy else train_lines[iz]
        # TI fill of this partition and the TR fill that keeps the period at TR
        ti_fill = delay_ti + (0.0 if dummy else extra_ti[iz])
        tr_fill = fill_tr + extra_period - (0.0 if dummy else extra_ti[iz]) + round_to(
            (ny - lines.size) * esp, raster)
        kz = 0.0 if dummy else float(kz_areas[iz])
        gz_pre = trapezoid(channel="z", area=gz_reph_area + kz, duration=t_pre, system=system)
        gz_rew = trapezoid(channel="z", area=spoil_z.area - kz, duration=t_spoil, system=system)
        seq.add_block(rf_inv, pp.make_delay(t_inv), label("TRID", 1 if dummy else 2))
        seq.add_block(*isp)
        if ti_fill > 0:
            seq.add_block(pp.make_delay(ti_fill))
        for iy in lines:
            rf.phase_offset = rf_phase
            rf_phase_now = rf_phase
            ro.adc.phase_offset = rf_phase
            rf_inc = (rf_inc + inc) % (2 * math.pi)
            rf_phase = (rf_phase + rf_inc) % (2 * math.pi)
            add_excitation(seq, rf, gz, chemsat=None, water=water, phase_rad=rf_phase_now,
                           events=(pp.make_delay(t_exc),))
            seq.add_block(gx_pre, gy_pre[iy], gz_pre)
            if delay_te > 0:
                seq.add_block(pp.make_delay(delay_te))
            if dummy:
                seq.add_block(ro.gx, pp.make_delay(t_ro))
            else:
                seq.add_block(
                    ro.gx, ro.adc, pp.make_delay(t_ro), label("LIN", iy), label("PAR", iz),
                    *acs_labels(samp, bool(samp.acs[iy, iz])),
                )
            seq.add_block(gx_spoil, gy_rew[iy], gz_rew, pp.make_delay(t_spoil + fill_esp))
        if tr_fill > 0:
            seq.add_block(pp.make_delay(tr_fill))

    return finalize(
        seq,
        protocol,
        scanner,
        te_s=te,
        tr_s=tr,
        ti_s=ti,
        trajectory="cartesian",
        ordering="linear-lines-per-inversion-partitions-outer",
        extra={
            "ReadoutBandwidth": ro.bandwidth_hz_per_px,
            "EchoSpacing": esp,
            "RFSpoilingIncrement": protocol.rf_spoiling_inc_deg,
            "InversionPulse": "hypsec",
            "InversionDuration": INVERSION_DURATION_S,
            "LinesPerInversion": max(lines.size for lines in train_lines.values()),
            "DummyScans": protocol.dummy_scans,
            **sampling_definitions(samp),
            **fat_definitions(None, water, scanner),
        },
    )
