"""Magnitude of single-isochromat signals against the Bloch equations.

Under the Bloch equations with M0 = 1, ``d|M|^2/dt = -2 R2 |Mxy|^2 - 2 R1 Mz^2 + 2 R1 Mz``;
on the unit sphere this is ``<= -R1 (1 - Mz)^2 <= 0`` exactly when ``R2 >= R1 / 2``
(T2 <= 2 T1, the physical range), so |M| <= 1 for all time. With T2 > 2 T1 (unphysical)
free relaxation *grows* |M| (Mz recovers while Mxy barely decays) and repeated pulses can
pile transverse magnetisation up coherently over TRs to |Mxy| >> 1: that is what the
Bloch equations predict, not a simulator error. The tests check the bound on a
mrharmony-built inversion-recovery spin echo in the physical range, and the simulator
against an independent integration (matrix exponential of the Bloch generator per RF
raster step and gradient breakpoint interval, float64) for one spin on both sides of
T2 = 2 T1.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import expm

from mrharmony.formats.pulseq import read_pulseq
from mrharmony.sequences import load_scanner
from mrharmony.sequences.builders.spin_echo import build_irse
from mrharmony.sequences.protocol import protocol_from_mapping
from mrharmony.simulation.engine import simulate
from mrharmony.simulation.spins import SpinSystem
from mrharmony.simulation.timeline import compile_timeline

T1_S = 3.0
#: Through-plane positions (m): slice centre, inside the 5 mm slice, near its edge, and in
#: the inversion slab outside the excited slice.
Z_M = (0.0, 0.48e-3, -1.3e-3, 2.2e-3, -3.4e-3)


@pytest.fixture(scope="module")
def irse(tmp_path_factory):
    protocol = protocol_from_mapping({
        "builder": "irse", "name": "t", "fov_mm": [200, 200], "matrix": [16, 8],
        "slice_thickness_mm": 5, "n_slices": 1, "te_ms": 14, "tr_ms": 500,
        "ti_ms": [30, 120, 300],
    })
    path = tmp_path_factory.mktemp("irse") / "irse.seq"
    build_irse(protocol, load_scanner("siemens-prisma")).write(str(path))
    return read_pulseq(path)


def _spins(z_m, r2_per_s: float) -> SpinSystem:
    z = np.atleast_1d(np.asarray(z_m, dtype=np.float64))
    pos = np.zeros((z.size, 3))
    pos[:, 2] = z
    return SpinSystem(position_m=pos, pd=1.0, r1_per_s=1.0 / T1_S, r2_per_s=r2_per_s,
                      df_hz=0.0, b1_scale=1.0, d_m2_s=0.0,
                      voxel_index=np.arange(z.size), n_voxels=z.size)


def _reference(seq, pos_m: np.ndarray, r1: float, r2: float) -> np.ndarray:
    """M_xy at every ADC sample by exact propagators of the Bloch generator (float64).

    Same conventions as the simulator (kernels module docstring): ``dM/dt = M x w - R (M -
    M0)`` with ``w = 2 pi (Re b1, Im b1, G.r)`` and ``b1 = conj(signal exp(i (phase + 2 pi
    f (t - delay))))``. Each block is split at its gradient breakpoints, RF raster edges
    and ADC sample times; within a piece B1 is constant and G is linear (its mean is used).
    Blocks without ADC are cached by their content (the spin is fixed).
    """
    raster = float(seq.raster.rf_s)
    m = np.array([0.0, 0.0, 1.0, 1.0])
    out, cache = [], {}
    for block in seq.blocks:
        rf, adc = block.rf, block.adc
        tb, gb = (np.asarray(a, dtype=np.float64) for a in block.gradient_waveform())
        dur = float(block.duration_s)
        key = None
        if adc is None:
            key = (None if rf is None else (rf.id, rf.freq_offset_hz, rf.phase_offset_rad),
                   dur, tb.tobytes(), gb.tobytes())
            if key in cache:
                m = cache[key] @ m
                continue
        pts = [np.array([0.0, dur]), tb]
        if rf is not None:
            pts.append(rf.delay_s + np.arange(rf.t_s.size + 1) * raster)
        if adc is not None:
            ts = adc.delay_s + (np.arange(adc.num_samples) + 0.5) * adc.dwell_s
            pts.append(ts)
        p = np.unique(np.round(np.concatenate(pts), 12))
        h = np.diff(p)
        g_mean = np.stack([0.5 * (np.interp(p[1:], tb, gb[:, a]) + np.interp(p[:-1], tb, gb[:, a]))
                           for a in range(3)], axis=1)
        wz = 2 * np.pi * (g_mean @ pos_m)
        b1 = np.zeros(h.size, dtype=np.complex128)
        if rf is not None:
            mid = 0.5 * (p[1:] + p[:-1]) - rf.delay_s
            j = np.floor(mid / raster).astype(np.int64)
            inside = (j >= 0) & (j < rf.t_s.size)
            jj = np.clip(j, 0, rf.t_s.size - 1)
            b1 = np.where(inside, np.conj(rf.signal_hz[jj] * np.exp(
                1j * (rf.phase_offset_rad + 2 * np.pi * rf.freq_offset_hz * mid))), 0.0)
        gen = np.zeros((h.size, 4, 4))
        wx, wy = 2 * np.pi * b1.real, 2 * np.pi * b1.imag
        gen[:, 0, 1], gen[:, 0, 2] = wz, -wy
        gen[:, 1, 0], gen[:, 1, 2] = -wz, wx
        gen[:, 2, 0], gen[:, 2, 1] = wy, -wx
        gen[:, 0, 0] = gen[:, 1, 1] = -r2
        gen[:, 2, 2], gen[:, 2, 3] = -r1, r1
        prop = expm(gen * h[:, None, None])
        if adc is None:
            total = np.eye(4)
            for step in prop:
                total = step @ total
            cache[key] = total
            m = total @ m
            continue
        sample_at = np.isin(np.round(p[1:], 12), np.round(ts, 12))
        for step, is_sample in zip(prop, sample_at, strict=True):
            m = step @ m
            if is_sample:
                out.append(m[0] + 1j * m[1])
    return np.asarray(out)


@pytest.mark.parametrize("t2_s", [2.0, 2.0 * T1_S])
def test_single_isochromats_stay_within_m0_when_t2_at_most_2t1(irse, t2_s):
    spins = _spins(Z_M, 1.0 / t2_s)
    n = spins.n_spins
    sig = simulate(irse, spins, coil_sens=np.eye(n, dtype=complex), rf_max_step_s=None)
    peak = np.abs(sig).max(axis=1)
    assert peak.max() <= 1.0 + 1e-6, peak
    assert peak[:2].min() > 0.3  # the in-slice spins are excited (the bound is not vacuous)


@pytest.mark.parametrize("t2_s", [2.0, 100.0])
def test_single_isochromat_matches_expm_reference(irse, t2_s):
    z = 0.48e-3
    ref = _reference(irse, np.array([0.0, 0.0, z]), 1.0 / T1_S, 1.0 / t2_s)
    sig = simulate(irse, _spins(z, 1.0 / t2_s), rf_max_step_s=None)[0]
    assert ref.size == sig.size
    # The simulator reports the demodulated signal; undo the receiver phase to get M_xy.
    mxy = sig * np.exp(-1j * compile_timeline(irse).sample_demod_rad)
    # complex64 output, float64 state: agreement to 1e-5 of M0 (measured < 1e-7).
    np.testing.assert_allclose(mxy, ref, rtol=0, atol=1e-5)
    if t2_s > 2 * T1_S:
        # Unphysical T2 > 2 T1: the Bloch equations themselves drive |M| above M0.
        assert np.abs(ref).max() > 1.0
    else:
        assert np.abs(ref).max() <= 1.0 + 1e-9
