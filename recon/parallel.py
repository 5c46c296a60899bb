"""Parallel imaging and compressed sensing: GRAPPA and the iterative reconstructions.

The iterative reconstructions are *applications* built from the operators of
:mod:`mrharmony.recon.operators` and the two solvers of :mod:`mrharmony.recon.algorithms`;
each takes ANY forward operator ``A`` (a :class:`~mrharmony.recon.operators.Linop` from
image to data: Cartesian ``M F S`` or non-Cartesian ``W^(1/2) NUFFT S``):

- :func:`sense_recon`: CG-SENSE, conjugate gradients on ``(A^H A + l2 I) x = A^H y``;
- :func:`l1_wavelet_recon`: ``0.5 ||A x - y||^2 + l1 ||W x||_1`` by FISTA, ``W`` the
  orthonormal ``db2`` wavelet (:data:`~recon.operators.DEFAULT_WAVELET`; coarsest
  approximation band not penalised; grid shifted randomly, seeded, every iteration as
  BART does);
- :func:`tv_recon`: ``0.5 ||A x - y||^2 + l1 TV(x)`` by FISTA with the FGP TV prox.

:func:`sense_cg`, :func:`sense_l1_wavelet` and :func:`sense_tv` are the Cartesian
front ends (k-space, maps, mask); :mod:`mrharmony.recon.noncartesian` has the NUFFT ones.
:func:`sense_g_factor` and :func:`grappa_g_factor` are the analytic g-factor (noise
amplification) maps of regular Cartesian undersampling.

Regularisation weight ``lamda`` (one convention, dimensionless, every API and the CLI):
the absolute weight is ``lamda * max|A^H y|`` for L1-wavelet and TV (the weight then has
the units of the image, so the same ``lamda`` works for any data scaling), and
``lamda * L`` for the Tikhonov term of CG-SENSE, ``L = ||A^H A||`` (the exact bound
``max sum_c |S_c|^2`` for a Cartesian mask of ones and zeros, a power iteration
otherwise): maps normalised to ``sum_c |S_c|^2 = 1`` make ``L = 1``.

The solvers' vectors are complex64 (half the memory of complex128, and twice as fast
FFTs); images are returned as complex64. All run on NumPy or CuPy arrays (whatever the
input is), the same code on both. Cartesian shapes: k-space
``(coils, *spatial)``, maps ``(coils, *spatial)``, sampling mask broadcastable to
``spatial``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mrharmony.backend import get_array_module, to_numpy
from mrharmony.errors import ReconError
from mrharmony.recon.algorithms import L1WaveletProx, TVProx, conjugate_gradient, fista
from mrharmony.recon.cartesian import ifft_c
from mrharmony.recon.operators import DEFAULT_WAVELET, Linop, Wavelet, cartesian_sense, power_norm

__all__ = [
    "LAMDA_DEFAULTS",
    "Wavelet",
    "acceleration_from_mask",
    "grappa",
    "grappa_g_factor",
    "l1_wavelet_recon",
    "sense_cg",
    "sense_g_factor",
    "sense_l1_wavelet",
    "sense_recon",
    "sense_tv",
    "tv_recon",
]

#: Default relative ``lamda`` per method (module docstring), shared by every front end.
LAMDA_DEFAULTS = {"sense": 0.0, "cs": 3e-4, "tv": 3e-4}


def _lipschitz(A: Linop, lipschitz: float | None, xp: Any) -> float:
    """``L >= ||A^H A||``: the caller's bound, else 1.01 x a 15-step power iteration."""
    if lipschitz is not None:
        return float(lipschitz)
    return 1.01 * power_norm(A, xp=xp)


def _fista_problem(
    A: Linop, y: Any, lamda: float, lipschitz: float | None
) -> tuple[Any, float, float]:
    """``(A^H y, step 1/L, absolute prox threshold lamda * max|A^H y| * step)`` of the
    regularised recons (the relative lamda convention of the module docstring)."""
    xp = get_array_module(y)
    b = A.H(y).astype(np.complex64, copy=False)
    step = 1.0 / max(_lipschitz(A, lipschitz, xp), 1e-12)
    return b, step, float(lamda) * float(xp.max(xp.abs(b))) * step


def sense_recon(
    A: Linop,
    y: Any,
    *,
    lamda: float = LAMDA_DEFAULTS["sense"],
    max_iter: int = 30,
    tol: float = 1e-6,
    x0: Any = None,
    lipschitz: float | None = None,
) -> Any:
    """CG-SENSE (Pruessmann et al. 2001) for any forward operator.

    Solves ``(A^H A + lamda L I) x = A^H y`` by :func:`~recon.algorithms.conjugate_gradient`
    with ``A.N`` (Toeplitz for a NUFFT).

    Parameters
    ----------
    A : Linop
        Forward operator, image -> data.
    y : array
        Data, shape ``A.oshape`` (already weighted as ``A`` is).
    lamda : float
        Relative Tikhonov weight (module docstring): absolute ``lamda * L``,
        ``L = ||A^H A||``.
    max_iter : int
        Maximum CG iterations.
    tol : float
        Stop when ``||r|| <= tol ||A^H y||``.
    x0 : array, optional
        Starting image.
    lipschitz : float, optional
        Known ``||A^H A||`` (only needed when ``lamda > 0``; else a power iteration).

    Returns
    -------
    array
        complex64 image ``A.ishape``.
    """
    xp = get_array_module(y)
    b = A.H(y).astype(np.complex64, copy=False)
    lam = float(lamda) * _lipschitz(A, lipschitz, xp) if lamda else 0.0
    return conjugate_gradient(A.N, b, lamda=lam, x0=x0, max_iter=max_iter, tol=tol)


