"""Brain phantom built offline from the MNI152 (ICBM 2009a) template that nilearn ships.

Source anatomy
--------------
``nilearn.datasets.load_mni152_template``, ``load_mni152_gm_template`` and
``load_mni152_wm_template`` read the package files
``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``
(1 mm, 197 x 233 x 189, skull-stripped); no network access is needed (Fonov V et al.
NeuroImage 2011;54:313-327).

Tissue fractions (1 mm)
-----------------------
- brain mask ``M``: template intensity ``I > 0`` (scaled to max 1), holes filled;
- ``f_WM = p_WM`` (the WM probability map);
- CSF is derived from the template intensity and the GM/WM maps as the larger of
  (a) the residual of the probability maps where the template is dark,
  ``clip(1 - p_GM - p_WM, 0, 1) * clip((0.50 - I) / 0.15, 0, 1)``, and
  (b) a two-compartment intensity unmixing of the non-WM part,
  ``((1 - p_WM) I_GM - (I - p_WM I_WM)) / (I_GM - I_CSF)`` with the template's pure-tissue
  intensities ``I_CSF = 0.25, I_GM = 0.60, I_WM = 0.88`` (histogram modes);
  clipped to ``[0, 1 - f_WM]``;
- ``f_GM = 1 - f_WM - f_CSF``.

So ``f_GM + f_WM + f_CSF = 1`` inside ``M`` and 0 outside (MNI-space volumes: CSF ~160
mL, GM ~1050 mL, WM ~670 mL; the template brain is larger than an average brain).

Resampling
----------
Fractions are resampled to the requested isotropic voxel size by Gaussian prefiltering
(FWHM = sqrt(v^2 - 1) mm, i.e. approximating a box average over the larger voxel) then
trilinear interpolation (both linear, so the fractions still sum to the resampled mask
fraction, the partial-volume fraction of brain in each voxel).

Partial-volume mixing (fast exchange, signal weighted)
------------------------------------------------------
With water-weighted fractions ``w_i = f_i PD_i``: ``PD = sum w_i``; rates are averaged
with these weights, ``R1 = sum w_i / T1_i / PD`` (same for R2 and R2*), and
``ADC = sum w_i ADC_i / PD``. Since ``R2_i >= R1_i`` for every tissue, ``T2 <= T1``
holds in every mixed voxel (likewise ``T2* <= T2``). Tissue values per field come from
:mod:`mrharmony.phantoms.relaxation`. ``b0_hz`` is zero (no susceptibility model).

Labels: 1 CSF, 2 GM, 3 WM (largest fraction).

Scalp fat (optional, ``fat_layer=True``; off by default so existing phantoms are unchanged)
-----------------------------------------------------------------------------------------
The template is skull-stripped and nilearn ships no head mask, so the subcutaneous fat
of the scalp is modelled as a shell around the brain mask (brain fraction > 0.5 at 1 mm):
voxels whose distance from the mask is in ``(SCALP_FAT_GAP_MM, SCALP_FAT_GAP_MM +
SCALP_FAT_THICKNESS_MM]`` (7 mm of skull without signal, then 5 mm of fat; the shell is
cut where the template's box ends, below the cerebellum). Its 1 mm fraction is resampled
like the tissue fractions. Fat does not exchange with water and the simulator holds one
species per voxel, so a voxel is fat when its fat signal weight (0.9 x fraction) exceeds
its water weight (the mixed PD), and then carries only fat: ``chemical_shift_ppm`` =
-3.4, relaxation from :func:`~mrharmony.phantoms.relaxation.fat_values`, label 4; all
other voxels keep their values and a chemical shift of 0.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from mrharmony.errors import PhantomError
from mrharmony.phantoms.phantom import BACKGROUND_T_MS, Phantom
from mrharmony.phantoms.relaxation import (
    FAT_CHEMICAL_SHIFT_PPM,
    TISSUES,
    TissueValues,
    fat_values,
    tissue_values,
)

__all__ = [
    "BRAIN_LABELS",
    "FAT_LABEL",
    "TissueFractions",
    "add_scalp_fat",
    "brain_fractions",
    "fractions_grid",
    "load_mni_fractions",
    "make_brain_phantom",
    "mix_tissues",
    "resample_fractions",
    "resample_maps",
    "scalp_fat_fraction",
]

BRAIN_LABELS = {1: "csf", 2: "gm", 3: "wm"}
#: Label of the scalp fat layer (``make_brain_phantom(fat_layer=True)``).
FAT_LABEL = 4
#: Distance (mm) from the brain mask to the inner edge of the scalp fat (skull, no signal).
SCALP_FAT_GAP_MM = 7.0
#: Thickness (mm) of the scalp's subcutaneous fat layer.
SCALP_FAT_THICKNESS_MM = 5.0
_CSF_I_LO = 0.35
_CSF_I_HI = 0.50
# Template intensity of pure CSF, GM and WM (modes of the template histogram).
_I_CSF = 0.25
_I_GM = 0.60
_I_WM = 0.88
#: Default FOV of a ``matrix``-specified brain grid (mm, cubic).
BRAIN_FOV_MM = 240.0
#: Default axial slice (MNI z, mm) of a 2-D brain phantom: through the lateral ventricles.
BRAIN_DEFAULT_Z_MM = 10.0


@dataclass
class TissueFractions:
    """CSF/GM/WM volume fractions on a grid.

    Attributes
    ----------
    csf, gm, wm : numpy.ndarray
        ``(nx, ny, nz)`` float32 fractions in [0, 1]; their sum is the brain fraction.
    affine : numpy.ndarray
        ``(4, 4)`` voxel index -> RAS (MNI) mm.
    """

    csf: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        """Grid ``(nx, ny, nz)``."""
        return tuple(int(n) for n in self.gm.shape)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Voxel volume (mL)."""
        return float(abs(np.linalg.det(self.affine[:3, :3])) / 1000.0)

    def brain_fraction(self) -> np.ndarray:
        """``f_CSF + f_GM + f_WM`` per voxel (float32)."""
        return self.csf + self.gm + self.wm

    def volumes_ml(self) -> dict[str, float]:
        """Tissue volumes (mL): ``csf``, ``gm``, ``wm`` and ``icv`` (their sum), float64."""
        v = self.voxel_volume_ml
        out = {name: float(getattr(self, name).sum(dtype=np.float64) * v) for name in TISSUES}
        out["icv"] = out["csf"] + out["gm"] + out["wm"]
        return out

    def as_dict(self) -> dict[str, np.ndarray]:
        """The three fraction maps by tissue name (``csf``, ``gm``, ``wm``)."""
        return {"csf": self.csf, "gm": self.gm, "wm": self.wm}


