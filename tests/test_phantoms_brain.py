"""MNI152 brain phantom: fractions, field-dependent relaxation, mixing, offline build, memory."""

from __future__ import annotations

import socket
import tracemalloc

import numpy as np
import pytest

from mrharmony.errors import PhantomError
from mrharmony.phantoms import TissueFractions, make_brain_phantom, mix_tissues, tissue_values
from mrharmony.phantoms.brain import brain_fractions, load_mni_fractions
from mrharmony.phantoms.relaxation import CITED_RANGES_3T, TABULATED_FIELDS_T, TISSUES


@pytest.fixture(scope="module")
def fractions_1mm() -> TissueFractions:
    return load_mni_fractions()


def test_fractions_sum_to_brain_mask(fractions_1mm):
    fr = fractions_1mm
    total = fr.brain_fraction()
    mask = total > 0
    # GM + WM + CSF == 1 inside the mask, 0 outside (float32 rounding: 1e-6)
    np.testing.assert_allclose(total[mask], 1.0, atol=1e-6)
    assert np.all(total[~mask] == 0)
    for name in TISSUES:
        f = getattr(fr, name)
        assert f.dtype == np.float32 and f.min() >= 0 and f.max() <= 1
    vols = fr.volumes_ml()
    # MNI 2009a template (enlarged young-adult average): ICV ~1.9 L, WM ~670 mL
    assert 1800 < vols["icv"] < 1950
    assert 600 < vols["wm"] < 750 and 900 < vols["gm"] < 1200 and 80 < vols["csf"] < 300
    # the lateral ventricles (MNI (+-5, 0, 18) area... here x=-5) are CSF
    ijk = np.round(np.linalg.solve(fr.affine, [-5.0, 0.0, 18.0, 1.0])[:3]).astype(int)
    assert fr.csf[tuple(ijk)] > 0.9


@pytest.mark.parametrize("tissue", ["gm", "wm", "csf"])
def test_tissue_t1_at_3t_within_cited_ranges(tissue):
    lo, hi = CITED_RANGES_3T["t1_ms"][tissue]
    assert lo <= tissue_values(tissue, 3.0).t1_ms <= hi
    if tissue in CITED_RANGES_3T["t2_ms"]:
        lo, hi = CITED_RANGES_3T["t2_ms"][tissue]
        assert lo <= tissue_values(tissue, 3.0).t2_ms <= hi


def test_relaxation_field_dependence():
    for tissue in TISSUES:
        vals = [tissue_values(tissue, b) for b in TABULATED_FIELDS_T]
        for v in vals:
            assert v.t2star_ms <= v.t2_ms <= v.t1_ms
        if tissue != "csf":
            t1 = [v.t1_ms for v in vals]
            assert np.all(np.diff(t1) > 0)  # T1 lengthens with B0 (Rooney 2007)
            assert np.all(np.diff([v.t2star_ms for v in vals]) < 0)  # T2* shortens
    # log-log interpolation between tabulated fields: a power law through the neighbours
    a, b = tissue_values("wm", 1.5).t1_ms, tissue_values("wm", 3.0).t1_ms
    assert tissue_values("wm", 2.0).t1_ms == pytest.approx(
        a * (b / a) ** (np.log(2.0 / 1.5) / np.log(2.0)))
    with pytest.raises(PhantomError, match=r"field_t: 9\.4 T outside"):
        tissue_values("gm", 9.4)
    with pytest.raises(PhantomError, match="tissue 'bone' unknown"):
        tissue_values("bone", 3.0)


