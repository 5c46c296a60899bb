"""Siemens twix + Pulseq .seq → ISMRMRD (mrharmony.formats.twix) on data measured on scanners.

The pairs in ``shared/real-scanner`` (next to the repository) were measured with public
Pulseq sequences on Siemens Skyra (VE11C, 32 channels) and Trio (VB19, 1 channel)
scanners; the tests skip when that folder is absent.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mrharmony.cli import main
from mrharmony.errors import RawDataError, SequenceFileError
from mrharmony.formats.flags import has_flag

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "real-scanner"

pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} (measured data) is missing")

SE = ("se2d_image.dat", "se2d_image.seq")
EPI = ("epi_pe_on.dat", "epi_pe_on.seq")
EPI_REF = ("epi_pe_off.dat", "epi_pe_off.seq")


def _p(name: str) -> str:
    return str(REAL / name)


def _read_twix(path: Path | str, **kw):
    twixtools = pytest.importorskip("twixtools")
    with contextlib.redirect_stdout(io.StringIO()):
        return twixtools.read_twix(str(path), parse_pmu=False, parse_geometry=False,
                                   verbose=False, **kw)


def _reference_recon(dat: str) -> np.ndarray:
    """Plain recon: image readouts in order as k-space rows, centred 2-D FFT, coil RSS.

    Returns (readout, line) magnitude, the array order of the toolkit's images.
    """
    mdbs = [m for m in _read_twix(dat)[-1]["mdb"] if m.is_image_scan()]
    k = np.stack([m.data for m in mdbs], axis=1)  # coils, lines, samples
    im = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(1, 2)), axes=(1, 2)),
                         axes=(1, 2))
    return np.sqrt(np.sum(np.abs(im) ** 2, axis=0)).T


def _nrmse(image: np.ndarray, reference: np.ndarray) -> float:
    """||image - s ref|| / ||image|| with the least-squares scale s (scaling removed)."""
    s = float(np.sum(image * reference) / np.sum(reference * reference))
    return float(np.linalg.norm(image - s * reference) / np.linalg.norm(image))


def _ghost_to_signal(image: np.ndarray) -> float:
    """Mean |image| in the N/2 ghost region outside the object over the mean in the object.

    Object: |image| > 20 % of the maximum. Ghost region: the object shifted by half the
    phase-encoding FOV (axis 1), minus the object dilated by 2 voxels.
    """
    from scipy import ndimage

    a = np.abs(image)
    obj = a > 0.2 * a.max()
    ghost = np.roll(obj, a.shape[1] // 2, axis=1) & ~ndimage.binary_dilation(obj, iterations=2)
    assert obj.sum() > 100 and ghost.sum() > 100
    return float(a[ghost].mean() / a[obj].mean())


def _run(*args: str) -> int:
    return main([str(a) for a in args])


# --------------------------------------------------------------------------- format


def test_is_twix_recognises_vb_and_vd_files(tmp_path: Path) -> None:
    from mrharmony.formats.raw import sniff_format
    from mrharmony.formats.twix import is_twix

    assert is_twix(_p(SE[0]))  # VE11C (multi-measurement table)
    assert is_twix(_p(EPI[0]))  # VB19
    assert not is_twix(_p(SE[1]))
    assert not is_twix(tmp_path / "missing.dat")
    assert sniff_format(_p(SE[0])) == "twix"


# --------------------------------------------------------------------------- SE: done 1


def test_se_recon_through_cli_matches_plain_recon_with_twix_geometry(tmp_path: Path) -> None:
    out = tmp_path / "se.nii.gz"
    assert _run("recon", _p(SE[0]), "--seq", _p(SE[1]), "-o", out, "--backend", "numpy") == 0
    nii = nib.load(out)
    image = np.asarray(nii.dataobj, dtype=np.float64).squeeze()
    reference = _reference_recon(_p(SE[0]))
    assert image.shape == reference.shape == (64, 64)
    nrmse = _nrmse(image, reference)
    print(f"SE NRMSE vs plain twixtools recon: {nrmse:.3g}")
    assert nrmse < 0.05

    # geometry: voxel = FOV / matrix, centre and normal from the twix slice prescription
    hdr = _read_twix(_p(SE[0]), parse_data=False)[-1]["hdr"]
    sl = hdr["MeasYaps"]["sSliceArray"]["asSlice"][0]
    aff = nii.affine
    np.testing.assert_allclose(np.linalg.norm(aff[:3, :3], axis=0),
                               [sl["dReadoutFOV"] / 64, sl["dPhaseFOV"] / 64, 30.0], atol=1e-4)
    pos_lps = np.array([sl["sPosition"].get(k, 0.0) for k in ("dSag", "dCor", "dTra")])
    centre_ras = aff @ np.array([32, 32, 0, 1.0])
    np.testing.assert_allclose(centre_ras[:3], pos_lps * [-1, -1, 1], atol=1e-2)
    normal_lps = np.array([sl["sNormal"].get(k, 0.0) for k in ("dSag", "dCor", "dTra")])
    slice_ras = aff[:3, 2] / np.linalg.norm(aff[:3, 2])
    np.testing.assert_allclose(slice_ras, normal_lps * [-1, -1, 1], atol=1e-6)
    # transversal, no in-plane rotation: read along L-R, phase along A-P
    np.testing.assert_allclose(np.abs(aff[:3, 0]) / 2.0, [1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(np.abs(aff[:3, 1]) / 2.0, [0, 1, 0], atol=1e-6)
    side = json.loads(out.with_name("se.json").read_text())
    assert side["MagneticFieldStrength"] == pytest.approx(2.89362)


def test_convert_keeps_every_sample_and_fills_the_header(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mrharmony.formats.raw import read_raw

    out = tmp_path / "se.h5"
    with caplog.at_level(logging.INFO, logger="mrharmony.formats"):
        assert _run("convert", "twix", _p(SE[0]), "--seq", _p(SE[1]), "-o", out) == 0
    assert "k-space" in caplog.text  # no labels: counters from the .seq's k-space
    assert "signature" in caplog.text  # this .seq was regenerated after the measurement
    raw = read_raw(out)
    h = raw.header
    system = h.acquisitionSystemInformation
    assert (system.systemVendor, system.systemModel) == ("SIEMENS", "Skyra")
    assert system.systemFieldStrength_T == pytest.approx(2.89362)
    assert system.receiverChannels == 32
    assert h.experimentalConditions.H1resonanceFrequency_Hz == 123262310
    enc = h.encoding[0]
    assert (enc.encodedSpace.matrixSize.x, enc.encodedSpace.matrixSize.y) == (64, 64)
    assert (enc.reconSpace.fieldOfView_mm.x, enc.reconSpace.fieldOfView_mm.y) == (128.0, 128.0)
    mdbs = [m for m in _read_twix(_p(SE[0]))[-1]["mdb"] if m.is_image_scan()]
    assert len(raw.acquisitions) == len(mdbs) == 64
    for acq, mdb in zip(raw.acquisitions, mdbs, strict=True):
        np.testing.assert_array_equal(acq.data, mdb.data)  # nothing removed or scaled
    lines = sorted(int(a.idx.kspace_encode_step_1) for a in raw.acquisitions)
    assert lines == list(range(64))
    assert not any(has_flag(int(a.flags), "IS_REVERSE") for a in raw.acquisitions)


def test_mrd2_output(tmp_path: Path) -> None:
    pytest.importorskip("mrd")
    from mrharmony.formats.raw import load_raw

    out = tmp_path / "se.mrd"
    assert _run("convert", "twix", _p(SE[0]), "--seq", _p(SE[1]), "-o", out) == 0
    raw = load_raw(out)
    assert len(raw.acquisitions) == 64
    assert raw.header.acquisitionSystemInformation.systemModel == "Skyra"


# --------------------------------------------------------------------------- EPI: done 2


def test_epi_ghost_correction_from_the_phase_encoding_off_reference(tmp_path: Path) -> None:
    from mrharmony.formats.raw import read_raw

    gsr = {}
    for name, extra in (("plain", {}), ("ref", {"reference": _p(EPI_REF[0]),
                                                "reference_seq": _p(EPI_REF[1])})):
        from mrharmony.formats.twix import convert_twix

        h5 = convert_twix(_p(EPI[0]), _p(EPI[1]), tmp_path / f"{name}.h5", **extra)
        out = tmp_path / f"{name}.nii.gz"
        assert _run("recon", h5, "-o", out, "--backend", "numpy") == 0
        gsr[name] = _ghost_to_signal(np.asarray(nib.load(out).dataobj).squeeze())
    raw = read_raw(tmp_path / "ref.h5")
    assert raw.header.encoding[0].trajectory.value == "epi"
    nav = [a for a in raw.acquisitions if has_flag(int(a.flags), "IS_PHASECORR_DATA")]
    assert len(nav) == 60
    assert sum(has_flag(int(a.flags), "IS_REVERSE") for a in nav) == 30
    print(f"EPI ghost-to-signal ratio: {gsr['plain']:.3f} without, {gsr['ref']:.3f} with the "
          "pe-off reference scan")
    assert gsr["ref"] < 0.05
    assert gsr["plain"] > 2 * gsr["ref"]


def test_epi_lines_carry_the_seq_trajectory_and_reverse_flags() -> None:
    from mrharmony.formats.twix import read_twix_raw

    raw = read_twix_raw(_p(EPI[0]), _p(EPI[1]))
    acqs = raw.acquisitions
    assert len(acqs) == 60
    rev = np.array([has_flag(int(a.flags), "IS_REVERSE") for a in acqs])
    np.testing.assert_array_equal(rev, np.arange(60) % 2 == 1)  # lines alternate
    kx0, kx1 = acqs[0].traj[:, 0], acqs[1].traj[:, 0]
    assert np.all(np.diff(kx0) > 0) and np.all(np.diff(kx1) < 0)
    np.testing.assert_allclose(kx0[[0, -1]], [-29.5, 29.5], atol=1e-3)  # cycles per FOV
    lines = [int(a.idx.kspace_encode_step_1) for a in acqs]
    assert sorted(lines) == list(range(60))


# --------------------------------------------------------------------------- bad input: done 3


def _refused(capsys: pytest.CaptureFixture[str], out: Path, *args: str) -> str:
    assert _run(*args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mrharmony: error:")
    assert not out.exists()
    assert not any(p.name.startswith(out.name) for p in out.parent.iterdir())
    return err


def test_refuses_a_seq_with_another_adc_count(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.h5"
    err = _refused(capsys, out, "convert", "twix", _p(SE[0]), "--seq", _p(EPI[1]), "-o", out)
    assert "64 ADC readouts" in err and "60 ADC events" in err
    assert "49bcd82aed8af7b4e72629e4e7c0d92b" in err  # the twix's record of its .seq
    assert "84b3638801ea3a3536b9b177df612add" in err  # the given .seq's signature
    err = _refused(capsys, tmp_path / "x.nii.gz", "recon", _p(EPI[0]), "--seq", _p(SE[1]),
                   "-o", tmp_path / "x.nii.gz")
    assert "60 ADC readouts" in err and "64 ADC events" in err


@pytest.mark.parametrize(("pair", "fraction"), [(SE, 0.6), (EPI, 0.7), (EPI, 0.95)],
                         ids=["vd-table", "vb-header", "vb-data"])
def test_refuses_a_truncated_twix(tmp_path: Path, capsys, pair, fraction) -> None:
    src = REAL / pair[0]
    cut = tmp_path / "cut.dat"
    cut.write_bytes(src.read_bytes()[: int(src.stat().st_size * fraction)])
    out = tmp_path / "x.h5"
    err = _refused(capsys, out, "convert", "twix", cut, "--seq", _p(pair[1]), "-o", out)
    assert "truncated" in err and "cut.dat" in err
    from mrharmony.formats.twix import read_twix_raw

    with pytest.raises(RawDataError, match="truncated"):
        read_twix_raw(cut, _p(pair[1]))


def test_refuses_a_twix_from_another_sequence(tmp_path: Path, capsys) -> None:
    data = (REAL / SE[0]).read_bytes()
    assert b"pulseq_v140_ice_fire" in data
    other = tmp_path / "gre.dat"
    other.write_bytes(data.replace(b"pulseq_v140_ice_fire", b"gre_fieldmap_product"))
    out = tmp_path / "x.h5"
    err = _refused(capsys, out, "convert", "twix", other, "--seq", _p(EPI[1]), "-o", out)
    assert "not measured with the Pulseq interpreter" in err and "gre_fieldmap_product" in err
    assert "64 ADC readouts" in err and "60 ADC events" in err


def test_refuses_a_seq_that_is_not_pulseq(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "notes.seq"
    bad.write_text("this is not a Pulseq file\n")
    out = tmp_path / "x.h5"
    err = _refused(capsys, out, "convert", "twix", _p(SE[0]), "--seq", bad, "-o", out)
    assert "notes.seq" in err
    from mrharmony.formats.twix import read_twix_raw

    with pytest.raises(SequenceFileError):
        read_twix_raw(_p(SE[0]), bad)
    with pytest.raises(RawDataError, match="not Siemens twix"):
        read_twix_raw(_p(SE[1]), _p(SE[1]))


# --------------------------------------------------------------------------- measurements


@pytest.fixture(scope="module")
def multi_dat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VE file of two measurements: 3 noise-adjust readouts (seeded noise), then the SE."""
    twixtools = pytest.importorskip("twixtools")
    scan = _read_twix(_p(SE[0]), keep_acqend=True)[0]
    rng = np.random.default_rng(7)
    noise = []
    for k in range(3):
        m = scan["mdb"][k].convert_to_local()
        m.data = (rng.standard_normal((32, 64)) + 1j * rng.standard_normal((32, 64))).astype(
            np.complex64)
        m.clear_all_flags()
        m.add_flag("NOISEADJSCAN")
        noise.append(m)
    first = {"hdr": scan["hdr"], "hdr_str": scan["hdr_str"],
             "raidfile_hdr": scan["raidfile_hdr"], "mdb": [*noise, scan["mdb"][-1]]}
    path = tmp_path_factory.mktemp("twix") / "multi.dat"
    with contextlib.redirect_stdout(io.StringIO()):
        twixtools.write_twix([first, scan], str(path), version_is_ve=True)
    return path


