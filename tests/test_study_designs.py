"""Per-site study designs ([[cohorts]]) and the biology section of the study report."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mrharmony.errors import StudyError
from mrharmony.study.analysis import biology_numbers
from mrharmony.study.config import study_from_mapping

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "studies"
SITES = ["siemens-prisma-3t", "ge-premier-3t", "philips-elition-3t"]


def _base(cohorts: list[dict]) -> dict:
    return {"study": {"name": "design", "seed": 3},
            "protocols": [{"name": "t1w", "file": str(EXAMPLES / "protocols"
                                                      / "t1w-mprage.toml")}],
            "sites": {"names": list(SITES)},
            "cohorts": copy.deepcopy(cohorts)}


GOOD = [{"site": SITES[0], "n_subjects": 4, "age_min_years": 20, "age_max_years": 40},
        {"site": SITES[1], "n_subjects": 3, "age_mean_years": 70, "age_sd_years": 5,
         "age_min_years": 55, "age_max_years": 85, "patient_fraction": 0.0},
        {"site": SITES[2], "n_subjects": 2, "null": True, "female_fraction": 1.0}]


@pytest.mark.parametrize(("index", "change", "message"), [
    (1, {"patient_fraction": 1.3},
     "cohorts[1] (site 'ge-premier-3t'): patient_fraction 1.3 is above 1"),
    (2, {"female_fraction": -0.1},
     "cohorts[2] (site 'philips-elition-3t'): female_fraction -0.1 is below 0"),
    (0, {"n_subjects": 5000}, "cohorts[0] (site 'siemens-prisma-3t'): n_subjects 5000 is "
                              "above 1000"),
    (0, {"age_max_years": 130}, "cohorts[0] (site 'siemens-prisma-3t'): age_max_years 130 "
                                "is outside the cohort model's ages [0, 110]"),
    (1, {"age_mean_years": 40}, "cohorts[1] (site 'ge-premier-3t'): age_mean_years 40 is "
                                "outside [age_min_years, age_max_years]"),
    (0, {"site": "uih-umr790-3t"}, "cohorts[0] (site 'uih-umr790-3t'): site "
                                   "'uih-umr790-3t' is not in [sites] names"),
    (2, {"site": SITES[0]}, "cohorts[2] (site 'siemens-prisma-3t'): site "
                            "'siemens-prisma-3t' is already scanning cohorts[0]"),
    (2, {"gm_slope_ml_per_year": -2.0}, "null = true sets every effect to zero"),
    (0, {"gm_slope_ml_per_year": -40.0}, "gm_slope_ml_per_year: -40.0 is below"),
])
def test_impossible_designs_are_refused_naming_the_entry(index, change, message):
    cohorts = copy.deepcopy(GOOD)
    cohorts[index].update(change)
    with pytest.raises(StudyError) as err:
        study_from_mapping(_base(cohorts))
    assert message in str(err.value)


def test_design_needs_every_site_and_no_traveling_cohort_beside_it():
    with pytest.raises(StudyError, match="site 'philips-elition-3t' has no cohort entry"):
        study_from_mapping(_base(GOOD[:2]))
    data = _base(GOOD)
    data["cohort"] = {"n_subjects": 4}
    with pytest.raises(StudyError, match="exactly one of"):
        study_from_mapping(data)


def test_nocov_method_is_validated():
    data = _base(GOOD)
    data["harmonize"] = {"methods": ["combat", "combat-nocov"], "covariates": ["age"]}
    study = study_from_mapping(data)
    assert study.harmonize.method_spec("combat-nocov") == ("combat", ())
    assert study.harmonize.method_spec("combat") == ("combat", ("age",))
    data["harmonize"]["methods"] = ["combat-nope"]
    with pytest.raises(StudyError, match="unknown method 'combat-nope'"):
        study_from_mapping(data)


def test_plan_scans_each_site_only_its_own_subjects():
    from mrharmony.study.plan import plan_tasks, preflight

    study = study_from_mapping(_base(GOOD))
    resolved = preflight(study)
    subjects = {s["subject"]: s for s in resolved.subjects}
    assert len(subjects) == 4 + 3 + 2
    plan = plan_tasks(study, resolved)
    pairs = {(s.subject, s.site) for s in plan.scans}
    expected = {(f"c{i + 1}s{k + 1:03d}", SITES[i])
                for i, n in enumerate((4, 3, 2)) for k in range(n)}
    assert pairs == expected
    assert len(plan.scans) == 9
    # ages and sex follow each entry; the null entry has every effect at zero
    ages = {i: [subjects[f"c{i + 1}s{k + 1:03d}"]["age"] for k in range(n)]
            for i, n in enumerate((4, 3, 2))}
    assert all(20 <= a <= 40 for a in ages[0]) and all(55 <= a <= 85 for a in ages[1])
    assert all(subjects[f"c3s{k + 1:03d}"]["sex"] == "F" for k in range(2))
    assert all(subjects[f"c2s{k + 1:03d}"]["diagnosis"] == "control" for k in range(3))
    null_phantoms = [p for p in plan.specs if p.stage == "phantom"
                     and p.params["subject"] in ("sub-001", "sub-002")
                     and p.params["effects"].get("gm_slope_ml_per_year") == 0.0]
    assert null_phantoms
    # deterministic: the same study gives the same subjects and task keys
    again = plan_tasks(study, preflight(study))
    assert [s.features_key for s in again.scans] == [s.features_key for s in plan.scans]


def _confounded(seed: int = 5) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Two sites: A scans ages 20-45, B ages 55-80; site offsets confounded with age.

    True features: ``gm`` falls 3 mL/y, ``wm`` 1 mL/y, ``null`` has no age effect.
    """
    rng = np.random.default_rng(seed)
    n = 80
    age = np.r_[rng.uniform(20, 45, n), rng.uniform(55, 80, n)]
    site = np.array(["A"] * n + ["B"] * n)
    sex = np.where(rng.random(2 * n) < 0.5, "F", "M")
    truth = pd.DataFrame({
        "t__segmentation__gm__volume_ml": 700 - 3.0 * (age - 20) + rng.normal(0, 10, 2 * n),
        "t__segmentation__wm__volume_ml": 500 - 1.0 * (age - 20) + rng.normal(0, 10, 2 * n),
        "t__segmentation__null__volume_ml": 300 + rng.normal(0, 10, 2 * n),
    })
    shift = {"A": np.array([40.0, 25.0, 20.0]), "B": np.array([-40.0, -25.0, -20.0])}
    scale = {"A": 1.05, "B": 0.95}
    measured = truth.copy()
    for s in ("A", "B"):
        rows = site == s
        measured.loc[rows] = (truth[rows].to_numpy() * scale[s] + shift[s]
                              + rng.normal(0, 5, (rows.sum(), 3)))
    measured["site"] = site
    cov = pd.DataFrame({"age": age, "diagnosis": "control", "sex": sex})
    return measured, truth, cov


