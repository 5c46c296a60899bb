"""ROI feature extraction into tidy tables, and the tidy <-> wide round trip."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mrharmony.errors import HarmonizeError
from mrharmony.harmonize.features import extract_roi_features, from_wide, to_wide

NAMES = {1: "thalamus", 2: "putamen", 5: "white_matter"}


def _labels():
    lab = np.zeros((10, 8, 6), np.int16)
    lab[:3] = 1
    lab[3:5, :4] = 2
    lab[6:, 2:] = 5
    lab[9, 7, 5] = 7  # a label that is not in NAMES: ignored
    return lab


def test_extract_matches_direct_computation():
    rng = np.random.default_rng(0)
    lab = _labels()
    affine = np.diag([1.2, 1.0, 2.5, 1.0])  # 3 mm³ voxels
    imgs = [nib.Nifti1Image(rng.normal(100 * (i + 1), 10, lab.shape).astype(np.float32), affine)
            for i in range(3)]
    cov = pd.DataFrame({"age": [30.0, 41.5, 62.0], "sex": ["F", "M", "F"]})
    tidy = extract_roi_features(imgs, lab, NAMES, subjects=["s1", "s2", "s3"],
                                sites=["A", "A", "B"], covariates=cov)
    assert list(tidy.columns) == ["subject", "site", "region", "feature", "value", "age", "sex"]
    assert len(tidy) == 3 * 3 * 3
    data = np.asarray(imgs[1].dataobj, dtype=np.float64)
    for lv, name in NAMES.items():
        sel = tidy[(tidy.subject == "s2") & (tidy.region == name)].set_index("feature")["value"]
        vox = data[lab == lv]
        assert sel["mean"] == pytest.approx(vox.mean(), rel=1e-12)
        assert sel["median"] == pytest.approx(np.median(vox), rel=1e-12)
        assert sel["volume_ml"] == pytest.approx(vox.size * 3.0 / 1000, rel=1e-12)
    assert (tidy[tidy.subject == "s3"]["age"] == 62.0).all()


def test_absent_region_and_per_image_labels():
    lab = _labels()
    lab2 = lab.copy()
    lab2[lab2 == 2] = 0
    img = np.ones(lab.shape)
    tidy = extract_roi_features([img, img], [lab, lab2], NAMES, subjects=["a", "b"],
                                sites=["X", "Y"], voxel_size_mm=(1, 1, 1))
    put = tidy[(tidy.subject == "b") & (tidy.region == "putamen")].set_index("feature")
    assert put.loc["volume_ml", "value"] == 0
    assert np.isnan(put.loc["mean", "value"]) and np.isnan(put.loc["median", "value"])


def test_wide_round_trip():
    rng = np.random.default_rng(1)
    lab = _labels()
    imgs = [rng.normal(50, 5, lab.shape) for _ in range(4)]
    cov = {"age": [20.0, 30.0, 40.0, 50.0]}
    tidy = extract_roi_features(imgs, lab, NAMES, subjects=["s1", "s1", "s2", "s2"],
                                sites=["A", "B", "A", "B"], covariates=cov,
                                voxel_size_mm=(1, 1, 1))
    wide = to_wide(tidy)
    assert wide.shape == (4, 3 + 9)
    assert "thalamus__median" in wide.columns
    back = from_wide(wide, id_columns=["subject", "site", "age"])
    key = ["subject", "site", "region", "feature"]
    a = tidy.sort_values(key).reset_index(drop=True)
    b = back.sort_values(key).reset_index(drop=True)[list(a.columns)]
    pd.testing.assert_frame_equal(a, b, check_dtype=False)


def test_feature_errors():
    lab = _labels()
    img = np.ones(lab.shape)
    with pytest.raises(HarmonizeError, match="no affine"):
        extract_roi_features([img], lab, NAMES, subjects=["a"], sites=["A"])
    with pytest.raises(HarmonizeError, match="subjects: 2 given for 1"):
        extract_roi_features([img], lab, NAMES, subjects=["a", "b"], sites=["A"])
    with pytest.raises(HarmonizeError, match="shape"):
        extract_roi_features([img[:5]], lab, NAMES, subjects=["a"], sites=["A"],
                             voxel_size_mm=(1, 1, 1))
    with pytest.raises(HarmonizeError, match="not among"):
        extract_roi_features([img], lab, NAMES, subjects=["a"], sites=["A"],
                             features=["mode"])
