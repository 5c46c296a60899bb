"""Radial and spiral reconstruction from ISMRMRD acquisitions: gridding, CG-SENSE, L1.

Trajectory units
----------------
ISMRMRD stores a trajectory per sample (``acq.traj``, shape ``(n_samples, dims)``) but
does not fix its units. :func:`trajectory_cycles_per_fov` turns it into **cycles per
FOV** (``k * FOV``, range ``[-N/2, N/2)`` for the reconstructed matrix ``N`` and field of
view, the SigPy convention that our simulator writes) by looking at its largest
magnitude ``kmax`` on each axis:

- ``kmax <= 0.5`` (with 1 % slack): normalised units ``[-0.5, 0.5)`` (Gadgetron, BART
  style); multiplied by ``N``.
- ``kmax <= 0.75 * N``: already cycles per FOV.
- ``kmax`` within 25 % of ``N / (2 FOV_m)``: 1/m; multiplied by ``FOV_m``.
- anything else: :class:`~mrharmony.errors.ReconError`.

A third trajectory column in a 2-D acquisition is ``kz`` when it is all zero, and a
per-sample density weight (the Gadgetron spiral convention) when it is non-negative and
not all zero; 3-D reconstruction is used when the encoded matrix has ``z > 1``.
When an acquisition has no trajectory (``trajectory_dimensions == 0``) and the header's
trajectory is radial, spokes through the centre are computed from the header: angle
``pi * i / n_spokes`` (``radial``) or ``i * 111.246 deg`` modulo 180 (``goldenangle``,
or a ``userParameterDouble`` named ``AngleIncrement`` in rad in the trajectory
description), ``i`` = ``kspace_encode_step_1``, and sample ``s`` at
``(s - center_sample) / os`` cycles/FOV with ``os = n_samples / N``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mrharmony.backend import get_array_module, get_xp, to_numpy
from mrharmony.errors import ReconError
from mrharmony.formats.flags import NOT_IMAGING, flag_mask
from mrharmony.recon.dcf import density_compensation
from mrharmony.recon.nufft import NUFFT
from mrharmony.recon.operators import DEFAULT_WAVELET, nufft_sense
from mrharmony.recon.parallel import LAMDA_DEFAULTS, l1_wavelet_recon, sense_recon, tv_recon

__all__ = [
    "KSpaceGeometry",
    "cg_sense",
    "header_geometry",
    "l1_wavelet_sense",
    "radial_coords",
    "reconstruct_noncartesian",
    "trajectory_cycles_per_fov",
    "tv_sense",
]

#: Golden angle for radial ordering, radians (180 deg / golden ratio).
GOLDEN_ANGLE_RAD = math.pi * (math.sqrt(5) - 1) / 2

#: Acquisition flags that never carry imaging k-space.
_SKIP_FLAGS = int(flag_mask("IS_NOISE_MEASUREMENT", "IS_NAVIGATION_DATA", "IS_PHASECORR_DATA",
                            *NOT_IMAGING))


@dataclass(frozen=True)
class KSpaceGeometry:
    """What a non-Cartesian or EPI recon needs from an ISMRMRD header.

    Attributes
    ----------
    matrix : tuple of int
        Reconstructed matrix ``(nx, ny, nz)``.
    fov_mm : tuple of float
        Reconstructed field of view, mm.
    encoded_matrix : tuple of int
        Encoded matrix (readout oversampling included).
    trajectory : str
        ISMRMRD trajectory type (``"cartesian"``, ``"epi"``, ``"radial"``,
        ``"goldenangle"``, ``"spiral"``, ``"other"``).
    n_lines : int
        ``kspace_encoding_step_1`` count from the encoding limits (spokes, EPI lines).
    user_parameters : dict
        ``userParameterDouble`` and ``userParameterLong`` entries of the trajectory
        description, as floats.
    """

    matrix: tuple[int, int, int]
    fov_mm: tuple[float, float, float]
    encoded_matrix: tuple[int, int, int]
    trajectory: str
    n_lines: int
    user_parameters: dict[str, float]

    @property
    def ndim(self) -> int:
        """2 for a 2-D encoding (``nz == 1``), else 3."""
        return 2 if self.encoded_matrix[2] <= 1 else 3


def header_geometry(header: Any) -> KSpaceGeometry:
    """Read matrix, FOV and trajectory information from an ``ismrmrd.xsd`` header.

    Raises
    ------
    ReconError
        If the header has no encoding or a non-positive matrix or FOV.
    """
    encodings = getattr(header, "encoding", None) or []
    if not encodings:
        raise ReconError("header: no <encoding> section; cannot size the image")
    enc = encodings[0]
    try:
        rs, es = enc.reconSpace, enc.encodedSpace
        matrix = (int(rs.matrixSize.x), int(rs.matrixSize.y), int(rs.matrixSize.z or 1))
        fov = (float(rs.fieldOfView_mm.x), float(rs.fieldOfView_mm.y),
               float(rs.fieldOfView_mm.z or 1.0))
        encoded = (int(es.matrixSize.x), int(es.matrixSize.y), int(es.matrixSize.z or 1))
    except AttributeError as exc:
        raise ReconError(f"header: encoding lacks a matrix size or FOV ({exc})") from exc
    if min(matrix[:2]) < 1 or min(fov[:2]) <= 0:
        raise ReconError(f"header: recon matrix {matrix} / FOV {fov} mm must be positive")
    traj = getattr(enc.trajectory, "value", str(enc.trajectory)).lower()
    limits = enc.encodingLimits
    step1 = getattr(limits, "kspace_encoding_step_1", None) if limits is not None else None
    n_lines = int(step1.maximum) + 1 if step1 is not None and step1.maximum is not None else 0
    doubles: dict[str, float] = {}
    desc = getattr(enc, "trajectoryDescription", None)
    if desc is not None:
        for p in getattr(desc, "userParameterDouble", None) or []:
            doubles[str(p.name)] = float(p.value)
        for p in getattr(desc, "userParameterLong", None) or []:
            doubles[str(p.name)] = float(p.value)
    return KSpaceGeometry(matrix, fov, encoded, traj, n_lines, doubles)


def trajectory_cycles_per_fov(
    traj: np.ndarray, matrix: Sequence[int], fov_mm: Sequence[float]
) -> np.ndarray:
    """Convert a trajectory to cycles per FOV, detecting its units (module docstring).

    Parameters
    ----------
    traj : ndarray, shape (M, ndim)
        k-space positions, one row per sample, in unknown units.
    matrix : sequence of int
        Reconstructed matrix ``N`` per axis (at least ``ndim`` entries).
    fov_mm : sequence of float
        Reconstructed FOV per axis, mm.

    Returns
    -------
    ndarray, shape (M, ndim)
        float64 coordinates in cycles per FOV.

    Raises
    ------
    ReconError
        If the units cannot be recognised.
    """
    t = np.asarray(traj, dtype=np.float64)
    if t.ndim != 2 or t.shape[1] > len(matrix) or t.shape[0] == 0:
        raise ReconError(f"trajectory: expected shape (M, ndim <= {len(matrix)}), got {t.shape}")
    n = np.asarray(matrix[: t.shape[1]], dtype=np.float64)
    fov_m = np.asarray(fov_mm[: t.shape[1]], dtype=np.float64) * 1e-3
    kmax_axes = np.max(np.abs(t), axis=0)
    # One unit for the whole trajectory, decided on the axis that reaches furthest
    # relative to its grid (the others may be sampled only near the centre).
    d = int(np.argmax(kmax_axes / (n / 2)))
    kmax = float(kmax_axes[d])
    if kmax == 0.0 or 0.505 < kmax <= 0.75 * n[d]:
        return t
    if kmax <= 0.505:
        return t * n
    if abs(kmax / (n[d] / (2 * fov_m[d])) - 1) <= 0.25:
        return t * fov_m
    raise ReconError(
        f"trajectory: axis {d} reaches |k| = {kmax:.4g}, which is neither normalised "
        f"(<= 0.5), cycles/FOV (<= {0.75 * n[d]:g} for N = {n[d]:g}) nor 1/m (about "
        f"{n[d] / (2 * fov_m[d]):.4g} for FOV {fov_m[d] * 1e3:g} mm)"
    )


def radial_coords(
    n_spokes: int,
    n_samples: int,
    n: int,
    *,
    ordering: str = "linear",
    spoke_index: np.ndarray | None = None,
    center_sample: int | None = None,
    angle_increment_rad: float | None = None,
) -> np.ndarray:
    """Coordinates of 2-D radial spokes through the centre, in cycles per FOV.

    Parameters
    ----------
    n_spokes : int
        Spokes in a full set (sets the linear angle step ``pi / n_spokes``).
    n_samples : int
        Samples per spoke (oversampling included).
    n : int
        Reconstructed matrix size; oversampling is ``n_samples / n``.
    ordering : {"linear", "golden"}
        Angle rule (module docstring).
    spoke_index : ndarray of int, optional
        Which spokes (acquisition counters); default ``arange(n_spokes)``.
    center_sample : int, optional
        Sample at k = 0; default ``n_samples // 2``.
    angle_increment_rad : float, optional
        Overrides the ordering's angle step.

    Returns
    -------
    ndarray, shape (len(spoke_index) * n_samples, 2)
        Spoke after spoke.
    """
    idx = np.arange(n_spokes) if spoke_index is None else np.asarray(spoke_index)
    if angle_increment_rad is None:
        angle_increment_rad = GOLDEN_ANGLE_RAD if ordering == "golden" else math.pi / n_spokes
    angles = np.mod(idx * angle_increment_rad, math.pi)
    c0 = n_samples // 2 if center_sample is None else int(center_sample)
    r = (np.arange(n_samples) - c0) * (n / n_samples)
    kx = r[None, :] * np.cos(angles)[:, None]
    ky = r[None, :] * np.sin(angles)[:, None]
    return np.stack([kx, ky], axis=-1).reshape(-1, 2)


def _imaging(acquisitions: Sequence[Any]) -> list[Any]:
    acqs = [a for a in acquisitions if not int(a.flags) & _SKIP_FLAGS]
    if not acqs:
        raise ReconError("acquisitions: no imaging acquisitions to reconstruct")
    n_coils = {int(a.active_channels) for a in acqs}
    if len(n_coils) != 1:
        raise ReconError(f"acquisitions: inconsistent coil counts {sorted(n_coils)}")
    empty = [i for i, a in enumerate(acqs) if int(a.number_of_samples) == 0]
    if empty:
        raise ReconError(f"acquisitions: {len(empty)} have zero samples (first #{empty[0]})")
    return acqs


def _gather(
    geom: KSpaceGeometry, acqs: list[Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Stack data (n_coils, M) complex64, coords (M, ndim), optional weights (M,)."""
    ndim = geom.ndim
    data = np.concatenate([np.asarray(a.data) for a in acqs], axis=1).astype(np.complex64)
    dims = {int(a.trajectory_dimensions) for a in acqs}
    if dims == {0}:
        if geom.trajectory not in ("radial", "goldenangle") or ndim != 2:
            raise ReconError(
                f"acquisitions carry no trajectory and the header trajectory "
                f"{geom.trajectory!r} ({ndim}-D) cannot be computed; only 2-D radial can"
            )
        n_spokes = geom.n_lines or len(acqs)
        increment = geom.user_parameters.get("AngleIncrement")
        parts = [
            radial_coords(
                n_spokes, int(a.number_of_samples), geom.matrix[0],
                ordering="golden" if geom.trajectory == "goldenangle" else "linear",
                spoke_index=np.array([int(a.idx.kspace_encode_step_1)]),
                center_sample=int(a.center_sample) or None,
                angle_increment_rad=increment,
            )
            for a in acqs
        ]
        return data, np.concatenate(parts), None
    if len(dims) != 1 or min(dims) < ndim:
        raise ReconError(
            f"acquisitions: trajectory dimensions {sorted(dims)} do not all give the "
            f"{ndim} axes this {ndim}-D encoding needs"
        )
    traj = np.concatenate([np.asarray(a.traj, dtype=np.float64) for a in acqs])
    weights = None
    if ndim == 2 and traj.shape[1] >= 3:
        extra = traj[:, 2]
        if np.any(extra != 0):
            if np.any(extra < 0):
                raise ReconError(
                    "trajectory: third column of a 2-D acquisition is neither kz = 0 nor a "
                    "non-negative density weight"
                )
            weights = extra
    coords = trajectory_cycles_per_fov(traj[:, :ndim], geom.matrix, geom.fov_mm)
    return data, coords, weights