def test_biology_combat_with_age_keeps_the_slope_and_without_age_loses_it():
    from mrharmony.harmonize.registry import make_harmonizer

    measured, truth, cov = _confounded()
    feats = list(truth.columns)
    tables = {"raw": measured}
    for name, covariates in (("combat", cov[["age"]]), ("combat-nocov", None)):
        model = make_harmonizer("combat")
        args = (measured[feats], measured["site"]) + ((covariates,) if covariates is not None
                                                      else ())
        table = measured.copy()
        table[feats] = np.asarray(model.fit_transform(*args), dtype=float)
        tables[name] = table
    null_feature = "t__segmentation__null__volume_ml"
    records, summary = biology_numbers(tables, truth, cov, null_features=[null_feature])
    # site is confounded with age (VIF ~7): the model is pooled and says so
    assert summary["site_covariate"] is False
    assert summary["vif"]["age"] > 5
    assert "pooled" in summary["reason"]
    rec = {(r["method"], r["feature"]): r for r in records if r["effect"] == "age"}
    gm = "t__segmentation__gm__volume_ml"
    # the truth is the OLS slope of the site-free values of these subjects: about -3 mL/y
    assert rec[("raw", gm)]["true"] == pytest.approx(-3.0, abs=0.15)
    true = rec[("raw", gm)]["true"]
    # ComBat with age: the slope within 10 % of the truth (ComBat maps both sites to the
    # pooled scale, not the site-free one, so a few % remain; the 95 % CI is narrower)
    assert rec[("combat", gm)]["estimate"] == pytest.approx(true, rel=0.10)
    # without age: the between-site age difference is removed with the site offset, so
    # the slope shrinks to the within-site part (about 15 % of the age variance here)
    assert abs(rec[("combat-nocov", gm)]["estimate"]) < 0.5 * abs(true)
    # raw: the site offsets (+40 young, -40 old) add a spurious negative slope
    assert rec[("raw", gm)]["estimate"] < 1.3 * true
    by = summary["methods"]
    assert abs(by["combat"]["age"]["bias"]) < 0.15
    assert by["combat-nocov"]["age"]["bias"] < -0.5
    assert by["raw"]["age"]["bias"] > 0.5  # raw over-estimates the decline
    # the null feature: site offsets confounded with age make raw data "find" an effect
    assert rec[("raw", null_feature)]["true"] == 0.0
    assert rec[("raw", null_feature)]["kind"] == "null"
    assert by["raw"]["age"]["false_positive_rate"] == 1.0
    assert by["combat-nocov"]["age"]["false_positive_rate"] == 0.0
    assert "diagnosis" not in by["raw"]  # no patients, no diagnosis effect


