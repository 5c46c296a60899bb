"""Diffusion series get BIDS/FSL ``.bval``/``.bvec`` files beside the NIfTI.

Oracle: a b-vector written on the voxel axes (FSL convention: first axis negated when the
voxel-to-world matrix has a positive determinant) must map back, through the NIfTI's own
affine, to the gradient direction the header states in patient LPS coordinates.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from mrharmony.recon.image import ReconImage
from mrharmony.recon.output import write_nifti

DIRS_LPS = [(0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0),
            (0.6, -0.8, 0.0), (0.0, 0.6, 0.8)]
BVALS = [0.0, 1000.0, 1000.0, 1000.0, 1000.0, 2000.0]


def _series(read_dir, phase_dir, slice_dir) -> list[ReconImage]:
    rng = np.random.default_rng(0)
    out = []
    for k, (b, d) in enumerate(zip(BVALS, DIRS_LPS, strict=True)):
        out.append(ReconImage(
            data=rng.random((8, 6, 1)).astype(np.float32), set=k,
            read_dir=np.asarray(read_dir, float), phase_dir=np.asarray(phase_dir, float),
            slice_dir=np.asarray(slice_dir, float),
            field_of_view_mm=np.array([16.0, 12.0, 3.0]),
            meta={"bvalue_s_mm2": b, "bvec": list(d), "te_ms": 80.0}))
    return out


@pytest.mark.parametrize("dirs", [
    ((1, 0, 0), (0, 1, 0), (0, 0, 1)),                   # axial
    ((0, 1, 0), (0, 0, -1), (-1, 0, 0)),                 # sagittal
    ((np.cos(0.3), np.sin(0.3), 0), (-np.sin(0.3), np.cos(0.3), 0), (0, 0, 1)),  # oblique
])
def test_bvecs_map_back_to_the_header_directions(tmp_path, dirs):
    paths = write_nifti(_series(*dirs), tmp_path / "dwi.nii.gz")
    assert [p.name for p in paths] == ["dwi.nii.gz", "dwi.json", "dwi.bval", "dwi.bvec"]
    bvals = np.loadtxt(tmp_path / "dwi.bval")
    bvecs = np.loadtxt(tmp_path / "dwi.bvec")
    np.testing.assert_array_equal(bvals, BVALS)
    assert bvecs.shape == (3, len(BVALS))
    affine = nib.load(tmp_path / "dwi.nii.gz").affine
    axes = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    for k, d in enumerate(DIRS_LPS):
        v = bvecs[:, k].copy()
        if np.linalg.det(axes) > 0:
            v[0] = -v[0]
        world_ras = axes @ v
        expected = np.array(d) * np.array([-1.0, -1.0, 1.0])
        if BVALS[k] == 0:
            np.testing.assert_array_equal(bvecs[:, k], 0.0)
        else:
            np.testing.assert_allclose(world_ras, expected, atol=1e-6)


def test_non_diffusion_series_has_no_gradient_files(tmp_path):
    ims = _series((1, 0, 0), (0, 1, 0), (0, 0, 1))
    for im in ims:
        del im.meta["bvalue_s_mm2"]
    paths = write_nifti(ims, tmp_path / "t2.nii.gz")
    assert [p.suffix for p in paths] == [".gz", ".json"]
    assert not (tmp_path / "t2.bval").exists()
