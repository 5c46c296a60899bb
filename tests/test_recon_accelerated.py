"""Accelerated Cartesian data from the header and flags alone: GRAPPA and SENSE.

Two kinds of data:

- the ISMRMRD C++ tools' Shepp-Logan (``ismrmrd_generate_cartesian_shepp_logan -a R -w 32``:
  calibrationMode "interleaved", one undersampling offset per repetition, 32 ACS lines
  per repetition flagged PARALLEL_CALIBRATION (off the lattice) and
  PARALLEL_CALIBRATION_AND_IMAGING (on it), readout oversampling 2); the reference is
  the same generator with ``-a 1`` (fully sampled, same options), reconstructed by FFT
  and sum of squares;
- synthetic data with 8 known (normalised birdcage) coil sensitivities for each
  calibration mode (embedded, interleaved, separate) and for 3-D acceleration along
  ky and kz; the reference is the object's magnitude (``sum_c |S_c|^2 = 1``).

NRMSE here is ``||s |x| - |ref||| / ||ref||`` on magnitude images, with ``s`` the
least-squares scale of ``|x|`` onto ``|ref|`` (SENSE and sum of squares differ by a
global factor with noise-whitened or unnormalised maps).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import ismrmrd
import ismrmrd.xsd as mrd
import nibabel as nib
import numpy as np
import pytest
from test_recon_io import make_header, phantom

from mrharmony.formats.flags import flag_mask
from mrharmony.formats.raw import RawData, read_raw
from mrharmony.recon import reconstruct
from mrharmony.recon.cartesian import fft_c, ifft_c
from mrharmony.recon.coils import sos
from mrharmony.recon.io import sort_cartesian

CALIB = flag_mask("IS_PARALLEL_CALIBRATION")
CALIB_AND_IMAGING = flag_mask("IS_PARALLEL_CALIBRATION_AND_IMAGING")

needs_generator = pytest.mark.skipif(
    shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None,
    reason="ismrmrd_generate_cartesian_shepp_logan (ISMRMRD C++ tools) is not installed",
)


def scaled_nrmse(x: np.ndarray, ref: np.ndarray) -> float:
    """NRMSE of ``|x|`` against ``|ref|`` after the least-squares scale (see module doc)."""
    a, b = np.abs(x).ravel(), np.abs(ref).ravel()
    s = float(a @ b) / float(a @ a)
    return float(np.linalg.norm(s * a - b) / np.linalg.norm(b))


# ------------------------------------------------------------------ the C++ generator

MATRIX, NOISE = 128, 0.005  # the tool's default noise (0.05) dominates any R = 3 recon


def _generate(tmp_path, accel: int, noise_cal: bool):
    name = f"sl_a{accel}{'_C' if noise_cal else ''}.h5"
    path = tmp_path / name
    cmd = ["ismrmrd_generate_cartesian_shepp_logan", "-m", str(MATRIX), "-c", "8",
           "-a", str(accel), "-n", str(NOISE), "-o", str(path)]
    if accel > 1:
        cmd += ["-w", "32"]
    if noise_cal:
        cmd.append("-C")
    subprocess.run(cmd, check=True, capture_output=True, cwd=tmp_path)
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["no-noise-cal", "noise-cal"])
def generated(request, tmp_path_factory):
    """``(noise_cal, {R: path})`` for R = 1 (reference), 2, 3."""
    if shutil.which("ismrmrd_generate_cartesian_shepp_logan") is None:
        pytest.skip("ismrmrd_generate_cartesian_shepp_logan (ISMRMRD C++ tools) is not "
                    "installed")
    tmp = tmp_path_factory.mktemp("cpp")
    return request.param, {r: _generate(tmp, r, request.param) for r in (1, 2, 3)}


@needs_generator
@pytest.mark.parametrize("accel", [2, 3])
def test_cpp_generator_accelerated_every_method_api_and_cli(generated, accel, tmp_path):
    from mrharmony.cli import main

    noise_cal, paths = generated
    full = reconstruct(read_raw(paths[1]), method="fft", backend="numpy")
    assert len(full) == 1
    ref = full[0].data[:, :, 0]
    raw = read_raw(paths[accel])
    header = raw.header.encoding[0].parallelImaging
    assert header.calibrationMode.value == "interleaved"
    assert int(header.accelerationFactor.kspace_encoding_step_1) == accel
    assert len(raw.noise) == (1 if noise_cal else 0)
    # zero filling aliases badly: the bar below is far from it
    zero = reconstruct(raw, method="fft", backend="numpy")
    assert len(zero) == accel and zero[0].meta["recon"]["zero_filled"] is True
    assert min(scaled_nrmse(im.data[:, :, 0], ref) for im in zero) > 0.4
    for method in ("auto", "grappa", "sense"):
        images = reconstruct(raw, method=method, backend="numpy")
        # one image per repetition (= undersampling offset), oversampling removed
        assert [im.repetition for im in images] == list(range(accel))
        assert all(im.shape == (MATRIX, MATRIX, 1) for im in images)
        errors = [scaled_nrmse(im.data[:, :, 0], ref) for im in images]
        assert max(errors) < 0.1, (method, errors)
        rec = images[0].meta["recon"]
        assert rec["method"] == ("sense" if method == "auto" else method)
        assert rec["acceleration"] == [accel, 1]
        assert rec["calibration"]["mode"] == "interleaved"
        assert rec["calibration"]["source"] == "calibration lines of all repetitions"
        assert rec["calibration"]["lines"] == [32, 1]
        assert rec["prewhitened"] is noise_cal
        # the same through the CLI: a 4-D NIfTI (one volume per repetition) + sidecar
        out = tmp_path / f"{method}.nii.gz"
        assert main(["recon", str(paths[accel]), "-o", str(out), "--method", method,
                     "--backend", "numpy"]) == 0
        vol = np.asarray(nib.load(out).dataobj)
        assert vol.shape == (MATRIX, MATRIX, 1, accel)
        for rep, im in enumerate(images):
            assert scaled_nrmse(vol[:, :, 0, rep], np.abs(im.data[:, :, 0])) < 1e-5
            assert scaled_nrmse(vol[:, :, 0, rep], ref) < 0.1
        side = json.loads(out.with_name(f"{method}.json").read_text())["ReconstructionSettings"]
        assert side["method"] == rec["method"]
        if rec["method"] == "grappa":
            assert side["grappa"]["kernel_kx"] == 5 and side["grappa"]["kernel_lines"] == 4
            assert side["grappa"]["lamda"] == pytest.approx(1e-3)
            assert side["coil_combination"] == "sum of squares"
        else:
            assert side["lamda"] == 0.0 and side["max_iter"] == 30
            assert side["coil_maps"]["method"] == "espirit"
            assert side["coil_combination"] == "sense (espirit maps)"
        if method == "auto":
            assert side["auto"].startswith(f"undersampled (R={accel}x1)")


# ------------------------------------------------------------------ synthetic data

N, NC = 96, 8


def _maps(shape: tuple[int, ...]) -> np.ndarray:
    import sigpy.mri as mr

    mps = mr.birdcage_maps((NC, *shape)).astype(np.complex64)
    return mps / np.sqrt(np.sum(np.abs(mps) ** 2, axis=0))


def _header(ny: int, nz: int, *, accel: tuple[int, int] | None, mode: str | None):
    """2x readout oversampling; parallelImaging as given (None: no element at all)."""
    header = make_header(N, ny, nz=nz, os_=2, coils=NC)
    enc = header.encoding[0]
    if nz > 1:
        enc.encodingLimits.kspace_encoding_step_2 = mrd.limitType(
            minimum=0, maximum=nz - 1, center=nz // 2)
    if accel is not None:
        enc.parallelImaging = mrd.parallelImagingType(
            accelerationFactor=mrd.accelerationFactorType(
                kspace_encoding_step_1=accel[0], kspace_encoding_step_2=accel[1]),
            calibrationMode=None if mode is None else mrd.calibrationModeType(mode))
    return header


def _object(ny: int, nz: int) -> np.ndarray:
    """Complex Shepp-Logan (N, ny, nz) with a slow phase, inside the unaliased central
    half of the (2x oversampled) readout FOV."""
    import sigpy as sp

    if nz == 1:
        return phantom(N)[:, :ny, None]
    img = sp.shepp_logan((N, ny, nz)).astype(np.complex64)
    x, y = np.mgrid[:N, :ny] / N
    return (img * np.exp(1j * (x - y))[:, :, None]).astype(np.complex64)


def _kspace(obj: np.ndarray, maps: np.ndarray, seed: int) -> np.ndarray:
    """Oversampled (2N readout) coil k-space (coils, 2N, ny, nz) with seeded noise."""
    over = np.zeros((2 * N, *obj.shape[1:]), np.complex64)
    over[N // 2:N // 2 + N] = obj
    k = fft_c(maps * over[None], axes=(1, 2, 3))
    rng = np.random.default_rng(seed)
    sigma = 2e-4 * float(np.abs(k).max())
    return (k + sigma * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
            ).astype(np.complex64)


def _acqs(k: np.ndarray, cells, *, flags: int = 0, repetition: int = 0) -> list:
    """One acquisition per ``(y, z)`` of ``cells`` from k (coils, nx, ny, nz)."""
    out = []
    nx = k.shape[1]
    for y, z in cells:
        a = ismrmrd.Acquisition.from_array(np.ascontiguousarray(k[:, :, y, z]))
        a.idx.kspace_encode_step_1, a.idx.kspace_encode_step_2 = int(y), int(z)
        a.idx.repetition = repetition
        a.center_sample = nx // 2
        a.sample_time_us = 5.0
        a.read_dir[:], a.phase_dir[:], a.slice_dir[:] = (1, 0, 0), (0, 1, 0), (0, 0, 1)
        a.flags = int(flags)
        out.append(a)
    return out


def _lattice(ny: int, r: int, offset: int = 0) -> list[int]:
    return list(range(offset, ny, r))


def _acs(ny: int, width: int) -> list[int]:
    return list(range(ny // 2 - width // 2, ny // 2 + width // 2))


@pytest.fixture(scope="module")
def maps2d():
    return _maps((2 * N, N))[..., None]


@pytest.mark.parametrize("accel", [2, 3])
def test_embedded_acs_flagged_calibration_and_imaging(maps2d, accel):
    """Embedded: a fully sampled ACS block inside the undersampled scan, the ACS lines
    flagged PARALLEL_CALIBRATION_AND_IMAGING; header with accelerationFactor."""
    obj = _object(N, 1)
    k = _kspace(obj, maps2d, seed=accel)
    lines = sorted(set(_lattice(N, accel)) | set(_acs(N, 24)))
    acs = set(_acs(N, 24))
    acqs = [a for y in lines for a in _acqs(
        k, [(y, 0)], flags=CALIB_AND_IMAGING if y in acs else 0)]
    raw = RawData(header=_header(N, 1, accel=(accel, 1), mode="embedded"), acquisitions=acqs)
    zero = reconstruct(raw, method="fft", backend="numpy")[0].data[:, :, 0]
    assert scaled_nrmse(zero, obj[:, :, 0]) > 0.2
    for method in ("auto", "grappa", "sense"):
        im = reconstruct(raw, method=method, backend="numpy")
        assert len(im) == 1 and im[0].shape == (N, N, 1)
        rec = im[0].meta["recon"]
        assert rec["calibration"]["source"] == "calibration lines of this image"
        assert rec["calibration"]["lines"] == [24, 1] and rec["acceleration_source"] == "header"
        assert scaled_nrmse(im[0].data[:, :, 0], obj[:, :, 0]) < 0.05, method


def test_embedded_acs_flagged_calibration_only_never_enters_the_image(maps2d):
    """ACS lines off the lattice flagged PARALLEL_CALIBRATION only (no header
    parallelImaging: R from the pattern): they calibrate, but the image k-space holds
    only the lattice, so a calibration line with wrong data cannot reach the image."""
    obj = _object(N, 1)
    k = _kspace(obj, maps2d, seed=7)
    lattice = _lattice(N, 2, offset=1)
    off = [y for y in _acs(N, 32) if y not in lattice]
    acqs = _acqs(k, [(y, 0) for y in lattice])
    acqs += _acqs(k, [(y, 0) for y in off], flags=CALIB)
    acqs += _acqs(k, [(y, 0) for y in lattice if y in _acs(N, 32)], flags=CALIB)
    header = _header(N, 1, accel=None, mode=None)
    buf = sort_cartesian(header, acqs)[(0, 0, 0, 0)]
    assert np.flatnonzero(buf.mask[:, 0]).tolist() == lattice
    for method in ("auto", "grappa", "sense"):
        im = reconstruct(RawData(header=header, acquisitions=acqs), method=method,
                         backend="numpy")[0]
        assert im.meta["recon"]["acceleration"] == [2, 1]
        assert im.meta["recon"]["acceleration_source"] == "sampling pattern"
        assert scaled_nrmse(im.data[:, :, 0], obj[:, :, 0]) < 0.05, method


@pytest.mark.parametrize("accel", [2, 3])
def test_interleaved_repetitions_calibrate_together(maps2d, accel):
    """Interleaved: no calibration flags at all; R repetitions, each with its own offset
    and its own small bright spot; together they fill k-space. Each repetition is
    reconstructed from its own lines with the pooled calibration, and shows its own spot."""
    base = _object(N, 1)
    ix, iy = np.mgrid[:N, :N]
    spots = [(N // 2 + 12 * (r - 1), N // 2 + 20) for r in range(accel)]
    acqs, truth = [], []
    for rep, (sx, sy) in enumerate(spots):
        spot = (ix - sx) ** 2 + (iy - sy) ** 2 <= 4
        obj = base + 0.2 * spot[:, :, None]
        k = _kspace(obj, maps2d, seed=10 + rep)
        acqs += _acqs(k, [(y, 0) for y in _lattice(N, accel, rep)], repetition=rep)
        truth.append(np.abs(obj[:, :, 0]))
    raw = RawData(header=_header(N, 1, accel=(accel, 1), mode="interleaved"),
                  acquisitions=acqs)
    for method in ("auto", "grappa", "sense"):
        images = reconstruct(raw, method=method, backend="numpy")
        assert [im.repetition for im in images] == list(range(accel))
        assert images[0].meta["recon"]["calibration"]["source"] == "lines of all repetitions"
        for rep, (im, ref) in enumerate(zip(images, truth, strict=True)):
            # the spots differ between repetitions, so the pooled calibration is not quite
            # consistent (measured up to 0.06 for SENSE at R = 3)
            assert scaled_nrmse(im.data[:, :, 0], ref) < 0.08, method
            # its own spot (+0.2), not the others' (images are on the object's scale)
            mag = np.abs(im.data[:, :, 0])
            own = mag[spots[rep]]
            others = [mag[s] for r, s in enumerate(spots) if r != rep]
            assert all(own > o + 0.1 for o in others), (method, rep, own, others)


def test_separate_reference_scan_in_the_first_repetition_only(maps2d):
    """Separate: a reference scan of calibration-only lines (another contrast of the
    object) before the first repetition; the imaging lattice has no ACS. The reference
    calibrates both repetitions and is never part of an image."""
    obj = _object(N, 1)
    ref_obj = np.abs(obj) ** 0.5 * np.exp(0.3j)  # a different image: would show if used
    kref = _kspace(ref_obj, maps2d, seed=21)
    acqs = _acqs(kref, [(y, 0) for y in _acs(N, 24)], flags=CALIB, repetition=0)
    for rep in range(2):
        k = _kspace(obj, maps2d, seed=22 + rep)
        acqs += _acqs(k, [(y, 0) for y in _lattice(N, 2, 0)], repetition=rep)
    raw = RawData(header=_header(N, 1, accel=(2, 1), mode="separate"), acquisitions=acqs)
    for method in ("auto", "grappa", "sense"):
        images = reconstruct(raw, method=method, backend="numpy")
        assert len(images) == 2
        sources = [im.meta["recon"]["calibration"]["source"] for im in images]
        assert sources == ["calibration lines of this image",
                           "calibration lines of all repetitions"]
        for im in images:
            assert scaled_nrmse(im.data[:, :, 0], obj[:, :, 0]) < 0.05, method


def test_without_any_calibration_the_error_says_what_was_tried(maps2d):
    from mrharmony.errors import ReconError

    k = _kspace(_object(N, 1), maps2d, seed=3)
    raw = RawData(header=_header(N, 1, accel=(2, 1), mode=None),
                  acquisitions=_acqs(k, [(y, 0) for y in _lattice(N, 2)]))
    with pytest.raises(ReconError, match="no calibration region of at least 8 x 1"):
        reconstruct(raw, method="auto", backend="numpy")
    one_coil = RawData(header=make_header(N, N, coils=1), acquisitions=_acqs(
        k[:1, N // 2:N // 2 + N], [(y, 0) for y in _lattice(N, 2)]))
    with pytest.raises(ReconError, match="1 receive coil"):
        reconstruct(one_coil, method="auto", backend="numpy")


@pytest.mark.parametrize("accel", [(2, 2), (2, 1)], ids=["ky-kz", "ky-only"])
def test_3d_acceleration_grappa_and_sense(accel):
    """3-D: R = 2 x 2 (ky and kz, 3-D GRAPPA kernels, embedded 24 x 16 ACS box) and
    R = 2 along ky only (24 ACS lines on every partition: GRAPPA per z in hybrid space)."""
    ny, nz = 48, 24
    maps = _maps((2 * N, ny, nz))  # a ring of coils around the readout axis
    obj = _object(ny, nz)
    k = _kspace(obj, maps, seed=31)
    ry, rz = accel
    acs_y, acs_z = set(_acs(ny, 24)), set(_acs(nz, 16) if rz > 1 else range(nz))
    cells = [(y, z) for y in range(ny) for z in range(nz)
             if (y % ry == 0 and z % rz == 0) or (y in acs_y and z in acs_z)]
    flags = {c: CALIB_AND_IMAGING if c[0] in acs_y and c[1] in acs_z else 0 for c in cells}
    acqs = [a for c in cells for a in _acqs(k, [c], flags=flags[c])]
    raw = RawData(header=_header(ny, nz, accel=accel, mode="embedded"), acquisitions=acqs)
    truth = np.abs(obj)
    zero = reconstruct(raw, method="fft", backend="numpy")[0].data
    assert scaled_nrmse(zero, truth) > 0.2
    for method in ("grappa", "sense"):
        im = reconstruct(raw, method=method, backend="numpy")[0]
        assert im.shape == (N, ny, nz)
        rec = im.meta["recon"]
        assert rec["acceleration"] == list(accel)
        assert rec["calibration"]["lines"] == [24, len(acs_z)]
        if method == "grappa":
            expect = "3d (kx, ky, kz)" if rz > 1 else "hybrid (kx, ky) per z"
            assert rec["grappa"]["kernel"] == expect
        err = scaled_nrmse(im.data, truth)
        # measured: sense 0.014 / 0.008, grappa 0.081 (2 x 2 source blocks; 0.10 with 4 x 4,
        # edge lines extrapolated with few kernels) / 0.04; fully sampled data: 0.021
        limit = 0.15 if (method, rz) == ("grappa", 2) else 0.06
        assert err < limit and err < 0.4 * scaled_nrmse(zero, truth), (method, err)


def test_grappa_fills_only_inside_the_sampled_extent():
    """Partial Fourier with R = 2: GRAPPA fills the lattice gaps, not the missing
    partial-Fourier end (left to POCS), and never changes a sampled line."""
    from mrharmony.recon.parallel import grappa

    maps = _maps((N, N))
    k = fft_c(maps * phantom(N)[None], axes=(1, 2))
    mask = np.zeros(N, bool)
    mask[N // 2 - 20::2] = True
    mask[N // 2 - 12:N // 2 + 12] = True
    filled = grappa(k * mask[None, None, :], k[:, :, N // 2 - 12:N // 2 + 12], mask=mask)
    np.testing.assert_array_equal(filled[:, :, mask], (k * mask[None, None, :])[:, :, mask])
    assert not np.any(filled[:, :, :N // 2 - 21])
    inside = np.arange(N) >= N // 2 - 21  # the first lattice gap below is filled too
    ref = sos(ifft_c(k * inside[None, None, :], axes=(1, 2)))
    assert scaled_nrmse(sos(ifft_c(filled, axes=(1, 2))), ref) < 0.02
