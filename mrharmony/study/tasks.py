"""The stage functions that run on Dask workers.

Each stage is ``fn(params, inputs, work) -> info``: ``params`` are the task's
JSON-serialisable parameters, ``inputs`` maps a role (``"raw"``, ``"phantom"``) to the
directory of a finished input task, and ``work`` is the private directory the stage
writes into (the store renames it into place when the stage returns). Stages import
their subpackage lazily so that a worker loads only what it runs.

Files each stage leaves in its directory:

========== ==============================================================
phantom    ``phantom/`` (NIfTI maps + ``phantom.json``)
sequence   ``sequence.seq``
simulate   ``raw.h5`` (ISMRMRD)
recon      ``image.nii.gz`` + ``image.json``; ``map.nii.gz`` + ``map.json`` with maps
features   ``features.csv`` (tidy: ids, region, feature, value, covariates)
========== ==============================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["STAGES", "at_isocentre", "limit_threads", "roi_labels_on_grid"]


@contextlib.contextmanager
def limit_threads(threads: int) -> Iterator[None]:
    """Limit numba, BLAS and OpenMP threads inside a task (restored afterwards)."""
    from threadpoolctl import threadpool_limits

    previous = None
    try:
        import numba

        previous = numba.get_num_threads()
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    except ImportError:  # pragma: no cover - numba is a dependency
        pass
    try:
        with threadpool_limits(limits=max(1, threads)):
            yield
    finally:
        if previous is not None:
            import numba

            numba.set_num_threads(previous)


def stage_phantom(params: Mapping[str, Any], inputs: Mapping[str, Path], work: Path,
                  ) -> dict[str, Any]:
    """Build (or copy) the phantom a scan images, at the site's field strength."""
    from mrharmony import phantoms

    kind = params["kind"]
    field_t = float(params["field_t"])
    slice_index = None if int(params.get("slice", -1)) < 0 else int(params["slice"])
    if kind == "cohort":
        cohort = phantoms.make_cohort(int(params["n_subjects"]), int(params["seed"]),
                                      age_range=tuple(params["age_range"]))
        phantom = cohort.phantom(params["subject"], field_t=field_t,
                                 matrix=int(params["matrix"]),
                                 three_d=bool(params["three_d"]))
    elif kind == "design-cohort":  # a [[cohorts]] entry's cohort (per-site design)
        from mrharmony.study.plan import make_design_cohort

        phantom = make_design_cohort(dict(params)).phantom(
            params["subject"], field_t=field_t, matrix=int(params["matrix"]),
            three_d=bool(params["three_d"]))
    elif kind == "system":
        phantom = phantoms.make_system_phantom(
            field_t, matrix=int(params["matrix"]), array=params["plate"],
            slice_index=slice_index, three_d=bool(params["three_d"]))
    elif kind == "diffusion":
        phantom = phantoms.make_diffusion_phantom(
            matrix=int(params["matrix"]), slice_index=slice_index,
            three_d=bool(params["three_d"]), field_t=field_t)
    elif kind == "brain":
        phantom = phantoms.make_brain_phantom(
            field_t, matrix=int(params["matrix"]), slice_index=slice_index,
            three_d=bool(params["three_d"]))
    elif kind == "shepp-logan":
        phantom = phantoms.make_shepp_logan(
            field_t=field_t, matrix=int(params["matrix"]), three_d=bool(params["three_d"]))
    elif kind == "directory":
        phantom = phantoms.load_phantom(params["path"])
    else:  # validated by the study config
        raise ValueError(f"unknown phantom kind {kind!r}")
    phantom = at_isocentre(phantom)
    phantom.save(work / "phantom")
    return {"shape": list(phantom.shape), "field_t": phantom.field_t}


