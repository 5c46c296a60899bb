"""Acceleration, calibration (ACS) lines and partial Fourier in the Cartesian builders.

For gre2d, gre3d, tse, mprage, epi and dwi_epi: the lines a built ``.seq`` acquires are
exactly those that R, the ACS block and the partial-Fourier fraction imply (the rule is
restated here, independently of the builders), every readout's ``LIN``/``PAR`` label is
its true k-space line (checked against the sequence's own k-space), the calibration lines
carry the ``REF``/``IMA`` labels that :mod:`mrharmony.formats.layout` turns into
``ACQ_IS_PARALLEL_CALIBRATION(_AND_IMAGING)``, and the ISMRMRD header states the
acceleration, the calibration mode and the FULL matrix in its encoding limits (centre
``n // 2`` also with partial Fourier). Scan time shrinks as the line count says;
impossible settings are refused naming the limit.

The round trip (simulate + ``recon --method grappa|sense``) is at the end; see its note.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from mrharmony.errors import ProtocolError
from mrharmony.formats.flags import has_flag
from mrharmony.formats.layout import layout_from_seq
from mrharmony.formats.pulseq import read_pulseq
from mrharmony.sequences import build
from mrharmony.sequences.io import write_seq
from mrharmony.sequences.protocol import (
    check_receive_channels,
    load_protocol,
    protocol_from_mapping,
)

from conftest import EXAMPLES

SCANNER = "siemens-prisma"


def example(builder: str, **changes) -> dict:
    data = tomllib.loads((EXAMPLES / f"{builder}.toml").read_text())
    data.update(changes)
    return data


# ------------------------------------------------------------------ the expected pattern


def expected_axis(n: int, r: int, acs: int, pf: float) -> tuple[set[int], set[int]]:
    """(regular-pattern lines, calibration lines) of one axis, from the stated rule."""
    keep = math.ceil(pf * n - 1e-9)
    c = n // 2
    pattern = {j for j in range(keep) if (j - c) % r == 0}
    if r == 1:
        return pattern, set(range(keep))
    start = c - acs // 2
    return pattern, {j for j in range(start, start + acs) if j < keep}


def expected_2d(n, r, acs, pf):
    pattern, block = expected_axis(n, r, acs, pf)
    return pattern | block, (block if r > 1 else set())


def expected_3d(shape, rs, acss, pfs):
    (py, by), (pz, bz) = (expected_axis(n, r, a, f)
                          for n, r, a, f in zip(shape, rs, acss, pfs, strict=True))
    on = {(y, z) for y in py for z in pz}
    block = {(y, z) for y in by for z in bz} if max(rs) > 1 else set()
    return on | block, block


# ------------------------------------------------------------------ building and reading


def built(data: dict, tmp_path: Path, name: str = "s"):
    """Build, write, read back; return (pypulseq sequence, PulseqSequence, layout)."""
    seq = build(protocol_from_mapping(data), SCANNER)
    path = write_seq(seq, tmp_path / f"{name}.seq")
    back = read_pulseq(path)
    return seq, back, layout_from_seq(back, n_coils=8)


def readouts(back, lay):
    """Per ADC: LIN, PAR, the flags, and the k-space (cycles/FOV) at its centre sample."""
    heads = lay.heads
    ns = heads["number_of_samples"].astype(int)
    k = np.asarray(back.kspace_at_adc())
    off = np.concatenate(([0], np.cumsum(ns)))
    fov = np.array(back.definitions["FOV"], dtype=float)
    centre = np.array([k[off[i] + heads["center_sample"][i]] for i in range(heads.size)])
    return (heads["idx"]["kspace_encode_step_1"].astype(int),
            heads["idx"]["kspace_encode_step_2"].astype(int), heads["flags"], centre * fov)


CASES = {
    # builder: (changes, phase-encoding shape, R, ACS, PF)
    "gre2d": ({"matrix": [64, 64], "acceleration": 2, "acs_lines": 16,
                   "partial_fourier_fraction": 0.75, "dummy_scans": 0, "n_slices": 1},
              (64,), (2,), (16,), (0.75,)),
    "tse": ({"matrix": [64, 64], "acceleration": 3, "acs_lines": 12,
                 "partial_fourier_fraction": 0.875, "n_slices": 1}, (64,), (3,), (12,), (0.875,)),
    "epi": ({"matrix": [64, 64], "acceleration": 2, "acs_lines": 16,
                 "partial_fourier_fraction": 0.75, "n_slices": 2, "dummy_scans": 0},
            (64,), (2,), (16,), (0.75,)),
    "dwi_epi": ({"matrix": [48, 48], "acceleration": 3, "acs_lines": 24, "n_slices": 1,
                     "b_values_s_per_mm2": [0, 1000], "n_directions": 3, "dummy_scans": 0},
                (48,), (3,), (24,), (1.0,)),
    "gre3d": ({"matrix": [32, 32, 16], "acceleration": 2, "acceleration_partition": 2,
                   "acs_lines": 8, "acs_lines_partition": 6,
                   "partial_fourier_fraction_partition": 0.75, "dummy_scans": 0},
              (32, 16), (2, 2), (8, 6), (1.0, 0.75)),
    "mprage": ({"matrix": [32, 32, 16], "acceleration": 2, "acceleration_partition": 2,
                    "acs_lines": 8, "acs_lines_partition": 6, "partial_fourier_fraction": 0.875,
                    "dummy_scans": 0}, (32, 16), (2, 2), (8, 6), (0.875, 1.0)),
}


@pytest.mark.parametrize("builder", list(CASES))
def test_sampled_lines_labels_flags_and_header(builder, tmp_path):
    changes, shape, rs, acss, pfs = CASES[builder]
    seq, back, lay = built(example(builder, **changes), tmp_path)
    lin, par, flags, kc = readouts(back, lay)
    nav = has_flag(flags, "IS_PHASECORR_DATA")
    cal_only = has_flag(flags, "IS_PARALLEL_CALIBRATION")
    cal_img = has_flag(flags, "IS_PARALLEL_CALIBRATION_AND_IMAGING")
    separate = builder in ("epi", "dwi_epi")
    three_d = len(shape) == 2

    # every label is the true line: ky (cycles/FOV) at the centre sample = LIN - n/2
    img = ~nav
    np.testing.assert_allclose(kc[img, 1], lin[img] - shape[0] // 2, atol=1e-3)
    if three_d:
        np.testing.assert_allclose(kc[img, 2], par[img] - shape[1] // 2, atol=1e-3)

    key = (lambda i: (int(lin[i]), int(par[i]))) if three_d else (lambda i: int(lin[i]))
    imaging = {key(i) for i in np.flatnonzero(img & ~cal_only)}
    calib = {key(i) for i in np.flatnonzero(cal_only | cal_img)}
    if three_d:
        want, want_acs = expected_3d(shape, rs, acss, pfs)
    else:
        want, want_acs = expected_2d(shape[0], rs[0], acss[0], pfs[0])
    if separate:
        # EPI: the imaging train is the regular pattern alone; the ACS block is a separate
        # reference (ACQ_IS_PARALLEL_CALIBRATION only), acquired once per slice
        pattern, block = expected_axis(shape[0], rs[0], acss[0], pfs[0])
        assert imaging == pattern
        assert calib == block
        assert not cal_img.any()
        n_slices = changes["n_slices"]
        assert cal_only.sum() == len(block) * n_slices
    else:
        assert imaging == want
        assert calib == want_acs
        assert not cal_only.any()
        # every calibration-flagged readout is inside the block, every block line flagged
        assert {key(i) for i in np.flatnonzero(img & ~cal_img)}.isdisjoint(want_acs)

    enc = lay.header.encoding[0]
    pi = enc.parallelImaging
    assert pi.accelerationFactor.kspace_encoding_step_1 == rs[0]
    assert pi.accelerationFactor.kspace_encoding_step_2 == (rs[1] if three_d else 1)
    assert pi.calibrationMode.value == ("separate" if separate else "embedded")
    # the limits describe the full matrix and its centre, whatever was left out
    lim = enc.encodingLimits
    assert (lim.kspace_encoding_step_1.minimum, lim.kspace_encoding_step_1.maximum,
            lim.kspace_encoding_step_1.center) == (0, shape[0] - 1, shape[0] // 2)
    if three_d:
        assert (lim.kspace_encoding_step_2.minimum, lim.kspace_encoding_step_2.maximum,
                lim.kspace_encoding_step_2.center) == (0, shape[1] - 1, shape[1] // 2)
    assert enc.encodedSpace.matrixSize.y == shape[0]

    defs = back.definitions
    assert [int(v) for v in np.atleast_1d(defs["Acceleration"])] == list(rs)
    np.testing.assert_allclose(np.atleast_1d(defs["PartialFourier"]), pfs)
    assert int(np.atleast_1d(defs["kSpaceCenterLine"])[0]) == shape[0] // 2
    assert str(defs["CalibrationMode"]) == ("separate" if separate else "embedded")

    # the same protocol unaccelerated: same TE (the centre line keeps its echo time) and
    # no parallel-imaging labels or header entries
    full = {k: v for k, v in changes.items() if not k.startswith(("acc", "acs", "partial"))}
    seq1, back1, lay1 = built(example(builder, **full), tmp_path, "full")
    te, te1 = (float(np.atleast_1d(s.definitions["TE"])[0]) for s in (seq, seq1))
    assert te == pytest.approx(te1, abs=1e-6)
    assert lay1.header.encoding[0].parallelImaging is None
    assert not {"REF", "IMA"} & set(back1.used_labels)
    assert "Acceleration" not in back1.definitions


def test_scan_time_shrinks_with_the_line_count(tmp_path):
    # gre2d: one TR per sampled line, so the duration scales exactly with the line count
    base = {"matrix": [64, 64], "n_slices": 1, "dummy_scans": 0}
    d_full = build(protocol_from_mapping(example("gre2d", **base)), SCANNER).duration()[0]
    acc = {"acceleration": 2, "acs_lines": 16, "partial_fourier_fraction": 0.75}
    d_acc = build(protocol_from_mapping(example("gre2d", **base, **acc)), SCANNER).duration()[0]
    lines, _ = expected_2d(64, 2, 16, 0.75)
    assert d_acc == pytest.approx(d_full * len(lines) / 64, rel=1e-9)

    # tse: one TR per shot; shots = ceil(lines / turbo_factor)
    base = {"matrix": [64, 64], "n_slices": 1, "dummy_scans": 0}
    tse = example("tse", **base)
    d_full = build(protocol_from_mapping(tse), SCANNER).duration()[0]
    d_acc = build(protocol_from_mapping({**tse, "acceleration": 2, "acs_lines": 16}),
                  SCANNER).duration()[0]
    etl = tse["turbo_factor"]
    lines, _ = expected_2d(64, 2, 16, 1.0)
    assert d_acc / d_full == pytest.approx(math.ceil(len(lines) / etl) / math.ceil(64 / etl))

    # epi: the echo train shrinks to the pattern's lines (shorter readout, same TE); the
    # separate reference adds R volumes of one TR each
    epi = example("epi", matrix=[64, 64], n_slices=1, dummy_scans=0)
    s_full = build(protocol_from_mapping(epi), SCANNER)
    s_acc = build(protocol_from_mapping({**epi, "acceleration": 2, "acs_lines": 16}), SCANNER)
    assert int(s_acc.definitions["EchoTrainLength"]) == 32
    assert int(s_full.definitions["EchoTrainLength"]) == 64
    assert s_acc.duration()[0] == pytest.approx(3 * s_full.duration()[0], rel=1e-6)

    # mprage: one inversion per sampled partition
    mp = example("mprage", matrix=[32, 32, 16], dummy_scans=0)
    d_full = build(protocol_from_mapping(mp), SCANNER).duration()[0]
    d_acc = build(protocol_from_mapping({**mp, "acceleration_partition": 2,
                                         "acs_lines_partition": 4}), SCANNER).duration()[0]
    pz, bz = expected_axis(16, 2, 4, 1.0)
    assert d_acc == pytest.approx(d_full * len(pz | bz) / 16, rel=1e-9)


def test_mprage_keeps_ti_and_tr_with_trains_of_different_lengths(tmp_path):
    from seqtools import measure_timing

    data = example("mprage", matrix=[32, 32, 8], acceleration=2, acs_lines=8,
                   acceleration_partition=2, acs_lines_partition=4, dummy_scans=0)
    protocol = protocol_from_mapping(data)
    seq = build(protocol, SCANNER)
    timing = measure_timing(seq)
    assert timing.tr_s * 1e3 == pytest.approx(protocol.tr_ms, rel=0.01)
    assert timing.te_s * 1e3 == pytest.approx(protocol.te_ms, rel=0.01)
    # every inversion period is TR long
    t_rf, _, uses = read_pulseq(write_seq(seq, tmp_path / "m.seq")).rf_times()
    t_inv = np.asarray(t_rf)[np.array([u == "inversion" for u in uses])]
    np.testing.assert_allclose(np.diff(t_inv), protocol.tr_ms * 1e-3, atol=1e-6)


@pytest.mark.parametrize(("builder", "changes", "words"), [
    ("gre2d", {"matrix": [64, 16], "acceleration": 9}, "above the maximum 8 for the 16 phase"),
    ("gre2d", {"matrix": [64, 20], "acceleration": 11}, "above the maximum 10 for the 20 phase"),
    ("gre2d", {"matrix": [64, 32], "acceleration": 2, "acs_lines": 40}, "above the 32 phase lines"),
    ("gre2d", {"acs_lines": 8}, "need acceleration > 1"),
    ("gre2d", {"partial_fourier_fraction": 0.7}, "not an offered partial-Fourier fraction"),
    ("tse", {"matrix": [64, 64], "acceleration": 2, "acs_lines": 30,
                 "partial_fourier_fraction": 0.625}, "maximum 16 calibration lines"),
    ("epi", {"matrix": [64, 16], "acceleration": 9}, "above the maximum 8 for the 16 phase"),
    ("gre3d", {"matrix": [64, 64, 8], "acceleration_partition": 5}, "maximum 4 for the 8 "
                                                                   "partition lines"),
    ("gre3d", {"matrix": [64, 64, 8], "acceleration_partition": 2, "acs_lines_partition": 9},
     "above the 8 partition lines"),
    ("mprage", {"acs_lines_partition": 4}, "need acceleration_partition > 1"),
])
def test_impossible_settings_are_refused_naming_the_limit(builder, changes, words, tmp_path):
    data = example(builder, **changes)
    with pytest.raises(ProtocolError) as err:
        build(protocol_from_mapping(data), SCANNER)
    assert words in str(err.value)
    key = next(k for k in ("acs_lines_partition", "acceleration_partition", "acs_lines",
                           "acceleration", "partial_fourier_fraction") if k in changes)
    assert str(err.value).startswith(f"protocol: {key}:")
    # from a file too: still a ProtocolError, with the file name in front
    path = tmp_path / "p.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in data.items()))
    with pytest.raises(ProtocolError, match=str(path)):
        load_protocol(path)


def test_range_errors_and_builders_without_acceleration():
    from mrharmony.errors import ConfigError

    with pytest.raises(ConfigError, match="acceleration: 0 is below the minimum 1"):
        protocol_from_mapping(example("gre2d", acceleration=0))
    with pytest.raises(ConfigError, match="acceleration: unknown key"):
        protocol_from_mapping(example("mese", acceleration=2))


def test_acceleration_above_the_coil_count_is_a_site_level_refusal():
    p = protocol_from_mapping(example("gre3d", acceleration=2, acceleration_partition=2))
    check_receive_channels(p, 4)
    with pytest.raises(ProtocolError, match="total acceleration 4 is above the 2 receive"):
        check_receive_channels(p, 2)
    check_receive_channels(protocol_from_mapping(example("gre2d")), 1)


def test_default_acs_is_24_lines_or_half_the_matrix():
    p = protocol_from_mapping(example("gre2d", acceleration=2))
    assert p.calibration_lines == (24,)
    p = protocol_from_mapping(example("gre2d", matrix=[32, 32], acceleration=2))
    assert p.calibration_lines == (16,)
    p = protocol_from_mapping(example("gre3d", acceleration=2))
    assert p.calibration_lines == (24, 0)  # partitions fully sampled: the block spans them


# ------------------------------------------------------------------ round trip
#
# The R = 2 protocol (12 ACS lines) against the fully sampled one, simulated on the same
# Shepp-Logan plane at isocentre (ge-mr750-3t: 8 channels, --no-noise). TR 2000 ms and 32
# isochromats per voxel make the spoiled steady state consistent from line to line
# (tests/test_simulation_consistency.py), so both acquisitions see the same k-space.
# Measured: grappa 0.014 against the full FFT recon, sense 0.036 against the full SENSE.
ROUNDTRIP_BASE = {"builder": "gre2d", "name": "rt", "fov_mm": [220, 220], "matrix": [32, 32],
                  "slice_thickness_mm": 5, "n_slices": 1, "te_ms": 5, "tr_ms": 2000,
                  "flip_deg": 30, "dummy_scans": 2}
ROUNDTRIP_SITE = ("ge-discovery-mr750", "ge-mr750-3t")  # 8 receive channels


@pytest.fixture(scope="module")
def roundtrip_files(tmp_path_factory):
    from mrharmony.cli import main
    from mrharmony.phantoms import make_shepp_logan

    out = tmp_path_factory.mktemp("accel-rt")
    from mrharmony.study.tasks import at_isocentre

    # the excited slice is at isocentre: the phantom's plane must be there too
    ph_dir = at_isocentre(make_shepp_logan(3.0, matrix=64, fov_mm=176.0)).save(out / "ph")
    files = {}
    for name, extra in (("full", {}), ("r2", {"acceleration": 2, "acs_lines": 12}),
                        ("pf", {"partial_fourier_fraction": 0.75})):
        toml = out / f"{name}.toml"
        toml.write_text("".join(f"{k} = {json.dumps(v)}\n"
                                for k, v in {**ROUNDTRIP_BASE, **extra}.items()))
        assert main(["seq", "build", str(toml), "--scanner", ROUNDTRIP_SITE[0], "-o",
                     str(out / f"{name}.seq")]) == 0
        assert main(["simulate", str(out / f"{name}.seq"), str(ph_dir), "--site",
                     ROUNDTRIP_SITE[1], "-o", str(out / f"{name}.h5"), "--seed", "3",
                     "--isochromats", "32", "--no-noise"]) == 0
        files[name] = out / f"{name}.h5"
    return out, files


def _recon(raw: Path, method: str) -> np.ndarray:
    import nibabel as nib

    from mrharmony.cli import main

    out = raw.with_name(f"{raw.stem}-{method}.nii.gz")
    assert main(["recon", str(raw), "-o", str(out), "--method", method, "--force"]) == 0
    return np.abs(np.asarray(nib.load(out).dataobj, dtype=np.float64))


def _nrmse(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("method", ["grappa", "sense"])
def test_round_trip_r2_matches_the_fully_sampled_protocol(roundtrip_files, method):
    _, files = roundtrip_files
    ref = _recon(files["full"], "fft" if method == "grappa" else method)
    img = _recon(files["r2"], method)
    assert img.shape == ref.shape
    assert _nrmse(img, ref) < 0.05


@pytest.mark.parametrize("method", ["grappa", "sense"])
def test_recon_of_the_r2_layout_with_consistent_samples(roundtrip_files, method, tmp_path):
    """The R = 2 file (its header, labels and flags as the builder and formats.layout
    made them) with every sample replaced by the same line of the fully sampled
    simulation: any difference from the full recon is the reconstruction's."""
    import shutil

    import h5py

    _, files = roundtrip_files
    retro = tmp_path / "r2-consistent.h5"
    shutil.copy(files["r2"], retro)
    with h5py.File(files["full"], "r") as f:
        full = {int(r["head"]["idx"]["kspace_encode_step_1"]): r["data"]
                for r in f["dataset/data"][:]}
    with h5py.File(retro, "r+") as f:
        rows = f["dataset/data"][:]
        for r in rows:
            r["data"] = full[int(r["head"]["idx"]["kspace_encode_step_1"])]
        f["dataset/data"][...] = rows
    ref = _recon(files["full"], "fft" if method == "grappa" else method)
    assert _nrmse(_recon(retro, method), ref) < 0.05


