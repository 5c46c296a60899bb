"""Write reconstructed images: NIfTI + BIDS-style JSON sidecar, and MRD images into HDF5.

Images of the same contrast/set/repetition (and map) are stacked into one volume along
the slice direction, sorted by position; several volumes become the 4th dimension
(ordered by repetition, set, contrast). Complex images are written as magnitude
(float32). Files are written to a temporary name and moved into place, so a failure
never leaves a half-written output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony import __version__
from mrharmony.errors import ReconError
from mrharmony.fileio import atomic_path
from mrharmony.formats.nifti import nifti_image, save_nifti
from mrharmony.recon.geometry import LPS_TO_RAS
from mrharmony.recon.image import ReconImage

__all__ = ["sidecar", "stack_volume", "write_mrd_images", "write_nifti"]


def stack_volume(images: list[ReconImage]) -> tuple[np.ndarray, np.ndarray]:
    """Stack 2-D slices (or pass through one 3-D slab) into ``(nx, ny, nz)`` + affine.

    Raises
    ------
    ReconError
        If the slices differ in shape or orientation, or two share a position.
    """
    if len(images) == 1:
        im = images[0]
        return np.abs(im.data).astype(np.float32) if np.iscomplexobj(im.data) else \
            np.asarray(im.data, np.float32), im.affine_ras()
    first = images[0]
    for im in images[1:]:
        if im.shape != first.shape or not np.allclose(
            np.stack([im.read_dir, im.phase_dir, im.slice_dir]),
            np.stack([first.read_dir, first.phase_dir, first.slice_dir]), atol=1e-4,
        ):
            raise ReconError("write_nifti: slices differ in shape or orientation")
    if first.shape[2] != 1:
        raise ReconError("write_nifti: several 3-D slabs of one contrast cannot be stacked")
    proj = np.array([im.position @ first.slice_dir for im in images])
    order = np.argsort(proj)
    if np.any(np.diff(proj[order]) < 1e-6):
        raise ReconError("write_nifti: two slices share the same position")
    imgs = [images[i] for i in order]
    data = np.concatenate([np.abs(im.data) for im in imgs], axis=2).astype(np.float32)
    aff = imgs[0].affine_ras()
    step_lps = (imgs[-1].position - imgs[0].position) / (len(imgs) - 1)
    aff[:3, 2] = LPS_TO_RAS @ step_lps
    return data, aff


def sidecar(images: list[ReconImage], *, header: Any = None) -> dict[str, Any]:
    """BIDS-style JSON sidecar: times in seconds, field in tesla, recon settings."""
    meta = images[0].meta
    out: dict[str, Any] = {}
    if "field_strength_t" in meta:
        out["MagneticFieldStrength"] = meta["field_strength_t"]
    tes = sorted({im.meta["te_ms"] for im in images if "te_ms" in im.meta})
    if tes:
        out["EchoTime"] = tes[0] / 1e3 if len(tes) == 1 else [t / 1e3 for t in tes]
    if "tr_ms" in meta:
        out["RepetitionTime"] = meta["tr_ms"] / 1e3
    tis = sorted({im.meta["ti_ms"] for im in images if "ti_ms" in im.meta})
    if tis:
        out["InversionTime"] = tis[0] / 1e3 if len(tis) == 1 else [t / 1e3 for t in tis]
    if "flip_deg" in meta:
        out["FlipAngle"] = meta["flip_deg"]
    if "sequence_name" in meta:
        out["SequenceName"] = meta["sequence_name"]
    if "manufacturer" in meta:
        out["Manufacturer"] = meta["manufacturer"]
    if "model" in meta:
        out["ManufacturersModelName"] = meta["model"]
    if "map" in meta:
        out["Quantity"] = meta["map"]
    if "t2_model" in meta:  # which T2 signal model the map was fitted with
        out["T2Model"] = meta["t2_model"]
    if "sequence_name" in meta:
        out["PulseSequenceDetails"] = f"Pulseq sequence ({meta['sequence_name']})"
    out["SoftwareVersions"] = f"mrharmony {__version__}"
    out["NonlinearGradientCorrection"] = False
    out["ReconstructionSettings"] = meta.get("recon", {})
    if header is not None and getattr(header, "encoding", None):
        enc = header.encoding[0]
        out["ReconMatrix"] = [int(enc.reconSpace.matrixSize.x), int(enc.reconSpace.matrixSize.y),
                              int(enc.reconSpace.matrixSize.z or 1)]
        out["MRAcquisitionType"] = "3D" if int(enc.encodedSpace.matrixSize.z or 1) > 1 else "2D"
        system = getattr(header, "acquisitionSystemInformation", None)
        if system is not None:
            for key, attr in (("StationName", "stationName"),
                              ("InstitutionName", "institutionName")):
                if getattr(system, attr, None):
                    out[key] = str(getattr(system, attr))
            if system.coilLabel:
                out["ReceiveCoilActiveElements"] = ";".join(
                    str(c.coilName) for c in system.coilLabel)
    return out


def _volumes(images: list[ReconImage]) -> list[tuple[tuple, list[ReconImage]]]:
    groups: dict[tuple, list[ReconImage]] = {}
    for im in images:
        key = (str(im.meta.get("map", "")), im.repetition, im.set, im.contrast)
        groups.setdefault(key, []).append(im)
    return sorted(groups.items())


def write_nifti(
    images: list[ReconImage],
    out_path: str | Path,
    *,
    header: Any = None,
    force: bool = False,
) -> list[Path]:
    """Write images as one NIfTI (3-D, or 4-D for several volumes) plus a JSON sidecar.

    Parameters
    ----------
    images : list of ReconImage
        Images of one kind (all reconstructed images, or all of one map).
    out_path : str or Path
        ``.nii`` or ``.nii.gz``; the sidecar is the same name with ``.json``.
    header : ismrmrd.xsd.ismrmrdHeader, optional
        Adds the recon matrix to the sidecar.
    force : bool
        Overwrite existing files.

    Returns
    -------
    list of Path
        ``[nifti, json]``, plus ``[bval, bvec]`` (FSL/BIDS text files) for a diffusion
        series (volumes with b-values in the header).

    Raises
    ------
    FileExistsError
        If an output exists and ``force`` is False.
    ReconError
        If there are no images or they cannot be stacked.
    """

    if not images:
        raise ReconError("write_nifti: no images to write")
    out = Path(out_path)
    name = out.name
    if not (name.endswith((".nii", ".nii.gz"))):
        raise ReconError(f"{out}: expected a .nii or .nii.gz file name")
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name[: -len(".nii")]
    json_path = out.with_name(stem + ".json")
    for p in (out, json_path):
        if p.exists() and not force:
            raise FileExistsError(f"{p}: exists (use --force / force=True to replace it)")
    vols = [stack_volume(group) for _, group in _volumes(images)]
    shapes = {v[0].shape for v in vols}
    if len(shapes) > 1:
        raise ReconError(f"write_nifti: volumes of different shapes {sorted(shapes)}")
    affine = vols[0][1]
    data = vols[0][0] if len(vols) == 1 else np.stack([v[0] for v in vols], axis=-1)
    img = nifti_image(data, affine)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = sidecar(images, header=header)
    gradients = _diffusion_table([group for _, group in _volumes(images)], affine)
    grad_paths = [out.with_name(stem + ".bval"), out.with_name(stem + ".bvec")]
    if gradients is not None:
        for p in grad_paths:
            if p.exists() and not force:
                raise FileExistsError(f"{p}: exists (use --force / force=True to replace it)")
    # the JSON is written after the NIfTI; all through temp files in the same folder
    save_nifti(img, out, force=True)
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    if gradients is None:
        return [out, json_path]
    bvals, bvecs = gradients
    with atomic_path(grad_paths[0]) as tmp:
        tmp.write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    with atomic_path(grad_paths[1]) as tmp:
        tmp.write_text("".join(" ".join(f"{c:.6f}" for c in row) + "\n" for row in bvecs))
    return [out, json_path, *grad_paths]


def _diffusion_table(
    volumes: list[list[ReconImage]], affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """b-values (s/mm2) and FSL/BIDS b-vectors of a diffusion series, else None.

    The header's gradient directions ``(rl, ap, fh)`` are patient LPS components (as the
    Pulseq gradient axes). BIDS and FSL want them on the image's voxel axes, with the
    first axis negated when the voxel-to-world matrix has a positive determinant (FSL's
    radiological convention); b = 0 volumes get a zero vector.
    """
    if len(volumes) < 2 or not all("bvalue_s_mm2" in g[0].meta for g in volumes):
        return None
    bvals = np.array([float(g[0].meta["bvalue_s_mm2"]) for g in volumes])
    lps = np.array([g[0].meta.get("bvec", [0.0, 0.0, 0.0]) for g in volumes], dtype=float)
    ras = lps * np.array([-1.0, -1.0, 1.0])
    axes = np.asarray(affine, dtype=float)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    vox = ras @ axes  # components on the voxel axes (axes is orthonormal)
    if np.linalg.det(axes) > 0:
        vox[:, 0] *= -1.0
    norm = np.linalg.norm(vox, axis=1, keepdims=True)
    vox = np.where(norm > 1e-9, vox / np.where(norm > 1e-9, norm, 1.0), 0.0)
    vox[bvals <= 0] = 0.0
    return bvals, vox.T


def write_mrd_images(
    images: list[ReconImage], h5_path: str | Path, *, dataset: str = "dataset",
    group: str = "mrharmony",
) -> int:
    """Append images as MRD images to ``dataset/group`` of an ISMRMRD HDF5 file.

    Returns
    -------
    int
        Number of images written.
    """
    import ismrmrd

    with ismrmrd.Dataset(str(h5_path), dataset, create_if_needed=False) as ds:
        for i, im in enumerate(images):
            ds.append_image(group, im.to_ismrmrd_image(image_index=i))
    return len(images)
