"""``mrharmony bench``: scenarios, metrics against the known truth, files and refusals.

A small seeded configuration (4 mm cohorts of 24 + 16 subjects, generated once per
session into a temporary cache) keeps the whole module under about a minute on one core.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mrharmony.study.bench import (
    IMAGE_METHODS,
    BenchConfig,
    build_scenario,
    load_pool,
    run_bench,
)

SMALL = BenchConfig("small", 4.0, 24, 16,
                    {"traveling": 8, "confounded-age": 24, "confounded-diagnosis": 24,
                     "imbalanced": 24, "null-effect": 16, "unseen-site": 24}, small_site=6)
SEED = 3


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-cache")
    load_pool(SMALL.pool, SEED, null=False, voxel_size_mm=SMALL.voxel_size_mm, cache_dir=path)
    load_pool(SMALL.null_pool, SEED + 1, null=True, voxel_size_mm=SMALL.voxel_size_mm,
              cache_dir=path)
    return path


@pytest.fixture(scope="module")
def result(cache):
    return run_bench(scenarios=["traveling", "confounded-age", "null-effect", "unseen-site"],
                     methods=["raw", "combat", "combat-nocov", "mean", "raw-image", "nyul",
                              "ravel"],
                     seed=SEED, config=SMALL, cache_dir=cache)


def _rec(result, scenario, method):
    (rec,) = [r for r in result.leaderboard
              if r["scenario"] == scenario and r["method"] == method]
    return rec


def _bio(result, scenario, method, effect, feature):
    (rec,) = [b for b in result.biology if b["scenario"] == scenario
              and b["method"] == method and b["effect"] == effect and b["feature"] == feature]
    return rec


def test_every_scenario_and_method(result):
    pairs = {(r["scenario"], r["method"]) for r in result.leaderboard}
    assert pairs == {(s, m) for s in ("traveling", "confounded-age", "null-effect",
                                      "unseen-site")
                     for m in ("raw", "combat", "combat-nocov", "mean", "raw-image", "nyul",
                               "ravel")}
    assert len(result.leaderboard) == len(pairs)
    for r in result.leaderboard:
        assert {"site_accuracy", "site_chance", "icc", "effect_bias", "coverage",
                "false_positive_rate"} <= set(r)
    # not applicable where the method cannot transform an unseen site, with the reason
    assert _rec(result, "unseen-site", "mean")["status"] == "not applicable"
    assert _rec(result, "unseen-site", "ravel")["status"] == "not applicable"
    assert _rec(result, "unseen-site", "combat-nocov")["status"] == "ok"   # add_batch
    for r in result.leaderboard:
        assert (r["status"] == "ok") != bool(r["reason"])
    assert _rec(result, "unseen-site", "nyul")["status"] == "ok"
    assert _rec(result, "traveling", "combat")["icc"] is not None
    assert np.isnan(_rec(result, "confounded-age", "combat")["icc"])


def test_truth_of_the_scenarios(cache):
    bio = load_pool(SMALL.pool, SEED, null=False, voxel_size_mm=4.0, cache_dir=cache)
    nul = load_pool(SMALL.null_pool, SEED + 1, null=True, voxel_size_mm=4.0, cache_dir=cache)
    sc = build_scenario("confounded-age", bio, nul, SMALL, SEED)
    young = sc.scans.groupby("site")["age"].mean()
    assert young["site-old"] - young["site-young"] > 15        # years: confounded
    # site effects are centred over sites: the site-free truth is the average scanner
    delta = np.array(sc.site_effects["feature_scale"])
    np.testing.assert_allclose(delta.mean(axis=0), 1.0, atol=1e-12)
    tr = build_scenario("traveling", bio, nul, SMALL, SEED)
    assert (tr.scans.groupby("subject")["site"].nunique() == 3).all()
    # the same seed gives the same data
    again = build_scenario("confounded-age", bio, nul, SMALL, SEED)
    pd.testing.assert_frame_equal(sc.measured, again.measured)


def test_confounded_age_keeps_or_removes_the_age_slope(result):
    true = _bio(result, "confounded-age", "raw", "age", "gm_t1_ms")["true"]
    assert true == pytest.approx(1.45, rel=0.02)   # ms/y: 0.10 %/y of the 1450 ms GM T1
    with_age = _bio(result, "confounded-age", "combat", "age", "gm_t1_ms")
    without = _bio(result, "confounded-age", "combat-nocov", "age", "gm_t1_ms")
    mean = _bio(result, "confounded-age", "mean", "age", "gm_t1_ms")
    # ComBat with age as covariate keeps the GM T1 age slope within 15 % and covers it;
    # without the covariate (and mean centring) the site-age confound removes > 50 % of it
    assert abs(with_age["estimate"] / true - 1) < 0.15
    assert with_age["ci_low"] <= true <= with_age["ci_high"]
    assert without["estimate"] / true < 0.5
    assert mean["estimate"] / true < 0.5

    def median_ratio(method):
        recs = [b for b in result.biology if b["scenario"] == "confounded-age"
                and b["method"] == method and b["effect"] == "age"
                and b["kind"] == "primary"]
        assert len(recs) >= 5
        return float(np.median([b["estimate"] / b["true"] for b in recs]))

    # over every primary age effect: kept (median within 25 %) vs mostly removed
    assert abs(median_ratio("combat") - 1) < 0.25
    assert median_ratio("combat-nocov") < 0.5
    assert median_ratio("mean") < 0.5
    assert _rec(result, "confounded-age", "combat")["age_bias"] > \
        _rec(result, "confounded-age", "combat-nocov")["age_bias"] + 0.5


def test_null_effect_false_positive_rate(result):
    raw = _rec(result, "null-effect", "raw")
    assert raw["n_null_tests"] >= 40
    # all effects are zero by construction; sites are independent of the covariates
    assert 0.0 <= raw["false_positive_rate"] <= 0.15
    assert np.isnan(raw["effect_bias"])


def test_traveling_combat_lowers_site_accuracy(result):
    raw = _rec(result, "traveling", "raw")
    combat = _rec(result, "traveling", "combat")
    assert raw["site_chance"] == pytest.approx(1 / 3)
    assert raw["site_accuracy"] > 0.8
    assert combat["site_accuracy"] <= combat["site_chance"] + 0.2    # towards chance
    assert combat["icc"] > raw["icc"]


def test_cli_quick_writes_files_and_refuses_existing(tmp_path, cache, monkeypatch, capsys):
    import mrharmony.study.bench as bench_module
    from mrharmony.cli import main

    monkeypatch.setattr(bench_module, "QUICK", SMALL)   # --quick at the test's small size
    out = tmp_path / "bench"
    args = ["bench", "--quick", "-o", str(out), "--scenarios", "imbalanced",
            "--methods", "raw,combat,zscore", "--seed", str(SEED), "--cache", str(cache)]
    assert main(args) == 0
    capsys.readouterr()
    for name in ("leaderboard.json", "leaderboard.csv", "biology.json", "bench.json",
                 "index.html", "site_vs_bias.png"):
        assert (out / name).is_file(), name
    board = json.loads((out / "leaderboard.json").read_text())
    assert {(r["scenario"], r["method"]) for r in board} == {
        ("imbalanced", "raw"), ("imbalanced", "combat"), ("imbalanced", "zscore")}
    assert set(board[0]) >= {"scenario", "method", "site_accuracy", "site_chance", "icc",
                             "effect_bias", "coverage", "false_positive_rate"}
    small = next(r for r in board if r["method"] == "raw")
    assert small["site_chance"] == pytest.approx(18 / 24)   # 6 vs 18 scans: majority
    bio = json.loads((out / "biology.json").read_text())
    assert {"method", "effect", "feature", "true", "estimate", "ci_low",
            "ci_high"} <= set(bio[0])
    assert pd.read_csv(out / "leaderboard.csv").shape[0] == 3
    html = (out / "index.html").read_text()
    assert html.index("Answer") < html.index("<table>")
    before = (out / "leaderboard.json").read_text()
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "exists" in lines[0] and "Traceback" not in err
    assert (out / "leaderboard.json").read_text() == before


def test_unknown_names_are_refused(cache):
    from mrharmony.errors import StudyError

    with pytest.raises(StudyError, match="unknown"):
        run_bench(scenarios=["nope"], config=SMALL, cache_dir=cache)
    with pytest.raises(StudyError, match="unknown"):
        run_bench(scenarios=["traveling"], methods=["nope"], config=SMALL, cache_dir=cache)
    assert "raw-image" in IMAGE_METHODS
