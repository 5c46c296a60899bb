"""The fast simulation path against the full isochromat engine.

:mod:`mrharmony.simulation.fastpath` simulates each tissue class once and applies the
encoding phase ``exp(-i 2 pi (k.d + tau df))`` per voxel. Where one coherence pathway
carries the signal (single-shot EPI with TR >> T2) it must equal the full engine to
well under 1 % of the peak signal, over every coil and sample, with B0 inhomogeneity
(factored as the pathway's dephasing time) and with the site's B1 map (binned to
0.5 %). Where it does not (a point-voxel spoiled GRE keeps in-plane coherences across
TRs; bSSFP's steady state depends on off-resonance), its probe check must refuse, and
``simulate_raw`` must fall back to the full engine and say so in the header.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import numpy as np
import pytest

from mrharmony.formats.pulseq import read_pulseq
from mrharmony.phantoms import make_shepp_logan
from mrharmony.sequences.io import build
from mrharmony.sequences.protocol import protocol_from_mapping
from mrharmony.simulation.engine import simulate
from mrharmony.simulation.fastpath import fast_simulate
from mrharmony.simulation.raw import header_user_parameters, receive_model, simulate_raw
from mrharmony.simulation.site import b1_scale_map, load_site
from mrharmony.simulation.spins import SpinSystem, through_plane_extent

ROOT = Path(__file__).resolve().parents[1]
SITE = "siemens-prisma-3t"


def _seq(name: str, tmp_path: Path, **changes):
    with open(ROOT / "examples" / "protocols" / f"{name}.toml", "rb") as f:
        data = tomllib.load(f)
    data.update(changes)
    path = tmp_path / f"{name}.seq"
    build(protocol_from_mapping(data), "siemens-prisma").write(str(path))
    return path


def _phantom(matrix: int = 32):
    ph = make_shepp_logan(matrix=matrix)
    affine = np.array(ph.affine, dtype=np.float64)
    centre = affine[:3, :3] @ ((np.array(ph.shape) - 1) / 2) + affine[:3, 3]
    affine[:3, 3] -= centre  # the slice at isocentre, as the study runner places it
    return dataclasses.replace(ph, affine=affine)


def _spins(seq, ph, n_iso: int, b0_hz: np.ndarray | None, b1: np.ndarray | None):
    return SpinSystem.from_phantom(
        ph, isochromats_per_voxel=n_iso, b0_hz_extra=b0_hz, b1_scale=b1,
        subvoxel_positions=n_iso > 1,
        through_plane_mm=through_plane_extent(seq, n_iso) if n_iso > 1 else None)


def _b0_ramp(ph, hz_per_cm: float = 2.0, offset_hz: float = 7.0) -> np.ndarray:
    """A linear B0 gradient plus an offset (Hz), as a shim residual."""
    i, j = np.meshgrid(np.arange(ph.shape[0]), np.arange(ph.shape[1]), indexing="ij")
    vox_cm = float(np.linalg.norm(np.asarray(ph.affine)[:3, 0])) / 10
    ramp = offset_hz + hz_per_cm * vox_cm * ((i - ph.shape[0] / 2) + 0.5 * (j - ph.shape[1] / 2))
    return ramp[..., None].astype(np.float32)


def test_fast_path_equals_the_full_engine_where_one_pathway_carries_the_signal(tmp_path):
    seq = read_pulseq(_seq("epi", tmp_path, matrix=[32, 32], n_slices=1, navigator_lines=0,
                           dummy_scans=0))
    ph = _phantom()
    site = load_site(SITE)
    rx = receive_model(site, ph)
    affine = np.asarray(ph.affine, dtype=np.float64)
    spins = _spins(seq, ph, 4, _b0_ramp(ph), b1_scale_map(site, affine, tuple(ph.shape)))
    kw = {"gradient_scale": site.gradient_scale, "gradient_delay_s": site.gradient_delay_s,
              "b0_t": site.field_strength_t}
    fast = fast_simulate(seq, spins, coil_sens=rx.sens, **kw)
    assert fast.signal is not None, fast.reason
    n_vox = int(np.count_nonzero(np.asarray(ph.pd)))
    assert fast.n_voxels == n_vox
    assert fast.n_classes < n_vox // 2  # B1 binned to 0.5 %, B0 factored out
    full = simulate(seq, spins, coil_sens=rx.sens, **kw)
    peak = np.abs(full).max()
    assert np.abs(fast.signal - full).max() / peak < 0.01
    assert np.linalg.norm(fast.signal - full) / np.linalg.norm(full) < 0.01
    assert fast.check_pct < 1.0


@pytest.mark.parametrize("name, b0", [("gre2d", False), ("bssfp", True)])
def test_fast_path_refuses_where_more_than_one_pathway_counts(tmp_path, name, b0):
    """A point-voxel spoiled GRE keeps in-plane coherences across TRs that the one-pathway
    model drops; a balanced SSFP's signal depends on off-resonance through its steady
    state (banding), not only as a phase. The probe check must see both and refuse."""
    seq = read_pulseq(_seq(name, tmp_path, matrix=[32, 32], n_slices=1))
    ph = _phantom()
    rx = receive_model(load_site(SITE), ph)
    spins = _spins(seq, ph, 4, _b0_ramp(ph) if b0 else None, None)
    fast = fast_simulate(seq, spins, coil_sens=rx.sens, b0_t=3.0)
    assert fast.signal is None
    assert fast.check_pct > 1.0
    assert "differs from the full engine" in fast.reason
    if name == "gre2d":  # the fall-back reuses the compiled timeline: the same signal
        again = simulate(seq, spins, coil_sens=rx.sens, b0_t=3.0, timeline=fast.timeline)
        np.testing.assert_array_equal(again, simulate(seq, spins, coil_sens=rx.sens, b0_t=3.0))


def test_simulate_raw_records_the_path_and_falls_back(tmp_path):
    ph = _phantom()
    epi = _seq("epi", tmp_path, matrix=[32, 32], n_slices=1, navigator_lines=0,
               dummy_scans=0)
    gre = _seq("gre2d", tmp_path, matrix=[32, 32], n_slices=1, dummy_scans=0)
    paths = {}
    for label, seq_path, tol in (("fast", epi, 1.0), ("full", epi, None),
                                 ("fallback", gre, 1.0)):
        paths[label] = simulate_raw(seq_path, ph, SITE, tmp_path / f"{label}.h5", noise=False,
                                    isochromats_per_voxel=4, fast_path_tol_pct=tol)
    from mrharmony.errors import SimulationError

    with pytest.raises(SimulationError, match="fast_path_tol_pct: must be > 0"):
        simulate_raw(epi, ph, SITE, tmp_path / "bad.h5", fast_path_tol_pct=float("nan"))
    assert not (tmp_path / "bad.h5").exists()
    fast = header_user_parameters(paths["fast"])
    assert fast["simulation_path"] == "fast" and fast["fast_path_check_pct"] < 1.0
    assert "simulation_path" in header_user_parameters(paths["full"])
    assert header_user_parameters(paths["full"])["simulation_path"] == "full"
    back = header_user_parameters(paths["fallback"])
    assert back["simulation_path"] == "full"
    assert "differs from the full engine" in back["fast_path_fallback"]

    from mrharmony.formats.raw import load_raw

    a = np.concatenate([acq.data.ravel() for acq in load_raw(paths["fast"]).acquisitions])
    b = np.concatenate([acq.data.ravel() for acq in load_raw(paths["full"]).acquisitions])
    assert np.abs(a - b).max() / np.abs(b).max() < 0.01


def test_cli_says_which_path_ran(tmp_path, capsys):
    from mrharmony.cli import main

    ph_dir = _phantom().save(tmp_path / "phantom")
    epi = _seq("epi", tmp_path, matrix=[32, 32], n_slices=1, navigator_lines=0, dummy_scans=0)
    assert main(["simulate", str(epi), str(ph_dir), "--site", SITE, "-o",
                 str(tmp_path / "raw.h5"), "--isochromats", "4", "--fast-path", "1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "simulation path: fast (" in out and "classes for 515 voxels" in out
    assert main(["simulate", str(epi), str(ph_dir), "--site", SITE, "-o",
                 str(tmp_path / "bad.h5"), "--fast-path", "0"]) == 2  # PCT must be > 0
    assert not (tmp_path / "bad.h5").exists()


def test_study_option_reaches_the_simulate_task_and_its_record(tmp_path):
    from mrharmony.errors import StudyError
    from mrharmony.study.config import study_from_mapping
    from mrharmony.study.plan import plan_tasks, preflight
    from mrharmony.study.tasks import stage_simulate

    base = {"study": {"name": "fp", "seed": 1},
            "phantom": {"kind": "shepp-logan", "matrix": 32},
            "protocols": [{"name": "epi", "file": str(ROOT / "examples" / "protocols"
                                                     / "epi.toml")}],
            "sites": {"names": [SITE, "ge-premier-3t"]}}

    def sim_params(simulation: dict) -> list[dict]:
        study = study_from_mapping({**base, "simulation": simulation})
        plan = plan_tasks(study, preflight(study))
        return [spec.params for spec in plan.specs if spec.stage == "simulate"]

    off = sim_params({"isochromats_per_voxel": 4})
    assert off and all("fast_path_tol_pct" not in p for p in off)  # task keys as before
    on = sim_params({"isochromats_per_voxel": 4, "fast_path_tol_pct": 2.0})
    assert all(p["fast_path_tol_pct"] == 2.0 for p in on)
    with pytest.raises(StudyError, match="fast_path_tol_pct"):
        study_from_mapping({**base, "simulation": {"fast_path_tol_pct": -1}})

    (tmp_path / "seq").mkdir()
    epi = _seq("epi", tmp_path / "seq", matrix=[32, 32], n_slices=1, navigator_lines=0,
               dummy_scans=0)
    epi.rename(tmp_path / "seq" / "sequence.seq")
    _phantom().save(tmp_path / "ph" / "phantom")
    params = {**on[0], "site": load_site(SITE).to_mapping(), "native": False}
    (tmp_path / "work").mkdir()
    record = stage_simulate(params, {"sequence": tmp_path / "seq", "phantom": tmp_path / "ph"},
                            tmp_path / "work")
    assert record["simulation_path"] == "fast"
