"""Atlas-prior tissue segmentation with partial-volume estimates (CSF, GM, WM volumes).

:func:`segment_tissues` classifies a structural image (T1-weighted or any contrast in
which the three tissues differ) into background, CSF, grey matter (GM) and white matter
(WM) and returns **partial-volume (PV) fractions** per voxel; volumes are the sums of the
fractions times the voxel volume (never counts of hard labels).

Model
-----
1. **Spatial priors.** The MNI152 (ICBM 2009a) GM and WM probability maps that nilearn
   ships as package data (``load_mni152_{gm,wm}_template``; nothing is downloaded), the
   brain mask of its T1 template (``T1 > 0``, holes filled), ``p_CSF = clip(mask - p_GM -
   p_WM, 0, 1)`` and ``p_BG = 1 - mask``; box-averaged to 2 mm and cached.
2. **Registration.** The priors are mapped onto the image grid by a 12-parameter affine
   (image world mm -> atlas world mm): initialised by matching the centres of mass of
   the image foreground (Otsu threshold, holes filled) and of the atlas brain, then
   refined with Powell's method at two smoothing levels (8 mm, then the image
   resolution) by minimising ``1 - R^2`` of the least-squares fit ``image ~ sum_k beta_k
   p_k`` (independent of contrast and global scale). The priors are then smoothed by a
   Gaussian of ``prior_fwhm_mm`` (on top of the image voxel size), so that they guide
   rather than dictate (atrophy moves tissue away from the template).
3. **Classes.** Four pure classes (background, CSF, GM, WM) with Gaussian intensities
   ``N(mu_k, sigma_k^2)`` and five mixed classes (BG/CSF, BG/GM, CSF/GM, GM/WM, CSF/WM)
   whose voxels hold a fraction ``alpha ~ U(0, 1)`` of the first tissue: ``y = alpha mu_a
   + (1 - alpha) mu_b + noise``, density ``[Phi((y - lo)/s) - Phi((y - hi)/s)] / (hi -
   lo)`` with ``s^2 = (sigma_a^2 + sigma_b^2) / 2`` (the uniform-by-Gaussian convolution
   of Santago & Gage 1993). Voxel priors: ``w_k p_k`` for pure classes and ``w_ab
   sqrt(p_a p_b)`` for mixed ones, renormalised per voxel; the class weights ``w`` are
   re-estimated (so a globally atrophied brain is not pulled back to the template).
4. **MRF.** A mean-field Potts prior on tissue memberships (pure classes one tissue,
   mixed classes half of each): ``q_vk ∝ prior_vk exp(beta sum_{u in N6(v)} sum_t M_kt
   m_ut) p(y_v | k)``, ``m_u`` the tissue memberships of the neighbours from the
   previous iteration.
5. **Bias field.** A multiplicative field ``b = exp(sum_j c_j P_j(x))`` with Legendre
   products of total degree 1..``bias_order`` over the brain's bounding box, fitted in
   the log domain by weighted least squares to ``log y - log mu_class`` of pure-tissue
   voxels (weights ``q mu^2 / sigma^2``, the delta-method inverse variance), as in
   Wells et al. 1996 / SPM's unified segmentation (here polynomial, not DCT).
6. **EM.** E-step (posteriors with priors x MRF x likelihood of the bias-corrected
   intensity), M-step (means, SDs and weights of the pure classes, then the bias field),
   until the relative change of the log-likelihood is below ``tol``.
7. **Partial volume.** The expected fraction of tissue ``a`` in a mixed-class voxel is
   the mean of ``alpha`` given ``y``: a normal ``N((y - mu_b) / (mu_a - mu_b), s^2 /
   (mu_a - mu_b)^2)`` truncated to ``[0, 1]``. The fraction map of a tissue is
   ``q(pure) + sum_mixed q(mixed) E[alpha]``.

Everything is deterministic (no random numbers).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy import optimize
from scipy.special import ndtr

from mrharmony.errors import HarmonizeError

__all__ = ["TISSUE_CLASSES", "TissueSegmentation", "segment_tissues"]

#: Tissues whose volumes are reported (``icv`` is their sum).
TISSUE_CLASSES = ("csf", "gm", "wm")
_PURE = ("background", "csf", "gm", "wm")
# mixed classes: (tissue a, tissue b) indices into _PURE
_MIXED = ((0, 1), (0, 2), (1, 2), (2, 3), (1, 3))
_ATLAS_VOXEL_MM = 2.0
_FWHM_TO_SIGMA = 1.0 / math.sqrt(8.0 * math.log(2.0))
_EPS = 1e-12
_UPDATE_MEANS = True


@dataclass
class TissueSegmentation:
    """Result of :func:`segment_tissues`.

    Attributes
    ----------
    fractions : dict of str to numpy.ndarray
        ``csf``, ``gm``, ``wm``: expected partial-volume fraction of each tissue per
        voxel (float32 in [0, 1], image grid; their sum is the brain fraction).
    probabilities : dict of str to numpy.ndarray
        ``background``, ``csf``, ``gm``, ``wm``: posterior probability that a voxel is
        pure tissue of that class (float32, image grid; mixed classes make up the rest).
    volumes_ml : dict of str to float
        ``csf``, ``gm``, ``wm`` (sum of fractions x voxel volume, mL) and ``icv`` (their
        sum).
    means, sds : dict of str to float
        Intensity mean and SD of each pure class (image units, after bias correction).
    bias_field : numpy.ndarray
        Multiplicative bias field on the image grid (float32; 1 outside the modelled
        region); the corrected image is ``image / bias_field``.
    converged : bool
        Whether the log-likelihood's relative change fell below ``tol``.
    n_iter : int
        EM iterations run.
    log_likelihood : float
        Final log-likelihood of the intensities (nats, sum over the modelled voxels).
    registration : numpy.ndarray
        ``(4, 4)`` affine image world (mm) -> atlas world (mm) that placed the priors.
    registration_r2 : float
        ``R^2`` of the image explained by the registered priors (0..1).
    """

    fractions: dict[str, np.ndarray]
    probabilities: dict[str, np.ndarray]
    volumes_ml: dict[str, float]
    means: dict[str, float]
    sds: dict[str, float]
    bias_field: np.ndarray
    converged: bool
    n_iter: int
    log_likelihood: float
    registration: np.ndarray
    registration_r2: float
    history: list[float] = field(default_factory=list, repr=False)


# ------------------------------------------------------------------ priors


@dataclass(frozen=True)
class _Atlas:
    maps: np.ndarray      # (4, nx, ny, nz) float32: background, csf, gm, wm
    affine: np.ndarray    # voxel -> world mm
    voxel_mm: float


@functools.lru_cache(maxsize=1)
def _mni152_atlas() -> _Atlas:
    """MNI152 2009a priors box-averaged to 2 mm (cached, read-only)."""
    try:
        from nilearn import datasets
    except ImportError as exc:  # pragma: no cover - nilearn is a dependency
        raise HarmonizeError(f"priors 'mni152' need nilearn ({exc})") from None
    try:
        t1 = datasets.load_mni152_template(resolution=1)
        gm_img = datasets.load_mni152_gm_template(resolution=1)
        wm_img = datasets.load_mni152_wm_template(resolution=1)
    except Exception as exc:  # missing package files
        raise HarmonizeError(f"priors 'mni152': cannot read nilearn's templates ({exc})"
                             ) from None
    brain = ndi.binary_fill_holes(np.asarray(t1.dataobj) > 0).astype(np.float32)
    gm = np.clip(gm_img.get_fdata(dtype=np.float32), 0, 1) * brain
    wm = np.clip(wm_img.get_fdata(dtype=np.float32), 0, 1) * brain
    scale = np.maximum(gm + wm, 1.0)
    gm /= scale
    wm /= scale
    csf = np.clip(brain - gm - wm, 0, 1)
    maps = [1.0 - brain, csf, gm, wm]
    return _box_average(maps, np.asarray(t1.affine, dtype=np.float64), 2)


def _box_average(maps: list[np.ndarray], affine: np.ndarray, factor: int) -> _Atlas:
    shape = np.array(maps[0].shape)
    new = -(-shape // factor)
    pad = [(0, int(n * factor - s)) for n, s in zip(new, shape, strict=True)]
    out = np.empty((len(maps), *new), np.float32)
    for i, m in enumerate(maps):
        cval = 1.0 if i == 0 else 0.0  # beyond the template: background
        p = np.pad(m, pad, constant_values=cval)
        out[i] = p.reshape(new[0], factor, new[1], factor, new[2], factor).mean(axis=(1, 3, 5))
    aff = affine.copy()
    aff[:3, :3] = affine[:3, :3] * factor
    aff[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2) + affine[:3, 3]
    out.setflags(write=False)
    aff.setflags(write=False)
    vox = float(np.mean(np.linalg.norm(aff[:3, :3], axis=0)))
    return _Atlas(out, aff, vox)


def _custom_atlas(priors: Mapping[str, Any]) -> _Atlas:
    missing = sorted(set(TISSUE_CLASSES) - set(priors))
    if missing:
        raise HarmonizeError(f"priors: missing maps {missing} (need csf, gm, wm)")
    arrays, affine = [], None
    for name in TISSUE_CLASSES:
        img = priors[name]
        if not hasattr(img, "affine"):
            raise HarmonizeError(f"priors[{name!r}]: must be a nibabel image (with affine)")
        aff = np.asarray(img.affine, dtype=np.float64)
        if affine is None:
            affine = aff
        elif not np.allclose(aff, affine, atol=1e-4):
            raise HarmonizeError(f"priors[{name!r}]: affine differs from priors['csf']")
        arr = np.asarray(img.dataobj, dtype=np.float32)
        if arr.ndim != 3 or (arrays and arr.shape != arrays[0].shape):
            raise HarmonizeError(f"priors[{name!r}]: shape {arr.shape} is not the "
                                 "shape of the other 3-D maps")
        if not np.all(np.isfinite(arr)):
            raise HarmonizeError(f"priors[{name!r}]: contains NaN or Inf")
        arrays.append(np.clip(arr, 0, 1))
    assert affine is not None
    _check_affine(affine, "priors")
    total = arrays[0] + arrays[1] + arrays[2]
    scale = np.maximum(total, 1.0)
    maps = np.stack([1.0 - np.minimum(total, 1.0)] + [a / scale for a in arrays])
    maps.setflags(write=False)
    vox = float(np.mean(np.linalg.norm(affine[:3, :3], axis=0)))
    return _Atlas(maps.astype(np.float32), affine, vox)


def _smoothed(atlas: _Atlas, fwhm_mm: float) -> np.ndarray:
    """Priors smoothed by a Gaussian (mm FWHM), channels last: (nx, ny, nz, 4) float64."""
    sigma = fwhm_mm * _FWHM_TO_SIGMA / atlas.voxel_mm
    out = np.empty((*atlas.maps.shape[1:], atlas.maps.shape[0]), np.float64)
    for i in range(atlas.maps.shape[0]):
        if sigma < 0.05:
            out[..., i] = atlas.maps[i]
        else:
            ndi.gaussian_filter(atlas.maps[i].astype(np.float64), sigma, output=out[..., i],
                                mode="nearest")
    return out


def _sample(maps: np.ndarray, atlas_affine: np.ndarray, world_to_atlas: np.ndarray,
            points_world: np.ndarray) -> np.ndarray:
    """Trilinear samples of (nx, ny, nz, 4) priors at world points (3, n): (4, n).

    Beyond the atlas grid the priors are pure background.
    """
    to_vox = np.linalg.inv(atlas_affine) @ world_to_atlas
    coords = to_vox[:3, :3] @ points_world + to_vox[:3, 3:4]
    dims = np.array(maps.shape[:3])
    base = np.floor(coords).astype(np.int64)
    frac = coords - base
    inside = np.all((base >= 0) & (base < dims[:, None] - 1), axis=0)
    base = np.where(inside, base, 0)
    flat = maps.reshape(-1, maps.shape[3])
    strides = np.array([dims[1] * dims[2], dims[2], 1])
    idx0 = strides @ base
    out = np.zeros((points_world.shape[1], maps.shape[3]))
    for dx in (0, 1):
        wx = frac[0] if dx else 1 - frac[0]
        for dy in (0, 1):
            wy = frac[1] if dy else 1 - frac[1]
            for dz in (0, 1):
                wz = frac[2] if dz else 1 - frac[2]
                out += (wx * wy * wz)[:, None] * flat[idx0 + dx * strides[0]
                                                      + dy * strides[1] + dz]
    out[~inside] = 0.0
    out[~inside, 0] = 1.0
    return out.T


# ------------------------------------------------------------ registration


def _params_to_matrix(x: np.ndarray) -> np.ndarray:
    """12 parameters -> 3x3 linear part and translation (mm).

    ``x = (tx, ty, tz, rx, ry, rz [rad x 100], log sx, sy, sz [x 100], shear xy, xz, yz
    [x 100])``; parameters are scaled so that one unit is about one millimetre at the
    brain's edge.
    """
    rx, ry, rz = x[3:6] / 100.0
    cx, sx_ = math.cos(rx), math.sin(rx)
    cy, sy_ = math.cos(ry), math.sin(ry)
    cz, sz_ = math.cos(rz), math.sin(rz)
    rot = (np.array([[1, 0, 0], [0, cx, -sx_], [0, sx_, cx]])
           @ np.array([[cy, 0, sy_], [0, 1, 0], [-sy_, 0, cy]])
           @ np.array([[cz, -sz_, 0], [sz_, cz, 0], [0, 0, 1]]))
    scale = np.diag(np.exp(x[6:9] / 100.0))
    shear = np.eye(3)
    shear[0, 1], shear[0, 2], shear[1, 2] = x[9:12] / 100.0
    return rot @ scale @ shear


def _world_to_atlas(x: np.ndarray, c_img: np.ndarray, c_atlas: np.ndarray) -> np.ndarray:
    lin = _params_to_matrix(x)
    out = np.eye(4)
    out[:3, :3] = lin
    out[:3, 3] = c_atlas + x[:3] - lin @ c_img
    return out


def _fit_r2(design: np.ndarray, y: np.ndarray) -> float:
    """1 - R^2 of the least-squares fit y ~ design.T beta (design (k, n))."""
    gram = design @ design.T
    rhs = design @ y
    try:
        beta = np.linalg.solve(gram + 1e-9 * np.trace(gram) * np.eye(len(gram)), rhs)
    except np.linalg.LinAlgError:
        return 1.0
    resid = y - beta @ design
    total = float(np.sum((y - y.mean()) ** 2))
    return float(np.sum(resid ** 2)) / max(total, _EPS)


def _register(y: np.ndarray, affine: np.ndarray, atlas: _Atlas, free_axes: np.ndarray,
              ) -> tuple[np.ndarray, float]:
    """Affine image world -> atlas world that best explains ``y`` by the priors."""
    shape = y.shape
    vox_mm = np.linalg.norm(affine[:3, :3], axis=0)
    # initial: centres of mass of the image foreground and of the atlas brain
    fg = _foreground(y)
    ijk = np.array(ndi.center_of_mass(fg), dtype=np.float64)
    c_img = affine[:3, :3] @ ijk + affine[:3, 3]
    brain = 1.0 - atlas.maps[0]
    a_ijk = np.array(ndi.center_of_mass(brain), dtype=np.float64)
    c_atlas = atlas.affine[:3, :3] @ a_ijk + atlas.affine[:3, 3]
    # parameters that cannot be determined on a thin image stay at their initial value
    fixed = np.zeros(12, bool)
    for axis in np.flatnonzero(~free_axes):
        # world axis most aligned with this voxel axis
        w = int(np.argmax(np.abs(affine[:3, axis])))
        fixed[w] = True            # translation
        fixed[6 + w] = True        # scale
        for k in range(3):  # rotations about the other two axes tilt the slice
            if k != w:
                fixed[3 + k] = True
        fixed[9:12] = True
    x = np.zeros(12)
    if not free_axes.all():
        c_img_fixed = c_img.copy()
        # keep the given through-plane position (no information to move it)
        for axis in np.flatnonzero(~free_axes):
            w = int(np.argmax(np.abs(affine[:3, axis])))
            c_atlas[w] = c_img_fixed[w]
    for fwhm, max_points, n_par in ((8.0, 5_000, 9), (0.0, 15_000, 12)):
        eff = max(float(vox_mm.mean()), atlas.voxel_mm)
        prior_fwhm = math.sqrt(max(eff ** 2 - atlas.voxel_mm ** 2, 0.0) + fwhm ** 2)
        maps = _smoothed(atlas, prior_fwhm)
        img = y
        if fwhm > 0:
            sig = fwhm * _FWHM_TO_SIGMA / vox_mm
            sig[~free_axes] = 0.0
            img = ndi.gaussian_filter(y, sig, mode="nearest")
        step = max(1, round((y.size / max_points) ** (1 / max(1, int(free_axes.sum())))))
        sl = tuple(slice(None, None, step) if f else slice(None) for f in free_axes)
        grid = np.indices(shape, dtype=np.float64)[(slice(None), *sl)].reshape(3, -1)
        pts = affine[:3, :3] @ grid + affine[:3, 3:4]
        vals = img[sl].ravel()
        free_idx = np.flatnonzero(~fixed[:n_par])

        def cost(xf: np.ndarray, pts=pts, vals=vals, maps=maps,
                 free_idx=free_idx) -> float:
            xx = x.copy()
            xx[free_idx] = xf
            m = _world_to_atlas(xx, c_img, c_atlas)
            return _fit_r2(_sample(maps, atlas.affine, m, pts), vals)

        res = optimize.minimize(cost, x[free_idx], method="Powell",
                                options={"xtol": 0.1, "ftol": 1e-5, "maxfev": 500})
        x[free_idx] = res.x
    m = _world_to_atlas(x, c_img, c_atlas)
    # R^2 on the full image at its own resolution
    eff = max(float(vox_mm.mean()), atlas.voxel_mm)
    maps = _smoothed(atlas, math.sqrt(max(eff ** 2 - atlas.voxel_mm ** 2, 0.0)))
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    pts = affine[:3, :3] @ grid + affine[:3, 3:4]
    r2 = 1.0 - _fit_r2(_sample(maps, atlas.affine, m, pts), y.ravel())
    return m, r2


def _foreground(y: np.ndarray) -> np.ndarray:
    """Otsu foreground of a non-negative image, holes filled (never empty)."""
    v = y[y > 0]
    hist, edges = np.histogram(v, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    thr = centres[int(np.argmax(between))]
    fg = y > thr
    if y.shape[2] > 1:
        fg = ndi.binary_fill_holes(fg)
    if not fg.any():
        fg = y > 0
    return fg


# ----------------------------------------------------------------- helpers


def _check_affine(affine: np.ndarray, name: str) -> None:
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise HarmonizeError(f"{name}: affine must be a finite 4x4 matrix")
    det = float(np.linalg.det(affine[:3, :3]))
    if not abs(det) > 1e-6:
        raise HarmonizeError(f"{name}: affine is singular (det {det:.3g})")


def _legendre_basis(coords: list[np.ndarray], order: int) -> np.ndarray:
    """Products of Legendre polynomials of total degree 1..order: (n_terms, n)."""
    from numpy.polynomial import legendre

    per_axis = []
    for c in coords:
        per_axis.append([legendre.legval(c, [0] * d + [1]) for d in range(order + 1)])
    terms = []
    for i in range(order + 1):
        for j in range(order + 1 - i):
            for k in range(order + 1 - i - j):
                if i + j + k == 0:
                    continue
                terms.append(per_axis[0][i] * per_axis[1][j] * per_axis[2][k])
    return np.array(terms) if terms else np.zeros((0, coords[0].size))


def _log_normal_pdf(y: np.ndarray, mu: float, sd: float) -> np.ndarray:
    return -0.5 * ((y - mu) / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)


def _mixed_logpdf_and_alpha(y: np.ndarray, mu_a: float, mu_b: float, sd: float,
                            ) -> tuple[np.ndarray, np.ndarray]:
    """Log density of a uniform a/b mixture and E[alpha | y] (fraction of a)."""
    delta = mu_a - mu_b
    if abs(delta) < 1e-3 * sd:  # indistinguishable tissues: a plain Gaussian, alpha 1/2
        return _log_normal_pdf(y, 0.5 * (mu_a + mu_b), sd), np.full(y.shape, 0.5)
    lo, hi = min(mu_a, mu_b), max(mu_a, mu_b)
    mass = ndtr((y - lo) / sd) - ndtr((y - hi) / sd)
    logpdf = np.log(np.maximum(mass, 1e-300)) - math.log(hi - lo)
    # alpha | y ~ N(m, s^2) truncated to [0, 1]
    m = (y - mu_b) / delta
    s = sd / abs(delta)
    lo_z = (0.0 - m) / s
    hi_z = (1.0 - m) / s
    z = ndtr(hi_z) - ndtr(lo_z)
    phi_lo = np.exp(-0.5 * lo_z ** 2)
    phi_hi = np.exp(-0.5 * hi_z ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = m + s * (phi_lo - phi_hi) / (math.sqrt(2 * math.pi) * z)
    alpha = np.where(z > 1e-12, alpha, np.where(m > 0.5, 1.0, 0.0))
    return logpdf, np.clip(alpha, 0.0, 1.0)


def _logsumexp(a: np.ndarray) -> np.ndarray:
    """log(sum(exp(a), axis=0)), stable."""
    top = a.max(axis=0)
    return top + np.log(np.exp(a - top).sum(axis=0))


def _neighbour_sum(field_: np.ndarray, free_axes: np.ndarray) -> np.ndarray:
    """Sum over the 6-neighbourhood (4 on a single slice), zero beyond the grid."""
    out = np.zeros_like(field_)
    for axis in range(3):
        if not free_axes[axis]:
            continue
        out += ndi.correlate1d(field_, np.array([1.0, 0.0, 1.0]), axis=axis,
                               mode="constant", cval=0.0)
    return out


def _as_image(image: Any, affine: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(image, "dataobj") and hasattr(image, "affine"):
        if affine is not None:
            raise HarmonizeError(f"{name}: give affine only with an array, not a nibabel "
                                 "image")
        data = np.asarray(image.dataobj)
        aff = np.asarray(image.affine, dtype=np.float64)
    else:
        data = np.asarray(image)
        if affine is None:
            raise HarmonizeError(f"{name}: an array needs its affine (voxel -> world mm)")
        aff = np.asarray(affine, dtype=np.float64)
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == bool):
        raise HarmonizeError(f"{name}: dtype {data.dtype} is not numeric")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise HarmonizeError(f"{name}: shape {data.shape} is not a 3-D volume")
    _check_affine(aff, name)
    return data, aff


# -------------------------------------------------------------------- main


def segment_tissues(image: Any, mask: Any | None = None, *, affine: Any | None = None,
                    priors: str | Mapping[str, Any] = "mni152", n_iter: int = 40,
                    mrf_beta: float = 0.3, bias_order: int = 2,
                    prior_fwhm_mm: float = 6.0, tol: float = 1e-5,
                    register: bool = True) -> TissueSegmentation:
    """Segment a brain image into CSF, GM and WM with partial-volume fractions.

    Parameters
    ----------
    image : nibabel image or array_like
        3-D magnitude image (any intensity unit and global scale; a 2-D array or a
        single-slice volume is treated as one slice). With an array, give ``affine``.
        Brain only (skull-stripped or a simulated brain); the intensity must differ
        between CSF, GM and WM.
    mask : nibabel image or array_like, optional
        Boolean region outside which no tissue is assumed (e.g. a brain mask); same
        shape as the image (and, for an image, the same affine).
    affine : array_like, optional
        ``(4, 4)`` voxel -> world (RAS mm) of an array ``image``.
    priors : ``"mni152"`` or mapping, optional
        ``"mni152"``: nilearn's packaged MNI152 2009a GM/WM probability maps (CSF and
        background derived, see the module docstring). Or a mapping ``csf``, ``gm``,
        ``wm`` -> nibabel images of probabilities on one grid.
    n_iter : int, optional
        Maximum EM iterations (>= 1).
    mrf_beta : float, optional
        Potts interaction per neighbour (dimensionless, >= 0; 0 disables the MRF).
    bias_order : int, optional
        Total polynomial degree of the log bias field (0 = no bias correction, <= 4).
    prior_fwhm_mm : float, optional
        Extra Gaussian smoothing of the priors (mm FWHM, >= 0).
    tol : float, optional
        Convergence threshold on the relative change of the log-likelihood.
    register : bool, optional
        Register the priors to the image (default). ``False`` trusts the image's affine
        to be in the priors' world space (MNI mm).

    Returns
    -------
    TissueSegmentation
        Fractions, pure-class probabilities, volumes (mL), class statistics, bias field,
        convergence flag, log-likelihood and the registration.

    Raises
    ------
    HarmonizeError
        Non-numeric, non-finite or non-3-D image; missing or singular affine; constant
        image; mask of another shape or affine, or empty; priors that are unknown or
        inconsistent; an image the registered priors do not explain (no brain); bad
        parameters.
    """
    data, aff = _as_image(image, affine, "image")
    if not np.all(np.isfinite(data)):
        raise HarmonizeError("image: contains NaN or Inf")
    if isinstance(n_iter, bool) or not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
        raise HarmonizeError(f"n_iter: {n_iter!r} must be an integer >= 1")
    if not (isinstance(mrf_beta, (int, float)) and 0 <= mrf_beta <= 5):
        raise HarmonizeError(f"mrf_beta: {mrf_beta!r} outside [0, 5]")
    if isinstance(bias_order, bool) or bias_order not in range(5):
        raise HarmonizeError(f"bias_order: {bias_order!r} must be an integer in [0, 4]")
    if not (isinstance(prior_fwhm_mm, (int, float)) and 0 <= prior_fwhm_mm <= 30):
        raise HarmonizeError(f"prior_fwhm_mm: {prior_fwhm_mm!r} outside [0, 30] mm")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise HarmonizeError(f"tol: {tol!r} outside (0, 1)")
    y = np.abs(data.astype(np.float64))
    top = float(np.percentile(y, 99.5))
    if not top > 0 or float(np.ptp(y)) <= 1e-9 * max(float(y.max()), _EPS):
        raise HarmonizeError("image: constant image (nothing to segment)")
    user_mask = None
    if mask is not None:
        if hasattr(mask, "dataobj") and hasattr(mask, "affine"):
            if not np.allclose(np.asarray(mask.affine, dtype=np.float64), aff, atol=1e-4):
                raise HarmonizeError("mask: affine differs from the image's affine")
            m = np.asarray(mask.dataobj)
        else:
            m = np.asarray(mask)
        if m.ndim == 2:
            m = m[..., None]
        if m.shape != y.shape:
            raise HarmonizeError(f"mask: shape {m.shape} differs from the image's "
                                 f"{y.shape}")
        user_mask = m.astype(bool)
        if not user_mask.any():
            raise HarmonizeError("mask: no voxel inside (no brain)")
        if float(np.ptp(y[user_mask])) <= 1e-9 * top:
            raise HarmonizeError("image: constant inside the mask (nothing to segment)")
    if isinstance(priors, str):
        if priors != "mni152":
            raise HarmonizeError(f"priors: {priors!r} unknown (use 'mni152' or a mapping)")
        atlas = _mni152_atlas()
    elif isinstance(priors, Mapping):
        atlas = _custom_atlas(priors)
    else:
        raise HarmonizeError(f"priors: {type(priors).__name__} is not 'mni152' or a mapping")

    y = y / top  # the model is scale-free; work near 1 for conditioning
    shape = y.shape
    free_axes = np.array([n >= 8 for n in shape])
    if int(free_axes.sum()) < 2:
        raise HarmonizeError(f"image: shape {shape} is too small to segment "
                             "(need >= 8 voxels along at least two axes)")
    reg_input = y if user_mask is None else y * user_mask
    if register:
        world_to_atlas, r2 = _register(reg_input, aff, atlas, free_axes)
    else:
        world_to_atlas = np.eye(4)
        vox = float(np.mean(np.linalg.norm(aff[:3, :3], axis=0)))
        eff = max(vox, atlas.voxel_mm)
        maps = _smoothed(atlas, math.sqrt(max(eff ** 2 - atlas.voxel_mm ** 2, 0.0)))
        grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
        r2 = 1.0 - _fit_r2(_sample(maps, atlas.affine, world_to_atlas,
                                   aff[:3, :3] @ grid + aff[:3, 3:4]), reg_input.ravel())
    if not r2 >= 0.25:
        raise HarmonizeError(f"image: the brain priors explain only {100 * r2:.0f} % of "
                             "the image variance after registration (no brain found?)")

    # priors on the image grid, smoothed to the image resolution plus prior_fwhm_mm
    vox_mm = np.linalg.norm(aff[:3, :3], axis=0)
    voxel_ml = float(abs(np.linalg.det(aff[:3, :3]))) / 1000.0
    eff = max(float(vox_mm[free_axes].mean()), atlas.voxel_mm)
    fwhm = math.sqrt(max(eff ** 2 - atlas.voxel_mm ** 2, 0.0) + prior_fwhm_mm ** 2)
    grid = np.indices(shape, dtype=np.float64).reshape(3, -1)
    pts = aff[:3, :3] @ grid + aff[:3, 3:4]
    p = _sample(_smoothed(atlas, fwhm), atlas.affine, world_to_atlas, pts)
    p = np.clip(p, 0.0, 1.0).reshape(4, *shape)
    # modelled region: where the (smoothed) priors allow tissue, within the user mask
    domain = (1.0 - p[0]) > 1e-3
    if user_mask is not None:
        domain &= user_mask
        p[0] = np.where(user_mask, p[0], 1.0)
        p[1:] *= user_mask
    if int(domain.sum()) < 50:
        raise HarmonizeError("image: fewer than 50 voxels where the priors allow brain "
                             "tissue (no brain in the field of view?)")
    yd = y[domain]
    pd_ = p[:, domain]
    eps = 1e-4
    pd_ = pd_ * (1 - 4 * eps) + eps
    n_pure, n_mix = len(_PURE), len(_MIXED)
    n_cls = n_pure + n_mix
    base_prior = np.empty((n_cls, yd.size))
    base_prior[:n_pure] = pd_
    for j, (a, b) in enumerate(_MIXED):
        base_prior[n_pure + j] = np.sqrt(pd_[a] * pd_[b])
    log_base = np.log(base_prior)
    # membership of each class in each tissue (for the MRF)
    member = np.zeros((n_cls, n_pure))
    member[np.arange(n_pure), np.arange(n_pure)] = 1.0
    for j, (a, b) in enumerate(_MIXED):
        member[n_pure + j, a] = member[n_pure + j, b] = 0.5

    # bias basis over the domain's bounding box
    idx = np.nonzero(domain)
    coords = []
    for axis in range(3):
        c = idx[axis].astype(np.float64)
        lo_c, hi_c = c.min(), c.max()
        coords.append((2 * (c - lo_c) / (hi_c - lo_c) - 1) if hi_c > lo_c else np.zeros_like(c))
    order = bias_order
    basis = _legendre_basis([c if free_axes[k] else np.zeros_like(c)
                             for k, c in enumerate(coords)], order)
    basis = basis[np.any(basis != 0, axis=1)] if basis.size else basis
    log_bias = np.zeros(yd.size)

    # initial class means: the image regressed on the registered priors (at the image
    # resolution), i.e. the intensities the atlas fractions imply
    p_res = _sample(_smoothed(atlas, math.sqrt(max(eff ** 2 - atlas.voxel_mm ** 2, 0.0))),
                    atlas.affine, world_to_atlas, pts)[:, domain.ravel()]
    gram0 = p_res @ p_res.T
    mu = np.linalg.solve(gram0 + 1e-9 * np.trace(gram0) * np.eye(n_pure), p_res @ yd)
    del p_res
    sd = np.full(n_pure, 0.1 * float(np.ptp(mu)) + 1e-3)
    weights = np.ones(n_cls)
    q = base_prior / base_prior.sum(axis=0)
    full = np.zeros((n_pure, *shape))
    history: list[float] = []
    converged = False
    it = 0
    alphas = [np.zeros(0)] * n_mix
    for it in range(1, n_iter + 1):
        yc = yd * np.exp(-log_bias)
        # ---- E-step
        logl = np.empty((n_cls, yd.size))
        for k in range(n_pure):
            logl[k] = _log_normal_pdf(yc, mu[k], sd[k])
        for j, (a, b) in enumerate(_MIXED):
            s = math.sqrt(0.5 * (sd[a] ** 2 + sd[b] ** 2))
            logl[n_pure + j], alphas[j] = _mixed_logpdf_and_alpha(yc, mu[a], mu[b], s)
        logl -= log_bias  # Jacobian of the bias correction
        logp = log_base + np.log(weights)[:, None]
        logp -= _logsumexp(logp)
        if mrf_beta > 0:
            tissue = member.T @ q  # (4, n) tissue memberships
            full[:] = 0.0
            full[:, domain] = tissue
            full[0][~domain] = 1.0  # outside the domain: background
            nb = np.stack([_neighbour_sum(full[t], free_axes)[domain] for t in range(n_pure)])
            energy = mrf_beta * (member @ nb)
            logp = logp + energy
            logp -= _logsumexp(logp)
        joint = logp + logl
        norm = _logsumexp(joint)
        q = np.exp(joint - norm)
        ll = float(norm.sum())
        history.append(ll)
        # ---- M-step: class means by weighted least squares over pure and mixed
        # voxels (a mixed voxel is alpha mu_a + (1 - alpha) mu_b), one noise SD shared by
        # the tissue classes (the noise is additive), one for the background
        gram = np.zeros((n_pure, n_pure))
        rhs = np.zeros(n_pure)
        for k in range(n_pure):
            gram[k, k] += q[k].sum()
            rhs[k] += np.dot(q[k], yc)
        for j, (a, b) in enumerate(_MIXED):
            wq, al = q[n_pure + j], alphas[j]
            gram[a, a] += np.dot(wq, al * al)
            gram[b, b] += np.dot(wq, (1 - al) ** 2)
            gram[a, b] += np.dot(wq, al * (1 - al))
            gram[b, a] = gram[a, b]
            rhs[a] += np.dot(wq * al, yc)
            rhs[b] += np.dot(wq * (1 - al), yc)
        gram += 1e-9 * np.trace(gram) * np.eye(n_pure)
        if _UPDATE_MEANS:
            mu = np.linalg.solve(gram, rhs)
        resid2 = np.zeros(n_cls)
        for k in range(n_pure):
            resid2[k] = np.dot(q[k], (yc - mu[k]) ** 2)
        for j, (a, b) in enumerate(_MIXED):
            pred_ab = alphas[j] * mu[a] + (1 - alphas[j]) * mu[b]
            resid2[n_pure + j] = np.dot(q[n_pure + j], (yc - pred_ab) ** 2)
        # the noise SD from the pure tissue classes (a mixed voxel's fitted alpha would
        # absorb its noise)
        tissue_cls = [1, 2, 3]
        sd[0] = max(math.sqrt(resid2[0] / max(q[0].sum(), _EPS)), 1e-3)
        s_t = math.sqrt(resid2[tissue_cls].sum() / max(q[tissue_cls].sum(), _EPS))
        sd[1:] = max(s_t, 1e-3)
        # class weights (SPM-style fixed point: expected counts / prior mass)
        prior_now = np.exp(log_base + np.log(weights)[:, None])
        prior_now /= prior_now.sum(axis=0)
        weights *= q.sum(axis=1) / np.maximum(prior_now.sum(axis=1), _EPS)
        weights = np.maximum(weights / weights.max(), 1e-6)
        # ---- bias field (log domain, pure tissue voxels)
        if basis.shape[0] and it >= 2:
            tissue_w = q[1:n_pure]
            mus = mu[1:n_pure, None]
            wsum = tissue_w.sum(axis=0)
            pred = np.sum(tissue_w * mus, axis=0) / np.maximum(wsum, _EPS)
            w = np.sum(tissue_w * (mus / sd[1:n_pure, None]) ** 2, axis=0)
            ok = (yd > 0) & (pred > 0.05 * mu.max()) & (wsum > 0.5)
            if ok.sum() > 10 * basis.shape[0]:
                r = np.log(yd[ok]) - np.log(pred[ok])
                bw = basis[:, ok] * w[ok]
                gram = bw @ basis[:, ok].T
                rhs = bw @ r
                gram += 1e-6 * np.trace(gram) / len(gram) * np.eye(len(gram))
                coef = np.linalg.solve(gram, rhs)
                log_bias = coef @ basis
                # geometric mean 1 over tissue: the scale stays in the class means
                log_bias -= float(np.sum(wsum * log_bias) / np.sum(wsum))
        if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1]):
            converged = True
            break

    # ---- partial-volume fractions
    frac = np.zeros((n_pure, yd.size))
    frac[:n_pure] = q[:n_pure]
    for j, (a, b) in enumerate(_MIXED):
        frac[a] += q[n_pure + j] * alphas[j]
        frac[b] += q[n_pure + j] * (1.0 - alphas[j])
    fractions, probabilities = {}, {}
    for k, name in enumerate(_PURE):
        pm = np.zeros(shape, np.float32)
        pm[domain] = q[k]
        if k == 0:
            pm[~domain] = 1.0
        probabilities[name] = pm
        if k > 0:
            fm = np.zeros(shape, np.float32)
            fm[domain] = frac[k]
            fractions[name] = fm
    volumes = {name: float(frac[k].sum() * voxel_ml) for k, name in enumerate(_PURE) if k}
    volumes["icv"] = volumes["csf"] + volumes["gm"] + volumes["wm"]
    bias = np.ones(shape, np.float32)
    bias[domain] = np.exp(log_bias)
    return TissueSegmentation(
        fractions=fractions, probabilities=probabilities, volumes_ml=volumes,
        means={n: float(mu[k] * top) for k, n in enumerate(_PURE)},
        sds={n: float(sd[k] * top) for k, n in enumerate(_PURE)},
        bias_field=bias, converged=converged, n_iter=it,
        log_likelihood=float(history[-1] - yd.size * math.log(top)),
        registration=world_to_atlas, registration_r2=float(r2), history=history)
