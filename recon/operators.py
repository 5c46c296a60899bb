"""Linear operators of MR reconstruction, with adjoints and normal operators (NumPy or CuPy).

Every reconstruction (:mod:`mrharmony.recon.parallel`, :mod:`mrharmony.recon.noncartesian`)
is built from these operators and the two solvers of :mod:`mrharmony.recon.algorithms`
(operator -> algorithm -> application, as in SigPy's ``linop``/``alg``/``app``).

A :class:`Linop` maps arrays of shape ``ishape`` to arrays of shape ``oshape``:

- ``A(x)`` / ``A.apply(x)``: the forward operator;
- ``A.H``: the adjoint (conjugate transpose), itself a :class:`Linop`;
- ``A.N`` / ``A.normal()``: the normal operator ``A^H A``; operators that have a cheaper
  form than ``A.H @ A`` provide it (the NUFFT: a Toeplitz embedding on a 2x grid; a
  unitary FFT: the identity; a diagonal: ``|d|^2``), and a composition uses the normal
  operator of its outermost factor: ``(B @ C).N = C.H @ B.N @ C``;
- ``A @ B``: composition (apply ``B`` first); ``A @ x`` with an array applies ``A``.

Operators run on whatever array module owns their input
(:func:`mrharmony.backend.get_array_module`); arrays they hold (maps, masks, weights) are
moved to that module on first use. The wavelet transform runs in PyWavelets on the host
(CuPy input is copied there and back). Sign and scale conventions: the centred unitary FFT
of :mod:`mrharmony.recon.cartesian` and the orthonormal NUFFT of :mod:`mrharmony.recon.nufft`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mrharmony.backend import get_array_module, to_numpy
from mrharmony.errors import ReconError

__all__ = [
    "DEFAULT_WAVELET",
    "FFT",
    "Compose",
    "FiniteDifference",
    "Identity",
    "Linop",
    "Multiply",
    "NUFFTOp",
    "Sense",
    "Wavelet",
    "cartesian_sense",
    "nufft_sense",
    "power_norm",
]


#: The one wavelet of every L1-wavelet reconstruction. db2 measured best of db2/db4:
#: Cartesian 128^2, 8 coils, R=2, 50 FISTA iterations, NRMSE 0.0056 (db4 0.0087);
#: radial 64^2, 4 coils, 48 spokes, 20 iterations, 0.0071 (db4 0.0057, both below the
#: 0.011 of the former db4 implementation) -- benchmarks/bench_recon.py, the recon tests.
DEFAULT_WAVELET = "db2"


def _on(xp, a):
    """``a`` as an array of module ``xp`` (no copy when it already is one)."""
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)


class Linop:
    """A linear operator ``ishape -> oshape`` (subclasses define ``_apply`` and ``_adjoint``).

    Parameters
    ----------
    ishape, oshape : sequence of int
        Input and output array shapes.
    """

    def __init__(self, ishape: Sequence[int], oshape: Sequence[int]) -> None:
        self.ishape = tuple(int(n) for n in ishape)
        self.oshape = tuple(int(n) for n in oshape)

    # -- what subclasses implement
    def _apply(self, x: Any) -> Any:
        raise NotImplementedError

    def _adjoint(self, y: Any) -> Any:
        raise NotImplementedError

    def _normal(self) -> Linop:
        return Compose([self.H, self])

    # -- public interface
    def apply(self, x: Any) -> Any:
        """Apply the operator to ``x`` of shape :attr:`ishape`."""
        if tuple(x.shape) != self.ishape:
            raise ReconError(f"{self!r}: input shape {tuple(x.shape)}, expected {self.ishape}")
        return self._apply(x)

    __call__ = apply

    @property
    def H(self) -> Linop:
        """The adjoint operator ``A^H``."""
        return _Adjoint(self)

    def normal(self) -> Linop:
        """The normal operator ``A^H A`` (its cheapest known form)."""
        return self._normal()

    @property
    def N(self) -> Linop:
        """Same as :meth:`normal`."""
        return self.normal()

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, Linop):
            return Compose([self, other])
        return self.apply(other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.ishape} -> {self.oshape})"


class _Adjoint(Linop):
    def __init__(self, op: Linop) -> None:
        super().__init__(op.oshape, op.ishape)
        self.op = op

    def _apply(self, x):
        return self.op._adjoint(x)

    def _adjoint(self, y):
        return self.op._apply(y)

    @property
    def H(self) -> Linop:
        return self.op

    def __repr__(self) -> str:
        return f"{self.op!r}.H"


class Compose(Linop):
    """``ops[0] @ ops[1] @ ... @ ops[-1]`` (the last is applied first).

    Parameters
    ----------
    ops : sequence of Linop
        Factors; each one's ``ishape`` must equal the next one's ``oshape``.
    """

    def __init__(self, ops: Sequence[Linop]) -> None:
        flat: list[Linop] = []
        for op in ops:
            flat += op.ops if isinstance(op, Compose) else [op]
        for outer, inner in itertools.pairwise(flat):
            if outer.ishape != inner.oshape:
                raise ReconError(f"compose: {outer!r} cannot follow {inner!r}")
        super().__init__(flat[-1].ishape, flat[0].oshape)
        self.ops = flat

    def _apply(self, x):
        for op in reversed(self.ops):
            x = op._apply(x)
        return x

    def _adjoint(self, y):
        for op in self.ops:
            y = op._adjoint(y)
        return y

    def _normal(self) -> Linop:
        inner = self.ops[1:]
        outer_n = self.ops[0].normal()
        if not inner:
            return outer_n
        rest = Compose(inner)
        return Compose([rest.H, outer_n, rest])

    def __repr__(self) -> str:
        return " @ ".join(repr(op) for op in self.ops)


class Identity(Linop):
    """``x -> x`` on ``shape``."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__(shape, shape)

    def _apply(self, x):
        return x

    _adjoint = _apply

    def _normal(self) -> Linop:
        return self