def at_isocentre(phantom: Any) -> Any:
    """Move a phantom so that the centre of its grid is at the magnet's isocentre.

    This is what the operator does with the laser landmark: the study's protocols
    prescribe slices and slabs around isocentre, so a 2-D phantom slice (e.g. through
    the system phantom's T1 plate) must lie there to be excited. Only the affine's
    translation changes; maps and labels move together, so the ground truth is kept.
    """
    import dataclasses

    affine = np.array(phantom.affine, dtype=np.float64)
    centre_index = (np.array(phantom.shape, dtype=np.float64) - 1) / 2
    centre_mm = affine[:3, :3] @ centre_index + affine[:3, 3]
    if np.allclose(centre_mm, 0.0, atol=1e-6):
        return phantom
    affine[:3, 3] -= centre_mm
    metadata = {**phantom.metadata, "isocentre_shift_mm": (-centre_mm).tolist()}
    return dataclasses.replace(phantom, affine=affine, metadata=metadata)


def stage_sequence(params: Mapping[str, Any], inputs: Mapping[str, Path], work: Path,
                   ) -> dict[str, Any]:
    """Build one protocol's ``.seq`` for one scanner (shared or vendor-native flavour)."""
    from mrharmony.config import from_mapping
    from mrharmony.sequences import ScannerProfile, build_file
    from mrharmony.sequences.protocol import protocol_from_mapping

    protocol = protocol_from_mapping(params["protocol"])
    scanner = from_mapping(ScannerProfile, params["scanner"], source="scanner")
    seq, path = build_file(protocol, scanner, work / "sequence.seq")
    return {"duration_s": float(sum(seq.block_durations.values())), "file": path.name}


def stage_simulate(params: Mapping[str, Any], inputs: Mapping[str, Path], work: Path,
                   ) -> dict[str, Any]:
    """Simulate one scan at a virtual site and write ISMRMRD raw data."""
    from mrharmony.phantoms import load_phantom
    from mrharmony.simulation import simulate_raw
    from mrharmony.simulation.raw import header_user_parameters
    from mrharmony.simulation.site import site_from_mapping

    site = site_from_mapping(params["site"], source="site")
    phantom = load_phantom(inputs["phantom"] / "phantom")
    info: dict[str, Any] = {}
    if params.get("protocol") is not None:  # native arm: record the vendor's choices
        from mrharmony.sequences.protocol import protocol_from_mapping
        from mrharmony.simulation.native import native_header_info

        info = native_header_info(protocol_from_mapping(params["protocol"]), site)
    # the sequence task built the .seq (the native protocol's in the native arm)
    simulate_raw(inputs["sequence"] / "sequence.seq", phantom, site, work / "raw.h5",
                 seed=int(params["seed"]), backend=params["backend"],
                 native=bool(params["native"]),
                 isochromats_per_voxel=int(params["isochromats_per_voxel"]),
                 header_info=info, check_convergence=True,
                 fast_path_tol_pct=params.get("fast_path_tol_pct"),
                 spoiling=params.get("spoiling", "none"))
    header = header_user_parameters(work / "raw.h5")
    return {"bytes": (work / "raw.h5").stat().st_size,
            "isochromat_convergence_pct": header.get("isochromat_convergence_pct"),
            "simulation_path": header.get("simulation_path", "full")}


def stage_recon(params: Mapping[str, Any], inputs: Mapping[str, Path], work: Path,
                ) -> dict[str, Any]:
    """Reconstruct the raw data into a NIfTI image (and a quantitative map)."""
    from mrharmony.formats.raw import read_raw
    from mrharmony.recon import reconstruct, write_nifti

    raw = read_raw(inputs["raw"] / "raw.h5")
    maps = None if params["maps"] == "none" else params["maps"]
    chain = {k: params[k] for k in _CHAIN_OPTIONS if k in params}
    images = reconstruct(raw, method=params["method"], backend=params["backend"], maps=maps,
                         **chain)
    series = [im for im in images if "map" not in im.meta]
    written = write_nifti(series, work / "image.nii.gz", header=raw.header)
    if maps is not None:
        wanted = _MAP_NAMES[maps]
        fitted = [im for im in images if im.meta.get("map") == wanted]
        if not fitted:
            raise ValueError(f"recon: no {wanted} map was fitted")
        written += write_nifti(fitted, work / "map.nii.gz", header=raw.header)
    return {"files": [p.name for p in written]}


