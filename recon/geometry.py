"""ISMRMRD geometry (LPS position and direction cosines) to a RAS+ NIfTI affine.

ISMRMRD stores, per acquisition and per image, the position of the slice (or slab)
centre and the read/phase/slice direction cosines in the patient LPS frame (mm). Our
images are arrays ``(nx, ny, nz)`` with ``x`` along the readout, ``y`` along the phase
encoding and ``z`` along the slice/partition direction. They follow the FFT convention
of the sequence library (``image = fftshift(ifftn(ifftshift(k)))``), so the voxel that
sits at ``position`` is index ``n // 2`` along each axis (not ``(n - 1) / 2``).

The NIfTI affine maps voxel indices ``(i, j, k)`` to RAS+ mm::

    lps = position + (i - nx//2) dx read + (j - ny//2) dy phase + (k - nz//2) dz slice
    ras = diag(-1, -1, 1) @ lps
"""

from __future__ import annotations

import numpy as np

from mrharmony.errors import RawDataError

__all__ = ["LPS_TO_RAS", "affine_ras", "normalised_directions"]

#: Flip of the first two axes that turns LPS into RAS (and back).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def normalised_directions(
    read_dir: np.ndarray, phase_dir: np.ndarray, slice_dir: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return unit read, phase and slice directions (LPS); identity when all are zero.

    Files from tools that leave the geometry empty (e.g. ``ismrmrd_generate_cartesian_
    shepp_logan``) carry zero vectors; those are read as the identity orientation
    (read = x, phase = y, slice = z in LPS). A zero slice direction is completed as
    ``read x phase``.

    Raises
    ------
    RawDataError
        If the directions are not orthogonal to 1e-3 or only one of read/phase is zero.
    """
    r = np.asarray(read_dir, dtype=np.float64).reshape(3)
    p = np.asarray(phase_dir, dtype=np.float64).reshape(3)
    s = np.zeros(3) if slice_dir is None else np.asarray(slice_dir, dtype=np.float64).reshape(3)
    nr, np_, ns = np.linalg.norm(r), np.linalg.norm(p), np.linalg.norm(s)
    if nr == 0 and np_ == 0:
        return np.eye(3)[0], np.eye(3)[1], np.eye(3)[2]
    if nr == 0 or np_ == 0:
        raise RawDataError(
            f"geometry: read_dir {r.tolist()} / phase_dir {p.tolist()}: one of them is zero"
        )
    r, p = r / nr, p / np_
    s = np.cross(r, p) if ns == 0 else s / ns
    dots = (abs(r @ p), abs(r @ s), abs(p @ s))
    if max(dots) > 1e-3:
        raise RawDataError(
            f"geometry: direction cosines are not orthogonal (|dot| up to {max(dots):.3g} > 1e-3)"
        )
    return r, p, s


def affine_ras(
    position_lps_mm: np.ndarray,
    read_dir: np.ndarray,
    phase_dir: np.ndarray,
    slice_dir: np.ndarray,
    *,
    voxel_size_mm: tuple[float, float, float],
    shape: tuple[int, int, int],
) -> np.ndarray:
    """NIfTI affine (voxel index -> RAS+ mm) of an image from its ISMRMRD geometry.

    Parameters
    ----------
    position_lps_mm : (3,) array
        Centre of the slice/slab in LPS mm (ISMRMRD ``position``).
    read_dir, phase_dir, slice_dir : (3,) arrays
        Direction cosines (LPS) of the array axes x, y, z.
    voxel_size_mm : tuple of float
        Voxel edge lengths along x, y, z in mm (slice thickness or spacing for z).
    shape : tuple of int
        Array shape ``(nx, ny, nz)``.

    Returns
    -------
    numpy.ndarray
        (4, 4) float64 affine.
    """
    r, p, s = normalised_directions(read_dir, phase_dir, slice_dir)
    rot = np.stack([r, p, s], axis=1) * np.asarray(voxel_size_mm, dtype=np.float64)[None, :]
    centre_index = np.array([n // 2 for n in shape], dtype=np.float64)
    origin_lps = np.asarray(position_lps_mm, dtype=np.float64).reshape(3) - rot @ centre_index
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ rot
    affine[:3, 3] = LPS_TO_RAS @ origin_lps
    return affine
