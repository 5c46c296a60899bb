"""Spoiled GRE builders: physics of the events, and refusals that name the limit."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mrharmony.errors import ProtocolError
from mrharmony.sequences import build, build_file, load_scanner
from mrharmony.sequences.protocol import load_protocol, protocol_from_mapping

from conftest import EXAMPLES

BASE = {
    "builder": "gre2d", "name": "t", "fov_mm": [200, 200], "matrix": [64, 64],
    "slice_thickness_mm": 5, "te_ms": 5, "tr_ms": 12, "flip_deg": 20,
}


def _proto(**changes):
    return protocol_from_mapping({**BASE, **changes})


def _excitations(seq):
    out = []
    for bid in seq.block_events:
        b = seq.get_block(bid)
        if b.rf is not None:
            out.append(b.rf)
    return out


def test_flip_angle_from_rf_integral():
    seq = build(_proto(flip_deg=20, n_slices=1), "siemens-prisma")
    rf = _excitations(seq)[0]
    dt = np.diff(rf.t, prepend=0)
    # Flip angle = 2 pi * integral of B1 (Hz) dt for an on-resonance pulse.
    assert math.degrees(2 * math.pi * abs(np.sum(rf.signal * dt))) == pytest.approx(20, rel=1e-3)


def test_quadratic_rf_spoiling_phase():
    seq = build(_proto(n_slices=1, rf_spoiling_inc_deg=117), "siemens-prisma")
    phases = np.unwrap([rf.phase_offset for rf in _excitations(seq)])
    # phi_n = inc * n (n + 1) / 2: second difference is the increment (mod 2 pi).
    second = np.diff(phases, 2)
    wrapped = np.angle(np.exp(1j * (second - math.radians(117))))
    np.testing.assert_allclose(wrapped, 0, atol=1e-9)


def test_slice_offsets_match_positions():
    p = _proto(n_slices=3, slice_gap_mm=2, matrix=[32, 32])
    seq = build(p, "siemens-skyra")
    offsets = sorted({round(rf.freq_offset, 3) for rf in _excitations(seq)})
    from mrharmony.sequences.builders._common import excitation_pulse

    scanner = load_scanner("siemens-skyra")
    _, gz, _ = excitation_pulse(
        scanner.to_opts(), scanner, flip_deg=20, duration_s=2e-3, time_bw_product=4,
        thickness_m=5e-3,
    )
    expected = gz.amplitude * np.array([-7e-3, 0, 7e-3])
    np.testing.assert_allclose(offsets, expected, atol=1e-3)


def test_3d_partitions_and_dummy_scans():
    p = load_protocol(EXAMPLES / "gre3d.toml")
    seq = build(p, "siemens-prisma")
    n_rf = len(_excitations(seq))
    assert n_rf == p.matrix[1] * p.matrix[2] + p.dummy_scans
    _, _, _, _, t_adc = seq.calculate_kspace()
    assert t_adc.size == p.matrix[0] * p.matrix[1] * p.matrix[2]


@pytest.mark.parametrize(
    ("changes", "scanner", "pattern"),
    [
        ({"te_ms": 1.0}, "siemens-prisma",
         r"te_ms: TE 1 ms is below the minimum [\d.]+ ms this protocol allows on siemens-prisma"),
        ({"tr_ms": 4.0}, "ge-discovery-mr750",
         r"tr_ms: TR 4 ms is below the minimum [\d.]+ ms this protocol allows on ge-discovery"),
        ({"slice_thickness_mm": 0.3}, "siemens-freemax",
         r"slice_thickness_mm: 0.3 mm is below the minimum [\d.]+ mm"),
        ({"readout_bandwidth_hz_per_px": 15000, "matrix": [256, 64], "fov_mm": [100, 100]},
         "siemens-freemax", r"readout_bandwidth_hz_per_px: 15000 Hz/px needs a readout gradient"),
    ],
)
def test_impossible_protocols_are_refused(changes, scanner, pattern):
    with pytest.raises(ProtocolError, match=pattern):
        build(_proto(**changes), scanner)


def test_minimum_te_is_buildable():
    with pytest.raises(ProtocolError) as info:
        build(_proto(te_ms=0.5), "siemens-prisma")
    minimum = float(str(info.value).split("minimum ")[1].split(" ms")[0])
    seq = build(_proto(te_ms=minimum * 1.005), "siemens-prisma")
    assert float(seq.definitions["TE"][0]) * 1e3 == pytest.approx(minimum * 1.005, rel=0.01)


def test_refused_build_leaves_no_file(tmp_path):
    target = tmp_path / "out.seq"
    with pytest.raises(ProtocolError):
        build_file(_proto(te_ms=0.5), "siemens-prisma", target)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import pypulseq as pp

    def broken_write(self, name, **kwargs):
        with open(name, "w") as fh:
            fh.write("[VERSION]\n")  # half a file ...
        raise OSError("disk full")  # ... then the disk fills up

    monkeypatch.setattr(pp.Sequence, "write", broken_write)
    with pytest.raises(OSError, match="disk full"):
        build_file(_proto(), "siemens-prisma", tmp_path / "out.seq")
    assert list(tmp_path.iterdir()) == []


def test_existing_file_is_not_overwritten(tmp_path):
    target = tmp_path / "out.seq"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="exists"):
        build_file(_proto(), "siemens-prisma", target)
    assert target.read_text() == "keep me"
    build_file(_proto(), "siemens-prisma", target, force=True)
    assert target.read_text().startswith("# Pulseq")
