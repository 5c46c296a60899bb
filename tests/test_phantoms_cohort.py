"""Virtual cohorts: known biology recovered from the generated phantoms."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mrharmony.cli import main
from mrharmony.errors import PhantomError
from mrharmony.phantoms import CohortEffects, load_phantom, make_cohort

VOXEL_MM = 4.0  # coarse grid keeps these tests fast


def _ols(y: np.ndarray, *columns: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of y on [1, columns...] (float64)."""
    x = np.column_stack([np.ones_like(y), *columns]).astype(np.float64)
    return np.linalg.lstsq(x, y.astype(np.float64), rcond=None)[0]


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(10, seed=7, voxel_size_mm=VOXEL_MM,
                       effects={"patient_fraction": 0.4, "gm_slope_ml_per_year": -3.0})


@pytest.fixture(scope="module")
def truth(cohort):
    return cohort.ground_truth(field_t=3.0)


def test_gm_age_slope_recovered_within_5_percent(truth):
    # Regress the realised GM volume (measured from the deformed fractions) on age, with
    # the subject's own pre-ageing GM volume and diagnosis loss as covariates (they carry
    # the head-size and diagnosis variance); the slope must equal the configured -3 mL/y.
    coef = _ols(truth.gm_volume_ml.to_numpy(), truth.age.to_numpy(),
                truth.gm_reference_ml.to_numpy(), truth.diagnosis_gm_loss_ml.to_numpy())
    assert coef[1] == pytest.approx(-3.0, rel=0.05)
    # and per subject the realised volume hits the model to solver precision (1e-3 mL)
    model = truth.gm_reference_ml - 3.0 * (truth.age - 20.0) - truth.diagnosis_gm_loss_ml
    np.testing.assert_allclose(truth.gm_volume_ml, model, atol=1e-2)
    # atrophy is taken up by CSF inside an unchanged intracranial volume
    assert np.corrcoef(truth.age, truth.csf_volume_ml / truth.icv_ml)[0, 1] > 0.8


def test_gm_age_slope_plain_regression_without_nuisance():
    effects = {"head_size_sd": 0.0, "male_head_scale": 1.0, "shape_variability_mm": 0.0,
               "patient_fraction": 0.0, "gm_slope_ml_per_year": -2.0}
    truth = make_cohort(6, seed=3, voxel_size_mm=VOXEL_MM, effects=effects).ground_truth()
    slope = _ols(truth.gm_volume_ml.to_numpy(), truth.age.to_numpy())[1]
    assert slope == pytest.approx(-2.0, rel=0.05)
    # WM shrinks with the same deformation (its realised slope is negative)
    assert _ols(truth.wm_volume_ml.to_numpy(), truth.age.to_numpy())[1] < 0


def test_relaxation_drift_and_diagnosis_effects(cohort, truth):
    e = cohort.effects
    # tissue T1 follows 1 + 0.10 %/y * (age - 20) exactly (float32 rounding)
    expected = 1450.0 * (1 + e.t1_drift_pct_per_year / 100 * (truth.age - 20.0))
    np.testing.assert_allclose(truth.gm_t1_ms, expected, rtol=1e-6)
    patients = truth.diagnosis == "patient"
    assert patients.any() and (~patients).any()
    # diagnosis removes 15 % of GM inside the region before ageing
    assert np.all(truth.diagnosis_gm_loss_ml[patients] > 0)
    assert np.all(truth.diagnosis_gm_loss_ml[~patients] == 0)
    ratio = truth.region_gm_volume_ml / truth.region_gm_reference_ml
    assert ratio[patients].mean() < ratio[~patients].mean() - 0.08
    # and raises the regional T1 of patients
    assert truth.region_t1_ms[patients].mean() > truth.region_t1_ms[~patients].mean()


def test_region_loss_equals_configured_fraction_without_ageing():
    effects = {"gm_slope_ml_per_year": 0.0, "patient_fraction": 1.0,
               "diagnosis_region_gm_loss_pct": 20.0}
    truth = make_cohort(2, seed=5, voxel_size_mm=VOXEL_MM, effects=effects,
                        age_range=(20.0, 20.0)).ground_truth()
    np.testing.assert_allclose(truth.region_gm_volume_ml / truth.region_gm_reference_ml,
                               0.80, atol=1e-3)


