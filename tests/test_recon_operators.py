"""One property test for every reconstruction operator, and the two solvers.

For every operator of :mod:`mrharmony.recon.operators` in :data:`REGISTRY` (single ones
and the composed SENSE / NUFFT-SENSE forward models the recons use), on every backend
present (CuPy skipped when absent), in complex64 and complex128:

- adjointness ``<A x, y> = <x, A^H y>``: ``|<A x, y> - <x, A^H y>| / (||A x|| ||y||)``
  below 1e-5 (complex64) / 1e-10 (complex128);
- linearity ``A(a x + b z) = a A x + b A z`` to the same relative tolerance;
- the normal operator ``A.N`` (Toeplitz for the NUFFT, identity for unitary ones)
  equals ``A^H A`` applied in two steps.
"""

from __future__ import annotations

import numpy as np
import pytest

from mrharmony.backend import cupy_available
from mrharmony.errors import ReconError
from mrharmony.recon.algorithms import (
    L1WaveletProx,
    TVProx,
    conjugate_gradient,
    fista,
    soft_threshold,
)
from mrharmony.recon.nufft import NUFFT
from mrharmony.recon.operators import (
    FFT,
    FiniteDifference,
    Identity,
    Multiply,
    NUFFTOp,
    Sense,
    Wavelet,
    cartesian_sense,
    nufft_sense,
    power_norm,
)

REAL = {np.complex64: np.float32, np.complex128: np.float64}
TOL = {np.complex64: 1e-5, np.complex128: 1e-10}
# A.N vs A^H A: the Toeplitz kernel of a NUFFT is computed to eps; everything else is
# exact to rounding.
TOL_NORMAL = {np.complex64: 1e-4, np.complex128: 1e-9}


def _cplx(rng, shape, dtype):
    return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)


def _maps(rng, nc, shape, dtype):
    m = _cplx(rng, (nc, *shape), dtype)
    return (m / np.sqrt(np.sum(np.abs(m) ** 2, axis=0))).astype(dtype)


def _nufft(rng, xp, shape, dtype, m=300):
    half = np.asarray(shape) / 2
    coords = rng.uniform(-half, half, (m, len(shape)))
    eps = 1e-6 if dtype == np.complex64 else 1e-12
    return NUFFT(xp.asarray(coords), shape, eps=eps, dtype=dtype)


def _weights(rng, m):
    return rng.uniform(0.5, 2.0, m)


# name -> factory(rng, xp, dtype) -> Linop
REGISTRY = {
    "identity": lambda rng, xp, dt: Identity((5, 7)),
    "multiply (mask)": lambda rng, xp, dt: Multiply(
        (3, 8, 6), xp.asarray((rng.uniform(size=(1, 6)) > 0.5).astype(REAL[dt]))),
    "multiply (complex)": lambda rng, xp, dt: Multiply((8, 6), xp.asarray(_cplx(rng, (8, 6),
                                                                               dt))),
    "fft 2-D": lambda rng, xp, dt: FFT((12, 10)),
    "fft over axes": lambda rng, xp, dt: FFT((3, 8, 6), axes=(1, 2)),
    "sense (coil maps)": lambda rng, xp, dt: Sense(xp.asarray(_maps(rng, 4, (12, 10), dt))),
    "finite differences": lambda rng, xp, dt: FiniteDifference((12, 10)),
    "finite differences 3-D, z of 1": lambda rng, xp, dt: FiniteDifference((8, 6, 1)),
    "wavelet 2-D": lambda rng, xp, dt: Wavelet((32, 24)),
    "wavelet db4 3-D": lambda rng, xp, dt: Wavelet((32, 16, 8), wavelet="db4"),
    "nufft": lambda rng, xp, dt: NUFFTOp(_nufft(rng, xp, (16, 12), dt)),
    "nufft weighted, 2 coils": lambda rng, xp, dt: NUFFTOp(
        _nufft(rng, xp, (16, 12), dt), (2,), xp.asarray(_weights(rng, 300))),
    "cartesian sense M F S": lambda rng, xp, dt: cartesian_sense(
        xp.asarray(_maps(rng, 4, (16, 12), dt)),
        xp.asarray((rng.uniform(size=(1, 12)) > 0.4).astype(REAL[dt]))),
    "nufft sense W^1/2 F S": lambda rng, xp, dt: nufft_sense(
        _nufft(rng, xp, (16, 12), dt), xp.asarray(_maps(rng, 3, (16, 12), dt)),
        xp.asarray(_weights(rng, 300))),
    "nufft sense 3-D": lambda rng, xp, dt: nufft_sense(
        _nufft(rng, xp, (8, 6, 4), dt, m=200), xp.asarray(_maps(rng, 2, (8, 6, 4), dt))),
    "sense @ wavelet synthesis": lambda rng, xp, dt: (
        Sense(xp.asarray(_maps(rng, 3, (16, 16), dt))) @ Wavelet((16, 16)).H),
    "adjoint of fft": lambda rng, xp, dt: FFT((8, 8)).H,
}


def _backends():
    out = [pytest.param("numpy", id="numpy")]
    out.append(pytest.param("cupy", id="cupy", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA device")]))
    return out


def _xp(name):
    if name == "numpy":
        return np
    import cupy

    return cupy


def _case(name, backend, dtype, seed=0):
    rng = np.random.default_rng(seed)
    xp = _xp(backend)
    op = REGISTRY[name](rng, xp, dtype)
    x = xp.asarray(_cplx(rng, op.ishape, dtype))
    y = xp.asarray(_cplx(rng, op.oshape, dtype))
    return xp, op, x, y


def _rel(xp, a, b):
    return float(xp.linalg.norm((a - b).ravel())) / max(float(xp.linalg.norm(b.ravel())), 1e-30)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128], ids=["c64", "c128"])
