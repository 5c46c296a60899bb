"""NIfTI-1 images: the one place the toolkit makes and writes them.

Every NIfTI the toolkit writes (reconstructed images and maps, phantom maps, harmonized
images) goes through :func:`nifti_image` (RAS+ mm affine as both qform and sform, code 1
"scanner", spatial units mm and time s, unit slope) and :func:`save_nifti` (atomic: a
temporary file in the same folder renamed into place, never a half-written file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.fileio import atomic_path

__all__ = ["nifti_image", "nifti_suffix", "save_nifti"]


def nifti_suffix(path: str | Path) -> str:
    """``".nii.gz"`` or ``".nii"`` from a file name.

    Raises
    ------
    ValueError
        If the name ends in neither.
    """
    name = Path(path).name
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    if name.endswith(".nii"):
        return ".nii"
    raise ValueError(f"{path}: expected a .nii or .nii.gz file name")


def nifti_image(data: np.ndarray, affine: np.ndarray, *, header: Any = None) -> Any:
    """A NIfTI-1 image of ``data`` with ``affine`` (voxel → RAS+ mm).

    Parameters
    ----------
    data : ndarray
        Voxel values, ``(nx, ny, nz[, nt])``; stored in their own dtype.
    affine : ndarray
        (4, 4) voxel → RAS+ mm.
    header : nibabel.Nifti1Header, optional
        A header to start from (copied), e.g. the input's when an image is transformed.

    Returns
    -------
    nibabel.Nifti1Image
        qform and sform both ``affine`` with code 1, units mm and s, slope 1, intercept 0.
    """
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    head = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, affine, head)
    img.header.set_data_dtype(np.asarray(data).dtype)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0, 0.0)
    return img


def save_nifti(img: Any, path: str | Path, *, force: bool = False) -> Path:
    """Write a nibabel image atomically.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        From :func:`nifti_image` (or any nibabel NIfTI image).
    path : str or Path
        ``.nii`` or ``.nii.gz`` file.
    force : bool
        Replace an existing file.

    Returns
    -------
    Path

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``force`` is false.
    ValueError
        If the name does not end in ``.nii`` or ``.nii.gz``.
    """
    import nibabel as nib

    path = Path(path)
    suffix = nifti_suffix(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists (use --force / force=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=suffix) as tmp:
        nib.save(img, str(tmp))
    return path
