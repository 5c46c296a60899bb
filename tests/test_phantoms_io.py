"""Phantom type: validation errors name the map; NIfTI + JSON round trip is bit-exact."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mrharmony.errors import PhantomError
from mrharmony.phantoms import Phantom, load_phantom


def _phantom(shape=(6, 5, 4), **changes) -> Phantom:
    rng = np.random.default_rng(0)
    t1 = rng.uniform(300, 2000, shape)
    t2 = t1 * rng.uniform(0.05, 0.5, shape)
    maps = {
        "pd": rng.uniform(0.1, 1.0, shape), "t1_ms": t1, "t2_ms": t2,
        "t2star_ms": t2 * rng.uniform(0.5, 1.0, shape),
        "adc_mm2_s": rng.uniform(0, 3e-3, shape), "b0_hz": rng.normal(0, 20, shape),
        "labels": rng.integers(1, 4, shape), "label_names": {1: "a", 2: "b", 3: "c"},
        "affine": np.array([[0, -1.5, 0, 10], [2.0, 0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]]),
        "field_t": 3.0, "name": "test", "metadata": {"k": [1, 2]},
    }
    maps.update(changes)
    return Phantom(**maps)


def test_construction_casts_dtypes_and_geometry():
    p = _phantom()
    assert p.pd.dtype == np.float32 and p.labels.dtype == np.int16
    assert p.affine.dtype == np.float64
    assert p.shape == (6, 5, 4) and not p.is_2d
    assert p.voxel_size_mm == pytest.approx((2.0, 1.5, 3.0))
    assert p.voxel_volume_ml == pytest.approx(9.0e-3)
    # positions: C order over the mask, RAS via the affine
    pos = p.positions_mm(mask_only=False)
    assert pos.shape == (120, 3)
    ijk = np.array(np.unravel_index(7, p.shape), dtype=float)
    np.testing.assert_allclose(pos[7], p.affine[:3, :3] @ ijk + p.affine[:3, 3])
    p2 = _phantom(pd=np.where(np.arange(120).reshape(6, 5, 4) % 2 == 0, 0.5, 0.0))
    assert p2.positions_mm().shape == (60, 3)
    np.testing.assert_allclose(p2.positions_mm()[1], pos[2])


def test_t2prime_is_inf_where_t2star_equals_t2():
    p = _phantom()
    p2 = _phantom(t2star_ms=p.t2_ms)
    assert np.all(np.isinf(p2.t2prime_ms()))
    t2p = p.t2prime_ms()
    # 1/T2* = 1/T2 + 1/T2' (relative float32 tolerance)
    np.testing.assert_allclose(1 / p.t2star_ms, 1 / p.t2_ms + 1 / t2p, rtol=1e-4)


@pytest.mark.parametrize(("changes", "message"), [
    ({"pd": np.full((6, 5, 4), 1.2)}, "pd: 120 voxels have PD outside"),
    ({"t1_ms": np.full((6, 5, 4), 10.0)}, "t2_ms:"),
    ({"t2_ms": np.full((6, 5, 4), -1.0)}, "t2_ms: 120 voxels have T2 <= 0"),
    ({"adc_mm2_s": np.full((6, 5, 4), 5e-3)}, "adc_mm2_s: 120 voxels have ADC outside"),
    ({"b0_hz": np.full((6, 5, 4), np.nan)}, "b0_hz: 120 voxels have non-finite"),
    ({"t1_ms": np.ones((6, 5, 3))}, "t1_ms: shape (6, 5, 3) differs"),
    ({"pd": np.ones((6, 5))}, "pd: expected a 3-D array"),
    ({"label_names": {1: "a"}}, "label_names: labels [2, 3]"),
    ({"affine": np.zeros((4, 4))}, "affine:"),
    ({"field_t": -3.0}, "field_t"),
    ({"dti_mm2_s": np.zeros((6, 5, 4, 3))}, "dti_mm2_s: shape"),
])
def test_validation_names_the_map(changes, message):
    with pytest.raises(PhantomError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        _phantom(**changes)


def test_t2star_above_t2_reports_first_index():
    p = _phantom()
    t2s = p.t2star_ms.copy()
    t2s[2, 3, 1] = p.t2_ms[2, 3, 1] * 2
    with pytest.raises(PhantomError, match=r"t2star_ms: 1 voxels have T2\* > T2 "
                                           r"\(first at index \(2, 3, 1\)\)"):
        _phantom(t2star_ms=t2s)


def test_round_trip_is_bit_exact(tmp_path):
    p = _phantom(dti_mm2_s=np.tile([1e-3, 0, 0, 1e-3, 0, 1e-3], (6, 5, 4, 1)),
                 chemical_shift_ppm=np.full((6, 5, 4), -3.4))
    out = p.save(tmp_path / "ph")
    assert sorted(f.name for f in out.iterdir()) == sorted(
        ["phantom.json", "pd.nii.gz", "t1_ms.nii.gz", "t2_ms.nii.gz", "t2star_ms.nii.gz",
         "adc_mm2_s.nii.gz", "b0_hz.nii.gz", "labels.nii.gz", "dti_mm2_s.nii.gz",
         "chemical_shift_ppm.nii.gz"])
    q = load_phantom(out)
    assert q == p
    for key, arr in p.maps().items():
        assert getattr(q, key).dtype == arr.dtype
        assert np.array_equal(getattr(q, key), arr)
    assert np.array_equal(q.affine, p.affine)  # float64 affine from the JSON, exactly
    doc = json.loads((out / "phantom.json").read_text())
    assert doc["maps"]["t1_ms"]["unit"] == "ms" and doc["maps"]["adc_mm2_s"]["unit"] == "mm2/s"
    assert len(doc["maps"]["pd"]["sha256"]) == 64


def test_save_refuses_to_overwrite_without_force(tmp_path):
    p = _phantom()
    p.save(tmp_path / "ph")
    with pytest.raises(PhantomError, match="not empty"):
        p.save(tmp_path / "ph")
    p2 = _phantom(name="second")
    p2.save(tmp_path / "ph", force=True)
    assert load_phantom(tmp_path / "ph").name == "second"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ph"]  # no temp leftovers


def test_corrupt_map_is_named(tmp_path):
    out = _phantom().save(tmp_path / "ph")
    data = bytearray((out / "t2_ms.nii.gz").read_bytes())
    data[-10] ^= 0xFF
    (out / "t2_ms.nii.gz").write_bytes(bytes(data))
    with pytest.raises(PhantomError, match=r"t2_ms: t2_ms\.nii\.gz is corrupt"):
        load_phantom(out)


def test_missing_map_and_bad_json(tmp_path):
    out = _phantom().save(tmp_path / "ph")
    (out / "b0_hz.nii.gz").unlink()
    with pytest.raises(PhantomError, match=r"b0_hz: file .* is missing"):
        load_phantom(out)
    (out / "phantom.json").write_text("{not json")
    with pytest.raises(PhantomError, match="unreadable JSON"):
        load_phantom(out)
    with pytest.raises(PhantomError, match=r"no phantom\.json"):
        load_phantom(tmp_path)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["maps"]["t1_ms"].update(unit="s"), "t1_ms: unit 's'"),
    (lambda d: d.update(version=99), "format version 99"),
    (lambda d: d["maps"]["pd"].update(shape=[6, 5, 5]), "pd: shape"),
    (lambda d: d["affine"][0].__setitem__(3, 99.0), "NIfTI affine disagrees"),
    (lambda d: d["maps"].pop("labels"), "required maps \\['labels'\\]"),
])
def test_inconsistent_json_is_named(tmp_path, edit, message):
    out = _phantom().save(tmp_path / "ph")
    doc = json.loads((out / "phantom.json").read_text())
    edit(doc)
    (out / "phantom.json").write_text(json.dumps(doc))
    with pytest.raises(PhantomError, match=message):
        load_phantom(out)


def test_inconsistent_map_file_is_named(tmp_path):
    """A map rewritten with valid checksum but unphysical values fails the range check."""
    import hashlib

    import nibabel as nib

    out = _phantom().save(tmp_path / "ph")
    img = nib.load(out / "pd.nii.gz")
    bad = np.asanyarray(img.dataobj).copy()
    bad[0, 0, 0] = 2.0
    nib.save(nib.Nifti1Image(bad, img.affine, img.header), out / "pd.nii.gz")
    doc = json.loads((out / "phantom.json").read_text())
    doc["maps"]["pd"]["sha256"] = hashlib.sha256((out / "pd.nii.gz").read_bytes()).hexdigest()
    (out / "phantom.json").write_text(json.dumps(doc))
    with pytest.raises(PhantomError, match=r"pd: 1 voxels have PD outside \[0, 1\]"):
        load_phantom(out)


def test_slice_z_keeps_world_positions():
    p = _phantom()
    s = p.slice_z(2)
    assert s.is_2d and s.shape == (6, 5, 1)
    np.testing.assert_allclose(s.positions_mm(mask_only=False),
                               p.positions_mm(mask_only=False).reshape(6, 5, 4, 3)[:, :, 2]
                               .reshape(-1, 3))
    with pytest.raises(PhantomError, match="slice index 4"):
        p.slice_z(4)