def l1_wavelet_recon(
    A: Linop,
    y: Any,
    *,
    lamda: float = LAMDA_DEFAULTS["cs"],
    max_iter: int = 50,
    levels: int = 4,
    wavelet: str = DEFAULT_WAVELET,
    random_shift: bool = True,
    seed: int = 0,
    lipschitz: float | None = None,
) -> Any:
    """L1-wavelet regularised reconstruction by FISTA (Beck & Teboulle 2009).

    Minimises ``0.5 ||A x - y||^2 + lam ||W x||_1``, ``lam = lamda * max|A^H y|``, ``W``
    orthonormal (:class:`~recon.operators.Wavelet`; coarsest approximation not
    penalised); step ``1 / L``; starts from ``A^H y / L``.

    Parameters
    ----------
    A : Linop
        Forward operator, image -> data.
    y : array
        Data, shape ``A.oshape``.
    lamda : float
        Relative weight (module docstring).
    max_iter : int
        FISTA iterations.
    levels : int
        Maximum wavelet levels (fewer for small sizes: :class:`~recon.operators.Wavelet`).
    wavelet : str
        Orthogonal PyWavelets wavelet.
    random_shift : bool
        Random (seeded) cyclic shift of the wavelet grid in every iteration.
    seed : int
        Seed of the shifts.
    lipschitz : float, optional
        Known bound of ``||A^H A||`` (else 1.01 x a power iteration).

    Returns
    -------
    array
        complex64 image ``A.ishape``.
    """
    b, step, thresh = _fista_problem(A, y, lamda, lipschitz)
    prox = L1WaveletProx(Wavelet(A.ishape, levels=levels, wavelet=wavelet), thresh,
                         random_shift=random_shift, seed=seed)
    return fista(A.N, b, prox, step=step, x0=b * step, max_iter=max_iter)


def tv_recon(
    A: Linop,
    y: Any,
    *,
    lamda: float = LAMDA_DEFAULTS["tv"],
    max_iter: int = 50,
    n_inner: int = 10,
    lipschitz: float | None = None,
) -> Any:
    """Total-variation regularised reconstruction by FISTA with an FGP inner TV prox.

    Minimises ``0.5 ||A x - y||^2 + lam TV(x)`` (isotropic TV of the complex image,
    periodic forward differences), ``lam = lamda * max|A^H y|``; step ``1 / L``. The
    dual variable of the prox is warm-started across outer iterations.

    Parameters
    ----------
    A : Linop
    y : array
    lamda : float
        Relative weight (module docstring).
    max_iter : int
        Outer FISTA iterations.
    n_inner : int
        FGP iterations of the TV prox per outer iteration.
    lipschitz : float, optional
        Known bound of ``||A^H A||``.

    Returns
    -------
    array
        complex64 image ``A.ishape``.
    """
    b, step, thresh = _fista_problem(A, y, lamda, lipschitz)
    prox = TVProx(A.ishape, thresh, n_inner=n_inner)
    return fista(A.N, b, prox, step=step, x0=b * step, max_iter=max_iter)


# ------------------------------------------------------------ Cartesian front ends


def _cartesian(kspace, maps, mask) -> tuple[Linop, Any, float]:
    """``A = M F S`` (complex64), the data, and the exact bound ``L = max sum|S|^2 max M^2``."""
    if kspace.shape != maps.shape:
        raise ReconError(f"SENSE: k-space {kspace.shape} and maps {maps.shape} differ in shape")
    xp = get_array_module(maps)
    A = cartesian_sense(maps.astype(np.complex64), mask)
    m = xp.asarray(mask)
    lip = A.ops[-1].norm_bound() * float(to_numpy(xp.max(xp.abs(m)))) ** 2
    return A, kspace.astype(np.complex64), lip


def sense_cg(
    kspace,
    maps,
    mask,
    *,
    lamda: float = LAMDA_DEFAULTS["sense"],
    max_iter: int = 30,
    tol: float = 1e-6,
    x0=None,
):
    """Cartesian CG-SENSE: :func:`sense_recon` with ``A = M F S``.

    Parameters
    ----------
    kspace : array
        complex ``(coils, *spatial)``, zeros where not sampled (prewhitened).
    maps : array
        Sensitivity maps, same shape.
    mask : array
        Sampling mask (bool or weights) broadcastable to ``spatial``.
    lamda : float
        Relative Tikhonov weight: absolute ``lamda * max sum_c |S_c|^2`` (module
        docstring).
    max_iter : int
        Maximum CG iterations.
    tol : float
        Stop when ``||r|| / ||A^H y|| < tol``.
    x0 : array, optional
        Starting image.

    Returns
    -------
    array
        complex64 image ``spatial``.
    """
    A, y, lip = _cartesian(kspace, maps, mask)
    x0 = None if x0 is None else x0.astype(np.complex64)
    return sense_recon(A, y, lamda=lamda, max_iter=max_iter, tol=tol, x0=x0,
                       lipschitz=lip).astype(np.complex64)