def test_multi_measurement_file_noise_scans_first(tmp_path: Path, multi_dat: Path) -> None:
    from mrharmony.formats.raw import read_raw
    from mrharmony.formats.twix import convert_twix, read_twix_raw

    out = convert_twix(multi_dat, _p(SE[1]), tmp_path / "m.h5")
    raw = read_raw(out)
    assert len(raw.noise) == 3 and len(raw.acquisitions) == 64
    import h5py

    with h5py.File(out, "r") as f:
        flags = f["dataset/data"]["head"]["flags"]
    assert has_flag(flags[:3], "IS_NOISE_MEASUREMENT").all()
    assert not has_flag(flags[3:], "IS_NOISE_MEASUREMENT").any()
    assert raw.noise[0].data.shape == (32, 64)
    assert np.std(raw.noise[0].data.real) == pytest.approx(1.0, abs=0.1)
    same = read_twix_raw(multi_dat, _p(SE[1]), measurement=1)
    np.testing.assert_array_equal(same.acquisitions[5].data, raw.acquisitions[5].data)
    with pytest.raises(RawDataError, match="measurement 0 of 2 holds no image"):
        read_twix_raw(multi_dat, _p(SE[1]), measurement=0)
    with pytest.raises(RawDataError, match="measurement 5 does not exist"):
        read_twix_raw(multi_dat, _p(SE[1]), measurement=5)


