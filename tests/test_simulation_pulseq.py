"""The Pulseq reader: every version and extension, against pypulseq and analytic cases.

Reference: pypulseq 1.5.0.post1 (run inside the tests) for every file it can read; the
ROTATIONS file it cannot read is checked against the same sequence written with explicitly
rotated gradients, and analytically.
"""

from __future__ import annotations

import hashlib
import tomllib
import warnings
from pathlib import Path

import numpy as np
import pypulseq as pp
import pytest
from pypulseq.compress_shape import compress_shape
from pypulseq.decompress_shape import decompress_shape as pp_decompress_shape

from mrharmony.errors import SequenceFileError
from mrharmony.formats.pulseq import PulseqSequence, quaternion_to_matrix, read_pulseq
from mrharmony.formats.pulseq_parse import decompress_shape

from conftest import CORPUS, EXAMPLES

CORPUS_FILES = sorted(CORPUS.glob("*.seq")) if CORPUS.is_dir() else []
needs_corpus = pytest.mark.skipif(not CORPUS_FILES, reason="shared/pulseq-corpus is absent")


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------
def _pypulseq(path: Path, ours: PulseqSequence) -> pp.Sequence:
    """pypulseq's reading of ``path`` (its version warnings silenced).

    pypulseq 1.5.0 drops the RF use it infers for files before v1.5 (its library ``type``
    is empty after ``remove_duplicates``), so every pulse would count as an excitation. We
    hand it the uses; the uses themselves are checked separately (flip angles).
    """
    seq = pp.Sequence()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seq.read(str(path))
    if ours.version < (1, 5, 0):
        for rid, rf in ours._rf.items():
            seq.rf_library.type[rid] = rf.use[0]
        seq.block_cache.clear()
    return seq


def _jump_times(ours: PulseqSequence) -> np.ndarray:
    """Absolute times where our gradient waveform is discontinuous (left != right)."""
    t, g = ours.gradient_waveforms_concat()
    dup = np.flatnonzero((np.diff(t) == 0) & np.any(np.abs(np.diff(g, axis=0)) > 1e-6, axis=1))
    return t[dup]


def _compare_with_pypulseq(path: Path, *, k_rel_tol: float = 1e-5) -> None:
    ours = read_pulseq(path)
    ref = _pypulseq(path, ours)

    # block durations: exact up to float rounding
    durations = np.array(list(ref.block_durations.values()))
    np.testing.assert_allclose([b.duration_s for b in ours.blocks], durations, rtol=0, atol=1e-12)
    assert ours.duration_s == pytest.approx(sum(durations), abs=1e-9)

    # ADC: count and sample times (pypulseq: delay + (i + 0.5) dwell)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k_ref, _, t_exc, t_ref, t_adc = ref.calculate_kspace()
    assert ours.num_adc_samples == t_adc.size
    np.testing.assert_allclose(ours.adc_sample_times(), t_adc, rtol=0, atol=1e-10)

    # k-space at every ADC sample. Tolerance: 1e-5 of k_max by default, because pypulseq's
    # remove_duplicates rounds event amplitudes to 6 significant digits (we keep the file's
    # values), plus g_max * 2e-10 s, because pypulseq rounds event times to 1e-10 s before
    # resetting k at an excitation; files whose gradients jump between blocks get more, as
    # pypulseq's waveform ramps across the jump.
    k = ours.kspace_at_adc()
    if t_adc.size:
        g_max = np.abs(ours.gradient_waveforms_concat()[1]).max()
        tol = k_rel_tol * np.abs(k_ref).max() + 2e-10 * g_max + 1e-9
        assert np.abs(k - k_ref.T).max() <= tol

    # RF timing: excitation/refocusing centres (pypulseq's rf_times)
    t_rf, _, uses = ours.rf_times()
    exc = np.array([u in ("excitation", "undefined") for u in uses], bool)
    np.testing.assert_allclose(t_rf[exc], t_exc, atol=1e-10)
    np.testing.assert_allclose(t_rf[np.array([u == "refocusing" for u in uses], bool)],
                               t_ref, atol=1e-10)

    # gradient waveforms inside every pypulseq segment (avoid its breakpoints and our jumps)
    jumps = _jump_times(ours)
    waves = ref.waveforms()
    for axis in range(3):
        tw, gw = waves[axis][0], np.real(waves[axis][1])
        if tw.size < 2:
            continue
        keep = np.diff(tw) > 1e-9
        lo, hi = tw[:-1][keep], tw[1:][keep]
        if jumps.size:
            near = np.searchsorted(jumps, lo - 1e-9)
            touching = (near < jumps.size) & (jumps[np.minimum(near, jumps.size - 1)] <= hi + 1e-9)
            lo, hi = lo[~touching], hi[~touching]
        for frac in (0.25, 0.5, 0.75):
            tq = lo + frac * (hi - lo)
            expected = np.interp(tq, tw, gw)
            got = ours.waveform_at(tq)[:, axis]
            # 5e-6 of the gradient maximum: pypulseq rounds amplitudes to 6 significant digits
            assert np.abs(got - expected).max() <= 5e-6 * np.abs(gw).max() + 1e-6


