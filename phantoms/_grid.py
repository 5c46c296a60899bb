"""Voxel grids shared by the analytic phantoms (system, diffusion, Shepp-Logan)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mrharmony.errors import PhantomError

__all__ = ["Grid", "make_grid"]


@dataclass(frozen=True)
class Grid:
    """Voxel-centre coordinates of a phantom grid (RAS mm) and its affine.

    Attributes
    ----------
    x, y, z : numpy.ndarray
        Broadcastable coordinate arrays of shape ``(nx,1,1)``, ``(1,ny,1)``, ``(1,1,nz)``.
    affine : numpy.ndarray
        ``(4, 4)`` voxel index -> RAS mm.
    """

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid ``(nx, ny, nz)``."""
        return (self.x.shape[0], self.y.shape[1], self.z.shape[2])


def _check_matrix(matrix: int) -> int:
    if isinstance(matrix, bool) or not isinstance(matrix, (int, np.integer)):
        raise PhantomError(f"matrix: expected an integer, got {matrix!r}")
    if not 8 <= int(matrix) <= 1024:
        raise PhantomError(f"matrix: {matrix} outside [8, 1024]")
    return int(matrix)


def make_grid(matrix: int, fov_mm: float, *, three_d: bool, slice_index: int | None,
              default_z_mm: float = 0.0) -> Grid:
    """Isotropic grid of ``matrix`` voxels across ``fov_mm``, centred on the origin.

    Voxel ``i`` sits at ``(i - matrix // 2) * fov_mm / matrix`` (the FFT centre
    convention, index ``N // 2`` at 0 mm) on every axis.

    Parameters
    ----------
    matrix : int
        Voxels per axis, in [8, 1024].
    fov_mm : float
        Field of view per axis (mm).
    three_d : bool
        Full ``matrix**3`` grid; else a single slice.
    slice_index : int, optional
        Slice of the 3-D grid to keep (2-D only); default: the slice nearest
        ``default_z_mm``.
    default_z_mm : float, optional
        z position (mm) of the default 2-D slice.

    Returns
    -------
    Grid
    """
    n = _check_matrix(matrix)
    if not (np.isfinite(fov_mm) and fov_mm > 0):
        raise PhantomError(f"fov_mm: {fov_mm} must be > 0")
    vox = float(fov_mm) / n
    centre = n // 2
    coords = (np.arange(n, dtype=np.float64) - centre) * vox
    if three_d:
        if slice_index is not None:
            raise PhantomError("slice_index: give a slice or three_d, not both")
        zc = coords
        k0 = 0
    else:
        if slice_index is None:
            k = math.floor(default_z_mm / vox + 0.5) + centre
        else:
            k = int(slice_index)
        if not 0 <= k < n:
            raise PhantomError(f"slice_index: {k} outside [0, {n - 1}]")
        zc = coords[k:k + 1]
        k0 = k
    affine = np.diag([vox, vox, vox, 1.0])
    affine[:3, 3] = [-centre * vox, -centre * vox, (k0 - centre) * vox]
    return Grid(coords[:, None, None], coords[None, :, None], zc[None, None, :], affine)