#: Recon-chain options a recon task passes on when its parameters set them (a recon
#: flavour, :func:`mrharmony.study.plan.recon_params`).
_CHAIN_OPTIONS = ("coil_combine", "filter", "filter_radius", "filter_width",
                  "partial_fourier_method", "intensity_normalization")

#: The map each ``maps`` choice writes to ``map.nii.gz`` (the study's feature source).
_MAP_NAMES = {"t1": "t1_ms", "t2": "t2_ms", "adc": "adc_mm2_s", "dti": "fa"}


def roi_labels_on_grid(labels_img: Any, image: Any, *, erode_voxels: int = 0) -> np.ndarray:
    """Resample a label map onto an image's grid (nearest neighbour), optionally eroded.

    Parameters
    ----------
    labels_img : nibabel image
        Integer label map with its affine.
    image : nibabel image
        Target grid (shape and affine).
    erode_voxels : int
        Erode each label by this many voxels of the target grid (removes partial-volume
        edges from ROI statistics); a region that would vanish is kept whole.

    Returns
    -------
    numpy.ndarray
        int16 labels on the image grid (0 outside every label).
    """
    from scipy import ndimage

    target_shape = image.shape[:3]
    # voxel (target) -> mm -> voxel (labels)
    mapping = np.linalg.inv(labels_img.affine) @ image.affine
    grid = np.indices(target_shape, dtype=np.float64).reshape(3, -1)
    src = mapping[:3, :3] @ grid + mapping[:3, 3:4]
    idx = np.rint(src).astype(np.int64)
    lab = np.asarray(labels_img.dataobj)
    lab = lab.reshape(lab.shape[:3])
    inside = np.all((idx >= 0) & (idx < np.array(lab.shape)[:, None]), axis=0)
    out = np.zeros(grid.shape[1], dtype=np.int16)
    out[inside] = lab[idx[0, inside], idx[1, inside], idx[2, inside]]
    out = out.reshape(target_shape)
    if erode_voxels > 0:
        eroded = np.zeros_like(out)
        structure = ndimage.generate_binary_structure(3, 1)
        if target_shape[2] == 1:
            structure[:, :, 0] = False
            structure[:, :, 2] = False
        for value in np.unique(out[out > 0]):
            region = out == value
            keep = ndimage.binary_erosion(region, structure, iterations=erode_voxels)
            # a region too small to erode is measured whole rather than dropped
            eroded[keep if keep.any() else region] = value
        out = eroded
    return out


