"""`mrharmony simulate` and `mrharmony site list`."""

from __future__ import annotations

import ismrmrd
import pytest
from test_simulation_raw import gre, make_phantom

from mrharmony.cli import main
from mrharmony.sequences import build, write_seq
from mrharmony.simulation import list_sites, load_site

PROTOCOL = """builder = "gre2d"
name = "cli-gre"
fov_mm = [256, 256]
matrix = [16, 16]
slice_thickness_mm = 5
te_ms = 5
tr_ms = 12
flip_deg = 15
"""


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    return make_phantom(32).save(tmp_path_factory.mktemp("phantom") / "asym")


def test_site_list_shows_every_preset(capsys):
    assert main(["site", "list"]) == 0
    out = capsys.readouterr().out
    for name in list_sites():
        assert name in out


def test_simulate_seq_and_protocol(tmp_path, phantom_dir, capsys):
    seq = write_seq(build(gre(matrix=[16, 16]), load_site("ge-mr750-3t").profile),
                    tmp_path / "gre.seq")
    out = tmp_path / "raw.h5"
    args = ["simulate", str(seq), str(phantom_dir), "--site", "ge-mr750-3t", "-o", str(out),
            "--seed", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed
    # the run says how far the signal is from converged in the isochromat count
    assert "isochromats: the signal of the slowest-decaying tissues changes by" in printed
    from mrharmony.simulation.raw import convergence_pct
    assert convergence_pct(out) >= 0.0
    ds = ismrmrd.Dataset(str(out), "dataset", create_if_needed=False)
    try:
        n_acq = ds.number_of_acquisitions()
        acq = ds.read_acquisition(n_acq - 1)
    finally:
        ds.close()
    assert acq.active_channels == 8 and acq.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    # never overwrite without --force (one-line error, exit status 2)
    assert main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    protocol = tmp_path / "gre.toml"
    protocol.write_text(PROTOCOL)
    native = tmp_path / "native.h5"
    assert main(["simulate", str(protocol), str(phantom_dir), "-s", "philips-ingenia-1.5t",
                 "-o", str(native), "--native"]) == 0
    assert native.exists()


def test_simulate_errors_are_one_line(tmp_path, phantom_dir, capsys):
    protocol = tmp_path / "gre.toml"
    protocol.write_text(PROTOCOL)
    out = tmp_path / "raw.h5"
    assert main(["simulate", str(protocol), str(phantom_dir), "-s", "prisma", "-o",
                 str(out)]) == 2
    assert "unknown site 'prisma'" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "missing.seq"), str(phantom_dir), "-s",
                 "siemens-prisma-3t", "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not out.exists()


def test_simulate_no_noise_writes_noiseless_data_without_noise_scans(tmp_path, phantom_dir):
    seq = write_seq(build(gre(matrix=[16, 16]), load_site("ge-mr750-3t").profile),
                    tmp_path / "gre.seq")
    paths = {}
    for flag in ("--noise", "--no-noise"):
        paths[flag] = tmp_path / f"raw{flag}.h5"
        assert main(["simulate", str(seq), str(phantom_dir), "--site", "ge-mr750-3t", "-o",
                     str(paths[flag]), "--seed", "4", flag]) == 0
    counts = {}
    for flag, path in paths.items():
        ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
        try:
            acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
        finally:
            ds.close()
        counts[flag] = sum(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in acqs)
    assert counts["--noise"] > 0 and counts["--no-noise"] == 0
