"""``mrharmony validate``: the simulator against measured data (issue 12, item 4).

Data-free tests build a slice-profile gradient echo with pypulseq (excitation selected
along the readout axis, no phase encoding) and play it at a realistic virtual site as the
"measurement". The measured tests use the Siemens Skyra 3 T pairs in
``shared/real-scanner`` (skipped when absent).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mrharmony.errors import PhantomError, RawDataError
from mrharmony.phantoms.uniform import make_uniform_phantom
from mrharmony.study.validate import (
    classify_sequence,
    compare_images,
    profile_metrics,
    validate_measurement,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "real-scanner"


def _pair(name: str) -> tuple[Path, Path]:
    dat, seq = DATA / f"{name}.dat", DATA / f"{name}.seq"
    if not (dat.is_file() and seq.is_file()):
        pytest.skip(f"measured pair {name} not in {DATA}")
    pytest.importorskip("mrharmony.formats.twix")
    return dat, seq


def _profile_seq(path: Path, n_readouts: int = 4) -> Path:
    """Gradient echo whose 30 deg sinc excitation (TBW 4, 20 mm) selects along x = readout."""
    import pypulseq as pp

    system = pp.Opts(max_grad=30, grad_unit="mT/m", max_slew=120, slew_unit="T/m/s",
                     rf_ringdown_time=20e-6, rf_dead_time=100e-6, adc_dead_time=10e-6)
    seq = pp.Sequence(system)
    fov, n, thk = 0.128, 64, 0.02
    rf, gss, gssr = pp.make_sinc_pulse(
        flip_angle=math.pi / 6, duration=2e-3, slice_thickness=thk, apodization=0.0,
        time_bw_product=4.0, delay=system.rf_dead_time, system=system, return_gz=True,
        use="excitation",
    )
    gss.channel = "x"
    gssr.channel = "x"
    gx = pp.make_trapezoid(channel="x", flat_area=n / fov, flat_time=3.2e-3, system=system)
    adc = pp.make_adc(num_samples=n, duration=gx.flat_time, delay=gx.rise_time, system=system)
    gx_pre = pp.make_trapezoid(channel="x", area=-gx.area / 2 + gssr.area, duration=1.5e-3,
                               system=system)
    spoil = pp.make_trapezoid(channel="x", area=4 * n / fov, system=system)
    for _ in range(n_readouts):
        seq.add_block(rf, gss)
        seq.add_block(gx_pre)
        seq.add_block(gx, adc)
        seq.add_block(spoil)
        seq.add_block(pp.make_delay(0.1))
    seq.set_definition("FOV", [fov, fov, thk])
    seq.set_definition("Name", "profile")
    seq.write(str(path))
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    """(measured ISMRMRD file, .seq): the profile sequence played at siemens-prisma-3t
    (32-channel helmet, B1+ centre brightening, B0 residual, receiver filter, noise) on a
    sphere of other size and relaxation than the validation phantom's."""
    from mrharmony.simulation.raw import simulate_raw

    root = tmp_path_factory.mktemp("validate")
    seq = _profile_seq(root / "profile.seq")
    phantom = make_uniform_phantom("sphere", (128, 128, 5), (256, 32, 1), 3.0, t1_ms=500.0,
                                   t2_ms=100.0, diameter_mm=110.0)
    meas = simulate_raw(seq, phantom, "siemens-prisma-3t", root / "meas.h5", seed=3)
    return meas, seq


# --------------------------------------------------------------------- uniform phantom
def test_uniform_sphere_defaults_to_doped_water_at_the_nearest_certified_field():
    ph = make_uniform_phantom("sphere", (128.0, 128.0, 30.0), (256, 64, 1), 2.89)
    assert ph.shape == (256, 64, 1)
    assert ph.voxel_size_mm == pytest.approx((0.5, 2.0, 30.0))
    inside = ph.mask
    assert float(ph.t1_ms[inside].mean()) == pytest.approx(351.5)  # NIST T1 sphere 6, 3 T
    assert float(ph.t2_ms[inside].mean()) == pytest.approx(255.5)
    assert "Stupic" in ph.metadata["relaxation_source"]
    # disc of 0.9 x 128 mm through the centre: area within 1 % (voxel-centre rule)
    area = inside.sum() * 0.5 * 2.0
    assert area == pytest.approx(math.pi * (0.45 * 128.0) ** 2, rel=0.01)


def test_uniform_cylinder_axis_and_length():
    ph = make_uniform_phantom("cylinder", 64.0, 32, 1.5, axis="y", diameter_mm=40.0,
                              length_mm=20.0, t1_ms=800.0, t2_ms=80.0)
    m = ph.mask
    assert m.any(axis=(0, 2)).sum() == 11  # |y| <= 10 mm: voxel centres -10, -8, ..., 10 mm
    # a 40 mm disc in x-z, 2 mm voxels: pi 20^2 / 4 = 314 voxels (voxel-centre rule, 2 %)
    assert m[:, 16, :].sum() == pytest.approx(math.pi * 20**2 / 4, rel=0.02)
    assert float(ph.t1_ms[m].mean()) == 800.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shape": "cube"}, "shape"),
        ({"matrix": 0}, "matrix"),
        ({"fov_mm": -1.0}, "fov_mm"),
        ({"t1_ms": 100.0, "t2_ms": 200.0}, "t2_ms <= t1_ms"),
        ({"field_t": 7.0}, "give t1_ms and t2_ms"),
        ({"pd": 1.5}, "pd"),
        ({"shape": "cylinder", "axis": "w"}, "axis"),
        ({"diameter_mm": 0.0}, "diameter_mm"),
    ],
)
def test_uniform_phantom_refuses_bad_input(kwargs, match):
    args = {"shape": "sphere", "fov_mm": 100.0, "matrix": 16, "field_t": 3.0}
    args.update(kwargs)
    with pytest.raises(PhantomError, match=match):
        make_uniform_phantom(args.pop("shape"), args.pop("fov_mm"), args.pop("matrix"),
                             args.pop("field_t"), **args)


