"""The raw-data layout of sequences that do not state everything (third-party files, scanner
data): slices from the RF frequency offsets, repeats as ECO/REP instead of averages, the
phase FOV from the phase-encoding step, and reversed readouts from the gradient."""

from __future__ import annotations

import logging
import math

import numpy as np
import pypulseq as pp
import pytest

from mrharmony.formats.flags import has_flag
from mrharmony.formats.layout import excitation_offsets_mm, layout_from_seq
from mrharmony.formats.pulseq import read_pulseq

SYSTEM = pp.Opts(max_grad=30, grad_unit="mT/m", max_slew=120, slew_unit="T/m/s",
                 rf_ringdown_time=20e-6, rf_dead_time=100e-6, adc_dead_time=10e-6)


def write_gre(path, *, n_read=32, n_phase=16, fov_read=0.256, fov_phase=0.192,
              slices_mm=(0.0,), repeats=1, rev_label=False, thickness_m=5e-3):
    """An unlabelled multi-slice 2D GRE without [DEFINITIONS] FOV (pypulseq, like a user's
    script); ``rev_label`` adds a REV=1 label against a positive readout gradient."""
    seq = pp.Sequence(SYSTEM)
    rf, gz, gzr = pp.make_sinc_pulse(math.radians(15), duration=2e-3,
                                     slice_thickness=thickness_m, time_bw_product=4,
                                     apodization=0.5, delay=SYSTEM.rf_dead_time, system=SYSTEM,
                                     return_gz=True, use="excitation")
    gx = pp.make_trapezoid("x", flat_area=n_read / fov_read, flat_time=3.2e-3, system=SYSTEM)
    adc = pp.make_adc(n_read, duration=gx.flat_time, delay=gx.rise_time, system=SYSTEM)
    gx_pre = pp.make_trapezoid("x", area=-gx.area / 2, duration=1e-3, system=SYSTEM)
    spoil = pp.make_trapezoid("z", area=4 / thickness_m, duration=2e-3, system=SYSTEM)
    if rev_label:
        seq.add_block(pp.make_label(type="SET", label="REV", value=1))
    for _ in range(repeats):
        for z_mm in slices_mm:
            rf.freq_offset = gz.amplitude * z_mm * 1e-3
            for line in range(n_phase):
                seq.add_block(rf, gz)
                gy = pp.make_trapezoid("y", area=(line - n_phase // 2) / fov_phase,
                                       duration=1e-3, system=SYSTEM)
                seq.add_block(gx_pre, gy, gzr)
                seq.add_block(gx, adc)
                seq.add_block(spoil, pp.scale_grad(gy, -1))
    seq.write(str(path))
    return read_pulseq(path)


def test_slices_from_rf_offsets_and_phase_fov_from_the_step(tmp_path):
    seq = write_gre(tmp_path / "ms.seq", slices_mm=(-8.0, 0.0, 8.0))
    offsets = excitation_offsets_mm(seq, seq.adc_records())
    assert sorted(set(offsets.tolist())) == pytest.approx([-8.0, 0.0, 8.0], abs=1e-3)
    lay = layout_from_seq(seq, n_coils=1)
    assert lay.counters_source == "k-space"
    slc = lay.heads["idx"]["slice"]
    assert sorted(set(slc.tolist())) == [0, 1, 2]
    # each slice's acquisitions sit at their slice centre (position along z, LPS mm)
    for k, z in enumerate((-8.0, 0.0, 8.0)):
        assert lay.heads["position"][slc == k][:, 2] == pytest.approx(z, abs=1e-3)
    enc = lay.header.encoding[0]
    assert enc.reconSpace.fieldOfView_mm.y == pytest.approx(192.0, rel=1e-4)  # not 256
    assert enc.reconSpace.matrixSize.y == 16
    # slice thickness from the sinc's bandwidth over its gradient (TBW 4, 5 mm)
    assert enc.reconSpace.fieldOfView_mm.z == pytest.approx(5.0, rel=0.15)
    # every (line, slice) once: nothing would be averaged away
    keys = {(int(h["idx"]["kspace_encode_step_1"]), int(h["idx"]["slice"]),
             int(h["idx"]["repetition"])) for h in lay.heads}
    assert len(keys) == lay.heads.size


def test_unlabelled_repeats_become_repetitions_not_averages(tmp_path):
    seq = write_gre(tmp_path / "rep.seq", repeats=3)
    lay = layout_from_seq(seq, n_coils=1)
    rep = lay.heads["idx"]["repetition"]
    assert np.bincount(rep).tolist() == [16, 16, 16]
    assert lay.header.encoding[0].encodingLimits.repetition.maximum == 2


def test_a_rev_label_against_the_gradient_is_overruled(tmp_path, caplog):
    seq = write_gre(tmp_path / "rev.seq", rev_label=True)
    with caplog.at_level(logging.WARNING, logger="mrharmony.formats"):
        lay = layout_from_seq(seq, n_coils=1)
    assert not has_flag(lay.heads["flags"], "IS_REVERSE").any()
    assert "the gradient decides" in caplog.text
