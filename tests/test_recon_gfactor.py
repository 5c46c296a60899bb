"""SENSE g-factor: the analytic map, and the noise of the CG-SENSE recon that it predicts.

Issue 17: accelerated data reconstruct "with noise at the g-factor you compute from the
coil maps". The analytic map (:func:`~mrharmony.recon.parallel.sense_g_factor`,
Pruessmann et al. 1999) is checked against a brute-force unfolding pixel by pixel, and
the CG-SENSE recon of seeded white k-space noise is checked to have, pixel by pixel, the
noise standard deviation ``g sqrt(R)`` times that of the fully sampled recon (Monte
Carlo; the tolerance is stated from the number of realisations).
"""

from __future__ import annotations

import numpy as np
import pytest

from mrharmony.errors import ReconError
from mrharmony.recon.parallel import sense_cg, sense_g_factor
from mrharmony.simulation.coils import make_coil_array, receive_sensitivities

N = 32


def coil_maps(n_coils: int = 8, n: int = N) -> np.ndarray:
    """Biot-Savart sensitivities of a cylindrical loop array on an axial 240 mm slice."""
    x = (np.arange(n) - n / 2 + 0.5) * 240.0 / n
    xx, yy = np.meshgrid(x, x, indexing="ij")
    pos = np.stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)], axis=1)
    sens = receive_sensitivities(make_coil_array(n_coils, radius_mm=150.0), pos)
    return sens.reshape(n_coils, n, n).astype(np.complex128)


def brute_force_g(maps: np.ndarray, r: int, psi: np.ndarray) -> np.ndarray:
    """g from the explicit unfolding matrix of every folded pixel set (axis 1)."""
    n = maps.shape[2]
    g = np.empty(maps.shape[1:])
    inv_psi = np.linalg.inv(psi)
    for x in range(maps.shape[1]):
        for y0 in range(n // r):
            ys = [y0 + k * n // r for k in range(r)]
            S = maps[:, x, ys]
            A = S.conj().T @ inv_psi @ S
            Ainv = np.linalg.inv(A)
            for j, y in enumerate(ys):
                g[x, y] = np.sqrt(np.real(Ainv[j, j] * A[j, j]))
    return g


@pytest.mark.parametrize("r", [2, 3, 4])
def test_g_factor_equals_the_unfolding_matrix(r):
    maps = coil_maps(n=24 if r == 3 else N)
    rng = np.random.default_rng(3)
    a = rng.normal(size=(8, 8)) + 1j * rng.normal(size=(8, 8))
    psi = a @ a.conj().T / 8 + np.eye(8)  # a correlated receiver noise covariance
    for cov in (None, psi):
        g = sense_g_factor(maps, (1, r), noise_covariance=cov)
        ref = brute_force_g(maps, r, np.eye(8) if cov is None else psi)
        np.testing.assert_allclose(g, ref, rtol=1e-9)
        assert g.min() >= 1.0 - 1e-12
    assert np.allclose(sense_g_factor(maps, (1, 1)), 1.0)
    # two accelerated axes: every folded set is the product of the two
    g2 = sense_g_factor(maps, (2, 2))
    assert g2.shape == maps.shape[1:] and np.median(g2) > np.median(sense_g_factor(maps, (1, 2)))


def test_g_factor_refuses_bad_factors():
    maps = coil_maps()
    with pytest.raises(ReconError, match="one factor"):
        sense_g_factor(maps, (2,))
    with pytest.raises(ReconError, match="not divisible"):
        sense_g_factor(maps, (1, 5))


def test_cg_sense_noise_is_g_sqrt_r_times_the_fully_sampled_noise():
    """Monte Carlo: 400 seeded realisations of white k-space noise (unit variance per
    sample and coil), reconstructed by unregularised CG-SENSE at R = 1 and R = 3. The
    sample SD of 400 values has a relative standard error of 1/sqrt(800) = 3.5 %; the
    ratio of two such SDs about 5 %. Over the object the pixelwise ratio must follow the
    analytic map: median relative error < 5 %, 95th percentile < 15 %, and the mean
    over pixels within 2 % (measured: g mean 1.75, max 2.33; Monte Carlo mean 1.76,
    median relative error 2.0 %, 95th percentile 6.4 %)."""
    r, n_real = 3, 400
    maps = coil_maps(n=24)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0)).max()
    spatial = maps.shape[1:]
    full = np.ones(spatial, dtype=bool)
    under = np.zeros(spatial, dtype=bool)
    under[:, ::r] = True
    rng = np.random.default_rng(17)
    out = {1: [], r: []}
    for _ in range(n_real):
        noise = (rng.normal(size=maps.shape) + 1j * rng.normal(size=maps.shape)) / np.sqrt(2)
        for factor, mask in ((1, full), (r, under)):
            k = noise * mask
            out[factor].append(sense_cg(k, maps, mask, lamda=0.0, max_iter=200, tol=1e-7))
    sd1 = np.std(np.array(out[1]), axis=0)
    sdr = np.std(np.array(out[r]), axis=0)
    g_mc = sdr / (np.sqrt(r) * sd1)
    g = sense_g_factor(maps, (1, r))
    rel = np.abs(g_mc / g - 1)
    assert np.median(rel) < 0.05
    assert np.percentile(rel, 95) < 0.15
    assert abs(g_mc.mean() / g.mean() - 1) < 0.02
    assert g.max() > 1.3  # the geometry really amplifies noise somewhere
