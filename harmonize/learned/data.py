"""Reading the training data of the learned image harmonizers (no torch needed).

A dataset folder is written by ``mrharmony harmonize dataset``
(:func:`mrharmony.study.dataset.build_dataset`): ``manifest.csv`` (one row per 2-D image:
subject, site, contrast, slice, split, path, truth, covariates), ``dataset.json``,
``images/*.nii.gz`` and ``truth/*.npz``. :func:`load_dataset` reads it into an
:class:`ImageDataset`; :meth:`ImageDataset.from_arrays` builds one from arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.errors import HarmonizeError

__all__ = ["SYNTHETIC_SITES", "ImageDataset", "foreground", "load_dataset", "robust_scale",
           "synthetic_dataset"]

_REQUIRED = ("subject", "site", "contrast", "slice", "split", "path")


def robust_scale(image: np.ndarray, *, percentile: float = 99.0) -> float:
    """The robust maximum of an image: the ``percentile`` of its foreground intensities.

    Parameters
    ----------
    image : numpy.ndarray
        Magnitude image (any shape).
    percentile : float
        Percentile (0-100) of the voxels above 5 % of the maximum.

    Returns
    -------
    float
        A positive scale (1.0 for an empty image).
    """
    a = np.abs(np.asarray(image, dtype=np.float64))
    if not np.any(a > 0):
        return 1.0
    fg = a[a > 0.05 * a.max()]
    value = float(np.percentile(fg, percentile))
    return value if value > 0 else 1.0


def foreground(image: np.ndarray, *, fraction: float = 0.1) -> np.ndarray:
    """Foreground mask: intensities above ``fraction`` of the robust maximum."""
    a = np.abs(np.asarray(image, dtype=np.float64))
    return a > fraction * robust_scale(a)


@dataclass
class ImageDataset:
    """2-D images of subjects at sites, with their metadata (and truth, when known).

    Attributes
    ----------
    images : numpy.ndarray
        ``(N, H, W)`` float32 magnitude images.
    table : pandas.DataFrame
        One row per image: at least ``subject, site, contrast, slice, split``.
    truth : dict of str to numpy.ndarray
        ``(N, H, W)`` arrays from the phantoms (``labels``, ``pd``, ``t1_ms``, ``t2_ms``),
        empty when unknown.
    info : dict
        ``dataset.json`` of a folder (sites, protocols, label names, timing).
    root : Path or None
        The folder it was read from.
    """

    images: np.ndarray
    table: Any
    truth: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None

    @classmethod
    def from_arrays(cls, images: np.ndarray, *, site: Any, subject: Any,
                    contrast: Any = "image", split: Any = "train",
                    slice_index: Any = 0) -> ImageDataset:
        """A dataset from arrays: ``images (N, H, W)`` and per-image labels (or scalars).

        Raises
        ------
        HarmonizeError
            Images not ``(N, H, W)`` or labels of another length.
        """
        import pandas as pd

        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 3:
            raise HarmonizeError(f"images: expected (N, H, W), got shape {images.shape}")
        n = images.shape[0]
        cols = {}
        for name, value in (("subject", subject), ("site", site), ("contrast", contrast),
                            ("split", split), ("slice", slice_index)):
            arr = np.asarray(value)
            arr = np.full(n, arr.item()) if arr.ndim == 0 else arr
            if arr.shape != (n,):
                raise HarmonizeError(f"{name}: {arr.shape[0] if arr.ndim else 1} labels "
                                     f"for {n} images")
            cols[name] = arr.astype(str) if name != "slice" else arr.astype(int)
        return cls(images=images, table=pd.DataFrame(cols))

    @property
    def sites(self) -> list[str]:
        """The sites, in the dataset's order (``dataset.json``), else sorted."""
        present = set(self.table["site"])
        listed = [s for s in self.info.get("sites", {}) if s in present]
        return listed + sorted(present - set(listed))

    def rows(self, **where: Any) -> np.ndarray:
        """Indices of the images whose columns equal the given values (a list: any of)."""
        keep = np.ones(len(self.table), dtype=bool)
        for col, value in where.items():
            if value is None:
                continue
            values = value if isinstance(value, (list, tuple, set)) else [value]
            keep &= self.table[col].isin(list(values)).to_numpy()
        return np.flatnonzero(keep)

    def paired(self, sites: list[str], *, contrast: str | None = None,
               split: str | None = None) -> np.ndarray:
        """Indices of images of the same subject, slice and contrast at every site.

        Returns
        -------
        numpy.ndarray
            ``(n_pairs, len(sites))`` image indices (column ``k`` at ``sites[k]``).
        """
        t = self.table.iloc[self.rows(contrast=contrast, split=split, site=list(sites))]
        key = ["subject", "slice", "contrast"]
        out = []
        for _, group in t.groupby(key, sort=True):
            by_site = dict(zip(group["site"], group.index, strict=True))
            if all(s in by_site for s in sites):
                out.append([by_site[s] for s in sites])
        return np.asarray(out, dtype=np.int64).reshape(-1, len(sites))