class Multiply(Linop):
    """Pointwise multiplication by ``mult`` (broadcast to ``shape``): masks, weights.

    Parameters
    ----------
    shape : sequence of int
        Array shape (input = output).
    mult : array
        Broadcastable to ``shape``; real (a sampling mask or density weights) or complex.
    """

    def __init__(self, shape: Sequence[int], mult: Any) -> None:
        try:
            np.broadcast_shapes(tuple(mult.shape), tuple(shape))
        except ValueError as exc:
            raise ReconError(f"Multiply: {tuple(mult.shape)} does not broadcast to "
                             f"{tuple(shape)}") from exc
        super().__init__(shape, shape)
        self.mult = mult
        self._cache: dict[Any, tuple[Any, Any]] = {}

    def _get(self, x):
        xp = get_array_module(x)
        got = self._cache.get(xp)
        if got is None:
            m = _on(xp, self.mult)
            got = (m, xp.conj(m) if xp.iscomplexobj(m) else m)
            self._cache[xp] = got
        return got

    def _apply(self, x):
        return x * self._get(x)[0]

    def _adjoint(self, y):
        return y * self._get(y)[1]

    def _normal(self) -> Linop:
        xp = get_array_module(self.mult)
        return Multiply(self.ishape, xp.abs(self.mult) ** 2)


class FFT(Linop):
    """Centred unitary FFT over ``axes`` (image -> k-space), :func:`recon.cartesian.fft_c`.

    Parameters
    ----------
    shape : sequence of int
    axes : sequence of int, optional
        Transformed axes (default: all).
    """

    def __init__(self, shape: Sequence[int], axes: Sequence[int] | None = None) -> None:
        super().__init__(shape, shape)
        nd = len(self.ishape)
        self.axes = tuple(range(nd)) if axes is None else tuple(a % nd for a in axes)

    def _apply(self, x):
        from mrharmony.recon.cartesian import fft_c

        return fft_c(x, axes=self.axes)

    def _adjoint(self, y):
        from mrharmony.recon.cartesian import ifft_c

        return ifft_c(y, axes=self.axes)

    def _normal(self) -> Linop:
        return Identity(self.ishape)


