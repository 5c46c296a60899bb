"""Parallel imaging and CS: CG-SENSE vs BART pics, L1-wavelet vs fully sampled, GRAPPA."""

from __future__ import annotations

import numpy as np
import pytest
from test_recon_io import make_acquisitions, make_header, nrmse

from mrharmony.recon import reconstruct_acquisitions
from mrharmony.recon.bart import bart_available, ecalib, pics, read_cfl, write_cfl
from mrharmony.recon.cartesian import fft_c, ifft_c
from mrharmony.recon.coils import espirit_maps, sos, walsh_maps
from mrharmony.recon.parallel import Wavelet, grappa, sense_cg, sense_l1_wavelet, sense_tv

N, NC, ACS = 128, 8, 24

needs_bart = pytest.mark.skipif(not bart_available(), reason="the 'bart' executable is missing")


@pytest.fixture(scope="module")
def data():
    """Shepp-Logan with 8 normalised birdcage coils, complex noise sigma 1e-3 (seeded)."""
    import sigpy as sp
    import sigpy.mri as mr

    img = sp.shepp_logan((N, N)).astype(np.complex64)
    mps = mr.birdcage_maps((NC, N, N)).astype(np.complex64)
    mps /= np.sqrt(np.sum(np.abs(mps) ** 2, axis=0))
    rng = np.random.default_rng(5)
    k = fft_c(mps * img, axes=(1, 2))
    k += (1e-3 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))).astype(
        np.complex64)
    return img, mps, k


def _mask(r: int) -> np.ndarray:
    m = np.zeros(N, bool)
    m[::r] = True
    m[N // 2 - ACS // 2 : N // 2 + ACS // 2] = True
    return m


def test_wavelet_is_orthonormal():
    rng = np.random.default_rng(0)
    w = Wavelet((64, 48))  # the one wavelet (recon.operators, db2): 4 levels here
    x = (rng.standard_normal((64, 48)) + 1j * rng.standard_normal((64, 48))).astype(np.complex64)
    y = (rng.standard_normal((64, 48)) + 1j * rng.standard_normal((64, 48))).astype(np.complex64)
    assert w.levels == 4
    # <W x, y> == <x, W^H y> and W^H W = I to float32 rounding
    assert abs(np.vdot(w.forward(x), y) - np.vdot(x, w.adjoint(y))) < 1e-3 * abs(np.vdot(x, x))
    np.testing.assert_allclose(w.adjoint(w.forward(x)), x, atol=1e-5)


def test_cfl_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    a = (rng.standard_normal((4, 5, 3)) + 1j * rng.standard_normal((4, 5, 3))).astype(np.complex64)
    write_cfl(tmp_path / "a", a)
    np.testing.assert_array_equal(read_cfl(tmp_path / "a"), a)


@needs_bart
@pytest.mark.parametrize("r", [2, 4])
def test_cg_sense_agrees_with_bart_pics_l2(data, r):
    _, _, k = data
    mask = _mask(r)
    ku = k * mask[None, None, :]
    maps = espirit_maps(ku, (N, N), calib_width=ACS)
    lam = 1e-4
    iters = {2: 60, 4: 200}[r]  # both converged (R=4 with ACS is ill-conditioned)
    ours = sense_cg(ku, maps, mask[None, :], lamda=lam, max_iter=iters, tol=1e-7)
    theirs = pics(ku, maps, l2=lam, iterations=iters, extra=["-e"])
    # same maps, same (scale-invariant, tiny) Tikhonov weight; BART rescales with -S
    assert nrmse(ours, theirs) < 1e-3


@pytest.mark.parametrize("r", [2, 4])
def test_l1_wavelet_within_5_percent_of_fully_sampled(data, r):
    _, mps, k = data
    mask = _mask(r)
    ref = sense_cg(k, mps, np.ones((1, N)), max_iter=50)
    rec = sense_l1_wavelet(k * mask[None, None, :], mps, mask[None, :], lamda=1e-4,
                           max_iter=100)
    assert nrmse(rec, ref) < 0.05


def test_tv_sense_within_5_percent_of_fully_sampled_at_r4(data):
    _, mps, k = data
    mask = _mask(4)
    ref = sense_cg(k, mps, np.ones((1, N)), max_iter=50)
    rec = sense_tv(k * mask[None, None, :], mps, mask[None, :], lamda=1e-4, max_iter=100)
    assert nrmse(rec, ref) < 0.05


@pytest.mark.parametrize("r", [2, 4])
def test_grappa_against_fully_sampled_sos(data, r):
    _, _, k = data
    mask = _mask(r)
    filled = grappa(k * mask[None, None, :], k[:, :, mask & (np.abs(np.arange(N) - N // 2) <=
                                                           ACS // 2 - 1)], mask=mask)
    ref = sos(ifft_c(k, axes=(1, 2)))
    zero = sos(ifft_c(k * mask[None, None, :], axes=(1, 2)))
    err = nrmse(sos(ifft_c(filled, axes=(1, 2))), ref)
    # GRAPPA removes most aliasing (what is left at R=4 is mostly g-factor noise): well
    # below zero filling; sampled lines untouched
    assert err < {2: 0.02, 4: 0.12}[r] and err < 0.3 * nrmse(zero, ref)
    np.testing.assert_array_equal(filled[:, :, mask], k[:, :, mask])


def test_walsh_maps_combine_to_the_object(data):
    img, _mps, k = data
    coil = ifft_c(k, axes=(1, 2))
    maps = walsh_maps(coil)
    combined = np.sum(np.conj(maps) * coil, axis=0)
    inside = np.abs(img) > 0.1
    # the Walsh combination equals |object| up to noise inside the object (sum|S|^2 = 1)
    assert nrmse(np.abs(combined)[inside], np.abs(img)[inside]) < 0.02


@needs_bart
def test_espirit_close_to_bart_ecalib(data):
    _, _, k = data
    ku = k * _mask(2)[None, None, :]
    ours = espirit_maps(ku, (N, N), calib_width=ACS)
    theirs = ecalib(ku, calib_width=ACS)
    # maps are defined up to a common phase per voxel: compare the projectors |<S, S'>|
    proj = np.abs(np.sum(np.conj(ours) * theirs, axis=0))
    support = np.sum(np.abs(theirs) ** 2, axis=0) > 0.5
    assert np.median(proj[support]) > 0.99


@pytest.mark.parametrize("method", ["grappa", "sense", "cs", "tv"])
def test_pipeline_undersampled_methods(data, method):
    img, _, k = data
    mask = _mask(2)
    header = make_header(N, N, coils=NC)
    acqs = make_acquisitions(k, lines=np.flatnonzero(mask))
    images = reconstruct_acquisitions(header, acqs, method=method, backend="numpy")
    rec = np.abs(images[0].data[:, :, 0])
    assert images[0].meta["recon"]["method"] == method
    ref = np.abs(img)
    s = np.vdot(rec, ref) / np.vdot(rec, rec)
    assert nrmse(s * rec, ref) < 0.05


@needs_bart
def test_pipeline_bart_backend(data):
    _, _, k = data
    mask = _mask(2)
    header = make_header(N, N, coils=NC)
    acqs = make_acquisitions(k, lines=np.flatnonzero(mask))
    ours = reconstruct_acquisitions(header, acqs, method="sense", backend="numpy")[0].data
    theirs = reconstruct_acquisitions(header, acqs, method="sense", backend="bart")[0].data
    # different ESPIRiT implementations: agree to a few percent in magnitude
    assert nrmse(np.abs(theirs), np.abs(ours)) < 0.05
