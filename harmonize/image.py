"""Image-level intensity harmonization of structural MR images.

Every method works on a 3-D ``numpy`` array or a nibabel image, inside a brain/foreground
mask, and **never changes a voxel outside the mask** (those voxels are copied bit for bit;
the output dtype is ``np.result_type(input.dtype, float32)`` so the copy is exact).
When no mask is given the mask is the set of finite, non-zero voxels. A nibabel input
gives a :class:`nibabel.Nifti1Image` output with the same affine and header; an array
input gives an array.

Methods (statistics in float64):

- :func:`zscore` -- ``(x - mean) / sd`` over the mask.
- :func:`match_histogram` -- quantile mapping of the masked voxels onto a reference
  image's masked distribution.
- :class:`NyulNormalizer` -- piecewise-linear standard-scale mapping (Nyúl & Udupa 1999,
  Nyúl et al. 2000); landmarks learnt from a set and saved/loaded as JSON.
- :func:`whitestripe` -- normal-appearing white matter stripe (Shinohara et al. 2014),
  T1 (last histogram peak) and T2/FLAIR/PD (largest peak) modes.
- :class:`Ravel` -- removal of unwanted variation estimated from control (CSF) voxels by
  SVD (Fortin et al. 2016); needs all images on one grid.
- :class:`MicaNormalizer` -- CDF (quantile-function) warping of one site onto a reference
  site learnt from traveling subjects (Wrobel et al. 2020, "MICA").

The image-level evaluation (PSNR, SSIM and MAE against a traveling subject's reference
scan) is :func:`mrharmony.harmonize.evaluate.image_similarity`.

Differences from the intensity-normalization 3.0.1 anchor (documented choices):

- Everywhere: the anchor maps *every* voxel (``f(image)``, ``(image - mu) / sd``), so the
  background changes; here only the masked voxels change, the rest is copied exactly.
- Nyúl: same default landmarks (1st and 99th percentile ends, deciles 10..90 between),
  same standard range 1..100, and the standard scale is the mean of the linearly
  rescaled landmark vectors as there; beyond the end landmarks both extrapolate with the
  end segments' slopes (the anchor via ``interp1d(fill_value="extrapolate")``).
  Landmarks are saved as versioned JSON (the anchor: an unversioned 2-row ``.npy``), and
  images whose landmarks do not increase strictly are refused (the anchor divides by
  zero).
- WhiteStripe: width 0.05 in quantile units around the mode, as the anchor and the R
  package. The anchor finds the mode on an 80-point statsmodels KDE (bandwidth
  max/80, so the mode is quantised to ~1.3 % of the maximum intensity) after dropping the
  top 4 % (T1); here a 512-bin histogram smoothed with a 4-bin Gaussian, restricted for
  T1 to voxels above the masked mean and below the 99th percentile, and a "last" peak must
  reach 5 % of the highest one (the anchor's ``argrelmax`` takes any local maximum).
  T2/FLAIR/PD use the largest peak (below the 99th percentile) as the anchor does.
- RAVEL: the anchor WhiteStripes and registers (ANTs) internally, takes the SVD of the
  *uncentred* control-voxel matrix and regresses on the factors only. Here images must
  already be on one grid (normalise them first if you follow Fortin's protocol), the
  control matrix is centred per voxel before the SVD (as in the RAVEL paper), and the
  per-voxel regression includes an intercept and optional covariates of interest, whose
  effects are therefore protected.
- z-score: population SD (ddof=0), like the anchor.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from mrharmony.errors import HarmonizeError, ModelFileError
from mrharmony.fileio import atomic_path

__all__ = [
    "MicaNormalizer",
    "NyulNormalizer",
    "Ravel",
    "as_array",
    "match_histogram",
    "resolve_mask",
    "whitestripe",
    "wrap_like",
    "zscore",
]

ImageLike = Any  # np.ndarray or a nibabel SpatialImage
NYUL_FORMAT = "mrharmony-nyul"
MICA_FORMAT = "mrharmony-mica"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------
# array / image plumbing shared by all image methods
# --------------------------------------------------------------------------------------
def as_array(image: ImageLike, *, name: str = "image") -> np.ndarray:
    """Return the voxel array of a nibabel image or array (no copy when possible).

    Raises
    ------
    HarmonizeError
        When ``image`` is neither an array nor a nibabel image, or is empty.
    """
    if hasattr(image, "get_fdata") and hasattr(image, "dataobj"):
        data = np.asanyarray(image.dataobj)
    else:
        data = np.asarray(image)
    if data.ndim == 0 or data.size == 0:
        raise HarmonizeError(f"{name}: empty array of shape {data.shape}")
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise HarmonizeError(f"{name}: dtype {data.dtype} is not numeric")
    return data


def resolve_mask(data: np.ndarray, mask: ImageLike | None, *, name: str = "mask",
                 spatial_ndim: int | None = None) -> np.ndarray:
    """Boolean mask over the spatial axes of ``data``.

    ``mask=None`` means every finite, non-zero voxel (over the first ``spatial_ndim``
    axes; for 4-D data a voxel is inside when any volume is non-zero).

    Raises
    ------
    HarmonizeError
        When the mask shape differs from the image's spatial shape or the mask is empty.
    """
    spatial = data.shape[: spatial_ndim or data.ndim]
    if mask is None:
        inside = np.isfinite(data) & (data != 0)
        if data.ndim > len(spatial):
            inside = inside.reshape(*spatial, -1).any(axis=-1)
    else:
        inside = as_array(mask, name=name)
        if inside.shape != spatial:
            raise HarmonizeError(
                f"{name}: shape {inside.shape} differs from the image's spatial shape {spatial}"
            )
        inside = inside.astype(bool)
    if not inside.any():
        raise HarmonizeError(f"{name}: empty mask (no voxel inside)")
    return inside


def out_dtype(data: np.ndarray) -> np.dtype:
    """Output dtype that holds every input value exactly: ``result_type(dtype, float32)``."""
    return np.result_type(data.dtype, np.float32)


def wrap_like(values: np.ndarray, like: ImageLike) -> ImageLike:
    """Return ``values`` as a nibabel image with ``like``'s affine/header, or as an array."""
    if hasattr(like, "affine") and hasattr(like, "header"):
        from mrharmony.formats.nifti import nifti_image

        return nifti_image(values, like.affine, header=like.header)
    return values


