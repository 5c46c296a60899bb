"""Non-uniform FFT on NumPy (finufft) and CuPy (SigPy), with one scale convention.

Conventions
-----------
Coordinates ``coords`` have shape ``(M, ndim)`` and are in **cycles per FOV**: sample
``j`` sits at ``k_j * FOV`` along each axis, so a fully sampled Cartesian grid of size
``N`` covers ``[-N/2, N/2)`` in steps of 1 (the SigPy convention). Coordinate column
``d`` belongs to image axis ``d`` (the last ``ndim`` axes of an image array). The image
centre is index ``N // 2`` of each axis, the FFT convention of the sequence library.

The forward operator (image to k-space) is

    y_j = (prod N)^(-1/2) * sum_n x[n] * exp(-2i pi k_j . (n - N//2) / N)

and :func:`nufft_adjoint` is its exact adjoint (conjugate transpose). This is the
**orthonormal** scale: on a full Cartesian grid the forward operator equals the
``norm="ortho"`` centred FFT, so adjoint(forward(x)) == x there.

- SigPy (``sigpy.nufft`` / ``sigpy.nufft_adjoint``) uses the same coordinates and the
  same scale: our results equal SigPy's up to its interpolation error (about 1e-3 with
  its default Kaiser–Bessel kernel, ``oversamp=1.25, width=4``).
- finufft (``nufft2d1`` / ``nufft2d2``) takes coordinates in radians,
  ``x = 2 pi k / N``, and applies no normalisation: ours = finufft / sqrt(prod N)
  (type 2 with ``isign=-1`` for the forward, type 1 with ``isign=+1`` for the adjoint,
  ``modeord=0``).

On the CPU the operator calls finufft through planned transforms (points set once, reused
for every coil and every iteration of an iterative recon); on a GPU (CuPy input) it uses
SigPy's Kaiser–Bessel gridding. :class:`NUFFT` also offers a Toeplitz normal operator
``A^H W A`` (one FFT pair on a 2x grid per application), which is what CG-SENSE uses.

Precision: complex128 on the CPU by default. ``dtype=np.complex64`` halves memory but is
not faster on the CPU in our measurements (finufft's single-precision kernel is no
cheaper at ``eps`` near 1e-6, and cannot go much below 1e-5 relative error); the Toeplitz
normal operator is where complex64 pays (twice as fast FFTs), and CG-SENSE uses it there.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from mrharmony.backend import get_array_module, to_numpy
from mrharmony.errors import ReconError
from mrharmony.recon.dcf import density_compensation

__all__ = [
    "NUFFT",
    "density_compensation",
    "nufft_adjoint",
    "nufft_forward",
]


def _default_threads() -> int:
    """Threads for finufft: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def _check_coords(coords: Any, shape: Sequence[int]) -> tuple[int, ...]:
    """Validate ``coords`` against an image ``shape``; return the shape as ints."""
    shape = tuple(int(n) for n in shape)
    if coords.ndim != 2 or coords.shape[1] != len(shape) or coords.shape[0] == 0:
        raise ReconError(
            f"coords: expected shape (M, {len(shape)}) with M > 0 for a "
            f"{len(shape)}-D image {shape}, got {tuple(coords.shape)}"
        )
    if len(shape) not in (1, 2, 3) or min(shape) < 1:
        raise ReconError(f"shape: expected 1 to 3 positive sizes, got {shape}")
    xp = get_array_module(coords)
    if not bool(xp.all(xp.isfinite(coords))):
        raise ReconError("coords: contains NaN or infinite values")
    half = np.asarray(shape, dtype=float) / 2
    kmax = to_numpy(xp.max(xp.abs(coords), axis=0)).astype(float)
    bad = np.flatnonzero(kmax > half * 1.5 + 1)
    if bad.size:
        d = int(bad[0])
        raise ReconError(
            f"coords: axis {d} reaches |k| = {kmax[d]:.4g} cycles/FOV, far beyond the "
            f"+-{half[d]:g} of a {shape[d]}-point grid (coordinates must be in cycles per "
            "FOV, not radians or 1/m)"
        )
    return shape


