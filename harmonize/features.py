"""Region-of-interest features from images and label maps, as tidy or wide tables.

Tidy table: one row per (scan, region, feature) with columns ``subject``, ``site``,
``region``, ``feature`` (``mean``, ``median``, ``volume_ml``), ``value`` and one column
per covariate. Wide table (what ComBat and :mod:`mrharmony.harmonize.evaluate` use): one
row per scan with ``subject``, ``site``, covariates and one column per
``"{region}{sep}{feature}"`` (``sep="__"``, e.g. ``"thalamus__mean"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from mrharmony.errors import HarmonizeError

from .image import as_array

__all__ = ["FEATURES", "extract_roi_features", "from_wide", "to_wide"]

FEATURES = ("mean", "median", "volume_ml")
TIDY_COLUMNS = ("subject", "site", "region", "feature", "value")


def _voxel_volume_ml(image: Any, voxel_size_mm: Sequence[float] | None, name: str) -> float:
    if voxel_size_mm is not None:
        size = np.asarray(voxel_size_mm, dtype=np.float64)
    elif hasattr(image, "affine"):
        size = np.sqrt((np.asarray(image.affine)[:3, :3] ** 2).sum(axis=0))
    else:
        raise HarmonizeError(f"{name}: an array has no affine; pass voxel_size_mm for volumes")
    if size.shape != (3,) or not np.all(size > 0):
        raise HarmonizeError(f"voxel_size_mm: {size.tolist()} must be 3 positive sizes (mm)")
    return float(np.prod(size)) / 1000.0


def extract_roi_features(
    images: Sequence[Any],
    labels: Any | Sequence[Any],
    label_names: Mapping[int, str],
    *,
    subjects: Sequence[str],
    sites: Sequence[str],
    covariates: pd.DataFrame | Mapping[str, Sequence[Any]] | None = None,
    features: Sequence[str] = FEATURES,
    voxel_size_mm: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Extract ROI mean, median and volume from each image into a tidy DataFrame.

    Parameters
    ----------
    images
        3-D arrays or nibabel images (one scan each, any intensity unit).
    labels
        One integer label map shared by all images, or one per image (same grid as its
        image); 0 is background.
    label_names
        Label value -> region name; only these labels are measured.
    subjects, sites
        Subject and site identifiers, one per image.
    covariates
        Per-image covariates (DataFrame with one row per image, or mapping of columns).
    features
        Subset of ``("mean", "median", "volume_ml")``.
    voxel_size_mm
        Voxel size (mm) for arrays; nibabel images use their affine.

    Returns
    -------
    pandas.DataFrame
        Columns ``subject, site, region, feature, value`` then the covariates. Volumes in
        millilitres; a region absent from a label map has volume 0 and NaN intensities.
    """
    n = len(images)
    if n == 0:
        raise HarmonizeError("images: no image given")
    unknown = sorted(set(features) - set(FEATURES))
    if unknown or not features:
        raise HarmonizeError(f"features: {unknown or 'none'} not among {list(FEATURES)}")
    for nm, seq in (("subjects", subjects), ("sites", sites)):
        if len(seq) != n:
            raise HarmonizeError(f"{nm}: {len(seq)} given for {n} images")
    if not label_names:
        raise HarmonizeError("label_names: empty (nothing to measure)")
    per_image_labels = isinstance(labels, list | tuple)
    if per_image_labels and len(labels) != n:
        raise HarmonizeError(f"labels: {len(labels)} label maps for {n} images")
    cov = _covariate_frame(covariates, n)
    ids = np.array(sorted(label_names), dtype=np.int64)
    names = [label_names[i] for i in ids]
    rows = []
    for i, image in enumerate(images):
        data = as_array(image, name=f"images[{i}]").astype(np.float64)
        lab_src = labels[i] if per_image_labels else labels
        lab = as_array(lab_src, name="labels").astype(np.int64)
        if lab.shape != data.shape:
            raise HarmonizeError(f"labels: shape {lab.shape} differs from images[{i}] "
                                 f"shape {data.shape}")
        counts = ndimage.sum_labels(np.ones_like(data), lab, ids)
        values: dict[str, np.ndarray] = {}
        with np.errstate(invalid="ignore", divide="ignore"):
            if "mean" in features:
                values["mean"] = np.where(counts > 0, ndimage.sum_labels(data, lab, ids)
                                          / np.maximum(counts, 1), np.nan)
            if "median" in features:
                med = np.asarray(ndimage.median(data, lab, ids), dtype=np.float64)
                values["median"] = np.where(counts > 0, med, np.nan)
        if "volume_ml" in features:
            img_for_affine = image if hasattr(image, "affine") else lab_src
            values["volume_ml"] = counts * _voxel_volume_ml(img_for_affine, voxel_size_mm,
                                                            f"images[{i}]")
        for feat in features:
            rows.append(pd.DataFrame({"subject": str(subjects[i]), "site": str(sites[i]),
                                      "region": names, "feature": feat,
                                      "value": values[feat], "_scan": i}))
    tidy = pd.concat(rows, ignore_index=True)
    if cov is not None:
        tidy = tidy.join(cov, on="_scan")
    return tidy.drop(columns="_scan")


