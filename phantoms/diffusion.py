"""NIST/QIBA isotropic diffusion phantom (CaliberMRI/QalibreMD model 128): PVP vials in ice water.

Design (Boss MA, Chenevert TL et al., "Thermally-stabilized isotropic diffusion phantom
for multisite assessment of apparent diffusion coefficient reproducibility", Med Phys
2014;41:464 (AAPM abstract TU-C-12A-08)): 13 vials (~20 mL) of aqueous
polyvinylpyrrolidone (PVP) at 0, 10, 20, 30, 40 and 50 % w/w, arranged as a central
water vial with an inner and an outer ring, in a 194 mm spherical container filled with
an ice-water bath that holds the vials at 0 C.

Reference ADC (what the phantom certifies)
------------------------------------------
``ADC(c, T) = D_w(T) * (1 - 23.2e-3 c + 12.5e-5 c**2)`` with ``c`` in % w/w, from
Amouzandeh G, Chenevert TL, Swanson SD, Ross BD, Malyarenko DI. Technical note:
Temperature and concentration dependence of water diffusion in polyvinylpyrrolidone
solutions. Med Phys 2022;49:3325-3332 (quadratic "nearly independent of PVP molecular
weight and temperature"), and the water self-diffusion coefficient from the
Speedy-Angell power law ``D_w(T) = 1.635e-2 (T / 215.05 K - 1)**2.063`` mm2/s (Holz M,
Heil SR, Sacco A, Phys Chem Chem Phys 2000;2:4740), which gives 1.099e-3 mm2/s at 0 C
(the "1.1e-3" of ice-water phantoms). At 0 C this yields 1.099, 0.858, 0.644, 0.458,
0.299 and 0.168 (x 1e-3 mm2/s) for 0-50 % PVP (Boss 2014 measured 1.12 down to 0.12).

Geometry (RAS mm, centre at the origin, vial axes along z)
----------------------------------------------------------
Vial 1 at the centre, vials 2-7 on a ring of radius 35 mm, vials 8-13 on a ring of
radius 60 mm (layout as used by phantom-analysis tools); vial inner diameter 25 mm,
length 50 mm (20 mL scintillation vials, nominal). Concentrations by vial: 0 % (vials 1,
2, 8), 10 % (3, 9), 20 % (4, 10), 30 % (5, 11), 40 % (6, 12), 50 % (7, 13).

Model assumptions (not certified): PD = 1 - 0.6 c/100 (PVP displaces water); T1 and T2
fall linearly in rate with concentration from water at 0 C (T1 1800 ms, T2 1500 ms) to
T1 400 ms, T2 100 ms at 50 %; T2* = T2. Only ``adc_mm2_s`` is a reference map
(``metadata["reference_maps"]``).
"""

from __future__ import annotations

import math

import numpy as np

from mrharmony.errors import PhantomError
from mrharmony.phantoms._grid import make_grid
from mrharmony.phantoms.phantom import BACKGROUND_T_MS, Phantom

__all__ = [
    "PVP_CONCENTRATIONS_PCT",
    "VIAL_CONCENTRATIONS_PCT",
    "make_diffusion_phantom",
    "pvp_adc_mm2_s",
    "vial_centres_mm",
    "water_diffusivity_mm2_s",
]

PVP_CONCENTRATIONS_PCT = (0.0, 10.0, 20.0, 30.0, 40.0, 50.0)
VIAL_CONCENTRATIONS_PCT = (0.0, 0.0, 10.0, 20.0, 30.0, 40.0, 50.0,
                           0.0, 10.0, 20.0, 30.0, 40.0, 50.0)
INNER_RING_RADIUS_MM = 35.0
OUTER_RING_RADIUS_MM = 60.0
VIAL_DIAMETER_MM = 25.0
VIAL_LENGTH_MM = 50.0
CONTAINER_RADIUS_MM = 97.0
BATH_LABEL = 14

_WATER_T1_0C_MS = 1800.0
_WATER_T2_0C_MS = 1500.0
_PVP50_T1_MS = 400.0
_PVP50_T2_MS = 100.0


def water_diffusivity_mm2_s(temperature_c: float) -> float:
    """Self-diffusion coefficient of water (Speedy-Angell power law, Holz et al. 2000).

    Parameters
    ----------
    temperature_c : float
        Temperature (C), in [0, 100).

    Returns
    -------
    float
        Diffusivity (mm^2/s): 1.099e-3 at 0 C, 2.023e-3 at 20 C, 3.0e-3 at 37 C.
    """
    if not 0.0 <= temperature_c < 100.0:
        raise PhantomError(f"temperature_c: {temperature_c} outside [0, 100) C")
    t_k = temperature_c + 273.15
    return 1.635e-2 * (t_k / 215.05 - 1.0) ** 2.063


