"""SENSE g-factor: the analytic map, and the noise of the CG-SENSE recon that it predicts.

Issue 17: accelerated data reconstruct "with noise at the g-factor you compute from the
coil maps". The analytic map (:func:`~mrharmony.recon.parallel.sense_g_factor`,
Pruessmann et al. 1999) is checked against a brute-force unfolding pixel by pixel, and
the CG-SENSE recon of seeded white k-space noise is checked to have, pixel by pixel, the
noise standard deviation ``g sqrt(R)`` times that of the fully sampled recon (Monte
Carlo; the tolerance is stated from the number of realisations). The GRAPPA map
(:func:`~mrharmony.recon.parallel.grappa_g_factor`, Breuer et al. 2009) is checked the
same way against pseudo-replicas of :func:`~mrharmony.recon.parallel.grappa` itself, for
one and two accelerated axes and a correlated noise covariance (k-space wrapped around,
as the model is circular; and plain, edges included, at R = 2 and 3), and compared with
the SENSE map of the same coils.
"""

from __future__ import annotations

import numpy as np
import pytest

from mrharmony.errors import ReconError
from mrharmony.recon.cartesian import fft_c, ifft_c
from mrharmony.recon.parallel import grappa, grappa_g_factor, sense_cg, sense_g_factor
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


# --------------------------------------------------------------------------------------
# GRAPPA: the image-domain g-factor (Breuer et al. 2009) against pseudo-replicas of grappa()


def disc_object(n: int) -> np.ndarray:
    """A textured disc filling 85 % of the field of view (zero outside)."""
    x = (np.arange(n) - n / 2 + 0.5) / (n / 2)
    xx, yy = np.meshgrid(x, x, indexing="ij")
    inside = xx**2 + yy**2 < 0.85**2
    return inside * (1 + 0.3 * np.cos(3 * np.pi * xx) * np.sin(2 * np.pi * yy))


def coil_maps_3d(n_read: int, n: int, n_coils: int = 8) -> np.ndarray:
    """Biot-Savart maps of the same loop ring on ``n_read`` axial slices (axis 1, along
    the cylinder: the readout of a 3-D acquisition) of ``n x n`` (the two phase axes)."""
    x = (np.arange(n) - n / 2 + 0.5) * 240.0 / n
    z = (np.arange(n_read) - n_read / 2 + 0.5) * 240.0 / n
    zz, xx, yy = np.meshgrid(z, x, x, indexing="ij")
    pos = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], axis=1)
    sens = receive_sensitivities(make_coil_array(n_coils, radius_mm=150.0), pos)
    return sens.reshape(n_coils, n_read, n, n).astype(np.complex128)