def _covariate_frame(covariates: Any, n: int) -> pd.DataFrame | None:
    if covariates is None:
        return None
    cov = pd.DataFrame(covariates).reset_index(drop=True)
    if len(cov) != n:
        raise HarmonizeError(f"covariates: {len(cov)} rows for {n} images")
    clash = sorted(set(cov.columns) & set(TIDY_COLUMNS))
    if clash:
        raise HarmonizeError(f"covariates: column names {clash} are reserved")
    return cov


def to_wide(tidy: pd.DataFrame, *, sep: str = "__") -> pd.DataFrame:
    """Pivot a tidy table to one row per scan and one column per ``region{sep}feature``.

    Every column other than ``region``, ``feature`` and ``value`` identifies the scan
    (subject, site, covariates, session, ...); it must be constant within a scan.
    """
    missing = sorted(set(TIDY_COLUMNS) - set(tidy.columns))
    if missing:
        raise HarmonizeError(f"tidy table: missing columns {missing}")
    id_cols = [c for c in tidy.columns if c not in ("region", "feature", "value")]
    bad = tidy["region"].astype(str).str.contains(sep, regex=False)
    if bad.any():
        raise HarmonizeError(f"region names contain the separator {sep!r}: "
                             f"{sorted(tidy.loc[bad, 'region'].unique())[:3]}")
    key = tidy["region"].astype(str) + sep + tidy["feature"].astype(str)
    frame = tidy.assign(_column=key)
    dup = frame.duplicated([*id_cols, "_column"])
    if dup.any():
        first = frame.loc[dup, [*id_cols, "_column"]].iloc[0].tolist()
        raise HarmonizeError(f"tidy table: {int(dup.sum())} duplicated (scan, region, "
                             f"feature) rows, first {first}")
    columns = list(pd.unique(key))
    wide = frame.set_index([*id_cols, "_column"])["value"].unstack("_column")[columns]
    wide.columns.name = None
    return wide.reset_index()


def from_wide(wide: pd.DataFrame, *, id_columns: Sequence[str], sep: str = "__",
              ) -> pd.DataFrame:
    """Inverse of :func:`to_wide`: melt ``region{sep}feature`` columns back to tidy rows.

    Parameters
    ----------
    id_columns
        Columns that identify a scan (``subject``, ``site``, covariates); every other
        column must be named ``region{sep}feature``.
    """
    missing = sorted(set(id_columns) - set(wide.columns))
    if missing:
        raise HarmonizeError(f"wide table: missing id columns {missing}")
    value_cols = [c for c in wide.columns if c not in id_columns]
    bad = [c for c in value_cols if sep not in str(c)]
    if bad:
        raise HarmonizeError(f"wide table: columns {bad[:3]} are not named "
                             f"'region{sep}feature' (or list them in id_columns)")
    long = wide.melt(id_vars=list(id_columns), value_vars=value_cols, var_name="_column",
                     value_name="value")
    parts = long["_column"].astype(str).str.rsplit(sep, n=1, expand=True)
    long = long.assign(region=parts[0], feature=parts[1]).drop(columns="_column")
    first = [c for c in ("subject", "site") if c in id_columns]
    rest = [c for c in id_columns if c not in first]
    return long[[*first, "region", "feature", "value", *rest]]