def load_dataset(path: str | Path) -> ImageDataset:
    """Read a dataset folder written by ``mrharmony harmonize dataset``.

    Parameters
    ----------
    path : path
        The folder (with ``manifest.csv``).

    Returns
    -------
    ImageDataset
        Images ``(N, H, W)`` in manifest order, the manifest, the truth maps.

    Raises
    ------
    HarmonizeError
        Not a dataset folder, a manifest without the required columns, a missing image,
        or images of different sizes.
    """
    import nibabel as nib
    import pandas as pd

    root = Path(path)
    manifest = root / "manifest.csv"
    if not root.is_dir() or not manifest.is_file():
        raise HarmonizeError(f"{root}: not a harmonization dataset (no manifest.csv; make "
                             "one with `mrharmony harmonize dataset`)")
    try:
        table = pd.read_csv(manifest, dtype={"subject": str, "site": str, "contrast": str,
                                             "split": str})
    except (ValueError, pd.errors.ParserError) as exc:
        raise HarmonizeError(f"{manifest}: unreadable ({exc})") from exc
    missing = [c for c in _REQUIRED if c not in table.columns]
    if missing:
        raise HarmonizeError(f"{manifest}: column(s) {missing} missing")
    info: dict[str, Any] = {}
    if (root / "dataset.json").is_file():
        info = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    images = []
    truth: dict[str, list[np.ndarray]] = {}
    cache: dict[str, Any] = {}
    for i, row in table.iterrows():
        f = root / str(row["path"])
        if not f.is_file():
            raise HarmonizeError(f"{manifest}: line {int(i) + 2}: image {f} not found")
        data = np.asarray(nib.load(f).dataobj, dtype=np.float32)
        images.append(np.abs(data.reshape(data.shape[0], data.shape[1])))
        if "truth" in table.columns and isinstance(row["truth"], str):
            if row["truth"] not in cache:
                with np.load(root / row["truth"], allow_pickle=False) as z:
                    cache[row["truth"]] = {k: z[k] for k in z.files}
            for k, v in cache[row["truth"]].items():
                truth.setdefault(k, []).append(v)
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise HarmonizeError(f"{root}: images of different sizes {sorted(shapes)}")
    stacked = {k: np.stack(v) for k, v in truth.items() if len(v) == len(images)}
    return ImageDataset(images=np.stack(images), table=table, truth=stacked, info=info,
                        root=root)


#: Tissue properties of :func:`synthetic_dataset` at 3 T: label -> (PD, T1 ms, T2 ms).
_TISSUES = {1: (1.0, 4000.0, 2000.0), 2: (0.8, 1400.0, 100.0), 3: (0.7, 850.0, 70.0)}

#: Virtual sites of :func:`synthetic_dataset`: T1 scale (field strength), T1w and T2w
#: spin-echo ``(TR, TE)`` in ms, gain, blur (Gaussian sigma, pixels), noise SD (fraction
#: of the maximum signal).
SYNTHETIC_SITES: dict[str, dict[str, Any]] = {
    "site-a": {"t1_scale": 1.0, "t1w": (500.0, 12.0), "t2w": (3000.0, 90.0), "gain": 1.0,
               "blur": 0.5, "noise": 0.01},
    "site-b": {"t1_scale": 0.75, "t1w": (700.0, 20.0), "t2w": (2500.0, 120.0), "gain": 2.5,
               "blur": 1.0, "noise": 0.02},
    "site-c": {"t1_scale": 0.9, "t1w": (400.0, 10.0), "t2w": (4000.0, 70.0), "gain": 0.6,
               "blur": 0.8, "noise": 0.015},
}


