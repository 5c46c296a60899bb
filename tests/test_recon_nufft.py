"""NUFFT operator and density compensation: DFT, finufft, SigPy, adjointness, Toeplitz."""

from __future__ import annotations

import math

import finufft
import numpy as np
import pytest
import sigpy

from mrharmony.backend import cupy_available
from mrharmony.errors import ReconError
from mrharmony.recon.dcf import density_compensation, pipe_menon_dcf, radial_dcf
from mrharmony.recon.nufft import NUFFT, nufft_adjoint, nufft_forward


def _dft_matrix(coords: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Explicit (M, prod N) forward matrix of the documented convention."""
    grids = np.meshgrid(*[np.arange(n) - n // 2 for n in shape], indexing="ij")
    n = np.stack([g.ravel() / s for g, s in zip(grids, shape, strict=True)], axis=1)
    return np.exp(-2j * np.pi * coords @ n.T) / math.sqrt(math.prod(shape))


def _random_problem(shape: tuple[int, ...], m: int, seed: int):
    rng = np.random.default_rng(seed)
    half = np.asarray(shape) / 2
    coords = rng.uniform(-half, half, (m, len(shape)))
    x = rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
    y = rng.standard_normal(m) + 1j * rng.standard_normal(m)
    return coords, x, y


@pytest.mark.parametrize("shape", [(16,), (12, 10), (6, 8, 5), (9, 7)])
def test_forward_and_adjoint_equal_explicit_dft(shape):
    coords, x, y = _random_problem(shape, 60, seed=1)
    e = _dft_matrix(coords, shape)
    # eps = 1e-12: finufft is then exact to ~1e-11 relative.
    np.testing.assert_allclose(nufft_forward(x, coords, eps=1e-12), e @ x.ravel(),
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(nufft_adjoint(y, coords, shape, eps=1e-12).ravel(),
                               e.conj().T @ y, rtol=0, atol=1e-9)


def test_adjoint_agrees_with_direct_finufft_after_scale():
    # 256 x 256 image, 64 spokes x 512 samples, 4 coils: ours == finufft / N to 1e-6.
    n = 256
    rng = np.random.default_rng(2)
    angles = np.pi * np.arange(64) / 64
    r = (np.arange(512) - 256) / 2
    coords = np.stack([np.outer(np.cos(angles), r).ravel(),
                       np.outer(np.sin(angles), r).ravel()], axis=1)
    data = rng.standard_normal((4, coords.shape[0])) + 1j * rng.standard_normal(
        (4, coords.shape[0]))
    ours = nufft_adjoint(data, coords, (n, n), eps=1e-9)
    ref = finufft.nufft2d1(2 * np.pi * coords[:, 0] / n, 2 * np.pi * coords[:, 1] / n,
                           data, (n, n), eps=1e-9, isign=1)
    err = np.linalg.norm(ours * n - ref) / np.linalg.norm(ref)
    assert err < 1e-6  # stated tolerance: 1e-6 relative after the sqrt(prod N) scale
    img = rng.standard_normal((n, n)) + 0j
    fwd_ref = finufft.nufft2d2(2 * np.pi * coords[:, 0] / n, 2 * np.pi * coords[:, 1] / n,
                               img, eps=1e-9, isign=-1)
    fwd = nufft_forward(img, coords, eps=1e-9)
    assert np.linalg.norm(fwd * n - fwd_ref) / np.linalg.norm(fwd_ref) < 1e-6


def test_same_scale_as_sigpy():
    coords, x, y = _random_problem((32, 24), 500, seed=3)
    # SigPy's default Kaiser-Bessel kernel is accurate to ~1e-2 relative here.
    ours_f = nufft_forward(x, coords)
    assert np.linalg.norm(ours_f - sigpy.nufft(x, coords)) / np.linalg.norm(ours_f) < 2e-2
    ours_a = nufft_adjoint(y, coords, (32, 24))
    sp_a = sigpy.nufft_adjoint(y, coords, (32, 24))
    assert np.linalg.norm(ours_a - sp_a) / np.linalg.norm(ours_a) < 2e-2


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_adjointness(dtype):
    coords, x, y = _random_problem((20, 18), 300, seed=4)
    op = NUFFT(coords, (20, 18), dtype=dtype)
    lhs = np.vdot(op.forward(x), y)
    rhs = np.vdot(x, op.adjoint(y))
    tol = 1e-4 if dtype == np.complex64 else 1e-9  # <A x, y> = <x, A^H y>
    assert abs(lhs - rhs) / abs(lhs) < tol


def test_cartesian_grid_is_orthonormal_fft():
    n = 16
    g = np.stack(np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij"),
                 axis=-1).reshape(-1, 2).astype(float)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, n)) + 1j * rng.standard_normal((n, n))
    k = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(x), norm="ortho"))
    np.testing.assert_allclose(nufft_forward(x, g, eps=1e-12).reshape(n, n), k, atol=1e-9)
    np.testing.assert_allclose(nufft_adjoint(k.ravel(), g, (n, n), eps=1e-12), x, atol=1e-9)


def test_batched_coils_equal_single_transforms():
    coords, x, _ = _random_problem((16, 16), 200, seed=6)
    stack = np.stack([x, 2 * x, 1j * x])[None]  # (1, 3, 16, 16)
    out = nufft_forward(stack, coords)
    assert out.shape == (1, 3, 200)
    np.testing.assert_allclose(out[0, 2], 1j * nufft_forward(x, coords), atol=1e-9)


def test_toeplitz_normal_equals_forward_then_adjoint():
    coords, x, _ = _random_problem((24, 20), 400, seed=7)
    w = np.random.default_rng(8).uniform(0.5, 2.0, 400)
    op = NUFFT(coords, (24, 20), eps=1e-10)
    kernel = op.toeplitz_kernel(w)
    np.testing.assert_allclose(op.normal_toeplitz(x, kernel), op.adjoint(w * op.forward(x)),
                               atol=1e-8)


def test_bad_inputs_raise_named_errors():
    with pytest.raises(ReconError, match="coords"):
        nufft_forward(np.zeros((8, 8)), np.zeros((5, 3)))
    with pytest.raises(ReconError, match="radians or 1/m"):
        nufft_adjoint(np.zeros(3), np.full((3, 2), 40.0), (8, 8))
    with pytest.raises(ReconError, match="data"):
        NUFFT(np.zeros((4, 2)), (8, 8)).adjoint(np.zeros(5))
    with pytest.raises(ReconError, match="NaN"):
        NUFFT(np.full((4, 2), np.nan), (8, 8))


def _radial(n_spokes: int, n_samples: int, n: int) -> np.ndarray:
    angles = np.pi * np.arange(n_spokes) / n_spokes
    r = (np.arange(n_samples) - n_samples // 2) * n / n_samples
    return np.stack([np.outer(np.cos(angles), r).ravel(),
                     np.outer(np.sin(angles), r).ravel()], axis=1)


def test_pipe_menon_matches_analytic_radial_density():
    coords = _radial(200, 128, 64)
    w_pipe = pipe_menon_dcf(coords, (64, 64))
    w_ramp = radial_dcf(coords, 200)
    r = np.linalg.norm(coords, axis=1)
    inner = (r > 3) & (r < 28)  # away from the centre and the outer edge
    ratio = w_pipe[inner] / w_ramp[inner]
    # Both are 1/density in (cycles/FOV)^2: median within 1 %, 90 % within 3 %.
    assert abs(np.median(ratio) - 1) < 0.01
    assert np.all(np.abs(np.percentile(ratio, [5, 95]) - 1) < 0.03)
    # The ramp weights tile the sampled disk: their sum is its area pi (N/2)^2.
    assert abs(w_ramp.sum() / (np.pi * 32**2) - 1) < 0.01
    with pytest.raises(ReconError, match="n_spokes"):
        density_compensation(coords, (64, 64), method="radial")


def test_pipe_menon_uniform_on_cartesian_grid():
    n = 32
    g = np.stack(np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2, indexing="ij"),
                 axis=-1).reshape(-1, 2).astype(float)
    w = pipe_menon_dcf(g, (n, n)).reshape(n, n)
    inner = w[6:-6, 6:-6]
    # Uniform density gives uniform weights (scale: module docstring, ~0.92 here).
    assert inner.std() / inner.mean() < 1e-6
    assert 0.85 < inner.mean() < 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a CUDA device")
def test_cupy_operator_matches_numpy():
    import cupy as cp

    coords, x, _ = _random_problem((32, 32), 400, seed=9)
    op = NUFFT(cp.asarray(coords), (32, 32))
    ref = nufft_forward(x, coords)
    got = cp.asnumpy(op.forward(cp.asarray(x)))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-2
    w = np.random.default_rng(10).uniform(0.5, 2.0, 400)
    k_gpu = op.toeplitz_kernel(cp.asarray(w))
    cpu = NUFFT(coords, (32, 32))
    k_cpu = cpu.toeplitz_kernel(w)
    n_gpu = cp.asnumpy(op.normal_toeplitz(cp.asarray(x), k_gpu))
    n_cpu = cpu.normal_toeplitz(x, k_cpu)
    assert np.linalg.norm(n_gpu - n_cpu) / np.linalg.norm(n_cpu) < 1e-2