def grappa_setup(maps: np.ndarray, acs: int):
    """Noiseless coil images of the disc, and the central ``acs`` lines (per phase axis)
    of their k-space: the calibration block."""
    maps = maps / np.sqrt((np.abs(maps) ** 2).sum(0)).max()
    n = maps.shape[-1]
    img = maps * disc_object(n)
    axes = tuple(range(1, maps.ndim))
    k = fft_c(img, axes=axes)
    c = slice(n // 2 - acs // 2, n // 2 + acs // 2)
    calib = k[(slice(None), slice(None)) + (c,) * (maps.ndim - 2)]
    return maps, img, calib


def grappa_noise_images(noise, mask, calib, acc, p, kernel_x, kernel_blocks, pad):
    """Coil-combined ``sum_c p_c I_c`` GRAPPA images of noise realisations
    ``(n_real, coils, nx, *phase)`` sampled on ``mask``, in one grappa() call.

    Every realisation is wrapped around (``kernel_x // 2`` points along kx, ``pad`` >= the
    kernel half-width along the phase axes) so that grappa's neighbourhoods of the
    central copy are circular, as in the analytic model, and the realisations are laid
    side by side along kx; the central copies are cut out again. The kernel is fitted on
    the noiseless ``calib`` (the same weights for every realisation)."""
    n_real, nc, nx = noise.shape[:3]
    nd = noise.ndim - 3
    hx = kernel_x // 2
    wrapped = np.pad(noise * mask, [(0, 0), (0, 0), (hx, hx)] + [(pad, pad)] * nd, mode="wrap")
    side_by_side = np.concatenate(list(wrapped), axis=1)
    filled = grappa(side_by_side, calib, mask=np.pad(mask, pad, mode="wrap"), acceleration=acc,
                    kernel_x=kernel_x, kernel_blocks=kernel_blocks)
    filled = filled.reshape(nc, n_real, *wrapped.shape[2:]).swapaxes(0, 1)
    centre = (slice(None), slice(None), slice(hx, hx + nx)) + (slice(pad, -pad),) * nd
    coil_images = ifft_c(filled[centre], axes=tuple(range(2, noise.ndim)))
    return np.sum(p * coil_images, axis=1)


@pytest.mark.parametrize(
    "case, n_real, median_tol, p95_tol",
    [("R=3 white", 300, 0.05, 0.12), ("R=3 correlated", 300, 0.05, 0.12),
     ("R=2x2 3-D", 200, 0.06, 0.15)])
def test_grappa_noise_is_g_sqrt_r_times_the_fully_sampled_noise(case, n_real, median_tol,
                                                                 p95_tol):
    """Monte Carlo pseudo-replicas: grappa() (kernel fitted on a noiseless ACS block, so
    the same weights every time) of seeded complex Gaussian k-space noise with covariance
    Psi per sample on the acquired lattice, combined with the fixed weights
    ``p = conj(I) / sqrt(sum |I|^2)`` of the noiseless coil images; the fully sampled
    reference is the same noise, all of it, combined with the same ``p``.

    The SD of N complex Gaussian values has a relative standard error of 1/(2 sqrt(N))
    (2N real degrees of freedom): 2.9 % for N = 300, 3.5 % for 200, and the ratio of two
    at most sqrt(2) times that (4.1 % / 5.0 %): median |relative error| expected <= 2.8 % /
    3.4 % (bound 5 % / 6 %), 95th percentile <= 8 % / 10 % (bound 12 % / 15 %). The mean
    of the ratio over the 732 (1-D) / 888 (3-D) object pixels must be within 1.5 % (a
    wrong kernel orientation or a missing sqrt(R) is off by > 30 %). Measured: g mean
    1.51 (min 1.07, max 2.26) for R = 3 white, 1.50 (0.88-2.30) with the correlated Psi,
    1.48 (1.24-2.05) for 2 x 2; median errors 2.5 / 2.3 / 3.0 %, 95th percentiles
    7.6 / 7.6 / 9.0 %, means within 0.13 %. With the correlated Psi the map that ignores
    Psi is off by a median 14 %.
    """
    rng = np.random.default_rng(17)
    psi = None
    if case.startswith("R=3"):
        r, acc, kernel_blocks = 3, (3,), 4
        maps, img, calib = grappa_setup(coil_maps(n=36), acs=16)
        mask = np.zeros(36, dtype=bool)
        mask[::3] = True
        if case.endswith("correlated"):
            # correlated (|rho| up to 0.7) and unequal (SD 0.5-2) channel noise
            a = rng.normal(size=(8, 8)) + 1j * rng.normal(size=(8, 8))
            sd = np.diag(np.linspace(0.5, 2.0, 8))
            psi = sd @ (a @ a.conj().T / 8 + 0.05 * np.eye(8)) @ sd
    else:
        r, acc, kernel_blocks = 4, (2, 2), 2
        maps, img, calib = grappa_setup(coil_maps_3d(6, 16), acs=12)
        mask = np.zeros((16, 16), dtype=bool)
        mask[::2, ::2] = True
    kernel_x = 5 if maps.ndim == 3 else 3
    g = grappa_g_factor(calib, img, acc, kernel_x=kernel_x, kernel_blocks=kernel_blocks,
                        noise_covariance=psi)
    on = np.abs(img).sum(0) > 0
    p = np.zeros_like(img)
    p[:, on] = img[:, on].conj() / np.sqrt((np.abs(img[:, on]) ** 2).sum(0))
    chol = np.eye(8) if psi is None else np.linalg.cholesky(psi)
    full, accel = [], []
    for _ in range(n_real // 100):
        shape = (100, *maps.shape)
        white = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / np.sqrt(2)
        noise = np.einsum("cd,bd...->bc...", chol, white)
        full.append(np.sum(p * ifft_c(noise, axes=tuple(range(2, noise.ndim))), axis=1))
        accel.append(grappa_noise_images(noise, mask, calib, acc, p, kernel_x,
                                         kernel_blocks, pad=6))
    sd_full = np.std(np.concatenate(full), axis=0)
    sd_accel = np.std(np.concatenate(accel), axis=0)
    g_mc = sd_accel[on] / (np.sqrt(r) * sd_full[on])
    rel = np.abs(g_mc / g[on] - 1)
    assert np.isnan(g[~on]).all()
    assert np.median(rel) < median_tol
    assert np.percentile(rel, 95) < p95_tol
    assert abs(g_mc.mean() / g[on].mean() - 1) < 0.015
    assert g[on].max() > 1.3  # the kernel really amplifies noise somewhere
    if psi is not None:  # and the map that ignores the noise covariance does not fit
        g_white = grappa_g_factor(calib, img, acc, kernel_x=kernel_x,
                                  kernel_blocks=kernel_blocks)[on]
        assert np.median(np.abs(g_mc / g_white - 1)) > 2 * median_tol


@pytest.mark.parametrize("r", [2, 3])
def test_grappa_noise_at_the_matrix_edge_follows_the_g_factor(r):
    """The same pseudo-replicas WITHOUT wrapping k-space around: grappa(edge="zero") of
    the plain 48 x 48 undersampled noise (each realisation's kx edges padded with zeros,
    as in a call of its own). The g-factor model is circular; with edge="zero" grappa()
    applies the interior kernels up to the matrix edge and reads zeros for the sources
    outside it (also along kx), so the edge lines are no noisier than the interior ones
    and the image noise follows the map up to their slightly lower noise. The default
    one-sided edge kernels (edge="fit") do not: checked to be above the tolerance.

    100 realisations of unit-variance white noise; the fully sampled image combined
    with ``p`` (``|p| = 1``, unitary FFT) has SD 1 exactly. The object-mean SD over 1296
    pixels, whose noise is correlated mainly within the R pixels that fold together,
    has a Monte Carlo error of about 1/(2 sqrt(100 * 1296 / R)) = 0.2 % (spread over 6
    seeds measured 0.05 / 0.15 %); the zeros read at the edges lower it by 1-3 % at
    48 lines. Asserted: within 4 % of the map's mean (measured -1.4 % at R = 2, -2.5 %
    at R = 3; edge="fit" gives +17.9 % and +85 %). And each filled line's k-space noise
    variance (38400 samples each) within 10 % of the median of the lines at the same
    lattice offset (measured max 1.02 / 1.03; edge="fit" gives 26 at R = 2, 9 and 63 at
    R = 3)."""
    n, n_real, batch, hx = 48, 100, 20, 2
    maps, img, calib = grappa_setup(coil_maps(n=n), acs=16)
    g = grappa_g_factor(calib, img, r)
    on = np.abs(img).sum(0) > 0
    p = np.zeros_like(img)
    p[:, on] = img[:, on].conj() / np.sqrt((np.abs(img[:, on]) ** 2).sum(0))
    mask = np.zeros(n, dtype=bool)
    mask[::r] = True

    def replicas(edge: str, n_real: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(29)
        image_var = np.zeros((n, n))
        line_var = np.zeros(n)
        for _ in range(n_real // batch):
            shape = (batch, *maps.shape)
            noise = (rng.normal(size=shape) + 1j * rng.normal(size=shape)) / np.sqrt(2)
            zero_edges = np.pad(noise * mask, [(0, 0), (0, 0), (hx, hx), (0, 0)])
            filled = grappa(np.concatenate(list(zero_edges), axis=1), calib, mask=mask,
                            acceleration=r, edge=edge)
            filled = filled.reshape(8, batch, n + 2 * hx, n).swapaxes(0, 1)[:, :, hx:-hx]
            line_var += np.sum(np.abs(filled) ** 2, axis=(0, 1, 2)) / (8 * n * n_real)
            images = np.sum(p * ifft_c(filled, axes=(2, 3)), axis=1)
            image_var += np.sum(np.abs(images) ** 2, axis=0) / n_real
        return np.sqrt(image_var[on] / r), line_var

    lines = np.arange(n)
    g_mc, line_var = replicas("zero", n_real)
    assert abs(g_mc.mean() / g[on].mean() - 1) < 0.04
    for offset in range(1, r):
        v = line_var[lines % r == offset]
        assert v.max() < 1.1 * np.median(v)
    g_fit, line_fit = replicas("fit", batch)  # one batch is enough to see it
    assert g_fit.mean() / g[on].mean() - 1 > 0.1
    assert max(line_fit[lines % r == o].max() / np.median(line_fit[lines % r == o])
               for o in range(1, r)) > 5
    with pytest.raises(ReconError, match="edge must be"):
        grappa(np.zeros((8, 8, n), np.complex64), calib,
               mask=mask, edge="wrap")
    # grappa() and grappa_g_factor() parse acceleration and kernel_blocks alike
    for kwargs, words in (({"acceleration": (r, 2)}, "one factor >= 1 per phase axis"),
                          ({"kernel_blocks": (4, 4)}, "one count >= 1 per phase axis")):
        with pytest.raises(ReconError, match=f"grappa: .*{words}"):
            grappa(np.zeros((8, 8, n), np.complex64), calib, mask=mask, **kwargs)
        with pytest.raises(ReconError, match=f"grappa_g_factor: .*{words}"):
            grappa_g_factor(calib, np.ones((8, 8, n), np.complex64),
                            kwargs.get("acceleration", r),
                            kernel_blocks=kwargs.get("kernel_blocks", 4))


def test_grappa_g_factor_is_one_without_acceleration_and_above_one_with_it():
    """R = 1: the kernel is the identity, g = 1 exactly. R = 2 and 3 (ACS 16, lamda
    1e-3): g >= 1 up to the regularised kernel's averaging (measured min 0.998 at R = 2,
    1.07 at R = 3; means 1.07 and 1.51), growing with R. The coil combination only
    enters through its ratios per pixel: the sensitivities give the same map as the coil
    images of the object."""
    g = {}
    for r, n in ((1, 32), (2, 32), (3, 36)):
        maps, img, calib = grappa_setup(coil_maps(n=n), acs=16)
        on = np.abs(img).sum(0) > 0
        g[r] = grappa_g_factor(calib, img, r)[on]
        np.testing.assert_allclose(grappa_g_factor(calib, maps, r)[on], g[r], rtol=1e-9)
    np.testing.assert_allclose(g[1], 1.0, atol=1e-12)
    assert g[2].min() > 0.99 and g[3].min() > 0.99
    assert 1.0 < g[2].mean() < g[3].mean()


def test_grappa_and_sense_g_factors_on_the_same_maps():
    """The same Biot-Savart maps, R = 2 and 3 along one axis (ACS 16) and 2 x 2 in 3-D
    (ACS 12 x 12): the mean g over the object, GRAPPA vs unregularised SENSE, measured
    1.07 vs 1.09 (R = 2), 1.51 vs 1.80 (R = 3), 1.47 vs 1.25 (2 x 2): the same order,
    not the same map (pixelwise correlation 0.2-0.4 at R = 3). Asserted: the ratio of the
    means within a factor 1.5, and, the one direction the physics fixes, that less
    Tikhonov regularisation of the kernel fit (lamda 1e-5 instead of 1e-3) raises GRAPPA's
    mean g (measured 1.51 -> 1.60 at R = 3)."""
    for r, n in ((2, 32), (3, 36)):
        maps, img, calib = grappa_setup(coil_maps(n=n), acs=16)
        on = np.abs(img).sum(0) > 0
        g = grappa_g_factor(calib, img, r)[on]
        gs = sense_g_factor(maps, (1, r))[on]
        assert 1 / 1.5 < g.mean() / gs.mean() < 1.5
        if r == 3:
            assert grappa_g_factor(calib, img, r, lamda=1e-5)[on].mean() > g.mean() + 0.03
    maps, img, calib = grappa_setup(coil_maps_3d(6, 16), acs=12)
    on = np.abs(img).sum(0) > 0
    g = grappa_g_factor(calib, img, (2, 2), kernel_x=3, kernel_blocks=2)[on]
    gs = sense_g_factor(maps, (1, 2, 2))[on]
    assert 1 / 1.5 < g.mean() / gs.mean() < 1.5


def test_grappa_g_factor_refuses_bad_input():
    _maps, img, calib = grappa_setup(coil_maps(n=32), acs=16)
    with pytest.raises(ReconError, match="one factor"):
        grappa_g_factor(calib, img, (2, 2))
    with pytest.raises(ReconError, match="not divisible"):
        grappa_g_factor(calib, img, 3)
    with pytest.raises(ReconError, match="kernel_x"):
        grappa_g_factor(calib, img, 2, kernel_x=4)
    with pytest.raises(ReconError, match="same coils"):
        grappa_g_factor(calib[:4], img, 2)
    with pytest.raises(ReconError, match="Hermitian"):
        grappa_g_factor(calib, img, 2, noise_covariance=np.eye(4))
    with pytest.raises(ReconError, match="positive definite"):
        grappa_g_factor(calib, img, 2, noise_covariance=-np.eye(8))
    with pytest.raises(ReconError, match="wider than the image grid"):
        grappa_g_factor(calib, img, 4, kernel_blocks=8)
    with pytest.raises(ReconError, match="too small"):
        grappa_g_factor(calib[:, :, 14:18], img, 2)