def pvp_adc_mm2_s(concentration_pct: float | np.ndarray, temperature_c: float = 0.0
                  ) -> float | np.ndarray:
    """Reference ADC of aqueous PVP (Amouzandeh et al. 2022 quadratic x water diffusivity).

    Parameters
    ----------
    concentration_pct : float or array
        PVP concentration (% w/w), in [0, 50].
    temperature_c : float, optional
        Temperature (C); the phantom's reference condition is 0 C (ice water).

    Returns
    -------
    float or numpy.ndarray
        ADC in mm^2/s.
    """
    c = np.asarray(concentration_pct, dtype=np.float64)
    if np.any((c < 0) | (c > 50)):
        raise PhantomError("concentration_pct: PVP concentration outside [0, 50] % w/w")
    ratio = 1.0 - 23.2e-3 * c + 12.5e-5 * c ** 2
    out = water_diffusivity_mm2_s(temperature_c) * ratio
    return float(out) if out.ndim == 0 else out


def vial_centres_mm() -> list[tuple[float, float]]:
    """In-plane (x, y) centres (mm) of vials 1-13."""
    out = [(0.0, 0.0)]
    for ring, phase in ((INNER_RING_RADIUS_MM, math.pi / 2), (OUTER_RING_RADIUS_MM, 0.0)):
        for k in range(6):
            a = phase + 2 * math.pi * k / 6
            out.append((ring * math.cos(a), ring * math.sin(a)))
    return out


def make_diffusion_phantom(*, matrix: int = 128, fov_mm: float = 240.0,
                           temperature_c: float = 0.0, field_t: float = 3.0,
                           slice_index: int | None = None, three_d: bool = False) -> Phantom:
    """NIST/QIBA diffusion phantom with reference ADC per PVP vial.

    Parameters
    ----------
    matrix : int, optional
        Voxels per axis (isotropic, ``fov_mm / matrix``).
    fov_mm : float, optional
        Field of view per axis (mm).
    temperature_c : float, optional
        Phantom temperature (C); 0 C is the reference (ice-water) condition.
    field_t : float, optional
        Field strength recorded in the phantom (relaxation values are nominal and
        field independent here).
    slice_index : int, optional
        2-D only: slice of the 3-D grid (default: the central slice through the vials).
    three_d : bool, optional
        Return the full volume.

    Returns
    -------
    Phantom
        Labels 1-13: vials; 14: ice-water bath.
    """
    grid = make_grid(matrix, fov_mm, three_d=three_d, slice_index=slice_index)
    shape = grid.shape
    labels = np.zeros(shape, dtype=np.int16)
    r2 = grid.x ** 2 + grid.y ** 2 + grid.z ** 2
    labels[np.broadcast_to(r2 <= CONTAINER_RADIUS_MM ** 2, shape)] = BATH_LABEL
    in_length = np.abs(grid.z) <= VIAL_LENGTH_MM / 2
    for i, (cx, cy) in enumerate(vial_centres_mm()):  # 13 vials
        inside = ((grid.x - cx) ** 2 + (grid.y - cy) ** 2 <= (VIAL_DIAMETER_MM / 2) ** 2) \
            & in_length
        labels[np.broadcast_to(inside, shape)] = i + 1

    conc = np.array((0.0, *VIAL_CONCENTRATIONS_PCT, 0.0))  # index = label; 14 = bath
    frac = conc / 50.0
    r1 = (1 - frac) / _WATER_T1_0C_MS + frac / _PVP50_T1_MS
    r2 = (1 - frac) / _WATER_T2_0C_MS + frac / _PVP50_T2_MS
    lut_t1 = 1.0 / r1
    lut_t2 = 1.0 / r2
    lut_pd = 1.0 - 0.6 * conc / 100.0
    lut_adc = np.asarray(pvp_adc_mm2_s(conc, temperature_c))
    lut_t1[0] = lut_t2[0] = BACKGROUND_T_MS
    lut_pd[0] = 0.0
    lut_adc[0] = 0.0
    names = {i + 1: f"vial {i + 1:02d} PVP {c:.0f}%" for i, c in
             enumerate(VIAL_CONCENTRATIONS_PCT)}
    names[BATH_LABEL] = "ice-water bath"
    present = set(np.unique(labels).tolist())
    t2 = lut_t2[labels]
    return Phantom(
        pd=lut_pd[labels], t1_ms=lut_t1[labels], t2_ms=t2, t2star_ms=t2,
        adc_mm2_s=lut_adc[labels], b0_hz=np.zeros(shape, np.float32), labels=labels,
        label_names={k: v for k, v in names.items() if k in present},
        affine=grid.affine, field_t=field_t, name="nist-diffusion",
        metadata={
            "generator": "mrharmony.phantoms.make_diffusion_phantom",
            "model": "NIST/QIBA isotropic diffusion phantom (PVP in ice water)",
            "reference": "ADC: Amouzandeh G et al. Med Phys 2022;49:3325 (PVP quadratic) x "
                         "Speedy-Angell water diffusivity (Holz 2000); design: Boss MA et al. "
                         "Med Phys 2014;41:464",
            "temperature_c": float(temperature_c),
            "vial_concentrations_pct": list(VIAL_CONCENTRATIONS_PCT),
            "vial_adc_mm2_s": [float(pvp_adc_mm2_s(c, temperature_c))
                               for c in VIAL_CONCENTRATIONS_PCT],
            "matrix": int(matrix), "fov_mm": float(fov_mm), "three_d": bool(three_d),
            "reference_maps": ["adc_mm2_s"],
        },
    )