def test_existing_output_is_kept(tmp_path: Path) -> None:
    from mrharmony.formats.twix import convert_twix

    out = tmp_path / "x.h5"
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        convert_twix(_p(SE[0]), _p(SE[1]), out)
    assert out.read_bytes() == b"keep"
    shutil.copy(REAL / SE[1], tmp_path / "copy.seq")
    assert convert_twix(_p(SE[0]), tmp_path / "copy.seq", out, force=True) == out


# --------------------------------------------------------------------------- other EPIs
# Pairs not measured: a .seq (ours, or a pypulseq ramp-sampled EPI without labels) and a
# VE twix written by twixtools around analytic samples of a disk at the .seq's k-space.


def _disk(k_per_m: np.ndarray, radius_m: float, centre_m: np.ndarray) -> np.ndarray:
    """Fourier transform of a uniform disk at k (1/m), x/y only."""
    from scipy.special import j1

    kr = np.maximum(np.linalg.norm(k_per_m[:, :2], axis=1), 1e-9)
    return radius_m * j1(2 * np.pi * radius_m * kr) / kr * np.exp(
        -2j * np.pi * k_per_m[:, :2] @ centre_m)


def _synthetic_pair(tmp_path: Path, seq_path: Path, *, delay_cycles: float = 0.0,
                    phase_rad: float = 0.0, fov_m: float = 0.22, radius_m: float = 0.045,
                    segments: int = 1, quaternion: tuple[float, ...] | None = None,
                    position_lps_mm: tuple[float, float, float] | None = None) -> Path:
    """A twix (SE file's VE header, one channel) whose readouts sample a disk at the .seq's
    k-space; readouts running towards -kx are shifted by ``delay_cycles`` cycles/FOV
    along their direction and rotated by ``phase_rad`` (an odd/even EPI error). Each
    readout is written as ``segments`` data blocks (split ADCs); ``quaternion`` and
    ``position_lps_mm`` replace the MDH slice data."""
    twixtools = pytest.importorskip("twixtools")
    from mrharmony.formats.pulseq import read_pulseq

    seq = read_pulseq(seq_path)
    k = seq.kspace_at_adc()
    ns = np.array([r.num_samples for r in seq.adc_records()])
    off = np.concatenate(([0], np.cumsum(ns)))
    template = _read_twix(_p(SE[0]), keep_acqend=True)[0]
    mdbs = []
    for i in range(ns.size):
        kk = k[off[i]:off[i + 1]].copy()
        direction = np.sign(kk[-1, 0] - kk[0, 0]) or 1.0
        kk[:, 0] += direction * delay_cycles / fov_m
        sig = _disk(kk, radius_m, np.array([0.01, -0.02]))
        if direction < 0:
            sig = sig * np.exp(1j * phase_rad)
        for part in np.split(sig, segments):
            m = template["mdb"][0].convert_to_local()
            m.data = part[None].astype(np.complex64)
            m.clear_all_flags()
            m.add_flag("ONLINE")
            sd = m.mdh.SliceData
            if quaternion is not None:
                for j, q in enumerate(quaternion):
                    sd.Quaternion[j] = q
            if position_lps_mm is not None:
                sd.SlicePos.Sag, sd.SlicePos.Cor, sd.SlicePos.Tra = position_lps_mm
            mdbs.append(m)
    scan = {key: template[key] for key in ("hdr", "hdr_str", "raidfile_hdr")}
    scan["mdb"] = [*mdbs, template["mdb"][-1]]
    path = tmp_path / f"{seq_path.stem}.dat"
    with contextlib.redirect_stdout(io.StringIO()):
        twixtools.write_twix([scan], str(path), version_is_ve=True)
    return path