def _labels_vs_pypulseq(path: Path) -> None:
    ours = read_pulseq(path)
    ref = _pypulseq(path, ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref_labels = ref.evaluate_labels(evolution="adc")
    records = ours.adc_records()
    for name, values in ref_labels.items():
        np.testing.assert_array_equal([r.labels[name] for r in records], values, err_msg=name)


# ------------------------------------------------------------------------------------------
# the public corpus
# ------------------------------------------------------------------------------------------
@needs_corpus
@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.stem for p in CORPUS_FILES])
def test_every_corpus_file_loads(path: Path):
    seq = read_pulseq(path)
    assert len(seq.blocks) > 0 and seq.duration_s > 0
    assert seq.signature_ok in (True, None)
    k = seq.kspace_at_adc()
    assert k.shape == (seq.num_adc_samples, 3) and np.all(np.isfinite(k))
    # block start times tile the sequence
    starts = np.array([b.start_s for b in seq.blocks])
    durations = np.array([b.duration_s for b in seq.blocks])
    np.testing.assert_allclose(starts[1:], np.cumsum(durations)[:-1], atol=1e-9)
    area = np.zeros(3)
    for block in seq.blocks:
        t, g = block.gradient_waveform()
        assert t[0] == 0 and t[-1] == pytest.approx(block.duration_s, abs=1e-12)
        assert g.shape == (t.size, 3) and np.all(np.diff(t) >= 0)
        area += 0.5 * np.sum(np.diff(t)[:, None] * (g[1:] + g[:-1]), axis=0)
    # the whole-sequence waveform is the blocks' waveforms laid end to end
    t, g = seq.gradient_waveforms_concat()
    total = 0.5 * np.sum(np.diff(t)[:, None] * (g[1:] + g[:-1]), axis=0)
    np.testing.assert_allclose(total, area, rtol=1e-9, atol=1e-9 * (1 + np.abs(g).max()))


PYPULSEQ_READABLE = ["01_pulseq_epi_rs", "02_mrphys_se_2D_sms_spr", "04_skope_spiral_2d_TRA_AP",
                     "11_koma_v12_radial_JEMRIS"]


@needs_corpus
@pytest.mark.parametrize("stem", PYPULSEQ_READABLE)
def test_corpus_matches_pypulseq(stem: str):
    path = CORPUS / f"{stem}.seq"
    # 04 (v1.4.1, MATLAB): its spirals end off zero; pypulseq ramps across the jump to the
    # next block, which moves k by < 1e-4 of k_max.
    _compare_with_pypulseq(path, k_rel_tol=1e-4 if stem.startswith("04") else 1e-5)