def _apply_inside(image: ImageLike, inside: np.ndarray, new_values: np.ndarray) -> ImageLike:
    """Copy ``image`` (exactly) and overwrite the voxels in ``inside`` with ``new_values``."""
    data = as_array(image)
    out = data.astype(out_dtype(data), copy=True)
    out[inside] = new_values
    return wrap_like(out, image)


def _masked_values(image: ImageLike, mask: ImageLike | None, name: str) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    data = as_array(image, name=name)
    if data.ndim not in (2, 3):
        raise HarmonizeError(f"{name}: expected a 2-D or 3-D image, got shape {data.shape}")
    inside = resolve_mask(data, mask, name=f"{name} mask")
    values = data[inside].astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise HarmonizeError(f"{name}: {int(bad.sum())} non-finite voxels inside the mask")
    if values.size < 2:
        raise HarmonizeError(f"{name}: only {values.size} voxel inside the mask (need >= 2)")
    return values, inside


def _atomic_write_text(path: Path, text: str, *, force: bool) -> Path:
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists (use --force / force=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".tmp") as tmp:
        tmp.write_text(text)
    return path


def _read_model(path: Path, fmt: str) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise ModelFileError(f"{path}: not a readable JSON model file ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise ModelFileError(f"{path}: not a {fmt} file (format={doc.get('format')!r})"
                             if isinstance(doc, dict) else f"{path}: not a {fmt} file")
    if doc.get("version") != FORMAT_VERSION:
        raise ModelFileError(f"{path}: {fmt} version {doc.get('version')!r} is not supported "
                             f"(this mrharmony reads version {FORMAT_VERSION})")
    return doc