def _estimate_sensitivities(coil_images: Any, *, eps: float = 1e-3) -> Any:
    """Smooth relative sensitivities: low-pass coil images normalised by their RSS."""
    xp = get_array_module(coil_images)
    axes = tuple(range(1, coil_images.ndim))
    spec = xp.fft.fftshift(xp.fft.fftn(coil_images, axes=axes), axes=axes)
    window = 1.0
    for ax in axes:
        n = coil_images.shape[ax]
        u = (xp.arange(n) - n // 2) / n
        w = xp.where(xp.abs(u) < 0.125, xp.cos(math.pi * u / 0.25) ** 2, 0.0)
        shape = [1] * coil_images.ndim
        shape[ax] = n
        window = window * w.reshape(shape)
    low = xp.fft.ifftn(xp.fft.ifftshift(spec * window, axes=axes), axes=axes)
    rss = xp.sqrt(xp.sum(xp.abs(low) ** 2, axis=0))
    return (low / xp.maximum(rss, eps * rss.max())).astype(np.complex64)


def _nufft_problem(op: NUFFT, data: Any, sens: Any, weights: Any) -> tuple[Any, Any]:
    """``A = W^(1/2) NUFFT S`` (complex64 maps and Toeplitz kernel) and ``W^(1/2) y``."""
    xp = get_array_module(data)
    A = nufft_sense(op, sens.astype(np.complex64), weights, kernel_dtype=np.complex64)
    y = data if weights is None else data * xp.sqrt(xp.asarray(weights))[None]
    return A, y


def cg_sense(
    op: NUFFT,
    data: Any,
    sens: Any,
    *,
    weights: Any = None,
    max_iter: int = 20,
    tol: float = 1e-6,
    lamda: float = LAMDA_DEFAULTS["sense"],
) -> Any:
    """Non-Cartesian CG-SENSE: :func:`~mrharmony.recon.parallel.sense_recon` with
    ``A = W^(1/2) NUFFT S`` (Toeplitz normal operator).

    Solves ``(sum_c S_c^H A^H W A S_c + lamda L I) x = sum_c S_c^H A^H W y_c``.

    Parameters
    ----------
    op : NUFFT
        Operator for the trajectory and image shape.
    data : ndarray, shape (n_coils, M)
        k-space samples.
    sens : ndarray, shape (n_coils, *op.shape)
        Coil sensitivities.
    weights : ndarray, shape (M,), optional
        Density compensation ``W`` (speeds convergence; Pruessmann 2001); default ones.
    max_iter : int
        Maximum CG iterations.
    tol : float
        Stop when the residual norm falls below ``tol`` times the right-hand side norm.
    lamda : float
        Relative Tikhonov weight: absolute ``lamda * ||A^H W A||`` (power iteration; see
        :mod:`mrharmony.recon.parallel`).

    Returns
    -------
    ndarray, shape op.shape
        complex64 image on the device of ``data``.
    """
    A, y = _nufft_problem(op, data, sens, weights)
    return sense_recon(A, y, lamda=lamda, max_iter=max_iter, tol=tol)


def l1_wavelet_sense(
    op: NUFFT,
    data: Any,
    sens: Any,
    lamda: float = LAMDA_DEFAULTS["cs"],
    *,
    weights: Any = None,
    max_iter: int = 30,
    wavelet: str = DEFAULT_WAVELET,
) -> Any:
    """Non-Cartesian L1-wavelet SENSE: :func:`~mrharmony.recon.parallel.l1_wavelet_recon`
    with ``A = W^(1/2) NUFFT S`` (the same FISTA, wavelet and prox as Cartesian ``cs``).

    Minimises ``0.5 ||W^(1/2) (A S x - y)||^2 + lam ||Psi x||_1``,
    ``lam = lamda * max|S^H A^H W y|``; step ``1 / L`` from a power iteration.

    Parameters
    ----------
    op : NUFFT
        Operator for the trajectory.
    data : ndarray, shape (n_coils, M)
        k-space samples.
    sens : ndarray, shape (n_coils, *op.shape)
        Coil sensitivities.
    lamda : float
        Relative regularisation weight (:mod:`mrharmony.recon.parallel`).
    weights : ndarray, shape (M,), optional
        Data-consistency weights; default ones.
    max_iter : int
        FISTA iterations.
    wavelet : str
        Orthogonal PyWavelets wavelet.

    Returns
    -------
    ndarray, shape op.shape
        complex64 image on the device of ``data``.
    """
    A, y = _nufft_problem(op, data, sens, weights)
    return l1_wavelet_recon(A, y, lamda=lamda, max_iter=max_iter, wavelet=wavelet)


def tv_sense(
    op: NUFFT,
    data: Any,
    sens: Any,
    lamda: float = LAMDA_DEFAULTS["tv"],
    *,
    weights: Any = None,
    max_iter: int = 30,
    n_inner: int = 10,
) -> Any:
    """Non-Cartesian TV SENSE: :func:`~mrharmony.recon.parallel.tv_recon` with
    ``A = W^(1/2) NUFFT S``.

    Parameters
    ----------
    op, data, sens, weights
        As in :func:`l1_wavelet_sense`.
    lamda : float
        Relative regularisation weight (:mod:`mrharmony.recon.parallel`).
    max_iter : int
        Outer FISTA iterations.
    n_inner : int
        FGP iterations of the TV prox per outer iteration.

    Returns
    -------
    ndarray, shape op.shape
        complex64 image on the device of ``data``.
    """
    A, y = _nufft_problem(op, data, sens, weights)
    return tv_recon(A, y, lamda=lamda, max_iter=max_iter, n_inner=n_inner)


def reconstruct_noncartesian(
    header: Any,
    acquisitions: Sequence[Any],
    *,
    method: str = "gridding",
    backend: str = "numpy",
    sens: np.ndarray | None = None,
    dcf: str = "pipe",
    max_iter: int = 20,
    lamda: float | None = None,
    eps: float = 1e-6,
) -> np.ndarray:
    """Reconstruct radial, spiral or other non-Cartesian acquisitions of one slice.

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
        Dataset header (recon matrix and FOV, trajectory type).
    acquisitions : sequence of ismrmrd.Acquisition
        Prewhitened acquisitions of one slice/contrast/repetition; noise, navigator and
        phase-correction scans are ignored. Trajectory units: module docstring.
    method : {"gridding", "sense", "cs", "tv"}
        ``gridding``: density-compensated adjoint NUFFT per coil. ``sense``: CG-SENSE
        (:func:`cg_sense`), ``cs``: L1-wavelet SENSE (:func:`l1_wavelet_sense`), ``tv``:
        TV SENSE (:func:`tv_sense`): the applications of :mod:`mrharmony.recon.parallel`
        (the same algorithms as for Cartesian data) with the density-weighted NUFFT
        operator and its Toeplitz normal operator, on either backend.
    backend : {"numpy", "cupy"}
        Where to compute (``cupy`` needs CuPy and a GPU; NUFFT through SigPy there, the
        wavelet transform of ``cs`` on the host).
    sens : ndarray, shape (n_coils, nx, ny[, nz]), optional
        Coil sensitivities for ``sense``/``cs``/``tv``; estimated from the low-resolution
        gridding images (RSS-normalised) when omitted.
    dcf : {"pipe", "radial", "trajectory"}
        Density compensation: Pipe–Menon, analytic radial ramp, or the per-sample weights
        stored in the trajectory's third column (used as given: their scale sets the
        image scale). Pipe–Menon costs ~0.3–0.7 s for 131k samples and is recomputed on
        every call.
    max_iter : int
        Iterations for ``sense``/``cs``/``tv``.
    lamda : float, optional
        Relative regularisation weight (:mod:`mrharmony.recon.parallel`: ``cs``/``tv``
        ``lamda * max|A^H y|``, i.e. relative to the largest magnitude of the
        SENSE-combined gridding image; ``sense`` Tikhonov ``lamda * ||A^H W A||``);
        default :data:`~mrharmony.recon.parallel.LAMDA_DEFAULTS` of the method.
    eps : float
        NUFFT tolerance (CPU).

    Returns
    -------
    ndarray
        complex64, ``(n_coils, nx, ny[, nz])`` for ``gridding`` and ``(1, nx, ny[, nz])``
        for ``sense``/``cs``/``tv``, scaled like the orthonormal centred FFT of the Cartesian
        k-space (see :mod:`mrharmony.recon.nufft`).

    Raises
    ------
    ReconError
        For an unknown method or dcf, inconsistent acquisitions, unrecognised trajectory
        units, or sensitivities of the wrong shape.
    """
    if method not in ("gridding", "sense", "cs", "tv"):
        raise ReconError(f"method: expected 'gridding', 'sense', 'cs' or 'tv', got {method!r}")
    if lamda is not None and method == "gridding":
        raise ReconError("lamda: method 'gridding' has no regularisation")
    if dcf not in ("pipe", "radial", "trajectory"):
        raise ReconError(f"dcf: expected 'pipe', 'radial' or 'trajectory', got {dcf!r}")
    if backend not in ("numpy", "cupy"):
        raise ReconError(f"backend: expected 'numpy' or 'cupy', got {backend!r}")
    geom = header_geometry(header)
    acqs = _imaging(acquisitions)
    data, coords, stored_w = _gather(geom, acqs)
    shape = geom.matrix[: geom.ndim]
    if dcf == "trajectory":
        if stored_w is None:
            raise ReconError("dcf='trajectory': the trajectories carry no weight column")
        weights = stored_w
    elif dcf == "radial":
        n_spokes = len(acqs)
        if geom.ndim != 2 or len({int(a.number_of_samples) for a in acqs}) != 1:
            raise ReconError("dcf='radial' needs 2-D spokes with equal sample counts")
        weights = density_compensation(coords, shape, method="radial", n_spokes=n_spokes)
    else:
        weights = density_compensation(coords, shape, method="pipe")

    xp = get_xp("cuda" if backend == "cupy" else "cpu")
    d_coords = xp.asarray(coords)
    d_data = xp.asarray(data)
    d_w = xp.asarray(weights)
    op = NUFFT(d_coords, shape, eps=eps)
    coil_images = op.adjoint(d_data * d_w[None])
    if method == "gridding":
        return to_numpy(coil_images).astype(np.complex64)

    n_coils = data.shape[0]
    if sens is None:
        d_sens = _estimate_sensitivities(coil_images)
    else:
        if tuple(sens.shape) != (n_coils, *shape):
            raise ReconError(
                f"sens: expected shape {(n_coils, *shape)}, got {tuple(sens.shape)}"
            )
        d_sens = xp.asarray(sens)
    lam = LAMDA_DEFAULTS[method] if lamda is None else float(lamda)
    if method == "sense":
        x = cg_sense(op, d_data, d_sens, weights=d_w, max_iter=max_iter, lamda=lam)
    elif method == "cs":
        x = l1_wavelet_sense(op, d_data, d_sens, lam, weights=d_w, max_iter=max_iter)
    else:
        x = tv_sense(op, d_data, d_sens, lam, weights=d_w, max_iter=max_iter)
    return to_numpy(x)[None].astype(np.complex64)
