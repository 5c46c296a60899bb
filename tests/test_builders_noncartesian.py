"""Radial and spiral builders: k-space extent and sampling, gradient limits, timing, refusals.

Everything is measured on the built sequence: the k-space trajectory from pypulseq's
``calculate_kspace`` (integrated gradients), the waveforms the blocks carry, and the RF
and ADC events. Only the comparison values come from the protocol.
"""

from __future__ import annotations

import math

import numpy as np
import pypulseq as pp
import pytest

from mrharmony.errors import ProtocolError
from mrharmony.sequences import build, list_scanners, load_scanner, read_seq, write_seq
from mrharmony.sequences.protocol import load_protocol, protocol_from_mapping

from conftest import EXAMPLES
from seqtools import measure_timing

RADIAL = {
    "builder": "radial", "name": "r", "fov_mm": [200, 200], "matrix": [32, 32],
    "slice_thickness_mm": 5, "te_ms": 4, "tr_ms": 10, "flip_deg": 10, "n_spokes": 12,
    "readout_oversampling": 2, "readout_bandwidth_hz_per_px": 400, "dummy_scans": 2,
}
SPIRAL = {
    "builder": "spiral", "name": "s", "fov_mm": [220, 220], "matrix": [64, 64],
    "slice_thickness_mm": 5, "te_ms": 3, "tr_ms": 25, "flip_deg": 15, "n_interleaves": 6,
    "adc_dwell_us": 4, "dummy_scans": 2,
}
GOLDEN_DEG = 180 / ((1 + math.sqrt(5)) / 2)  # 180 deg / golden ratio = 111.246 deg


def _radial(**changes):
    return protocol_from_mapping({**RADIAL, **changes})


def _spiral(**changes):
    return protocol_from_mapping({**SPIRAL, **changes})


def _adc_blocks(seq):
    """(block start time, block) of every block with an ADC, in order."""
    out, t0 = [], 0.0
    for bid in seq.block_events:
        block = seq.get_block(bid)
        if block.adc is not None:
            out.append((t0, block))
        t0 += seq.block_durations[bid]
    return out


def _check_per_axis_limits(seq, scanner):
    for wave in seq.waveforms():
        t, g = np.asarray(wave)
        if t.size < 2:
            continue
        assert np.max(np.abs(g)) <= scanner.max_grad_hz_per_m * (1 + 1e-6)
        ok = np.diff(t) > 1e-9
        slew = np.abs(np.diff(g)[ok] / np.diff(t)[ok])
        assert np.max(slew) <= scanner.max_slew_hz_per_m_per_s * (1 + 1e-6)


# ------------------------------------------------------------------------------ radial