def sense_l1_wavelet(
    kspace,
    maps,
    mask,
    *,
    lamda: float = LAMDA_DEFAULTS["cs"],
    max_iter: int = 50,
    levels: int = 4,
    random_shift: bool = True,
    seed: int = 0,
    wavelet: str = DEFAULT_WAVELET,
):
    """Cartesian L1-wavelet SENSE: :func:`l1_wavelet_recon` with ``A = M F S``.

    The step is ``1 / L`` with ``L = max sum_c |S_c|^2`` (times ``max M^2``), an exact
    bound of ``||A^H A||`` for the unitary FFT.

    Parameters
    ----------
    kspace, maps, mask
        As in :func:`sense_cg`.
    lamda : float
        Relative regularisation weight (module docstring).
    max_iter, levels, random_shift, seed, wavelet
        As in :func:`l1_wavelet_recon`.

    Returns
    -------
    array
        complex64 image.
    """
    A, y, lip = _cartesian(kspace, maps, mask)
    return l1_wavelet_recon(A, y, lamda=lamda, max_iter=max_iter, levels=levels,
                            wavelet=wavelet, random_shift=random_shift, seed=seed,
                            lipschitz=lip).astype(np.complex64)


def sense_tv(
    kspace,
    maps,
    mask,
    *,
    lamda: float = LAMDA_DEFAULTS["tv"],
    max_iter: int = 50,
    n_inner: int = 10,
):
    """Cartesian TV SENSE: :func:`tv_recon` with ``A = M F S``.

    Parameters
    ----------
    kspace, maps, mask
        As in :func:`sense_cg`.
    lamda : float
        Relative regularisation weight (module docstring).
    max_iter : int
        Outer FISTA iterations.
    n_inner : int
        FGP iterations of the TV prox per outer iteration.

    Returns
    -------
    array
        complex64 image.
    """
    A, y, lip = _cartesian(kspace, maps, mask)
    return tv_recon(A, y, lamda=lamda, max_iter=max_iter, n_inner=n_inner,
                    lipschitz=lip).astype(np.complex64)


