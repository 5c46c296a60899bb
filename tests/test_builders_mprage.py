"""MPRAGE builder checked against physics measured on the built sequence."""

from __future__ import annotations

import math

import numpy as np
import pypulseq as pp
import pytest

from mrharmony.errors import ProtocolError
from mrharmony.sequences import load_scanner
from mrharmony.sequences.builders.mprage import build_mprage
from mrharmony.sequences.check import gradient_usage
from mrharmony.sequences.protocol import protocol_from_mapping

from seqtools import measure_timing

PRISMA = load_scanner("siemens-prisma")
GE = load_scanner("ge-discovery-mr750")
FREEMAX = load_scanner("siemens-freemax")


def _mprage(**kw):
    base = {
        "builder": "mprage",
        "name": "t",
        "fov_mm": [200, 180, 120],
        "matrix": [16, 12, 4],
        "te_ms": 4,
        "tr_ms": 1000,
        "ti_ms": 300,
        "flip_deg": 8,
        "echo_spacing_ms": 10,
        "rf_duration_ms": 1,
    }
    return protocol_from_mapping({**base, **kw})


def _rf_table(seq: pp.Sequence) -> list[tuple[float, str, float, float, bool]]:
    """(centre time, use, freq offset, phase offset, has a gradient in its block)."""
    out = []
    t0 = 0.0
    for bid in seq.block_events:
        b = seq.get_block(bid)
        if b.rf is not None:
            has_grad = any(getattr(b, g) is not None for g in ("gx", "gy", "gz"))
            out.append((t0 + b.rf.delay + pp.calc_rf_center(b.rf)[0], b.rf.use,
                        b.rf.freq_offset, b.rf.phase_offset, has_grad))
        t0 += seq.block_durations[bid]
    return out


@pytest.mark.parametrize("scanner", [PRISMA, GE, FREEMAX], ids=lambda s: s.name)
def test_mprage_timing_kspace_and_labels(scanner):
    p = _mprage(dummy_scans=1)
    seq = build_mprage(p, scanner)
    nx, ny, nz = p.matrix
    rfs = _rf_table(seq)
    inv = [r for r in rfs if r[1] == "inversion"]
    exc = [r for r in rfs if r[1] == "excitation"]
    # One non-selective inversion per partition (plus the dummy), one excitation per line.
    assert len(inv) == nz + 1
    assert all(r[2] == 0.0 and not r[4] for r in inv)
    assert len(exc) == (nz + 1) * ny
    t_inv = np.array([r[0] for r in inv])
    t_exc = np.array([r[0] for r in exc])
    np.testing.assert_allclose(np.diff(t_inv), p.tr_ms * 1e-3, rtol=1e-6)
    trains = t_exc.reshape(nz + 1, ny)
    np.testing.assert_allclose(np.diff(trains, axis=1), p.echo_spacing_ms * 1e-3, rtol=1e-6)
    # TI to the centre line (excitation ny // 2 of the train).
    np.testing.assert_allclose(trains[:, ny // 2] - t_inv, p.ti_ms * 1e-3, rtol=0.01)
    # Quadratic RF spoiling: second difference of the excitation phase is the increment.
    phases = np.array([r[3] for r in exc])
    d2 = np.diff(phases, 2) % (2 * math.pi)
    inc = math.radians(p.rf_spoiling_inc_deg)
    assert np.allclose(np.minimum(np.abs(d2 - inc), 2 * math.pi - np.abs(d2 - inc)), 0,
                       atol=1e-9)

    k, _, _, _, t = seq.calculate_kspace()
    labels = seq.evaluate_labels(evolution="adc")
    n_adc = labels["LIN"].size
    assert n_adc == ny * nz
    k = k.T.reshape(n_adc, -1, 3)
    t = t.reshape(n_adc, -1)
    dk = 1 / (np.asarray(p.fov_mm) * 1e-3)
    np.testing.assert_allclose(k[:, :, 0], np.broadcast_to((np.arange(nx) - nx // 2) * dk[0],
                                                           k[:, :, 0].shape), atol=1e-3 * dk[0])
    np.testing.assert_allclose(k[:, 0, 1], (labels["LIN"] - ny // 2) * dk[1], atol=1e-3 * dk[1])
    np.testing.assert_allclose(k[:, 0, 2], (labels["PAR"] - nz // 2) * dk[2], atol=1e-3 * dk[2])
    # One partition per inversion, lines in linear order.
    expected_par, expected_lin = np.meshgrid(np.arange(nz), np.arange(ny), indexing="ij")
    np.testing.assert_array_equal(labels["PAR"].reshape(nz, ny), expected_par)
    np.testing.assert_array_equal(labels["LIN"].reshape(nz, ny), expected_lin)
    # TE from the k-space-centre sample.
    centre = np.linalg.norm(k[:, nx // 2], axis=1) < 1e-3 * dk[0]
    assert centre.sum() == 1
    tc = t[centre, nx // 2][0]
    assert (tc - t_exc[np.searchsorted(t_exc, tc) - 1]) * 1e3 == pytest.approx(p.te_ms, rel=0.01)

    m = measure_timing(seq)
    assert m.te_s * 1e3 == pytest.approx(p.te_ms, rel=0.01)
    assert m.tr_s * 1e3 == pytest.approx(p.tr_ms, rel=0.01)
    assert len(m.ti_s) == 1
    assert m.ti_s[0] * 1e3 == pytest.approx(p.ti_ms, rel=0.01)
    assert np.atleast_1d(seq.definitions["TI"])[0] == pytest.approx(m.ti_s[0], rel=0.01)
    usage = gradient_usage(seq)
    assert max(usage.max_grad_mt_per_m) <= scanner.max_grad_mt_per_m * (1 + 1e-6)
    assert max(usage.max_slew_t_per_m_per_s) <= scanner.max_slew_t_per_m_per_s * (1 + 1e-6)
    ok, report = seq.check_timing()
    assert ok, report[:3]


def test_mprage_minimum_echo_spacing_when_unset():
    seq = build_mprage(_mprage(echo_spacing_ms=None), PRISMA)
    exc = np.array([r[0] for r in _rf_table(seq) if r[1] == "excitation"])
    esp = float(np.diff(exc[:2])[0])
    assert esp < 10e-3
    assert float(np.atleast_1d(seq.definitions["EchoSpacing"])[0]) == pytest.approx(esp)
    # Anything shorter than that minimum is refused, naming the key.
    with pytest.raises(ProtocolError, match="echo_spacing_ms"):
        build_mprage(_mprage(echo_spacing_ms=esp * 1e3 * 0.98), PRISMA)
    build_mprage(_mprage(echo_spacing_ms=esp * 1e3), PRISMA)


def test_mprage_refusals():
    with pytest.raises(ProtocolError, match=r"ti_ms.*TI 20 ms"):
        build_mprage(_mprage(ti_ms=20), PRISMA)
    with pytest.raises(ProtocolError, match=r"tr_ms.*siemens-freemax"):
        build_mprage(_mprage(tr_ms=350), FREEMAX)
    with pytest.raises(ProtocolError, match="te_ms"):
        build_mprage(_mprage(te_ms=0.5), GE)
    with pytest.raises(ProtocolError, match="fov_mm"):
        build_mprage(_mprage(fov_mm=[200, 180, 2], rf_duration_ms=0.1), FREEMAX)