def test_partial_fourier_6_8_round_trip_with_pocs(roundtrip_files):
    """Partial Fourier 6/8 (phase): POCS from the header alone, within 0.05 of the fully
    sampled recon (measured 0.037)."""
    import json

    _, files = roundtrip_files
    ref = _recon(files["full"], "fft")
    img = _recon(files["pf"], "auto")
    sidecar = json.loads(files["pf"].with_name("pf-auto.json").read_text())
    assert sidecar["ReconstructionSettings"]["partial_fourier"].startswith("pocs")
    assert _nrmse(img, ref) < 0.05


def test_grappa_edge_option_through_the_cli_and_the_sidecar(roundtrip_files):
    """``--grappa-edge zero`` reaches grappa() and the sidecar (default "fit" recorded
    too); the R = 2 round trip stays within 0.05 (measured 0.014 fit, 0.020 zero)."""
    import nibabel as nib

    from mrharmony.cli import main

    out, files = roundtrip_files
    ref = _recon(files["full"], "fft")
    for edge in ("fit", "zero"):
        nii = out / f"r2-edge-{edge}.nii.gz"
        args = ["recon", str(files["r2"]), "-o", str(nii), "--method", "grappa", "--force"]
        assert main(args + (["--grappa-edge", "zero"] if edge == "zero" else [])) == 0
        side = json.loads(nii.with_name(f"r2-edge-{edge}.json").read_text())
        assert side["ReconstructionSettings"]["grappa"]["edge"] == edge
        img = np.abs(np.asarray(nib.load(nii).dataobj, dtype=np.float64))
        assert _nrmse(img, ref) < 0.05


def test_grappa_edge_option_is_checked(roundtrip_files):
    from mrharmony.errors import ReconError
    from mrharmony.formats.raw import load_raw
    from mrharmony.recon.pipeline import reconstruct

    _, files = roundtrip_files
    raw = load_raw(files["r2"])
    with pytest.raises(ReconError, match="grappa_edge = 'wrap': expected one of fit, zero"):
        reconstruct(raw, method="grappa", backend="numpy", grappa_edge="wrap")
    with pytest.raises(ReconError, match=r"method 'sense' does not take option.*grappa_edge"):
        reconstruct(raw, method="sense", backend="numpy", grappa_edge="zero")
