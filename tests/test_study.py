"""The study runner: validation before work, Dask execution, resume, report numbers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mrharmony.errors import StudyError
from mrharmony.study import load_study, run_study
from mrharmony.study.analysis import DERIVATIVES, compute_numbers, read_features_csv
from mrharmony.study.store import TaskStore, task_key

IRSE = """
builder = "irse"
name = "tiny-irse"
fov_mm = [240, 240]
matrix = [24, 24]
slice_thickness_mm = 8
n_slices = 1
te_ms = 12
tr_ms = 3000
ti_ms = [100, 400, 1200]
readout_bandwidth_hz_per_px = 400
rf_duration_ms = 2
"""

STUDY = """
[study]
name = "tiny"
seed = 3
repeats = 2

[phantom]
kind = "system"
matrix = 24

[[protocols]]
name = "t1"
file = "irse.toml"
maps = "t1"
plate = "t1"

[sites]
names = ["siemens-prisma-3t", "philips-ingenia-1.5t"]
arms = ["shared"]

[simulation]
isochromats_per_voxel = 1

[harmonize]
methods = ["combat"]
"""


def _write_study(folder: Path, study: str = STUDY, protocol: str = IRSE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "irse.toml").write_text(protocol)
    path = folder / "study.toml"
    path.write_text(study)
    return path


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (("siemens-prisma-3t", "nowhere-9t"), r"sites.names\[0\] 'nowhere-9t'"),
        (('file = "irse.toml"', 'file = "missing.toml"'), r"protocols\[0\] 't1': file"),
        (('kind = "system"', 'kind = "directory"\npath = "no-such-phantom"'),
         r"\[phantom\] path"),
        (("repeats = 2", "repeats = 2\nrepeat = 2"), r"repeat: unknown key"),
        (('plate = "t1"', ""), r"protocols\[0\] 't1': the system phantom needs plate"),
        (('methods = ["combat"]', 'methods = ["kombat"]'), r"unknown method 'kombat'"),
        (("[harmonize]", '[features]\nsegmentation = "kmeans"\n\n[harmonize]'),
         r"segmentation"),
    ],
)
def test_invalid_study_fails_before_any_work(tmp_path, change, match):
    path = _write_study(tmp_path / "s", STUDY.replace(*change))
    out = tmp_path / "out"
    with pytest.raises(StudyError, match=match):
        run_study(path, out, workers=1, progress=False)
    assert not out.exists()  # nothing was started


def test_protocol_the_scanner_cannot_run_is_named(tmp_path):
    path = _write_study(tmp_path / "s", protocol=IRSE.replace("te_ms = 12", "te_ms = 1"))
    with pytest.raises(StudyError, match=r"protocols\[0\] 't1' cannot run at site "
                                         r"'siemens-prisma-3t'.*TE"):
        run_study(path, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()


GRE_R10 = """
builder = "gre2d"
name = "gre-r10"
fov_mm = [200, 200]
matrix = [40, 40]
slice_thickness_mm = 5
te_ms = 5
tr_ms = 100
flip_deg = 20
acceleration = 10
acs_lines = 0
"""


def test_acceleration_above_the_site_coil_is_refused(tmp_path):
    """R = 10 needs at least 10 receive channels: the 8-channel GE site is named."""
    study = STUDY.replace('file = "irse.toml"', 'file = "gre.toml"').replace(
        '"philips-ingenia-1.5t"', '"ge-mr750-3t"')
    folder = tmp_path / "s"
    path = _write_study(folder, study)
    (folder / "gre.toml").write_text(GRE_R10)
    with pytest.raises(StudyError, match=r"cannot run at site 'ge-mr750-3t'.*total "
                                         r"acceleration 10 is above the 8 receive"):
        run_study(path, tmp_path / "out", workers=1, progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- task store


def test_task_key_is_content_addressed():
    a = task_key("recon", {"method": "fft", "x": [1, 2]}, {"raw": "k1"})
    assert a == task_key("recon", {"x": [1, 2], "method": "fft"}, {"raw": "k1"})
    assert a != task_key("recon", {"method": "fft", "x": [1, 2]}, {"raw": "k2"})
    assert a != task_key("recon", {"method": "fft", "x": [1, 3]}, {"raw": "k1"})


def test_store_keeps_finished_work_and_drops_failed(tmp_path):
    store = TaskStore(tmp_path)
    calls = []

    def ok(work: Path):
        calls.append(1)
        (work / "out.txt").write_text("x")
        return {"n": 1}

    first = store.run("s", "k", ok)
    again = store.run("s", "k", ok)
    assert first["status"] == "done" and not first["cached"]
    assert again["cached"] and calls == [1]
    assert (store.path("s", "k") / "out.txt").read_text() == "x"

    def bad(work: Path):
        (work / "partial.txt").write_text("half")
        raise ValueError("broken input")

    failed = store.run("s", "k2", bad, describe={"raw": "somefile"})
    assert failed["status"] == "failed" and "broken input" in failed["error"]
    assert failed["inputs"] == {"raw": "somefile"}
    assert not store.path("s", "k2").exists()
    assert not list((tmp_path / "s").glob(".tmp-*"))


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """The tiny study on a 2-worker LocalCluster and on the default cluster."""
    root = tmp_path_factory.mktemp("study")
    path = _write_study(root / "def")
    two = run_study(path, root / "two", workers=2, progress=False)
    default = run_study(path, root / "default", progress=False)
    return path, two, default


def test_tiny_study_runs_end_to_end(tiny_runs):
    _, two, _ = tiny_runs
    assert two.failed == 0 and two.skipped == 0, two.records
    out = two.out_dir
    deriv = out / DERIVATIVES
    assert (deriv / "report.html").is_file() and (deriv / "features.csv").is_file()
    assert two.report == deriv / "report.html"
    tree = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if p.is_file() and ".mrharmony" not in p.parts)
    assert "sourcedata/sequences/siemens-prisma/t1.seq" in tree
    assert any(t.startswith("sub-phantom/ses-siemensprisma3t/anat/") and t.endswith(
        "_T1map.nii.gz") for t in tree)
    # the 3-TI inversion-recovery series: one file per inversion, its TI a number (s)
    inv = [t for t in tree if t.startswith("sub-phantom/ses-siemensprisma3t/anat/")
           and "_run-1_inv-" in t and t.endswith("_IRT1.json")]
    assert [json.loads((out / t).read_text())["InversionTime"] for t in sorted(inv)] == \
        pytest.approx([0.1, 0.4, 1.2])
    assert any(t.startswith("sourcedata/raw/sub-phantom/ses-philipsingenia15t/") for t in tree)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "raw" and description["GeneratedBy"][0]["Name"] == \
        "mrharmony"
    features = pd.read_csv(deriv / "features.csv")
    t1 = features[(features["quantity"] == "t1") & (features["feature"] == "mean")]
    assert set(t1["site"]) == {"siemens-prisma-3t", "philips-ingenia-1.5t"}
    assert len(t1) > 0


def test_two_workers_and_default_give_identical_results(tiny_runs):
    _, two, default = tiny_runs
    for name in ("features.csv", "report.json"):
        assert (two.out_dir / DERIVATIVES / name).read_bytes() == \
            (default.out_dir / DERIVATIVES / name).read_bytes()


def test_report_numbers_recomputed_from_features_csv(tiny_runs):
    path, two, _ = tiny_runs
    deriv = two.out_dir / DERIVATIVES
    numbers = json.loads((deriv / "report.json").read_text())
    recomputed = compute_numbers(read_features_csv(deriv / "features.csv"),
                                 load_study(path))
    assert json.loads(json.dumps(recomputed, allow_nan=False)) == numbers
    html = (deriv / "report.html").read_text()
    mean_cov = numbers["arms"]["shared"]["mean_cov_pct"]
    assert f"{mean_cov:.2f}" in html


def test_rerun_without_resume_refuses_and_resume_reuses_everything(tiny_runs):
    path, two, _ = tiny_runs
    with pytest.raises(FileExistsError, match="--resume"):
        run_study(path, two.out_dir, workers=1, progress=False)
    again = run_study(path, two.out_dir, workers=1, resume=True, progress=False)
    assert again.ran == 0 and again.cached == len(two.records)
    assert (again.out_dir / DERIVATIVES / "report.json").read_bytes() == \
        (two.out_dir / DERIVATIVES / "report.json").read_bytes()


def test_resume_after_kill_redoes_no_finished_task(tiny_runs, tmp_path):
    path, two, _ = tiny_runs
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mrharmony", "study", "run", str(path), "-o", str(out),
           "--workers", "1", "--quiet"]
    # run from tmp_path: `python -m` puts the working folder on sys.path, and the source
    # tree's mrharmony/ must not shadow the installed package
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=tmp_path)
    log = out / ".mrharmony" / "tasks.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done = log.read_text().count('"status": "done"') if log.exists() else 0
        if done >= 6 or proc.poll() is not None:
            break
        time.sleep(0.2)
    if proc.poll() is not None and proc.returncode != 0:
        pytest.fail(f"the study run exited with {proc.returncode}: "
                    f"{proc.stderr.read().decode()[-2000:]}")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    finished = {json.loads(line)["key"] for line in log.read_text().splitlines()
                if json.loads(line)["status"] == "done"}
    assert 0 < len(finished) < len(two.records)
    resumed = run_study(path, out, workers=1, resume=True, progress=False)
    reran = {k for k, r in resumed.records.items() if not r.get("cached")}
    assert not (reran & finished)
    assert resumed.failed == 0
    for name in ("features.csv", "report.json"):
        assert (out / DERIVATIVES / name).read_bytes() == \
            (two.out_dir / DERIVATIVES / name).read_bytes()


def test_study_folder_is_a_valid_bids_dataset(tiny_runs):
    """The official validator (bids-validator-deno) finds no error in the study folder."""
    import shutil

    exe = shutil.which("bids-validator-deno") or shutil.which(
        "bids-validator-deno", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("bids-validator-deno is not installed (pip install bids-validator-deno)")
    _, two, _ = tiny_runs
    proc = subprocess.run([exe, str(two.out_dir), "--json"], capture_output=True, text=True,
                          timeout=300)
    issues = json.loads(proc.stdout)["issues"]["issues"]
    errors = [(i["code"], i.get("location")) for i in issues if i["severity"] == "error"]
    assert errors == []


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "examples"
                                         / "studies").glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_study_passes_preflight(path):
    """Every shipped study validates and preflights (every protocol builds on every site's
    scanner, every site and phantom exists) and lays out a task graph in which every scan
    has its simulate, recon and features tasks, before anyone runs it."""
    from mrharmony.study.plan import plan_tasks, preflight

    study = load_study(path)
    plan = plan_tasks(study, preflight(study))
    kinds = {spec.stage for spec in plan.specs}
    assert {"sequence", "phantom", "simulate", "recon", "features"} <= kinds
    assert plan.scans


def test_accuracy_numbers_per_region_against_the_reference():
    from mrharmony.study.analysis import accuracy_numbers

    rows = []
    for site, field, errs in (("a", 3.0, (0.02, 0.04)), ("b", 1.5, (0.08, 0.08))):
        truth = 100.0 if field == 3.0 else 90.0  # the reference depends on the field
        for repeat, e in enumerate(errs):
            rows.append({"subject": "phantom", "site": site, "arm": "shared", "repeat": repeat,
                         "protocol": "t1", "quantity": "t1", "region": "sphere 01",
                         "feature": "mean", "value": truth * (1 + e), "truth": truth,
                         "in_range": True})
            rows.append({**rows[-1], "region": "sphere 14", "value": truth * 3,
                         "in_range": False})
    records, summary = accuracy_numbers(pd.DataFrame(rows))
    rec = {r["region"]: r for r in records}
    # site a: +3 % (mean of repeats), site b: +8 %
    assert rec["sphere 01"]["mean_error_pct"] == pytest.approx(5.5)
    assert rec["sphere 01"]["sd_error_pct"] == pytest.approx(2.5 * 2**0.5)
    assert rec["sphere 01"]["max_abs_error_pct"] == pytest.approx(8.0)
    assert rec["sphere 01"]["truth"] == pytest.approx(95.0)
    assert rec["sphere 14"]["in_range"] is False
    assert summary["shared"]["n_in_range"] == 1 and summary["shared"]["n_within"] == 0
    assert summary["shared"]["worst"]["region"] == "sphere 01"