def test_subjects_differ_and_seed_is_deterministic(cohort, truth):
    assert truth.subject.tolist() == [f"sub-{i:03d}" for i in range(1, 11)]
    assert truth.gm_volume_ml.nunique() == 10
    again = make_cohort(10, seed=7, voxel_size_mm=VOXEL_MM,
                        effects={"patient_fraction": 0.4, "gm_slope_ml_per_year": -3.0})
    assert again.subjects == cohort.subjects
    assert again.phantom(1) == cohort.phantom(1)
    other = make_cohort(10, seed=8, voxel_size_mm=VOXEL_MM)
    assert [s.age_years for s in other.subjects] != [s.age_years for s in cohort.subjects]
    a, b = cohort.phantom(0), cohort.phantom(1)
    assert not np.array_equal(a.pd, b.pd)
    assert a.metadata["subject"]["subject_id"] == "sub-001"
    assert a.metadata["volumes_ml"]["gm"] == pytest.approx(truth.gm_volume_ml[0])


def test_bad_cohort_arguments():
    with pytest.raises(PhantomError, match="n_subjects"):
        make_cohort(0, seed=1)
    with pytest.raises(PhantomError, match="gm_slope_ml_per_year"):
        make_cohort(2, seed=1, effects={"gm_slope_ml_per_year": -50.0})
    with pytest.raises(PhantomError, match="unknown key"):
        make_cohort(2, seed=1, effects={"gm_slope": -2.0})
    with pytest.raises(PhantomError, match="age_range"):
        make_cohort(2, seed=1, age_range=(80.0, 20.0))
    assert CohortEffects.from_mapping({"gm_slope_ml_per_year": -1.0}).gm_slope_ml_per_year \
        == -1.0


def test_cli_cohort_make_and_show(tmp_path):
    out = tmp_path / "cohort"
    assert main(["phantom", "cohort", "--n", "2", "--seed", "1", "--voxel-size-mm", "4",
                 "-o", str(out)]) == 0
    doc = json.loads((out / "cohort.json").read_text())
    assert doc["seed"] == 1 and len(doc["subjects"]) == 2
    p = load_phantom(out / "sub-002")
    assert p.name == "sub-002"
    assert (out / "ground_truth.csv").read_text().startswith("subject,age,sex,diagnosis")
    # refuses to overwrite without --force
    assert main(["phantom", "cohort", "--n", "2", "--seed", "1", "-o", str(out)]) == 2
    png = tmp_path / "sub.png"
    assert main(["phantom", "show", str(out / "sub-001"), "-o", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert main(["phantom", "show", str(out / "sub-001"), "-o", str(png)]) == 2
    for kind in ("system", "diffusion", "shepp-logan"):
        assert main(["phantom", "make", kind, "--matrix", "32", "-o",
                     str(tmp_path / kind)]) == 0
        assert load_phantom(tmp_path / kind).shape == (32, 32, 1)
    assert main(["phantom", "make", "brain", "--voxel-size-mm", "4", "--3d", "-o",
                 str(tmp_path / "brain")]) == 0
    assert main(["phantom", "make", "system", "--field-t", "7", "-o",
                 str(tmp_path / "s7")]) == 2
    assert main(["phantom", "make", "system", "--3d", "--slice", "3", "-o",
                 str(tmp_path / "s8")]) == 2


def test_cohort_api_used_by_the_study_runner(cohort, truth):
    fresh = make_cohort(10, seed=7, voxel_size_mm=VOXEL_MM,
                        effects={"patient_fraction": 0.4, "gm_slope_ml_per_year": -3.0})
    cov = fresh.covariates()
    assert fresh._anatomy is None  # covariates need no anatomy
    assert cov.columns.tolist() == ["subject", "age", "sex", "diagnosis"]
    assert cov.subject.tolist() == truth.subject.tolist()
    np.testing.assert_array_equal(cov.age, truth.age)
    p2d = cohort.phantom("sub-003", field_t=1.5, matrix=48, three_d=False)
    assert p2d.shape == (48, 48, 1) and p2d.field_t == 1.5
    p3d = cohort.phantom("sub-003", matrix=48)
    assert p3d.shape == (48, 48, 48)
    # resampling to a 5 mm grid keeps the subject's GM volume within 2 %
    assert p3d.metadata["volumes_ml"]["gm"] == pytest.approx(truth.gm_volume_ml[2], rel=0.02)
    slopes = cohort.true_age_slopes(3.0)
    assert slopes["gm_volume_ml"] == -3.0
    assert slopes["gm_t1_ms"] == pytest.approx(1450.0 * 0.001)
    with pytest.raises(PhantomError, match="subject 'sub-999' is not in this cohort"):
        cohort.phantom("sub-999")