def sense_g_factor(maps: Any, acceleration: Sequence[int], *,
                   noise_covariance: Any = None) -> np.ndarray:
    """Analytic SENSE g-factor map for regular Cartesian undersampling.

    With ``R`` the product of the factors, the pixels that fold onto each other are
    ``p + k N_a / R_a`` along every accelerated axis ``a``; for each such set, with
    ``S`` the (coils x set) sensitivity matrix and ``Psi`` the receiver noise
    covariance (Pruessmann et al. 1999, eq. 13)::

        g_p = sqrt( [(S^H Psi^-1 S)^-1]_pp [S^H Psi^-1 S]_pp )   >= 1

    so the noise standard deviation of an unregularised SENSE image is ``g sqrt(R)``
    times that of the fully sampled one (same maps, same coil combination).

    Parameters
    ----------
    maps : array_like, shape (coils, *spatial)
        Coil sensitivities (any scaling).
    acceleration : sequence of int
        Factor per spatial axis (``1`` = fully sampled), e.g. ``(1, 2)`` for R = 2
        along the second axis. Each accelerated axis length must be divisible by its
        factor.
    noise_covariance : array_like, shape (coils, coils), optional
        Receiver noise covariance ``Psi`` (default: identity, prewhitened data).

    Returns
    -------
    ndarray, shape spatial
        float64 g-factor; ``inf`` where the folded set is singular (e.g. no
        sensitivity at all).

    Raises
    ------
    ReconError
        Wrong number of factors, a factor < 1, or an axis not divisible by its factor.
    """
    s = np.asarray(to_numpy(maps), dtype=np.complex128)
    spatial = s.shape[1:]
    acc = tuple(int(r) for r in acceleration)
    if len(acc) != len(spatial) or min(acc) < 1:
        raise ReconError(f"acceleration {acc}: expected one factor >= 1 per spatial axis "
                         f"of {spatial}")
    for n, r in zip(spatial, acc, strict=True):
        if n % r:
            raise ReconError(f"acceleration {acc}: axis of {n} not divisible by {r}")
    nc = s.shape[0]
    if noise_covariance is not None:  # whiten: S -> L^-1 S with Psi = L L^H
        chol = np.linalg.cholesky(np.asarray(noise_covariance, dtype=np.complex128))
        s = np.linalg.solve(chol, s.reshape(nc, -1)).reshape(s.shape)
    # split each axis n into (r, n / r): index k of the fold group, then the reduced pixel
    shape = [nc]
    for n, r in zip(spatial, acc, strict=True):
        shape += [r, n // r]
    folded = s.reshape(shape)
    d = len(spatial)
    group_axes = [1 + 2 * a for a in range(d)]
    pixel_axes = [2 + 2 * a for a in range(d)]
    # -> (*reduced pixels, coils, R)
    order = [*pixel_axes, 0, *group_axes]
    S = folded.transpose(order).reshape(*[spatial[a] // acc[a] for a in range(d)], nc, -1)
    gram = np.swapaxes(S.conj(), -1, -2) @ S  # (..., R, R)
    diag = np.real(np.diagonal(gram, axis1=-2, axis2=-1))
    with np.errstate(all="ignore"):
        try:
            inv_diag = np.real(np.diagonal(np.linalg.inv(gram), axis1=-2, axis2=-1))
        except np.linalg.LinAlgError:
            inv_diag = np.real(np.diagonal(np.linalg.pinv(gram), axis1=-2, axis2=-1))
        g = np.sqrt(np.maximum(inv_diag * diag, 1.0))
    g = np.where(np.isfinite(g) & (diag > 0), g, np.inf)
    # back to the image grid: (*reduced, R) -> (*spatial)
    g = g.reshape(*[spatial[a] // acc[a] for a in range(d)], *acc)
    inverse = []
    for a in range(d):
        inverse += [d + a, a]
    return g.transpose(inverse).reshape(spatial)


def grappa_g_factor(
    calib: Any,
    reference: Any,
    acceleration: int | Sequence[int],
    *,
    kernel_x: int = 5,
    kernel_blocks: int | Sequence[int] = 4,
    lamda: float = 1e-3,
    max_rows: int = 60000,
    noise_covariance: Any = None,
) -> np.ndarray:
    """Analytic GRAPPA g-factor map for regular Cartesian undersampling.

    The image-domain formulation of Breuer et al. (MRM 62, 739 (2009)): the kernels
    that :func:`grappa` fits on ``calib`` for a regular lattice (one per missing
    offset from the lattice, the same source choice and the same fit) and the identity
    for the acquired points add up to one k-space kernel ``K[o, c](q)`` (each lattice
    offset reads its own residues ``q mod R``, so the kernels do not overlap), and the
    GRAPPA k-space is the circular correlation of the zero-filled data with it. In the
    image domain this is, pixel by pixel, ``I_o(x) = sum_c W[o, c](x) z_c(x)`` with
    ``W[o, c](x) = sum_q K[o, c](q) exp(-2 pi i q.x / N)`` (the kernel's DFT on the
    image grid; unitary FFTs) and ``z`` the aliased zero-filled coil images, whose noise
    covariance at a pixel is ``Psi / R``. The coil images are combined as
    ``sum_o p_o I_o`` with ``p = conj(ref) / sqrt(sum |ref|^2)`` (RSS of the reference
    to first order in the noise), so with ``w_c = sum_o p_o W[o, c]``::

        g(x) = sqrt( w^T Psi conj(w) ) / ( R sqrt( p^T Psi conj(p) ) )

    and the noise standard deviation of the combined GRAPPA image is ``g sqrt(R)`` times
    that of the fully sampled image combined with the same ``p``. ``g = 1`` at R = 1;
    unlike SENSE, ``g < 1`` is possible in places: the regularised kernel averages
    noise, and with correlated noise its coil mixing can beat the RSS weights ``p``.
    The model is a circular correlation: :func:`grappa` matches it where its
    neighbourhoods lie inside the matrix, and with ``edge="zero"`` up to the edge (it
    reads zeros for the sources outside, which the model replaces by the opposite
    edge's samples: the image noise SD is 1-3 % below the map's on 48 lines); its
    default one-sided edge kernels (``edge="fit"``) are noisier than the map there.

    Parameters
    ----------
    calib : array_like, shape (coils, nx_cal, *cal)
        The fully sampled calibration block (ACS) passed to :func:`grappa`.
    reference : array_like, shape (coils, nx, *phase)
        Coil images that define the coil combination (e.g. the GRAPPA coil images, or
        the sensitivities; only their ratios per pixel matter). Gives the image grid:
        one or two phase axes, as :func:`grappa`.
    acceleration : int or sequence of int
        Factor per phase axis (an int is the first axis); each phase axis length must
        be divisible by its factor.
    kernel_x, kernel_blocks, lamda, max_rows
        As for :func:`grappa` (use the same values as the reconstruction).
    noise_covariance : array_like, shape (coils, coils), optional
        Receiver noise covariance ``Psi`` of the k-space samples (default identity).

    Returns
    -------
    ndarray, shape (nx, *phase)
        float64 g-factor (dimensionless); ``nan`` where the reference is zero in every
        coil (no combination defined).

    Raises
    ------
    ReconError
        Wrong shapes or factors, an axis not divisible by its factor, a kernel wider
        than the image grid, a calibration block too small for the kernel, or a noise
        covariance that is not Hermitian positive definite.
    """
    ref = np.asarray(to_numpy(reference), dtype=np.complex128)
    cal = np.asarray(to_numpy(calib)).astype(np.complex64)
    if ref.ndim not in (3, 4) or cal.ndim != ref.ndim or cal.shape[0] != ref.shape[0]:
        raise ReconError(f"grappa_g_factor: reference {ref.shape} and calibration "
                         f"{cal.shape} must be (coils, nx, ny[, nz]) with the same coils")
    nc, nx = ref.shape[:2]
    phase = tuple(int(n) for n in ref.shape[2:])
    nd = len(phase)
    accel, blocks = _accel_and_blocks("grappa_g_factor", acceleration, kernel_blocks,
                                      phase)
    for n, r in zip(phase, accel, strict=True):
        if n % r:
            raise ReconError(f"grappa_g_factor: acceleration {accel}: axis of {n} not "
                             f"divisible by {r}")
    if kernel_x < 1 or kernel_x % 2 == 0:
        raise ReconError(f"grappa_g_factor: kernel_x {kernel_x} must be odd and >= 1")
    psi = np.eye(nc) if noise_covariance is None else np.asarray(
        to_numpy(noise_covariance), dtype=np.complex128)
    if psi.shape != (nc, nc) or not np.allclose(psi, psi.conj().T):
        raise ReconError(f"grappa_g_factor: noise covariance {psi.shape} must be a "
                         f"Hermitian ({nc}, {nc}) matrix")
    try:
        np.linalg.cholesky(psi)
    except np.linalg.LinAlgError:
        raise ReconError("grappa_g_factor: noise covariance is not positive definite") from None
    offsets, half = _window(accel, phase, blocks)
    grid = (nx, *phase)
    if kernel_x > nx or any(2 * h + 1 > n for h, n in zip(half, phase, strict=True)):
        raise ReconError(f"grappa_g_factor: a kernel of {kernel_x} x "
                         f"{'x'.join(str(2 * int(h) + 1) for h in half)} points is wider "
                         f"than the image grid {grid}")
    n_src, dist = _source_budget(accel, half, blocks, offsets)
    dx = np.arange(kernel_x) - kernel_x // 2
    cal_flat = cal.reshape(nc, cal.shape[1], -1)
    cal_shape = tuple(int(n) for n in cal.shape[2:])
    ro = np.flatnonzero(np.any(cal != 0, axis=(0, *range(2, cal.ndim))))
    # one k-space kernel K[o, c](q), flipped onto the centred grid (q at centre - q)
    centre = np.array([n // 2 for n in grid])
    kfull = np.zeros((nc, nc, *grid), np.complex128)
    kfull[(np.arange(nc), np.arange(nc), *centre)] = 1.0  # acquired points: identity
    for cls in np.ndindex(*accel):
        if not any(cls):
            continue
        have = np.all((offsets + np.array(cls)) % np.array(accel) == 0, axis=1)
        src = _kernel_sources(have, n_src, dist)
        w = _grappa_fit(np, cal_flat, cal_shape, offsets[src], dx, ro, lamda, max_rows,
                        accel).astype(np.complex128)
        # rows of w: (coil c, source s, kx) in that order; columns: target coil o
        w = w.reshape(nc, int(src.sum()), kernel_x, nc)
        q = np.concatenate([np.repeat(dx[:, None], src.sum(), 1).T[..., None],
                            np.repeat(offsets[src][:, None, :], kernel_x, 1)], axis=-1)
        pos = tuple(centre[a] - q[..., a] for a in range(1 + nd))  # (s, kx) each
        for o in range(nc):
            kfull[o][(slice(None), *pos)] += w[..., o]
    # image-domain weights per output coil, combined with p as they are computed
    scale = np.sqrt(float(np.prod(grid)))
    axes = tuple(range(1, 2 + nd))
    with np.errstate(all="ignore"):
        p = ref.conj() / np.sqrt(np.sum(np.abs(ref) ** 2, axis=0))
    comb = np.zeros(ref.shape, np.complex128)
    for o in range(nc):
        comb += p[o] * (scale * ifft_c(kfull[o], axes=axes))
    # image = sum_c comb_c z_c:  var = comb^T Psi conj(comb) (/R); full: p^T Psi conj(p)
    var_r = np.real(np.einsum("c...,cd,d...->...", comb, psi, comb.conj()))
    var_1 = np.real(np.einsum("c...,cd,d...->...", p, psi, p.conj()))
    r = float(np.prod(accel))
    with np.errstate(all="ignore"):
        g = np.sqrt(np.maximum(var_r, 0.0) / var_1) / r
    return np.where(np.isfinite(g), g, np.nan)


def acceleration_from_mask(mask: np.ndarray) -> tuple[int, ...]:
    """Acceleration factor per axis of a sampling mask, from its line pattern.

    Along each axis the mask is projected (any sample over the other axes) and the most
    common gap larger than 1 between consecutive sampled lines is taken; an axis without
    such gaps, or where fewer than 5 % of the lines inside the sampled extent are missing
    (elliptical corners, a stray line), has factor 1. A fully sampled calibration block
    inside the pattern does not change the answer (its gaps are 1).

    Parameters
    ----------
    mask : numpy.ndarray
        bool, one axis per phase-encoding direction (``(ny,)`` or ``(ny, nz)``).

    Returns
    -------
    tuple of int
        One factor per axis of ``mask``.
    """
    mask = np.asarray(mask, dtype=bool)
    out = []
    for ax in range(mask.ndim):
        line = mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)) if (
            mask.ndim > 1) else mask
        idx = np.flatnonzero(line)
        if idx.size < 2:
            out.append(1)
            continue
        extent = idx[-1] - idx[0] + 1
        gaps = np.diff(idx)
        gaps = gaps[gaps > 1]
        if not gaps.size or 1.0 - idx.size / extent < 0.05:
            out.append(1)
            continue
        out.append(int(np.argmax(np.bincount(gaps))))
    return tuple(out)


def _accel_and_blocks(
    name: str, acceleration: int | Sequence[int], kernel_blocks: int | Sequence[int],
    phase: tuple[int, ...],
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Acceleration factor and kernel source-line count per phase axis.

    An int ``acceleration`` is the first phase axis's factor (the others 1); an int
    ``kernel_blocks`` holds for every axis. ``name`` prefixes the errors.

    Raises
    ------
    ReconError
        Not one factor >= 1 and one count >= 1 per phase axis of ``phase``.
    """
    nd = len(phase)
    accel = ((int(acceleration),) + (1,) * (nd - 1) if np.ndim(acceleration) == 0
             else tuple(int(a) for a in acceleration))
    blocks = ((int(kernel_blocks),) * nd if np.ndim(kernel_blocks) == 0
              else tuple(int(b) for b in kernel_blocks))
    if len(accel) != nd or min(accel) < 1:
        raise ReconError(f"{name}: acceleration {accel}: one factor >= 1 per phase axis "
                         f"of {phase}")
    if len(blocks) != nd or min(blocks) < 1:
        raise ReconError(f"{name}: kernel_blocks {kernel_blocks}: one count >= 1 per "
                         f"phase axis ({nd})")
    return accel, blocks


def _window(
    accel: tuple[int, ...], phase: tuple[int, ...], kernel_blocks: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (n, ndim) of the neighbourhood searched for source points (centre left out):
    ``R * kernel_blocks // 2`` either side along accelerated axes, 1 along the others."""
    half = [r * kb // 2 if r > 1 else (1 if n > 1 and len(phase) > 1 else 0)
            for r, n, kb in zip(accel, phase, kernel_blocks, strict=True)]
    grid = np.stack(np.meshgrid(*[np.arange(-h, h + 1) for h in half], indexing="ij"), -1)
    grid = grid.reshape(-1, len(phase))
    return grid[np.any(grid != 0, axis=1)], np.array(half)


def grappa(
    kspace,
    calib,
    *,
    mask: np.ndarray,
    acceleration: int | Sequence[int] | None = None,
    kernel_x: int = 5,
    kernel_blocks: int | Sequence[int] = 4,
    lamda: float = 1e-3,
    max_rows: int = 60000,
    max_kernels: int | None = None,
    edge: str = "fit",
):
    """GRAPPA (Griswold et al. 2002) for undersampling along one or two phase axes.

    Every missing point inside the sampled extent is filled from the sampled points of
    its neighbourhood (``R * kernel_blocks // 2`` lines either side along accelerated
    axes, one along the other phase axis of 3-D data, ``kernel_x`` points along kx) by
    weights fitted on the calibration block. Missing points are grouped by which
    neighbours are sampled: a regular pattern needs one kernel per offset from the
    lattice (``R - 1`` in 1-D). At the matrix edge (``edge``): ``"fit"`` (default) gives
    the edge points kernels of their own, fitted with the sources they have (one-sided:
    the most accurate on noise-free data, but their extrapolation raises the noise
    variance of those 2-4 lines 25-65-fold); ``"zero"`` continues the sampling pattern
    beyond the edge (an outside line has the pattern of the line a multiple of ``R``
    away inside), so the edge points read the interior kernel with zeros for its sources
    outside the matrix, as along kx: the noise follows :func:`grappa_g_factor` up to the
    edge, at the price of a bias towards zero there (noise-free NRMSE up by 0.005-0.07 in
    the tests). Points next to a fully sampled ACS block, a partial-Fourier edge or an
    irregular pattern reuse a kernel whose sources they have, or get their own (most
    frequent patterns first, at most ``max_kernels``; rarer patterns then count every
    point outside the matrix as a sampled zero; a new kernel takes the nearest sources,
    or, where they would span more lines than the calibration block has, the nearest
    that a kernel centred in it can fit). Missing points farther than ``R - 1`` lines
    beyond the first or last sampled line (partial Fourier) are left empty.

    Parameters
    ----------
    kspace : array
        complex ``(coils, nx, *phase)`` with one or two phase axes, zeros where missing.
    calib : array
        complex ``(coils, nx, *cal)``: a fully sampled calibration block (ACS), centred
        on the same kx grid.
    mask : numpy.ndarray
        bool ``phase``: sampled points (imaging and calibration-and-imaging lines).
    acceleration : int or sequence of int, optional
        Factor per phase axis (an int is the first axis); default: from ``mask``
        (:func:`acceleration_from_mask`).
    kernel_x : int
        Kernel width along kx (odd).
    kernel_blocks : int or sequence of int
        Source lines per accelerated axis in a regular pattern (one for all phase axes,
        or one per axis).
    lamda : float
        Tikhonov weight relative to ``trace(A^H A) / n_columns``.
    max_rows : int
        At most this many calibration rows are fitted per kernel (evenly spread).
    max_kernels : int, optional
        At most this many fitted kernels (default 16 for one phase axis, ``3 Ry Rz`` for
        two).
    edge : {"fit", "zero"}
        Matrix-edge handling (see above): one-sided kernels of their own, or the
        interior kernels with zeros outside the matrix.

    Returns
    -------
    array
        complex64 k-space with the missing points filled; sampled points untouched.

    Raises
    ------
    ReconError
        If fewer than 2 points are sampled, the calibration block is too small for a
        kernel, or ``edge`` is unknown.
    """
    if edge not in ("fit", "zero"):
        raise ReconError(f"grappa: edge must be 'fit' or 'zero', got {edge!r}")
    xp = get_array_module(kspace)
    nc, nx = kspace.shape[:2]
    phase = tuple(int(n) for n in kspace.shape[2:])
    nd = len(phase)
    if nd not in (1, 2) or calib.ndim != kspace.ndim or calib.shape[0] != nc:
        raise ReconError(f"grappa: k-space {kspace.shape} and calibration {calib.shape} must "
                         "be (coils, nx, ny[, nz]) with the same coils")
    mask = np.asarray(mask, dtype=bool).reshape(phase)
    if mask.sum() < 2:
        raise ReconError("grappa: fewer than 2 sampled lines")
    accel, blocks = _accel_and_blocks(
        "grappa", acceleration_from_mask(mask) if acceleration is None else acceleration,
        kernel_blocks, phase)
    offsets, half = _window(accel, phase, blocks)
    # points to fill: missing, inside the sampled extent widened by R - 1
    inside = np.ones(phase, bool)
    for ax in range(nd):
        line = mask.any(axis=tuple(a for a in range(nd) if a != ax)) if nd > 1 else mask
        idx = np.flatnonzero(line)
        keep = np.zeros(phase[ax], bool)
        keep[max(0, idx[0] - accel[ax] + 1):idx[-1] + accel[ax]] = True
        inside &= keep.reshape([-1 if a == ax else 1 for a in range(nd)])
    cells = np.argwhere(~mask & inside)
    out = kspace.astype(np.complex64).copy()
    if not cells.size:
        return out
    pad = [(int(h), int(h)) for h in half]
    sampled_or_outside = np.pad(mask, pad, constant_values=True)
    sampled = np.pad(mask, pad, constant_values=False)
    where = tuple(cells[:, None, a] + half[a] + offsets[None, :, a] for a in range(nd))
    # only points with a really sampled neighbour are filled; with edge="zero" they are
    # grouped by the pattern continued beyond the matrix edge, so that an edge point of
    # a regular lattice reads the interior kernel, with zeros for its sources outside
    real = sampled[where].any(axis=1)
    cells = cells[real]
    if not cells.size:
        return out
    where = tuple(w[real] for w in where)
    pattern = (_continued_mask(mask, accel, half) if edge == "zero" else sampled)[where]
    # with every outside point as a sampled zero: the fallback of rare edge patterns
    loose = sampled_or_outside[where]
    uniq, first, inverse, counts = np.unique(pattern, axis=0, return_index=True,
                                             return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if max_kernels is None:
        max_kernels = 16 if nd == 1 else 3 * int(np.prod(accel))
    n_src, dist = _source_budget(accel, half, blocks, offsets)
    dx = np.arange(kernel_x) - kernel_x // 2
    hx = kernel_x // 2
    cal = calib.astype(np.complex64)
    cal_shape = tuple(int(n) for n in cal.shape[2:])
    fits = np.all(np.abs(offsets) <= (np.array(cal_shape) - 1) // 2, axis=1)
    cal_flat = cal.reshape(nc, cal.shape[1], -1)
    ro = np.flatnonzero(to_numpy(xp.any(cal != 0, axis=(0, *range(2, cal.ndim)))))
    kp = xp.pad(out, [(0, 0), (hx, hx), *pad]).reshape(nc, nx + 2 * hx, -1)
    padded_shape = tuple(n + 2 * int(h) for n, h in zip(phase, half, strict=True))
    out_flat = out.reshape(nc, nx, -1)
    xwin = xp.asarray(np.arange(nx)[:, None] + dx[None, :] + hx)
    kernels: list[tuple[np.ndarray, Any]] = []
    for u in np.argsort(-counts, kind="stable"):
        have = uniq[u]
        use = next((j for j, (src, _) in enumerate(kernels) if not np.any(src & ~have)), None)
        if use is None and len(kernels) >= max_kernels:
            have = loose[first[u]]
            use = next((j for j, (src, _) in enumerate(kernels) if not np.any(src & ~have)),
                       None)
        if use is None:
            src = _kernel_sources(have, n_src, dist)
            if np.any(np.ptp(np.vstack([offsets[src], 0 * half]), axis=0) >= cal_shape) and (
                    np.any(have & fits)):
                # an irregular pattern whose nearest sources span more lines than the
                # calibration block has: keep to the ones a centred kernel can fit
                src = _kernel_sources(have & fits, n_src, dist)
            kernels.append((src, _grappa_fit(xp, cal_flat, cal_shape, offsets[src], dx, ro,
                                             lamda, max_rows, accel)))
            use = len(kernels) - 1
        src, w = kernels[use]
        targets = cells[inverse == u]
        pos = targets[:, None, :] + half[None, None, :] + offsets[src][None, :, :]
        src_flat = np.ravel_multi_index(tuple(np.moveaxis(pos, -1, 0)), padded_shape)
        dst_flat = xp.asarray(np.ravel_multi_index(tuple(targets.T), phase))
        ncols = w.shape[0]
        step = max(1, (128 * 2**20) // (8 * nx * ncols))
        for lo in range(0, targets.shape[0], step):
            g = kp[:, :, xp.asarray(src_flat[lo:lo + step])][:, xwin]  # (c, nx, kx, m, s)
            m = g.shape[3]
            a = xp.transpose(g, (1, 3, 0, 4, 2)).reshape(nx * m, ncols)
            filled = (a @ w).reshape(nx, m, nc)
            out_flat[:, :, dst_flat[lo:lo + step]] = xp.transpose(filled, (2, 0, 1))
    return out


def _continued_mask(mask: np.ndarray, accel: tuple[int, ...], half: np.ndarray) -> np.ndarray:
    """``mask`` padded by ``half`` along each phase axis with the sampling pattern
    continued beyond the matrix edge: an outside line ``i`` takes the pattern of the
    line ``i -+ k R`` (the nearest one inside, ``R`` the axis's factor), so the edge
    lines of a regular lattice see the interior neighbourhood (a partial-Fourier side,
    whose last ``R`` lines are not sampled, stays unsampled)."""
    out = mask
    for ax, (r, h) in enumerate(zip(accel, half, strict=True)):
        n = mask.shape[ax]
        i = np.arange(-int(h), n + int(h))
        i = np.where(i < 0, i + r * -(i // r), i)
        i = np.where(i >= n, i - r * ((i - n) // r + 1), i)
        out = np.take(out, np.clip(i, 0, n - 1), axis=ax)
    return out


def _source_budget(accel: tuple[int, ...], half: np.ndarray, blocks: tuple[int, ...],
                   offsets: np.ndarray) -> tuple[int, np.ndarray]:
    """Sources per kernel of a regular pattern, and each offset's squared distance from the
    target in units of R (the order in which :func:`_kernel_sources` keeps them)."""
    n_src = int(np.prod([b if r > 1 else 2 * h + 1
                         for r, h, b in zip(accel, half, blocks, strict=True)]))
    scale = np.maximum(np.array(accel, float), 1.0)
    return n_src, np.sum((offsets / scale) ** 2, axis=1)


def _kernel_sources(have: np.ndarray, n_src: int, dist: np.ndarray) -> np.ndarray:
    """Source mask of a new kernel: the sampled neighbours ``have``, or of a dense region
    the ``n_src`` nearest of them (in units of R, ties in window order)."""
    src = have.copy()
    if src.sum() > n_src:
        order = np.flatnonzero(src)[np.argsort(dist[src], kind="stable")]
        src[:] = False
        src[order[:n_src]] = True
    return src


def _grappa_fit(xp, cal_flat, cal_shape, src_offsets, dx, ro, lamda, max_rows, accel):
    """Weights ``(coils * sources * kx, coils)`` of one source pattern, fitted on every
    position of the calibration block where the target and all sources lie inside it."""
    nc = cal_flat.shape[0]
    hx = dx.size // 2
    lo = np.maximum(0, -np.minimum(src_offsets.min(axis=0), 0))
    hi = np.array(cal_shape) - np.maximum(src_offsets.max(axis=0), 0)
    if ro.size == 0 or np.any(hi <= lo) or ro[-1] - ro[0] + 1 <= 2 * hx:
        span = (src_offsets.max(axis=0) - np.minimum(src_offsets.min(axis=0), 0) + 1)
        raise ReconError(
            f"grappa: the calibration block {list(cal_shape)} is too small for R="
            f"{'x'.join(map(str, accel))} (a kernel spans {span.tolist()} lines)"
        )
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij")
    t = np.stack([g.ravel() for g in grids], axis=1)
    xs = np.arange(ro[0] + hx, ro[-1] - hx + 1)
    if t.shape[0] * xs.size > max_rows:  # evenly thinned rows (the kernel is shift invariant)
        keep_x = max(1, min(xs.size, max_rows // t.shape[0]))
        xs = xs[np.linspace(0, xs.size - 1, keep_x).round().astype(int)]
        if t.shape[0] * xs.size > max_rows:
            t = t[np.linspace(0, t.shape[0] - 1, max_rows // xs.size).round().astype(int)]
    src = np.ravel_multi_index(tuple(np.moveaxis(t[:, None, :] + src_offsets[None], -1, 0)),
                               cal_shape)
    tgt = xp.asarray(np.ravel_multi_index(tuple(t.T), cal_shape))
    xwin = xp.asarray(xs[:, None] + dx[None, :])
    g = cal_flat[:, :, xp.asarray(src)][:, xwin]  # (c, x, kx, t, s)
    a = xp.transpose(g, (1, 3, 0, 4, 2)).reshape(xs.size * t.shape[0], -1)
    b = xp.transpose(cal_flat[:, xp.asarray(xs)][:, :, tgt], (1, 2, 0)).reshape(-1, nc)
    aha = a.conj().T @ a
    reg = lamda * float(xp.real(xp.trace(aha))) / aha.shape[0]
    return xp.linalg.solve(aha + reg * xp.eye(aha.shape[0], dtype=aha.dtype),
                           a.conj().T @ b).astype(np.complex64)