# --------------------------------------------------------------------------- metrics
def test_profile_metrics_gaussian_and_sinc():
    x = np.arange(-200, 201) * 0.1  # mm
    sigma = 3.0
    m = profile_metrics(np.exp(-0.5 * (x / sigma) ** 2), 0.1)
    assert m["fwhm_mm"] == pytest.approx(2 * math.sqrt(2 * math.log(2)) * sigma, rel=1e-3)
    assert m["centre_mm"] == pytest.approx(0.0, abs=1e-9)
    assert m["sidelobe_level"] == 0.0
    # |sinc|: first side lobe 0.2172 of the peak, FWHM 1.2067 zero-crossing spacings
    m = profile_metrics(np.abs(np.sinc(x / 5.0)), 0.1)
    assert m["sidelobe_level"] == pytest.approx(0.2172, abs=2e-3)
    assert m["fwhm_mm"] == pytest.approx(1.2067 * 5.0, rel=2e-3)
    with pytest.raises(RawDataError):
        profile_metrics(np.zeros(10), 1.0)


def test_compare_images_is_scale_free():
    rng = np.random.default_rng(0)
    sim = np.zeros((32, 32))
    sim[8:24, 8:24] = 1.0
    meas = 7.0 * sim + 0.01 * rng.standard_normal(sim.shape)
    out = compare_images(meas, sim)
    assert out["nrmse"] < 0.02
    assert out["correlation"] > 0.999
    with pytest.raises(RawDataError, match="shape"):
        compare_images(meas, sim[:-1])


# ------------------------------------------------------------------ classification
def test_classify_synthetic_profile_sequence(synthetic):
    info = classify_sequence(synthetic[1])
    assert info.kind == "slice_profile"
    assert (info.readout_axis, info.excitation_axis, info.phase_encoded) == (0, 0, False)
    assert info.excitation_flip_deg == pytest.approx(30.0, abs=0.01)


def test_classify_measured_sequences():
    _, seq = _pair("se2d_sliceprofile_sinc")
    info = classify_sequence(seq)
    assert (info.kind, info.readout_axis, info.excitation_axis) == ("slice_profile", 0, 0)
    assert info.phase_encoded and info.phase_axis == 1
    _, seq = _pair("se2d_image")
    info = classify_sequence(seq)
    assert (info.kind, info.excitation_axis, info.slice_axis) == ("image", 2, 2)


# -------------------------------------------------------------------- end to end
def test_validate_synthetic_profile_without_phase_encoding(synthetic, tmp_path):
    meas, seq = synthetic
    out = tmp_path / "val"
    res = validate_measurement(meas, seq, out)
    assert res["kind"] == "slice_profile"
    assert res["recon"].startswith("FFT of every readout")
    # 20 mm slab, TBW 4: the site's coils, B1+ and receiver filter change it by < 5 %
    assert res["fwhm_mm"]["simulated"] == pytest.approx(20.0, rel=0.05)
    assert abs(res["fwhm_rel_diff"]) < 0.05
    assert res["correlation"] > 0.99
    saved = json.loads((out / "validation.json").read_text())
    assert saved["fwhm_mm"] == res["fwhm_mm"]
    assert (out / "validation.png").stat().st_size > 0
    assert (out / "simulated.h5").is_file()


def test_validate_refuses_a_non_empty_folder_and_cli_exit_codes(synthetic, tmp_path, capsys):
    from mrharmony.cli import main

    meas, seq = synthetic
    out = tmp_path / "val"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        validate_measurement(meas, seq, out)
    assert main(["validate", str(meas), "--seq", str(seq), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "mrharmony: error:" in err and "not empty" in err
    assert (out / "keep.txt").is_file()  # untouched
    assert main(["validate", str(meas), "--seq", str(tmp_path / "none.seq"), "-o",
                 str(tmp_path / "v2")]) == 2
    assert main(["validate", str(meas), "--seq", str(seq), "-o", str(out), "--force"]) == 0
    assert "slice profile: FWHM measured" in capsys.readouterr().out
    assert not (out / "keep.txt").exists()
    assert (out / "validation.json").is_file()


def test_validate_measured_sinc_slice_profile(tmp_path):
    """Acceptance: FWHM within 10 % and correlation >= 0.95 against the Skyra measurement."""
    dat, seq = _pair("se2d_sliceprofile_sinc")
    res = validate_measurement(dat, seq, tmp_path / "val")
    assert res["kind"] == "slice_profile"
    assert res["field_t"] == pytest.approx(2.894, abs=1e-3)  # from the twix header
    assert abs(res["fwhm_rel_diff"]) <= 0.10  # measured 29.6 mm, simulated 29.6 mm
    assert res["correlation"] >= 0.95  # 0.998
    sl = res["sidelobe_level"]
    assert 0.10 < sl["measured"] < 0.30 and 0.10 < sl["simulated"] < 0.30  # 0.19 / 0.15
    assert abs(res["centre_offset_mm"]) < 1.0
    assert len(res["profiles"]["measured"]) == 64


def test_validate_measured_sphere_image(tmp_path):
    dat, seq = _pair("se2d_image")
    res = validate_measurement(dat, seq, tmp_path / "val")
    assert res["kind"] == "image"
    # the sphere's outline agrees; the 32-channel receive shading (not simulated) is what
    # is left: r = 0.75, NRMSE = 0.43 when written
    assert res["correlation"] > 0.6
    assert res["nrmse"] < 0.6
    assert (tmp_path / "val" / "validation.png").is_file()