@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(REGISTRY))
def test_operator_properties(name, backend, dtype):
    xp, op, x, y = _case(name, backend, dtype)
    ax = op(x)
    ahy = op.H(y)
    assert tuple(ax.shape) == op.oshape and tuple(ahy.shape) == op.ishape
    # adjointness
    lhs = complex(xp.vdot(ax, y))
    rhs = complex(xp.vdot(x, ahy))
    scale = float(xp.linalg.norm(ax.ravel())) * float(xp.linalg.norm(y.ravel()))
    assert abs(lhs - rhs) / scale < TOL[dtype]
    # linearity
    rng = np.random.default_rng(1)
    z = xp.asarray(_cplx(rng, op.ishape, dtype))
    a, b = dtype(0.7 - 0.2j), dtype(-1.3 + 0.5j)
    assert _rel(xp, op(a * x + b * z), a * ax + b * op(z)) < 10 * TOL[dtype]
    # normal operator == A^H A
    assert _rel(xp, op.N(x), op.H(ax)) < TOL_NORMAL[dtype]
    # A @ B composes, A @ array applies
    assert _rel(xp, op @ x, ax) == 0.0


def test_composition_checks_shapes_and_wavelet_is_orthonormal():
    with pytest.raises(ReconError, match="cannot follow"):
        _ = FFT((4, 4)) @ FFT((4, 5))
    with pytest.raises(ReconError, match="input shape"):
        FFT((4, 4))(np.zeros((4, 5), complex))
    w = Wavelet((64, 48))
    # levels: 48 = 16 x 3 allows 4, as does PyWavelets' dwt_max_level(48, 4) (db2); the
    # default maximum is 4; db4 (length 8): dwt_max_level(48, 8) = 2
    assert w.levels == 4 and w.detail_mask().sum() == 64 * 48 - (64 // 16) * (48 // 16)
    assert Wavelet((64, 48), wavelet="db4").levels == 2
    x = _cplx(np.random.default_rng(2), (64, 48), np.complex128)
    np.testing.assert_allclose(w.H(w(x)), x, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(w(x)), np.linalg.norm(x), rtol=1e-12)


def test_power_norm_of_a_diagonal_and_of_sense():
    d = np.linspace(0.1, 3.0, 40).reshape(5, 8)
    assert abs(power_norm(Multiply((5, 8), d), n_iter=200) - 9.0) < 1e-3
    maps = _maps(np.random.default_rng(3), 4, (16, 12), np.complex64)
    # ||M F S||^2 = max sum|S|^2 = 1 for a full mask and normalised maps
    op = cartesian_sense(maps, np.ones((1, 12), np.float32))
    assert abs(power_norm(op, n_iter=30) - 1.0) < 1e-3


def test_conjugate_gradient_solves_the_normal_equations():
    rng = np.random.default_rng(4)
    a = _cplx(rng, (30, 12), np.complex128)
    y = _cplx(rng, 30, np.complex128)
    lam = 0.3

    def normal(v):
        return a.conj().T @ (a @ v)

    x = conjugate_gradient(normal, a.conj().T @ y, lamda=lam, max_iter=50, tol=1e-14)
    ref = np.linalg.solve(a.conj().T @ a + lam * np.eye(12), a.conj().T @ y)
    np.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-12)


def test_fista_l1_on_a_diagonal_problem_matches_the_closed_form():
    # min 0.5 ||d x - y||^2 + lam ||x||_1, separable: x = soft(d y, lam) / d^2
    rng = np.random.default_rng(5)
    d = rng.uniform(0.5, 1.0, 50)
    y = _cplx(rng, 50, np.complex128)
    lam = 0.4
    op = Multiply((50,), d)
    step = 1.0 / 1.0  # ||d||_inf^2 <= 1
    x = fista(op.N, op.H(y), lambda v: soft_threshold(v, step * lam), step=step,
              max_iter=500)
    np.testing.assert_allclose(x, soft_threshold(d * y, lam) / d**2, atol=1e-10)


def test_wavelet_prox_without_shift_thresholds_details_only():
    w = Wavelet((16, 16))
    x = _cplx(np.random.default_rng(6), (16, 16), np.complex128)
    out = L1WaveletProx(w, 0.5, random_shift=False)(x)
    c = w(x)
    expect = np.where(w.detail_mask(), soft_threshold(c, 0.5), c)
    np.testing.assert_allclose(w(out), expect, atol=1e-12)


def test_tv_prox_reduces_tv_and_keeps_the_mean():
    rng = np.random.default_rng(7)
    img = np.zeros((32, 32))
    img[8:24, 8:24] = 1.0
    noisy = (img + 0.1 * rng.standard_normal(img.shape)).astype(np.complex128)
    d = FiniteDifference(img.shape)

    def tv(v):
        return float(np.sum(np.sqrt(np.sum(np.abs(d(v)) ** 2, axis=0))))

    prox = TVProx(img.shape, 0.1, n_inner=200)
    out = prox(noisy)
    # the denoised image is closer to the truth, has less TV, and the same mean (the
    # divergence of the dual sums to zero)
    assert np.linalg.norm(out - img) < 0.6 * np.linalg.norm(noisy - img)
    assert tv(out) < 0.5 * tv(noisy)
    assert abs(out.mean() - noisy.mean()) < 1e-12
