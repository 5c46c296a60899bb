"""Diffusion-MRI harmonization: RISH scaling and the method of moments.

Both methods learn voxel-wise maps from a *reference* site and a *target* site whose
subjects are registered to one grid (a template space), then map any target-site DWI
onto the reference site. DWIs are 4-D ``(x, y, z, n_volumes)`` arrays or nibabel images
with b-values in s/mm² and unit gradient directions ``(n_volumes, 3)``. Volumes with
``b < b0_threshold_s_mm2`` (default 50) and voxels outside the mask are never changed.
Shells are groups of b-values closer than ``shell_tolerance_s_mm2`` (default 100);
the reference and target shells are matched by b-value within that tolerance.

- :class:`RishHarmonizer` -- rotation-invariant spherical-harmonic features
  (Mirzaalian et al. 2016; Cetin Karayumak et al. 2019): per shell the signal is fitted
  with a real, symmetric SH basis (dipy's ``real_sh_descoteaux``, ``legacy=False``) of
  even order up to ``sh_order``; ``RISH_l = sum_m c_lm²``. The scale map per order is
  ``sqrt(E_ref[RISH_l] / E_target[RISH_l])`` (means over subjects) and the harmonized
  signal is the SH synthesis of the scaled coefficients (the SH fit residual is dropped,
  as in the paper).
- :class:`MomentsHarmonizer` -- method of moments (Huynh et al. 2019, IEEE TMI 38:1599):
  per shell and voxel a linear map ``a S + b`` that matches the mean and variance of the
  signal over gradient directions (spherical mean and variance, averaged over subjects)
  to the reference site. No SH fit, so any direction set works.

The scale maps are not smoothed (the papers smooth them with a small Gaussian kernel
in template space; smooth the inputs or maps yourself if you need it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrharmony.errors import HarmonizeError

from .image import as_array, resolve_mask, wrap_like

__all__ = ["MomentsHarmonizer", "RishHarmonizer", "find_shells", "rish_features", "sh_basis"]

ImageLike = Any


def find_shells(bvals_s_mm2: np.ndarray, *, b0_threshold_s_mm2: float = 50.0,
                shell_tolerance_s_mm2: float = 100.0) -> dict[float, np.ndarray]:
    """Group diffusion-weighted volumes into shells.

    Returns
    -------
    dict
        Mean b-value of the shell (s/mm²) -> indices of its volumes (b0 volumes excluded).
    """
    b = np.asarray(bvals_s_mm2, dtype=np.float64).ravel()
    if b.size == 0 or not np.isfinite(b).all() or (b < 0).any():
        raise HarmonizeError("bvals_s_mm2: must be finite and >= 0")
    idx = np.flatnonzero(b >= b0_threshold_s_mm2)
    if idx.size == 0:
        raise HarmonizeError(f"bvals_s_mm2: no diffusion-weighted volume (all b < "
                             f"{b0_threshold_s_mm2} s/mm²)")
    order = idx[np.argsort(b[idx], kind="stable")]
    breaks = np.flatnonzero(np.diff(b[order]) > shell_tolerance_s_mm2) + 1
    return {float(np.round(b[g].mean(), 1)): np.sort(g) for g in np.split(order, breaks)}


def sh_basis(bvecs: np.ndarray, sh_order: int) -> tuple[np.ndarray, np.ndarray]:
    """Real symmetric SH basis (n_dirs, n_coef) and the order ``l`` of each coefficient."""
    from dipy.core.geometry import cart2sphere
    from dipy.reconst.shm import real_sh_descoteaux

    if sh_order < 0 or sh_order % 2:
        raise HarmonizeError(f"sh_order: {sh_order} must be even and >= 0")
    v = np.asarray(bvecs, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1)
    if np.any(np.abs(norms - 1) > 1e-3):
        raise HarmonizeError(f"bvecs: {int(np.sum(np.abs(norms - 1) > 1e-3))} diffusion "
                             "directions are not unit vectors")
    _, theta, phi = cart2sphere(v[:, 0], v[:, 1], v[:, 2])
    basis, _, l_values = real_sh_descoteaux(sh_order, theta, phi, legacy=False)
    if basis.shape[0] < basis.shape[1]:
        raise HarmonizeError(f"sh_order: {sh_order} needs >= {basis.shape[1]} directions per "
                             f"shell, got {basis.shape[0]}")
    return basis, l_values


def _dwi(dwi: ImageLike, bvals: np.ndarray, bvecs: np.ndarray | None, mask: ImageLike | None,
         name: str) -> tuple[np.ndarray, np.ndarray]:
    data = as_array(dwi, name=name)
    if data.ndim != 4:
        raise HarmonizeError(f"{name}: expected a 4-D DWI (x, y, z, volumes), got {data.shape}")
    if np.asarray(bvals).size != data.shape[3]:
        raise HarmonizeError(f"{name}: {np.asarray(bvals).size} b-values for "
                             f"{data.shape[3]} volumes")
    if bvecs is not None and np.asarray(bvecs).shape != (data.shape[3], 3):
        raise HarmonizeError(f"{name}: bvecs shape {np.asarray(bvecs).shape}, expected "
                             f"({data.shape[3]}, 3)")
    inside = resolve_mask(data, mask, name=f"{name} mask", spatial_ndim=3)
    return data, inside


def rish_features(dwi: ImageLike, bvals_s_mm2: np.ndarray, bvecs: np.ndarray, *,
                  sh_order: int = 4, mask: ImageLike | None = None,
                  b0_threshold_s_mm2: float = 50.0, shell_tolerance_s_mm2: float = 100.0,
                  ) -> dict[float, np.ndarray]:
    """Rotation-invariant SH features per shell.

    Returns
    -------
    dict
        b-value (s/mm²) -> array (n_mask_voxels, sh_order // 2 + 1) of ``RISH_l`` for
        l = 0, 2, ..., sh_order (signal units squared), voxels in C order of the mask.
    """
    data, inside = _dwi(dwi, bvals_s_mm2, bvecs, mask, "dwi")
    out = {}
    for b, idx in find_shells(bvals_s_mm2, b0_threshold_s_mm2=b0_threshold_s_mm2,
                              shell_tolerance_s_mm2=shell_tolerance_s_mm2).items():
        basis, lv = sh_basis(np.asarray(bvecs)[idx], sh_order)
        coef = data[inside][:, idx].astype(np.float64) @ np.linalg.pinv(basis).T
        out[b] = _rish(coef, lv, sh_order)
    return out


def _rish(coef: np.ndarray, l_values: np.ndarray, sh_order: int) -> np.ndarray:
    orders = np.arange(0, sh_order + 1, 2)
    onehot = (l_values[:, None] == orders[None, :]).astype(np.float64)  # (n_coef, n_orders)
    return (coef**2) @ onehot


def _match_shells(ref: dict[float, np.ndarray], tgt: dict[float, np.ndarray],
                  tol: float) -> dict[float, float]:
    """Map each target shell to the reference shell of the closest b-value."""
    pairs = {}
    rb = np.array(sorted(ref))
    for b in tgt:
        j = int(np.argmin(np.abs(rb - b)))
        if abs(rb[j] - b) > tol:
            raise HarmonizeError(f"shell b={b:g} s/mm² of the target site has no reference "
                                 f"shell within {tol:g} s/mm² (reference: {rb.tolist()})")
        pairs[b] = float(rb[j])
    return pairs


@dataclass
class _DiffusionHarmonizer:
    b0_threshold_s_mm2: float = 50.0
    shell_tolerance_s_mm2: float = 100.0

    def _shells(self, bvals: np.ndarray) -> dict[float, np.ndarray]:
        return find_shells(bvals, b0_threshold_s_mm2=self.b0_threshold_s_mm2,
                           shell_tolerance_s_mm2=self.shell_tolerance_s_mm2)

    def _site_stats(self, dwis: Sequence[ImageLike], bvals: np.ndarray,
                    bvecs: np.ndarray | None, mask: ImageLike | None, name: str,
                    ) -> tuple[dict[float, np.ndarray], np.ndarray]:
        """Mean over subjects of the per-shell voxel statistics, and the common mask."""
        if len(dwis) == 0:
            raise HarmonizeError(f"{name}: no DWI given")
        sums: dict[float, np.ndarray] = {}
        inside0 = None
        for i, dwi in enumerate(dwis):
            data, inside = _dwi(dwi, bvals, bvecs, mask, f"{name}[{i}]")
            if inside0 is None:
                inside0 = inside
            elif inside.shape != inside0.shape:
                raise HarmonizeError(f"{name}[{i}]: grid {inside.shape} differs from "
                                     f"{inside0.shape}; register all DWIs to one template")
            for b, stat in self._voxel_stats(data, inside0, bvals, bvecs).items():
                sums[b] = sums.get(b, 0.0) + stat
        return {b: s / len(dwis) for b, s in sums.items()}, inside0

    def _voxel_stats(self, data: np.ndarray, inside: np.ndarray, bvals: np.ndarray,
                     bvecs: np.ndarray | None) -> dict[float, np.ndarray]:
        raise NotImplementedError

    def _fit(self, reference_dwis, target_dwis, ref_bvals, ref_bvecs, tgt_bvals, tgt_bvecs,
             mask) -> None:
        ref, inside = self._site_stats(reference_dwis, ref_bvals, ref_bvecs, mask, "reference")
        tgt, inside_t = self._site_stats(target_dwis, tgt_bvals, tgt_bvecs, mask, "target")
        if inside.shape != inside_t.shape:
            raise HarmonizeError(f"target grid {inside_t.shape} differs from reference grid "
                                 f"{inside.shape}; register both sites to one template")
        self.mask_ = inside & inside_t
        pairs = _match_shells(ref, tgt, self.shell_tolerance_s_mm2)
        sel_r, sel_t = self.mask_[inside], self.mask_[inside_t]
        self.reference_stats_ = {b: ref[pairs[b]][sel_r] for b in tgt}
        self.target_stats_ = {b: tgt[b][sel_t] for b in tgt}

    def _check_fitted(self) -> None:
        if getattr(self, "mask_", None) is None:
            raise HarmonizeError(f"{type(self).__name__}: not fitted (call fit first)")


@dataclass
class RishHarmonizer(_DiffusionHarmonizer):
    """RISH-feature scaling of a target site's DWI onto a reference site.

    Parameters
    ----------
    sh_order
        Maximum even SH order (4 needs >= 15 directions per shell, 6 needs >= 28).
    """

    sh_order: int = 4
    scale_maps: dict[float, np.ndarray] = field(default_factory=dict, repr=False)

    def _voxel_stats(self, data, inside, bvals, bvecs):
        out = {}
        for b, idx in self._shells(bvals).items():
            basis, lv = sh_basis(np.asarray(bvecs)[idx], self.sh_order)
            coef = data[inside][:, idx].astype(np.float64) @ np.linalg.pinv(basis).T
            out[b] = _rish(coef, lv, self.sh_order)
        return out

    def fit(self, reference_dwis: Sequence[ImageLike], target_dwis: Sequence[ImageLike], *,
            reference_bvals_s_mm2: np.ndarray, reference_bvecs: np.ndarray,
            target_bvals_s_mm2: np.ndarray, target_bvecs: np.ndarray,
            mask: ImageLike | None = None) -> RishHarmonizer:
        """Learn per-shell, per-order scale maps ``sqrt(E_ref[RISH_l] / E_target[RISH_l])``.

        The subjects of each site may differ (the maps compare site means); ``mask`` is
        the common brain mask in template space (default: non-zero voxels of the first
        DWI of each site, intersected).
        """
        self._fit(reference_dwis, target_dwis, reference_bvals_s_mm2, reference_bvecs,
                  target_bvals_s_mm2, target_bvecs, mask)
        self.scale_maps = {}
        for b, tgt in self.target_stats_.items():
            ref = self.reference_stats_[b]
            ok = tgt > 1e-12 * max(float(tgt.max()), 1e-300)
            self.scale_maps[b] = np.where(ok, np.sqrt(np.divide(ref, tgt, out=np.ones_like(tgt),
                                                                where=ok)), 1.0)
        return self

    def transform(self, dwi: ImageLike, *, bvals_s_mm2: np.ndarray,
                  bvecs: np.ndarray) -> ImageLike:
        """Harmonize one target-site DWI (same grid and shells as in ``fit``)."""
        self._check_fitted()
        data, _ = _dwi(dwi, bvals_s_mm2, bvecs, self.mask_, "dwi")
        out = data.astype(np.result_type(data.dtype, np.float32), copy=True)
        shells = self._shells(bvals_s_mm2)
        pairs = _match_shells(self.scale_maps, shells, self.shell_tolerance_s_mm2)
        orders = np.arange(0, self.sh_order + 1, 2)
        vox = data[self.mask_]
        for b, idx in shells.items():
            basis, lv = sh_basis(np.asarray(bvecs)[idx], self.sh_order)
            coef = vox[:, idx].astype(np.float64) @ np.linalg.pinv(basis).T
            scale = self.scale_maps[pairs[b]][:, np.searchsorted(orders, lv)]
            block = out[self.mask_]
            block[:, idx] = (coef * scale) @ basis.T
            out[self.mask_] = block
        return wrap_like(out, dwi)


@dataclass
class MomentsHarmonizer(_DiffusionHarmonizer):
    """Method-of-moments DWI harmonization (per shell, per voxel ``a S + b``)."""

    slope_maps: dict[float, np.ndarray] = field(default_factory=dict, repr=False)
    offset_maps: dict[float, np.ndarray] = field(default_factory=dict, repr=False)

    def _voxel_stats(self, data, inside, bvals, bvecs):
        vox = data[inside]
        return {b: np.column_stack([vox[:, idx].mean(axis=1, dtype=np.float64),
                                    vox[:, idx].astype(np.float64).var(axis=1)])
                for b, idx in self._shells(bvals).items()}

    def fit(self, reference_dwis: Sequence[ImageLike], target_dwis: Sequence[ImageLike], *,
            reference_bvals_s_mm2: np.ndarray, target_bvals_s_mm2: np.ndarray,
            mask: ImageLike | None = None) -> MomentsHarmonizer:
        """Learn ``a = sqrt(var_ref / var_tgt)``, ``b = mean_ref - a mean_tgt`` per shell.

        Means and variances are over gradient directions, averaged over each site's
        subjects. Where the target variance is 0 the slope is 1.
        """
        self._fit(reference_dwis, target_dwis, reference_bvals_s_mm2, None,
                  target_bvals_s_mm2, None, mask)
        self.slope_maps, self.offset_maps = {}, {}
        for b, (mt, vt) in ((b, s.T) for b, s in self.target_stats_.items()):
            mr, vr = self.reference_stats_[b].T
            ok = vt > 0
            a = np.where(ok, np.sqrt(np.divide(vr, vt, out=np.ones_like(vt), where=ok)), 1.0)
            self.slope_maps[b], self.offset_maps[b] = a, mr - a * mt
        return self

    def transform(self, dwi: ImageLike, *, bvals_s_mm2: np.ndarray) -> ImageLike:
        """Harmonize one target-site DWI (same grid and shells as in ``fit``)."""
        self._check_fitted()
        data, _ = _dwi(dwi, bvals_s_mm2, None, self.mask_, "dwi")
        out = data.astype(np.result_type(data.dtype, np.float32), copy=True)
        shells = self._shells(bvals_s_mm2)
        pairs = _match_shells(self.slope_maps, shells, self.shell_tolerance_s_mm2)
        block = out[self.mask_]
        for b, idx in shells.items():
            a, c = self.slope_maps[pairs[b]], self.offset_maps[pairs[b]]
            block[:, idx] = a[:, None] * block[:, idx].astype(np.float64) + c[:, None]
        out[self.mask_] = block
        return wrap_like(out, dwi)