def test_biology_null_design_counts_false_positives():
    rng = np.random.default_rng(11)
    n = 120
    site = np.array(["A", "B", "C"] * (n // 3))
    truth = pd.DataFrame({f"t__segmentation__f{j}__volume_ml": 500 + rng.normal(0, 10, n)
                          for j in range(4)})
    measured = truth + rng.normal(0, 3, truth.shape)
    measured["site"] = site
    cov = pd.DataFrame({"age": rng.uniform(20, 80, n),
                        "diagnosis": np.where(rng.random(n) < 0.3, "patient", "control"),
                        "sex": np.where(rng.random(n) < 0.5, "F", "M")})
    records, summary = biology_numbers({"raw": measured}, truth, cov, null=True)
    # site is balanced against age and diagnosis here: it enters the model
    assert summary["site_covariate"] is True
    assert all(r["true"] == 0.0 and r["kind"] == "null" for r in records)
    assert {r["effect"] for r in records} == {"age", "diagnosis"}
    fpr = summary["methods"]["raw"]["age"]["false_positive_rate"]
    assert summary["methods"]["raw"]["age"]["n_null"] == 4
    assert fpr is not None and 0.0 <= fpr <= 0.5


def test_study_numbers_and_report_section_on_a_confounded_design(tmp_path):
    """compute_numbers on a synthetic features table of the shipped confounded-age design
    (true volumes known, site offsets confounded with age): report.json["biology"] and
    the report's answer say that ComBat with age keeps the age effect, without it not."""
    from mrharmony.study.analysis import compute_numbers
    from mrharmony.study.config import load_study
    from mrharmony.study.plan import design_subjects
    from mrharmony.study.report import _biology_section

    study = load_study(EXAMPLES / "confounded-age.toml")
    subjects, sites, _ = design_subjects(study)
    assert {sites[s["subject"]][0] for s in subjects} == set(study.sites.names)
    young = [s["age"] for s in subjects if sites[s["subject"]][0] == "siemens-prisma-3t"]
    old = [s["age"] for s in subjects if sites[s["subject"]][0] == "ge-premier-3t"]
    assert max(young) <= 40 <= 60 <= min(old)
    rng = np.random.default_rng(0)
    offsets = {"siemens-prisma-3t": 30.0, "ge-premier-3t": -30.0, "philips-elition-3t": 0.0}
    rows, volumes = [], {}
    for s in subjects:
        v = {"gm": 700 - 3.0 * (s["age"] - 20) + rng.normal(0, 3),
             "wm": 520 - 1.0 * (s["age"] - 20) + rng.normal(0, 3)}
        volumes[s["subject"]] = v
        site = sites[s["subject"]][0]
        for tissue, value in v.items():
            rows.append({"subject": s["subject"], "site": site, "arm": "shared", "repeat": 0,
                         "protocol": "t1w", "quantity": "segmentation", "region": tissue,
                         "feature": "volume_ml",
                         "value": value * (1 + rng.normal(0, 0.002)) + offsets[site],
                         "vendor": "x", "field_t": 3.0, "age": s["age"], "sex": s["sex"],
                         "diagnosis": s["diagnosis"]})
    numbers = compute_numbers(pd.DataFrame(rows), study, None, volumes)
    rec = {(r["method"], r["feature"]): r for r in numbers["biology"]
           if r["effect"] == "age"}
    gm = "t1w__segmentation__gm__volume_ml"
    assert {m for m, _ in rec} == {"raw", "combat", "combat-nocov", "mean"}
    true = rec[("raw", gm)]["true"]
    assert true == pytest.approx(-3.0, abs=0.3)
    assert rec[("combat", gm)]["estimate"] == pytest.approx(true, rel=0.15)
    assert abs(rec[("combat-nocov", gm)]["estimate"]) < 0.5 * abs(true)
    assert numbers["biology_summary"]["site_covariate"] is False
    section = _biology_section(numbers, tmp_path)
    assert "kept (mean absolute error within 25 % of the truth) by combat (" in section.text
    assert (tmp_path / "figures" / "biology.png").is_file()


def test_cohort_age_distribution_and_sex_ratio():
    from mrharmony.errors import PhantomError
    from mrharmony.phantoms import make_cohort

    c = make_cohort(400, 2, age_range=(20, 90), age_normal=(50, 10),
                    female_fraction=0.8).covariates()
    # normal ages truncated to [20, 90] (truncation at 3 SD below barely moves them)
    assert c["age"].between(20, 90).all()
    assert c["age"].mean() == pytest.approx(50, abs=1.5)  # SE 0.5 y
    assert c["age"].std() == pytest.approx(10, rel=0.1)
    assert (c["sex"] == "F").mean() == pytest.approx(0.8, abs=0.06)  # SE 0.02
    with pytest.raises(PhantomError, match="female_fraction"):
        make_cohort(3, 1, female_fraction=1.5)