def _extrapolating_interp(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Piecewise-linear map through (xp, fp), extended linearly with the end slopes."""
    y = np.interp(x, xp, fp)
    lo, hi = x < xp[0], x > xp[-1]
    if lo.any():
        slope = (fp[1] - fp[0]) / (xp[1] - xp[0])
        y[lo] = fp[0] + slope * (x[lo] - xp[0])
    if hi.any():
        slope = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
        y[hi] = fp[-1] + slope * (x[hi] - xp[-1])
    return y


def _strictly_increasing(q: np.ndarray, name: str) -> np.ndarray:
    """Landmarks must increase strictly for a piecewise-linear map; refuse flat images."""
    if np.any(np.diff(q) <= 0):
        raise HarmonizeError(f"{name}: landmarks are not strictly increasing ({np.round(q, 4)}); "
                             "the masked intensities have too few distinct values")
    return q


# --------------------------------------------------------------------------------------
# z-score and histogram matching
# --------------------------------------------------------------------------------------
def zscore(image: ImageLike, *, mask: ImageLike | None = None) -> ImageLike:
    """Z-score the voxels inside the mask: ``(x - mean) / sd`` (ddof=0).

    Parameters
    ----------
    image
        2-D/3-D array or nibabel image (any intensity unit).
    mask
        Foreground mask (array or image); default: finite non-zero voxels.

    Returns
    -------
    Same kind as ``image``; inside the mask unitless z-scores, outside unchanged.

    Raises
    ------
    HarmonizeError
        Empty mask, non-finite voxels in the mask, or zero variance.
    """
    values, inside = _masked_values(image, mask, "image")
    sd = values.std()
    if not sd > 0:
        raise HarmonizeError("image: zero intensity variance inside the mask")
    return _apply_inside(image, inside, (values - values.mean()) / sd)


def _ecdf_quantiles(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique values and their mid-rank quantiles in (0, 1)."""
    uniq, counts = np.unique(values, return_counts=True)
    cum = np.cumsum(counts)
    return uniq, (cum - 0.5 * counts) / cum[-1]


def match_histogram(image: ImageLike, reference: ImageLike, *, mask: ImageLike | None = None,
                    reference_mask: ImageLike | None = None) -> ImageLike:
    """Map the masked intensities of ``image`` onto the distribution of ``reference``.

    Each distinct value gets the reference quantile at its mid-rank empirical CDF
    (ties keep one value), so the output histogram inside the mask equals the
    reference histogram up to discretisation.

    Parameters
    ----------
    image, reference
        2-D/3-D arrays or nibabel images; the grids may differ.
    mask, reference_mask
        Foreground masks of each (default: finite non-zero voxels).

    Returns
    -------
    Same kind as ``image``, in the reference's intensity unit inside the mask.
    """
    values, inside = _masked_values(image, mask, "image")
    ref_values, _ = _masked_values(reference, reference_mask, "reference")
    uniq, q = _ecdf_quantiles(values)
    ref_uniq, ref_q = _ecdf_quantiles(ref_values)
    mapped = np.interp(q, ref_q, ref_uniq)
    return _apply_inside(image, inside, mapped[np.searchsorted(uniq, values)])


# --------------------------------------------------------------------------------------
# Nyúl
# --------------------------------------------------------------------------------------
@dataclass
class NyulNormalizer:
    """Nyúl piecewise-linear histogram standardisation.

    Parameters
    ----------
    min_percentile, max_percentile
        Ends of the landmark range (percent), mapped to ``output_min``/``output_max``
        when learning the standard scale.
    landmark_percentiles
        Interior landmarks (percent); default deciles 10..90 (as intensity-normalization).
    output_min, output_max
        The standard scale's range (arbitrary units).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> imgs = [rng.gamma(4.0, 10.0 * (i + 1), (8, 8, 8)) for i in range(3)]
    >>> nyul = NyulNormalizer().fit(imgs)
    >>> out = nyul.transform(imgs[2])
    >>> bool(abs(np.percentile(out, 50) - np.median([np.percentile(nyul.transform(i), 50)
    ...      for i in imgs])) < 5)
    True
    """

    min_percentile: float = 1.0
    max_percentile: float = 99.0
    landmark_percentiles: tuple[float, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)
    output_min: float = 1.0
    output_max: float = 100.0
    standard_scale: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        p = self.percentiles
        if not (p[0] >= 0 and p[-1] <= 100 and np.all(np.diff(p) > 0)):
            raise HarmonizeError(f"nyul: percentiles must increase strictly within [0, 100], "
                                 f"got {p.tolist()}")
        if not self.output_max > self.output_min:
            raise HarmonizeError(f"nyul: output_max ({self.output_max}) must exceed "
                                 f"output_min ({self.output_min})")

    @property
    def percentiles(self) -> np.ndarray:
        """All landmark percentiles, ends included (percent)."""
        return np.array([self.min_percentile, *self.landmark_percentiles, self.max_percentile],
                        dtype=np.float64)

    def _landmarks(self, image: ImageLike, mask: ImageLike | None, name: str) -> tuple[
            np.ndarray, np.ndarray]:
        values, inside = _masked_values(image, mask, name)
        return _strictly_increasing(np.percentile(values, self.percentiles), name), inside

    def fit(self, images: Sequence[ImageLike], masks: Sequence[ImageLike | None] | None = None,
            ) -> NyulNormalizer:
        """Learn the standard scale from a set of images (one per subject).

        Each image's landmarks are rescaled linearly so that its min/max percentiles land
        on ``output_min``/``output_max``; the standard scale is their mean.
        """
        masks = _per_image(masks, len(images), "masks")
        if len(images) == 0:
            raise HarmonizeError("nyul: fit needs at least one image")
        scaled = []
        for i, (img, m) in enumerate(zip(images, masks, strict=True)):
            lm, _ = self._landmarks(img, m, f"images[{i}]")
            scaled.append(self.output_min + (lm - lm[0]) / (lm[-1] - lm[0])
                          * (self.output_max - self.output_min))
        self.standard_scale = np.mean(scaled, axis=0)
        return self

    def transform(self, image: ImageLike, *, mask: ImageLike | None = None) -> ImageLike:
        """Map an image onto the learnt standard scale (inside the mask only)."""
        if self.standard_scale is None:
            raise HarmonizeError("nyul: not fitted (call fit or load a landmarks file)")
        lm, inside = self._landmarks(image, mask, "image")
        values = as_array(image)[inside].astype(np.float64)
        return _apply_inside(image, inside,
                             _extrapolating_interp(values, lm, self.standard_scale))

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the percentiles and standard scale as a versioned JSON file."""
        if self.standard_scale is None:
            raise HarmonizeError("nyul: nothing to save, the normalizer is not fitted")
        doc = {"format": NYUL_FORMAT, "version": FORMAT_VERSION,
               "percentiles": self.percentiles.tolist(),
               "output_range": [self.output_min, self.output_max],
               "standard_scale": self.standard_scale.tolist()}
        return _atomic_write_text(Path(path), json.dumps(doc, indent=2), force=force)

    @classmethod
    def load(cls, path: str | Path) -> NyulNormalizer:
        """Read a file written by :meth:`save` (refuses other formats/versions)."""
        doc = _read_model(Path(path), NYUL_FORMAT)
        try:
            p = [float(v) for v in doc["percentiles"]]
            scale = np.asarray(doc["standard_scale"], dtype=np.float64)
            lo, hi = (float(v) for v in doc["output_range"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: malformed Nyúl landmarks file ({exc})") from exc
        if scale.shape != (len(p),):
            raise ModelFileError(f"{path}: {scale.size} standard-scale values for "
                                 f"{len(p)} percentiles")
        return cls(min_percentile=p[0], max_percentile=p[-1],
                   landmark_percentiles=tuple(p[1:-1]), output_min=lo, output_max=hi,
                   standard_scale=scale)


def _per_image(items: Sequence[Any] | None, n: int, name: str) -> list[Any]:
    if items is None:
        return [None] * n
    items = list(items)
    if len(items) == 1 and n > 1:
        return items * n
    if len(items) != n:
        raise HarmonizeError(f"{name}: {len(items)} given for {n} images (give 1 or {n})")
    return items


# --------------------------------------------------------------------------------------
# WhiteStripe
# --------------------------------------------------------------------------------------
_WS_PEAK = {"t1": "last", "t2": "largest", "flair": "largest", "pd": "largest"}


def _histogram_mode(values: np.ndarray, rule: str, *, bins: int = 512,
                    smooth_bins: float = 4.0, min_rel_height: float = 0.05) -> float:
    """Mode of a Gaussian-smoothed histogram: the 'last' or the 'largest' peak."""
    hist, edges = np.histogram(values, bins=bins)
    dens = ndimage.gaussian_filter1d(hist.astype(np.float64), smooth_bins, mode="constant")
    centres = 0.5 * (edges[:-1] + edges[1:])
    if rule == "largest":
        return float(centres[np.argmax(dens)])
    padded = np.concatenate([[-np.inf], dens, [-np.inf]])
    is_peak = (padded[1:-1] > padded[:-2]) & (padded[1:-1] >= padded[2:])
    is_peak &= dens >= min_rel_height * dens.max()
    return float(centres[np.flatnonzero(is_peak)[-1]])


def whitestripe(image: ImageLike, *, mask: ImageLike | None = None,
                modality: Literal["t1", "t2", "flair", "pd"] = "t1", width: float = 0.05,
                return_stripe: bool = False) -> ImageLike | tuple[ImageLike, np.ndarray]:
    """WhiteStripe normalisation: z-score with the mean/SD of the white-matter stripe.

    The stripe is the set of masked voxels whose empirical quantile lies within
    ``width`` of the quantile of the white-matter mode (T1: the last histogram peak;
    T2/FLAIR/PD: the largest peak).

    Parameters
    ----------
    image
        Skull-stripped 2-D/3-D array or nibabel image.
    mask
        Brain mask (default: finite non-zero voxels).
    modality
        Contrast, which selects the peak rule.
    width
        Half-width of the stripe in quantile units (0 < width < 0.5; default 0.05).
    return_stripe
        Also return the boolean stripe mask (image shape).

    Returns
    -------
    The normalised image (unitless, WM stripe ~ N(0, 1)) [, stripe mask].

    Raises
    ------
    HarmonizeError
        Unknown modality, bad width, or a stripe with fewer than 10 voxels.
    """
    if modality not in _WS_PEAK:
        raise HarmonizeError(f"whitestripe: modality {modality!r} is not one of "
                             f"{sorted(_WS_PEAK)}")
    if not 0 < width < 0.5:
        raise HarmonizeError(f"whitestripe: width {width} must be in (0, 0.5) (quantile units)")
    values, inside = _masked_values(image, mask, "image")
    if modality == "t1":
        voi = values[(values > values.mean()) & (values <= np.percentile(values, 99))]
    else:
        voi = values[values < np.percentile(values, 99)]
    mode = _histogram_mode(voi, _WS_PEAK[modality])
    q_mode = np.mean(voi <= mode)
    lo, hi = np.quantile(voi, [max(q_mode - width, 0.0), min(q_mode + width, 1.0)])
    in_stripe = (values >= lo) & (values <= hi)
    if in_stripe.sum() < 10:
        raise HarmonizeError(f"whitestripe: only {int(in_stripe.sum())} voxels in the stripe "
                             f"[{lo:.4g}, {hi:.4g}] (need >= 10); check mask and modality")
    stripe = values[in_stripe]
    sd = stripe.std()
    if not sd > 0:
        raise HarmonizeError("whitestripe: zero variance inside the white-matter stripe")
    out = _apply_inside(image, inside, (values - stripe.mean()) / sd)
    if not return_stripe:
        return out
    stripe_mask = np.zeros(inside.shape, dtype=bool)
    stripe_mask[inside] = in_stripe
    return out, stripe_mask


# --------------------------------------------------------------------------------------
# RAVEL
# --------------------------------------------------------------------------------------
@dataclass
class Ravel:
    """RAVEL: remove unwanted intensity variation estimated from control voxels.

    All images must share one grid (registered to a template). With ``Y`` the
    (voxels x images) intensity matrix, the control-voxel block is centred per voxel and
    its first ``n_factors`` right singular vectors ``W`` (images x k) are the unwanted
    factors. Every masked voxel is regressed on ``[1, Z, W]`` across images (``Z`` the
    biological covariates to protect) and the ``W`` part is subtracted. One least-squares
    solve covers all voxels at once.

    Parameters
    ----------
    n_factors
        Number of unwanted factors ``k`` (1 <= k < number of images).

    Notes
    -----
    Fortin et al. apply RAVEL to WhiteStripe-normalised images with CSF control voxels;
    use :func:`whitestripe` first for that protocol. With an affine per-image distortion
    ``a_j x + b_j`` of a common anatomy, ``n_factors=2`` removes it exactly.
    """

    n_factors: int = 1
    factors: np.ndarray | None = field(default=None, repr=False)
    singular_values: np.ndarray | None = field(default=None, repr=False)

    def fit_transform(self, images: Sequence[ImageLike], *, mask: ImageLike,
                      control_mask: ImageLike,
                      covariates: np.ndarray | None = None) -> list[ImageLike]:
        """Estimate the unwanted factors and return the corrected images.

        Parameters
        ----------
        images
            n >= 3 images on one grid.
        mask
            Common brain mask (voxels outside are never changed).
        control_mask
            Control voxels (e.g. the intersection of the subjects' CSF masks); must lie
            inside ``mask``.
        covariates
            (n, p) biological covariates whose effects are protected, or None.
        """
        n = len(images)
        if n < 3:
            raise HarmonizeError(f"ravel: needs at least 3 images on one grid, got {n}")
        if not 1 <= self.n_factors < n:
            raise HarmonizeError(f"ravel: n_factors={self.n_factors} must be in [1, {n - 1}]")
        arrays = [as_array(im, name=f"images[{i}]") for i, im in enumerate(images)]
        shape = arrays[0].shape
        for i, a in enumerate(arrays):
            if a.shape != shape:
                raise HarmonizeError(f"ravel: images[{i}] has shape {a.shape}, images[0] "
                                     f"{shape}; register all images to one grid first")
        inside = resolve_mask(arrays[0], mask, name="mask")
        control = resolve_mask(arrays[0], control_mask, name="control_mask")
        if np.any(control & ~inside):
            raise HarmonizeError(f"ravel: {int((control & ~inside).sum())} control voxels lie "
                                 "outside the brain mask")
        y = np.stack([a[inside].astype(np.float64) for a in arrays], axis=1)  # (V, n)
        if not np.isfinite(y).all():
            raise HarmonizeError("ravel: non-finite voxels inside the mask")
        yc = np.stack([a[control].astype(np.float64) for a in arrays], axis=1)
        yc -= yc.mean(axis=1, keepdims=True)
        _, s, vt = np.linalg.svd(yc, full_matrices=False)
        w = vt[: self.n_factors].T  # (n, k)
        z = np.ones((n, 1))
        if covariates is not None:
            cov = np.asarray(covariates, dtype=np.float64).reshape(n, -1)
            z = np.column_stack([z, cov])
        design = np.column_stack([z, w])
        if np.linalg.matrix_rank(design) < design.shape[1]:
            raise HarmonizeError("ravel: the covariates are confounded with the unwanted "
                                 "factors (rank-deficient design); drop covariates or factors")
        beta, *_ = np.linalg.lstsq(design, y.T, rcond=None)  # (p+k, V)
        corrected = y - (w @ beta[z.shape[1]:]).T
        self.factors, self.singular_values = w, s[: self.n_factors]
        return [_apply_inside(im, inside, corrected[:, j]) for j, im in enumerate(images)]


# --------------------------------------------------------------------------------------
# MICA
# --------------------------------------------------------------------------------------
@dataclass
class MicaNormalizer:
    """MICA: warp one site's intensities onto a reference site through matched CDFs.

    Learnt from traveling subjects scanned at both sites: for each subject the
    quantile functions at both sites are computed on ``n_quantiles`` probabilities; the
    site's transform is the monotone piecewise-linear map from the mean site quantile
    function to the mean reference quantile function (an average of the per-subject
    CDF warps ``F_ref^{-1} o F_site``). It then applies to any image of that site.

    Parameters
    ----------
    n_quantiles
        Probabilities on which the quantile functions are sampled (from 0.5 to 99.5 %).
    """

    n_quantiles: int = 200
    site_quantiles: np.ndarray | None = field(default=None, repr=False)
    reference_quantiles: np.ndarray | None = field(default=None, repr=False)

    def fit(self, site_images: Sequence[ImageLike], reference_images: Sequence[ImageLike], *,
            site_masks: Sequence[ImageLike | None] | None = None,
            reference_masks: Sequence[ImageLike | None] | None = None) -> MicaNormalizer:
        """Learn the warp from paired images (same traveling subject, same order)."""
        if len(site_images) != len(reference_images) or not site_images:
            raise HarmonizeError(f"mica: {len(site_images)} site images and "
                                 f"{len(reference_images)} reference images; they must be "
                                 "paired traveling subjects (same number, >= 1)")
        if self.n_quantiles < 3:
            raise HarmonizeError(f"mica: n_quantiles={self.n_quantiles} must be >= 3")
        p = np.linspace(0.5, 99.5, self.n_quantiles)
        sm = _per_image(site_masks, len(site_images), "site_masks")
        rm = _per_image(reference_masks, len(reference_images), "reference_masks")
        qs = [np.percentile(_masked_values(im, m, f"site_images[{i}]")[0], p)
              for i, (im, m) in enumerate(zip(site_images, sm, strict=True))]
        qr = [np.percentile(_masked_values(im, m, f"reference_images[{i}]")[0], p)
              for i, (im, m) in enumerate(zip(reference_images, rm, strict=True))]
        self.site_quantiles = _strictly_increasing(np.mean(qs, axis=0), "mica site quantiles")
        self.reference_quantiles = np.maximum.accumulate(np.mean(qr, axis=0))
        return self

    def transform(self, image: ImageLike, *, mask: ImageLike | None = None) -> ImageLike:
        """Warp an image of the learnt site onto the reference intensity scale."""
        if self.site_quantiles is None or self.reference_quantiles is None:
            raise HarmonizeError("mica: not fitted (call fit or load)")
        values, inside = _masked_values(image, mask, "image")
        return _apply_inside(image, inside, _extrapolating_interp(
            values, self.site_quantiles, self.reference_quantiles))

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the learnt quantile functions as a versioned JSON file."""
        if self.site_quantiles is None or self.reference_quantiles is None:
            raise HarmonizeError("mica: nothing to save, the normalizer is not fitted")
        doc = {"format": MICA_FORMAT, "version": FORMAT_VERSION,
               "site_quantiles": self.site_quantiles.tolist(),
               "reference_quantiles": self.reference_quantiles.tolist()}
        return _atomic_write_text(Path(path), json.dumps(doc, indent=2), force=force)

    @classmethod
    def load(cls, path: str | Path) -> MicaNormalizer:
        """Read a file written by :meth:`save`."""
        doc = _read_model(Path(path), MICA_FORMAT)
        try:
            s = np.asarray(doc["site_quantiles"], dtype=np.float64)
            r = np.asarray(doc["reference_quantiles"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFileError(f"{path}: malformed MICA file ({exc})") from exc
        if s.shape != r.shape or s.ndim != 1:
            raise ModelFileError(f"{path}: quantile arrays of shapes {s.shape} and {r.shape}")
        return cls(n_quantiles=s.size, site_quantiles=s, reference_quantiles=r)