def test_partial_volume_mixing_is_signal_weighted():
    shape = (3, 1, 1)
    gm = np.array([1.0, 0.5, 0.0], np.float32).reshape(shape)
    wm = np.array([0.0, 0.5, 0.0], np.float32).reshape(shape)
    csf = np.zeros(shape, np.float32)
    fr = TissueFractions(csf, gm, wm, np.eye(4))
    values = {t: tissue_values(t, 3.0) for t in TISSUES}
    p = mix_tissues(fr, values, field_t=3.0)
    g, w = values["gm"], values["wm"]
    wg, ww = 0.5 * g.pd, 0.5 * w.pd
    # R1 = (w_gm R1_gm + w_wm R1_wm) / (w_gm + w_wm)
    t1_mix = (wg + ww) / (wg / g.t1_ms + ww / w.t1_ms)
    assert p.t1_ms[1, 0, 0] == pytest.approx(t1_mix, rel=1e-6)
    assert p.pd[1, 0, 0] == pytest.approx(wg + ww, rel=1e-6)
    assert p.adc_mm2_s[1, 0, 0] == pytest.approx(
        (wg * g.adc_mm2_s + ww * w.adc_mm2_s) / (wg + ww), rel=1e-6)
    assert p.t1_ms[0, 0, 0] == pytest.approx(g.t1_ms)
    assert p.pd[2, 0, 0] == 0 and p.labels[2, 0, 0] == 0
    assert p.labels[0, 0, 0] == 2


@pytest.mark.parametrize("field_t", [0.55, 1.5, 3.0, 7.0])
def test_brain_phantom_at_each_field(field_t, fractions_1mm):
    p = make_brain_phantom(field_t, voxel_size_mm=4.0)
    assert p.field_t == field_t and not p.is_2d
    assert p.voxel_size_mm == pytest.approx((4.0, 4.0, 4.0))
    wm_pure = p.labels == 3
    # voxels that are mostly WM have T1 between the WM and GM values
    t1 = p.t1_ms[wm_pure]
    assert np.median(t1) < tissue_values("gm", field_t).t1_ms
    assert t1.min() >= tissue_values("wm", field_t).t1_ms * (1 - 1e-6)
    # resampled fractions keep the volumes (linear resampling): within 1 %
    vols = p.metadata["volumes_ml"]
    for name in ("gm", "wm", "csf", "icv"):
        assert vols[name] == pytest.approx(fractions_1mm.volumes_ml()[name], rel=0.01)


def test_brain_matrix_and_slice_options():
    p = make_brain_phantom(3.0, matrix=64, three_d=False)
    assert p.shape == (64, 64, 1)
    assert p.affine[2, 3] == pytest.approx(10.0, abs=p.voxel_size_mm[2] / 2)
    assert set(np.unique(p.labels)) == {0, 1, 2, 3}
    p3 = make_brain_phantom(3.0, matrix=64, three_d=True)
    k = round((p.affine[2, 3] - p3.affine[2, 3]) / p3.voxel_size_mm[2])
    np.testing.assert_array_equal(p3.t1_ms[:, :, k], p.t1_ms[:, :, 0])
    with pytest.raises(PhantomError, match="slice_index: 99"):
        make_brain_phantom(3.0, matrix=64, three_d=False, slice_index=99)
    with pytest.raises(PhantomError, match="matrix or voxel_size_mm"):
        make_brain_phantom(3.0, matrix=64, voxel_size_mm=2.0)


def test_brain_deterministic_and_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    brain_fractions.cache_clear()
    load_mni_fractions.cache_clear()
    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    a = make_brain_phantom(3.0, voxel_size_mm=4.0, three_d=False)
    brain_fractions.cache_clear()
    load_mni_fractions.cache_clear()
    b = make_brain_phantom(3.0, voxel_size_mm=4.0, three_d=False)
    assert a == b


def test_brain_1mm_3d_fits_in_1_gib():
    brain_fractions.cache_clear()
    load_mni_fractions.cache_clear()
    tracemalloc.start()
    try:
        p = make_brain_phantom(3.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert p.shape == (197, 233, 189) and p.voxel_size_mm == pytest.approx((1.0, 1.0, 1.0))
    assert peak < 1024 ** 3, f"peak {peak / 2**20:.0f} MiB"