def _ideal_disk_image(n: int, fov_m: float = 0.22, radius_m: float = 0.045) -> np.ndarray:
    g = (np.arange(n) - n // 2) / fov_m
    kx, ky = np.meshgrid(g, g, indexing="ij")
    k = np.stack([kx.ravel(), ky.ravel()], axis=1)
    spectrum = _disk(k, radius_m, np.array([0.01, -0.02])).reshape(n, n)
    return np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(spectrum))))


def _pypulseq_ramp_epi(path: Path, n: int = 32, fov: float = 0.22, ro_os: int = 2) -> int:
    """Single-shot EPI as pypulseq's ramp-sampling example writes it: no labels, ADC over
    the ramps, ``ro_os``-fold oversampled, blips between the readouts."""
    pp = pytest.importorskip("pypulseq")
    system = pp.Opts(max_grad=32, grad_unit="mT/m", max_slew=130, slew_unit="T/m/s",
                     rf_ringdown_time=30e-6, rf_dead_time=100e-6)
    seq = pp.Sequence(system)
    rf, gz, _ = pp.make_sinc_pulse(flip_angle=np.pi / 2, system=system, duration=2e-3,
                                   slice_thickness=4e-3, apodization=0.5, time_bw_product=4,
                                   delay=system.rf_dead_time, return_gz=True)
    dk = 1 / fov
    readout_time = 4.2e-4
    blip = np.ceil(2 * np.sqrt(dk / system.max_slew) / 10e-6 / 2) * 10e-6 * 2
    gy = pp.make_trapezoid("y", system=system, area=-dk, duration=blip)
    gx = pp.make_trapezoid("x", system=system, duration=readout_time + blip,
                           area=n * dk + blip / 2 * blip / 2 * system.max_slew)
    actual = gx.area - gx.amplitude / gx.rise_time * (blip / 2) ** 2 / 2 \
        - gx.amplitude / gx.fall_time * (blip / 2) ** 2 / 2
    gx.amplitude = gx.amplitude / actual * n * dk
    gx.area = gx.amplitude * (gx.flat_time + gx.rise_time / 2 + gx.fall_time / 2)
    gx.flat_area = gx.amplitude * gx.flat_time
    dwell = np.floor(dk / gx.amplitude / ro_os * 1e7) * 1e-7
    samples = int(np.floor(readout_time / dwell / 4) * 4)
    adc = pp.make_adc(num_samples=samples, dwell=dwell, delay=blip / 2)
    adc.delay = np.round((gx.rise_time + gx.flat_time / 2 - dwell * samples / 2) * 1e6) * 1e-6
    parts = pp.split_gradient_at(grad=gy, time_point=blip / 2, system=system)
    up, down, _ = pp.align(right=parts[0], left=[parts[1], gx])
    downup = pp.add_gradients((down, up), system=system)
    seq.add_block(rf, gz)
    seq.add_block(pp.make_trapezoid("x", system=system, area=-gx.area / 2),
                  pp.make_trapezoid("y", system=system, area=n / 2 * dk),
                  pp.make_trapezoid("z", system=system, area=-gz.area / 2))
    for i in range(n):
        seq.add_block(gx, up if i == 0 else down if i == n - 1 else downup, adc)
        gx.amplitude = -gx.amplitude
    seq.set_definition("FOV", [fov, fov, 4e-3])
    seq.set_definition("Name", "epi_rs")
    seq.write(str(path))
    return samples