def _label_map(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random brain-like slice: head ellipse of GM around WM, CSF ventricles."""
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1) * 2 - 1
    cy, cx = rng.uniform(-0.06, 0.06, 2)
    ay, ax = rng.uniform(0.72, 0.86), rng.uniform(0.6, 0.74)
    r = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2
    labels = np.where(r < 1, 2, 0)
    labels[r < rng.uniform(0.45, 0.6)] = 3
    for _ in range(int(rng.integers(2, 5))):  # GM islands in the WM
        py, px = rng.uniform(-0.45, 0.45, 2)
        rr = rng.uniform(0.06, 0.14)
        labels[((yy - cy - py) ** 2 + (xx - cx - px) ** 2 < rr ** 2) & (labels == 3)] = 2
    vy, vx = rng.uniform(0.1, 0.2), rng.uniform(0.04, 0.08)
    for side in (-1, 1):  # ventricles
        dx = side * rng.uniform(0.08, 0.16)
        labels[((yy - cy) / vy) ** 2 + ((xx - cx - dx) / vx) ** 2 < 1] = 1
    labels[(r > 0.93) & (r < 1)] = 1  # CSF rim
    return labels.astype(np.int16)


def synthetic_dataset(*, n_subjects: int = 8, matrix: int = 32,
                      sites: dict[str, dict[str, Any]] | None = None,
                      contrasts: tuple[str, ...] = ("t1w", "t2w"), seed: int = 0,
                      n_validation: int = 1, n_test: int = 2) -> ImageDataset:
    """An analytic traveling-subject dataset (no Bloch simulation), for tests and demos.

    Each subject is a random label map (background, CSF, GM, WM; :data:`_TISSUES`); each
    site images it with the spin-echo signal ``PD (1 - exp(-TR/T1)) exp(-TE/T2)`` with
    its own ``(TR, TE)``, field-dependent T1 (``t1_scale``), gain, Gaussian blur and
    Rician-like magnitude noise (:data:`SYNTHETIC_SITES`). Every subject is imaged at
    every site in every contrast (perfectly paired).

    Parameters
    ----------
    n_subjects, matrix : int
        Number of subjects and image size (pixels).
    sites : dict, optional
        Site name -> parameters as in :data:`SYNTHETIC_SITES` (default: those).
    contrasts : tuple of str
        ``"t1w"`` and/or ``"t2w"``.
    seed : int
        Seed of the anatomy and the noise.
    n_validation, n_test : int
        Subjects in the ``validation`` and ``test`` splits (the last ones); the rest train.

    Returns
    -------
    ImageDataset
        With ``truth`` (``labels``, ``pd``, ``t1_ms``, ``t2_ms`` at 3 T).

    Raises
    ------
    HarmonizeError
        Too few subjects for the splits, or an unknown contrast.
    """
    from scipy.ndimage import gaussian_filter

    sites = dict(SYNTHETIC_SITES if sites is None else sites)
    if n_subjects < n_validation + n_test + 1:
        raise HarmonizeError("synthetic_dataset: needs at least one training subject")
    bad = [c for c in contrasts if c not in ("t1w", "t2w")]
    if bad:
        raise HarmonizeError(f"synthetic_dataset: unknown contrast(s) {bad} (t1w, t2w)")
    rng = np.random.default_rng(seed)
    images, subj, site_col, con, split = [], [], [], [], []
    truth: dict[str, list[np.ndarray]] = {"labels": [], "pd": [], "t1_ms": [], "t2_ms": []}
    for k in range(n_subjects):
        labels = _label_map(rng, matrix)
        maps = {name: np.zeros(labels.shape) for name in ("pd", "t1_ms", "t2_ms")}
        for lab, (pd_, t1, t2) in _TISSUES.items():
            for name, v in zip(maps, (pd_, t1, t2), strict=True):
                maps[name][labels == lab] = v * rng.uniform(0.97, 1.03)
        part = ("test" if k >= n_subjects - n_test else
                "validation" if k >= n_subjects - n_test - n_validation else "train")
        for name, p in sites.items():
            for c in contrasts:
                tr, te = p[c]
                t1 = np.maximum(maps["t1_ms"] * p["t1_scale"], 1.0)
                t2 = np.maximum(maps["t2_ms"], 1.0)
                sig = maps["pd"] * (1 - np.exp(-tr / t1)) * np.exp(-te / t2)
                sig = gaussian_filter(sig, p["blur"]) * p["gain"]
                sd = p["noise"] * p["gain"]
                noisy = np.hypot(sig + rng.normal(0, sd, sig.shape), rng.normal(0, sd, sig.shape))
                images.append(noisy.astype(np.float32))
                subj.append(f"sub-{k + 1:03d}")
                site_col.append(name)
                con.append(c)
                split.append(part)
                truth["labels"].append(labels)
                for nm in ("pd", "t1_ms", "t2_ms"):
                    truth[nm].append(maps[nm].astype(np.float32))
    ds = ImageDataset.from_arrays(np.stack(images), site=site_col, subject=subj,
                                  contrast=con, split=split)
    ds.truth = {k: np.stack(v) for k, v in truth.items()}
    ds.info = {"sites": {s: {} for s in sites}, "synthetic": True}
    return ds
