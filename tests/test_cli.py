"""The CLI: one-line user errors with exit 2, --verbose tracebacks, never overwriting."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mrharmony import __version__
from mrharmony.cli import main

from conftest import EXAMPLES


def run(capsys, *args):
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version_and_help(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and __version__ in out
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "seq" in out
    code, out, _ = run(capsys, "seq", "--help")
    assert code == 0 and "build-all" in out


def test_seq_list(capsys):
    code, out, _ = run(capsys, "seq", "list")
    assert code == 0
    for name in ("gre2d", "dwi_epi", "siemens-prisma", "ge-signa-premier", "uih-umr790"):
        assert name in out
    code, out, _ = run(capsys, "seq", "list", "--builder", "gre2d")
    assert code == 0 and "te_ms" in out and "flip_deg" in out


def test_build_writes_and_reports(capsys, tmp_path):
    target = tmp_path / "gre.seq"
    code, out, _ = run(capsys, "seq", "build", str(EXAMPLES / "gre2d.toml"), "-s",
                       "siemens-skyra", "-o", str(target))
    assert code == 0 and target.is_file()
    assert "TE 5" in out and "TR 12 ms" in out
    # Never overwrite without --force.
    before = target.read_bytes()
    code, _, err = run(capsys, "seq", "build", str(EXAMPLES / "gre2d.toml"), "-s",
                       "siemens-skyra", "-o", str(target))
    assert code == 2 and "exists" in err and target.read_bytes() == before
    code, _, _ = run(capsys, "seq", "build", str(EXAMPLES / "gre2d.toml"), "-s",
                     "siemens-skyra", "-o", str(target), "--force")
    assert code == 0


def test_impossible_protocol_is_one_line_exit_2_and_no_file(capsys, tmp_path):
    proto = tmp_path / "bad.toml"
    proto.write_text((EXAMPLES / "gre2d.toml").read_text().replace("te_ms = 5", "te_ms = 1.2"))
    target = tmp_path / "bad.seq"
    code, _, err = run(capsys, "seq", "build", str(proto), "-s", "siemens-prisma", "-o",
                       str(target))
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "te_ms: TE 1.2 ms is below the minimum" in err and "siemens-prisma" in err
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]
    code, _, err = run(capsys, "--verbose", "seq", "build", str(proto), "-s", "siemens-prisma",
                       "-o", str(target))
    assert code == 2 and "Traceback" in err and "ProtocolError" in err


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda t: t.replace("tr_ms = 12\n", ""), "tr_ms: missing required key"),
        (lambda t: t.replace("tr_ms = 12", "tr_ms = -12"), "tr_ms: -12.0 ms must be greater"),
        (lambda t: t.replace("te_ms = 5", "te_s = 0.005"), "te_s: unknown key; wrong unit"),
        (lambda t: t.replace('"gre2d"', '"gre2"'), "did you mean 'gre2d'"),
    ],
)
def test_bad_protocol_files(capsys, tmp_path, edit, pattern):
    proto = tmp_path / "p.toml"
    proto.write_text(edit((EXAMPLES / "gre2d.toml").read_text()))
    code, _, err = run(capsys, "seq", "build", str(proto), "-s", "siemens-prisma", "-o",
                       str(tmp_path / "p.seq"))
    assert code == 2 and pattern in err
    assert not (tmp_path / "p.seq").exists()


def test_check_and_plot(capsys, tmp_path):
    target = tmp_path / "gre.seq"
    assert main(["seq", "build", str(EXAMPLES / "gre3d.toml"), "-s", "siemens-prisma", "-o",
                 str(target)]) == 0
    code, out, _ = run(capsys, "seq", "check", str(target), "--scanner", "siemens-prisma")
    assert code == 0 and "timing      ok" in out and "TE" in out
    code, out, _ = run(capsys, "seq", "check", str(target), "--scanner", "ge-discovery-mr750")
    assert code == 1 and "FAILED" in out
    png = tmp_path / "gre.png"
    code, _, _ = run(capsys, "seq", "plot", str(target), "-o", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, _, err = run(capsys, "seq", "plot", str(target), "-o", str(png))
    assert code == 2 and "exists" in err
    code, _, err = run(capsys, "seq", "check", str(tmp_path / "missing.seq"))
    assert code == 2 and "no such file" in err


def test_header_command(capsys, tmp_path):
    code, out, _ = run(capsys, "seq", "header", str(EXAMPLES / "gre2d.toml"), "-s",
                       "siemens-prisma", "--coils", "8")
    assert code == 0 and "<receiverChannels>8</receiverChannels>" in out


def test_build_all_summary(capsys, tmp_path):
    protos = tmp_path / "protocols"
    protos.mkdir()
    shutil.copy(EXAMPLES / "gre2d.toml", protos)
    bad = (EXAMPLES / "gre2d.toml").read_text().replace("te_ms = 5", "te_ms = 4.2").replace(
        'name = "t1w-gre2d"', 'name = "short-te"'
    )
    (protos / "short.toml").write_text(bad)
    out_dir = tmp_path / "out"
    code, out, _ = run(capsys, "seq", "build-all", str(protos), "-o", str(out_dir), "-s",
                       "siemens-prisma", "-s", "siemens-freemax", "-j", "1")
    assert code == 0
    rows = list(csv.DictReader((out_dir / "summary.csv").read_text().splitlines()))
    status = {(r["protocol"], r["scanner"]): r["status"] for r in rows}
    assert status[("t1w-gre2d", "siemens-prisma")] == "ok"
    # TE 4.2 ms is possible with 80 mT/m but not with Free.Max's 26 mT/m.
    assert status[("short-te", "siemens-prisma")] == "ok"
    assert status[("short-te", "siemens-freemax")] == "refused"
    assert (out_dir / "siemens-prisma" / "t1w-gre2d.seq").is_file()
    assert not (out_dir / "siemens-freemax" / "short-te.seq").exists()
    assert "refused" in out


def test_console_script_entry_point():
    exe = Path(sys.executable).with_name("mrharmony")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "mrharmony"]
    out = subprocess.run([*cmd, "seq", "build", "nope.toml", "-s", "siemens-prisma", "-o",
                          "x.seq"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "mrharmony: error: nope.toml: no such file"
