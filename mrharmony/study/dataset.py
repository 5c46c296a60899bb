"""Training data for learned harmonizers: virtual traveling subjects at virtual sites.

:func:`build_dataset` scans every subject of a virtual cohort
(:func:`mrharmony.phantoms.make_cohort`, known biology) at every site of a list of virtual
sites (``simulation/sites/*.toml``: field strength, vendor, coil, receive chain, and the
vendor's own implementation of each protocol, the study runner's ``native`` arm), with a
T1-weighted and a T2-weighted 2-D protocol, through the study runner's own stage
functions (:mod:`mrharmony.study.tasks`: sequence -> simulate -> recon). Every subject is
imaged at every site, so the set is perfectly paired (traveling subjects), and the
truth of each slice (tissue labels, PD, T1, T2 on the image grid) is written beside it.

Layout of a dataset folder ``DIR``::

    DIR/dataset.json        configuration, sites, label names, timing
    DIR/manifest.csv        one row per image: subject, site, field_t, vendor, contrast,
                            slice, split, path, truth, age, sex, diagnosis
    DIR/images/<subject>_<site>_<contrast>_z<slice>.nii.gz (+ .json sidecar of the recon)
    DIR/truth/<subject>_<field>T_z<slice>.npz   labels, pd, t1_ms, t2_ms (image grid)

Subjects are split into train / validation / test (no subject in two splits), from the
seed. :func:`mrharmony.harmonize.learned.data.load_dataset` reads the folder.

Protocols (both single-echo spin echo, :mod:`mrharmony.sequences` builder ``mese`` with
one echo: spin echoes refocus intravoxel dephasing, so two isochromats per voxel give
artefact-free images, where a spoiled gradient echo needs tens of isochromats per voxel
to avoid speckle): T1w TE 12 ms / TR 500 ms, T2w TE 90 ms / TR 3000 ms, 5 mm slice,
FOV 240 mm (the phantom grid's FOV, so the phantom grid is the image grid).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.errors import ConfigError

__all__ = ["CONTRASTS", "DEFAULT_SITES", "QUICK", "DatasetConfig", "build_dataset",
           "contrast_protocols", "split_subjects"]

#: The sites of a default dataset: two vendors at 3 T, one at 1.5 T, one at 0.55 T.
DEFAULT_SITES = ("siemens-prisma-3t", "ge-premier-3t", "philips-ingenia-1.5t",
                 "siemens-freemax-0.55t")
#: The two contrasts, as protocol mappings (FOV and matrix are set per dataset).
CONTRASTS: dict[str, dict[str, Any]] = {
    "t1w": {"builder": "mese", "te_ms": 12, "tr_ms": 500, "n_echoes": 1,
            "refocusing_flip_deg": 180},
    "t2w": {"builder": "mese", "te_ms": 90, "tr_ms": 3000, "n_echoes": 1,
            "refocusing_flip_deg": 180},
}
_FOV_MM = 240.0


@dataclass(frozen=True)
class DatasetConfig:
    """What a dataset holds.

    Attributes
    ----------
    sites : tuple of str
        Site presets or site TOML paths.
    n_subjects : int
        Virtual subjects (each scanned at every site).
    seed : int
        Cohort, noise and split seed.
    matrix : int
        In-plane matrix (FOV 240 mm), 32..128.
    slices : int
        Axial slices per subject (spread over MNI z = -10 .. 30 mm).
    contrasts : tuple of str
        Keys of :data:`CONTRASTS`.
    isochromats_per_voxel : int
        Isochromats per voxel of the Bloch simulation.
    voxel_size_mm : float
        Voxel size of the cohort's anatomy before resampling to ``matrix``.
    val_fraction, test_fraction : float
        Fractions of subjects held out (at least one subject each).
    native : bool
        Each site runs its vendor's implementation of the protocols (the study runner's
        ``native`` arm); else the same ``.seq`` everywhere.
    """

    sites: tuple[str, ...] = DEFAULT_SITES
    n_subjects: int = 20
    seed: int = 0
    matrix: int = 128
    slices: int = 3
    contrasts: tuple[str, ...] = ("t1w", "t2w")
    isochromats_per_voxel: int = 16
    voxel_size_mm: float = 2.0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    native: bool = True
    age_range: tuple[float, float] = (20.0, 80.0)

    def __post_init__(self) -> None:
        if len(self.sites) < 2:
            raise ConfigError("dataset: at least two sites are needed")
        if len(set(self.sites)) != len(self.sites):
            raise ConfigError(f"dataset: sites repeat ({', '.join(self.sites)})")
        if self.n_subjects < 3:
            raise ConfigError("dataset: at least 3 subjects (train, validation and test)")
        if not 32 <= self.matrix <= 128 or self.matrix % 2:
            raise ConfigError(f"dataset: matrix {self.matrix} must be even, in 32..128")
        if not 1 <= self.slices <= 16:
            raise ConfigError(f"dataset: slices {self.slices} must be in 1..16")
        unknown = [c for c in self.contrasts if c not in CONTRASTS]
        if unknown or not self.contrasts:
            raise ConfigError(f"dataset: contrast(s) {unknown} not one of "
                              f"{', '.join(CONTRASTS)}")
        if self.isochromats_per_voxel < 1:
            raise ConfigError("dataset: isochromats_per_voxel must be >= 1")


#: ``--quick``: 64x64, three sites (two 3 T vendors and 1.5 T, each vendor's own protocol
#: implementation), 6 subjects, one slice each, 16 isochromats per voxel (fewer leave
#: stripes of unspoiled FIDs from the refocusing pulse), anatomy at 3 mm.
QUICK = DatasetConfig(sites=DEFAULT_SITES[:3], n_subjects=6, matrix=64, slices=1,
                      isochromats_per_voxel=16, voxel_size_mm=3.0)


def split_subjects(subjects: Sequence[str], seed: int, *, val_fraction: float = 0.15,
                   test_fraction: float = 0.2) -> dict[str, str]:
    """Split subjects into ``train`` / ``validation`` / ``test`` (seeded, by subject).

    At least one subject goes to validation and one to test.

    Returns
    -------
    dict of str to str
        Subject id -> split.
    """
    n = len(subjects)
    order = np.random.default_rng([seed, 7]).permutation(n)
    n_test = max(1, round(test_fraction * n))
    n_val = max(1, round(val_fraction * n))
    if n_test + n_val >= n:
        raise ConfigError(f"dataset: {n} subjects leave none for training")
    out = {}
    for rank, i in enumerate(order):
        out[subjects[i]] = ("test" if rank < n_test else
                            "validation" if rank < n_test + n_val else "train")
    return out


def contrast_protocols(config: DatasetConfig) -> dict[str, Any]:
    """The protocol of each contrast of a dataset (validated :mod:`sequences` protocols)."""
    from mrharmony.sequences.protocol import protocol_from_mapping

    out = {}
    for name in config.contrasts:
        mapping = {**CONTRASTS[name], "name": name, "fov_mm": [_FOV_MM, _FOV_MM],
                   "matrix": [config.matrix, config.matrix], "slice_thickness_mm": 5,
                   "n_slices": 1, "readout_bandwidth_hz_per_px": 260,
                   "rf_duration_ms": 2, "rf_time_bw_product": 4}
        out[name] = protocol_from_mapping(mapping)
    return out


def _slice_indices(phantom: Any, n: int) -> list[int]:
    """Axial slice indices of a 3-D phantom grid at MNI z spread over -10..30 mm."""
    nz = phantom.shape[2]
    zs = [10.0] if n == 1 else list(np.linspace(-10.0, 30.0, n))
    inv = np.linalg.inv(phantom.affine)
    out = []
    for z in zs:
        k = round(float((inv @ np.array([0.0, 0.0, z, 1.0]))[2]))
        out.append(min(max(k, 0), nz - 1))
    return sorted(set(out))


def _on_grid(values: np.ndarray, src_affine: np.ndarray, shape: tuple[int, ...],
             affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a 3-D array onto another grid (0 outside)."""
    mapping = np.linalg.inv(src_affine) @ affine
    grid = np.indices(shape[:3], dtype=np.float64).reshape(3, -1)
    idx = np.rint(mapping[:3, :3] @ grid + mapping[:3, 3:4]).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.array(values.shape[:3])[:, None]), axis=0)
    out = np.zeros(grid.shape[1], dtype=values.dtype)
    out[inside] = values[idx[0, inside], idx[1, inside], idx[2, inside]]
    return out.reshape(shape[:3])