def stage_features(params: Mapping[str, Any], inputs: Mapping[str, Path], work: Path,
                   ) -> dict[str, Any]:
    """ROI statistics of the reconstructed image or map, in the phantom's label regions."""
    import json

    import nibabel as nib
    import pandas as pd

    from mrharmony.harmonize.features import extract_roi_features

    recon_dir = inputs["recon"]
    use_map = params["maps"] != "none"
    image_path = recon_dir / ("map.nii.gz" if use_map else "image.nii.gz")
    image = nib.load(image_path)
    meta = json.loads((inputs["phantom"] / "phantom" / "phantom.json").read_text())
    label_names = {int(k): v for k, v in meta["label_names"].items()}
    labels_img = nib.load(inputs["phantom"] / "phantom" / "labels.nii.gz")
    labels = roi_labels_on_grid(labels_img, image, erode_voxels=1)
    data = np.asarray(image.dataobj, dtype=np.float64)
    if data.ndim > 3:
        data = data[..., 0]
    data = data.reshape(image.shape[:3])
    present = {k: v for k, v in label_names.items() if np.any(labels == k)}
    ids = dict(params["ids"])
    stats = [s for s in params["statistics"] if s in ("mean", "median")]
    tidy = extract_roi_features(
        [data], labels, present, subjects=[ids["subject"]], sites=[ids["site"]],
        features=stats, voxel_size_mm=image.header.get_zooms()[:3])
    quantity = params["maps"] if use_map else "intensity"
    truth_map = {"t1": "t1_ms", "t2": "t2_ms", "adc": "adc_mm2_s"}.get(params["maps"])
    if truth_map is not None:
        # the phantom's own value in each region, on its own grid (the ground truth)
        true_values = np.asarray(
            nib.load(inputs["phantom"] / "phantom" / f"{truth_map}.nii.gz").dataobj)
        phantom_labels = np.asarray(labels_img.dataobj)
        names = {v: k for k, v in present.items()}
        truth = {name: float(true_values[phantom_labels == names[name]].mean())
                 for name in present.values()}
        tidy["truth"] = tidy["region"].map(truth).where(tidy["feature"] != "volume_ml")
        if params.get("range_ms"):
            low, high = params["range_ms"]
            tidy["in_range"] = tidy["truth"].between(low, high)
    tidy.insert(2, "protocol", params["protocol"])
    tidy.insert(3, "quantity", quantity)
    for k in ("arm", "repeat", "vendor", "field_t"):
        tidy[k] = ids[k]
    if params.get("volumes"):
        tidy = pd.concat([tidy, _tissue_volumes(data, image, ids, params)], ignore_index=True)
    for k, v in params["covariates"].items():
        tidy[k] = v
    tidy.to_csv(work / "features.csv", index=False)
    return {"rows": len(tidy)}


def _tissue_volumes(data: np.ndarray, image: Any, ids: Mapping[str, Any],
                    params: Mapping[str, Any]) -> Any:
    """Tissue volumes (mL) of a T1-weighted image, by ``params["segmentation"]``.

    ``atlas`` (default): :func:`mrharmony.harmonize.segment.segment_tissues` (MNI152
    priors registered to the image, Gaussian intensities by EM with mixed partial-volume
    classes, MRF, bias field); volumes are sums of PV fractions. ``gmm``: a 3-class
    Gaussian mixture of the intensities (CSF < GM < WM), volumes from soft posteriors.
    """
    import pandas as pd

    method = params.get("segmentation", "atlas")
    if method == "gmm":
        from sklearn.mixture import GaussianMixture

        voxel_ml = float(np.prod(image.header.get_zooms()[:3])) / 1000.0
        values = np.abs(data)
        head = values > 0.1 * np.percentile(values, 99)
        x = values[head].reshape(-1, 1)
        gmm = GaussianMixture(3, random_state=0, n_init=1).fit(x)
        order = np.argsort(gmm.means_.ravel())  # T1-weighted: CSF < GM < WM
        post = gmm.predict_proba(x)[:, order]
        volumes = {name: float(post[:, i].sum() * voxel_ml)
                   for i, name in enumerate(("csf", "gm", "wm"))}
    else:
        from mrharmony.harmonize.segment import segment_tissues

        seg = segment_tissues(np.abs(data), affine=np.asarray(image.affine, dtype=np.float64))
        volumes = {name: float(seg.volumes_ml[name]) for name in ("csf", "gm", "wm")}
    names = ("csf", "gm", "wm")
    rows = [{"subject": ids["subject"], "site": ids["site"], "protocol": params["protocol"],
             "quantity": "segmentation", "region": name, "feature": "volume_ml",
             "value": volumes[name]} for name in names]
    frame = pd.DataFrame(rows)
    for k in ("arm", "repeat", "vendor", "field_t"):
        frame[k] = ids[k]
    return frame


STAGES: dict[str, Callable[[Mapping[str, Any], Mapping[str, Path], Path], dict[str, Any]]] = {
    "phantom": stage_phantom,
    "sequence": stage_sequence,
    "simulate": stage_simulate,
    "recon": stage_recon,
    "features": stage_features,
}
