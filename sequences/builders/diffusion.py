"""Diffusion-weighted single-shot spin-echo EPI (Stejskal-Tanner PGSE): builder ``dwi_epi``.

The diffusion encoding lives here: the direction scheme (:func:`diffusion_directions`,
electrostatic repulsion on the half sphere), the b-value of a pair of trapezoidal lobes
(:func:`stejskal_tanner_b`), the PGSE timing (the longest lobes at the scanner's
maximum gradient and slew that fit into TE) and the encoding loop. The echo-planar
readout, its navigators and the separate calibration reference are the ones of
:mod:`.epi` (:class:`~.epi.EPITrain`); fat suppression and the excitation block are
those of :mod:`._fat`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pypulseq as pp

from mrharmony.errors import ProtocolError
from mrharmony.sequences.builders._common import (
    acs_labels,
    check_positive_delay,
    excitation_pulse,
    finalize,
    label,
    new_sequence,
    rf_center_time,
    round_down,
    round_to,
    round_up,
    sampling,
    sampling_definitions,
    set_slice_offset,
    slice_positions_m,
)
from mrharmony.sequences.builders._fat import add_excitation, fat_definitions, fat_modules
from mrharmony.sequences.builders.epi import TRID, design_epi_train, slot_and_tr, z_spoiler
from mrharmony.sequences.protocol import DWIEPIProtocol
from mrharmony.sequences.scanner import ScannerProfile

__all__ = [
    "build_dwi_epi",
    "diffusion_directions",
    "stejskal_tanner_b",
]


def diffusion_directions(n: int, iterations: int = 1500) -> np.ndarray:
    """Well-distributed unit vectors on the half sphere (electrostatic repulsion).

    Deterministic: starts from a golden-angle spiral on the upper hemisphere and
    minimises the Coulomb energy of the ``n`` antipodal pairs ``±u`` (a diffusion
    direction and its opposite encode the same thing) by projected gradient descent.

    Parameters
    ----------
    n : int
        Number of directions (>= 1).
    iterations : int
        Descent steps.

    Returns
    -------
    numpy.ndarray
        ``(n, 3)`` unit vectors, each with a non-negative z (or, when z = 0, a positive
        first non-zero component).
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if n == 1:
        return np.array([[0.0, 0.0, 1.0]])
    i = np.arange(n)
    z = 1.0 - (i + 0.5) / n
    r = np.sqrt(1.0 - z * z)
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    u = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    eye = np.eye(n, dtype=bool)
    step = 0.3 * math.sqrt(2 * math.pi / n)  # a fraction of the typical spacing, in rad
    for _ in range(iterations):
        d_minus = u[:, None, :] - u[None, :, :]
        d_plus = u[:, None, :] + u[None, :, :]
        r_minus = np.linalg.norm(d_minus, axis=2)
        r_plus = np.linalg.norm(d_plus, axis=2)
        r_minus[eye] = np.inf
        r_plus[eye] = np.inf
        force = (d_minus / r_minus[..., None] ** 3 + d_plus / r_plus[..., None] ** 3).sum(axis=1)
        force -= np.sum(force * u, axis=1, keepdims=True) * u
        norm = np.max(np.linalg.norm(force, axis=1))
        if norm < 1e-12:
            break
        u = u + step * force / norm
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        step *= 0.99
    for row in u:
        nz = row[np.abs(row) > 1e-12]
        if row[2] < -1e-12 or (abs(row[2]) <= 1e-12 and nz.size and nz[0] < 0):
            row *= -1.0
    return u


def stejskal_tanner_b(
    amplitude_hz_per_m: float, small_delta_s: float, big_delta_s: float, ramp_s: float
) -> float:
    """b-value (s/mm2) of a pair of trapezoidal diffusion lobes (Stejskal-Tanner, ramps).

    ``b = (2 pi G)^2 [delta^2 (Delta - delta/3) + eps^3/30 - delta eps^2/6]`` with ``G`` in
    Hz/m, ``delta`` the lobe duration from the start of its ramp-up to the start of its
    ramp-down (flat top + one ramp), ``Delta`` the separation of the lobe starts and
    ``eps`` the ramp time, all in seconds.
    """
    d, big, e = small_delta_s, big_delta_s, ramp_s
    b_si = (2 * math.pi * amplitude_hz_per_m) ** 2 * (
        d * d * (big - d / 3) + e**3 / 30 - d * e * e / 6
    )
    return b_si * 1e-6