class NUFFT:
    """A planned NUFFT operator for one trajectory and image shape.

    Parameters
    ----------
    coords : ndarray, shape (M, ndim)
        Sample positions in cycles per FOV (see the module docstring).
    shape : sequence of int
        Image shape ``(N0[, N1[, N2]])``.
    eps : float
        Requested relative accuracy of the CPU transform (finufft tolerance).
    n_threads : int, optional
        finufft threads; default all CPUs available to this process.
    dtype : numpy dtype
        ``np.complex128`` (default) or ``np.complex64`` for the CPU transforms.

    Notes
    -----
    Inputs of :meth:`forward` have shape ``(..., *shape)`` and outputs ``(..., M)``;
    leading axes (coils, frames) are transformed together (finufft ``n_trans``). The
    operator is on the CPU when ``coords`` is a NumPy array and on the GPU (SigPy) when it
    is a CuPy array.
    """

    def __init__(
        self,
        coords: Any,
        shape: Sequence[int],
        *,
        eps: float = 1e-6,
        n_threads: int | None = None,
        dtype: Any = np.complex128,
    ) -> None:
        self.xp = get_array_module(coords)
        self.shape = _check_coords(coords, shape)
        if not 1e-15 <= eps < 1:
            raise ReconError(f"eps: expected a tolerance in [1e-15, 1), got {eps}")
        self.coords = coords
        self.eps = float(eps)
        self.ndim = len(self.shape)
        self.n_samples = int(coords.shape[0])
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.complex64, np.complex128):
            raise ReconError(f"dtype: expected complex64 or complex128, got {self.dtype}")
        self.n_threads = int(n_threads) if n_threads else _default_threads()
        self.scale = 1.0 / math.sqrt(math.prod(self.shape))
        self._plans: dict[tuple[int, int], Any] = {}
        self._toeplitz_kernel: Any = None
        self._toeplitz_weights_id: int | None = None
        if self.xp is np:
            real = np.float64 if self.dtype == np.complex128 else np.float32
            n = np.asarray(self.shape, dtype=np.float64)
            # finufft points in radians, one contiguous array per axis.
            self._points = [
                np.ascontiguousarray(2 * np.pi * np.asarray(coords[:, d], np.float64) / n[d],
                                     dtype=real)
                for d in range(self.ndim)
            ]

    # ------------------------------------------------------------------ CPU plans
    def _plan(self, nufft_type: int, n_trans: int) -> Any:
        key = (nufft_type, n_trans)
        plan = self._plans.get(key)
        if plan is None:
            import finufft

            plan = finufft.Plan(
                nufft_type,
                self.shape,
                n_trans=n_trans,
                eps=self.eps,
                isign=-1 if nufft_type == 2 else 1,
                dtype=self.dtype.name,
                nthreads=self.n_threads,
                modeord=0,
            )
            plan.setpts(*self._points)
            self._plans[key] = plan
        return plan

    def _check_image(self, image: Any) -> tuple[int, ...]:
        if tuple(image.shape[image.ndim - self.ndim:]) != self.shape or image.ndim < self.ndim:
            raise ReconError(
                f"image: expected shape (..., {', '.join(map(str, self.shape))}), "
                f"got {tuple(image.shape)}"
            )
        return tuple(image.shape[: image.ndim - self.ndim])

    def _check_data(self, data: Any) -> tuple[int, ...]:
        if data.ndim < 1 or data.shape[-1] != self.n_samples:
            raise ReconError(
                f"data: expected shape (..., {self.n_samples}) for {self.n_samples} "
                f"trajectory samples, got {tuple(data.shape)}"
            )
        return tuple(data.shape[:-1])

    # ------------------------------------------------------------------ operators
    def forward(self, image: Any) -> Any:
        """Image ``(..., *shape)`` to k-space samples ``(..., M)`` (orthonormal scale)."""
        batch = self._check_image(image)
        if self.xp is not np:
            import sigpy

            return sigpy.nufft(image, self.coords)
        n_trans = math.prod(batch)
        x = np.ascontiguousarray(image, dtype=self.dtype).reshape((n_trans, *self.shape))
        if n_trans == 1:
            x = x[0]
        y = self._plan(2, n_trans).execute(x)
        y *= self.scale
        return y.reshape((*batch, self.n_samples))

    def adjoint(self, data: Any) -> Any:
        """k-space samples ``(..., M)`` to image ``(..., *shape)`` (exact adjoint)."""
        batch = self._check_data(data)
        if self.xp is not np:
            import sigpy

            return sigpy.nufft_adjoint(data, self.coords, (*batch, *self.shape))
        n_trans = math.prod(batch)
        c = np.ascontiguousarray(data, dtype=self.dtype).reshape((n_trans, self.n_samples))
        if n_trans == 1:
            c = c[0]
        x = self._plan(1, n_trans).execute(c)
        x *= self.scale
        return x.reshape((*batch, *self.shape))

    def toeplitz_kernel(self, weights: Any = None) -> Any:
        """FFT of the point-spread function of ``A^H diag(weights) A`` on a 2x grid.

        Parameters
        ----------
        weights : ndarray, shape (M,), optional
            Real non-negative sample weights (density compensation); default ones.

        Returns
        -------
        ndarray, shape (2 * N0, 2 * N1, ...)
            Complex kernel ``K`` such that ``A^H W A x = crop(ifftn(K * fftn(pad(x))))``
            with zero padding at the end of every axis.
        """
        xp = self.xp
        w = xp.ones(self.n_samples) if weights is None else xp.asarray(weights)
        if w.shape != (self.n_samples,):
            raise ReconError(f"weights: expected shape ({self.n_samples},), got {w.shape}")
        big = tuple(2 * n for n in self.shape)
        if xp is np:
            import finufft

            plan = finufft.Plan(
                1, big, n_trans=1, eps=min(self.eps, 1e-7), isign=1, dtype="complex128",
                nthreads=self.n_threads, modeord=1,
            )
            plan.setpts(*[p.astype(np.float64) for p in self._points])
            psf = plan.execute(np.ascontiguousarray(w, dtype=np.complex128))
        else:
            import sigpy

            # SigPy scales by 1/sqrt(prod big); undo it, then order modes FFT-style.
            coords2 = self.coords * 2  # same physical k on a grid twice as fine
            psf = sigpy.nufft_adjoint(w.astype(xp.complex128), coords2, big, oversamp=2.0,
                                      width=6) * math.sqrt(math.prod(big))
            psf = xp.fft.ifftshift(psf)
        # psf[m] = sum_j w_j exp(+2i pi k_j . m / N) with m in FFT order on the 2N grid.
        kernel = xp.fft.fftn(psf) * (self.scale**2)
        return kernel.astype(np.complex64 if self.dtype == np.complex64 else np.complex128)

    def normal_toeplitz(self, image: Any, kernel: Any) -> Any:
        """Apply ``A^H W A`` through a kernel from :meth:`toeplitz_kernel`.

        On the CPU the FFTs run in ``scipy.fft`` with ``n_threads`` workers and keep
        complex64 input in complex64.
        """
        xp = get_array_module(image)
        self._check_image(image)
        axes = tuple(range(image.ndim - self.ndim, image.ndim))
        big = tuple(2 * n for n in self.shape)
        index = (Ellipsis, *[slice(0, n) for n in self.shape])
        if xp is np:
            import scipy.fft as sfft

            spec = sfft.fftn(image, s=big, axes=axes, workers=self.n_threads)
            spec *= kernel
            return sfft.ifftn(spec, axes=axes, workers=self.n_threads, overwrite_x=True)[index]
        spec = xp.fft.fftn(image, s=big, axes=axes)
        spec *= kernel
        return xp.fft.ifftn(spec, axes=axes)[index]


