"""MR Shepp-Logan phantom (2-D/3-D) with T1, T2 and PD per ellipsoid.

Ellipsoid geometry and tissue assignment follow the 3-D MR Shepp-Logan standard of
Gach HM, Tanase C, Boada F. "2D & 3D Shepp-Logan phantom standards for MRI." 19th
International Conference on Systems Engineering (ICSENG) 2008, pp. 521-526,
doi:10.1109/ICSEng.2008.15, whose tissue T1 follows the power law ``T1 = A B0^C``
(seconds, B0 in T; coefficients of Bottomley PA et al., Med Phys 1984;11:425-448) and
whose T2 and spin density are fixed per tissue.

Composition: ellipsoids are painted in table order and a later ellipsoid replaces the
tissue of an earlier one (the tissue-label reading of Gach's additive table). Coordinates
are normalised to [-1, 1] over ``fov_mm``; the default 2-D slice is Gach's z = -0.25.

Model assumptions beyond Gach: T2* = T2 (no susceptibility dephasing), ADC per tissue
(CSF 3.0e-3, GM 0.8e-3, WM 0.7e-3, tumour 1.1e-3, clot 0.6e-3, scalp and marrow
0.3e-3 mm2/s) and ``b0_hz = 0``.
"""

from __future__ import annotations

import math

import numpy as np

from mrharmony.errors import PhantomError
from mrharmony.phantoms._grid import make_grid
from mrharmony.phantoms.phantom import BACKGROUND_T_MS, Phantom

__all__ = ["SHEPP_LOGAN_TISSUES", "make_shepp_logan", "shepp_logan_tissue_values"]

# tissue -> (label, A (s), C, fixed T1 (s) or None, T2 (s), ADC mm2/s)
SHEPP_LOGAN_TISSUES: dict[str, tuple[int, float, float, float | None, float, float]] = {
    "scalp": (1, 0.324, 0.137, None, 0.07, 0.3e-3),
    "marrow": (2, 0.533, 0.088, None, 0.05, 0.3e-3),
    "csf": (3, 0.0, 0.0, 4.2, 1.99, 3.0e-3),
    "gray-matter": (4, 0.857, 0.376, None, 0.10, 0.8e-3),
    "white-matter": (5, 0.583, 0.382, None, 0.08, 0.7e-3),
    "tumor": (6, 0.926, 0.217, None, 0.10, 1.1e-3),
    "blood-clot": (7, 1.35, 0.34, None, 0.20, 0.6e-3),
}

# x, y, z, a, b, c (normalised), theta (deg, in-plane), spin density, tissue
_ELLIPSOIDS: tuple[tuple[float, float, float, float, float, float, float, float, str], ...] = (
    (0.0, 0.0, 0.0, 0.72, 0.95, 0.93, 0.0, 0.80, "scalp"),
    (0.0, 0.0, 0.0, 0.69, 0.92, 0.90, 0.0, 0.12, "marrow"),
    (0.0, -0.0184, 0.0, 0.6624, 0.874, 0.88, 0.0, 0.98, "csf"),
    (0.0, -0.0184, 0.0, 0.6524, 0.864, 0.87, 0.0, 0.745, "gray-matter"),
    (-0.22, 0.0, -0.25, 0.41, 0.16, 0.21, -72.0, 0.98, "csf"),
    (0.22, 0.0, -0.25, 0.31, 0.11, 0.22, 72.0, 0.98, "csf"),
    (0.0, 0.35, -0.25, 0.21, 0.25, 0.35, 0.0, 0.617, "white-matter"),
    (0.0, 0.1, -0.25, 0.046, 0.046, 0.046, 0.0, 0.95, "tumor"),
    (-0.08, -0.605, -0.25, 0.046, 0.023, 0.02, 0.0, 0.95, "tumor"),
    (0.06, -0.605, -0.25, 0.046, 0.023, 0.02, -90.0, 0.95, "tumor"),
    (0.0, -0.1, -0.25, 0.046, 0.046, 0.046, 0.0, 0.95, "tumor"),
    (0.0, -0.605, -0.25, 0.023, 0.023, 0.023, 0.0, 0.95, "tumor"),
    (0.06, -0.105, 0.0625, 0.056, 0.04, 0.1, -90.0, 0.93, "tumor"),
    (0.0, 0.1, 0.625, 0.056, 0.056, 0.1, 0.0, 0.98, "csf"),
    (0.56, -0.4, -0.25, 0.2, 0.03, 0.1, 70.0, 0.85, "blood-clot"),
)