@dataclass
class _Timing:
    phantom_s: float = 0.0
    simulate_s: float = 0.0
    recon_s: float = 0.0
    images: int = 0
    per_image_s: list[float] = field(default_factory=list)


def build_dataset(out: str | Path, config: DatasetConfig = QUICK, *, force: bool = False,
                  progress: bool = False) -> Path:
    """Simulate and reconstruct a paired multi-site dataset (see the module docstring).

    Parameters
    ----------
    out : path
        The dataset folder to create (written atomically).
    config : DatasetConfig
        What to simulate (:data:`QUICK` by default).
    force : bool
        Replace an existing folder.
    progress : bool
        Show a progress bar (one step per image).

    Returns
    -------
    Path
        The dataset folder.

    Raises
    ------
    ConfigError
        An unknown site, a protocol a site cannot run, or an existing folder.
    """
    import nibabel as nib
    import pandas as pd
    from tqdm.auto import tqdm

    from mrharmony.config import to_mapping
    from mrharmony.fileio import atomic_directory
    from mrharmony.phantoms import make_cohort
    from mrharmony.sequences import load_scanner
    from mrharmony.simulation.native import native_protocol
    from mrharmony.simulation.site import load_site
    from mrharmony.study import tasks
    from mrharmony.study.plan import derive_seed, protocol_mapping

    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out}: exists (use --force to replace it)")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent}: no such folder")
    sites = []
    for name in config.sites:
        try:
            sites.append(load_site(name))
        except (ConfigError, FileNotFoundError) as exc:
            raise ConfigError(f"dataset: site {name!r}: {exc}") from exc
    protocols = contrast_protocols(config)
    cohort = make_cohort(config.n_subjects, config.seed, age_range=config.age_range,
                         voxel_size_mm=config.voxel_size_mm)
    covariates = cohort.covariates().set_index("subject")
    split = split_subjects(list(covariates.index), config.seed,
                           val_fraction=config.val_fraction,
                           test_fraction=config.test_fraction)
    fields = sorted({s.field_strength_t for s in sites})
    n_images = (config.n_subjects * len(sites) * len(protocols)
                * max(1, config.slices))
    timing = _Timing()
    rows: list[dict[str, Any]] = []
    label_names: dict[int, str] = {}
    t_start = time.perf_counter()
    with atomic_directory(out) as tmp, tasks.limit_threads(1):
        (tmp / "images").mkdir()
        (tmp / "truth").mkdir()
        work = tmp / ".work"
        work.mkdir()
        # the .seq of every (site, contrast) once: the vendor's flavour in the native arm
        seq_dirs: dict[tuple[str, str], Path] = {}
        for site in sites:
            scanner = to_mapping(load_scanner(site.scanner))
            for cname, base in protocols.items():
                protocol = native_protocol(base, site) if config.native else base
                d = work / f"seq-{site.name}-{cname}"
                d.mkdir()
                tasks.stage_sequence({"protocol": protocol_mapping(protocol),
                                      "scanner": scanner}, {}, d)
                seq_dirs[site.name, cname] = d
        bar = tqdm(total=n_images, desc="dataset", unit="image", disable=not progress)
        for sid in covariates.index:
            cov = covariates.loc[sid]
            for field_t in fields:
                t0 = time.perf_counter()
                volume = cohort.phantom(sid, field_t=field_t, matrix=config.matrix,
                                        three_d=True)
                zs = _slice_indices(volume, config.slices)
                slices = {}
                for z in zs:
                    ph = tasks.at_isocentre(volume.slice_z(z))
                    d = work / f"ph-{sid}-{field_t:g}-{z}"
                    d.mkdir()
                    ph.save(d / "phantom")
                    slices[z] = (ph, d)
                    label_names.update(ph.label_names)
                timing.phantom_s += time.perf_counter() - t0
                for site in (s for s in sites if s.field_strength_t == field_t):
                    for z, (ph, ph_dir) in slices.items():
                        truth_rel = f"truth/{sid}_{field_t:g}T_z{z}.npz"
                        for cname, base in protocols.items():
                            t1 = time.perf_counter()
                            tag = f"{sid}_{site.name}_{cname}_z{z}"
                            sim_dir, rec_dir = work / f"sim-{tag}", work / f"rec-{tag}"
                            sim_dir.mkdir()
                            rec_dir.mkdir()
                            params = {"site": site.to_mapping(), "native": config.native,
                                      "seed": derive_seed(config.seed, sid, site.name,
                                                          cname, z),
                                      "isochromats_per_voxel":
                                          config.isochromats_per_voxel,
                                      "backend": "numpy"}
                            if config.native:
                                params["protocol"] = protocol_mapping(base)
                            tasks.stage_simulate(params, {"phantom": ph_dir,
                                                          "sequence": seq_dirs[site.name,
                                                                               cname]},
                                                 sim_dir)
                            t2 = time.perf_counter()
                            tasks.stage_recon({"method": "auto", "backend": "numpy",
                                               "maps": "none"}, {"raw": sim_dir}, rec_dir)
                            t3 = time.perf_counter()
                            img = nib.load(rec_dir / "image.nii.gz")
                            rel = f"images/{tag}.nii.gz"
                            data = np.abs(np.asarray(img.dataobj, dtype=np.float32))
                            data = data.reshape(img.shape[:3])
                            nib.save(nib.Nifti1Image(data, img.affine), tmp / rel)
                            sidecar = rec_dir / "image.json"
                            if sidecar.is_file():
                                (tmp / rel.replace(".nii.gz", ".json")).write_text(
                                    sidecar.read_text())
                            if not (tmp / truth_rel).exists():
                                _write_truth(tmp / truth_rel, ph, img)
                            rows.append({
                                "subject": sid, "site": site.name,
                                "field_t": site.field_strength_t, "vendor": site.vendor,
                                "contrast": cname, "slice": int(z), "split": split[sid],
                                "path": rel, "truth": truth_rel,
                                "age": float(cov["age"]), "sex": cov["sex"],
                                "diagnosis": cov["diagnosis"]})
                            timing.simulate_s += t2 - t1
                            timing.recon_s += t3 - t2
                            timing.per_image_s.append(t3 - t1)
                            timing.images += 1
                            bar.update()
                            shutil.rmtree(sim_dir)
                            shutil.rmtree(rec_dir)
        bar.close()
        shutil.rmtree(work)
        pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
        total = time.perf_counter() - t_start
        info = {
            "format": "mrharmony-harmonize-dataset", "format_version": 1,
            "config": {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in asdict(config).items()},
            "sites": {s.name: {"field_t": s.field_strength_t, "vendor": s.vendor,
                               "scanner": s.scanner} for s in sites},
            "protocols": {k: protocol_mapping(v) for k, v in protocols.items()},
            "label_names": {str(k): v for k, v in sorted(label_names.items())},
            "splits": {k: sorted(s for s, v in split.items() if v == k)
                       for k in ("train", "validation", "test")},
            "timing": {"total_s": round(total, 2), "phantom_s": round(timing.phantom_s, 2),
                       "simulate_s": round(timing.simulate_s, 2),
                       "recon_s": round(timing.recon_s, 2), "images": timing.images,
                       "median_image_s": round(float(np.median(timing.per_image_s)), 3)
                       if timing.per_image_s else math.nan},
        }
        (tmp / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    return out


def _write_truth(path: Path, phantom: Any, image: Any) -> None:
    """The phantom slice's labels and maps on the reconstructed image's grid (npz)."""
    shape = image.shape[:3]
    arrays = {key: _on_grid(np.asarray(getattr(phantom, key)), phantom.affine, shape,
                            image.affine)[..., 0]
              for key in ("labels", "pd", "t1_ms", "t2_ms")}
    np.savez_compressed(path, **arrays)