def nufft_forward(
    image: Any, coords: Any, *, eps: float = 1e-6, n_threads: int | None = None
) -> Any:
    """Non-uniform forward transform, image to k-space (orthonormal scale).

    Parameters
    ----------
    image : ndarray, shape (..., N0[, N1[, N2]])
        Complex image(s); the last ``coords.shape[1]`` axes are transformed.
    coords : ndarray, shape (M, ndim)
        Sample positions in cycles per FOV, range ``[-N/2, N/2)`` (SigPy convention).
    eps : float
        finufft tolerance (CPU only).
    n_threads : int, optional
        finufft threads (CPU only).

    Returns
    -------
    ndarray, shape (..., M)
        complex128 on the CPU (NumPy input), complex64 on the GPU (CuPy input).

    Raises
    ------
    ReconError
        If the shapes disagree or the coordinates are not in cycles per FOV.

    Examples
    --------
    >>> import numpy as np
    >>> img = np.zeros((8, 8), complex); img[4, 4] = 1
    >>> y = nufft_forward(img, np.array([[0.0, 0.0], [1.5, -2.0]]))
    >>> bool(np.allclose(y, 1 / 8))
    True
    """
    ndim = int(coords.shape[-1]) if getattr(coords, "ndim", 0) == 2 else 0
    if ndim == 0 or image.ndim < ndim:
        raise ReconError(
            f"coords: expected shape (M, ndim) with ndim <= image.ndim, got "
            f"{tuple(getattr(coords, 'shape', ()))} for an image {tuple(image.shape)}"
        )
    op = NUFFT(coords, image.shape[image.ndim - ndim:], eps=eps, n_threads=n_threads)
    return op.forward(image)


def nufft_adjoint(
    data: Any,
    coords: Any,
    shape: Sequence[int],
    *,
    eps: float = 1e-6,
    n_threads: int | None = None,
) -> Any:
    """Adjoint non-uniform transform, k-space samples to image (orthonormal scale).

    Parameters
    ----------
    data : ndarray, shape (..., M)
        k-space samples (apply density compensation first for a gridding image).
    coords : ndarray, shape (M, ndim)
        Sample positions in cycles per FOV, range ``[-N/2, N/2)``.
    shape : sequence of int
        Image shape ``(N0[, N1[, N2]])``; ``len(shape) == ndim``.
    eps : float
        finufft tolerance (CPU only).
    n_threads : int, optional
        finufft threads (CPU only).

    Returns
    -------
    ndarray, shape (..., *shape)

    Raises
    ------
    ReconError
        If the shapes disagree or the coordinates are not in cycles per FOV.
    """
    op = NUFFT(coords, shape, eps=eps, n_threads=n_threads)
    return op.adjoint(data)