@pytest.mark.parametrize("ordering", ["linear", "golden"])
def test_radial_spokes_through_centre_with_full_extent(ordering):
    p = _radial(angle_ordering=ordering, n_slices=2)
    seq = build(p, "siemens-prisma")
    k, _, _, _, _ = seq.calculate_kspace()
    n, os_ = p.matrix[0], p.readout_oversampling
    dk = 1 / (p.fov_mm[0] * 1e-3)
    kc = (k[0] + 1j * k[1]).reshape(p.n_slices * p.n_spokes, n * os_)
    np.testing.assert_allclose(k[2], 0, atol=1e-3 * dk)  # 2D: no kz at sampling
    # Every spoke starts at |k| = N/2 dk and passes through the centre at sample Nos//2.
    np.testing.assert_allclose(np.abs(kc[:, 0]), n / 2 * dk, rtol=0.01)
    np.testing.assert_allclose(np.abs(kc[:, n * os_ // 2]), 0, atol=1e-3 * dk)
    # Samples are on a straight line through 0 at dk/os spacing (FFT convention).
    angles = np.angle(kc[:, -1])
    pos = np.arange(n * os_) - n * os_ // 2
    expected = pos[None] * dk / os_ * np.exp(1j * angles)[:, None]
    np.testing.assert_allclose(kc, expected, atol=1e-3 * dk)
    # Angle ordering, per slice: linear over 180 deg or golden-angle increments.
    spoke_angles = np.mod(angles[: p.n_spokes], np.pi)
    if ordering == "linear":
        want = np.pi * np.arange(p.n_spokes) / p.n_spokes
    else:
        want = np.mod(np.radians(GOLDEN_DEG) * np.arange(p.n_spokes), np.pi)
    diff = np.angle(np.exp(2j * (spoke_angles - want))) / 2
    np.testing.assert_allclose(diff, 0, atol=1e-9)
    np.testing.assert_allclose(np.mod(angles[p.n_spokes:], np.pi), spoke_angles, atol=1e-9)
    listed = np.asarray(seq.definitions["SpokeAngles"])
    np.testing.assert_allclose(np.angle(np.exp(2j * (listed - want))), 0, atol=1e-6)
    assert seq.definitions["Trajectory"] == "radial"


def test_radial_labels_lin_is_spoke_index():
    p = _radial(n_slices=2)
    seq = build(p, "siemens-skyra")
    labels = seq.evaluate_labels(evolution="adc")
    np.testing.assert_array_equal(labels["LIN"], np.tile(np.arange(p.n_spokes), 2))
    np.testing.assert_array_equal(labels["SLC"], np.repeat([0, 1], p.n_spokes))


@pytest.mark.parametrize("scanner", list_scanners())
def test_radial_timing_and_limits_on_every_scanner(scanner):
    p = _radial(angle_ordering="golden")
    seq = build(p, scanner)
    m = measure_timing(seq)
    assert m.te_s == pytest.approx(p.te_ms * 1e-3, rel=0.01)
    assert m.tr_s == pytest.approx(p.tr_ms * 1e-3, rel=0.01)
    _check_per_axis_limits(seq, load_scanner(scanner))


def test_radial_rf_spoiling_and_adc_phase_follow():
    p = _radial(n_slices=1, dummy_scans=0, rf_spoiling_inc_deg=117)
    seq = build(p, "ge-discovery-mr750")
    rf_phases, adc_phases = [], []
    for bid in seq.block_events:
        b = seq.get_block(bid)
        if b.rf is not None:
            rf_phases.append(b.rf.phase_offset)
        if b.adc is not None:
            adc_phases.append(b.adc.phase_offset)
    second = np.diff(np.unwrap(rf_phases), 2)
    np.testing.assert_allclose(np.angle(np.exp(1j * (second - math.radians(117)))), 0,
                               atol=1e-9)
    # Slice at isocentre: the RF phase is the spoiling phase, the ADC follows it.
    np.testing.assert_allclose(np.angle(np.exp(1j * (np.array(rf_phases) - adc_phases))), 0,
                               atol=1e-9)


def test_radial_refusals_name_the_key():
    with pytest.raises(ProtocolError, match=r"te_ms: TE 0\.5 ms is below the minimum .*prisma"):
        build(_radial(te_ms=0.5), "siemens-prisma")
    with pytest.raises(ProtocolError, match=r"tr_ms: TR 4 ms is below the minimum .*freemax"):
        build(_radial(tr_ms=4), "siemens-freemax")


# ------------------------------------------------------------------------------ spiral


def _spiral_k(seq, p):
    """Complex in-plane k (1/m) per ADC, shape (n_adc, n_samples), and k_z."""
    k, _, _, _, _ = seq.calculate_kspace()
    blocks = _adc_blocks(seq)
    n = blocks[0][1].adc.num_samples
    return (k[0] + 1j * k[1]).reshape(len(blocks), n), k[2]


def _turn_gaps(kc: np.ndarray, kmax: float, psi: float) -> np.ndarray:
    """Radial gaps between neighbouring crossings of the ray at angle ``psi``, all shots."""
    radii = []
    for shot in kc:
        r = np.abs(shot)
        sel = (r > 1e-6 * kmax) & (r <= kmax)
        phase = np.unwrap(np.angle(shot[sel]))
        rr = r[sel]
        assert np.all(np.diff(phase) > 0), "spiral-out angle must increase monotonically"
        first = math.ceil((phase[0] - psi) / (2 * np.pi))
        last = math.floor((phase[-1] - psi) / (2 * np.pi))
        targets = psi + 2 * np.pi * np.arange(first, last + 1)
        radii.extend(np.interp(targets, phase, rr))
    return np.diff(np.sort(radii))


@pytest.mark.parametrize(
    ("scanner", "n_il"),
    [("siemens-prisma", 6), ("ge-discovery-mr750", 6), ("siemens-freemax", 3),
     ("uih-umr790", 1)],
)
def test_spiral_kspace_extent_and_nyquist(scanner, n_il):
    p = _spiral(n_interleaves=n_il)
    seq = build(p, scanner)
    kc, kz = _spiral_k(seq, p)
    fov = p.fov_mm[0] * 1e-3
    kmax = p.matrix[0] / (2 * fov)
    assert kc.shape[0] == n_il
    np.testing.assert_allclose(kz, 0, atol=1e-3 / fov)
    # Starts at the centre, reaches kmax on every interleaf.
    assert np.all(np.abs(kc[:, 0]) < 0.02 / fov)
    assert np.all(np.max(np.abs(kc), axis=1) >= 0.99 * kmax)
    # Nyquist: neighbouring turns across all interleaves at most 1/FOV apart radially.
    for psi in np.linspace(0, 2 * np.pi, 11, endpoint=False) + 0.1:
        gaps = _turn_gaps(kc, kmax, psi)
        assert gaps.size >= p.matrix[0] / 2 - 2
        assert np.max(gaps) <= 1.03 / fov
        assert np.median(gaps) == pytest.approx(1 / fov, rel=0.03)
    # And along the trajectory: successive samples at most 1/FOV apart.
    assert np.max(np.abs(np.diff(kc, axis=1))) <= 1.0 / fov * (1 + 1e-6)
    # Interleaves are rotated copies, 2 pi / n apart.
    ref = kc[:, kc.shape[1] // 2]
    steps = np.angle(ref[1:] / ref[:-1]) if n_il > 1 else np.zeros(0)
    np.testing.assert_allclose(np.mod(steps, 2 * np.pi), 2 * np.pi / n_il, atol=1e-6)
    np.testing.assert_allclose(np.abs(ref), np.abs(ref[0]), rtol=1e-6)


@pytest.mark.parametrize("scanner", list_scanners())
def test_spiral_gradient_limits_per_axis_and_vector(scanner):
    sc = load_scanner(scanner)
    seq = build(_spiral(), scanner)
    g_max, s_max = sc.max_grad_hz_per_m, sc.max_slew_hz_per_m_per_s
    _check_per_axis_limits(seq, sc)
    tol = 1 + 1e-6
    for _, block in _adc_blocks(seq):
        gx, gy = block.gx, block.gy
        assert gx.type == gy.type == "grad"  # arbitrary waveforms
        np.testing.assert_allclose(gx.tt, gy.tt)
        t = np.concatenate([[0.0], gx.tt, [gx.shape_dur]])
        wx = np.concatenate([[gx.first], gx.waveform, [gx.last]])
        wy = np.concatenate([[gy.first], gy.waveform, [gy.last]])
        sx, sy = np.diff(wx) / np.diff(t), np.diff(wy) / np.diff(t)
        for w in (wx, wy, np.hypot(wx, wy)):
            assert np.max(np.abs(w)) <= g_max * tol
        for s in (sx, sy, np.hypot(sx, sy)):
            assert np.max(np.abs(s)) <= s_max * tol
        # Time-optimal: the design runs at (close to) one of the limits.
        assert max(np.max(np.hypot(sx, sy)) / s_max, np.max(np.hypot(wx, wy)) / g_max) > 0.9


@pytest.mark.parametrize("scanner", ["siemens-prisma", "ge-signa-premier", "siemens-freemax"])
def test_spiral_te_at_first_sample_and_rewound(scanner):
    p = _spiral()
    seq = build(p, scanner)
    m = measure_timing(seq)
    assert m.te_s == pytest.approx(p.te_ms * 1e-3, rel=0.01)
    assert m.tr_s == pytest.approx(p.tr_ms * 1e-3, rel=0.01)
    # TE is the time from the excitation centre to the first ADC sample (k = 0 there).
    exc_t, t0 = [], 0.0
    for bid in seq.block_events:
        b = seq.get_block(bid)
        if b.rf is not None:
            exc_t.append(t0 + b.rf.delay + pp.calc_rf_center(b.rf)[0])
        t0 += seq.block_durations[bid]
    for t_block, block in _adc_blocks(seq):
        t_first = t_block + block.adc.delay + 0.5 * block.adc.dwell
        prev = max(t for t in exc_t if t < t_first)
        assert t_first - prev == pytest.approx(seq.definitions["TE"][0], abs=1e-7)
    assert m.te_s == pytest.approx(seq.definitions["TE"][0], abs=1e-7)
    # In-plane moment is zero again at every next excitation (ramp-down + rewinder).
    fov = p.fov_mm[0] * 1e-3
    for wave in seq.waveforms()[:2]:
        t, g = np.asarray(wave)
        keep = np.concatenate([[True], np.diff(t) > 0])
        t, g = t[keep], g[keep]
        cum = np.concatenate([[0.0], np.cumsum(np.diff(t) * (g[1:] + g[:-1]) / 2)])
        # RF centres fall where x and y are idle, so the moment is linear there.
        moments = np.interp(exc_t, t, cum)
        np.testing.assert_allclose(np.diff(moments), 0, atol=1e-3 / fov)
        assert np.max(np.abs(cum)) > p.matrix[0] / (2 * fov) * 0.5  # something was played


@pytest.mark.parametrize(("scanner", "dwell_us"), [("ge-discovery-mr750", 4.0),
                                                   ("siemens-prisma", 3.3)])
def test_spiral_adc_dwell_raster_and_sample_divisor(scanner, dwell_us):
    sc = load_scanner(scanner)
    seq = build(_spiral(adc_dwell_us=3.3), scanner)
    for _, block in _adc_blocks(seq):
        assert block.adc.dwell == pytest.approx(dwell_us * 1e-6, abs=1e-12)
        assert block.adc.num_samples % sc.adc_samples_divisor == 0
    labels = seq.evaluate_labels(evolution="adc")
    np.testing.assert_array_equal(labels["LIN"], np.arange(SPIRAL["n_interleaves"]))
    assert seq.definitions["Trajectory"] == "spiral"
    assert seq.definitions["Interleaves"] == SPIRAL["n_interleaves"]


def test_spiral_roundtrip_through_file(tmp_path):
    seq = build(_spiral(n_interleaves=4), "ge-signa-premier")
    path = tmp_path / "spiral.seq"
    write_seq(seq, path)
    back = read_seq(path, "ge-signa-premier")
    ok, report = back.check_timing()
    assert ok, report
    k1 = seq.calculate_kspace()[0]
    k2 = back.calculate_kspace()[0]
    np.testing.assert_allclose(k2, k1, atol=1e-2)


def test_spiral_refusals_name_the_key():
    with pytest.raises(ProtocolError, match=r"te_ms: TE 0\.5 ms is below the minimum .*prisma"):
        build(_spiral(te_ms=0.5), "siemens-prisma")
    with pytest.raises(ProtocolError, match=r"tr_ms: TR 5 ms is below the minimum .*freemax"):
        build(_spiral(tr_ms=5), "siemens-freemax")
    with pytest.raises(ProtocolError, match=r"n_interleaves: .*256-pixel spiral.*ms limit"):
        build(_spiral(matrix=[256, 256], n_interleaves=1, adc_dwell_us=20), "siemens-prisma")


@pytest.mark.parametrize("builder", ["radial", "spiral"])
def test_examples_build_on_every_scanner(builder):
    p = load_protocol(EXAMPLES / f"{builder}.toml")
    for scanner in list_scanners():
        seq = build(p, scanner)
        m = measure_timing(seq)
        assert m.te_s == pytest.approx(p.te_ms * 1e-3, rel=0.01)
        assert m.tr_s == pytest.approx(p.tr_ms * 1e-3, rel=0.01)
