"""RF-spoiled gradient-echo builders: 2D multi-slice and 3D slab-selective."""

from __future__ import annotations

import math

import numpy as np
import pypulseq as pp

from mrharmony.sequences.builders._common import (
    acs_labels,
    excitation_pulse,
    finalize,
    label,
    make_readout,
    new_sequence,
    phase_encode_areas,
    rf_center_time,
    round_up,
    sampling,
    sampling_definitions,
    set_slice_offset,
    slice_positions_m,
    te_tr_fill,
    trapezoid,
)
from mrharmony.sequences.builders._fat import add_excitation, fat_definitions, fat_modules
from mrharmony.sequences.builders._sms import make_multiband
from mrharmony.sequences.protocol import Gre2DProtocol, Gre3DProtocol
from mrharmony.sequences.scanner import ScannerProfile

__all__ = ["build_gre2d", "build_gre3d"]


def _spoiled_gre(
    protocol: Gre2DProtocol | Gre3DProtocol, scanner: ScannerProfile, *, three_d: bool
) -> pp.Sequence:
    seq, system = new_sequence(scanner)
    fov_m = np.asarray(protocol.fov_mm) * 1e-3
    nx, ny = protocol.matrix[0], protocol.matrix[1]
    nz = protocol.matrix[2] if three_d else 1
    thickness = fov_m[2] if three_d else protocol.slice_thickness_mm * 1e-3
    key = "fov_mm" if three_d else "slice_thickness_mm"

    rf, gz, _ = excitation_pulse(
        system,
        scanner,
        apodization=protocol.rf_apodization,
        flip_deg=protocol.flip_deg,
        duration_s=protocol.rf_duration_ms * 1e-3,
        time_bw_product=protocol.rf_time_bw_product,
        thickness_m=thickness,
        parameter=key,
    )
    chemsat, water = fat_modules(
        system, scanner, protocol, flip_deg=protocol.flip_deg, thickness_m=thickness,
        voxel_m=(fov_m[0] / nx, fov_m[1] / ny, thickness / nz), parameter=key,
    )
    if water is not None:
        gz = water.gz  # every sub-pulse's select gradient: the rephaser is -gz.area / 2
    ro = make_readout(
        system,
        scanner,
        fov_m=fov_m[0],
        n=nx,
        bandwidth_hz_per_px=protocol.readout_bandwidth_hz_per_px,
        oversampling=protocol.readout_oversampling,
    )
    ky_areas = phase_encode_areas(fov_m[1], ny)
    kz_areas = phase_encode_areas(fov_m[2], nz) if three_d else np.zeros(1)
    # Prephasers sized for the largest area so that every line has the same timing.
    gz_reph_area = -gz.area / 2
    pre_x = pp.make_trapezoid(channel="x", area=-ro.area_to_center, system=system)
    pre_y = pp.make_trapezoid(channel="y", area=float(np.max(np.abs(ky_areas))), system=system)
    pre_z = pp.make_trapezoid(
        channel="z",
        area=float(np.max(np.abs(kz_areas + gz_reph_area))) + abs(gz_reph_area),
        system=system,
    )
    t_pre = round_up(
        max(pp.calc_duration(pre_x), pp.calc_duration(pre_y), pp.calc_duration(pre_z)),
        system.block_duration_raster,
    )
    gx_pre = trapezoid(channel="x", area=-ro.area_to_center, duration=t_pre, system=system)

    # Spoilers: cycles across a voxel along x and across the slice (partition) along z.
    spoil_x = pp.make_trapezoid(
        channel="x", area=protocol.spoiler_cycles_per_voxel * nx / fov_m[0], system=system
    )
    spoil_z = pp.make_trapezoid(
        channel="z", area=protocol.crusher_cycles_per_slice / (thickness / nz), system=system
    )
    # the z spoiler also rewinds the partition encoding: size it for the largest sum
    rew_z = pp.make_trapezoid(
        channel="z", area=abs(spoil_z.area) + float(np.max(np.abs(kz_areas))), system=system
    )
    t_spoil = max(pp.calc_duration(spoil_x), pp.calc_duration(rew_z), pp.calc_duration(pre_y))

    exc_block = pp.calc_duration(rf, gz)
    t_rf_center = rf_center_time(rf)
    t_fat = 0.0
    if water is not None:
        exc_block, t_rf_center = water.duration, water.centre_s
    if chemsat is not None:
        t_fat = chemsat.duration
    t_ro = pp.calc_duration(ro.gx, ro.adc)
    delay_te, delay_tr, te, tr = te_tr_fill(
        min_te_s=exc_block - t_rf_center + t_pre + ro.time_to_center_s,
        fixed_tr_s=t_fat + exc_block + t_pre + t_ro + t_spoil,
        protocol=protocol,
        scanner=scanner,
        raster_s=system.block_duration_raster,
    )

    samp = sampling(protocol)
    sampled = samp.mask.reshape(ny, nz)
    acs = samp.acs.reshape(ny, nz)
    positions = np.zeros(1) if three_d else slice_positions_m(protocol)
    mb = None if three_d else make_multiband(protocol, rf, gz)
    if mb is not None:
        mb.check_b1(scanner, positions, np.arange(ny) - ny // 2, flip_deg=protocol.flip_deg,
                    duration_ms=protocol.rf_duration_ms)
    rf_phase = 0.0
    rf_inc = 0.0
    inc = math.radians(protocol.rf_spoiling_inc_deg)

    def play(pos: float, slc: int, lines_on: np.ndarray, *, group: int | None = None,
             reference: bool = False) -> None:
        """Dummies + the lines ``lines_on[iy, iz]`` of one slice (or multiband group)."""
        nonlocal rf_phase, rf_inc
        lines = [(None, None)] * protocol.dummy_scans + [
            (iy, iz) for iz in range(nz) for iy in range(ny) if lines_on[iy, iz]
        ]
        for iy, iz in lines:
            dummy = iy is None
            ky = 0.0 if dummy else float(ky_areas[iy])
            kz = 0.0 if dummy else float(kz_areas[iz])
            if group is None:
                pulse = rf
                set_slice_offset(pulse, gz.amplitude, float(pos))
            else:  # the multiband pulse of the group, CAIPI phases of this line
                pulse = mb.pulse(group, positions, (ny // 2 if dummy else iy) - ny // 2)
            pulse.phase_offset += rf_phase
            rf_phase_now = rf_phase
            ro.adc.phase_offset = rf_phase
            rf_inc = (rf_inc + inc) % (2 * math.pi)
            rf_phase = (rf_phase + rf_inc) % (2 * math.pi)
            add_excitation(seq, pulse, gz, chemsat=chemsat, water=water, position_m=float(pos),
                           phase_rad=rf_phase_now, labels=[label("TRID", 1 if dummy else 2)])
            gy_pre = trapezoid(channel="y", area=ky, duration=t_pre, system=system)
            gz_pre = trapezoid(
                channel="z", area=gz_reph_area + kz, duration=t_pre, system=system
            )
            seq.add_block(gx_pre, gy_pre, gz_pre)
            if delay_te > 0:
                seq.add_block(pp.make_delay(delay_te))
            if dummy:
                seq.add_block(pp.make_delay(t_ro))
            else:
                if mb is not None:
                    extra = mb.reference_labels() if reference else mb.imaging_labels()
                else:
                    extra = acs_labels(samp, samp.accelerated and bool(acs[iy, iz]))
                seq.add_block(
                    ro.gx,
                    ro.adc,
                    label("LIN", iy),
                    label("PAR" if three_d else "SLC", iz if three_d else slc),
                    *extra,
                )
            gy_rew = trapezoid(channel="y", area=-ky, duration=t_spoil, system=system)
            gz_rew = trapezoid(
                channel="z", area=spoil_z.area - kz, duration=t_spoil, system=system
            )
            seq.add_block(spoil_x, gy_rew, gz_rew, pp.make_delay(t_spoil + delay_tr))

    if mb is None:
        for i_slice, pos in enumerate(positions):
            play(float(pos), i_slice, sampled)
    else:
        # the single-band reference (each slice alone), then the slice groups together
        ref_on = np.zeros((ny, nz), dtype=bool)
        ref_on[mb.reference_line_set(ny), :] = True
        for i_slice, pos in enumerate(positions):
            play(float(pos), i_slice, ref_on, reference=True)
        for g, members in enumerate(mb.groups):
            play(float(np.mean(positions[members])), g, sampled, group=g)

    ordering = "linear-partitions-outer" if three_d else "linear-sequential-slices"
    return finalize(
        seq,
        protocol,
        scanner,
        te_s=te,
        tr_s=tr,
        trajectory="cartesian",
        ordering=ordering,
        extra={
            "ReadoutBandwidth": ro.bandwidth_hz_per_px,
            "RFSpoilingIncrement": protocol.rf_spoiling_inc_deg,
            "DummyScans": protocol.dummy_scans,
            **sampling_definitions(samp),
            **fat_definitions(chemsat, water, scanner),
            **(mb.definitions() if mb is not None else {}),
        },
    )


def build_gre2d(protocol: Gre2DProtocol, scanner: ScannerProfile) -> pp.Sequence:
    """Build a 2D multi-slice RF-spoiled gradient echo (FLASH / SPGR / T1-FFE).

    Slices are acquired sequentially, each with a linear phase-encoding order. The
    readout is followed by a gradient spoiler (2 cycles per voxel in x, 4 across the
    slice in z), a phase-encoding rewinder, and quadratic RF spoiling.

    Parameters
    ----------
    protocol : Gre2DProtocol
        TE, TR (ms), flip (deg), FOV (mm), matrix, slices.
    scanner : ScannerProfile
        Hardware limits to build within.

    Returns
    -------
    pypulseq.Sequence
        With the standard ``[DEFINITIONS]`` (achieved TE/TR in seconds).

    Raises
    ------
    ProtocolError
        TE or TR below the minimum, slice too thin, or bandwidth too high for the scanner.
    """
    return _spoiled_gre(protocol, scanner, three_d=False)


def build_gre3d(protocol: Gre3DProtocol, scanner: ScannerProfile) -> pp.Sequence:
    """Build a 3D slab-selective RF-spoiled gradient echo.

    The slab thickness is the third FOV entry; phase encoding runs over ``matrix[1]``
    lines (inner loop) and ``matrix[2]`` partitions (outer loop).

    Parameters
    ----------
    protocol : Gre3DProtocol
        TE, TR (ms), flip (deg), FOV (mm, 3 values), matrix (3 values).
    scanner : ScannerProfile
        Hardware limits to build within.

    Returns
    -------
    pypulseq.Sequence

    Raises
    ------
    ProtocolError
        TE or TR below the minimum, slab too thin, or bandwidth too high for the scanner.
    """
    return _spoiled_gre(protocol, scanner, three_d=True)