def test_ramp_sampled_oversampled_epi_without_labels(tmp_path: Path) -> None:
    from mrharmony.formats.twix import read_twix_raw
    from mrharmony.recon.pipeline import reconstruct

    seq_path = tmp_path / "epi_rs.seq"
    samples = _pypulseq_ramp_epi(seq_path)
    raw = read_twix_raw(_synthetic_pair(tmp_path, seq_path), seq_path)
    enc = raw.header.encoding[0]
    assert enc.trajectory.value == "epi"
    assert (enc.encodedSpace.matrixSize.x, enc.reconSpace.matrixSize.x) == (samples, 32)
    assert enc.reconSpace.fieldOfView_mm.x == pytest.approx(220.0)
    assert all(a.data.shape == (1, samples) for a in raw.acquisitions)  # nothing cropped
    image = np.abs(reconstruct(raw, backend="numpy")[0].data).squeeze()
    assert image.shape == (32, 32)
    nrmse = _nrmse(image, _ideal_disk_image(32))
    assert nrmse < 0.02, nrmse


def test_our_epi_builder_with_navigators_corrects_the_ghost(tmp_path: Path) -> None:
    from mrharmony.formats.twix import read_twix_raw
    from mrharmony.recon.pipeline import reconstruct
    from mrharmony.sequences import build_file
    from mrharmony.sequences.protocol import protocol_from_mapping

    proto = protocol_from_mapping({
        "builder": "epi", "name": "ramp", "fov_mm": [220, 220], "matrix": [48, 48],
        "slice_thickness_mm": 4, "n_slices": 1, "te_ms": 30, "tr_ms": 100, "dummy_scans": 0,
        "ramp_sampling": True, "navigator_lines": 3,
    })
    _, seq_path = build_file(proto, "siemens-skyra", tmp_path / "ramp.seq")
    dat = _synthetic_pair(tmp_path, seq_path, delay_cycles=0.5, phase_rad=0.4)
    raw = read_twix_raw(dat, seq_path)
    nav = [a for a in raw.acquisitions if has_flag(int(a.flags), "IS_PHASECORR_DATA")]
    assert len(nav) == 3 and len(raw.acquisitions) == 51
    image = np.abs(reconstruct(raw, backend="numpy")[0].data).squeeze()
    assert image.shape == (48, 48)
    assert _ghost_to_signal(image) < 0.05
    assert _nrmse(image, _ideal_disk_image(48)) < 0.1


