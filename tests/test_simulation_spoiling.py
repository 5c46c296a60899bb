"""Ideal spoiling (``spoiling="ideal"``): the transverse magnetisation is set to zero before
every excitation and inversion, so no coherence crosses from one shot to the next.

Checked against the closed-form longitudinal recurrence of a spoiled gradient echo (exact
for ideal spoiling, whatever the isochromat count), against the pulse roles of inversion-
recovery and multi-echo trains, and through the fast path, ``simulate_raw``, the CLI and
the study runner. Balanced sequences are refused.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pypulseq as pp
import pytest
from test_simulation_analytic import (
    SYSTEM,
    _block,
    _on_raster,
    _one_sample_adc,
    _rf_centres,
    _sample_times,
    _spins,
)
from test_simulation_fastpath import SITE, _b0_ramp, _phantom, _seq

from mrharmony.errors import SimulationError
from mrharmony.formats.pulseq import read_pulseq
from mrharmony.simulation.engine import simulate
from mrharmony.simulation.timeline import compile_timeline, spoiled_pulses


def _gre(tmp_path, *, spoiler: bool, tr=10e-3, te=3e-3, flip=30.0, n_tr=40):
    """Block-pulse gradient echo; a 4-cycle-per-cm x spoiler after the ADC (or none)."""
    seq = pp.Sequence(SYSTEM)
    rf = _block(flip, 0.1e-3, use="excitation")
    c_rf = SYSTEM.rf_dead_time + 0.05e-3
    adc_delay = round(te - (pp.calc_duration(rf) - c_rf) - 5e-6, 6)
    spoil = pp.make_trapezoid("x", area=400.0, duration=3e-3, system=SYSTEM)
    used = pp.calc_duration(rf) + pp.calc_duration(*_on_raster(_one_sample_adc(0.0, adc_delay)))
    fill = round(tr - used - pp.calc_duration(spoil), 5)
    for _ in range(n_tr):
        seq.add_block(rf)
        seq.add_block(*_on_raster(_one_sample_adc(0.0, adc_delay)))
        seq.add_block(spoil if spoiler else pp.make_delay(pp.calc_duration(spoil)))
        seq.add_block(pp.make_delay(fill))
    path = tmp_path / f"gre{int(spoiler)}.seq"
    seq.write(str(path))
    return read_pulseq(path)


def test_ideal_spoiling_follows_the_longitudinal_recurrence_exactly(tmp_path):
    """S_n = Mz_n sin(a) exp(-TE/T2), Mz_{n+1} = Mz_n cos(a) E1 + 1 - E1 from Mz_0 = 1, for
    every TR of the transient: one isochromat and 64 spread over the spoiler's period give
    the same signal (to 1e-6), while without ideal spoiling they do not. Tolerance 2e-3:
    relaxation during the 0.1 ms block pulse (T2 200 ms) is left out of the closed form."""
    t1, t2, flip, tr = 0.6, 0.2, 30.0, 10e-3
    seq = _gre(tmp_path, spoiler=True, tr=tr, flip=flip)
    one = _spins([[1e-3, 0.0, 0.0]], t1_s=t1, t2_s=t2, df_hz=3.0)
    x = (np.arange(64) + 0.5) / 64 * 0.01  # one period of the 400 /m spoiler
    many = _spins(np.column_stack([x, 0 * x, 0 * x]), t1_s=t1, t2_s=t2, df_hz=3.0, pd=1 / 64)
    s_one = simulate(seq, one, spoiling="ideal")[0]
    s_many = simulate(seq, many, spoiling="ideal")[0]
    np.testing.assert_allclose(np.abs(s_many), np.abs(s_one), rtol=1e-5, atol=1e-7)
    # the array-module kernel (the CuPy path, here on NumPy) spoils the same way
    s_xp = simulate(seq, many, spoiling="ideal", _kernel="xp")[0]
    np.testing.assert_allclose(s_xp, s_many, rtol=1e-5, atol=1e-7)

    t_exc = np.array(_rf_centres(seq))
    te = _sample_times(seq) - t_exc
    a, e1 = math.radians(flip), math.exp(-tr / t1)
    mz, expect = 1.0, []
    for _ in range(t_exc.size):
        expect.append(mz * math.sin(a))
        mz = mz * math.cos(a) * e1 + 1 - e1
    expect = np.array(expect) * np.exp(-te / t2)
    np.testing.assert_allclose(np.abs(s_one), expect, rtol=2e-3)
    # without ideal spoiling one isochromat keeps its coherences (an SSFP-like signal)
    s_none = simulate(seq, one)[0]
    assert np.max(np.abs(np.abs(s_none) - expect) / expect) > 0.05


def test_balanced_sequence_is_refused(tmp_path):
    """No spoiler: the net moment between excitations is zero, the steady state is
    transverse; ideal spoiling would erase it, so it is refused with a reason."""
    seq = _gre(tmp_path, spoiler=False, n_tr=4)
    with pytest.raises(SimulationError, match="balanced sequence"):
        compile_timeline(seq, spoiling="ideal")
    with pytest.raises(SimulationError, match="spoiling: expected one of none, ideal"):
        compile_timeline(seq, spoiling="perfect")
    assert compile_timeline(seq).info["n_spoil"] == 0


def test_which_pulses_are_spoiled_before():
    """Inversion (a >= 150 deg pulse no ADC follows before the next excitation): spoiled
    before; refocusing pulses of a train (echoes follow, also after the last one):
    not; excitations: always. IR-SE, then a 3-echo MESE, then a dummy TR without ADC."""
    kind = ["refocusing", "excitation", "refocusing",            # IR-SE: inv, 90, 180
            "excitation", "refocusing", "refocusing", "refocusing",  # MESE: 90, 3 x 180
            "excitation", "refocusing"]                          # dummy: 90, 180, no ADC
    centre = np.array([0.0, 0.4, 0.41, 1.0, 1.01, 1.03, 1.05, 2.0, 2.01])
    samples = np.array([0.42, 1.02, 1.04, 1.06])
    spoil = spoiled_pulses(kind, centre, samples)
    np.testing.assert_array_equal(spoil, [True, True, False, True, False, False, False,
                                          True, True])


def test_fast_path_applies_to_a_spoiled_gre_with_ideal_spoiling(tmp_path):
    """The point-voxel GRE carries coherences across TRs that the one-pathway model
    drops (refused with spoiling 'none', tests/test_simulation_fastpath.py); with ideal
    spoiling it is one pathway: the fast path agrees with the full engine within 1 % of
    the peak signal, with a B0 ramp and the site's B1 map."""
    from test_simulation_fastpath import _spins as phantom_spins

    from mrharmony.simulation.fastpath import fast_simulate
    from mrharmony.simulation.raw import receive_model
    from mrharmony.simulation.site import b1_scale_map, load_site

    seq = read_pulseq(_seq("gre2d", tmp_path, matrix=[32, 32], n_slices=1, dummy_scans=2))
    ph = _phantom()
    site = load_site(SITE)
    rx = receive_model(site, ph)
    spins = phantom_spins(seq, ph, 4, _b0_ramp(ph),
                          b1_scale_map(site, np.asarray(ph.affine), tuple(ph.shape)))
    fast = fast_simulate(seq, spins, coil_sens=rx.sens, b0_t=3.0, spoiling="ideal")
    assert fast.signal is not None, fast.reason
    assert fast.check_pct < 1.0
    full = simulate(seq, spins, coil_sens=rx.sens, b0_t=3.0, spoiling="ideal")
    assert np.max(np.abs(fast.signal - full)) / np.max(np.abs(full)) < 0.01


