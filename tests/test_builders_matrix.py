"""Every example protocol on every scanner profile: the acceptance matrix.

For each (protocol, scanner) pair the built sequence must read back identically, pass
pypulseq's timing check on that scanner's rasters, stay within its gradient amplitude
and slew limits, hit the requested TE/TR/TI within 1 % (measured independently from
the RF events and the k-space trajectory), and cover the requested k-space.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mrharmony.sequences import build, list_scanners, load_protocol, load_scanner, read_seq
from mrharmony.sequences.check import check_sequence
from mrharmony.sequences.io import write_seq

from conftest import EXAMPLES
from seqtools import measure_timing

PROTOCOL_FILES = sorted(EXAMPLES.glob("*.toml"))
SCANNERS = list_scanners()


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]




def test_every_builder_has_an_example():
    from mrharmony.sequences import BUILDERS

    assert {load_protocol(p).builder for p in PROTOCOL_FILES} == set(BUILDERS)


@pytest.mark.parametrize("scanner", SCANNERS)
@pytest.mark.parametrize("protocol_path", PROTOCOL_FILES, ids=_ids(PROTOCOL_FILES))
def test_example_builds_within_limits(protocol_path: Path, scanner: str, tmp_path: Path):
    protocol = load_protocol(protocol_path)
    profile = load_scanner(scanner)
    seq = build(protocol, profile)

    # Round trip through the file: same blocks, same duration.
    path = write_seq(seq, tmp_path / f"{protocol.builder}.seq")
    back = read_seq(path, profile)
    duration, n_blocks, _ = seq.duration()
    duration_back, n_blocks_back, _ = back.duration()
    assert n_blocks_back == n_blocks
    assert duration_back == pytest.approx(duration, abs=1e-9)

    report = check_sequence(back, profile)
    assert report.timing_ok, report.timing_errors[:3]
    assert max(report.usage.max_grad_mt_per_m) <= profile.max_grad_mt_per_m * (1 + 1e-6)
    assert max(report.usage.max_slew_t_per_m_per_s) <= profile.max_slew_t_per_m_per_s * (
        1 + 1e-6
    )
    assert report.usage.max_jump_mt_per_m < profile.max_slew_t_per_m_per_s * (
        profile.grad_raster_time_us * 1e-6
    ) * 1e3 + 1e-6

    # Timing measured from RF events and k-space, not from the definitions.
    timing = measure_timing(seq)
    assert timing.te_s * 1e3 == pytest.approx(protocol.te_ms, rel=0.01)
    assert timing.tr_s * 1e3 == pytest.approx(protocol.tr_ms, rel=0.01)
    ti = getattr(protocol, "ti_ms", None)
    if ti is not None:
        expected = sorted(np.atleast_1d(ti))
        assert len(timing.ti_s) == len(expected)
        np.testing.assert_allclose(np.array(timing.ti_s) * 1e3, expected, rtol=0.01)
    # The definitions agree with what was measured.
    assert float(np.atleast_1d(seq.definitions["TE"])[0]) == pytest.approx(timing.te_s, rel=0.01)
    assert float(np.atleast_1d(seq.definitions["TR"])[0]) == pytest.approx(timing.tr_s, rel=0.01)


def _unique_sorted(values: np.ndarray, tol: float) -> np.ndarray:
    v = np.sort(values)
    keep = np.concatenate([[True], np.diff(v) > tol])
    return v[keep]


@pytest.mark.parametrize("scanner", ["siemens-prisma", "ge-discovery-mr750", "siemens-freemax"])
@pytest.mark.parametrize("protocol_path", PROTOCOL_FILES, ids=_ids(PROTOCOL_FILES))
def test_example_covers_requested_kspace(protocol_path: Path, scanner: str):
    protocol = load_protocol(protocol_path)
    seq = build(protocol, scanner)
    k_adc, *_ = seq.calculate_kspace()
    fov = np.asarray(protocol.fov_mm) * 1e-3
    n = np.asarray(protocol.matrix)
    dk = 1 / fov
    if not protocol.cartesian:
        radius = np.linalg.norm(k_adc[:2], axis=0)
        assert radius.max() >= 0.99 * n[0] / (2 * fov[0])
        assert radius.min() <= 0.5 * dk[0]
        return
    os_ = protocol.readout_oversampling
    ky = _unique_sorted(k_adc[1], 0.01 * dk[1])
    np.testing.assert_allclose(ky, (np.arange(n[1]) - n[1] // 2) * dk[1], atol=0.01 * dk[1])
    if protocol.ndim == 3:
        kz = _unique_sorted(k_adc[2], 0.01 * dk[2])
        np.testing.assert_allclose(kz, (np.arange(n[2]) - n[2] // 2) * dk[2], atol=0.01 * dk[2])
    else:
        assert np.max(np.abs(k_adc[2])) < 0.01 * dk[0]
    if int(np.atleast_1d(seq.definitions.get("RampSampling", 0))[0]) == 1:
        assert k_adc[0].min() <= -(n[0] // 2) * dk[0] * 0.99
        return
    kx = _unique_sorted(k_adc[0], 0.01 * dk[0] / os_)
    expected = (np.arange(n[0] * os_) - n[0] * os_ // 2) * dk[0] / os_
    np.testing.assert_allclose(kx, expected, atol=0.01 * dk[0] / os_)