def shepp_logan_tissue_values(field_t: float) -> dict[str, dict[str, float]]:
    """T1 and T2 (ms) and ADC per Shepp-Logan tissue at a field strength.

    Parameters
    ----------
    field_t : float
        Field (T), in (0, 11.7].

    Returns
    -------
    dict
        ``tissue -> {"t1_ms", "t2_ms", "adc_mm2_s"}``.
    """
    if not (math.isfinite(field_t) and 0 < field_t <= 11.7):
        raise PhantomError(f"field_t: {field_t} T outside (0, 11.7] T")
    out = {}
    for tissue, (_, a, c, t1_fixed, t2, adc) in SHEPP_LOGAN_TISSUES.items():
        t1_s = t1_fixed if t1_fixed is not None else a * field_t ** c
        out[tissue] = {"t1_ms": 1e3 * t1_s, "t2_ms": 1e3 * min(t2, t1_s), "adc_mm2_s": adc}
    return out


def make_shepp_logan(field_t: float = 3.0, *, matrix: int = 128, fov_mm: float = 240.0,
                     three_d: bool = False, slice_index: int | None = None,
                     include_clot: bool = False) -> Phantom:
    """MR Shepp-Logan phantom (Gach et al. 2008).

    Parameters
    ----------
    field_t : float, optional
        Field strength (T) for the T1 power law.
    matrix : int, optional
        Voxels per axis.
    fov_mm : float, optional
        Field of view (mm) spanning the normalised [-1, 1] cube.
    three_d : bool, optional
        Full volume; else one axial slice.
    slice_index : int, optional
        2-D: slice of the 3-D grid (default: normalised z = -0.25).
    include_clot : bool, optional
        Add the blood-clot ellipsoid (not in Gach's table).

    Returns
    -------
    Phantom
        Labels: 1 scalp, 2 marrow, 3 csf, 4 gray-matter, 5 white-matter, 6 tumor,
        7 blood-clot.
    """
    values = shepp_logan_tissue_values(field_t)
    half = fov_mm / 2.0
    grid = make_grid(matrix, fov_mm, three_d=three_d, slice_index=slice_index,
                     default_z_mm=-0.25 * half)
    shape = grid.shape
    xn, yn, zn = grid.x / half, grid.y / half, grid.z / half
    labels = np.zeros(shape, np.int16)
    pd = np.zeros(shape, np.float32)
    ellipsoids = _ELLIPSOIDS if include_clot else _ELLIPSOIDS[:-1]
    for x0, y0, z0, a, b, c, theta_deg, rho, tissue in ellipsoids:  # 14 objects
        ct, st = math.cos(math.radians(theta_deg)), math.sin(math.radians(theta_deg))
        u = (xn - x0) * ct + (yn - y0) * st
        v = (xn - x0) * st - (yn - y0) * ct
        inside = np.broadcast_to((u / a) ** 2 + (v / b) ** 2 + ((zn - z0) / c) ** 2 <= 1.0,
                                 shape)
        labels[inside] = SHEPP_LOGAN_TISSUES[tissue][0]
        pd[inside] = rho
    n = max(v[0] for v in SHEPP_LOGAN_TISSUES.values()) + 1
    lut_t1 = np.full(n, BACKGROUND_T_MS)
    lut_t2 = np.full(n, BACKGROUND_T_MS)
    lut_adc = np.zeros(n)
    names = {}
    for tissue, (label, *_rest) in SHEPP_LOGAN_TISSUES.items():
        lut_t1[label] = values[tissue]["t1_ms"]
        lut_t2[label] = values[tissue]["t2_ms"]
        lut_adc[label] = values[tissue]["adc_mm2_s"]
        names[label] = tissue
    present = set(np.unique(labels).tolist())
    t2 = lut_t2[labels]
    return Phantom(
        pd=pd, t1_ms=lut_t1[labels], t2_ms=t2, t2star_ms=t2, adc_mm2_s=lut_adc[labels],
        b0_hz=np.zeros(shape, np.float32), labels=labels,
        label_names={k: v for k, v in names.items() if k in present},
        affine=grid.affine, field_t=field_t, name="shepp-logan-mr",
        metadata={
            "generator": "mrharmony.phantoms.make_shepp_logan",
            "reference": "Gach HM, Tanase C, Boada F. ICSENG 2008:521-526 "
                         "(doi:10.1109/ICSEng.2008.15)",
            "tissue_values": values, "matrix": int(matrix), "fov_mm": float(fov_mm),
            "three_d": bool(three_d), "include_clot": bool(include_clot),
        },
    )