class Sense(Linop):
    """Coil sensitivities: image ``spatial`` -> coil images ``(coils, *spatial)``.

    Forward ``x -> maps * x``; adjoint ``y -> sum_c conj(maps_c) y_c``.

    Parameters
    ----------
    maps : array
        complex ``(coils, *spatial)``.
    """

    def __init__(self, maps: Any) -> None:
        super().__init__(maps.shape[1:], maps.shape)
        self.maps = maps
        self._cache: dict[Any, tuple[Any, Any]] = {}

    def _get(self, x):
        xp = get_array_module(x)
        got = self._cache.get(xp)
        if got is None:
            m = _on(xp, self.maps)
            got = (m, xp.conj(m))
            self._cache[xp] = got
        return got

    def _apply(self, x):
        return self._get(x)[0] * x[None]

    def _adjoint(self, y):
        xp = get_array_module(y)
        return xp.sum(self._get(y)[1] * y, axis=0)

    def norm_bound(self) -> float:
        """``max_r sum_c |S_c(r)|^2``: the operator norm squared (exact)."""
        xp = get_array_module(self.maps)
        return float(to_numpy(xp.max(xp.sum(xp.abs(self.maps) ** 2, axis=0))))


class NUFFTOp(Linop):
    """The orthonormal NUFFT of :mod:`mrharmony.recon.nufft`, optionally density-weighted.

    Forward ``x -> sqrt(w) * NUFFT(x)`` over the last ``ndim`` axes (leading axes, e.g.
    coils, are transformed together); with weights ``w`` the least-squares problem
    ``||A x - sqrt(w) y||^2`` is the density-compensated one of Pruessmann et al. 2001.
    The normal operator ``A^H W A`` is the Toeplitz embedding
    (:meth:`~mrharmony.recon.nufft.NUFFT.toeplitz_kernel`), one FFT pair on a 2x grid.

    Parameters
    ----------
    nufft : mrharmony.recon.nufft.NUFFT
        Planned operator (its ``shape`` is the image shape).
    batch : sequence of int
        Leading axes of the input (e.g. ``(n_coils,)``).
    weights : array, shape (M,), optional
        Non-negative sample weights ``w``; default ones.
    kernel_dtype : numpy dtype, optional
        dtype of the Toeplitz kernel (default: that of the NUFFT).
    """

    def __init__(self, nufft: Any, batch: Sequence[int] = (), weights: Any = None,
                 *, kernel_dtype: Any = None) -> None:
        batch = tuple(int(n) for n in batch)
        super().__init__((*batch, *nufft.shape), (*batch, nufft.n_samples))
        self.nufft = nufft
        xp = nufft.xp
        if weights is not None and tuple(weights.shape) != (nufft.n_samples,):
            raise ReconError(f"weights: expected shape ({nufft.n_samples},), got "
                             f"{tuple(weights.shape)}")
        self.weights = weights
        self.sqrt_w = None if weights is None else xp.sqrt(xp.asarray(weights))
        self.kernel_dtype = kernel_dtype
        self._kernel = None

    def _apply(self, x):
        y = self.nufft.forward(x)
        return y if self.sqrt_w is None else y * self.sqrt_w

    def _adjoint(self, y):
        if self.sqrt_w is not None:
            y = y * self.sqrt_w
        return self.nufft.adjoint(y)

    def _normal(self) -> Linop:
        if self._kernel is None:
            k = self.nufft.toeplitz_kernel(self.weights)
            self._kernel = k if self.kernel_dtype is None else k.astype(self.kernel_dtype)
        return _Toeplitz(self.nufft, self.ishape, self._kernel)