def _builder_seq(tmp_path: Path, **overrides) -> Path:
    from mrharmony.sequences import build_file
    from mrharmony.sequences.protocol import protocol_from_mapping

    mapping = {
        "builder": "epi", "name": "ramp", "fov_mm": [220, 220], "matrix": [48, 48],
        "slice_thickness_mm": 4, "n_slices": 1, "te_ms": 30, "tr_ms": 100, "dummy_scans": 0,
        "ramp_sampling": True, "navigator_lines": 0,
    }
    mapping.update(overrides)
    mapping = {k: v for k, v in mapping.items() if v is not None}
    _, path = build_file(protocol_from_mapping(mapping), "siemens-skyra",
                         tmp_path / f"{mapping['name']}.seq")
    return path


def test_split_adcs_are_joined(tmp_path: Path) -> None:
    from mrharmony.formats.twix import read_twix_raw

    seq_path = _builder_seq(tmp_path)
    whole = read_twix_raw(_synthetic_pair(tmp_path, seq_path), seq_path)
    split_dir = tmp_path / "split"
    split_dir.mkdir()
    split = read_twix_raw(_synthetic_pair(split_dir, seq_path, segments=2), seq_path)
    assert len(split.acquisitions) == len(whole.acquisitions) == 48
    for a, b in zip(split.acquisitions, whole.acquisitions, strict=True):
        np.testing.assert_array_equal(a.data, b.data)


