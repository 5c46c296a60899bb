"""The solvers of every iterative reconstruction: conjugate gradients and FISTA.

Both take operators from :mod:`mrharmony.recon.operators` (anything with ``apply`` /
``__call__`` on arrays works) and run on NumPy or CuPy, whichever owns the vectors. They
are deterministic: no randomness except the seeded wavelet shifts of
:class:`L1WaveletProx`.

- :func:`conjugate_gradient` solves ``(N + lamda I) x = b`` for a Hermitian positive
  semi-definite ``N`` (a normal operator ``A^H A``): CG-SENSE.
- :func:`fista` minimises ``0.5 ||A x - y||^2 + g(x)`` given ``N = A^H A``,
  ``b = A^H y``, a step ``1/L`` (``L >= ||A^H A||``) and the proximal operator of
  ``step * g`` (Beck & Teboulle 2009): L1-wavelet with :class:`L1WaveletProx`, TV with
  :class:`TVProx` (fast gradient projection on the dual, Beck & Teboulle 2009).

The regularisation weights here are absolute (image units); the applications convert
the relative ``lamda`` of their API (module docstring of :mod:`mrharmony.recon.parallel`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mrharmony.backend import get_array_module
from mrharmony.recon.operators import FiniteDifference, Wavelet

__all__ = ["L1WaveletProx", "TVProx", "conjugate_gradient", "fista", "soft_threshold"]


def _dot(xp, a, b) -> float:
    return float(xp.real(xp.vdot(a, b)))


def conjugate_gradient(
    normal: Callable[[Any], Any],
    b: Any,
    *,
    lamda: float = 0.0,
    x0: Any = None,
    max_iter: int = 30,
    tol: float = 1e-6,
) -> Any:
    """Conjugate gradients for ``(N + lamda I) x = b`` (Hestenes & Stiefel 1952).

    Parameters
    ----------
    normal : callable
        ``N``: Hermitian positive semi-definite, e.g. ``A.N`` of a :class:`Linop`.
    b : array
        Right-hand side, e.g. ``A^H y``.
    lamda : float
        Absolute Tikhonov weight (units of ``N``).
    x0 : array, optional
        Start (default zeros).
    max_iter : int
        Maximum iterations.
    tol : float
        Stop when ``||r|| <= tol ||b||`` (``r`` the residual).

    Returns
    -------
    array
        ``x`` in the dtype of ``b``.
    """
    xp = get_array_module(b)

    def op(v):
        out = normal(v)
        return out + lamda * v if lamda else out

    if x0 is None:
        x = xp.zeros_like(b)
        r = b.copy()
    else:
        x = x0.astype(b.dtype, copy=True)
        r = b - op(x)
    p = r.copy()
    rr = _dot(xp, r, r)
    stop = float(tol) ** 2 * _dot(xp, b, b)
    for _ in range(int(max_iter)):
        if rr <= stop or rr == 0:
            break
        q = op(p)
        alpha = rr / max(_dot(xp, p, q), 1e-30)
        x += alpha * p
        r -= alpha * q
        rr_new = _dot(xp, r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def fista(
    normal: Callable[[Any], Any],
    b: Any,
    prox: Callable[[Any], Any],
    *,
    step: float,
    x0: Any = None,
    max_iter: int = 50,
    tol: float = 0.0,
) -> Any:
    """FISTA (Beck & Teboulle 2009) for ``0.5 ||A x - y||^2 + g(x)``.

    Each iteration: ``x_k = prox(z - step (N z - b))``, ``t_{k+1} = (1 + sqrt(1 + 4
    t_k^2)) / 2``, ``z = x_k + (t_k - 1) / t_{k+1} (x_k - x_{k-1})``.

    Parameters
    ----------
    normal : callable
        ``N = A^H A``.
    b : array
        ``A^H y``.
    prox : callable
        ``v -> argmin_x 0.5 ||x - v||^2 + step g(x)`` (the weight ``step * g`` is the
        prox's own business: see :class:`L1WaveletProx`, :class:`TVProx`).
    step : float
        ``1 / L`` with ``L >= ||A^H A||``.
    x0 : array, optional
        Start (default zeros).
    max_iter : int
        Maximum iterations.
    tol : float
        Stop when ``||x_k - x_{k-1}|| <= tol ||x_k||`` (0: run all iterations).

    Returns
    -------
    array
    """
    xp = get_array_module(b)
    x = xp.zeros_like(b) if x0 is None else x0.astype(b.dtype, copy=True)
    z = x.copy()
    t = 1.0
    for _ in range(int(max_iter)):
        x_new = prox(z - step * (normal(z) - b))
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        diff = x_new - x
        z = x_new + np.float32((t - 1) / t_new) * diff
        x, t = x_new, t_new
        if tol > 0 and float(xp.linalg.norm(diff)) <= tol * float(xp.linalg.norm(x)):
            break
    return x


def soft_threshold(c: Any, thresh: float) -> Any:
    """Complex soft threshold ``c * max(|c| - thresh, 0) / |c|`` (prox of ``thresh |.|_1``)."""
    xp = get_array_module(c)
    mag = xp.abs(c)
    return c * (xp.maximum(mag - thresh, 0) / xp.where(mag > 0, mag, 1))


class L1WaveletProx:
    """Prox of ``thresh ||W x||_1`` for an orthonormal wavelet ``W``, approximation band free.

    ``W^H soft(W x, thresh)`` on the detail bands. With ``random_shift`` the wavelet grid
    is shifted cyclically by a seeded random offset (below ``2**levels``) at every call,
    as BART ``pics`` does, which removes the blockiness of a fixed decimated transform.

    Parameters
    ----------
    wavelet : Wavelet
    thresh : float
        Absolute threshold (``step`` times the absolute weight).
    random_shift : bool
    seed : int
    """

    def __init__(self, wavelet: Wavelet, thresh: float, *, random_shift: bool = True,
                 seed: int = 0) -> None:
        self.wavelet = wavelet
        self.thresh = float(thresh)
        self.random_shift = random_shift
        self.rng = np.random.default_rng(seed)
        self._detail: dict[Any, Any] = {}

    def __call__(self, v: Any) -> Any:
        xp = get_array_module(v)
        detail = self._detail.get(xp)
        if detail is None:
            detail = self._detail[xp] = xp.asarray(self.wavelet.detail_mask())
        axes = tuple(range(v.ndim))
        block = 2**self.wavelet.levels
        if self.random_shift:
            shift = tuple(int(s) for s in self.rng.integers(0, block, size=len(axes)))
        else:
            shift = (0,) * len(axes)
        c = self.wavelet.apply(xp.roll(v, shift, axis=axes) if any(shift) else v)
        c = xp.where(detail, soft_threshold(c, self.thresh), c)
        x = self.wavelet.H.apply(c)
        return xp.roll(x, tuple(-s for s in shift), axis=axes) if any(shift) else x


class TVProx:
    """Prox of ``thresh TV(x)`` (isotropic, periodic forward differences) by FGP.

    Fast gradient projection on the dual (Beck & Teboulle 2009, TV denoising), ``n_inner``
    iterations per call, the dual variable warm-started from the previous call (so a few
    inner iterations per outer FISTA iteration suffice).

    Parameters
    ----------
    shape : sequence of int
        Image shape; axes of length 1 are not differentiated.
    thresh : float
        Absolute weight (``step`` times the absolute TV weight).
    n_inner : int
        FGP iterations per call.
    """

    def __init__(self, shape, thresh: float, *, n_inner: int = 10) -> None:
        self.d = FiniteDifference(shape)
        self.thresh = float(thresh)
        self.n_inner = int(n_inner)
        self.p = None

    def __call__(self, v: Any) -> Any:
        lam = self.thresh
        if lam <= 0:
            return v
        xp = get_array_module(v)
        d = self.d
        p = xp.zeros(d.oshape, dtype=v.dtype) if self.p is None else self.p
        step = np.float32(1.0 / (d.norm_bound() * lam))
        r, t = p, 1.0
        for _ in range(self.n_inner):
            q = r + d._apply(v - lam * d._adjoint(r)) * step
            norm = xp.sqrt(xp.sum(xp.abs(q) ** 2, axis=0, keepdims=True))
            p_new = q / xp.maximum(norm, 1.0)
            t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
            r = p_new + np.float32((t - 1) / t_new) * (p_new - p)
            p, t = p_new, t_new
        self.p = p
        return v - lam * d._adjoint(p)