def test_fast_path_applies_to_mprage_with_ideal_spoiling(tmp_path):
    """3-D MPRAGE (inversion, then a spoiled GRE train per partition) on a 3-D
    Shepp-Logan with a B0 ramp and the site's B1 map: with ideal spoiling one pathway
    carries the signal, and the fast path agrees with the full engine within 1 % of the
    peak signal over every coil and sample (24^3 voxels, 24 x 24 x 12 encodes, 4
    isochromats: 1825 classes for 4613 voxels; measured max 0.25 % of the peak, 0.30 %
    relative L2, probe check 0.30 %)."""
    import dataclasses

    from test_simulation_fastpath import _spins as phantom_spins

    from mrharmony.phantoms import make_shepp_logan
    from mrharmony.simulation.fastpath import fast_simulate
    from mrharmony.simulation.raw import receive_model
    from mrharmony.simulation.site import b1_scale_map, load_site

    seq = read_pulseq(_seq("mprage", tmp_path, matrix=[24, 24, 12], fov_mm=[240, 240, 240],
                           dummy_scans=1))
    ph = make_shepp_logan(matrix=24, three_d=True)
    affine = np.array(ph.affine, dtype=np.float64)
    affine[:3, 3] -= affine[:3, :3] @ ((np.array(ph.shape) - 1) / 2) + affine[:3, 3]
    ph = dataclasses.replace(ph, affine=affine)
    site = load_site(SITE)
    rx = receive_model(site, ph)
    b0 = np.broadcast_to(_b0_ramp(ph), ph.shape).astype(np.float32)
    spins = phantom_spins(seq, ph, 4, b0, b1_scale_map(site, affine, tuple(ph.shape)))
    fast = fast_simulate(seq, spins, coil_sens=rx.sens, b0_t=3.0, spoiling="ideal")
    assert fast.signal is not None, fast.reason
    assert fast.n_classes < fast.n_voxels
    full = simulate(seq, spins, coil_sens=rx.sens, b0_t=3.0, spoiling="ideal")
    assert np.max(np.abs(fast.signal - full)) / np.max(np.abs(full)) < 0.01
    assert np.linalg.norm(fast.signal - full) / np.linalg.norm(full) < 0.01


