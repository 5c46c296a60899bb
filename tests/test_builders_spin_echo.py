"""Spin-echo builders (MESE, IR-SE, TSE) checked against physics on the built sequence.

Everything is measured from the RF events, the gradient waveforms and the k-space
trajectory pypulseq computes; the definitions the builders write are only compared
with those measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pypulseq as pp
import pytest

from mrharmony.errors import ProtocolError
from mrharmony.sequences import load_scanner
from mrharmony.sequences.builders.spin_echo import (
    build_irse,
    build_mese,
    build_tse,
    interleaved_slice_order,
    tse_ordering,
)
from mrharmony.sequences.check import gradient_usage
from mrharmony.sequences.protocol import protocol_from_mapping

from seqtools import measure_timing

PRISMA = load_scanner("siemens-prisma")
GE = load_scanner("ge-discovery-mr750")
FREEMAX = load_scanner("siemens-freemax")


@dataclass(frozen=True)
class RF:
    t: float
    use: str
    freq: float
    phase: float
    position: float  # slice position from freq / select-gradient amplitude (m), nan if none


def _rfs(seq: pp.Sequence) -> list[RF]:
    out = []
    t0 = 0.0
    for bid in seq.block_events:
        b = seq.get_block(bid)
        if b.rf is not None:
            g = b.gz
            pos = b.rf.freq_offset / g.amplitude if g is not None else math.nan
            out.append(
                RF(
                    t=t0 + b.rf.delay + pp.calc_rf_center(b.rf)[0],
                    use=b.rf.use,
                    freq=b.rf.freq_offset,
                    phase=b.rf.phase_offset,
                    position=pos,
                )
            )
        t0 += seq.block_durations[bid]
    return out


def _adcs(seq: pp.Sequence) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """k (n_adc, n_samples, 3), t (n_adc, n_samples) and per-ADC labels."""
    k, _, _, _, t = seq.calculate_kspace()
    labels = seq.evaluate_labels(evolution="adc")
    n_adc = len(next(iter(labels.values())))
    ns = t.size // n_adc
    return k.T.reshape(n_adc, ns, 3), t.reshape(n_adc, ns), labels


def _proto(**kw):
    return protocol_from_mapping(kw)


def _mese(**kw):
    base = {
        "builder": "mese",
        "name": "t",
        "fov_mm": [200, 200],
        "matrix": [32, 16],
        "slice_thickness_mm": 5,
        "n_slices": 3,
        "slice_gap_mm": 1,
        "te_ms": 15,
        "tr_ms": 400,
        "n_echoes": 4,
    }
    return _proto(**{**base, **kw})


def _irse(**kw):
    base = {
        "builder": "irse",
        "name": "t",
        "fov_mm": [200, 200],
        "matrix": [16, 8],
        "slice_thickness_mm": 5,
        "n_slices": 2,
        "slice_gap_mm": 5,
        "te_ms": 14,
        "tr_ms": 500,
        "ti_ms": [30, 120, 300],
    }
    return _proto(**{**base, **kw})


def _tse(**kw):
    base = {
        "builder": "tse",
        "name": "t",
        "fov_mm": [200, 200],
        "matrix": [32, 32],
        "slice_thickness_mm": 5,
        "n_slices": 2,
        "te_ms": 40,
        "tr_ms": 1000,
        "turbo_factor": 8,
    }
    return _proto(**{**base, **kw})


# --------------------------------------------------------------------------- MESE


@pytest.mark.parametrize("scanner", [PRISMA, GE, FREEMAX], ids=lambda s: s.name)
def test_mese_echo_times_kspace_and_cpmg(scanner):
    p = _mese()
    seq = build_mese(p, scanner)
    nx, ny = p.matrix
    te = p.te_ms * 1e-3
    rfs = _rfs(seq)
    exc = [r for r in rfs if r.use == "excitation"]
    ref = [r for r in rfs if r.use == "refocusing"]
    assert len(exc) == p.n_slices * ny
    assert len(ref) == p.n_slices * ny * p.n_echoes
    assert not [r for r in rfs if r.use not in ("excitation", "refocusing")]

    # CPMG: refocusing centres at te/2 + j*te after their excitation, phase +90 deg.
    t_exc = np.array([r.t for r in exc])
    for i, r in enumerate(ref):
        e = exc[i // p.n_echoes]
        j = i % p.n_echoes
        assert r.t - e.t == pytest.approx(te / 2 + j * te, abs=10e-6)
        assert r.position == pytest.approx(e.position, abs=1e-6)
    centre = [(e, r) for e, r in zip(exc, ref[:: p.n_echoes], strict=True)
              if abs(e.position) < 1e-9]
    assert centre
    for e, r in centre:
        assert (r.phase - e.phase) % (2 * math.pi) == pytest.approx(math.pi / 2)

    k, t, labels = _adcs(seq)
    dk = 1 / (p.fov_mm[0] * 1e-3)
    dky = 1 / (p.fov_mm[1] * 1e-3)
    # Each echo: kx on the FFT grid (centre at sample N//2), ky of its LIN label, kz = 0.
    np.testing.assert_allclose(k[:, :, 0], np.broadcast_to((np.arange(nx) - nx // 2) * dk,
                                                           k[:, :, 0].shape), atol=1e-3 * dk)
    np.testing.assert_allclose(k[:, 0, 1], (labels["LIN"] - ny // 2) * dky, atol=1e-3 * dky)
    assert np.max(np.abs(k[:, :, 2])) < 1e-3 * dk
    # Echo times: centre sample minus the preceding excitation = te * (ECO + 1).
    idx = np.searchsorted(t_exc, t[:, nx // 2]) - 1
    echo_t = t[:, nx // 2] - t_exc[idx]
    np.testing.assert_allclose(echo_t, te * (labels["ECO"] + 1), rtol=0.01)
    # ...and each gradient echo sits midway between its refocusing pulses (spin echo),
    # to the block raster.
    t_ref = np.array([r.t for r in ref]).reshape(-1, p.n_echoes)
    t_ref_of_echo = t_ref[idx, labels["ECO"]]
    np.testing.assert_allclose(t[:, nx // 2] - t_ref_of_echo, te / 2, atol=10e-6)
    np.testing.assert_allclose(seq.definitions["TE"], te * np.arange(1, p.n_echoes + 1),
                               rtol=0.01)
    # All echoes of a train share one line.
    lin = labels["LIN"].reshape(-1, p.n_echoes)
    assert np.all(lin == lin[:, :1])

    m = measure_timing(seq)
    assert m.te_s == pytest.approx(te, rel=0.01)
    assert m.tr_s == pytest.approx(p.tr_ms * 1e-3, rel=0.01)
    assert float(np.atleast_1d(seq.definitions["TR"])[0]) == pytest.approx(m.tr_s, rel=1e-6)
    usage = gradient_usage(seq)
    assert max(usage.max_grad_mt_per_m) <= scanner.max_grad_mt_per_m * (1 + 1e-6)
    assert max(usage.max_slew_t_per_m_per_s) <= scanner.max_slew_t_per_m_per_s * (1 + 1e-6)
    ok, report = seq.check_timing()
    assert ok, report[:3]


def test_mese_slices_interleaved_and_equally_spaced():
    p = _mese(n_slices=5, matrix=[16, 8], n_echoes=2)
    seq = build_mese(p, PRISMA)
    exc = [r for r in _rfs(seq) if r.use == "excitation"]
    spacing = (p.slice_thickness_mm + p.slice_gap_mm) * 1e-3
    positions = np.array([r.position for r in exc[:5]])
    expected = (np.array(interleaved_slice_order(5)) - 2) * spacing
    np.testing.assert_allclose(positions, expected, atol=1e-6)
    gaps = np.diff([r.t for r in exc])
    np.testing.assert_allclose(gaps, p.tr_ms * 1e-3 / 5, rtol=1e-3)
    _, _, labels = _adcs(seq)
    np.testing.assert_array_equal(labels["SLC"][:: p.n_echoes][:5], interleaved_slice_order(5))


def test_mese_refusals():
    with pytest.raises(ProtocolError, match=r"te_ms.*siemens-prisma"):
        build_mese(_mese(te_ms=3), PRISMA)
    with pytest.raises(ProtocolError, match="tr_ms"):
        build_mese(_mese(tr_ms=100, n_echoes=8), PRISMA)
    with pytest.raises(ProtocolError, match="slice_thickness_mm"):
        build_mese(_mese(slice_thickness_mm=0.3, rf_duration_ms=0.5), FREEMAX)


# --------------------------------------------------------------------------- IR-SE


@pytest.mark.parametrize("scanner", [PRISMA, GE], ids=lambda s: s.name)
def test_irse_inversion_times_sequential_slices(scanner):
    p = _irse(dummy_scans=1)
    seq = build_irse(p, scanner)
    ny = p.matrix[1]
    rfs = _rfs(seq)
    inv = [r for r in rfs if r.use == "inversion"]
    exc = [r for r in rfs if r.use == "excitation"]
    ref = [r for r in rfs if r.use == "refocusing"]
    n_tr = p.n_slices * len(p.ti_ms) * (ny + p.dummy_scans)
    assert len(inv) == len(exc) == len(ref) == n_tr
    # Slice-selective inversion of the same slice right before every excitation.
    for i_, e in zip(inv, exc, strict=True):
        assert i_.t < e.t
        assert i_.position == pytest.approx(e.position, abs=1e-6)
        assert abs(i_.freq) > 0 or abs(e.position) < 1e-9
    # Slices sequential: the first half of the scan is slice 0 only.
    positions = np.array([e.position for e in exc])
    assert np.all(positions[: n_tr // 2] == positions[0])
    assert np.all(positions[n_tr // 2:] == positions[-1])
    assert positions[0] < positions[-1]

    # TI per SET label, measured at the k-space-centre sample.
    k, t, labels = _adcs(seq)
    t_inv = np.array([r.t for r in inv])
    t_exc = np.array([r.t for r in exc])
    centre = np.linalg.norm(k[:, p.matrix[0] // 2], axis=1) < 1e-3
    assert centre.sum() == p.n_slices * len(p.ti_ms)
    for t_c, s in zip(t[centre, p.matrix[0] // 2], labels["SET"][centre], strict=True):
        e = t_exc[np.searchsorted(t_exc, t_c) - 1]
        i_ = t_inv[np.searchsorted(t_inv, e) - 1]
        assert (e - i_) * 1e3 == pytest.approx(p.ti_ms[s], rel=0.01)
        assert (t_c - e) * 1e3 == pytest.approx(p.te_ms, rel=0.01)
    m = measure_timing(seq)
    np.testing.assert_allclose(np.array(m.ti_s) * 1e3, sorted(p.ti_ms), rtol=0.01)
    np.testing.assert_allclose(seq.definitions["TI"], m.ti_s, rtol=0.01)
    assert m.tr_s == pytest.approx(p.tr_ms * 1e-3, rel=0.01)
    # Same TR between every pair of inversions of one slice, whatever the TI.
    np.testing.assert_allclose(np.diff(t_inv[: n_tr // 2]), p.tr_ms * 1e-3, rtol=1e-6)
    assert np.max(np.abs(k[:, :, 2])) < 1e-3
    ok, report = seq.check_timing()
    assert ok, report[:3]


def test_irse_refusals():
    with pytest.raises(ProtocolError, match=r"ti_ms.*TI 1 ms"):
        build_irse(_irse(ti_ms=[1, 100]), PRISMA)
    with pytest.raises(ProtocolError, match="tr_ms"):
        build_irse(_irse(ti_ms=[100, 600]), PRISMA)
    with pytest.raises(ProtocolError, match="te_ms"):
        build_irse(_irse(te_ms=2), GE)


# --------------------------------------------------------------------------- TSE


def test_tse_ordering_table():
    # Centre echo mid-train: plain linear ordering.
    table = tse_ordering(32, 8, 5)
    np.testing.assert_array_equal(table, np.arange(32).reshape(8, 4).T)
    # Centre at echo 1: |ky| grows with echo number, centre line at echo 1.
    table = tse_ordering(32, 8, 1)
    assert 16 in table[:, 0]
    dist = np.abs(table - 16).max(axis=0)
    assert np.all(np.diff(dist) >= 0)
    # Not a multiple of the turbo factor: every line once, padding marked -1.
    table = tse_ordering(18, 4, 2)
    lines = table[table >= 0]
    np.testing.assert_array_equal(np.sort(lines), np.arange(18))
    assert (table < 0).sum() == table.size - 18


@pytest.mark.parametrize(
    ("scanner", "te_ms", "turbo", "ny"),
    [(PRISMA, 40, 8, 32), (GE, 60, 8, 30), (FREEMAX, 25, 8, 32)],
    ids=["prisma", "ge-nondivisible", "freemax"],
)
def test_tse_effective_te_at_centre_echo(scanner, te_ms, turbo, ny):
    p = _tse(te_ms=te_ms, turbo_factor=turbo, matrix=[32, ny])
    seq = build_tse(p, scanner)
    rfs = _rfs(seq)
    exc = np.array([r.t for r in rfs if r.use == "excitation"])
    ref = np.array([r.t for r in rfs if r.use == "refocusing"])
    n_shots = math.ceil(ny / turbo)
    assert exc.size == n_shots * p.n_slices
    assert ref.size == exc.size * turbo
    esp = np.diff(ref.reshape(-1, turbo), axis=1)
    assert np.ptp(esp) < 1e-9
    esp = float(esp[0, 0])

    k, t, labels = _adcs(seq)
    nx = p.matrix[0]
    dky = 1 / (p.fov_mm[1] * 1e-3)
    # Phase encoding rewound after each echo: every echo's ky is exactly its LIN line.
    np.testing.assert_allclose(k[:, 0, 1], (labels["LIN"] - ny // 2) * dky, atol=1e-3 * dky)
    assert np.max(np.abs(k[:, nx // 2, 0])) < 1e-3 * dky
    # Every line of every slice exactly once.
    for s in range(p.n_slices):
        np.testing.assert_array_equal(np.sort(labels["LIN"][labels["SLC"] == s]), np.arange(ny))
    # Centre line: echo number k = te / esp, counted from the refocusing pulses.
    centre = labels["LIN"] == ny // 2
    t_c = t[centre, nx // 2]
    for tc in t_c:
        e = exc[np.searchsorted(exc, tc) - 1]
        n_ref = np.count_nonzero((ref > e) & (ref < tc))
        assert (tc - e) * 1e3 == pytest.approx(te_ms, rel=0.01)
        assert n_ref * esp * 1e3 == pytest.approx(te_ms, rel=0.01)
        assert n_ref == int(np.atleast_1d(seq.definitions["EffectiveEchoIndex"])[0])
    # k = floor(te / esp_min): spacing te / (k + 1) is below the minimum, so refused.
    n_ref = int(np.atleast_1d(seq.definitions["EffectiveEchoIndex"])[0])
    with pytest.raises(ProtocolError, match="te_ms"):
        build_tse(_tse(te_ms=te_ms / (n_ref + 1), turbo_factor=turbo, matrix=[32, ny]),
                  scanner)
    m = measure_timing(seq)
    assert m.te_s * 1e3 == pytest.approx(te_ms, rel=0.01)
    assert m.tr_s * 1e3 == pytest.approx(p.tr_ms, rel=0.01)
    assert np.max(np.abs(k[:, :, 2])) < 1e-3 * dky
    ok, report = seq.check_timing()
    assert ok, report[:3]


def test_tse_refusals():
    with pytest.raises(ProtocolError, match=r"te_ms.*minimum"):
        build_tse(_tse(te_ms=3), PRISMA)
    with pytest.raises(ProtocolError, match=r"te_ms.*turbo_factor 4"):
        build_tse(_tse(te_ms=200, turbo_factor=4), PRISMA)
    with pytest.raises(ProtocolError, match="tr_ms"):
        build_tse(_tse(tr_ms=50), PRISMA)
