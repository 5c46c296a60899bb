"""Recon flavours: coil combination, k-space filter, partial-Fourier method and intensity
normalisation each do what they say on synthetic data; unknown values are refused."""

from __future__ import annotations

import numpy as np
import pytest
from test_recon_io import make_acquisitions, make_header, phantom

from mrharmony.errors import ReconError
from mrharmony.formats.kspace_filter import kspace_window, normalised_kspace_radius
from mrharmony.recon import reconstruct_acquisitions
from mrharmony.recon.cartesian import fft_c

N = 64


def _recon(k, *, lines=None, coils=None, **options):
    header = make_header(N, N, coils=coils or k.shape[0])
    acqs = make_acquisitions(k, lines=lines)
    return reconstruct_acquisitions(header, acqs, method="fft", backend="numpy", **options)[0]


@pytest.mark.parametrize("kind", ["hamming", "hanning", "fermi"])
def test_filter_equals_the_window_in_kspace(kind):
    """One coil, fully sampled: k-space of the filtered image / unfiltered = the window."""
    img = phantom(N)
    k = fft_c(img[None], axes=(1, 2))
    plain = _recon(k).data[:, :, 0]
    filtered = _recon(k, filter=kind)
    ratio_k = fft_c(filtered.data[:, :, 0]) / np.where(np.abs(fft_c(plain)) > 0,
                                                        fft_c(plain), 1)
    window = kspace_window(normalised_kspace_radius((N, N)), kind)
    strong = np.abs(fft_c(plain)) > 1e-3 * np.abs(fft_c(plain)).max()
    np.testing.assert_allclose(ratio_k[strong], window[strong], atol=2e-4)
    assert filtered.meta["recon"]["filter"] == kind  # in the sidecar's settings


def test_filter_window_is_the_simulators():
    """The recon and the simulator's vendor chain use one definition of each window."""
    from mrharmony.simulation.native import kspace_filter_weights

    k = np.linspace(0, 1.3, 27)
    for kind in ("none", "hamming", "hanning", "fermi"):
        np.testing.assert_array_equal(kspace_filter_weights(k, kind), kspace_window(k, kind))


