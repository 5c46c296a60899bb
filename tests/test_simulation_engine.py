"""Bloch engine: kernels agree with each other, with the reader's k-space and with physics.

The sequences come from our own builders (``mrharmony.sequences``) written to ``tmp_path``
and read with ``mrharmony.formats.pulseq.read_pulseq``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from mrharmony.backend import cupy_available
from mrharmony.errors import SimulationError
from mrharmony.formats.pulseq import read_pulseq
from mrharmony.phantoms import Phantom
from mrharmony.sequences.io import build
from mrharmony.sequences.protocol import protocol_from_mapping
from mrharmony.simulation.engine import simulate
from mrharmony.simulation.spins import GAMMA_BAR_HZ_PER_T, SpinSystem, lorentzian_offsets_hz
from mrharmony.simulation.timeline import OP_RUN, compile_timeline

PROTOCOLS = "examples/protocols"


@pytest.fixture(scope="module")
def gre_seq(tmp_path_factory):
    """A 16 x 16 single-slice RF-spoiled GRE (2 dummy scans) from our builder."""
    with open(Path(__file__).resolve().parents[1] / PROTOCOLS / "gre2d.toml", "rb") as f:
        data = tomllib.load(f)
    data.update(matrix=[16, 16], n_slices=1, dummy_scans=2, fov_mm=[160, 160])
    seq = build(protocol_from_mapping(data), "siemens-prisma")
    path = tmp_path_factory.mktemp("gre") / "gre.seq"
    seq.write(str(path))
    return read_pulseq(path)


def _random_spins(n: int, *, seed: int, diffusion: bool) -> SpinSystem:
    rng = np.random.default_rng(seed)
    pos = np.column_stack(
        [rng.uniform(-0.07, 0.07, n), rng.uniform(-0.07, 0.07, n), rng.uniform(-2e-3, 2e-3, n)]
    )
    d = rng.uniform(0, 3e-9, (n, 6)) * np.array([1, 0.1, 0.1, 1, 0.1, 1]) if diffusion else 0.0
    return SpinSystem(
        position_m=pos,
        pd=rng.uniform(0.2, 1, n),
        r1_per_s=1 / rng.uniform(0.3, 2, n),
        r2_per_s=1 / rng.uniform(0.02, 0.2, n),
        df_hz=rng.normal(0, 30, n),
        b1_scale=rng.uniform(0.8, 1.2, n),
        d_m2_s=d,
        voxel_index=np.arange(n) // 2,
        n_voxels=(n + 1) // 2,
    )


def _coils(n_coils: int, n_voxels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_coils, n_voxels)) + 1j * rng.normal(size=(n_coils, n_voxels))
            ).astype(np.complex64)


def test_timeline_fuses_cartesian_readouts(gre_seq):
    tl = compile_timeline(gre_seq)
    assert tl.n_samples == sum(r.num_samples for r in gre_seq.adc_records())
    assert tl.info["n_rf_shapes"] == 1  # RF spoiling only changes the phase offset
    runs = tl.op == OP_RUN
    assert runs.sum() == 16  # one readout run per line
    # The first sample of a line follows a different (prephaser) interval.
    assert np.all(tl.run_n[tl.arg[runs]] == gre_seq.adc_records()[0].num_samples - 1)


def test_numba_and_array_module_kernels_agree(gre_seq):
    spins = _random_spins(203, seed=1, diffusion=True)  # not a multiple of the lane width
    coils = _coils(3, spins.n_voxels, seed=2)
    fast = simulate(gre_seq, spins, coil_sens=coils)
    ref = simulate(gre_seq, spins, coil_sens=coils, _kernel="xp")
    assert fast.shape == (3, 256) and fast.dtype == np.complex64
    # Same model, two implementations (float64 state): agreement to float32 precision.
    np.testing.assert_allclose(fast, ref, atol=2e-5 * np.abs(ref).max())


def test_chunking_does_not_change_the_signal(gre_seq):
    spins = _random_spins(101, seed=3, diffusion=False)
    whole = simulate(gre_seq, spins)
    chunked = simulate(gre_seq, spins, chunk_size=17)
    np.testing.assert_allclose(chunked, whole, atol=1e-6 * np.abs(whole).max())
    again = simulate(gre_seq, spins)
    np.testing.assert_array_equal(again, whole)  # deterministic


def _phase_ratio(seq, position_m, **kwargs) -> np.ndarray:
    """Signal of a spin at ``position_m`` over a spin at the origin.

    T2 = 1 ms removes the previous TRs' transverse magnetisation (exp(-12) per TR), so both
    spins see the same excitation and the ratio is the gradient phase alone.
    """
    pos = np.array([[0.0, 0.0, 0.0], position_m])
    spins = SpinSystem(position_m=pos, pd=1.0, r1_per_s=0.0, r2_per_s=1e3, df_hz=0.0,
                       b1_scale=1.0, d_m2_s=0.0, voxel_index=[0, 1], n_voxels=2)
    sig = simulate(seq, spins, coil_sens=np.eye(2, dtype=np.complex64), **kwargs)
    return sig[1] / sig[0]


def test_gradient_phase_matches_reader_kspace(gre_seq):
    r = np.array([0.031, -0.047, 0.0])
    ratio = _phase_ratio(gre_seq, r)
    k = gre_seq.kspace_at_adc()
    expected = np.exp(-2j * np.pi * (k @ r))
    # Exact gradient integration: phase error from float32 output only.
    np.testing.assert_allclose(ratio, expected, atol=2e-4)


def test_gradient_scale_and_delay_options(gre_seq):
    r = np.array([0.04, 0.0, 0.0])
    k = gre_seq.kspace_at_adc()
    scaled = _phase_ratio(gre_seq, r, gradient_scale=(1.05, 1.0, 1.0))
    np.testing.assert_allclose(scaled, np.exp(-2j * np.pi * 1.05 * k[:, 0] * r[0]), atol=2e-4)
    # A readout-axis delay d shifts k_x on the flat top by -G_ro * d (earlier samples).
    delay = 20e-6
    delayed = _phase_ratio(gre_seq, r, gradient_delay_s=(delay, 0.0, 0.0))
    rec = gre_seq.adc_records()[0]
    g_ro = (k[1, 0] - k[0, 0]) / rec.dwell_s
    n = rec.num_samples
    centre = slice(n // 4, 3 * n // 4)  # on the flat top
    shifted = np.exp(-2j * np.pi * (k[:n, 0] - g_ro * delay) * r[0])
    np.testing.assert_allclose(delayed[:n][centre], shifted[centre], atol=2e-4)


def test_ppm_offsets_need_and_use_the_larmor_frequency(gre_seq):
    spins = _random_spins(8, seed=5, diffusion=False)
    a = simulate(gre_seq, spins, b0_t=3.0)
    b = simulate(gre_seq, spins, larmor_hz=3.0 * GAMMA_BAR_HZ_PER_T)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "julia"}, "backend"),
        ({"coil_sens": np.ones((2, 3), np.complex64)}, "coil_sens"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"gradient_scale": (1.0, 1.0)}, "gradient_scale"),
    ],
)
def test_bad_options_raise_simulation_error(gre_seq, kwargs, match):
    spins = _random_spins(4, seed=0, diffusion=False)
    with pytest.raises(SimulationError, match=match):
        simulate(gre_seq, spins, **kwargs)


def test_spin_system_validation():
    with pytest.raises(SimulationError, match="position_m"):
        SpinSystem(position_m=np.zeros((3, 2)), pd=1, r1_per_s=1, r2_per_s=1, df_hz=0,
                   b1_scale=1, d_m2_s=0, voxel_index=0, n_voxels=1)
    with pytest.raises(SimulationError, match="r2_per_s"):
        SpinSystem(position_m=np.zeros((2, 3)), pd=1, r1_per_s=1, r2_per_s=[-1, 1], df_hz=0,
                   b1_scale=1, d_m2_s=0, voxel_index=0, n_voxels=1)
    with pytest.raises(SimulationError, match="voxel_index"):
        SpinSystem(position_m=np.zeros((2, 3)), pd=1, r1_per_s=1, r2_per_s=1, df_hz=0,
                   b1_scale=1, d_m2_s=0, voxel_index=[0, 5], n_voxels=2)


def _phantom(**extra) -> Phantom:
    shape = (4, 3, 1)
    ones = np.ones(shape, np.float32)
    affine = np.diag([2.0, 3.0, 5.0, 1.0])
    affine[:3, 3] = [-4.0, -3.0, 10.0]
    pd = ones.copy()
    pd[0, 0, 0] = 0.0
    return Phantom(
        pd=pd, t1_ms=ones * 1000, t2_ms=ones * 80, t2star_ms=ones * 40, adc_mm2_s=ones * 1e-3,
        b0_hz=ones * 5, labels=(pd > 0).astype(np.int16), label_names={1: "water"},
        affine=affine, field_t=3.0, **extra,
    )


def test_from_phantom_geometry_and_parameters():
    cs = np.zeros((4, 3, 1), np.float32)
    cs[1, 1, 0] = -3.4
    ph = _phantom(chemical_shift_ppm=cs)
    spins = SpinSystem.from_phantom(ph, isochromats_per_voxel=3, b1_scale=np.full(ph.shape, 0.9))
    assert spins.n_spins == 11 * 3 and spins.n_voxels == 12
    ras = ph.positions_mm()
    np.testing.assert_allclose(spins.position_m[::3], ras * [-1e-3, -1e-3, 1e-3])  # LPS, m
    np.testing.assert_array_equal(spins.voxel_index[::3], np.flatnonzero(ph.mask.ravel()))
    np.testing.assert_allclose(spins.pd, 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(spins.r2_per_s, 1 / 0.08, rtol=1e-6)
    np.testing.assert_allclose(spins.b1_scale, 0.9, rtol=1e-6)
    np.testing.assert_allclose(spins.d_m2_s, 1e-9, rtol=1e-6)
    fat = spins.voxel_index == np.ravel_multi_index((1, 1, 0), ph.shape)
    hwhm = (1 / 0.04 - 1 / 0.08) / (2 * np.pi)
    spread = lorentzian_offsets_hz(np.array([hwhm]), 3)[0]
    np.testing.assert_allclose(spins.df_hz[fat], 5 - 3.4 * 3.0 * GAMMA_BAR_HZ_PER_T * 1e-6
                               + spread, rtol=1e-5)
    with pytest.raises(SimulationError, match="b0_hz_extra"):
        SpinSystem.from_phantom(ph, b0_hz_extra=np.zeros((2, 2, 2)))
    with pytest.raises(SimulationError, match="isochromats_per_voxel"):
        SpinSystem.from_phantom(ph, isochromats_per_voxel=0)


def test_lorentzian_spread_gives_t2prime_decay():
    t2prime = 0.02
    df = lorentzian_offsets_hz(np.array([1 / (2 * np.pi * t2prime)]), 200)[0]
    t = np.array([2e-3, 5e-3, 10e-3])
    fid = np.abs(np.exp(-2j * np.pi * df[None, :] * t[:, None]).mean(axis=1))
    # Quantile sampling reproduces exp(-t/T2') to 2 % up to T2'/2 with 200 isochromats
    # (the truncated tails make it decay ~5 % slower at t = T2').
    np.testing.assert_allclose(fid, np.exp(-t / t2prime), rtol=0.02)


def test_subvoxel_positions_are_stratified_through_the_voxel():
    ph = _phantom()
    a = SpinSystem.from_phantom(ph, isochromats_per_voxel=4, subvoxel_positions=True)
    b = SpinSystem.from_phantom(ph, isochromats_per_voxel=4, subvoxel_positions=True)
    np.testing.assert_array_equal(a.position_m, b.position_m)  # deterministic
    centre = np.repeat(ph.positions_mm() * [-1e-3, -1e-3, 1e-3], 4, axis=0)
    offset = a.position_m - centre
    # in-plane at the voxel centre; through-plane equally spaced over the voxel (5 mm):
    # slice-axis crushers and spoilers dephase them, with equally spaced phases
    np.testing.assert_allclose(offset[:, :2], 0.0, atol=1e-12)
    np.testing.assert_allclose(offset[:4, 2], np.array([-1.875, -0.625, 0.625, 1.875]) * 1e-3)
    np.testing.assert_allclose(a.pd, 1 / 4, rtol=1e-6)
    # a 2-D phantom through a given slab: extent L, weight PD L / (n T)
    c = SpinSystem.from_phantom(ph, isochromats_per_voxel=4, subvoxel_positions=True,
                                through_plane_mm=(12.0, 4.0))
    np.testing.assert_allclose(c.position_m[:4, 2] - centre[:4, 2],
                               np.array([-4.5, -1.5, 1.5, 4.5]) * 1e-3)
    np.testing.assert_allclose(c.pd, 12.0 / (4 * 4.0), rtol=1e-6)
    with pytest.raises(SimulationError, match="through_plane_mm"):
        SpinSystem.from_phantom(ph, isochromats_per_voxel=4, subvoxel_positions=True,
                                through_plane_mm=(0.0, 4.0))


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA device")
def test_cupy_backend_matches_numpy(gre_seq):
    spins = _random_spins(501, seed=4, diffusion=True)
    coils = _coils(2, spins.n_voxels, seed=5)
    cpu = simulate(gre_seq, spins, coil_sens=coils)
    gpu = simulate(gre_seq, spins, coil_sens=coils, backend="cupy")
    np.testing.assert_allclose(gpu, cpu, atol=2e-5 * np.abs(cpu).max())


def test_coarse_rf_steps_match_exact_raster_integration(gre_seq):
    spins = _random_spins(64, seed=6, diffusion=False)
    exact = simulate(gre_seq, spins, rf_max_step_s=None)
    coarse = simulate(gre_seq, spins)  # default: 10 us RF steps
    # Second-order step error: below 1e-3 of the peak signal for the 2 ms sinc pulse.
    np.testing.assert_allclose(coarse, exact, atol=1e-3 * np.abs(exact).max())
    with pytest.raises(SimulationError, match="rf_max_step_s"):
        simulate(gre_seq, spins, rf_max_step_s=0.0)


def test_per_sample_diffusion_in_readouts(gre_seq, monkeypatch):
    from mrharmony.simulation import engine

    spins = _random_spins(40, seed=8, diffusion=True)
    spread = simulate(gre_seq, spins)  # readout b spread evenly over its samples
    monkeypatch.setattr(engine, "RUN_B_TOL", 0.0)  # force the exact per-sample path
    exact = simulate(gre_seq, spins)
    exact_xp = simulate(gre_seq, spins, _kernel="xp")
    np.testing.assert_allclose(exact, exact_xp, atol=2e-5 * np.abs(exact).max())
    # Spreading is exact at the end of each readout and within 2e-5 inside it.
    np.testing.assert_allclose(spread, exact, atol=2e-5 * np.abs(exact).max())


def test_many_coils_use_the_gemm_path_with_the_same_result(gre_seq):
    from mrharmony.simulation.engine import BUFFER_MIN_COILS

    spins = _random_spins(90, seed=9, diffusion=True)
    coils = _coils(BUFFER_MIN_COILS + 2, spins.n_voxels, seed=10)
    fast = simulate(gre_seq, spins, coil_sens=coils)
    ref = simulate(gre_seq, spins, coil_sens=coils, _kernel="xp")
    # complex64 GEMM: agreement to float32 precision.
    np.testing.assert_allclose(fast, ref, atol=2e-5 * np.abs(ref).max())
