"""Geometry: NIfTI affine of reconstructed images vs the object that produced the data."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation
from test_recon_io import make_acquisitions, make_header, write_raw

from mrharmony.formats.raw import read_raw
from mrharmony.recon import reconstruct, write_nifti
from mrharmony.recon.cartesian import fft_c
from mrharmony.recon.geometry import affine_ras

LPS = np.diag([-1.0, -1.0, 1.0])
NX, NY = 40, 32
FOV = (160.0, 128.0, 5.0)  # 4 mm in-plane voxels


def _point_kspace(points_uv_mm: np.ndarray, nx: int, ny: int, fov_x: float, fov_y: float,
                  coils: int = 1) -> np.ndarray:
    """Analytic k-space of unit point sources at in-plane offsets (u, v) mm from the centre.

    Signal s(k) = sum exp(-2 pi i k.r) with k = (index - n//2) / FOV (1/mm), scaled to the
    unitary FFT convention.
    """
    kx = (np.arange(nx) - nx // 2) / fov_x
    ky = (np.arange(ny) - ny // 2) / fov_y
    s = np.zeros((nx, ny), np.complex128)
    for u, v in points_uv_mm:
        s += np.exp(-2j * np.pi * (kx[:, None] * u + ky[None, :] * v))
    return np.repeat((s / np.sqrt(nx * ny))[None], coils, axis=0).astype(np.complex64)


@pytest.mark.parametrize("oversampling", [1, 2])
@pytest.mark.parametrize("angles_deg", [(0, 0, 0), (20, -35, 50)])
def test_point_sources_land_at_their_ras_position(tmp_path, angles_deg, oversampling):
    rot = Rotation.from_euler("xyz", angles_deg, degrees=True).as_matrix()
    read, phase, slc = rot[:, 0], rot[:, 1], rot[:, 2]  # LPS direction cosines
    centre_lps = np.array([12.5, -30.25, 41.0])
    offsets_vox = np.array([[5, -3], [-12, 7], [0, 0]])  # in-plane voxel offsets
    uv = offsets_vox * np.array([FOV[0] / NX, FOV[1] / NY])
    truth_ras = (LPS @ (centre_lps[:, None] + read[:, None] * uv[:, 0] + phase[:, None] *
                        uv[:, 1])).T
    k = _point_kspace(uv, NX * oversampling, NY, FOV[0] * oversampling, FOV[1], coils=2)
    header = make_header(NX, NY, os_=oversampling, fov_mm=FOV, coils=2)
    acqs = make_acquisitions(k, position=centre_lps, read=read, phase=phase, slice_dir=slc)
    raw = read_raw(write_raw(tmp_path / "p.h5", header, acqs))
    images = reconstruct(raw, backend="numpy")
    out, _ = write_nifti(images, tmp_path / "p.nii.gz", header=raw.header)
    nii = nib.load(out)
    data = np.asarray(nii.dataobj)[:, :, 0]
    peaks = np.argwhere(data > 0.5 * data.max())
    assert len(peaks) == 3
    found = (nii.affine @ np.c_[peaks, np.zeros(3), np.ones(3)].T).T[:, :3]
    for t in truth_ras:  # each source within 0.01 mm of one peak (NIfTI stores float32)
        assert np.min(np.linalg.norm(found - t, axis=1)) < 0.01


def test_affine_equals_object_affine_for_oblique_multislice(tmp_path):
    """Object on an oblique RAS grid -> raw data with its geometry -> same affine back."""
    rot_ras = Rotation.from_euler("zyx", (30, 15, -10), degrees=True).as_matrix()
    vox = np.array([FOV[0] / NX, FOV[1] / NY, 6.0])  # 6 mm slice spacing (1 mm gap)
    obj_affine = np.eye(4)
    obj_affine[:3, :3] = rot_ras * vox
    obj_affine[:3, 3] = [-80.3, 20.1, -5.7]
    rng = np.random.default_rng(4)
    obj = rng.random((NX, NY, 3)).astype(np.float32) + 0.5
    dirs_lps = LPS @ rot_ras  # columns: read, phase, slice in LPS
    acqs = []
    for s in range(3):
        centre_ras = obj_affine @ np.array([NX // 2, NY // 2, s, 1.0])
        k = fft_c(obj[None, :, :, s].astype(np.complex64), axes=(1, 2))
        acqs += make_acquisitions(k, slice_=s, position=LPS @ centre_ras[:3],
                                  read=dirs_lps[:, 0], phase=dirs_lps[:, 1],
                                  slice_dir=dirs_lps[:, 2])
    header = make_header(NX, NY, fov_mm=FOV, coils=1)
    raw = read_raw(write_raw(tmp_path / "o.h5", header, acqs))
    images = reconstruct(raw, backend="numpy")
    assert [im.slice for im in images] == [0, 1, 2]
    out, _ = write_nifti(images, tmp_path / "o.nii.gz")
    nii = nib.load(out)
    # affine to 0.01 mm (translations) / 1e-5 (direction columns); data in the same voxels
    np.testing.assert_allclose(nii.affine, obj_affine, atol=1e-2)
    np.testing.assert_allclose(np.asarray(nii.dataobj), obj, rtol=1e-4, atol=1e-5)


def test_zero_geometry_is_identity_and_nonorthogonal_is_refused():
    from mrharmony.errors import RawDataError

    aff = affine_ras(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3),
                     voxel_size_mm=(2.0, 2.0, 5.0), shape=(4, 4, 1))
    np.testing.assert_allclose(aff[:3, :3], np.diag([-2.0, -2.0, 5.0]))
    np.testing.assert_allclose(aff[:3, 3], [4.0, 4.0, 0.0])  # voxel 2 at the origin
    with pytest.raises(RawDataError, match="not orthogonal"):
        affine_ras(np.zeros(3), np.array([1.0, 0, 0]), np.array([1.0, 1, 0]), np.zeros(3),
                   voxel_size_mm=(1, 1, 1), shape=(2, 2, 1))