@needs_corpus
def test_corpus_labels_and_extensions_match_pypulseq():
    _labels_vs_pypulseq(CORPUS / "01_pulseq_epi_rs.seq")
    seq = read_pulseq(CORPUS / "01_pulseq_epi_rs.seq")
    # soft delays: both TE delays of one TR give the same TE (value = (D - offset) * factor)
    te = {round(b.soft_delay.default_value, 9) for b in seq.blocks
          if b.soft_delay is not None and b.soft_delay.hint == "TE"}
    assert len(te) == 1
    assert any(b.triggers for b in seq.blocks)


@needs_corpus
def test_rf_use_inferred_from_flip_angle_for_old_files():
    # v1.4 spin echo: 90-degree-class SMS excitation and a 180-degree refocusing pulse
    seq = read_pulseq(CORPUS / "02_mrphys_se_2D_sms_spr.seq")
    by_use = {rf.use: rf.flip_angle_deg() for rf in seq._rf.values()}
    assert set(by_use) == {"excitation", "refocusing"}
    assert by_use["refocusing"] == pytest.approx(180.0, abs=0.1)


@needs_corpus
def test_rotation_extension_equals_explicit_rotation():
    """08 (v1.5.1 ROTATIONS, unreadable by pypulseq) equals the same radial readouts
    written with the rotation applied to the gradients by hand."""
    rotated = read_pulseq(CORPUS / "08_koma_v15_rotation_radial_tiny.seq")
    angles = [0.0, 45.0, 90.0, 45.0, 0.0]
    # the file stores the quaternion with 6 digits: compare to 2e-6
    np.testing.assert_allclose(rotated.blocks[1].rotation,
                               quaternion_to_matrix([np.cos(np.pi / 8), 0, 0, np.sin(np.pi / 8)]),
                               atol=2e-6)
    amp = 1000.0
    traps = []
    blocks = []
    for i, a in enumerate(angles):
        gx, gy = amp * np.cos(np.radians(a)), amp * np.sin(np.radians(a))
        traps.append(f"{2 * i + 1} {gx:.12g} 100 200 100 0\n{2 * i + 2} {gy:.12g} 100 200 100 0")
        blocks.append(f"{i + 1} 40 0 {2 * i + 1} {2 * i + 2} 0 1 0")
    text = (
        "[VERSION]\nmajor 1\nminor 5\nrevision 1\n\n[DEFINITIONS]\nAdcRasterTime 1e-07\n"
        "BlockDurationRaster 1e-05\nGradientRasterTime 1e-05\nRadiofrequencyRasterTime 1e-06\n\n"
        "[BLOCKS]\n" + "\n".join(blocks) + "\n\n[TRAP]\n" + "\n".join(traps) + "\n\n"
        "[ADC]\n1 8 25000 100 0 0 0 0 0\n"
    )
    explicit = read_pulseq(text)
    # k up to 0.6 / m; 6-digit quaternions -> 2e-6 relative
    np.testing.assert_allclose(rotated.kspace_at_adc(), explicit.kspace_at_adc(), atol=2e-6)
    t1, g1 = rotated.gradient_waveforms_concat()
    t2, g2 = explicit.gradient_waveforms_concat()
    np.testing.assert_allclose(t1, t2, atol=1e-15)
    np.testing.assert_allclose(g1, g2, atol=2e-6 * amp)
    # analytic: no RF, so k accumulates; block 2 sample 0 = area of block 1 along x + the
    # partial area of a 45-degree trapezoid from 0 to 112.5 us (ramp 100 us, then flat)
    area = amp * 300e-6
    t = 100e-6 + 12.5e-6
    partial = amp * (50e-6 + (t - 100e-6))
    direction = np.array([np.cos(np.pi / 4), np.sin(np.pi / 4), 0])
    expected = np.array([area, 0, 0]) + partial * direction
    np.testing.assert_allclose(rotated.kspace_at_adc()[8], expected, atol=2e-6)


# ------------------------------------------------------------------------------------------
# the project's own sequences
# ------------------------------------------------------------------------------------------
BUILT = {
    "gre2d": {"matrix": [32, 32], "n_slices": 2, "dummy_scans": 2},
    "epi": {"matrix": [32, 32]},
    "spiral": {"n_interleaves": 8},
    "mese": {"matrix": [32, 32], "n_slices": 1},
}


