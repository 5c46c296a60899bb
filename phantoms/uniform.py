"""Uniform phantoms: one sphere or cylinder of doped water, for comparing a simulation
with a measurement of a vendor's QA phantom.

Relaxation times
----------------
Unless given, T1 and T2 are those of a NiCl2-doped water: sphere 6 of the T1 array of
the ISMRM/NIST system phantom (version 1, 20 C), at the certified field nearest the
requested one (1.5 T or 3.0 T):

- 1.5 T: T1 = 367.9 ms, T2 = 321.2 ms;
- 3.0 T: T1 = 351.5 ms, T2 = 255.5 ms;

from Stupic KF, Ainslie M, Boss MA, et al. A standard system phantom for magnetic
resonance imaging. Magn Reson Med 2021;86:1194-1211, doi:10.1002/mrm.28779 (the table
of :mod:`mrharmony.phantoms.system`). Vendor QA spheres are doped to similar values
(T1 of a few hundred ms, so that a TR of ~1 s nearly fully relaxes them). Fields more
than 0.5 T from a certified one need explicit ``t1_ms`` and ``t2_ms``.

Model assumptions: PD = 1, T2* = T2 unless given, ADC of free water at 20 C
(Speedy-Angell, 2.02e-3 mm^2/s), no off-resonance; voxels are inside the object when
their centre is (no partial volume).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

from mrharmony.errors import PhantomError
from mrharmony.phantoms.diffusion import water_diffusivity_mm2_s
from mrharmony.phantoms.phantom import BACKGROUND_T_MS, Phantom

__all__ = ["DOPED_WATER_REFERENCE", "doped_water_relaxation", "make_uniform_phantom"]

#: Certified field (T) -> (T1 ms, T2 ms) of NIST system phantom T1-array sphere 6
#: (NiCl2-doped water, version 1, 20 C; Stupic et al. 2021).
DOPED_WATER_REFERENCE: dict[float, tuple[float, float]] = {
    1.5: (367.9, 321.2),
    3.0: (351.5, 255.5),
}

_AXES = {"x": 0, "y": 1, "z": 2}


def doped_water_relaxation(field_t: float) -> tuple[float, float]:
    """T1 and T2 (ms) of the default doped water at a field strength.

    Parameters
    ----------
    field_t : float
        Main field (T); the certified field nearest it (1.5 or 3.0 T) is used.

    Returns
    -------
    (float, float)
        T1 and T2 in ms.

    Raises
    ------
    PhantomError
        If ``field_t`` is not a positive number or lies more than 0.5 T from 1.5 T and
        3.0 T.
    """
    field = _positive("field_t", field_t)
    nearest = min(DOPED_WATER_REFERENCE, key=lambda f: abs(f - field))
    if abs(nearest - field) > 0.5:
        raise PhantomError(
            f"field_t: {field} T is more than 0.5 T from the certified 1.5 T and 3.0 T "
            "doped-water values; give t1_ms and t2_ms"
        )
    return DOPED_WATER_REFERENCE[nearest]


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise PhantomError(f"{name}: expected a number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise PhantomError(f"{name}: {value} must be a finite number > 0")
    return v


def _triple(name: str, value: object, cast: type) -> tuple:
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        values = [value] * 3
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3:
        values = list(value)
    else:
        raise PhantomError(f"{name}: expected one number or three, got {value!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise PhantomError(f"{name}: expected numbers, got {value!r}")
        if cast is int and float(v) != int(v):
            raise PhantomError(f"{name}: expected integers, got {value!r}")
        out.append(cast(v))
    return tuple(out)


def make_uniform_phantom(
    shape: Literal["sphere", "cylinder"],
    fov_mm: float | Sequence[float],
    matrix: int | Sequence[int],
    field_t: float,
    *,
    t1_ms: float | None = None,
    t2_ms: float | None = None,
    t2star_ms: float | None = None,
    pd: float = 1.0,
    diameter_mm: float | None = None,
    length_mm: float | None = None,
    axis: Literal["x", "y", "z"] = "z",
    name: str | None = None,
) -> Phantom:
    """A uniform sphere or cylinder of doped water, centred on the origin.

    Parameters
    ----------
    shape : {"sphere", "cylinder"}
        Object shape.
    fov_mm : float or (3,) float
        Grid extent along RAS x, y, z (mm); one number for all three axes.
    matrix : int or (3,) int
        Voxels along x, y, z (1 to 2048 each); an axis with 1 voxel is a single slab of
        thickness ``fov_mm`` through the centre (e.g. ``(256, 64, 1)`` for a 2-D
        phantom). Voxel ``i`` sits at ``(i - n // 2) * fov / n`` mm (FFT convention).
    field_t : float
        Field strength (T) the relaxation times belong to.
    t1_ms, t2_ms : float, optional
        Relaxation times (ms); default: doped water (see the module notes and
        :func:`doped_water_relaxation`).
    t2star_ms : float, optional
        T2* (ms), ``<= t2_ms``; default T2 (no susceptibility dephasing).
    pd : float
        Proton density in (0, 1].
    diameter_mm : float, optional
        Sphere or cylinder diameter (mm); default 90 % of the smallest in-plane extent
        (the two grid axes other than a cylinder's ``axis``; x and y for a sphere).
    length_mm : float, optional
        Cylinder length along ``axis`` (mm); default: through the whole grid.
    axis : {"x", "y", "z"}
        Cylinder axis (RAS).
    name : str, optional
        Phantom name; default ``"uniform-<shape>"``.

    Returns
    -------
    Phantom
        Labels 1 (``"water"``) inside, 0 outside; ``metadata`` records the geometry,
        the relaxation times and their source.

    Raises
    ------
    PhantomError
        On an unknown shape or axis, a non-positive size, a matrix outside [1, 2048],
        inconsistent relaxation times (``T2* <= T2 <= T1``) or PD outside (0, 1].
    """
    if shape not in ("sphere", "cylinder"):
        raise PhantomError(f"shape: {shape!r} is not 'sphere' or 'cylinder'")
    if axis not in _AXES:
        raise PhantomError(f"axis: {axis!r} is not 'x', 'y' or 'z'")
    fov = _triple("fov_mm", fov_mm, float)
    for v in fov:
        _positive("fov_mm", v)
    mat = _triple("matrix", matrix, int)
    if any(not 1 <= n <= 2048 for n in mat):
        raise PhantomError(f"matrix: {mat} has an axis outside [1, 2048]")
    field = _positive("field_t", field_t)
    if t1_ms is None or t2_ms is None:
        t1_def, t2_def = doped_water_relaxation(field)
        source = ("NIST system phantom T1-array sphere 6 (NiCl2-doped water), Stupic et al. "
                  "MRM 2021;86:1194, doi:10.1002/mrm.28779")
    else:
        t1_def = t2_def = 0.0
        source = "user"
    t1 = _positive("t1_ms", t1_ms if t1_ms is not None else t1_def)
    t2 = _positive("t2_ms", t2_ms if t2_ms is not None else t2_def)
    t2s = _positive("t2star_ms", t2star_ms if t2star_ms is not None else t2)
    if not t2s <= t2 <= t1:
        raise PhantomError(f"t2star_ms <= t2_ms <= t1_ms violated: {t2s}, {t2}, {t1} ms")
    pd_value = _positive("pd", pd)
    if pd_value > 1:
        raise PhantomError(f"pd: {pd} outside (0, 1]")

    ax = _AXES[axis] if shape == "cylinder" else 2
    inplane = [fov[i] for i in range(3) if i != ax]
    diameter = _positive("diameter_mm", diameter_mm) if diameter_mm is not None else (
        0.9 * min(inplane))
    length = _positive("length_mm", length_mm) if length_mm is not None else math.inf

    vox = [f / n for f, n in zip(fov, mat, strict=True)]
    coords = [(np.arange(n) - n // 2) * v for n, v in zip(mat, vox, strict=True)]
    grids = np.meshgrid(*coords, indexing="ij")
    r = diameter / 2.0
    if shape == "sphere":
        inside = grids[0] ** 2 + grids[1] ** 2 + grids[2] ** 2 <= r * r
    else:
        radial = sum(grids[i] ** 2 for i in range(3) if i != ax)
        inside = (radial <= r * r) & (np.abs(grids[ax]) <= length / 2.0)
    if not inside.any():
        raise PhantomError(f"diameter_mm: {diameter} mm leaves no voxel inside the {shape}")

    affine = np.diag([vox[0], vox[1], vox[2], 1.0])
    affine[:3, 3] = [-(n // 2) * v for n, v in zip(mat, vox, strict=True)]
    grid_shape = tuple(mat)
    background = np.full(grid_shape, BACKGROUND_T_MS, dtype=np.float32)
    return Phantom(
        pd=np.where(inside, pd_value, 0.0),
        t1_ms=np.where(inside, t1, background),
        t2_ms=np.where(inside, t2, background),
        t2star_ms=np.where(inside, t2s, background),
        adc_mm2_s=np.where(inside, water_diffusivity_mm2_s(20.0), 0.0),
        b0_hz=np.zeros(grid_shape, np.float32),
        labels=inside.astype(np.int16),
        label_names={1: "water"},
        affine=affine,
        field_t=field,
        name=name or f"uniform-{shape}",
        metadata={
            "generator": "mrharmony.phantoms.uniform.make_uniform_phantom",
            "shape": shape, "axis": axis if shape == "cylinder" else None,
            "diameter_mm": float(diameter),
            "length_mm": None if math.isinf(length) else float(length),
            "fov_mm": list(fov), "matrix": list(mat),
            "t1_ms": t1, "t2_ms": t2, "t2star_ms": t2s, "pd": pd_value,
            "relaxation_source": source,
        },
    )
