"""bSSFP builder: balanced gradients, 0/180 phase cycling, alpha/2 preparation, TE = TR/2."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mrharmony.errors import ProtocolError
from mrharmony.sequences import build, list_scanners, load_scanner
from mrharmony.sequences.protocol import load_protocol, protocol_from_mapping

from conftest import EXAMPLES
from seqtools import measure_timing

BASE = {
    "builder": "bssfp", "name": "t", "fov_mm": [200, 200], "matrix": [32, 24],
    "slice_thickness_mm": 5, "te_ms": 3.5, "tr_ms": 7, "flip_deg": 40,
    "readout_bandwidth_hz_per_px": 800, "dummy_scans": 3,
}


def _proto(**changes):
    return protocol_from_mapping({**BASE, **changes})


def _rf_list(seq):
    """(absolute centre time, rf event) for every RF pulse, in order."""
    import pypulseq as pp

    out, t0 = [], 0.0
    for bid in seq.block_events:
        block = seq.get_block(bid)
        if block.rf is not None:
            out.append((t0 + block.rf.delay + pp.calc_rf_center(block.rf)[0], block.rf))
        t0 += seq.block_durations[bid]
    return out


def _adc_list(seq):
    """(block start time, adc event) for every ADC, in order."""
    out, t0 = [], 0.0
    for bid in seq.block_events:
        block = seq.get_block(bid)
        if block.adc is not None:
            out.append((t0, block.adc))
        t0 += seq.block_durations[bid]
    return out


def _integral_at(wave: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Exact integral from 0 of a piecewise-linear gradient (t, g) at ``times``."""
    t, g = wave
    if t.size == 0:
        return np.zeros(len(times))
    keep = np.concatenate([[True], np.diff(t) > 0])  # drop repeated breakpoints
    t, g = t[keep], g[keep]
    cum = np.concatenate([[0.0], np.cumsum(np.diff(t) * (g[1:] + g[:-1]) / 2)])
    out = []
    for tq in times:
        if tq <= t[0]:
            out.append(0.0)
            continue
        i = min(np.searchsorted(t, tq) - 1, len(t) - 2)
        gq = np.interp(tq, t, g)
        out.append(cum[i] + (tq - t[i]) * (g[i] + gq) / 2)
    return np.asarray(out)


def _flip_deg(rf) -> float:
    dt = np.diff(rf.t, prepend=0)
    return math.degrees(2 * math.pi * abs(np.sum(rf.signal * dt)))


@pytest.mark.parametrize("scanner", list_scanners())
def test_gradients_balanced_over_every_tr(scanner):
    p = _proto(n_slices=2, slice_gap_mm=2)
    seq = build(p, scanner)
    centres = np.array([t for t, _ in _rf_list(seq)])
    waves = seq.waveforms()
    for axis, wave in zip("xyz", waves, strict=True):
        moments = _integral_at(np.asarray(wave), centres)
        per_tr = np.diff(moments)
        # Intervals: preparation -> first pulse, every TR, and last pulse of a slice ->
        # preparation of the next slice (the last rewinder closes that TR): all balanced.
        scale = p.matrix[0] / (p.fov_mm[0] * 1e-3)  # one readout's area, 1/m
        np.testing.assert_allclose(per_tr, 0, atol=1e-6 * scale, err_msg=f"axis {axis}")
        # Something is actually played on every axis.
        assert np.max(np.abs(np.asarray(wave)[1])) > 0


@pytest.mark.parametrize("scanner", ["siemens-prisma", "ge-discovery-mr750", "siemens-freemax"])
def test_te_is_half_tr_and_timing_matches_request(scanner):
    p = _proto()
    seq = build(p, scanner)
    m = measure_timing(seq)
    assert m.tr_s == pytest.approx(7e-3, rel=1e-3)
    assert m.te_s == pytest.approx(m.tr_s / 2, rel=0.01)
    assert m.te_s == pytest.approx(seq.definitions["TE"][0], abs=1e-7)
    # Every k-space-centre sample is TR/2 after its excitation (not just the earliest).
    k, _, _, _, t_adc = seq.calculate_kspace()
    centre_t = t_adc[np.linalg.norm(k, axis=0) < 1e-3]
    exc = np.array([t for t, rf in _rf_list(seq)])
    prev = exc[np.searchsorted(exc, centre_t) - 1]
    np.testing.assert_allclose(centre_t - prev, m.te_s, atol=1e-7)
    # And half-way to the next excitation (within one block raster).
    nxt = exc[np.searchsorted(exc, centre_t)]
    raster = load_scanner(scanner).block_duration_raster_us * 1e-6
    np.testing.assert_allclose(nxt - centre_t, centre_t - prev, atol=raster)


