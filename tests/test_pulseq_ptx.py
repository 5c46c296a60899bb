"""Pulseq files from other writers: pTx RF rows (MRzero's modified v1.3.9/v1.4.5), the
v1.5 RF_SHIMS extension, and files without RF (an unexcited object gives no signal).

Reference: the Bloch engine on the same sequence written without a shim, with the shim's
magnitude folded into the RF amplitude and its phase into the RF phase offset, which is
how MRzeroCore 1.2 plays a one-channel shim (``angle * |w|``, ``phase + angle(w)`` with
``w = mag * exp(-1j * phase)``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from mrharmony.errors import SimulationError
from mrharmony.formats.pulseq import read_pulseq
from mrharmony.simulation.engine import simulate
from mrharmony.simulation.spins import SpinSystem

from conftest import CORPUS

_DEFS = ("[DEFINITIONS]\nAdcRasterTime 1e-07\nBlockDurationRaster 1e-05\n"
         "GradientRasterTime 1e-05\nRadiofrequencyRasterTime 1e-06\n\n")
# A 1 ms block pulse of 250 Hz (90 degrees) and a 64-sample ADC with no gradients (FID).
_BLOCKS = "[BLOCKS]\n1 100 1 0 0 0 0 0\n2 200 0 0 0 0 1 0\n\n"
_ADC = "[ADC]\n1 64 20000 0 0 0\n\n"
_SHAPE_RF = "shape_id 1\nnum_samples 1000\n1\n0\n0\n997\n\n"
_SHAPE_PH = "shape_id 2\nnum_samples 1000\n0\n0\n998\n\n"


def _v145(rf_row: str, extra_shapes: str = "") -> str:
    return ("[VERSION]\nmajor 1\nminor 4\nrevision 5\n\n" + _DEFS + _BLOCKS
            + f"[RF]\n{rf_row}\n\n" + _ADC + "[SHAPES]\n" + _SHAPE_RF + _SHAPE_PH
            + extra_shapes)


def _v139(rf_row: str, extra_shapes: str = "") -> str:
    blocks = "[BLOCKS]\n1 0 1 0 0 0 0 0\n2 0 0 0 0 0 1 0\n\n"  # v1.3: column 2 = delay ID
    return ("[VERSION]\nmajor 1\nminor 3\nrevision 9\n\n" + _DEFS + blocks
            + f"[RF]\n{rf_row}\n\n" + _ADC + "[SHAPES]\n" + _SHAPE_RF + _SHAPE_PH
            + extra_shapes)


def _shape(sid: int, values: list[float]) -> str:
    body = "\n".join(repr(float(v)) for v in values)
    return f"shape_id {sid}\nnum_samples {len(values)}\n{body}\n\n"


def _spins() -> SpinSystem:
    """Three isochromats with different relaxation, on resonance, at the origin."""
    n = 3
    return SpinSystem(
        position_m=np.zeros((n, 3)), pd=np.array([1.0, 0.7, 0.4]),
        r1_per_s=np.array([1.0, 2.0, 0.3]), r2_per_s=np.array([10.0, 20.0, 3.0]),
        df_hz=np.array([0.0, 15.0, -40.0]), b1_scale=np.ones(n), d_m2_s=np.zeros(n),
        voxel_index=np.arange(n), n_voxels=n,
    )


def _ideal_spin() -> SpinSystem:
    """One on-resonance isochromat without relaxation: the flip angle is exact."""
    return SpinSystem(position_m=np.zeros((1, 3)), pd=np.ones(1), r1_per_s=np.zeros(1),
                      r2_per_s=np.zeros(1), df_hz=np.zeros(1), b1_scale=np.ones(1),
                      d_m2_s=np.zeros(1), voxel_index=np.zeros(1, np.int64), n_voxels=1)


def _signal(text: str, spins: SpinSystem | None = None) -> np.ndarray:
    return simulate(read_pulseq(text), spins or _spins(), larmor_hz=123.2e6)


@pytest.mark.parametrize("make, plain_row, shim_row", [
    (_v145, "1 250 1 2 0 0 0 0", "1 {amp} 1 2 0 0 0 {phase} 3 4"),
    (_v139, "1 250 1 2 0 0 0", "1 {amp} 1 2 0 0 {phase} 3 4"),
])
def test_one_channel_ptx_row_equals_folded_amplitude_and_phase(make, plain_row, shim_row):
    mag, ph = 0.6, 0.7
    shimmed = make(shim_row.format(amp=250, phase=0), _shape(3, [mag]) + _shape(4, [ph]))
    seq = read_pulseq(shimmed)
    rf = seq.blocks[0].rf
    np.testing.assert_allclose(rf.shim, [mag * np.exp(-1j * ph)], rtol=0, atol=1e-15)
    # the same pulse without a shim: amplitude * mag, phase offset - ph (MRzero's rule)
    folded = make(shim_row.format(amp=250 * mag, phase=-ph).rsplit(" ", 2)[0])
    assert read_pulseq(folded).blocks[0].rf.shim is None
    s_shim, s_fold = _signal(shimmed), _signal(folded)
    assert np.abs(s_fold).max() > 0.1  # something was excited
    np.testing.assert_allclose(s_shim, s_fold, rtol=0, atol=1e-9 * np.abs(s_fold).max())
    # and it differs from the unshimmed pulse by the expected flip: sin(90 * 0.6) / sin(90)
    s_plain = _signal(make(plain_row), _ideal_spin())
    ratio = np.abs(_signal(shimmed, _ideal_spin())).mean() / np.abs(s_plain).mean()
    assert ratio == pytest.approx(math.sin(math.radians(90 * mag)), rel=1e-6)


def test_zero_shim_ids_mean_no_shim():
    seq = read_pulseq(_v145("1 250 1 2 0 0 0 0 0 0"))
    assert seq.blocks[0].rf.shim is None


def test_multichannel_ptx_reads_but_is_refused_by_the_single_transmit_simulator():
    n_tx = 8
    mags = list(np.linspace(0.5, 1.0, n_tx))
    phases = list(np.linspace(0, 2 * np.pi, n_tx, endpoint=False))
    text = _v145("1 250 1 2 0 0 0 0 3 4", _shape(3, mags) + _shape(4, phases))
    rf = read_pulseq(text).blocks[0].rf
    assert rf.shim.shape == (n_tx,)
    np.testing.assert_allclose(np.abs(rf.shim), mags, rtol=1e-12)
    with pytest.raises(SimulationError, match="parallel-transmit pulse on 8 channels"):
        _signal(text)


def test_ptx_row_with_mismatched_shim_shapes_is_refused():
    from mrharmony.errors import SequenceFileError

    text = _v145("1 250 1 2 0 0 0 0 3 4", _shape(3, [1.0, 1.0]) + _shape(4, [0.0]))
    with pytest.raises(SequenceFileError, match="2 channels but shim phase shape 4 has 1"):
        read_pulseq(text)
    with pytest.raises(SequenceFileError, match="both a magnitude and a phase"):
        read_pulseq(_v145("1 250 1 2 0 0 0 0 3 0", _shape(3, [1.0])))


def test_file_without_rf_gives_zero_signal():
    text = ("[VERSION]\nmajor 1\nminor 4\nrevision 1\n\n" + _DEFS
            + "[BLOCKS]\n1 200 0 1 0 0 1 0\n\n[TRAP]\n1 1000 100 1000 100 0\n\n" + _ADC)
    sig = _signal(text)
    assert sig.shape[-1] == 64 and np.all(sig == 0)


@pytest.mark.skipif(not (CORPUS / "08_koma_v15_rotation_radial_tiny.seq").is_file(),
                    reason="shared/pulseq-corpus is absent")
def test_koma_rotation_file_without_rf_simulates_through_the_cli(tmp_path):
    """The KomaMRI ROTATIONS file has ADCs but no RF: zero signal, not an IndexError."""
    from mrharmony.cli import main
    from mrharmony.formats.raw import read_raw

    assert main(["phantom", "make", "shepp-logan", "--matrix", "16",
                 "-o", str(tmp_path / "ph")]) == 0
    out = tmp_path / "koma.h5"
    assert main(["simulate", str(CORPUS / "08_koma_v15_rotation_radial_tiny.seq"),
                 str(tmp_path / "ph"), "-s", "siemens-prisma-3t", "--no-noise",
                 "-o", str(out)]) == 0
    raw = read_raw(out)
    assert len(raw.acquisitions) == 5
    assert all(np.all(a.data == 0) for a in raw.acquisitions)


def _v15(amp: float, phase: float, shim: str | None) -> str:
    ext = "" if shim is None else (
        "[EXTENSIONS]\n1 1 1 0\n\n" + f"extension RF_SHIMS 1\n1 {shim}\n\n")
    blocks = f"[BLOCKS]\n1 100 1 0 0 0 0 {0 if shim is None else 1}\n2 200 0 0 0 0 1 0\n\n"
    defs = _DEFS if shim is None else _DEFS.replace(
        "\n\n", "\nRequiredExtensions RF_SHIMS\n\n")
    return ("[VERSION]\nmajor 1\nminor 5\nrevision 1\n\n" + defs + blocks
        + f"[RF]\n1 {amp!r} 1 2 0 500 0 0 0 0 {phase!r} e\n\n"
        + "[ADC]\n1 64 20000 0 0 0 0 0 0\n\n" + ext + "[SHAPES]\n" + _SHAPE_RF + _SHAPE_PH)


def test_one_channel_rf_shims_extension_scales_and_phases_the_pulse():
    """Pulseq v1.5 RF_SHIMS: the channel plays mag * exp(1j * phase) times the pulse."""
    mag, ph = 0.5, 0.4
    shimmed = _v15(250.0, 0.0, f"1 {mag} {ph}")
    folded = _v15(250.0 * mag, ph, None)
    s_shim, s_fold = _signal(shimmed), _signal(folded)
    assert np.abs(s_fold).max() > 0.1
    np.testing.assert_allclose(s_shim, s_fold, rtol=0, atol=1e-9 * np.abs(s_fold).max())
    with pytest.raises(SimulationError, match="on 2 channels"):
        _signal(_v15(250.0, 0.0, "2 1 0 0.5 1.5708"))
