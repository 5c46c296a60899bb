"""ISMRM/NIST system phantom (CaliberMRI model 130): the T1 (NiCl2) and T2 (MnCl2) arrays.

Reference relaxation times
--------------------------
The 14 spheres of each array are numbered 1 (longest T1) to 14 (shortest T1), as on the
phantom's certificate. Values are the NIST reference T1 and T2 at 20 C for phantom
version 1 (serial numbers <= 0041), at 1.5 T and 3.0 T, from the supporting
information of

    Stupic KF, Ainslie M, Boss MA, et al. A standard system phantom for magnetic
    resonance imaging. Magn Reson Med 2021;86:1194-1211. doi:10.1002/mrm.28779

(e.g. T1 array sphere 1 at 3 T: T1 = 1989 ms, as also quoted for version 1 by the ISMRM
reproducibility challenge, Boudreau et al.; see also Keenan KE et al., Quantitative
magnetic resonance imaging phantoms: a review and the need for a system phantom, Magn
Reson Med 2018;79:48-61). Version 2 phantoms (serial >= 0042) differ by up to ~5 % and
should use their own certificate (pass ``reference=`` with the certificate values).

Only 1.5 T and 3.0 T are certified: other fields raise :class:`PhantomError` (fields
within 0.15 T of a certified one, e.g. 1.494 T or 2.89 T, use that table).

Geometry (to scale, RAS mm, phantom centre at the origin, phantom axis along z)
-------------------------------------------------------------------------------
- Shell: 200 mm inner-diameter sphere (Stupic 2021) filled with the bulk fill.
- Each array: 14 spheres on a plate normal to z; 10 on an outer ring of radius 49 mm
  and 4 on an inner ring of radius 27 mm (ring layout of the NIST analysis masks,
  ``roi_centers_ref``: outer sphere k at angle ``pi - 2 pi k / 10``, inner sphere k at
  ``5 pi / 4 - 2 pi k / 4``); sphere diameter 20 mm (nominal; configurable).
- T1 array plate centred at z = -20 mm, T2 array plate at z = +20 mm (schematic plate
  positions; the other plates, fiducials, PD array and resolution insets, are not
  modelled).

Sphere voxels are assigned by voxel centre (no partial volume), so the mean of any map
over a sphere's label equals its reference value exactly.

Model assumptions (not certified): PD = 1 in spheres and fill; T2* = T2 (no
susceptibility); ADC of all liquids = free water at 20 C (Speedy-Angell, 2.02e-3
mm2/s); the bulk fill is modelled as water with T1 = 3000 ms, T2 = 2000 ms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mrharmony.errors import PhantomError
from mrharmony.phantoms._grid import make_grid
from mrharmony.phantoms.diffusion import water_diffusivity_mm2_s
from mrharmony.phantoms.phantom import BACKGROUND_T_MS, Phantom

__all__ = [
    "SYSTEM_REFERENCE",
    "SystemSphere",
    "make_system_phantom",
    "system_reference",
    "system_spheres",
]

CERTIFIED_FIELDS_T = (1.5, 3.0)
_FIELD_TOL_T = 0.15

# (T1 ms, T2 ms) per sphere 1..14, version 1, 20 C; Stupic et al. 2021 supporting info.
SYSTEM_REFERENCE: dict[tuple[str, float], dict[str, tuple[float, ...]]] = {
    ("t1", 1.5): {  # NiCl2 array
        "t1_ms": (2033.0, 1489.0, 1012.0, 730.8, 514.1, 367.9, 260.1, 184.6, 132.7, 92.70,
                  65.40, 46.32, 32.45, 22.859),
        "t2_ms": (1669.0, 1244.0, 859.3, 628.5, 446.3, 321.2, 227.7, 161.9, 117.1, 81.9,
                  57.7, 41.0, 28.7, 20.2),
    },
    ("t2", 1.5): {  # MnCl2 array
        "t1_ms": (2736.0, 2183.0, 1870.0, 1539.0, 1237.0, 1030.0, 752.2, 550.2, 413.4, 292.9,
                  194.9, 160.2, 106.4, 83.33),
        "t2_ms": (939.4, 594.3, 416.5, 267.0, 184.9, 140.6, 91.76, 64.84, 45.28, 30.62,
                  19.76, 15.99, 10.47, 8.15),
    },
    ("t1", 3.0): {
        "t1_ms": (1989.0, 1454.0, 984.1, 706.0, 496.7, 351.5, 247.13, 175.3, 125.9, 89.00,
                  62.70, 44.53, 30.84, 21.719),
        "t2_ms": (1465.0, 1077.0, 717.9, 510.1, 359.6, 255.5, 180.8, 127.3, 90.30, 64.30,
                  45.70, 31.86, 22.38, 15.83),
    },
    ("t2", 3.0): {
        "t1_ms": (2480.0, 2173.0, 1907.0, 1604.0, 1332.0, 1044.0, 801.7, 608.6, 458.4, 336.5,
                  244.2, 176.9, 126.9, 90.90),
        "t2_ms": (581.3, 403.5, 278.1, 190.94, 133.27, 96.89, 64.07, 46.42, 31.97, 22.56,
                  15.81, 11.24, 7.91, 5.59),
    },
}

SHELL_RADIUS_MM = 100.0
OUTER_RING_RADIUS_MM = 49.0
INNER_RING_RADIUS_MM = 27.0
PLATE_Z_MM = {"t1": -20.0, "t2": 20.0}
FILL_T1_MS = 3000.0
FILL_T2_MS = 2000.0
REFERENCE_TEMPERATURE_C = 20.0
_LABEL_OFFSET = {"t1": 0, "t2": 14}
FILL_LABEL = 29


@dataclass(frozen=True)
class SystemSphere:
    """One contrast sphere: array (``"t1"``/``"t2"``), number 1-14, label, centre, radius."""

    array: str
    number: int
    centre_mm: tuple[float, float, float]
    radius_mm: float

    @property
    def label(self) -> int:
        """Label in the phantom: 1-14 for the T1 array, 15-28 for the T2 array."""
        return _LABEL_OFFSET[self.array] + self.number


def system_spheres(*, sphere_diameter_mm: float = 20.0) -> list[SystemSphere]:
    """Geometry of the 28 contrast spheres (T1 array first, then T2 array).

    Parameters
    ----------
    sphere_diameter_mm : float, optional
        Sphere diameter (mm), nominal 20 mm.

    Returns
    -------
    list of SystemSphere
    """
    if not 2.0 <= sphere_diameter_mm <= 21.0:
        raise PhantomError(f"sphere_diameter_mm: {sphere_diameter_mm} outside [2, 21] mm "
                           "(larger spheres would overlap)")
    out = []
    for array in ("t1", "t2"):
        z = PLATE_Z_MM[array]
        for k in range(10):
            a = math.pi - 2 * math.pi * k / 10
            out.append(SystemSphere(array, k + 1, (OUTER_RING_RADIUS_MM * math.cos(a),
                                                   OUTER_RING_RADIUS_MM * math.sin(a), z),
                                    sphere_diameter_mm / 2))
        for k in range(4):
            a = 1.25 * math.pi - 2 * math.pi * k / 4
            out.append(SystemSphere(array, 11 + k, (INNER_RING_RADIUS_MM * math.cos(a),
                                                    INNER_RING_RADIUS_MM * math.sin(a), z),
                                    sphere_diameter_mm / 2))
    return out


def _certified_field(field_t: float) -> float:
    for b in CERTIFIED_FIELDS_T:
        if abs(field_t - b) <= _FIELD_TOL_T:
            return b
    raise PhantomError(f"field_t: {field_t} T has no NIST system-phantom reference values "
                       f"(certified: {', '.join(str(b) for b in CERTIFIED_FIELDS_T)} T, "
                       f"+- {_FIELD_TOL_T} T)")


def system_reference(field_t: float) -> dict[int, dict[str, float]]:
    """Reference T1/T2 per sphere label at a certified field.

    Parameters
    ----------
    field_t : float
        1.5 or 3.0 T (+- 0.15 T).

    Returns
    -------
    dict
        ``label -> {"array", "sphere", "t1_ms", "t2_ms"}`` (labels 1-14: T1 array,
        15-28: T2 array).
    """
    b = _certified_field(field_t)
    out: dict[int, dict[str, float]] = {}
    for array in ("t1", "t2"):
        table = SYSTEM_REFERENCE[(array, b)]
        for i in range(14):
            out[_LABEL_OFFSET[array] + i + 1] = {
                "array": array, "sphere": i + 1,
                "t1_ms": table["t1_ms"][i], "t2_ms": table["t2_ms"][i],
            }
    return out


def make_system_phantom(field_t: float = 3.0, *, matrix: int = 128, fov_mm: float = 240.0,
                        array: Literal["t1", "t2"] = "t1", slice_index: int | None = None,
                        three_d: bool = False, sphere_diameter_mm: float = 20.0) -> Phantom:
    """ISMRM/NIST system phantom: T1 and T2 sphere arrays in a water-filled shell.

    Parameters
    ----------
    field_t : float, optional
        Field strength (T): 1.5 or 3.0 (+- 0.15 T); others raise.
    matrix : int, optional
        Voxels per axis (isotropic voxels of ``fov_mm / matrix``).
    fov_mm : float, optional
        Field of view per axis (mm); must cover the 200 mm shell to image it whole.
    array : {"t1", "t2"}, optional
        2-D only: the plate whose centre the default slice goes through.
    slice_index : int, optional
        2-D only: slice index of the 3-D grid (overrides ``array``).
    three_d : bool, optional
        Return the full ``matrix**3`` volume.
    sphere_diameter_mm : float, optional
        Contrast-sphere diameter (mm).

    Returns
    -------
    Phantom
        Labels 1-14: T1-array spheres 1-14; 15-28: T2-array spheres 1-14; 29: fill.
        ``field_t`` is the certified field whose table was used.

    Raises
    ------
    PhantomError
        Uncertified field, bad matrix/slice, or an unknown array.
    """
    b = _certified_field(field_t)
    if array not in PLATE_Z_MM:
        raise PhantomError(f"array: {array!r} is not 't1' or 't2'")
    grid = make_grid(matrix, fov_mm, three_d=three_d, slice_index=slice_index,
                     default_z_mm=PLATE_Z_MM[array])
    shape = grid.shape
    labels = np.zeros(shape, dtype=np.int16)
    r2 = grid.x ** 2 + grid.y ** 2 + grid.z ** 2
    labels[np.broadcast_to(r2 <= SHELL_RADIUS_MM ** 2, shape)] = FILL_LABEL
    spheres = system_spheres(sphere_diameter_mm=sphere_diameter_mm)
    for s in spheres:  # 28 spheres: a loop over objects, each within its bounding box
        cx, cy, cz = s.centre_mm
        box = []
        for axis, c in zip((grid.x.ravel(), grid.y.ravel(), grid.z.ravel()), (cx, cy, cz),
                           strict=True):
            hit = np.nonzero(np.abs(axis - c) <= s.radius_mm)[0]
            box.append(slice(hit[0], hit[-1] + 1) if hit.size else slice(0, 0))
        bx, by, bz = box
        inside = ((grid.x[bx] - cx) ** 2 + (grid.y[:, by] - cy) ** 2
                  + (grid.z[:, :, bz] - cz) ** 2 <= s.radius_mm ** 2)
        sub = labels[bx, by, bz]
        sub[np.broadcast_to(inside, sub.shape)] = s.label

    ref = system_reference(b)
    n_labels = FILL_LABEL + 1
    lut_t1 = np.full(n_labels, BACKGROUND_T_MS)
    lut_t2 = np.full(n_labels, BACKGROUND_T_MS)
    lut_pd = np.zeros(n_labels)
    for label, vals in ref.items():
        lut_t1[label], lut_t2[label], lut_pd[label] = vals["t1_ms"], vals["t2_ms"], 1.0
    lut_t1[FILL_LABEL], lut_t2[FILL_LABEL], lut_pd[FILL_LABEL] = FILL_T1_MS, FILL_T2_MS, 1.0
    lut_adc = np.where(lut_pd > 0, water_diffusivity_mm2_s(REFERENCE_TEMPERATURE_C), 0.0)

    t2 = lut_t2[labels]
    names = {label: f"{v['array'].upper()}-array sphere {v['sphere']:02d}"
             for label, v in ref.items()}
    names[FILL_LABEL] = "fill"
    present = set(np.unique(labels).tolist())
    return Phantom(
        pd=lut_pd[labels], t1_ms=lut_t1[labels], t2_ms=t2, t2star_ms=t2,
        adc_mm2_s=lut_adc[labels], b0_hz=np.zeros(shape, np.float32), labels=labels,
        label_names={k: v for k, v in names.items() if k in present},
        affine=grid.affine, field_t=b, name="nist-system",
        metadata={
            "generator": "mrharmony.phantoms.make_system_phantom",
            "model": "ISMRM/NIST system phantom (CaliberMRI model 130), version 1 values",
            "reference": "Stupic KF et al. Magn Reson Med 2021;86:1194-1211, "
                         "doi:10.1002/mrm.28779 (supporting information)",
            "temperature_c": REFERENCE_TEMPERATURE_C,
            "requested_field_t": float(field_t),
            "certified_field_t": b,
            "sphere_diameter_mm": float(sphere_diameter_mm),
            "matrix": int(matrix), "fov_mm": float(fov_mm), "three_d": bool(three_d),
            "reference_maps": ["t1_ms", "t2_ms"],
            "spheres": [{"label": s.label, "array": s.array, "number": s.number,
                         "centre_mm": list(s.centre_mm), "radius_mm": s.radius_mm}
                        for s in spheres],
        },
    )