@pytest.mark.parametrize("name", list(BUILT))
def test_built_sequences_match_pypulseq(name: str, tmp_path: Path):
    from mrharmony.sequences.io import build_file
    from mrharmony.sequences.protocol import protocol_from_mapping

    data = tomllib.loads((EXAMPLES / f"{name}.toml").read_text())
    data.update(BUILT[name])
    _, path = build_file(protocol_from_mapping(data), "siemens-prisma", tmp_path / f"{name}.seq")
    _compare_with_pypulseq(path)
    _labels_vs_pypulseq(path)
    seq = read_pulseq(path)
    assert seq.signature_ok is True
    names, table = seq.labels_table()  # the vectorised view agrees with the records
    for rec in seq.adc_records()[::7]:
        assert dict(zip(names, table[rec.block_index - 1].tolist(), strict=True)) == rec.labels


# ------------------------------------------------------------------------------------------
# format versions and extensions on small synthetic files
# ------------------------------------------------------------------------------------------
_DEFS = ("[DEFINITIONS]\nAdcRasterTime 1e-07\nBlockDurationRaster 1e-05\n"
         "GradientRasterTime 1e-05\nRadiofrequencyRasterTime 1e-06\n\n")


def test_v13_legacy_delays_and_durations():
    text = (
        "[VERSION]\nmajor 1\nminor 3\nrevision 1\n\n"
        "[BLOCKS]\n1 0 1 0 0 1 0 0\n2 1 0 0 0 0 0 0\n3 0 0 2 0 0 1 0\n\n"
        "[RF]\n1 250 1 2 100 0 0\n\n"
        "[TRAP]\n1 1000 100 1000 100 0\n2 2000 200 3000 200 50\n\n"
        "[ADC]\n1 64 20000 150 0 0\n\n[DELAYS]\n1 5000\n\n"
        "[SHAPES]\nshape_id 1\nnum_samples 1000\n1\n0\n0\n997\n\n"
        "shape_id 2\nnum_samples 1000\n0\n0\n998\n"
    )
    seq = read_pulseq(text)
    assert seq.version == (1, 3, 1)
    # block 1: RF 100 us delay + 1 ms shape vs trapezoid 1.2 ms -> 1.2 ms
    # block 2: [DELAYS] 5 ms; block 3: gradient 50 + 3400 us vs ADC 150 + 1280 us
    np.testing.assert_allclose([b.duration_s for b in seq.blocks], [1.2e-3, 5e-3, 3.45e-3],
                               atol=1e-12)
    rf = seq.blocks[0].rf
    assert rf.use == "excitation"  # 250 Hz * 1 ms = 90 degrees -> below 90.01
    assert rf.flip_angle_deg() == pytest.approx(90.0, abs=1e-9)
    assert rf.center_s == pytest.approx(100e-6 + 0.5e-3, abs=1e-9)  # block pulse centre
    assert rf.t_s[0] == pytest.approx(100e-6 + 0.5e-6)


def test_v12_seven_columns_and_arbitrary_first_last_restored():
    # v1.2: no extension column; arbitrary gradient 1 ends at 1 (last extrapolated to 1.0)
    # and gradient 2 continues from it (first restored from the previous block)
    text = (
        "[VERSION]\nmajor 1\nminor 2\nrevision 1\n\n"
        "[BLOCKS]\n1 0 0 1 0 0 0\n2 0 0 2 0 0 0\n\n"
        "[GRADIENTS]\n1 1000 1 0\n2 1000 2 0\n\n"
        "[SHAPES]\nshape_id 1\nnum_samples 10\n0.05\n0.1\n0.1\n7\n\n"
        "shape_id 2\nnum_samples 10\n0.95\n-0.1\n-0.1\n7\n"
    )
    seq = read_pulseq(text)
    g1, g2 = seq.blocks[0].gx, seq.blocks[1].gx
    assert g1.first_hz_per_m == 0.0 and g1.last_hz_per_m == pytest.approx(1000.0)
    assert g2.first_hz_per_m == pytest.approx(1000.0) and g2.last_hz_per_m == pytest.approx(0)
    # a triangle 0 -> 1000 -> 0 Hz/m over 2 x 100 us: area 0.1 / m
    t, g = seq.gradient_waveforms_concat()
    assert 0.5 * np.sum(np.diff(t) * (g[1:, 0] + g[:-1, 0])) == pytest.approx(0.1, rel=1e-9)