def _partial_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[:N, :N] - N / 2) / N
    mag = np.abs(phantom(N))
    phase = 0.8 * x - 0.5 * y + 0.3 * rng.standard_normal() * x * y  # smooth phase
    img = (mag * np.exp(1j * phase)).astype(np.complex64)
    k = fft_c(img[None], axes=(1, 2))
    lines = np.arange(N // 8 * 2, N)  # partial Fourier 6/8 along ky (first quarter missing)
    return mag, k, lines


@pytest.mark.parametrize(("method", "limit"), [("pocs", 0.03), ("homodyne", 0.11)])
def test_partial_fourier_pocs_and_homodyne_restore_the_object(method, limit):
    """6/8 partial Fourier of a Shepp-Logan with a smooth phase: POCS within 3 % NRMSE;
    homodyne (real part after phase demodulation) within 11 %, its known error at the
    object's sharp edges."""
    mag, k, lines = _partial_case()
    full = np.linalg.norm(mag)
    zero = np.abs(_recon(k, lines=lines, partial_fourier_method="zero").data[:, :, 0])
    out = _recon(k, lines=lines, partial_fourier_method=method)
    rec = np.abs(out.data[:, :, 0])
    nrmse = np.linalg.norm(rec - mag) / full
    nrmse_zero = np.linalg.norm(zero - mag) / full
    assert nrmse < limit, nrmse
    assert nrmse < 0.75 * nrmse_zero, nrmse_zero  # zero filling blurs and rings
    assert out.meta["recon"]["partial_fourier"] == f"{method}-ky"
    assert out.meta["recon"]["partial_fourier_method"] == method


def _shaded_coils():
    """Two coils whose amplitudes add up to a uniform (body-coil-like) sum but whose
    root sum of squares shades the image by ~30 % across the field of view."""
    y, x = (np.mgrid[:N, :N] - N / 2) / (N / 2)
    a1, a2 = 0.5 + 0.45 * x, 0.5 - 0.45 * x
    return np.stack([a1 * np.exp(0.4j), a2 * np.exp(-0.9j)]).astype(np.complex64), x, y


def test_prescan_normalisation_flattens_a_known_receive_shading():
    sens, x, y = _shaded_coils()
    disc = (x**2 + y**2) < 0.8**2
    k = fft_c(sens * disc.astype(np.complex64)[None], axes=(1, 2))
    core = (x**2 + y**2) < 0.6**2

    def cov(im):
        return float(np.std(im[core]) / np.mean(im[core]))

    rss = _recon(k).data[:, :, 0]
    pre = _recon(k, intensity_normalization="prescan")
    flat = pre.data[:, :, 0]
    assert cov(rss) > 0.03  # the array's profile shades the uniform disc
    assert cov(flat) < 0.01  # the body-coil-like profile is flat here
    assert abs(np.mean(flat[core]) / np.mean(rss[core]) - 1) < 0.1  # scale kept
    assert pre.meta["recon"]["intensity_normalization"] == "prescan"


def test_max_normalisation_and_coil_combinations():
    sens, _, _ = _shaded_coils()
    obj = np.abs(phantom(N))
    k = fft_c(sens * obj[None], axes=(1, 2))
    peak = _recon(k, intensity_normalization="max").data
    assert np.max(np.abs(peak)) == pytest.approx(1.0, rel=1e-6)
    rss = _recon(k).data[:, :, 0]
    inside = obj > 0.1 * obj.max()
    for how, label in (("adaptive", "adaptive"), ("sense", "sense")):
        out = _recon(k, coil_combine=how)
        img = out.data[:, :, 0]
        assert out.meta["recon"]["coil_combine"] == how
        assert out.meta["recon"]["coil_combination"].startswith(label)
        # noise-free: every combination is |object| x the array's RSS profile
        rel = np.linalg.norm(img[inside] - rss[inside]) / np.linalg.norm(rss[inside])
        assert rel < 0.05, (how, rel)


def test_defaults_are_todays_recon():
    sens, _, _ = _shaded_coils()
    k = fft_c(sens * np.abs(phantom(N))[None], axes=(1, 2))
    plain = _recon(k)
    explicit = _recon(k, coil_combine="rss", filter="none", partial_fourier_method="pocs",
                      intensity_normalization="none")
    np.testing.assert_array_equal(plain.data, explicit.data)
    assert plain.meta["recon"]["coil_combination"] == "sum of squares"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"filter": "kaiser"}, r"option filter = 'kaiser': expected one of none, hamming"),
        ({"coil_combine": "mean"}, r"option coil_combine = 'mean'"),
        ({"partial_fourier_method": "margosian"}, r"partial_fourier_method = 'margosian'"),
        ({"intensity_normalization": "n4"}, r"intensity_normalization = 'n4'"),
        ({"filter": "hamming", "filter_radius": 0.8}, r"filter_radius is the Fermi"),
        ({"filter": "fermi", "filter_width": -1.0}, r"filter_width = -1.0"),
        ({"coil_filter": "x"}, r"coil_filter: no method takes them"),
    ],
)
def test_unknown_option_values_are_refused(options, match):
    k = fft_c(phantom(N)[None], axes=(1, 2))
    with pytest.raises(ReconError, match=match):
        _recon(k, **options)


def test_sense_does_not_take_a_coil_combination():
    sens, _, _ = _shaded_coils()
    k = fft_c(sens * phantom(N)[None], axes=(1, 2))
    header = make_header(N, N, coils=2)
    with pytest.raises(ReconError, match=r"method 'sense' does not take option\(s\) "
                                         "coil_combine"):
        reconstruct_acquisitions(header, make_acquisitions(k), method="sense",
                                 backend="numpy", coil_combine="adaptive")


def test_cli_flags_reach_the_sidecar(tmp_path):
    import json

    from test_recon_io import write_raw

    from mrharmony.cli import main

    sens, _, _ = _shaded_coils()
    k = fft_c(sens * np.abs(phantom(N))[None], axes=(1, 2))
    raw = write_raw(tmp_path / "r.h5", make_header(N, N, coils=2), make_acquisitions(k))
    out = tmp_path / "img.nii.gz"
    assert main(["recon", str(raw), "-o", str(out), "--backend", "numpy", "--method", "fft",
                 "--filter", "hanning", "--coil-combine", "adaptive",
                 "--intensity-normalization", "prescan"]) == 0
    settings = json.loads((tmp_path / "img.json").read_text())["ReconstructionSettings"]
    assert settings["filter"] == "hanning" and settings["coil_combine"] == "adaptive"
    assert settings["intensity_normalization"] == "prescan"