def test_cartesian_grid_fft_convention():
    p = _proto(readout_oversampling=2, n_slices=1)
    seq = build(p, "siemens-skyra")
    k, _, _, _, _ = seq.calculate_kspace()
    nx, ny = p.matrix
    os_ = 2
    dk = 1 / (p.fov_mm[0] * 1e-3)
    dky = 1 / (p.fov_mm[1] * 1e-3)
    kx = k[0].reshape(ny, nx * os_)
    ky = k[1].reshape(ny, nx * os_)
    ix, iy = np.meshgrid(np.arange(nx * os_), np.arange(ny))
    np.testing.assert_allclose(kx, (ix - nx * os_ // 2) * dk / os_, atol=1e-3 * dk)
    np.testing.assert_allclose(ky, (iy - ny // 2) * dky, atol=1e-3 * dky)


def test_alternating_rf_and_adc_phase_and_alpha_half_preparation():
    p = _proto(n_slices=2, slice_gap_mm=1, dummy_scans=2)
    seq = build(p, "ge-signa-premier")
    rfs = _rf_list(seq)
    ny = p.matrix[1]
    per_slice = 1 + p.dummy_scans + ny
    assert len(rfs) == p.n_slices * per_slice
    adcs = _adc_list(seq)
    assert len(adcs) == p.n_slices * ny
    tr = p.tr_ms * 1e-3
    raster = 4e-6
    for s in range(p.n_slices):
        chunk = rfs[s * per_slice:(s + 1) * per_slice]
        (t_prep, prep), full = chunk[0], chunk[1:]
        # Same slice: one frequency offset for the preparation and the full pulses.
        assert {round(rf.freq_offset, 6) for _, rf in chunk} == {round(prep.freq_offset, 6)}
        # alpha/2 preparation, TR/2 before the first full pulse.
        assert _flip_deg(prep) == pytest.approx(p.flip_deg / 2, rel=1e-3)
        assert all(_flip_deg(rf) == pytest.approx(p.flip_deg, rel=1e-3) for _, rf in full)
        assert full[0][0] - t_prep == pytest.approx(tr / 2, abs=raster)
        assert np.diff([t for t, _ in full]) == pytest.approx(tr, abs=1e-9)
        # Phases relative to the slice's first full pulse: pi for the preparation, then
        # 0, pi, 0, ... (the slice-offset phase is common to all).
        ref = full[0][1].phase_offset
        rel = np.angle(np.exp(1j * (np.array([rf.phase_offset for _, rf in chunk]) - ref)))
        expected = np.angle(np.exp(1j * math.pi * np.arange(-1, len(full))))
        np.testing.assert_allclose(np.abs(rel), np.abs(expected), atol=1e-9)
    # Each ADC has the alternating phase of the pulse that precedes it.
    rf_times = np.array([t for t, _ in rfs])
    for t_adc, adc in adcs:
        i = np.searchsorted(rf_times, t_adc) - 1
        slice_start = (i // per_slice) * per_slice
        n_full = i - slice_start - 1  # index among the slice's full pulses
        assert math.cos(adc.phase_offset) == pytest.approx(math.cos(math.pi * n_full))
        assert math.sin(adc.phase_offset) == pytest.approx(0, abs=1e-12)


def test_labels_and_definitions():
    p = _proto(n_slices=2)
    seq = build(p, "philips-elition-3t")
    labels = seq.evaluate_labels(evolution="adc")
    ny = p.matrix[1]
    np.testing.assert_array_equal(labels["LIN"], np.tile(np.arange(ny), 2))
    np.testing.assert_array_equal(labels["SLC"], np.repeat([0, 1], ny))
    assert seq.definitions["Trajectory"] == "cartesian"
    assert seq.definitions["PreparationPulse"] == "alpha/2"
    assert seq.definitions["TR"] == pytest.approx(7e-3)


def test_gradient_limits_on_slow_scanner():
    scanner = load_scanner("siemens-freemax")
    seq = build(_proto(), scanner)
    for wave in seq.waveforms():
        t, g = np.asarray(wave)
        assert np.max(np.abs(g)) <= scanner.max_grad_hz_per_m * (1 + 1e-6)
        ok = np.diff(t) > 1e-9
        slew = np.abs(np.diff(g)[ok] / np.diff(t)[ok])
        assert np.max(slew) <= scanner.max_slew_hz_per_m_per_s * (1 + 1e-6)


def test_refuses_te_not_half_tr():
    with pytest.raises(ProtocolError, match=r"te_ms: .*TE 3 ms .*TR/2 = 3\.5 ms"):
        build(_proto(te_ms=3.0), "siemens-prisma")
    # Within 1 % is accepted (TE is TR/2 by construction).
    seq = build(_proto(te_ms=3.53), "siemens-prisma")
    assert seq.definitions["TE"][0] == pytest.approx(3.5e-3, rel=1e-3)


@pytest.mark.parametrize("scanner", ["siemens-prisma", "ge-discovery-mr750", "siemens-freemax"])
def test_refuses_short_tr_naming_minimum(scanner):
    with pytest.raises(ProtocolError, match=rf"tr_ms: TR 1 ms is below the minimum .* {scanner}"):
        build(_proto(tr_ms=1.0, te_ms=0.5), scanner)


def test_minimum_tr_reported_is_buildable():
    with pytest.raises(ProtocolError) as info:
        build(_proto(tr_ms=1.0, te_ms=0.5), "siemens-skyra")
    minimum = float(str(info.value).split("minimum ")[1].split(" ms")[0])
    seq = build(_proto(tr_ms=minimum, te_ms=minimum / 2), "siemens-skyra")
    m = measure_timing(seq)
    assert m.tr_s == pytest.approx(minimum * 1e-3, rel=1e-3)
    assert m.te_s == pytest.approx(m.tr_s / 2, rel=0.01)


def test_example_builds_on_every_scanner():
    p = load_protocol(EXAMPLES / "bssfp.toml")
    for scanner in list_scanners():
        seq = build(p, scanner)
        m = measure_timing(seq)
        assert m.te_s == pytest.approx(p.te_ms * 1e-3, rel=0.01)
        assert m.tr_s == pytest.approx(p.tr_ms * 1e-3, rel=0.01)