def test_v15_extensions_rf_fields_and_unknown_extension():
    text = (
        "[VERSION]\nmajor 1\nminor 5\nrevision 1\n\n" + _DEFS.replace(
            "\n\n", "\nRequiredExtensions ROTATIONS RF_SHIMS\n\n") +
        "[BLOCKS]\n1 100 1 0 0 1 0 1\n2 0 0 0 0 0 0 3\n3 200 0 2 0 0 1 4\n4 50 0 0 0 0 0 5\n\n"
        "[RF]\n1 500 1 2 0 300 100 -3.45 0.1 10 0.5 e\n\n"
        "[GRADIENTS]\n2 2000 0 0 3 4 0\n\n"
        "[TRAP]\n1 1000 100 600 100 100\n\n"
        "[ADC]\n1 16 10000 200 0 0 5 0.25 5\n\n"
        "[EXTENSIONS]\n1 5 1 2\n2 6 1 0\n3 1 1 6\n6 2 1 8\n8 1 2 0\n4 4 1 0\n5 3 1 0\n\n"
        "extension LABELSET 1\n1 5 LIN\n2 1 NAV\n\n"
        "extension LABELINC 2\n1 2 LIN\n\n"
        "extension DELAYS 3\n1 0 -100 2 TE\n\n"
        "extension ROTATIONS 4\n1 0.7071067811865476 0 0 0.7071067811865476\n\n"
        "extension FUTURE_THING 5\n1 42 17\nany format: ignored\n\n"
        "extension RF_SHIMS 6\n1 2 1 0 0.5 1.5708\n\n"
        "[SHAPES]\nshape_id 1\nnum_samples 600\n1\n0\n0\n597\n\n"
        "shape_id 2\nnum_samples 600\n0\n0\n598\n\n"
        "shape_id 3\nnum_samples 3\n0\n1\n0\n\n"
        "shape_id 4\nnum_samples 3\n0\n50\n100\n\n"
        "shape_id 5\nnum_samples 16\n0\n0.1\n0.1\n13\n"
    )
    seq = read_pulseq(text)
    b1, b2, b3, b4 = seq.blocks
    assert b1.rf.use == "excitation" and b1.rf.freq_ppm == -3.45 and b1.rf.phase_ppm == 0.1
    assert b1.rf.center_s == pytest.approx(400e-6) and b1.rf.delay_s == pytest.approx(100e-6)
    assert b1.rf_shim is not None
    np.testing.assert_allclose(b1.rf_shim.magnitudes, [1, 0.5])
    np.testing.assert_allclose(b1.rf_shim.phases_rad, [0, 1.5708])
    assert b1.labels_after["LIN"] == 0  # FUTURE_THING ignored, no labels here
    assert b2.labels_after["LIN"] == 7 and b2.labels_after["NAV"] == 1  # set 5, then +2
    assert b3.adc.phase_modulation_rad is not None and b3.adc.freq_ppm == 0
    np.testing.assert_allclose(b3.adc.phase_modulation_rad, 0.1 * np.arange(16))
    # time-shaped gradient 0 -> 2000 -> 0 Hz/m at 0, 0.5, 1 ms, rotated 90 degrees about z
    t, g = b3.gradient_waveform()
    np.testing.assert_allclose(np.interp(0.25e-3, t, g[:, 1]), 1000.0)
    np.testing.assert_allclose(np.interp(0.25e-3, t, g[:, 0]), 0.0, atol=1e-9)
    assert b3.rotation is not None
    assert b4.soft_delay is not None and b4.soft_delay.hint == "TE"
    assert b4.soft_delay.default_value == pytest.approx((0.5e-3 + 100e-6) * 2)
    assert [b.index for b in seq.blocks] == [1, 2, 3, 4]  # 1-based, file order
    assert seq.event_ids()[2].tolist() == [0, 2, 0, 0, 1]
    rec = seq.adc_records()[0]
    assert rec.block_index == 3 and seq.blocks[rec.block_index - 1] is b3
    np.testing.assert_allclose(rec.rotation, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    assert rec.labels["LIN"] == 7 and rec.freq_offset_hz == 5 and rec.phase_offset_rad == 0.25
    assert rec.t_start_s == pytest.approx(b3.start_s + 200e-6 + 5e-6)


def test_required_unknown_extension_is_refused():
    text = ("[VERSION]\nmajor 1\nminor 5\nrevision 1\n\n"
            + _DEFS.replace("\n\n", "\nRequiredExtensions WARP_DRIVE\n\n")
            + "[BLOCKS]\n1 10 0 0 0 0 0 0\n")
    with pytest.raises(SequenceFileError, match="WARP_DRIVE"):
        read_pulseq(text)


def test_oversampled_gradient_time_id_minus_one():
    # 3 samples at 5, 10, 15 us (half raster), first 0 and last 0 at 0 and 20 us
    text = ("[VERSION]\nmajor 1\nminor 5\nrevision 1\n\n" + _DEFS
            + "[BLOCKS]\n1 2 0 1 0 0 0 0\n\n[GRADIENTS]\n1 100 0 0 1 -1 0\n\n"
            + "[SHAPES]\nshape_id 1\nnum_samples 3\n0.5\n1\n0.5\n")
    t, g = read_pulseq(text).blocks[0].gradient_waveform()
    np.testing.assert_allclose(t, [0, 5e-6, 10e-6, 15e-6, 20e-6], atol=1e-15)
    np.testing.assert_allclose(g[:, 0], [0, 50, 100, 50, 0])


# ------------------------------------------------------------------------------------------
# shape decompression
# ------------------------------------------------------------------------------------------
def test_decompress_spec_examples():
    ex1 = decompress_shape(15, np.array([0, 0.1, 0.15, 0.25, 0.5, 0, 0, 4, -0.25, -0.25, 2]))
    np.testing.assert_allclose(ex1, [0, .1, .25, .5, 1, 1, 1, 1, 1, 1, 1, .75, .5, .25, 0])
    np.testing.assert_array_equal(decompress_shape(100, np.array([0, 0, 98])), np.zeros(100))
    np.testing.assert_array_equal(decompress_shape(100, np.array([1, 0, 0, 97])), np.ones(100))
    # stored with num_samples entries = uncompressed (v1.4+), unless forced (older files)
    np.testing.assert_array_equal(decompress_shape(3, np.array([1.0, 2.0, 3.0])), [1, 2, 3])
    np.testing.assert_array_equal(
        decompress_shape(3, np.array([1.0, 2.0, 3.0]), force_compressed=True), [1, 3, 6])
    with pytest.raises(ValueError, match="num_samples"):
        decompress_shape(50, np.array([0, 0, 98]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decompress_round_trips_pypulseq_compression(seed: int):
    rng = np.random.default_rng(seed)
    # piecewise-constant and -linear pieces, quantised so runs of equal derivatives occur
    pieces = [np.full(rng.integers(1, 40), rng.integers(-3, 4) / 4) for _ in range(30)]
    pieces += [np.linspace(0, 1, rng.integers(2, 30)) for _ in range(5)]
    x = np.cumsum(np.concatenate(pieces)) / 100.0
    comp = compress_shape(x, force_compression=True)  # pypulseq quantises derivatives
    expected = pp_decompress_shape(comp, force_decompression=True)
    got = decompress_shape(comp.num_samples, comp.data, force_compressed=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got, x, atol=1e-6)  # and the shape itself, to quantisation


# ------------------------------------------------------------------------------------------
# corrupt files: SequenceFileError naming the file and the line
# ------------------------------------------------------------------------------------------
def _signed(text: str) -> str:
    digest = hashlib.md5(text.encode()).hexdigest()
    return text + f"\n[SIGNATURE]\nType md5\nHash {digest}\n"


_GOOD = ("[VERSION]\nmajor 1\nminor 4\nrevision 1\n\n" + _DEFS
         + "[BLOCKS]\n1 120 0 1 0 0 0 0\n2 100 0 0 0 0 1 0\n\n"
         + "[TRAP]\n1 1000 100 1000 100 0\n\n[ADC]\n1 10 100000 0 0 0\n")


def test_signed_synthetic_file_verifies(tmp_path: Path):
    path = tmp_path / "good.seq"
    path.write_text(_signed(_GOOD))
    assert read_pulseq(path).signature_ok is True
    crlf = _signed(_GOOD.replace("\n", "\r\n"))  # Windows line ends, signed as written
    path.write_bytes(crlf.encode())
    seq = read_pulseq(path)
    assert seq.signature_ok is True and len(seq.blocks) == 2
    path.write_bytes(_signed(_GOOD).replace("[TRAP]\n1 1000", "[TRAP]\n1 1001").encode())
    assert read_pulseq(path, verify_signature=False).signature_ok is None


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        ("1000 100 1000", "1000 100 1001", "hash"),  # edited after signing
        ("2 100 0 0 0 0 1 0", "2 100 0 0 0 0 9 0", "ADC event 9"),
        ("1 120 0 1 0", "1 120 0 7 0", "gradient event 7"),
        ("[TRAP]\n1 1000", "[TRAP]\n1 1x00", "not a number"),
        ("2 100 0 0 0 0 1 0", "2 100 0 0 0 1 0", "fields"),
        ("[ADC]", "[ADCS]", "unknown section"),
        ("1 120 0 1", "1 110 0 1", "after the block duration"),
    ],
    ids=["bad-signature", "unknown-adc", "unknown-gradient", "malformed-number",
         "missing-field", "unknown-section", "event-too-long"],
)
def test_corrupt_file_names_file_and_line(tmp_path: Path, old: str, new: str, words: str):
    assert old in _GOOD
    if words == "hash":
        text = _signed(_GOOD).replace(old, new)
        marker = "[SIGNATURE]"
    else:  # signature kept valid: the defect itself must be reported
        text = _signed(_GOOD.replace(old, new))
        marker = new.split("\n")[-1]
    line = text.split("\n").index(next(ln for ln in text.split("\n") if marker in ln)) + 1
    path = tmp_path / "corrupt.seq"
    path.write_text(text)
    with pytest.raises(SequenceFileError, match=words) as info:
        read_pulseq(path)
    assert str(info.value).startswith(f"{path}, line {line}: ")


@needs_corpus
def test_truncated_corpus_file_names_the_line(tmp_path: Path):
    raw = (CORPUS / "01_pulseq_epi_rs.seq").read_bytes()
    cut = raw[: raw.index(b"[SHAPES]") + 2000]  # stops inside a shape
    path = tmp_path / "truncated.seq"
    path.write_bytes(cut)
    with pytest.raises(SequenceFileError, match=r"line \d+") as info:
        read_pulseq(path)
    assert str(path) in str(info.value)
    truncated_blocks = raw[: raw.index(b"[RF]") - 200]  # blocks reference missing events
    path.write_bytes(truncated_blocks)
    with pytest.raises(SequenceFileError, match=r"line \d+: block \d+ references"):
        read_pulseq(path)


def test_missing_file_and_empty_text(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        read_pulseq(tmp_path / "nope.seq")
    with pytest.raises(SequenceFileError, match="VERSION"):
        read_pulseq("[BLOCKS]\n1 1 0 0 0 0 0 0\n")