@dataclass(frozen=True)
class _DiffusionTiming:
    """Timing of the PGSE preparation for one requested TE (all in seconds)."""

    lobe_s: float
    ramp_s: float
    flat_s: float
    amplitude: float
    fill_pre_s: float
    fill_post_s: float
    big_delta_s: float
    te_s: float
    b_max: float


def build_dwi_epi(protocol: DWIEPIProtocol, scanner: ScannerProfile) -> pp.Sequence:
    """Build a diffusion-weighted single-shot spin-echo EPI (Stejskal-Tanner PGSE).

    Per slice: 90 deg excitation (``use='excitation'``) and slice rephaser, diffusion lobe
    1 (right after the excitation), a fill delay, crusher / 180 deg refocusing pulse
    (``use='refocusing'``, phase 90 deg) / crusher, a fill delay, diffusion lobe 2 (right
    before the readout, identical to lobe 1: the 180 pulse inverts its phase), then the
    EPI readout of :func:`~.epi.build_epi` (navigators, blipped echo train) and a z spoiler.
    The refocusing centre sits at TE/2 (to within half a raster). Diffusion lobes are
    trapezoids at the scanner maximum gradient and slew rate per axis, with the largest
    duration that fits into TE; each b-value scales their amplitude
    (``b ∝ G^2``). Encodings: for each entry of ``b_values_s_per_mm2`` in order, one
    encoding for b = 0, else ``n_directions`` encodings along
    :func:`diffusion_directions`. Each encoding is one volume (``SET`` = encoding index),
    slices inner; ``dummy_scans`` b = 0 volumes without ADC come first.

    Parameters
    ----------
    protocol : DWIEPIProtocol
        TE, TR (ms; TR per volume), b-values (s/mm2), directions, FOV (mm), matrix,
        slices, readout bandwidth (Hz/px), ``ramp_sampling``, ``navigator_lines``.
    scanner : ScannerProfile
        Hardware limits to build within.

    Returns
    -------
    pypulseq.Sequence
        With the standard ``[DEFINITIONS]`` plus ``BValues`` (s/mm2, one per encoding),
        ``DiffusionDirections`` (flattened unit vectors, zeros for b = 0),
        ``DiffusionSmallDelta`` / ``DiffusionBigDelta`` / ``DiffusionRampTime`` (s),
        ``DiffusionGradientMax`` (mT/m, at the largest b) and the EPI readout keys.

    Raises
    ------
    ProtocolError
        TE (``te_ms``) or TR (``tr_ms``) below the minimum, a b-value
        (``b_values_s_per_mm2``) that cannot be reached within TE (with the maximum and
        the TE it needs), slice too thin, or bandwidth too high.
    """
    seq, system = new_sequence(scanner)
    raster = system.block_duration_raster
    thickness = protocol.slice_thickness_mm * 1e-3
    rf_dur = protocol.rf_duration_ms * 1e-3
    rf, gz, gzr = excitation_pulse(
        system, scanner, apodization=protocol.rf_apodization,
        flip_deg=90.0, duration_s=rf_dur,
        time_bw_product=protocol.rf_time_bw_product, thickness_m=thickness,
    )
    rf180, gz180, _ = excitation_pulse(
        system, scanner, apodization=protocol.rf_apodization,
        flip_deg=180.0, duration_s=rf_dur,
        time_bw_product=protocol.rf_time_bw_product, thickness_m=thickness, use="refocusing",
    )
    chemsat, water = fat_modules(
        system, scanner, protocol, flip_deg=90.0, thickness_m=thickness,
        voxel_m=(protocol.fov_mm[0] * 1e-3 / protocol.matrix[0],
                 protocol.fov_mm[1] * 1e-3 / protocol.matrix[1], thickness),
    )
    if water is not None:
        gz = water.gz  # every sub-pulse's select gradient: the same rephaser gzr
    train = design_epi_train(system, scanner, protocol)
    prep_grads, t_pre = train.prep(system)
    crusher = z_spoiler(system, thickness)
    t_crush = round_up(pp.calc_duration(crusher), raster)
    spoil = z_spoiler(system, thickness)
    t_spoil = round_up(pp.calc_duration(spoil), raster)
    t_gzr = round_up(pp.calc_duration(gzr), raster)

    exc_block = round_up(pp.calc_duration(rf, gz), raster)
    ref_block = round_up(pp.calc_duration(rf180, gz180), raster)
    t_exc_c = rf_center_time(rf)
    t_ref_c = rf_center_time(rf180)
    if water is not None:
        exc_block, t_exc_c = water.duration, water.centre_s
    t_fat = chemsat.duration if chemsat is not None else 0.0
    pre_fixed = exc_block - t_exc_c + t_gzr + t_crush + t_ref_c
    post_fixed = ref_block - t_ref_c + t_crush + train.time_to_center(t_pre)

    max_grad = system.max_grad
    full_ramp = round_up(max_grad / system.max_slew, system.grad_raster_time)
    g_raster = max(system.grad_raster_time, raster)

    def design(te_s: float) -> _DiffusionTiming:
        half = te_s / 2
        lobe = round_down(min(half - pre_fixed, half - post_fixed), g_raster)
        lobe = max(lobe, 0.0)
        ramp = min(full_ramp, round_down(lobe / 2, system.grad_raster_time))
        if ramp <= 0:
            lobe, ramp, flat, amp = 0.0, 0.0, 0.0, 0.0
        else:
            flat = lobe - 2 * ramp
            amp = min(max_grad, system.max_slew * ramp)
        fill_pre = max(round_to(half - pre_fixed - lobe, raster), 0.0)
        fill_post = max(round_to(half - post_fixed - lobe, raster), 0.0)
        big_delta = lobe + fill_pre + t_crush + ref_block + t_crush + fill_post
        te_real = pre_fixed + lobe + fill_pre + fill_post + lobe + post_fixed
        b = stejskal_tanner_b(amp, flat + ramp, big_delta, ramp) if amp > 0 else 0.0
        return _DiffusionTiming(
            lobe_s=lobe, ramp_s=ramp, flat_s=flat, amplitude=amp, fill_pre_s=fill_pre,
            fill_post_s=fill_post, big_delta_s=big_delta, te_s=te_real, b_max=b,
        )

    te_req = protocol.te_ms * 1e-3
    te_min = 2 * max(pre_fixed, post_fixed)
    b_req = max(protocol.b_values_s_per_mm2)
    te_need = te_min
    if b_req > 0:
        # Smallest TE (0.1 ms steps) whose longest lobes reach the largest b-value.
        te_need = math.ceil(te_min * 1e4 - 1e-6) / 1e4
        while design(te_need).b_max < b_req and te_need < 10.0:
            te_need = round(te_need + 1e-4, 7)
    # The TE minimum named in the error includes what the largest b-value needs.
    check_positive_delay(
        te_req - max(te_min, te_need) if te_req < te_min else 0.0, what="TE", key="te_ms",
        requested_ms=protocol.te_ms, scanner=scanner,
    )
    timing = design(te_req)
    if b_req > 0 and b_req > timing.b_max * (1 + 1e-9):
        need = f"needs TE >= {te_need * 1e3:.1f} ms" if te_need < 10.0 else (
            "not reachable below TE 10 s"
        )
        raise ProtocolError(
            f"b_values_s_per_mm2: b = {b_req:g} s/mm2 cannot be reached within TE "
            f"{protocol.te_ms:g} ms on {scanner.name} (maximum {timing.b_max:.0f} s/mm2 at "
            f"{scanner.max_grad_mt_per_m:g} mT/m, {scanner.max_slew_t_per_m_per_s:g} T/m/s; "
            f"{need})"
        )

    # Encodings: (b, unit direction).
    directions = diffusion_directions(protocol.n_directions)
    encodings: list[tuple[float, np.ndarray]] = []
    for b in protocol.b_values_s_per_mm2:
        if b == 0:
            encodings.append((0.0, np.zeros(3)))
        else:
            encodings.extend((float(b), d) for d in directions)

    lobe = timing.lobe_s
    min_slot = (
        t_fat + exc_block + t_gzr + 2 * lobe + timing.fill_pre_s + 2 * t_crush + ref_block
        + timing.fill_post_s + train.duration(t_pre) + t_spoil
    )
    slot, tr = slot_and_tr(protocol, scanner, system, min_slot)
    fill = slot - min_slot

    def lobes(b: float, direction: np.ndarray) -> list[SimpleNamespace]:
        if b <= 0 or lobe <= 0:
            return []
        g = timing.amplitude * math.sqrt(b / timing.b_max)
        grads = []
        for axis, comp in zip("xyz", direction, strict=True):
            if abs(comp * g) > 1e-9 * max_grad:
                grads.append(
                    pp.make_trapezoid(
                        channel=axis, amplitude=float(comp * g), rise_time=timing.ramp_s,
                        flat_time=timing.flat_s, fall_time=timing.ramp_s, system=system,
                    )
                )
        return grads

    positions = slice_positions_m(protocol)
    samp = sampling(protocol)
    # dummies (b = 0, no ADC), the separate calibration reference (b = 0, one volume per
    # shot, SET 0), then the encodings
    volumes: list[tuple[str, int, float, np.ndarray, tuple[int, ...]]] = (
        [("dummy", 0, 0.0, np.zeros(3), ())] * protocol.dummy_scans
        + [("reference", 0, 0.0, np.zeros(3), shot) for shot in train.ref_shots]
        + [("imaging", i, b, d, ()) for i, (b, d) in enumerate(encodings)]
    )
    for kind, i_enc, b, direction, shot in volumes:
        acquire = kind == "imaging"
        diff = lobes(b, direction)
        for i_slice, pos in enumerate(positions):
            set_slice_offset(rf, gz.amplitude, float(pos))
            set_slice_offset(rf180, gz180.amplitude, float(pos))
            rf180.phase_offset += math.pi / 2
            add_excitation(seq, rf, gz, chemsat=chemsat, water=water, position_m=float(pos),
                           labels=[label("TRID", TRID[kind])])
            seq.add_block(gzr, pp.make_delay(t_gzr))
            if lobe > 0:
                seq.add_block(*diff, pp.make_delay(lobe))
            if timing.fill_pre_s > 0:
                seq.add_block(pp.make_delay(timing.fill_pre_s))
            seq.add_block(crusher, pp.make_delay(t_crush))
            seq.add_block(rf180, gz180, pp.make_delay(ref_block))
            seq.add_block(crusher, pp.make_delay(t_crush))
            if timing.fill_post_s > 0:
                seq.add_block(pp.make_delay(timing.fill_post_s))
            if lobe > 0:
                seq.add_block(*diff, pp.make_delay(lobe))
            labels = [label("SLC", i_slice)]
            if kind == "reference":
                labels += [label("SET", 0), *acs_labels(samp, True, reference_only=True)]
                played = train.add_reference(seq, system, shot, t_pre, labels=labels)
                pad = round_to(train.duration(t_pre) - played, raster)
            else:
                if acquire:
                    labels += [label("SET", i_enc), *acs_labels(samp, False)]
                train.add_to(seq, system, prep_grads, t_pre, acquire=acquire, labels=labels)
                pad = train.duration(t_pre) - train.imaging_duration(t_pre)
            seq.add_block(spoil, pp.make_delay(t_spoil + fill + pad))

    extra = train.definitions()
    extra.update(
        {
            "BValues": [b for b, _ in encodings],
            "DiffusionDirections": [float(c) for _, d in encodings for c in d],
            "DiffusionSmallDelta": timing.flat_s + timing.ramp_s,
            "DiffusionBigDelta": timing.big_delta_s,
            "DiffusionRampTime": timing.ramp_s,
            "DiffusionGradientMax": (
                timing.amplitude * math.sqrt(b_req / timing.b_max) / scanner.max_grad_hz_per_m
                * scanner.max_grad_mt_per_m if b_req > 0 and timing.b_max > 0 else 0.0
            ),
            "DummyScans": protocol.dummy_scans,
            **sampling_definitions(samp, calibration_mode="separate"),
            **fat_definitions(chemsat, water, scanner),
        }
    )
    return finalize(
        seq,
        protocol,
        scanner,
        te_s=timing.te_s,
        tr_s=tr,
        trajectory="epi",
        ordering="epi-single-shot-linear-sequential-slices-encodings-outer",
        extra=extra,
    )