class _Toeplitz(Linop):
    """``A^H W A`` of a NUFFT through its Toeplitz kernel (self-adjoint)."""

    def __init__(self, nufft: Any, shape: Sequence[int], kernel: Any) -> None:
        super().__init__(shape, shape)
        self.nufft = nufft
        self.kernel = kernel

    def _apply(self, x):
        return self.nufft.normal_toeplitz(x, self.kernel)

    _adjoint = _apply

    def _normal(self) -> Linop:
        return Compose([self, self])


class Wavelet(Linop):
    """Orthonormal periodic Daubechies wavelet transform (PyWavelets, ``db2`` by default).

    ``pywt.wavedecn`` in ``periodization`` mode over the axes longer than 1, with the
    number of levels limited so that every transformed axis is divisible by
    ``2**levels`` (and at most PyWavelets' ``dwt_max_level``): the transform is then an
    orthogonal matrix, its adjoint is its inverse, and the proximal operator of
    ``||W x||_1`` is exact. Coefficients are packed into an array of the input shape
    (``pywt.coeffs_to_array``; approximation band in the low corner). Runs on the host;
    CuPy input is copied there and back.

    Parameters
    ----------
    shape : sequence of int
        Image shape.
    levels : int
        Maximum decomposition levels.
    wavelet : str
        PyWavelets name of an orthogonal wavelet (``db4``, ``db2``, ``haar``, ``sym4`` ...).
    """

    def __init__(self, shape: Sequence[int], *, levels: int = 4,
                 wavelet: str = DEFAULT_WAVELET) -> None:
        import pywt

        super().__init__(shape, shape)
        w = pywt.Wavelet(wavelet)
        if not w.orthogonal:
            raise ReconError(f"Wavelet: {wavelet!r} is not orthogonal")
        self.wavelet = wavelet
        self.axes = tuple(i for i, n in enumerate(self.ishape) if n > 1)
        lev = int(levels)
        for i in self.axes:
            n = self.ishape[i]
            lev = min(lev, (n & -n).bit_length() - 1, pywt.dwt_max_level(n, w.dec_len))
        self.levels = max(lev, 0)
        self._slices = None
        if self.levels and self.axes:  # the coefficient layout depends on the shape only
            zeros = np.zeros(self.ishape, np.float32)
            self._slices = pywt.coeffs_to_array(pywt.wavedecn(
                zeros, wavelet, mode="periodization", level=self.levels, axes=self.axes),
                axes=self.axes)[1]

    def _apply(self, x):
        import pywt

        if self.levels == 0 or not self.axes:
            return x
        xp = get_array_module(x)
        coeffs = pywt.wavedecn(to_numpy(x), self.wavelet, mode="periodization",
                               level=self.levels, axes=self.axes)
        arr = pywt.coeffs_to_array(coeffs, axes=self.axes)[0]
        return _on(xp, arr.astype(x.dtype, copy=False))

    def _adjoint(self, c):
        import pywt

        if self.levels == 0 or not self.axes:
            return c
        xp = get_array_module(c)
        coeffs = pywt.array_to_coeffs(to_numpy(c), self._slices, output_format="wavedecn")
        x = pywt.waverecn(coeffs, self.wavelet, mode="periodization", axes=self.axes)
        return _on(xp, x.astype(c.dtype, copy=False))

    def _normal(self) -> Linop:
        return Identity(self.ishape)

    def detail_mask(self) -> np.ndarray:
        """bool ``shape``, False on the coarsest approximation band (left unpenalised)."""
        m = np.ones(self.ishape, dtype=bool)
        m[tuple(slice(0, n >> self.levels) if i in self.axes else slice(None)
                for i, n in enumerate(self.ishape))] = False
        return m

    # The transform as the old methods of parallel.Wavelet (kept for callers).
    def forward(self, x):
        """Wavelet coefficients (same shape as ``x``)."""
        return self.apply(x)

    def adjoint(self, c):
        """Inverse (= adjoint) transform."""
        return self.H.apply(c)