@functools.lru_cache(maxsize=1)
def load_mni_fractions() -> TissueFractions:
    """CSF/GM/WM fractions at 1 mm from nilearn's packaged MNI152 2009a template.

    The result is cached (one copy per process, ~100 MiB; ``load_mni_fractions.cache_clear()``
    frees it) and its arrays are read-only.

    Returns
    -------
    TissueFractions
        197 x 233 x 189 float32 maps.

    Raises
    ------
    PhantomError
        If nilearn or its packaged template files are unavailable.
    """
    try:
        from nilearn import datasets
    except ImportError as exc:  # pragma: no cover - nilearn is a dependency
        raise PhantomError(f"brain phantom needs nilearn ({exc})") from None
    try:
        t1_img = datasets.load_mni152_template(resolution=1)
        gm_img = datasets.load_mni152_gm_template(resolution=1)
        wm_img = datasets.load_mni152_wm_template(resolution=1)
    except Exception as exc:  # nilearn raises OSError/ValueError for missing files
        raise PhantomError(f"cannot read nilearn's MNI152 template files ({exc})") from None
    intensity = t1_img.get_fdata(dtype=np.float32)
    p_gm = gm_img.get_fdata(dtype=np.float32)
    p_wm = np.clip(wm_img.get_fdata(dtype=np.float32), 0.0, 1.0)
    top = float(intensity.max())
    if top > 0:
        intensity /= np.float32(top)
    mask = ndi.binary_fill_holes(intensity > 0)
    # (a) residual of the probability maps that is dark on T1w
    resid = np.clip(1.0 - p_gm - p_wm, 0.0, 1.0)
    dark = np.clip((_CSF_I_HI - intensity) / np.float32(_CSF_I_HI - _CSF_I_LO), 0.0, 1.0)
    csf = resid * dark
    del resid, dark, p_gm
    # (b) intensity unmixing of the non-WM part into GM and CSF
    unmix = ((1.0 - p_wm) * _I_GM - (intensity - p_wm * _I_WM)) / np.float32(_I_GM - _I_CSF)
    del intensity
    np.maximum(csf, unmix, out=csf)
    del unmix
    np.clip(csf, 0.0, 1.0 - p_wm, out=csf)
    csf *= mask
    wm = p_wm * mask
    gm = (1.0 - p_wm - csf) * mask
    del p_wm
    out = TissueFractions(csf.astype(np.float32), gm.astype(np.float32),
                          wm.astype(np.float32), np.array(t1_img.affine, dtype=np.float64))
    for arr in (out.csf, out.gm, out.wm, out.affine):
        arr.setflags(write=False)
    return out


