"""Receive arrays from Biot-Savart loops: sensitivities and coil noise covariance.

A head array is modelled as ``n`` planar circular loops tangent to a cylinder (rings of
loops along the S-I axis) or to a spherical cap (a helmet), neighbours overlapping so
that the distance between centres is 1.5 loop radii (the geometric decoupling overlap).

Sensitivity. The quasi-static field of loop ``c`` carrying a unit current, ``B_c(r)``, is
computed exactly with the elliptic-integral solution of the Biot-Savart law (Simpson et
al., NASA/TM-2001-210036). By reciprocity the receive sensitivity is
``B1-_c = (B_x - i B_y)^*`` of the transverse field (x, y transverse to B0 = z; for a
quasi-static real field this equals ``B_x + i B_y``). Sensitivities are scaled jointly so
that the root-sum-of-squares over the object has mean 1: the coil-combined signal of a
voxel is then, on average, what a uniform single coil would give, and the site's SNR
figure refers to that average.

Noise covariance. Sample noise dominates at clinical fields; its correlation between
coils ``i`` and ``j`` is ``R_ij ~ integral sigma E_i . E_j^* dV`` (Roemer et al., MRM 16,
192 (1990)). We approximate the electric-field overlap by the magnetic-field overlap over
the object voxels, ``C_ij = sum B_i . B_j / sqrt(sum |B_i|^2 sum |B_j|^2)``, and model the
preamplifier decoupling by keeping a fraction ``kappa`` (the site's ``noise_coupling``):
``Psi = (1 - kappa) I + kappa C``. ``Psi`` is real, symmetric and positive definite for
``kappa < 1``; its diagonal is 1 (equal noise per channel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special

from mrharmony.errors import SiteError

__all__ = [
    "MU0_T_M_PER_A",
    "CoilArray",
    "loop_field_t",
    "make_coil_array",
    "noise_covariance",
    "receive_sensitivities",
]

#: Vacuum permeability (T m / A).
MU0_T_M_PER_A = 4e-7 * math.pi

_OVERLAP = 1.5  # centre distance / loop radius for geometric decoupling of circular loops


@dataclass(frozen=True)
class CoilArray:
    """Geometry of a receive array in scanner LPS coordinates (metres)."""

    centers_m: np.ndarray  # (n, 3)
    normals: np.ndarray  # (n, 3) unit vectors, pointing away from the head
    loop_radius_m: float
    labels: tuple[str, ...]

    @property
    def n_channels(self) -> int:
        """Number of receive channels."""
        return int(self.centers_m.shape[0])


def _ring_counts(n: int) -> list[int]:
    n_rings = max(1, math.ceil(n / 8)) if n > 8 else 1
    base, extra = divmod(n, n_rings)
    return [base + (1 if i < extra else 0) for i in range(n_rings)]


def make_coil_array(
    channels: int,
    *,
    geometry: str = "cylinder",
    radius_mm: float = 140.0,
    loop_radius_mm: float = 0.0,
    center_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> CoilArray:
    """Lay out ``channels`` circular loops around the head.

    Parameters
    ----------
    channels : int
        Number of loops (>= 2; one channel is a uniform body-coil receive, no array).
    geometry : {"cylinder", "helmet"}
        ``cylinder``: rings of up to 8 loops along z (S-I), alternate rings rotated by
        half a step. ``helmet``: loops spread evenly (Fibonacci lattice) over a spherical
        cap from the vertex down to 105 degrees from +z.
    radius_mm : float
        Radius of the cylinder or sphere the loops are tangent to.
    loop_radius_mm : float
        Loop radius; 0 derives it from the spacing so that neighbours overlap
        (centre distance = 1.5 loop radii).
    center_mm : tuple of 3 float
        Centre of the array (LPS mm).

    Returns
    -------
    CoilArray

    Raises
    ------
    SiteError
        Fewer than 2 channels or an unknown geometry.
    """
    if channels < 2:
        raise SiteError(f"coil channels: {channels} loops cannot form an array (minimum 2)")
    radius = radius_mm * 1e-3
    centre = np.asarray(center_mm, dtype=float) * 1e-3
    if geometry == "cylinder":
        counts = _ring_counts(channels)
        spacing = 2 * radius * math.sin(math.pi / max(counts))
        a = loop_radius_mm * 1e-3 or spacing / _OVERLAP
        z_rings = (np.arange(len(counts)) - (len(counts) - 1) / 2) * _OVERLAP * a
        centers, normals = [], []
        for i_ring, (n_ring, z) in enumerate(zip(counts, z_rings, strict=True)):
            phi = 2 * np.pi * (np.arange(n_ring) + 0.5 * (i_ring % 2)) / n_ring
            nrm = np.stack([np.cos(phi), np.sin(phi), np.zeros_like(phi)], axis=1)
            normals.append(nrm)
            centers.append(nrm * radius + np.array([0.0, 0.0, z]))
        c = np.concatenate(centers)
        nrm = np.concatenate(normals)
    elif geometry == "helmet":
        theta_max = math.radians(105.0)
        i = np.arange(channels) + 0.5
        cos_t = 1.0 - (1.0 - math.cos(theta_max)) * i / channels
        sin_t = np.sqrt(1.0 - cos_t**2)
        phi = np.pi * (1.0 + 5**0.5) * i
        nrm = np.stack([sin_t * np.cos(phi), sin_t * np.sin(phi), cos_t], axis=1)
        cap_area = 2 * math.pi * radius**2 * (1.0 - math.cos(theta_max))
        spacing = math.sqrt(cap_area / channels * 2 / math.sqrt(3))  # hexagonal packing
        a = loop_radius_mm * 1e-3 or spacing / _OVERLAP
        c = nrm * radius
    else:
        raise SiteError(f"coil geometry: unknown geometry {geometry!r} (cylinder or helmet)")
    labels = tuple(f"{geometry[0].upper()}{k + 1:02d}" for k in range(channels))
    return CoilArray(centers_m=c + centre, normals=nrm, loop_radius_m=float(a), labels=labels)


def loop_field_t(
    points_m: np.ndarray,
    center_m: np.ndarray,
    normal: np.ndarray,
    radius_m: float,
    *,
    current_a: float = 1.0,
) -> np.ndarray:
    """Exact quasi-static magnetic field of a circular current loop (Biot-Savart).

    Parameters
    ----------
    points_m : ndarray (N, 3)
        Field points in metres.
    center_m : ndarray (3,)
        Loop centre in metres.
    normal : ndarray (3,)
        Loop axis (right-hand rule with the current direction).
    radius_m : float
        Loop radius in metres.
    current_a : float
        Loop current in amperes.

    Returns
    -------
    ndarray (N, 3) float64
        Field in tesla. On the axis it reduces to ``mu0 I a^2 / (2 (a^2 + z^2)^1.5)``.
        Points closer than 0.1 % of the radius to the wire are moved off it.

    References
    ----------
    J. C. Simpson et al., "Simple analytic expressions for the magnetic field of a
    circular current loop", NASA/TM-2001-210036 (2001).
    """
    p = np.asarray(points_m, dtype=np.float64) - np.asarray(center_m, dtype=np.float64)
    n = np.asarray(normal, dtype=np.float64)
    n = n / np.linalg.norm(n)
    a = float(radius_m)
    z = p @ n
    radial = p - z[:, None] * n
    rho = np.linalg.norm(radial, axis=1)
    r2 = rho**2 + z**2
    alpha2 = np.maximum(a * a + r2 - 2 * a * rho, (1e-3 * a) ** 2)
    beta2 = a * a + r2 + 2 * a * rho
    beta = np.sqrt(beta2)
    m = np.clip(1.0 - alpha2 / beta2, 0.0, 1.0 - 1e-15)
    ek, ee = special.ellipk(m), special.ellipe(m)
    c = MU0_T_M_PER_A * current_a / np.pi
    bz = c / (2 * alpha2 * beta) * ((a * a - r2) * ee + alpha2 * ek)
    small = rho < 1e-6 * a
    rho_safe = np.where(small, 1.0, rho)
    brho = c * z / (2 * alpha2 * beta * rho_safe) * ((a * a + r2) * ee - alpha2 * ek)
    # Near the axis the bracket cancels: use the first-order expansion instead.
    brho = np.where(small, 3 * MU0_T_M_PER_A * current_a * a * a * z * rho
                    / (4 * (a * a + z * z) ** 2.5), brho)
    unit_rho = radial / rho_safe[:, None]
    return bz[:, None] * n + (brho * np.where(small, 0.0, 1.0))[:, None] * unit_rho


def _fields(array: CoilArray, points_m: np.ndarray) -> np.ndarray:
    """(n_coils, N, 3) field of every loop at the points (float64)."""
    return np.stack([
        loop_field_t(points_m, c, nrm, array.loop_radius_m)
        for c, nrm in zip(array.centers_m, array.normals, strict=True)
    ])


def receive_sensitivities(
    array: CoilArray,
    positions_mm: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    chunk: int = 65536,
) -> np.ndarray:
    """Receive sensitivities ``B1-`` of every loop at the given positions.

    Parameters
    ----------
    array : CoilArray
    positions_mm : ndarray (N, 3)
        Scanner LPS positions in mm (e.g. every phantom voxel, C order).
    mask : ndarray of bool (N,), optional
        Object voxels over which the root-sum-of-squares is normalised to mean 1
        (default: all positions).
    chunk : int
        Positions per chunk (bounds the float64 work memory to ~ n * chunk * 48 bytes).

    Returns
    -------
    ndarray (n_coils, N) complex64
        ``(B_x + i B_y)`` per loop, jointly scaled (see the module docstring).
    """
    pos_m = np.asarray(positions_mm, dtype=np.float64) * 1e-3
    n_pts = pos_m.shape[0]
    sens = np.empty((array.n_channels, n_pts), dtype=np.complex64)
    for start in range(0, n_pts, chunk):
        b = _fields(array, pos_m[start:start + chunk])
        sens[:, start:start + chunk] = b[..., 0] + 1j * b[..., 1]
    sel = np.ones(n_pts, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    if not sel.any():
        raise SiteError("coil sensitivities: the object mask is empty")
    rss = np.sqrt(np.sum(np.abs(sens[:, sel]).astype(np.float64) ** 2, axis=0))
    sens *= np.float32(1.0 / rss.mean())
    return sens


def noise_covariance(
    array: CoilArray,
    positions_mm: np.ndarray,
    *,
    coupling: float,
    max_points: int = 20000,
    seed: int = 0,
) -> np.ndarray:
    """Coil noise covariance from the loops' field overlap over the object.

    Parameters
    ----------
    array : CoilArray
    positions_mm : ndarray (N, 3)
        Object voxel positions (LPS mm) standing in for the conducting sample.
    coupling : float
        Fraction ``kappa`` in ``[0, 1)`` of the overlap correlation left after
        preamplifier decoupling.
    max_points : int
        At most this many positions (a seeded random subset) enter the overlap sums.
    seed : int
        Seed of that subset.

    Returns
    -------
    ndarray (n, n) float64
        ``(1 - kappa) I + kappa C`` (module docstring); unit diagonal.

    Raises
    ------
    SiteError
        ``coupling`` outside ``[0, 1)`` or no positions.
    """
    if not 0.0 <= coupling < 1.0:
        raise SiteError(f"noise_coupling: {coupling} is outside [0, 1)")
    pos = np.asarray(positions_mm, dtype=np.float64)
    if pos.shape[0] == 0:
        raise SiteError("coil noise covariance: no object positions")
    if pos.shape[0] > max_points:
        pick = np.random.default_rng(seed).choice(pos.shape[0], max_points, replace=False)
        pos = pos[np.sort(pick)]
    b = _fields(array, pos * 1e-3).reshape(array.n_channels, -1)
    gram = b @ b.T
    d = np.sqrt(np.diag(gram))
    corr = gram / np.outer(d, d)
    return (1.0 - coupling) * np.eye(array.n_channels) + coupling * corr
