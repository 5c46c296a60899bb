"""Virtual sites: presets, validation, coil physics (Biot-Savart), noise model, field maps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mrharmony.errors import SiteError
from mrharmony.sequences import list_scanners, load_protocol
from mrharmony.simulation import Site, list_sites, load_site
from mrharmony.simulation.coils import (
    MU0_T_M_PER_A,
    loop_field_t,
    make_coil_array,
    noise_covariance,
    receive_sensitivities,
)
from mrharmony.simulation.native import (
    RF_SHAPE_APODIZATION,
    kspace_filter_weights,
    native_changes,
    native_protocol,
    prescan_normalize,
)
from mrharmony.simulation.noise import (
    correlated_noise,
    noise_sigma,
    readout_filter_response,
    snr_at_field,
)
from mrharmony.simulation.site import (
    _real_solid_harmonics,
    b0_residual_hz,
    b1_scale_map,
    lps_positions_mm,
    site_from_mapping,
)

from conftest import EXAMPLES

# ------------------------------------------------------------------ presets and validation


def test_presets_cover_vendors_and_fields():
    names = list_sites()
    assert len(names) >= 6
    sites = [load_site(n) for n in names]
    vendors = {s.vendor for s in sites}
    assert {"Siemens", "GE", "Philips", "United Imaging"} <= vendors
    assert {1.5, 3.0} <= {s.field_strength_t for s in sites}
    for s in sites:
        assert s.scanner in list_scanners()  # every preset names a sequence-library profile
        assert s.description and s.coil.channels >= 8
    spoil = {s.vendor: s.native.rf_spoiling_inc_deg for s in sites}
    assert (spoil["Siemens"], spoil["GE"], spoil["Philips"]) == (50.0, 117.0, 150.0)


def test_site_roundtrip_and_user_toml(tmp_path):
    site = load_site("siemens-prisma-3t")
    assert site_from_mapping(site.to_mapping()) == site
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nscanner = "ge-signa-premier"\n[coil]\nchannels = 8\n')
    mine = load_site(path)
    assert (mine.coil.channels, mine.field_strength_t, mine.vendor) == (8, 3.0, "GE")
    assert load_site(mine) is mine


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "x"\nscanner = "siemens-prisma"\n[coil]\nchanels = 8\n', "mean 'channels'"),
        ('name = "x"\nscanner = "siemens-prisma"\n[b0]\nresidual_hz = 3\n', "wrong unit"),
        ('name = "x"\nscanner = "siemens-prisma"\n[receiver]\nsnr_ref = -1\n', "snr_ref"),
        ('name = "x"\nscanner = "nope"\n', "unknown scanner 'nope'"),
        ('name = "x"\nscaner = "siemens-prisma"\n', "scaner: unknown key"),
        ('scanner = "siemens-prisma"\n', "name: missing required key"),
        ('name = "x"\nscanner = "siemens-prisma"\ncoil = 3\n', "expected a table [coil]"),
    ],
)
def test_bad_site_files_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SiteError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_site(path)


def test_unknown_site_name_suggests():
    with pytest.raises(SiteError, match="did you mean 'siemens-prisma-3t'"):
        load_site("siemens-prisma-3")


# ------------------------------------------------------------------ coils (Biot-Savart)


def _numeric_biot_savart(points, center, normal, radius, n_seg=4000):
    """Reference: sum of straight segments of the loop (dl x r / |r|^3)."""
    normal = np.asarray(normal, float) / np.linalg.norm(normal)
    u = np.cross(normal, [1.0, 0, 0] if abs(normal[0]) < 0.9 else [0, 1.0, 0])
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    phi = np.linspace(0, 2 * np.pi, n_seg + 1)
    wire = center + radius * (np.cos(phi)[:, None] * u + np.sin(phi)[:, None] * v)
    mid = 0.5 * (wire[1:] + wire[:-1])
    dl = np.diff(wire, axis=0)
    r = points[:, None, :] - mid[None]
    return MU0_T_M_PER_A / (4 * np.pi) * np.sum(
        np.cross(dl[None], r) / np.linalg.norm(r, axis=-1, keepdims=True) ** 3, axis=1
    )


def test_loop_field_on_axis_matches_analytic_formula():
    a = 0.05
    z = np.linspace(-0.2, 0.2, 41)
    pts = np.stack([np.zeros_like(z), np.zeros_like(z), z], axis=1)
    b = loop_field_t(pts, np.zeros(3), np.array([0, 0, 1.0]), a)
    analytic = MU0_T_M_PER_A * a**2 / (2 * (a**2 + z**2) ** 1.5)
    np.testing.assert_allclose(b[:, 2], analytic, rtol=1e-10)  # exact formula on the axis
    np.testing.assert_allclose(b[:, :2], 0.0, atol=1e-18)


def test_loop_field_off_axis_matches_numeric_biot_savart():
    rng = np.random.default_rng(3)
    center, normal, a = np.array([0.01, -0.02, 0.03]), np.array([1.0, 2.0, -0.5]), 0.04
    pts = center + rng.uniform(-0.1, 0.1, size=(50, 3))
    keep = np.linalg.norm(pts - center, axis=1) > 0.6 * a  # stay off the wire
    ref = _numeric_biot_savart(pts[keep], center, normal, a)
    got = loop_field_t(pts[keep], center, normal, a)
    # 4000 straight segments: discretisation error ~1e-6 relative.
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_sensitivity_falls_off_along_loop_axis_as_biot_savart_predicts():
    array = make_coil_array(8, geometry="cylinder", radius_mm=140.0)
    a = array.loop_radius_m
    c, n = array.centers_m[0], array.normals[0]
    d = np.linspace(0.01, 0.12, 12)  # metres inward from loop 0 along its axis
    pos_mm = (c[None] - d[:, None] * n[None]) * 1e3
    sens = receive_sensitivities(array, pos_mm)[0]
    # Loop 0's normal is along x, so its transverse field is B_x: |B1-| = |B_axis(d)|.
    ratio = np.abs(sens) / np.abs(sens[0])
    expected = (a**2 + d[0] ** 2) ** 1.5 / (a**2 + d**2) ** 1.5
    np.testing.assert_allclose(ratio, expected, rtol=1e-6)


def test_array_layouts_and_normalisation():
    for ch, geom in ((8, "cylinder"), (16, "cylinder"), (32, "helmet")):
        arr = make_coil_array(ch, geometry=geom, radius_mm=130.0)
        assert arr.n_channels == ch and len(set(arr.labels)) == ch
        dist = np.linalg.norm(arr.centers_m[:, None] - arr.centers_m[None], axis=-1)
        np.fill_diagonal(dist, np.inf)
        # neighbours overlap: nearest centre distance about 1.5 loop radii (within 35 %)
        assert np.median(dist.min(axis=1)) == pytest.approx(1.5 * arr.loop_radius_m, rel=0.35)
    rng = np.random.default_rng(0)
    pos = rng.uniform(-70, 70, size=(500, 3))
    sens = receive_sensitivities(make_coil_array(16), pos)
    rss = np.sqrt(np.sum(np.abs(sens) ** 2, axis=0))
    assert rss.mean() == pytest.approx(1.0, rel=1e-5)
    # centre of the head is darker than the periphery for a surface array
    radius = np.linalg.norm(pos, axis=1)
    assert rss[radius < 30].mean() < rss[radius > 80].mean()
    with pytest.raises(SiteError, match="minimum 2"):
        make_coil_array(1)


def test_noise_covariance_from_overlap():
    arr = make_coil_array(8, radius_mm=140.0)
    rng = np.random.default_rng(1)
    pos = rng.uniform(-60, 60, size=(3000, 3))
    psi = noise_covariance(arr, pos, coupling=0.3)
    np.testing.assert_allclose(np.diag(psi), 1.0)
    np.testing.assert_allclose(psi, psi.T)
    assert np.linalg.eigvalsh(psi).min() > 0.5  # (1 - kappa) I + kappa C, C PSD
    # neighbours correlate more than opposite loops
    assert abs(psi[0, 1]) > abs(psi[0, 4])
    np.testing.assert_allclose(noise_covariance(arr, pos, coupling=0.0), np.eye(8))
    with pytest.raises(SiteError, match="noise_coupling"):
        noise_covariance(arr, pos, coupling=1.0)


# ------------------------------------------------------------------ noise


def test_correlated_noise_has_the_requested_covariance():
    rng = np.random.default_rng(7)
    a = rng.standard_normal((4, 4))
    psi = a @ a.T + 4 * np.eye(4)
    noise = correlated_noise(psi, np.full(200_000, 0.5), np.random.default_rng(11))
    est = noise @ noise.conj().T / noise.shape[1]
    # E[n n^H] = 2 sigma^2 Psi; 2e5 samples: relative error ~ 1/sqrt(2e5) ~ 0.2 %, allow 2 %.
    np.testing.assert_allclose(est.real, 2 * 0.25 * psi, rtol=0.02, atol=0.02 * psi.max())
    with pytest.raises(SiteError, match="positive definite"):
        correlated_noise(-np.eye(2), np.ones(3), np.random.default_rng(0))


def test_noise_scales_with_dwell_voxel_volume_and_field():
    s1 = noise_sigma(snr=10.0, voxel_volume_mm3=1.0, dwell_s=10e-6)
    assert noise_sigma(snr=10.0, voxel_volume_mm3=1.0, dwell_s=40e-6) == pytest.approx(s1 / 2)
    assert noise_sigma(snr=10.0, voxel_volume_mm3=8.0, dwell_s=10e-6) == pytest.approx(s1 / 8)
    assert snr_at_field(10.0, 1.5, field_exponent=1.65) == pytest.approx(10 * 0.5**1.65)
    assert snr_at_field(10.0, 3.0, field_exponent=1.0) == pytest.approx(10.0)
    with pytest.raises(SiteError):
        noise_sigma(snr=10.0, voxel_volume_mm3=1.0, dwell_s=0.0)


def test_image_snr_matches_the_model():
    """A uniform PD=1 object, FFT reconstructed: SNR = snr * V_recon * sqrt(N * dwell)."""
    n, dwell, v_ph, snr = 64, 5e-6, 2.0, 4.0
    sigma = noise_sigma(snr=snr, voxel_volume_mm3=v_ph, dwell_s=np.full(n * n, dwell))
    noise = correlated_noise(np.eye(1), sigma, np.random.default_rng(5))[0].reshape(n, n)
    k = np.zeros((n, n), complex)
    k[n // 2, n // 2] = n * n  # one phantom voxel per recon voxel, PD 1 everywhere
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k + noise)))
    measured = img.real.mean() / img.real.std()
    expected = snr * v_ph * math.sqrt(n * n * dwell)
    assert measured == pytest.approx(expected, rel=0.05)  # 4096 noise samples: ~1.1 % std


def test_readout_filter_response():
    r = readout_filter_response(256, rolloff=0.1)
    assert r[0] == 1.0 and r[128] == pytest.approx(0.5, abs=0.02)  # -6 dB at the band edge
    assert np.all(np.diff(r[:129]) <= 1e-7)
    assert np.all(readout_filter_response(64, rolloff=0.0) == 1.0)


# ------------------------------------------------------------------ field maps


def test_b0_residual_has_the_requested_rms_and_no_shimmable_part():
    site = load_site("siemens-prisma-3t")
    shape = (24, 24, 24)
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = -92.0
    pos = lps_positions_mm(affine, shape)
    mask = np.linalg.norm(pos, axis=1) < 90
    b0 = b0_residual_hz(site, affine, shape, mask=mask).reshape(-1)
    target = site.b0.residual_ppm * site.larmor_hz * 1e-6
    assert np.sqrt(np.mean(b0[mask] ** 2)) == pytest.approx(target, rel=1e-4)
    # Orthogonal to the degrees a 2nd-order shim corrects (0..2) over a ball, to 5 %
    # of the norms (the voxel grid only approximates the sphere).
    for degree in (0, 1, 2):
        basis = _real_solid_harmonics(pos[mask], degree, 90.0)
        proj = basis @ b0[mask] / (np.linalg.norm(basis, axis=1) * np.linalg.norm(b0[mask]))
        assert np.abs(proj).max() < 0.05
    assert np.array_equal(b0, b0_residual_hz(site, affine, shape, mask=mask).reshape(-1))
    flat = Site(name="flat", scanner="siemens-prisma")
    assert not b0_residual_hz(flat, affine, shape).any()


def test_b1_map_centre_brightening():
    site = load_site("siemens-prisma-3t")
    affine = np.diag([10.0, 10.0, 10.0, 1.0])
    affine[:3, 3] = -90.0
    b1 = b1_scale_map(site, affine, (19, 19, 19))
    centre = b1[9, 9, 9]
    assert centre == pytest.approx(site.b1.scale * (1 + site.b1.center_pct / 100), rel=1e-5)
    assert b1[0, 9, 9] < centre and b1[9, 0, 9] < centre
    low = b1_scale_map(load_site("philips-ingenia-1.5t"), affine, (19, 19, 19))
    assert np.ptp(low) < np.ptp(b1)  # less dielectric effect at 1.5 T


# ------------------------------------------------------------------ native flavour


def test_native_protocol_uses_vendor_choices():
    proto = load_protocol(EXAMPLES / "gre2d.toml")
    for name, inc in (("siemens-prisma-3t", 50.0), ("ge-mr750-3t", 117.0),
                      ("philips-elition-3t", 150.0)):
        site = load_site(name)
        nat = native_protocol(proto, site)
        assert nat.rf_spoiling_inc_deg == inc
        assert nat.rf_time_bw_product == site.native.rf_time_bw_product
        assert type(nat) is type(proto) and proto.rf_spoiling_inc_deg == 117.0  # unchanged
        rec = native_changes(proto, site)["recorded"]
        assert rec["rf_shape"] == site.native.rf_shape
        # pulse window and spoiler moments are protocol fields, so they are applied
        assert nat.rf_apodization == RF_SHAPE_APODIZATION[site.native.rf_shape]
        assert nat.spoiler_cycles_per_voxel == site.native.spoiler_cycles_per_voxel
        assert nat.crusher_cycles_per_slice == site.native.crusher_cycles_per_slice
    bssfp = load_protocol(EXAMPLES / "bssfp.toml") if (EXAMPLES / "bssfp.toml").exists() else None
    if bssfp is not None:
        assert native_protocol(bssfp, load_site("ge-mr750-3t")).rf_time_bw_product == (
            bssfp.rf_time_bw_product)


def test_kspace_filters_and_prescan_normalisation():
    k = np.linspace(0, 1, 11)
    np.testing.assert_allclose(kspace_filter_weights(k, "hamming")[[0, -1]], [1.0, 0.08],
                               atol=1e-6)
    np.testing.assert_allclose(kspace_filter_weights(k, "hanning")[[0, -1]], [1.0, 0.0],
                               atol=1e-6)
    fermi = kspace_filter_weights(np.array([0.0, 0.9, 1.2]), "fermi", radius=0.9, width=0.05)
    np.testing.assert_allclose(fermi, [1.0, 0.5, 1 / (1 + np.exp(6))], rtol=1e-5)
    assert np.all(kspace_filter_weights(k, "none") == 1)
    with pytest.raises(SiteError, match="unknown filter"):
        kspace_filter_weights(k, "kaiser")
    rng = np.random.default_rng(2)
    sens = (rng.standard_normal((4, 100)) + 1j * rng.standard_normal((4, 100))).astype(
        np.complex64)
    flat = prescan_normalize(sens)
    rss = np.sqrt(np.sum(np.abs(flat) ** 2, axis=0))
    before = np.sqrt(np.sum(np.abs(sens) ** 2, axis=0))
    np.testing.assert_allclose(rss, before.mean(), rtol=1e-4)
