"""Learned harmonizers in ``mrharmony bench``: image translation, hallucination, hold-out.

Tiny seeded sizes (a 6 mm pool of 10 subjects: 33x39 slices, 5 training subjects, a few
epochs) keep the module well under a minute on one core.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mrharmony.study.bench import BenchConfig, load_pool, run_bench  # noqa: E402
from mrharmony.study.bench_learned import (  # noqa: E402
    CONTRAST_TOL,
    SPURIOUS_MAX,
    edge_band,
    hallucination_metrics,
    insert_lesion,
    lesion_contrast,
)
from mrharmony.study.bench_report import LEADERBOARD_COLUMNS, write_bench  # noqa: E402

TINY = BenchConfig("tiny", 6.0, 10, 4,
                   {"image-translation": 10, "traveling": 10}, small_site=3)
SEED = 7
KEYS = ("ssim", "psnr", "mae", "lesion_contrast_error", "spurious_energy",
        "hallucination_pass")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-learned-cache")
    load_pool(TINY.pool, SEED, null=False, voxel_size_mm=TINY.voxel_size_mm, cache_dir=path)
    return path


def _rec(result, scenario, method):
    (rec,) = [r for r in result.leaderboard
              if r["scenario"] == scenario and r["method"] == method]
    return rec


# ------------------------------------------------------------ hallucination metric
def _phantom(n: int = 32):
    """A disc head: GM rim, WM core, CSF spot; a lesion in the WM."""
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - n / 2, xx - n / 2)
    labels = np.where(r < 14, 2, 0).astype(np.int8)
    labels[r < 10] = 3
    labels[np.hypot(yy - 10, xx - 16) < 2] = 1
    maps = {"pd": np.choose(labels, [0.0, 1.0, 0.8, 0.7]).astype(np.float32),
            "t1_ms": np.choose(labels, [0.0, 4000.0, 1400.0, 900.0]).astype(np.float32),
            "t2_ms": np.choose(labels, [0.0, 2000.0, 100.0, 70.0]).astype(np.float32),
            "t2star_ms": np.choose(labels, [0.0, 1000.0, 60.0, 50.0]).astype(np.float32)}
    return maps, labels


def _lesion_image():
    from mrharmony.study.bench import t1w_signal

    maps, labels = _phantom()
    m, lab, les = insert_lesion(maps, labels)
    return t1w_signal(m["t1_ms"], m["t2star_ms"], m["pd"]).astype(np.float64), lab, les


def test_lesion_is_inserted_in_wm_with_documented_contrast():
    maps, labels = _phantom()
    m, lab, les = insert_lesion(maps, labels, scale=1.25, radius=2.0)
    assert les.sum() == 13                       # disc of radius 2 px: 13 pixels
    assert np.all(labels[les] == 3) and np.all(lab[les] == 4)
    np.testing.assert_allclose(m["t1_ms"][les], 1.25 * 900.0, rtol=1e-6)
    np.testing.assert_allclose(m["t2_ms"][les], 1.25 * 70.0, rtol=1e-6)
    img, lab, les = _lesion_image()
    # spoiled GRE, TR 20 ms, 25 deg: T1 900 -> 1125 ms darkens the lesion by ~16 %
    c = lesion_contrast(img, les, lab)
    assert -0.20 < c < -0.12


def test_identity_on_matching_sites_passes():
    img, lab, les = _lesion_image()
    rng = np.random.default_rng(0)
    noisy = np.where(lab > 0, img + 10.0 * rng.standard_normal(img.shape), 0.0)
    h = hallucination_metrics(noisy, img, lab, les)
    assert h["lesion_contrast_error"] <= CONTRAST_TOL
    assert h["spurious_energy"] <= SPURIOUS_MAX
    assert h["hallucination_pass"] is True
    exact = hallucination_metrics(img, img, lab, les)
    assert exact["lesion_contrast_error"] == 0.0 and exact["spurious_energy"] == 0.0
    # a uniform gain error is a calibration miss, not a hallucination
    assert hallucination_metrics(1.1 * img, img, lab, les)["lesion_contrast_error"] < 1e-9


def test_erasing_the_lesion_fails_the_contrast_check():
    img, lab, les = _lesion_image()
    erased = img.copy()
    erased[les] = np.mean(img[lab == 3])              # lesion painted over with WM
    h = hallucination_metrics(erased, img, lab, les)
    assert h["lesion_contrast_error"] == pytest.approx(1.0, abs=1e-9)
    assert h["hallucination_pass"] is False
    halved = img.copy()
    ref = np.mean(img[lab == 3])
    halved[les] = ref + 0.5 * (img[les] - ref)       # half the contrast: error 0.5
    assert hallucination_metrics(halved, img, lab, les)["lesion_contrast_error"] \
        == pytest.approx(0.5, abs=0.02)


def test_a_blob_outside_edges_has_high_spurious_energy():
    img, lab, les = _lesion_image()
    outside = ~edge_band(lab)
    yy, xx = np.mgrid[:32, :32]
    # a bright structure in the background, where the truth has nothing
    blob = (np.hypot(yy - 4, xx - 4) < 2.5) & outside
    assert blob.sum() >= 9 and not lab[blob].any()
    fake = img.copy()
    fake[blob] += 500.0
    h = hallucination_metrics(fake, img, lab, les)
    assert h["spurious_energy"] > 5 * SPURIOUS_MAX
    assert h["hallucination_pass"] is False
    assert h["lesion_contrast_error"] < 1e-12         # the lesion itself was kept
    # and one inside the white matter, away from the lesion
    blob = (np.hypot(yy - 14, xx - 23) < 2.5) & outside & (lab == 3)
    assert blob.sum() >= 9
    fake = img.copy()
    fake[blob] += 0.5 * img[blob]
    assert hallucination_metrics(fake, img, lab, les)["spurious_energy"] > 5 * SPURIOUS_MAX
    # the same energy on the edges only is not counted
    on_edge = img.copy()
    on_edge[edge_band(lab) & (lab > 0)] *= 1.02
    assert hallucination_metrics(on_edge, img, lab, les)["spurious_energy"] < 1e-12


def test_edge_band():
    lab = np.zeros((6, 6), np.int8)
    lab[:, 3:] = 1
    band = edge_band(lab)
    assert band[:, 2].all() and band[:, 3].all() and band.sum() == 12


# ------------------------------------------------------------ the bench scenario
@pytest.fixture(scope="module")
def result(cache):
    return run_bench(scenarios=["image-translation", "traveling"],
                     methods=["raw-image", "histogram", "deepharmony", "combat",
                              "deepcombat", "deepresbat"],
                     seed=SEED, config=TINY, cache_dir=cache,
                     learned_options={"deepharmony": {"epochs": 6, "patience": 6}})


def test_image_translation_runs_learned_and_classical(result):
    pairs = {(r["scenario"], r["method"]) for r in result.leaderboard}
    # image methods only in image-translation; learned image methods only there
    assert pairs == {("image-translation", "raw-image"), ("image-translation", "histogram"),
                     ("image-translation", "deepharmony"),
                     ("traveling", "raw-image"), ("traveling", "histogram"),
                     ("traveling", "combat"), ("traveling", "deepcombat"),
                     ("traveling", "deepresbat")}
    info = result.info["scans"]["image-translation"]
    assert info == {"train": 5, "validation": 1, "test": 4}
    for m in ("raw-image", "histogram", "deepharmony"):
        r = _rec(result, "image-translation", m)
        assert r["status"] == "ok", r["reason"]
        assert set(KEYS) <= set(r)
        assert 0.0 < r["ssim"] <= 1.0 and r["psnr"] > 0 and r["mae"] > 0
        assert r["lesion_contrast_error"] >= 0 and r["spurious_energy"] >= 0
        assert isinstance(r["hallucination_pass"], bool)
        assert r["n_scans"] == 12 and r["n_sites"] == 3
        assert r["evaluation"] == "held-out subjects"
        assert np.isfinite(r["site_accuracy"]) and np.isfinite(r["icc"])
        assert np.isnan(r["effect_bias"])      # 4 held-out subjects: too few for biology
    assert _rec(result, "image-translation", "deepharmony")["learned"] is True
    raw = _rec(result, "image-translation", "raw-image")
    hist = _rec(result, "image-translation", "histogram")
    # histogram matching to a target-site image removes the site gain: closer to target
    assert hist["mae"] < raw["mae"] and hist["psnr"] > raw["psnr"]


def test_feature_learned_in_quick_leaderboard(result, tmp_path):
    for m in ("deepcombat", "deepresbat"):
        r = _rec(result, "traveling", m)
        assert r["status"] == "ok", r["reason"]
        assert r["evaluation"] == "hold-out" and r["learned"] is True
        assert r["n_scans"] < _rec(result, "traveling", "combat")["n_scans"]
        assert np.isfinite(r["effect_abs_error"])
    assert _rec(result, "traveling", "combat")["evaluation"] == "cv"
    out = write_bench(result, tmp_path / "b")
    import json

    board = json.loads((out / "leaderboard.json").read_text())
    assert all(set(LEADERBOARD_COLUMNS) == set(r) for r in board)
    methods = {r["method"] for r in board}
    assert {"deepharmony", "deepcombat", "deepresbat", "combat", "histogram"} <= methods
    page = (out / "index.html").read_text()
    assert "who wins, who hallucinates" in page and "deepharmony" in page
    assert page.index("who wins") < page.index("Leaderboard")
