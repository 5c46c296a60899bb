"""`seq check` on any Pulseq file: ours, pypulseq's examples, and other writers'."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pypulseq as pp
import pytest

from mrharmony.errors import SequenceFileError
from mrharmony.sequences import build, load_scanner, write_seq
from mrharmony.sequences.check import check_file, check_sequence, gradient_usage

from conftest import CORPUS
from seqtools import pypulseq_examples_dir, run_pypulseq_example

EXAMPLE_SCRIPTS = [
    "write_gre", "write_epi", "write_tse", "write_radial_gre", "write_haste", "write_epi_se",
    "write_gre_label", "write_epi_label", "write_ute",
]


def test_gradient_usage_of_a_known_trapezoid():
    system = load_scanner("siemens-prisma").to_opts()
    seq = pp.Sequence(system=system)
    amp = 20e-3 * 42.576e6  # 20 mT/m in Hz/m
    g = pp.make_trapezoid("y", amplitude=amp, rise_time=200e-6, flat_time=1e-3, system=system)
    seq.add_block(g)
    usage = gradient_usage(seq)
    assert usage.max_grad_mt_per_m[1] == pytest.approx(20.0, rel=1e-9)
    assert usage.max_slew_t_per_m_per_s[1] == pytest.approx(100.0, rel=1e-9)  # 20 mT/m / 200 us
    assert usage.max_grad_mt_per_m[0] == 0 and usage.max_grad_mt_per_m[2] == 0


def test_siemens_raster_file_fails_on_ge_rasters(tmp_path):
    seq = build(Path(__file__).parents[1] / "examples/protocols/gre2d.toml", "siemens-prisma")
    path = write_seq(seq, tmp_path / "gre.seq")
    assert check_file(path, "siemens-prisma").ok
    on_ge = check_file(path, "ge-signa-premier")
    assert not on_ge.timing_ok
    assert any("RASTER" in e for e in on_ge.timing_errors)
    # Free.Max has 26 mT/m; this file uses more, which the check reports.
    on_freemax = check_file(path, "siemens-freemax")
    assert on_freemax.timing_ok and not on_freemax.gradients_ok


def test_definitions_are_reported(tmp_path):
    seq = build(Path(__file__).parents[1] / "examples/protocols/gre3d.toml", "uih-umr790")
    report = check_sequence(seq, "uih-umr790")
    assert report.te_s == pytest.approx((float(np.atleast_1d(seq.definitions["TE"])[0]),))
    assert report.tr_s == pytest.approx(10e-3, rel=0.01)
    assert report.duration_s == pytest.approx(seq.duration()[0])


def _corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.seq")) if CORPUS.is_dir() else []


@pytest.mark.parametrize("path", _corpus_files(), ids=lambda p: p.stem)
def test_corpus_files_from_other_writers(path: Path):
    if path.name.startswith("08_"):
        # pypulseq 1.5.0.post1 cannot parse the ROTATIONS extension: a named error, not a crash.
        with pytest.raises(SequenceFileError, match="ROTATIONS"):
            check_file(path)
        return
    report = check_file(path)
    assert report.n_blocks > 0 and report.duration_s > 0
    assert report.timing_ok, report.timing_errors[:3]


def test_missing_file_is_a_named_error(tmp_path):
    with pytest.raises(SequenceFileError, match="no such file"):
        check_file(tmp_path / "nope.seq")
    bad = tmp_path / "bad.seq"
    bad.write_text("[VERSION]\nmajor 1\nminor 4\nrevision 1\n[BLOCKS]\n1 1 1 1 1 1 1 1\n")
    with pytest.raises(SequenceFileError, match="pypulseq cannot read"):
        check_file(bad)


def _examples() -> Path | None:
    found = pypulseq_examples_dir()
    if found is None and os.environ.get("CI"):
        pytest.fail("pypulseq example scripts missing: .ci/run must run "
                    "benchmarks/fetch_pypulseq_examples.py")
    return found


@pytest.mark.parametrize("script", EXAMPLE_SCRIPTS)
def test_check_runs_on_pypulseq_example_output(script: str, tmp_path: Path):
    folder = _examples()
    if folder is None:
        pytest.skip("run benchmarks/fetch_pypulseq_examples.py to test against pypulseq examples")
    out = run_pypulseq_example(folder / f"{script}.py", tmp_path / f"{script}.seq")
    report = check_file(out)
    assert report.timing_ok, report.timing_errors[:3]
    assert report.n_blocks > 0
    # The Siemens-style examples (max 28-32 mT/m) fit a Prisma but not the 4 us GE raster.
    assert check_file(out, "siemens-prisma").ok


def test_unreadable_file_leaves_no_open_handle(tmp_path):
    """pypulseq leaves its file open when parsing fails; read_seq must not let that
    handle outlive the call (its ResourceWarning used to surface in a later test)."""
    import gc
    import warnings

    from mrharmony.sequences.io import read_seq

    bad = tmp_path / "bad.seq"
    bad.write_text("[VERSION]\nmajor 1\nminor 4\nrevision 1\n[BLOCKS]\n1 1 1 1 1 1 1 1\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SequenceFileError):
            read_seq(bad)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