def test_simulate_raw_cli_and_study_carry_the_spoiling_model(tmp_path, capsys):
    from mrharmony.cli import main
    from mrharmony.errors import StudyError
    from mrharmony.simulation.raw import header_user_parameters, simulate_raw
    from mrharmony.study.config import study_from_mapping
    from mrharmony.study.plan import plan_tasks, preflight

    ph = _phantom()
    gre = _seq("gre2d", tmp_path, matrix=[32, 32], n_slices=1, dummy_scans=0)
    out = simulate_raw(gre, ph, SITE, tmp_path / "ideal.h5", noise=False, spoiling="ideal")
    assert header_user_parameters(out)["spoiling"] == "ideal"
    with pytest.raises(SimulationError, match="spoiling: expected one of"):
        simulate_raw(gre, ph, SITE, tmp_path / "bad.h5", spoiling="perfect")
    assert not (tmp_path / "bad.h5").exists()

    ph_dir = ph.save(tmp_path / "phantom")
    bssfp = _seq("bssfp", tmp_path, matrix=[32, 32], n_slices=1)
    assert main(["simulate", str(bssfp), str(ph_dir), "--site", SITE, "-o",
                 str(tmp_path / "b.h5"), "--spoiling", "ideal"]) == 2
    err = capsys.readouterr().err.strip()
    assert "balanced sequence" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b.h5").exists()

    base = {"study": {"name": "sp", "seed": 1},
            "phantom": {"kind": "shepp-logan", "matrix": 32},
            "protocols": [{"name": "gre", "file": str(Path(__file__).parents[1] / "examples"
                                                      / "protocols" / "gre2d.toml")}],
            "sites": {"names": [SITE, "ge-premier-3t"]}}

    def sim_params(simulation: dict) -> list[dict]:
        study = study_from_mapping({**base, "simulation": simulation})
        plan = plan_tasks(study, preflight(study))
        return [spec.params for spec in plan.specs if spec.stage == "simulate"]

    assert all("spoiling" not in p for p in sim_params({}))  # default: task keys as before
    assert all(p["spoiling"] == "ideal" for p in sim_params({"spoiling": "ideal"}))
    with pytest.raises(StudyError, match="spoiling"):
        study_from_mapping({**base, "simulation": {"spoiling": "perfect"}})
