"""Analytic phantoms: NIST system and diffusion phantoms, MR Shepp-Logan."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from mrharmony.errors import PhantomError
from mrharmony.phantoms import (
    make_diffusion_phantom,
    make_shepp_logan,
    make_system_phantom,
    pvp_adc_mm2_s,
    system_reference,
)
from mrharmony.phantoms.diffusion import (
    VIAL_CONCENTRATIONS_PCT,
    vial_centres_mm,
    water_diffusivity_mm2_s,
)
from mrharmony.phantoms.system import SYSTEM_REFERENCE, system_spheres


@pytest.mark.parametrize("field_t", [1.5, 3.0])
def test_system_sphere_means_equal_reference_exactly(field_t):
    p = make_system_phantom(field_t, matrix=64, three_d=True)
    ref = system_reference(field_t)
    assert p.field_t == field_t
    for label, vals in ref.items():
        inside = p.labels == label
        assert inside.sum() > 0, label
        # float32 storage of the tabulated value: exact to float32 rounding
        assert p.t1_ms[inside].mean(dtype=np.float64) == pytest.approx(
            float(np.float32(vals["t1_ms"])), rel=1e-7, abs=0)
        assert p.t2_ms[inside].mean(dtype=np.float64) == pytest.approx(
            float(np.float32(vals["t2_ms"])), rel=1e-7, abs=0)
    assert len(ref) == 28


def test_system_reference_table_values():
    # Stupic et al. 2021: 3 T NiCl2 sphere 1 T1 = 1989 ms; 1.5 T MnCl2 sphere 14 T2 = 8.15 ms
    assert system_reference(3.0)[1]["t1_ms"] == 1989.0
    assert system_reference(1.5)[28]["t2_ms"] == 8.15
    for table in SYSTEM_REFERENCE.values():
        t1, t2 = np.array(table["t1_ms"]), np.array(table["t2_ms"])
        assert len(t1) == len(t2) == 14
        assert np.all(np.diff(t1) < 0)  # sphere 1 has the longest T1
        assert np.all(t2 <= t1)
    # near-certified fields use the certified table (Siemens 2.89 T)
    assert system_reference(2.89) == system_reference(3.0)


@pytest.mark.parametrize("field_t", [0.55, 7.0, 2.0])
def test_system_unsupported_field_is_refused(field_t):
    with pytest.raises(PhantomError, match="no NIST system-phantom reference values"):
        make_system_phantom(field_t)


def test_system_sphere_positions_and_diameters_match_geometry():
    # 1.5 mm voxels (matrix 160 over 240 mm): centroid within 0.2 mm, volume within 3 %
    p = make_system_phantom(3.0, matrix=160, three_d=True)
    vox = p.voxel_size_mm[0]
    spheres = system_spheres()
    index = [s.label for s in spheres]
    centres = ndi.center_of_mass(np.ones(p.shape), p.labels, index)
    counts = ndi.sum_labels(np.ones(p.shape), p.labels, index)
    for s, ijk, n in zip(spheres, centres, counts, strict=True):
        centre = p.affine[:3, :3] @ np.array(ijk) + p.affine[:3, 3]
        np.testing.assert_allclose(centre, s.centre_mm, atol=0.2)
        volume = n * vox ** 3
        assert volume == pytest.approx(4 / 3 * math.pi * s.radius_mm ** 3, rel=0.03)
    # the ring geometry itself: outer ring radius 49 mm, inner 27 mm, plates at -/+20 mm
    radii = sorted({round(math.hypot(s.centre_mm[0], s.centre_mm[1]), 6)
                    for s in system_spheres()})
    assert radii == [27.0, 49.0]
    # shell: 200 mm diameter sphere of fill
    filled = (p.labels > 0).sum() * vox ** 3
    assert filled == pytest.approx(4 / 3 * math.pi * 100.0 ** 3, rel=0.01)


def test_system_2d_slice_through_each_plate():
    for array, labels in (("t1", range(1, 15)), ("t2", range(15, 29))):
        p = make_system_phantom(3.0, matrix=128, array=array)
        assert p.is_2d
        assert set(np.unique(p.labels)) == {0, 29, *labels}
        z = p.affine[2, 3]
        assert abs(z - (-20.0 if array == "t1" else 20.0)) <= p.voxel_size_mm[2] / 2
        # the equatorial cross-section area of each sphere is pi r^2 (+-15 % at 1.9 mm)
        area = (p.labels == labels[0]).sum() * p.voxel_size_mm[0] ** 2
        assert area == pytest.approx(math.pi * 10.0 ** 2, rel=0.15)


def test_system_bad_arguments():
    with pytest.raises(PhantomError, match="slice_index: 200"):
        make_system_phantom(3.0, matrix=64, slice_index=200)
    with pytest.raises(PhantomError, match="matrix"):
        make_system_phantom(3.0, matrix=4)
    with pytest.raises(PhantomError, match="array"):
        make_system_phantom(3.0, array="pd")  # type: ignore[arg-type]


def test_water_diffusivity_matches_literature():
    # Holz et al. 2000: 1.099e-3 (0 C), 2.023e-3 (25 C is 2.299e-3), ~3.0e-3 mm2/s (37 C)
    assert water_diffusivity_mm2_s(0.0) == pytest.approx(1.099e-3, rel=2e-3)
    assert water_diffusivity_mm2_s(25.0) == pytest.approx(2.299e-3, rel=5e-3)
    assert water_diffusivity_mm2_s(37.0) == pytest.approx(3.0e-3, rel=0.02)


def test_diffusion_vial_adc_equals_reference():
    p = make_diffusion_phantom(matrix=128)
    expected = pvp_adc_mm2_s(np.array(VIAL_CONCENTRATIONS_PCT), 0.0)
    for i, adc in enumerate(expected):
        inside = p.labels == i + 1
        assert inside.sum() > 100
        np.testing.assert_allclose(p.adc_mm2_s[inside], np.float32(adc), rtol=0)
    # Amouzandeh 2022 quadratic at 0 C: 0 % = D_water, 50 % = 0.1525 D_water
    assert expected[0] == pytest.approx(1.099e-3, rel=2e-3)
    assert pvp_adc_mm2_s(50.0) == pytest.approx(0.1525 * water_diffusivity_mm2_s(0.0))
    assert np.all(np.diff(pvp_adc_mm2_s(np.arange(0, 51, 10.0))) < 0)
    assert p.metadata["reference_maps"] == ["adc_mm2_s"]


def test_diffusion_geometry_and_temperature():
    p = make_diffusion_phantom(matrix=120, three_d=True)  # 2 mm voxels
    vox = p.voxel_size_mm[0]
    index = list(range(1, 14))
    centres = ndi.center_of_mass(np.ones(p.shape), p.labels, index)
    counts = ndi.sum_labels(np.ones(p.shape), p.labels, index)
    for (cx, cy), ijk, n in zip(vial_centres_mm(), centres, counts, strict=True):
        c = p.affine[:3, :3] @ np.array(ijk) + p.affine[:3, 3]
        np.testing.assert_allclose(c, (cx, cy, 0.0), atol=0.2)
        # cylinder 25 mm x 50 mm: volume within 5 % at 2 mm voxels
        assert n * vox ** 3 == pytest.approx(math.pi * 12.5 ** 2 * 50.0, rel=0.05)
    warm = make_diffusion_phantom(matrix=64, temperature_c=20.0)
    assert warm.adc_mm2_s[warm.labels == 1].mean() == pytest.approx(2.023e-3, rel=2e-3)


@pytest.mark.parametrize("field_t", [0.55, 1.5, 3.0, 7.0])
def test_shepp_logan_values_follow_gach_power_law(field_t):
    p = make_shepp_logan(field_t, matrix=128)
    names = {v: k for k, v in p.label_names.items()}
    gm = p.t1_ms[p.labels == names["gray-matter"]]
    wm = p.t1_ms[p.labels == names["white-matter"]]
    # Gach 2008: T1 = A * B0^C seconds, GM A=0.857 C=0.376, WM A=0.583 C=0.382
    np.testing.assert_allclose(gm, np.float32(857.0 * field_t ** 0.376), rtol=1e-6)
    np.testing.assert_allclose(wm, np.float32(583.0 * field_t ** 0.382), rtol=1e-6)
    assert np.all(p.t1_ms[p.labels == names["csf"]] == 4200.0)
    assert set(names) >= {"scalp", "marrow", "csf", "gray-matter", "white-matter", "tumor"}


def test_shepp_logan_3d_and_slice():
    p3 = make_shepp_logan(3.0, matrix=64, three_d=True)
    assert p3.shape == (64, 64, 64)
    # default 2-D slice is Gach's z = -0.25 (of the 120 mm half FOV)
    p2 = make_shepp_logan(3.0, matrix=64)
    assert p2.affine[2, 3] == pytest.approx(-30.0, abs=p2.voxel_size_mm[2] / 2)
    k = round((p2.affine[2, 3] - p3.affine[2, 3]) / p3.voxel_size_mm[2])
    assert np.array_equal(p3.labels[:, :, k], p2.labels[:, :, 0])
