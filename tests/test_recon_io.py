"""ISMRMRD input, sorting, flags, prewhitening, the C++ reference recon, bad input, CLI.

Helpers here (``make_header``, ``make_acquisitions``, ``write_raw``) are reused by the
other ``test_recon_*`` files.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd as mrd
import numpy as np
import pytest

from mrharmony.errors import RawDataError, ReconError
from mrharmony.formats.raw import read_raw
from mrharmony.recon import reconstruct, reconstruct_acquisitions, write_nifti
from mrharmony.recon.cartesian import fft_c, ifft_c
from mrharmony.recon.io import sort_cartesian

from metrics import nrmse, scaled_nrmse

FLAG_NOISE, FLAG_CALIB, FLAG_REVERSE = 19, 20, 22


def make_header(nx: int, ny: int, *, nz: int = 1, os_: int = 1, fov_mm=(256.0, 256.0, 5.0),
                coils: int = 4, te_ms=(5.0,), ti_ms=None, center_y: int | None = None):
    """A minimal Cartesian ISMRMRD header (encoded x = os_ * nx)."""
    enc = mrd.encodingType(
        encodedSpace=mrd.encodingSpaceType(
            matrixSize=mrd.matrixSizeType(x=nx * os_, y=ny, z=nz),
            fieldOfView_mm=mrd.fieldOfViewMm(x=fov_mm[0] * os_, y=fov_mm[1], z=fov_mm[2])),
        reconSpace=mrd.encodingSpaceType(
            matrixSize=mrd.matrixSizeType(x=nx, y=ny, z=nz),
            fieldOfView_mm=mrd.fieldOfViewMm(x=fov_mm[0], y=fov_mm[1], z=fov_mm[2])),
        encodingLimits=mrd.encodingLimitsType(
            kspace_encoding_step_1=mrd.limitType(
                minimum=0, maximum=ny - 1, center=ny // 2 if center_y is None else center_y)),
        trajectory=mrd.trajectoryType.CARTESIAN,
    )
    params = mrd.sequenceParametersType(TR=[20.0], TE=list(te_ms), flipAngle_deg=[15.0],
                                        sequence_type="test")
    if ti_ms is not None:
        params.TI = list(ti_ms)
    return mrd.ismrmrdHeader(
        acquisitionSystemInformation=mrd.acquisitionSystemInformationType(
            systemFieldStrength_T=3.0, systemVendor="TestVendor", receiverChannels=coils),
        experimentalConditions=mrd.experimentalConditionsType(H1resonanceFrequency_Hz=127728000),
        encoding=[enc], sequenceParameters=params)


def make_acquisitions(kspace: np.ndarray, *, lines=None, slice_=0, contrast=0, set_=0,
                      position=(0.0, 0.0, 0.0), read=(1, 0, 0), phase=(0, 1, 0),
                      slice_dir=(0, 0, 1), flags_for=None, partition=0):
    """One acquisition per sampled ky line of ``kspace`` (coils, nx, ny)."""
    _nc, nx, ny = kspace.shape
    out = []
    for y in (range(ny) if lines is None else lines):
        a = ismrmrd.Acquisition.from_array(np.ascontiguousarray(kspace[:, :, y]))
        a.idx.kspace_encode_step_1 = int(y)
        a.idx.kspace_encode_step_2 = int(partition)
        a.idx.slice, a.idx.contrast, a.idx.set = slice_, contrast, set_
        a.center_sample = nx // 2
        a.sample_time_us = 5.0
        a.position[:] = position
        a.read_dir[:] = read
        a.phase_dir[:] = phase
        a.slice_dir[:] = slice_dir
        if flags_for is not None:
            for f in flags_for(y):
                a.set_flag(f)
        out.append(a)
    return out


def write_raw(path: Path, header, acquisitions) -> Path:
    ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    ds.write_xml_header(mrd.ToXML(header))
    for a in acquisitions:
        ds.append_acquisition(a)
    ds.close()
    return path


def phantom(n: int, seed: int = 0) -> np.ndarray:
    """Smooth complex test object (a few ellipses with a slow phase)."""
    import sigpy as sp

    img = sp.shepp_logan((n, n)).astype(np.complex64)
    y, x = np.mgrid[:n, :n] / n
    return (img * np.exp(1j * (x - y))).astype(np.complex64)


needs_ismrmrd_tools = pytest.mark.skipif(
    shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None
    or shutil.which("ismrmrd_recon_cartesian_2d") is None,
    reason="ismrmrd-tools (ismrmrd_generate_cartesian_shepp_logan) is not installed",
)


@needs_ismrmrd_tools
def test_shepp_logan_matches_cpp_reference_recon(tmp_path):
    path = tmp_path / "sl.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "64", "-c", "4",
                    "-o", str(path)], check=True, capture_output=True, cwd=tmp_path)
    subprocess.run(["ismrmrd_recon_cartesian_2d", str(path)], check=True,
                   capture_output=True, cwd=tmp_path)
    with h5py.File(path, "r") as f:
        ref = f["dataset/cpp/data"][0, 0, 0]  # (y, x) magnitude, oversampling removed
    raw = read_raw(path)
    assert len(raw.acquisitions) == 64 and raw.acquisitions[0].data.shape == (4, 128)
    images = reconstruct(raw, backend="numpy")
    assert len(images) == 1 and images[0].shape == (64, 64, 1)
    ours = np.abs(images[0].data[:, :, 0]).T
    # the C++ tool: unnormalised FFT + root sum of squares; equal after one scale factor
    assert scaled_nrmse(ours, ref) < 1e-4


@needs_ismrmrd_tools
def test_shepp_logan_noise_scans_are_used_for_prewhitening(tmp_path):
    path = tmp_path / "sln.h5"
    subprocess.run(["ismrmrd_generate_cartesian_shepp_logan", "-m", "32", "-c", "4", "-C",
                    "-o", str(path)], check=True, capture_output=True, cwd=tmp_path)
    raw = read_raw(path)
    assert len(raw.noise) == 1 and len(raw.acquisitions) == 32
    images = reconstruct(raw, backend="numpy")
    assert images[0].meta["recon"]["prewhitened"] is True


def test_prewhitening_makes_noise_white():
    rng = np.random.default_rng(1)
    nc, n = 4, 20000
    mix = rng.standard_normal((nc, nc)) + 1j * rng.standard_normal((nc, nc))
    noise = mix @ (rng.standard_normal((nc, n)) + 1j * rng.standard_normal((nc, n)))
    acq = ismrmrd.Acquisition.from_array(noise.astype(np.complex64))
    acq.sample_time_us = 5.0
    from mrharmony.recon.io import noise_prewhitener

    w = noise_prewhitener([acq])
    white = w @ noise
    cov = white @ white.conj().T / (n - 1)
    # sample covariance of the same samples: identity to float32 rounding
    np.testing.assert_allclose(cov, np.eye(nc), atol=1e-4)


def test_sorting_honours_reverse_calibration_and_averages():
    rng = np.random.default_rng(2)
    nc, nx, ny = 2, 16, 16
    k = (rng.standard_normal((nc, nx, ny)) + 1j * rng.standard_normal((nc, nx, ny))).astype(
        np.complex64)
    header = make_header(nx, ny, coils=nc)
    acqs = make_acquisitions(k)
    # line 3 is stored reversed and flagged; line 5 comes twice (averages) with +/- offset
    acqs[3].data[:] = k[:, ::-1, 3]
    acqs[3].set_flag(FLAG_REVERSE)
    extra = make_acquisitions(k + 1, lines=[5])[0]
    acqs[5].data[:] = k[:, :, 5] - 1
    calib_only = make_acquisitions(2 * k, lines=[8], flags_for=lambda y: [FLAG_CALIB])[0]
    buf = sort_cartesian(header, [*acqs, extra, calib_only])[(0, 0, 0, 0)]
    np.testing.assert_allclose(buf.kspace[..., 0], k, rtol=0, atol=1e-6)
    assert buf.calib is not None and buf.calib_mask[8, 0] and buf.calib_mask.sum() == 1
    np.testing.assert_allclose(buf.calib[:, :, 8, 0], 2 * k[:, :, 8], atol=1e-6)


def test_asymmetric_echo_and_partial_fourier_pocs():
    n = 64
    img = np.abs(phantom(n)).astype(np.complex64) * np.exp(1j * 0.3)  # smooth (constant) phase
    k = fft_c(img[None], axes=(1, 2))
    lines = list(range(n // 2 - 8, n))  # 5/8 partial Fourier along ky (upper half + 8)
    header = make_header(n, n, coils=1, center_y=n // 2)
    images = reconstruct_acquisitions(header, make_acquisitions(k, lines=lines), method="fft")
    rec = images[0].data[:, :, 0]
    assert images[0].meta["recon"]["partial_fourier"] == "pocs-ky"
    zero_filled = ifft_c(k[0] * (np.arange(n) >= n // 2 - 8)[None, :])
    # POCS restores the missing half for a constant-phase object far better than zero filling
    assert nrmse(np.abs(rec), np.abs(img)) < 0.3 * nrmse(np.abs(zero_filled), np.abs(img))
    assert nrmse(np.abs(rec), np.abs(img)) < 0.02


def test_homodyne_and_kspace_filter():
    from mrharmony.recon.cartesian import homodyne, kspace_filter

    n = 64
    img = np.abs(phantom(n)).astype(np.complex64) * np.exp(1j * 0.7)
    k = fft_c(img, axes=(0, 1))
    sampled = np.arange(n) >= n // 2 - 10
    rec = homodyne(k * sampled[None, :], sampled, axis=1)
    zero_filled = np.abs(ifft_c(k * sampled[None, :], axes=(0, 1)))
    # constant-phase object: homodyne returns its magnitude up to the step-filter ringing at
    # the sharp Shepp-Logan edges (measured 9 %), far better than zero filling
    err = nrmse(rec, np.abs(img))
    assert err < 0.12 and err < 0.6 * nrmse(zero_filled, np.abs(img))
    filtered = kspace_filter(k[None], kind="hann", axes=(1, 2))
    # the Hann window is 1 at the k-space centre and tapers to ~0 at the edge
    assert filtered[0, n // 2, n // 2] == pytest.approx(k[n // 2, n // 2], rel=1e-6)
    assert abs(filtered[0, 0, n // 2]) < 1e-3 * abs(k[0, n // 2]) + 1e-12
    with pytest.raises(ReconError, match="kind"):
        kspace_filter(k[None], kind="box")


def test_multi_echo_header_from_our_sequences_gives_te_per_contrast():
    from mrharmony.sequences.header import ismrmrd_header

    root = Path(__file__).resolve().parents[1] / "examples" / "protocols"
    header = ismrmrd_header(root / "mese.toml", "siemens-prisma", receiver_channels=2)
    te = list(header.sequenceParameters.TE)
    nx = header.encoding[0].encodedSpace.matrixSize.x
    ny = header.encoding[0].encodedSpace.matrixSize.y
    assert len(te) >= 2
    k = np.zeros((2, nx, ny), np.complex64)
    k[:, nx // 2, ny // 2] = 1.0
    acqs = []
    for echo in range(2):
        acqs += make_acquisitions(k * (echo + 1), contrast=echo)
    images = reconstruct_acquisitions(header, acqs, method="fft")
    assert [im.contrast for im in images] == [0, 1]
    assert [im.meta["te_ms"] for im in images] == pytest.approx(te[:2])
    assert images[0].meta["sequence_name"] == "mese"
    assert images[0].meta["field_strength_t"] == pytest.approx(3.0)


# ---------------------------------------------------------------- bad input


def test_not_hdf5_is_rawdataerror(tmp_path):
    p = tmp_path / "x.h5"
    p.write_text("hello")
    with pytest.raises(RawDataError, match="not an HDF5"):
        read_raw(p)
    with pytest.raises(RawDataError, match="no such file"):
        read_raw(tmp_path / "missing.h5")


def test_missing_header_is_rawdataerror(tmp_path):
    p = tmp_path / "nohdr.h5"
    ds = ismrmrd.Dataset(str(p), "dataset", create_if_needed=True)
    ds.append_acquisition(make_acquisitions(np.ones((1, 8, 8), np.complex64))[0])
    ds.close()
    with pytest.raises(RawDataError, match="header"):
        read_raw(p)


def test_inconsistent_counters_are_rawdataerror(tmp_path):
    k = np.ones((2, 16, 16), np.complex64)
    acqs = make_acquisitions(k)
    acqs[7].idx.kspace_encode_step_1 = 40
    p = write_raw(tmp_path / "bad.h5", make_header(16, 16, coils=2), acqs)
    with pytest.raises(RawDataError, match="kspace_encode_step_1 outside"):
        read_raw(p)


def test_zero_size_acquisition_is_rawdataerror(tmp_path):
    acqs = make_acquisitions(np.ones((2, 16, 16), np.complex64))
    empty = ismrmrd.Acquisition()
    p = write_raw(tmp_path / "empty.h5", make_header(16, 16, coils=2), [*acqs, empty])
    with pytest.raises(RawDataError, match="empty"):
        read_raw(p)


def test_cli_bad_input_leaves_no_output(tmp_path):
    from mrharmony.cli import main

    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x00" * 100)
    out = tmp_path / "out.nii.gz"
    assert main(["recon", str(bad), "-o", str(out)]) == 2
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_cli_writes_nifti_and_sidecar_and_refuses_overwrite(tmp_path):
    import json

    import nibabel as nib

    from mrharmony.cli import main

    n = 32
    k = fft_c(np.stack([phantom(n)] * 2), axes=(1, 2))
    p = write_raw(tmp_path / "r.h5", make_header(n, n, coils=2), make_acquisitions(k))
    out = tmp_path / "img.nii.gz"
    assert main(["recon", str(p), "-o", str(out), "--backend", "numpy"]) == 0
    img = nib.load(out)
    assert img.shape == (n, n, 1)
    side = json.loads((tmp_path / "img.json").read_text())
    assert side["EchoTime"] == pytest.approx(0.005)
    assert side["RepetitionTime"] == pytest.approx(0.02)
    assert side["MagneticFieldStrength"] == 3.0 and side["FlipAngle"] == 15.0
    assert side["ReconstructionSettings"]["method"] == "fft"
    assert main(["recon", str(p), "-o", str(out)]) == 2  # exists, no --force
    assert main(["recon", str(p), "-o", str(out), "--force", "--write-mrd"]) == 0
    with h5py.File(p, "r") as f:
        assert "mrharmony" in f["dataset"]


def test_unknown_method_and_backend_are_named():
    header = make_header(8, 8, coils=1)
    acqs = make_acquisitions(np.ones((1, 8, 8), np.complex64))
    with pytest.raises(ReconError, match="method 'magic'"):
        reconstruct_acquisitions(header, acqs, method="magic")
    with pytest.raises(ReconError, match="backend 'gpu'"):
        reconstruct_acquisitions(header, acqs, backend="gpu")
    with pytest.raises(ReconError, match="several receive coils"):
        reconstruct_acquisitions(header, acqs, method="sense")


def test_write_nifti_refuses_overwrite(tmp_path):
    header = make_header(8, 8, coils=1)
    images = reconstruct_acquisitions(header, make_acquisitions(np.ones((1, 8, 8), np.complex64)))
    out = tmp_path / "a.nii"
    write_nifti(images, out)
    with pytest.raises(FileExistsError):
        write_nifti(images, out)
    assert write_nifti(images, out, force=True)[0] == out


def test_radial_dispatches_to_noncartesian_recon():
    pytest.importorskip("mrharmony.recon.noncartesian", reason="non-Cartesian recon not built yet")
    n, spokes, nc = 32, 48, 2
    header = make_header(n, spokes, os_=2, coils=nc)
    header.encoding[0].trajectory = mrd.trajectoryType.RADIAL
    header.encoding[0].encodedSpace.matrixSize.y = n
    header.encoding[0].reconSpace.matrixSize.y = n  # limits keep 48 spokes in step_1
    # a point source at the isocentre: every sample of every spoke is 1
    k = np.ones((nc, 2 * n, spokes), np.complex64)
    acqs = make_acquisitions(k, position=(5.0, -3.0, 2.0))
    images = reconstruct_acquisitions(header, acqs, method="auto")
    assert len(images) == 1 and images[0].shape == (n, n, 1)
    assert images[0].meta["recon"]["method"] == "gridding"
    peak = np.unravel_index(np.argmax(np.abs(images[0].data)), images[0].shape)
    assert peak == (n // 2, n // 2, 0)
    np.testing.assert_allclose(images[0].position, [5.0, -3.0, 2.0])
