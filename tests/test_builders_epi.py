"""Tests of the EPI builders (gradient-echo EPI and diffusion-weighted spin-echo EPI).

Numbers are measured from the built sequences (RF events, ADC events, labels, the k-space
trajectory pypulseq computes, and the gradient waveforms), not read back from the
definitions the builder wrote, except to compare the two.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pypulseq as pp
import pytest

from mrharmony.errors import ProtocolError
from mrharmony.sequences.builders.diffusion import (
    build_dwi_epi,
    diffusion_directions,
    stejskal_tanner_b,
)
from mrharmony.sequences.builders.epi import build_epi
from mrharmony.sequences.protocol import load_protocol, protocol_from_mapping
from mrharmony.sequences.scanner import list_scanners, load_scanner

from seqtools import measure_timing, rf_events

FOV = (0.22, 0.20)


def _epi(**overrides):
    data = {
        "builder": "epi", "name": "t", "fov_mm": [FOV[0] * 1e3, FOV[1] * 1e3], "matrix": [32, 24],
        "slice_thickness_mm": 4, "n_slices": 2, "te_ms": 30, "tr_ms": 200, "dummy_scans": 1,
    }
    data.update(overrides)
    return protocol_from_mapping(data)


def _dwi(**overrides):
    data = {
        "builder": "dwi_epi", "name": "t", "fov_mm": [FOV[0] * 1e3, FOV[1] * 1e3],
        "matrix": [32, 24], "slice_thickness_mm": 4, "n_slices": 1, "te_ms": 90, "tr_ms": 300,
        "b_values_s_per_mm2": [0, 500, 1000], "n_directions": 3,
    }
    data.update(overrides)
    return protocol_from_mapping(data)


def _definition_list(seq: pp.Sequence, key: str) -> np.ndarray:
    return np.atleast_1d(np.asarray(seq.definitions[key], dtype=float))


def _adc_blocks(seq: pp.Sequence) -> list[tuple[float, pp.Sequence]]:
    """(block start time, block) for every block with an ADC, in order."""
    out = []
    t0 = 0.0
    for block_id in seq.block_events:
        block = seq.get_block(block_id)
        if block.adc is not None:
            out.append((t0, block))
        t0 += seq.block_durations[block_id]
    return out


def _max_grad_and_slew(seq: pp.Sequence) -> tuple[float, float]:
    gmax, smax = 0.0, 0.0
    for wave in seq.waveforms()[:3]:
        t, g = wave[0], wave[1]
        if t.size < 2:
            continue
        gmax = max(gmax, float(np.max(np.abs(g))))
        dt = np.diff(t)
        ok = dt > 1e-9
        smax = max(smax, float(np.max(np.abs(np.diff(g)[ok] / dt[ok]))))
    return gmax, smax


def _b_numeric(
    seq: pp.Sequence, t_exc: float, t_ref: float, t_echo: float
) -> tuple[float, np.ndarray]:
    """b (s/mm2) = (2 pi)^2 int |k|^2 dt from the gradient waveforms, k flipped at the 180.

    Also returns the dephasing vector k (1/m) just before the refocusing pulse.
    """
    waves = seq.waveforms()[:3]
    grids = [np.linspace(t_exc, t_ref, 40001), np.linspace(t_ref, t_echo, 40001)]
    k_start = np.zeros(3)
    total = 0.0
    k_before_ref = np.zeros(3)
    for part, t in enumerate(grids):
        g = np.stack([np.interp(t, w[0], w[1], left=0.0, right=0.0) for w in waves])
        dt = np.diff(t)
        k = k_start[:, None] + np.concatenate(
            [np.zeros((3, 1)), np.cumsum((g[:, 1:] + g[:, :-1]) / 2 * dt, axis=1)], axis=1
        )
        k2 = np.sum(k**2, axis=0)
        total += float(np.sum((k2[1:] + k2[:-1]) / 2 * dt))
        if part == 0:
            k_before_ref = k[:, -1].copy()
            k_start = -k[:, -1]  # the 180 pulse inverts the accumulated phase
    return (2 * math.pi) ** 2 * total * 1e-6, k_before_ref


# --------------------------------------------------------------------------------------
# Gradient-echo EPI
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def epi_prisma() -> tuple:
    protocol = _epi()
    scanner = load_scanner("siemens-prisma")
    return protocol, scanner, build_epi(protocol, scanner)


def test_epi_kspace_grid_labels_and_polarity(epi_prisma) -> None:
    protocol, _, seq = epi_prisma
    nx, ny = protocol.matrix
    dkx, dky = 1 / FOV[0], 1 / FOV[1]
    k_adc, _, _, _, _ = seq.calculate_kspace()
    labels = seq.evaluate_labels(evolution="adc")
    n_adc = len(labels["LIN"])
    n_nav = protocol.navigator_lines
    # One volume with ADC: per slice navigators + ny lines, none in the dummy volume.
    assert n_adc == protocol.n_slices * (n_nav + ny)
    assert np.sum(labels["NAV"]) == protocol.n_slices * n_nav
    kx = k_adc[0].reshape(n_adc, nx)
    ky = k_adc[1].reshape(n_adc, nx)
    grid = (np.arange(nx) - nx // 2) * dkx
    for i in range(n_adc):
        rev = labels["REV"][i] == 1
        # Reversed lines run from +kx to -kx: flipping the samples gives the FFT grid.
        expected = grid[::-1] if rev else grid
        np.testing.assert_allclose(kx[i], expected, atol=1e-3 * dkx)
        assert np.ptp(ky[i]) < 1e-6 * dky  # no blip under the flat-top ADC
        np.testing.assert_allclose(ky[i], (labels["LIN"][i] - ny // 2) * dky, atol=1e-3 * dky)
    # Polarity alternates from line to line within each shot.
    per_slice = n_nav + ny
    rev = labels["REV"].reshape(protocol.n_slices, per_slice)
    assert np.all(np.abs(np.diff(rev, axis=1)) == 1)
    lin = labels["LIN"].reshape(protocol.n_slices, per_slice)
    nav = labels["NAV"].reshape(protocol.n_slices, per_slice)
    assert np.all(nav[:, :n_nav] == 1) and np.all(nav[:, n_nav:] == 0)
    assert np.all(lin[:, n_nav:] == np.arange(ny))  # linear, bottom-up
    np.testing.assert_array_equal(labels["SLC"].reshape(protocol.n_slices, per_slice)[:, 0],
                                  np.arange(protocol.n_slices))
    # Navigators are not phase encoded (same ky) and never touch the k-space centre.
    nav_rows = labels["NAV"] == 1
    assert np.ptp(ky[nav_rows]) < 1e-6 * dky
    assert np.min(np.hypot(kx[nav_rows], ky[nav_rows])) > 0.5 * dky
    # The centre line is read on the positive polarity.
    centre = (labels["NAV"] == 0) & (labels["LIN"] == ny // 2)
    assert np.all(labels["REV"][centre] == 0)


def test_epi_te_tr_echo_spacing_bandwidth(epi_prisma) -> None:
    protocol, _scanner, seq = epi_prisma
    timing = measure_timing(seq)
    assert timing.te_s == pytest.approx(protocol.te_ms * 1e-3, rel=0.01)
    assert timing.tr_s == pytest.approx(protocol.tr_ms * 1e-3, rel=0.01)
    assert timing.te_s == pytest.approx(_definition_list(seq, "TE")[0], abs=1e-6)
    assert timing.tr_s == pytest.approx(float(seq.definitions["TR"]), abs=1e-6)
    blocks = _adc_blocks(seq)
    # Echo spacing: time between successive ADC centres of one shot.
    starts = np.array([t0 + b.adc.delay + b.adc.num_samples * b.adc.dwell / 2 for t0, b in blocks])
    per_slice = protocol.navigator_lines + protocol.matrix[1]
    esp = np.diff(starts[:per_slice])
    assert np.ptp(esp[protocol.navigator_lines:]) < 1e-9
    assert esp[-1] == pytest.approx(float(seq.definitions["EchoSpacing"]), abs=1e-9)
    adc = blocks[0][1].adc
    bw = 1 / (adc.num_samples * adc.dwell)
    assert bw == pytest.approx(float(seq.definitions["ReadoutBandwidth"]), rel=1e-9)
    assert bw == pytest.approx(protocol.readout_bandwidth_hz_per_px, rel=0.05)
    assert int(seq.definitions["RampSampling"]) == 0
    # Flat-top sampling: the readout gradient is constant over every ADC.
    gx = blocks[0][1].gx
    assert adc.delay >= gx.rise_time - 1e-9
    assert adc.delay + adc.num_samples * adc.dwell <= gx.rise_time + gx.flat_time + 1e-9
    # One excitation per slice per volume (dummy + imaging volume), no other RF.
    events = rf_events(seq)
    assert [e.use for e in events] == ["excitation"] * (2 * protocol.n_slices)


def test_epi_gradient_limits_all_scanners() -> None:
    protocol = _epi(navigator_lines=2, n_slices=1)
    for name in list_scanners():
        scanner = load_scanner(name)
        seq = build_epi(protocol, scanner)
        ok, report = seq.check_timing()
        assert ok, (name, report[:3])
        gmax, smax = _max_grad_and_slew(seq)
        assert gmax <= scanner.max_grad_hz_per_m * (1 + 1e-6), name
        assert smax <= scanner.max_slew_hz_per_m_per_s * (1 + 1e-6), name
        timing = measure_timing(seq)
        assert timing.te_s == pytest.approx(_definition_list(seq, "TE")[0], abs=1e-6), name


def test_epi_ramp_sampling() -> None:
    protocol = _epi(ramp_sampling=True, navigator_lines=1, readout_oversampling=2)
    nx, ny = protocol.matrix
    ns = 2 * nx
    flat_scanner = load_scanner("siemens-freemax")
    flat = build_epi(_epi(navigator_lines=1, readout_oversampling=2), flat_scanner)
    for name in ("siemens-freemax", "siemens-prisma"):
        seq = build_epi(protocol, load_scanner(name))
        assert int(seq.definitions["RampSampling"]) == 1
        blocks = _adc_blocks(seq)
        gx, adc = blocks[-1][1].gx, blocks[-1][1].adc
        # The ADC starts on the ramp-up and ends on the ramp-down.
        assert adc.delay < gx.rise_time
        assert adc.delay + adc.num_samples * adc.dwell > gx.rise_time + gx.flat_time
        k_adc = seq.calculate_kspace()[0]
        labels = seq.evaluate_labels(evolution="adc")
        kx = k_adc[0].reshape(-1, ns)
        steps = np.abs(np.diff(kx[-1]))
        assert np.ptp(steps) > 0.1 * np.mean(steps)  # non-uniform sampling
        # The ADC window still spans nx / fov, and the centre sample is at kx = 0.
        img = labels["NAV"] == 0
        assert np.ptp(kx[img], axis=1) == pytest.approx(
            (nx / FOV[0]) * (ns - 1) / ns, rel=0.05
        )
        centre = img & (labels["LIN"] == ny // 2)
        assert np.abs(kx[centre][0, ns // 2]) < 1e-6 / FOV[0]
        timing = measure_timing(seq)
        assert timing.te_s == pytest.approx(protocol.te_ms * 1e-3, rel=0.01)
        if name == "siemens-freemax":
            assert float(seq.definitions["EchoSpacing"]) < float(flat.definitions["EchoSpacing"])


def test_epi_refusals() -> None:
    scanner = load_scanner("siemens-prisma")
    with pytest.raises(ProtocolError, match=r"te_ms: TE 5 ms is below the minimum .*prisma"):
        build_epi(_epi(te_ms=5), scanner)
    with pytest.raises(ProtocolError, match="readout_bandwidth_hz_per_px"):
        build_epi(_epi(readout_bandwidth_hz_per_px=20000, matrix=[256, 32], fov_mm=[120, 120],
                       te_ms=100), load_scanner("siemens-freemax"))
    with pytest.raises(ProtocolError, match="readout_bandwidth_hz_per_px"):
        build_epi(_epi(readout_bandwidth_hz_per_px=20000, matrix=[1024, 8], te_ms=100), scanner)
    with pytest.raises(ProtocolError, match="tr_ms: TR 20 ms is below the minimum"):
        build_epi(_epi(tr_ms=20), scanner)


def test_epi_minimum_te_is_exact() -> None:
    scanner = load_scanner("ge-signa-premier")
    with pytest.raises(ProtocolError, match="te_ms") as info:
        build_epi(_epi(te_ms=1), scanner)
    te_min = float(re.search(r"minimum ([0-9.]+) ms", str(info.value)).group(1))
    seq = build_epi(_epi(te_ms=te_min + 0.01), scanner)
    assert measure_timing(seq).te_s == pytest.approx(te_min * 1e-3, rel=0.01)


# --------------------------------------------------------------------------------------
# Diffusion-weighted spin-echo EPI
# --------------------------------------------------------------------------------------


def test_diffusion_directions_well_distributed() -> None:
    for n in (1, 3, 6, 12, 30):
        u = diffusion_directions(n)
        assert u.shape == (n, 3)
        np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-12)
        assert np.all(u[:, 2] >= -1e-12)
        np.testing.assert_array_equal(u, diffusion_directions(n))  # deterministic
        if n > 1:
            cos = np.abs(u @ u.T)[~np.eye(n, dtype=bool)]
            min_angle = math.degrees(math.acos(min(1.0, float(np.max(cos)))))
            # Energy minima of n antipodal pairs: 3 orthogonal axes (90 deg), the 6
            # icosahedron axes (63.43 deg); well spread (~ 3.8 / sqrt(n) rad) beyond.
            expected = {3: 89.5, 6: 63.4, 12: 39.5, 30: 25.0}[n]
            assert min_angle >= expected, (n, min_angle)


def test_stejskal_tanner_rectangular_limit() -> None:
    g = 1e6  # Hz/m
    b = stejskal_tanner_b(g, 0.02, 0.04, 0.0)
    assert b == pytest.approx((2 * math.pi * g) ** 2 * 0.02**2 * (0.04 - 0.02 / 3) * 1e-6)


@pytest.fixture(scope="module")
def dwi_prisma() -> tuple:
    protocol = _dwi()
    scanner = load_scanner("siemens-prisma")
    return protocol, scanner, build_dwi_epi(protocol, scanner)


def test_dwi_b_values_numeric_and_directions(dwi_prisma) -> None:
    protocol, _scanner, seq = dwi_prisma
    events = rf_events(seq)
    exc = [e.t_center for e in events if e.use == "excitation"]
    ref = [e.t_center for e in events if e.use == "refocusing"]
    n_enc = 1 + 2 * protocol.n_directions
    assert len(exc) == len(ref) == n_enc * protocol.n_slices
    te = measure_timing(seq).te_s
    b_def = _definition_list(seq, "BValues")
    dirs = _definition_list(seq, "DiffusionDirections").reshape(-1, 3)
    assert b_def.tolist() == [0.0] + [500.0] * 3 + [1000.0] * 3
    np.testing.assert_allclose(dirs[1:4], diffusion_directions(3))
    np.testing.assert_allclose(dirs[4:], diffusion_directions(3))
    k_imaging = None
    for i in range(n_enc):
        # The 180 pulse sits at TE/2 (to within a raster).
        assert ref[i] - exc[i] == pytest.approx(te / 2, abs=10e-6)
        b_num, k_pre = _b_numeric(seq, exc[i], ref[i], exc[i] + te)
        if b_def[i] == 0:
            assert b_num < 2.0
            k_imaging = k_pre  # slice rephaser, crusher and half the 180 select gradient
        else:
            assert b_num == pytest.approx(b_def[i], rel=0.02), i
            # The diffusion moment (first lobe) points along the encoding direction.
            k_diff = k_pre - k_imaging
            cos = np.dot(k_diff, dirs[i]) / np.linalg.norm(k_diff)
            assert cos > 0.9999, i
    labels = seq.evaluate_labels(evolution="adc")
    per_enc = protocol.navigator_lines + protocol.matrix[1]
    np.testing.assert_array_equal(labels["SET"], np.repeat(np.arange(n_enc), per_enc))


def test_dwi_analytic_b_at_full_gradient_and_gradient_limits(dwi_prisma) -> None:
    _protocol, scanner, seq = dwi_prisma
    gmax, smax = _max_grad_and_slew(seq)
    assert gmax <= scanner.max_grad_hz_per_m * (1 + 1e-6)
    assert smax <= scanner.max_slew_hz_per_m_per_s * (1 + 1e-6)
    # At the TE the b-value error message names, the lobes run at the scanner maximum.
    with pytest.raises(ProtocolError, match="b_values_s_per_mm2") as info:
        build_dwi_epi(_dwi(b_values_s_per_mm2=[0, 5000], te_ms=60), scanner)
    msg = str(info.value)
    b_max = float(re.search(r"maximum ([0-9.]+) s/mm2", msg).group(1)) - 1
    te_need = float(re.search(r"needs TE >= ([0-9.]+) ms", msg).group(1))
    assert te_need > 60
    assert "TE 60 ms" in msg and "siemens-prisma" in msg
    # The maximum reported for TE 60 is consistent with the waveform actually built at it.
    seq_max = build_dwi_epi(
        _dwi(b_values_s_per_mm2=[b_max], n_directions=1, te_ms=60), scanner
    )
    t_exc, t_ref = (e.t_center for e in rf_events(seq_max)[:2])
    b_num, _ = _b_numeric(seq_max, t_exc, t_ref, t_exc + measure_timing(seq_max).te_s)
    assert b_num == pytest.approx(b_max, rel=0.02)
    g_seq, _ = _max_grad_and_slew(seq_max)
    assert g_seq == pytest.approx(scanner.max_grad_hz_per_m, rel=0.01)  # z lobe at max
    # And the TE it says is needed reaches the b-value.
    seq_need = build_dwi_epi(_dwi(b_values_s_per_mm2=[0, 5000], te_ms=te_need,
                                  n_directions=1), scanner)
    assert _definition_list(seq_need, "BValues").tolist() == [0.0, 5000.0]


def test_dwi_te_tr_on_freemax_and_refusals() -> None:
    scanner = load_scanner("siemens-freemax")
    protocol = _dwi(b_values_s_per_mm2=[0, 800], n_directions=1, te_ms=130, tr_ms=500,
                    navigator_lines=0)
    seq = build_dwi_epi(protocol, scanner)
    timing = measure_timing(seq)
    assert timing.te_s == pytest.approx(0.13, rel=0.01)
    assert timing.tr_s == pytest.approx(0.5, rel=0.01)
    assert "NAV" not in seq.evaluate_labels(evolution="adc") or not np.any(
        seq.evaluate_labels(evolution="adc")["NAV"]
    )
    with pytest.raises(ProtocolError, match=r"b_values_s_per_mm2: b = 10000 s/mm2 .*needs TE >="):
        build_dwi_epi(_dwi(b_values_s_per_mm2=[0, 10000], te_ms=130), scanner)
    with pytest.raises(ProtocolError, match="te_ms: TE 20 ms is below the minimum"):
        build_dwi_epi(_dwi(te_ms=20), scanner)
    with pytest.raises(ProtocolError, match="tr_ms"):
        build_dwi_epi(_dwi(te_ms=130, tr_ms=100), scanner)


@pytest.mark.parametrize("name", ["epi", "dwi_epi"])
def test_examples_build_on_every_scanner(name: str, examples_dir) -> None:
    protocol = load_protocol(examples_dir / f"{name}.toml")
    build = build_epi if name == "epi" else build_dwi_epi
    for scanner_name in list_scanners():
        seq = build(protocol, load_scanner(scanner_name))
        te = _definition_list(seq, "TE")[0]
        assert te == pytest.approx(protocol.te_ms * 1e-3, rel=0.01), scanner_name
        assert float(seq.definitions["TR"]) == pytest.approx(protocol.tr_ms * 1e-3, rel=0.01)
        scanner = load_scanner(scanner_name)
        gmax, smax = _max_grad_and_slew(seq)
        assert gmax <= scanner.max_grad_hz_per_m * (1 + 1e-6), scanner_name
        assert smax <= scanner.max_slew_hz_per_m_per_s * (1 + 1e-6), scanner_name


def test_dwi_epi_lives_in_diffusion_and_old_imports_resolve() -> None:
    """Builder ``dwi_epi`` is ``diffusion.build_dwi_epi``; ``epi`` still resolves the old names."""
    from mrharmony.sequences.builders import diffusion, epi, get_builder

    assert get_builder("dwi_epi") is diffusion.build_dwi_epi
    assert get_builder("epi") is epi.build_epi
    for name in ("build_dwi_epi", "diffusion_directions", "stejskal_tanner_b"):
        assert getattr(epi, name) is getattr(diffusion, name)
    with pytest.raises(AttributeError):
        epi.no_such_name  # noqa: B018