def test_oblique_multislice_geometry_from_the_mdh(tmp_path: Path) -> None:
    """Slices of the .seq at +-2.5 mm (SlicePositions), prescribed 30 degrees in-plane
    rotated about the transversal normal and shifted: directions are the rotation of the
    default frame, positions the MDH centre plus the .seq's offsets along the normal."""
    from mrharmony.formats.twix import read_twix_raw
    from mrharmony.recon.output import stack_volume
    from mrharmony.recon.pipeline import reconstruct

    seq_path = _builder_seq(tmp_path, n_slices=2, slice_gap_mm=1)
    angle = np.deg2rad(30.0)
    # default transversal quaternion (cos 45, 0, 0, sin 45) followed by +30 deg about z
    half = np.pi / 4 + angle / 2
    centre = (12.0, -7.0, 20.0)
    dat = _synthetic_pair(tmp_path, seq_path, quaternion=(np.cos(half), 0, 0, np.sin(half)),
                          position_lps_mm=centre)
    raw = read_twix_raw(dat, seq_path)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                    [0, 0, 1]])
    slices = sorted({int(a.idx.slice) for a in raw.acquisitions})
    assert slices == [0, 1]
    for a in raw.acquisitions:
        np.testing.assert_allclose(a.read_dir[:], rot[:, 0], atol=1e-5)
        np.testing.assert_allclose(a.phase_dir[:], rot[:, 1], atol=1e-5)
        np.testing.assert_allclose(a.slice_dir[:], [0, 0, 1], atol=1e-5)
    z = sorted({round(float(a.position[2]), 3) for a in raw.acquisitions})
    np.testing.assert_allclose(z, [centre[2] - 2.5, centre[2] + 2.5], atol=1e-3)
    images = reconstruct(raw, backend="numpy")
    volume, affine = stack_volume(images)
    assert volume.shape == (48, 48, 2)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [220 / 48, 220 / 48, 5],
                               atol=1e-4)


def test_radial_trajectories_come_from_the_seq(tmp_path: Path) -> None:
    from mrharmony.formats.twix import read_twix_raw
    from mrharmony.recon.pipeline import reconstruct

    seq_path = _builder_seq(tmp_path, builder="radial", name="radial", fov_mm=[220, 220],
                            matrix=[32, 32], n_slices=1, slice_thickness_mm=5, te_ms=4,
                            tr_ms=8, flip_deg=12, n_spokes=64, angle_ordering="golden",
                            readout_bandwidth_hz_per_px=400, readout_oversampling=2,
                            dummy_scans=0, ramp_sampling=None, navigator_lines=None)
    raw = read_twix_raw(_synthetic_pair(tmp_path, seq_path), seq_path)
    assert raw.header.encoding[0].trajectory.value != "cartesian"
    assert len(raw.acquisitions) == 64 and raw.acquisitions[0].traj.shape[1] == 2
    image = np.abs(reconstruct(raw, backend="numpy")[0].data).squeeze()
    assert image.shape == (32, 32)
    assert _nrmse(image, _ideal_disk_image(32)) < 0.2