class FiniteDifference(Linop):
    """Periodic forward differences along ``axes``: ``shape -> (len(axes), *shape)``.

    ``(D x)_a = roll(x, -1, a) - x``; ``||D||^2 <= 4 len(axes)``; ``-D^H`` is the
    divergence used by the TV proximal operator.
    """

    def __init__(self, shape: Sequence[int], axes: Sequence[int] | None = None) -> None:
        shape = tuple(int(n) for n in shape)
        self.axes = tuple(i for i, n in enumerate(shape) if n > 1) if axes is None else (
            tuple(int(a) % len(shape) for a in axes))
        super().__init__(shape, (len(self.axes), *shape))

    def _apply(self, x):
        xp = get_array_module(x)
        return xp.stack([xp.roll(x, -1, axis=a) - x for a in self.axes])

    def _adjoint(self, p):
        xp = get_array_module(p)
        return sum(xp.roll(p[i], 1, axis=a) - p[i] for i, a in enumerate(self.axes))

    def norm_bound(self) -> float:
        """Upper bound of ``||D||^2``."""
        return 4.0 * len(self.axes)


def cartesian_sense(maps: Any, mask: Any) -> Linop:
    """``A = M F S``: coil maps, centred unitary FFT over the spatial axes, sampling mask.

    Parameters
    ----------
    maps : array
        complex ``(coils, *spatial)``.
    mask : array
        Sampling mask (bool or real weights) broadcastable to ``spatial``.

    Returns
    -------
    Linop
        ``spatial -> (coils, *spatial)``; ``A.N = S^H F^H |M|^2 F S``.
    """
    shape = tuple(maps.shape)
    try:
        np.broadcast_shapes(tuple(mask.shape), shape[1:])
    except ValueError as exc:
        raise ReconError(f"SENSE: mask {tuple(mask.shape)} does not broadcast to "
                         f"{shape[1:]}") from exc
    xp = get_array_module(maps)
    m = xp.asarray(mask).astype(np.float32 if maps.dtype == np.complex64 else np.float64)
    axes = tuple(range(1, len(shape)))
    return Multiply(shape, m) @ FFT(shape, axes) @ Sense(maps)


def nufft_sense(nufft: Any, maps: Any, weights: Any = None, *, kernel_dtype: Any = None
                ) -> Linop:
    """``A = W^(1/2) NUFFT S`` for non-Cartesian SENSE (Toeplitz normal operator).

    Parameters
    ----------
    nufft : mrharmony.recon.nufft.NUFFT
    maps : array
        complex ``(coils, *nufft.shape)``.
    weights : array, shape (M,), optional
        Density compensation (data-consistency weights).
    kernel_dtype : numpy dtype, optional
        dtype of the Toeplitz kernel.
    """
    if tuple(maps.shape[1:]) != tuple(nufft.shape):
        raise ReconError(f"sens: expected shape (coils, {', '.join(map(str, nufft.shape))}), "
                         f"got {tuple(maps.shape)}")
    return NUFFTOp(nufft, (maps.shape[0],), weights, kernel_dtype=kernel_dtype) @ Sense(maps)


def power_norm(op: Linop, *, n_iter: int = 15, seed: int = 0, dtype: Any = np.complex64,
               xp: Any = np) -> float:
    """Largest eigenvalue of ``op.N`` (``||A||^2``) by power iteration (seeded).

    Parameters
    ----------
    op : Linop
    n_iter : int
        Iterations.
    seed : int
        Seed of the random start vector.
    dtype : numpy dtype
        Vector dtype.
    xp : module
        numpy or cupy.
    """
    normal = op.normal()
    rng = np.random.default_rng(seed)
    v = xp.asarray((rng.standard_normal(op.ishape) + 1j * rng.standard_normal(op.ishape))
                   .astype(dtype))
    v /= float(xp.linalg.norm(v))
    lam = 0.0
    for _ in range(int(n_iter)):
        v = normal(v)
        lam = float(xp.linalg.norm(v))
        if lam == 0 or not math.isfinite(lam):
            break
        v /= lam
    return lam