def _target_grid(source: TissueFractions, *, voxel_size_mm: float | None, matrix: int | None,
                 fov_mm: float, three_d: bool, slice_index: int | None,
                 slice_z_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the requested grid (RAS, axes aligned with the template)."""
    if matrix is not None and voxel_size_mm is not None:
        raise PhantomError("give matrix or voxel_size_mm, not both")
    src_shape = np.array(source.shape)
    src_vox = np.linalg.norm(source.affine[:3, :3], axis=0)
    lo = source.affine[:3, 3]
    hi = lo + (src_shape - 1) * src_vox
    centre_mm = (lo + hi) / 2
    if matrix is not None:
        if isinstance(matrix, bool) or not 8 <= int(matrix) <= 1024:
            raise PhantomError(f"matrix: {matrix} outside [8, 1024]")
        n = int(matrix)
        vox = fov_mm / n
        shape = np.array([n, n, n])
        origin = centre_mm - (n // 2) * vox
    else:
        vox = float(src_vox[0]) if voxel_size_mm is None else float(voxel_size_mm)
        if not 0.25 <= vox <= 20.0:
            raise PhantomError(f"voxel_size_mm: {vox} outside [0.25, 20] mm")
        extent = hi - lo + src_vox
        shape = np.maximum(1, np.round(extent / vox)).astype(int)
        origin = centre_mm - (shape - 1) / 2 * vox
    if not three_d:
        nz = int(shape[2])
        k = math.floor(float(slice_z_mm - origin[2]) / vox + 0.5) if slice_index is None \
            else int(slice_index)
        if not 0 <= k < nz:
            raise PhantomError(f"slice_index: {k} outside [0, {nz - 1}]")
        origin = origin.copy()
        origin[2] += k * vox
        shape = np.array([shape[0], shape[1], 1])
    elif slice_index is not None:
        raise PhantomError("slice_index: give a slice or three_d, not both")
    affine = np.diag([vox, vox, vox, 1.0])
    affine[:3, 3] = origin
    return (int(shape[0]), int(shape[1]), int(shape[2])), affine


def resample_maps(maps: Mapping[str, np.ndarray], source_affine: np.ndarray,
                  shape: tuple[int, int, int], affine: np.ndarray) -> dict[str, np.ndarray]:
    """Resample maps in [0, 1] onto another grid (Gaussian prefilter + trilinear).

    Parameters
    ----------
    maps : mapping of str to numpy.ndarray
        Co-registered maps on the source grid (fractions, weights).
    source_affine : numpy.ndarray
        Source voxel -> RAS mm.
    shape : tuple of int
        Target ``(nx, ny, nz)``.
    affine : numpy.ndarray
        Target voxel -> RAS mm; axes may be rotated relative to the source.

    Returns
    -------
    dict of str to numpy.ndarray
        Float32 maps clipped to [0, 1]; 0 outside the source grid.
    """
    src_vox = float(np.mean(np.linalg.norm(np.asarray(source_affine)[:3, :3], axis=0)))
    dst_vox = float(np.mean(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)))
    fwhm_vox = np.sqrt(max(dst_vox ** 2 - src_vox ** 2, 0.0)) / src_vox
    sigma = fwhm_vox / 2.3548
    # target voxel centres -> source voxel coordinates
    to_src = np.linalg.solve(np.asarray(source_affine, dtype=np.float64),
                             np.asarray(affine, dtype=np.float64))
    ijk = np.indices(shape, dtype=np.float32).reshape(3, -1)
    coords = (to_src[:3, :3].astype(np.float32) @ ijk) + to_src[:3, 3:4].astype(np.float32)
    del ijk
    out = {}
    for name, arr in maps.items():
        data = ndi.gaussian_filter(arr, sigma, mode="constant") if sigma > 0.05 else arr
        vals = ndi.map_coordinates(data, coords, order=1, mode="constant", cval=0.0,
                                   prefilter=False)
        out[name] = np.clip(vals.reshape(shape), 0.0, 1.0).astype(np.float32)
    return out


def resample_fractions(source: TissueFractions, shape: tuple[int, int, int],
                       affine: np.ndarray) -> TissueFractions:
    """Resample fractions onto another grid (see :func:`resample_maps`).

    Parameters
    ----------
    source : TissueFractions
        Fractions on their own grid.
    shape : tuple of int
        Target ``(nx, ny, nz)``.
    affine : numpy.ndarray
        Target voxel -> RAS mm.

    Returns
    -------
    TissueFractions
    """
    out = resample_maps(source.as_dict(), source.affine, shape, affine)
    return TissueFractions(out["csf"], out["gm"], out["wm"], np.asarray(affine, np.float64))


def fractions_grid(source: TissueFractions, *, matrix: int | None = None,
                   voxel_size_mm: float | None = None, fov_mm: float = BRAIN_FOV_MM,
                   three_d: bool = True, slice_index: int | None = None,
                   slice_z_mm: float = BRAIN_DEFAULT_Z_MM
                   ) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a requested grid over a fractions' bounding box.

    Parameters
    ----------
    source : TissueFractions
        Fractions whose bounding box (RAS mm) the grid covers.
    matrix : int, optional
        A cube of ``matrix**3`` voxels over ``fov_mm``, centred on the box.
    voxel_size_mm : float, optional
        The whole box at this isotropic voxel size (default: the source voxel size).
    fov_mm : float, optional
        FOV (mm) of a ``matrix`` grid.
    three_d : bool, optional
        Keep the 3-D grid; else one axial slice.
    slice_index : int, optional
        2-D: slice index of the 3-D grid (default: the slice nearest ``slice_z_mm``).
    slice_z_mm : float, optional
        2-D: z (mm) of the default slice.

    Returns
    -------
    shape : tuple of int
    affine : numpy.ndarray
        ``(4, 4)`` voxel -> RAS mm.
    """
    return _target_grid(source, voxel_size_mm=voxel_size_mm, matrix=matrix, fov_mm=fov_mm,
                        three_d=three_d, slice_index=slice_index, slice_z_mm=slice_z_mm)


PropertyMap = Mapping[str, "float | np.ndarray"]


def mix_tissues(fractions: TissueFractions, props: Mapping[str, TissueValues | PropertyMap],
                *, field_t: float, name: str = "brain",
                metadata: dict | None = None) -> Phantom:
    """Partial-volume mixing of tissue properties into a :class:`Phantom`.

    Parameters
    ----------
    fractions : TissueFractions
        Per-tissue volume fractions.
    props : mapping
        ``tissue -> TissueValues`` or a mapping with keys ``t1_ms, t2_ms, t2star_ms, pd,
        adc_mm2_s`` whose values are scalars or ``(nx, ny, nz)`` arrays (spatially
        varying tissue properties, e.g. a disease effect in a region).
    field_t : float
        Field strength the properties belong to (T).
    name : str, optional
        Phantom name.
    metadata : dict, optional
        Extra provenance.

    Returns
    -------
    Phantom
        Signal-weighted fast-exchange mixture (see module docstring).
    """
    keys = ("t1_ms", "t2_ms", "t2star_ms", "pd", "adc_mm2_s")
    shape = fractions.shape
    w_sum = np.zeros(shape, np.float32)
    acc = {k: np.zeros(shape, np.float32) for k in ("r1", "r2", "r2s", "adc")}
    for tissue in TISSUES:
        p = props[tissue]
        vals = {k: getattr(p, k) for k in keys} if isinstance(p, TissueValues) else \
            {k: p[k] for k in keys}
        w = getattr(fractions, tissue) * np.float32(1.0) * vals["pd"]
        w = np.asarray(w, dtype=np.float32)
        w_sum += w
        acc["r1"] += w / np.float32(1.0) / vals["t1_ms"]
        acc["r2"] += w / vals["t2_ms"]
        acc["r2s"] += w / vals["t2star_ms"]
        acc["adc"] += w * vals["adc_mm2_s"]
        del w
    inside = w_sum > 0
    safe = np.where(inside, w_sum, np.float32(1.0))
    t1 = np.where(inside, safe / np.where(inside, acc["r1"], 1.0), BACKGROUND_T_MS)
    t2 = np.where(inside, safe / np.where(inside, acc["r2"], 1.0), BACKGROUND_T_MS)
    t2s = np.where(inside, safe / np.where(inside, acc["r2s"], 1.0), BACKGROUND_T_MS)
    adc = np.where(inside, acc["adc"] / safe, 0.0)
    del acc, safe
    # exact ordering after float32 rounding
    t2 = np.minimum(t2, t1)
    t2s = np.minimum(t2s, t2)
    stack = np.stack([fractions.csf, fractions.gm, fractions.wm])
    labels = (np.argmax(stack, axis=0) + 1).astype(np.int16)
    labels[~inside] = 0
    del stack
    present = set(np.unique(labels).tolist())
    return Phantom(
        pd=np.clip(w_sum, 0.0, 1.0), t1_ms=t1, t2_ms=t2, t2star_ms=t2s, adc_mm2_s=adc,
        b0_hz=np.zeros(shape, np.float32), labels=labels,
        label_names={k: v for k, v in BRAIN_LABELS.items() if k in present},
        affine=fractions.affine, field_t=field_t, name=name, metadata=dict(metadata or {}),
    )


@functools.lru_cache(maxsize=4)
def brain_fractions(*, matrix: int | None = None, voxel_size_mm: float | None = None,
                    fov_mm: float = BRAIN_FOV_MM, three_d: bool = True,
                    slice_index: int | None = None,
                    slice_z_mm: float = BRAIN_DEFAULT_Z_MM) -> TissueFractions:
    """MNI tissue fractions on a requested grid (see :func:`make_brain_phantom`).

    Cached (the last 4 grids); the returned arrays are read-only.
    """
    source = load_mni_fractions()
    shape, affine = _target_grid(source, voxel_size_mm=voxel_size_mm, matrix=matrix,
                                 fov_mm=fov_mm, three_d=three_d, slice_index=slice_index,
                                 slice_z_mm=slice_z_mm)
    if shape == source.shape and np.allclose(affine, source.affine):
        return source
    out = resample_fractions(source, shape, affine)
    for arr in (out.csf, out.gm, out.wm, out.affine):
        arr.setflags(write=False)
    return out


@functools.lru_cache(maxsize=1)
def scalp_fat_fraction() -> np.ndarray:
    """Scalp fat shell (0/1, float32) on the 1 mm MNI grid (see the module docstring).

    Cached; read-only.
    """
    source = load_mni_fractions()
    mask = source.brain_fraction() > 0.5
    vox = np.linalg.norm(source.affine[:3, :3], axis=0)
    dist = ndi.distance_transform_edt(~mask, sampling=vox)
    shell = ((dist > SCALP_FAT_GAP_MM)
             & (dist <= SCALP_FAT_GAP_MM + SCALP_FAT_THICKNESS_MM)).astype(np.float32)
    shell.setflags(write=False)
    return shell


def add_scalp_fat(phantom: Phantom, fat_fraction: np.ndarray) -> Phantom:
    """Put fat (one species per voxel, see the module docstring) into a brain phantom.

    Parameters
    ----------
    phantom : Phantom
        A water phantom on the fraction's grid.
    fat_fraction : numpy.ndarray
        ``phantom.shape`` fat volume fraction in [0, 1].

    Returns
    -------
    Phantom
        A copy with fat voxels (label :data:`FAT_LABEL`) and a ``chemical_shift_ppm`` map.
    """
    fat = fat_values(phantom.field_t)
    weight = np.asarray(fat_fraction, np.float32) * np.float32(fat.pd)
    is_fat = weight > phantom.pd
    pd = np.where(is_fat, weight, phantom.pd)
    t1 = np.where(is_fat, fat.t1_ms, phantom.t1_ms)
    t2 = np.where(is_fat, fat.t2_ms, phantom.t2_ms)
    t2s = np.where(is_fat, fat.t2star_ms, phantom.t2star_ms)
    adc = np.where(is_fat, fat.adc_mm2_s, phantom.adc_mm2_s)
    labels = np.where(is_fat, FAT_LABEL, phantom.labels).astype(np.int16)
    cs = np.where(is_fat, FAT_CHEMICAL_SHIFT_PPM, 0.0).astype(np.float32)
    names = dict(phantom.label_names)
    if is_fat.any():
        names[FAT_LABEL] = "fat"
    meta = dict(phantom.metadata)
    meta["scalp_fat"] = {"gap_mm": SCALP_FAT_GAP_MM, "thickness_mm": SCALP_FAT_THICKNESS_MM,
                         "chemical_shift_ppm": FAT_CHEMICAL_SHIFT_PPM,
                         "tissue_values": vars(fat)}
    return Phantom(pd=pd, t1_ms=t1, t2_ms=t2, t2star_ms=t2s, adc_mm2_s=adc,
                   b0_hz=phantom.b0_hz, labels=labels, label_names=names,
                   affine=phantom.affine, field_t=phantom.field_t, name=phantom.name,
                   dti_mm2_s=phantom.dti_mm2_s, chemical_shift_ppm=cs, metadata=meta)


def make_brain_phantom(field_t: float = 3.0, *, matrix: int | None = None,
                       voxel_size_mm: float | None = None, fov_mm: float = BRAIN_FOV_MM,
                       three_d: bool = True, slice_index: int | None = None,
                       slice_z_mm: float = BRAIN_DEFAULT_Z_MM,
                       fat_layer: bool = False) -> Phantom:
    """MNI152 brain phantom with field-dependent tissue relaxation.

    Parameters
    ----------
    field_t : float, optional
        Field strength (T) in [0.55, 7]; tabulated at 0.55, 1.5, 3 and 7 T.
    matrix : int, optional
        Cubic grid of ``matrix**3`` voxels over ``fov_mm`` centred on the brain.
    voxel_size_mm : float, optional
        Isotropic voxel size over the template's bounding box (default: native 1 mm).
    fov_mm : float, optional
        FOV of a ``matrix`` grid (mm).
    three_d : bool, optional
        3-D volume (default) or a single axial slice.
    slice_index : int, optional
        2-D: slice index of the 3-D grid (default: the slice nearest ``slice_z_mm``).
    slice_z_mm : float, optional
        2-D: MNI z (mm) of the default slice.
    fat_layer : bool, optional
        Add the scalp fat shell (label 4, ``chemical_shift_ppm`` -3.4; see the module
        docstring). Off by default: the brain-only phantom is unchanged.

    Returns
    -------
    Phantom
        Labels 1 CSF, 2 GM, 3 WM (4 fat); deterministic (no randomness).

    Examples
    --------
    >>> p = make_brain_phantom(3.0, voxel_size_mm=4.0, three_d=False)
    >>> p.is_2d
    True
    """
    values = {t: tissue_values(t, field_t) for t in TISSUES}
    fr = brain_fractions(matrix=matrix, voxel_size_mm=voxel_size_mm, fov_mm=fov_mm,
                         three_d=three_d, slice_index=slice_index, slice_z_mm=slice_z_mm)
    meta = {
        "generator": "mrharmony.phantoms.make_brain_phantom",
        "anatomy": "MNI152 ICBM 2009a symmetric (nilearn package data)",
        "tissue_values": {t: vars(v) for t, v in values.items()},
        "volumes_ml": fr.volumes_ml(),
        "mixing": "signal-weighted fast exchange of R1, R2, R2*; ADC water weighted",
    }
    phantom = mix_tissues(fr, values, field_t=field_t, name="mni152-brain", metadata=meta)
    if not fat_layer:
        return phantom
    source = load_mni_fractions()
    shell = scalp_fat_fraction()
    if fr.shape == source.shape and np.allclose(fr.affine, source.affine):
        fat = shell
    else:
        fat = resample_maps({"fat": shell}, source.affine, fr.shape, fr.affine)["fat"]
    return add_scalp_fat(phantom, fat)
