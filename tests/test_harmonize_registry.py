"""The one harmonizer registry: every entry loads, and the CLI and the study runner use it."""

from __future__ import annotations

import inspect

import numpy as np
import pandas as pd
import pytest

from mrharmony.errors import HarmonizeError
from mrharmony.harmonize.registry import (
    HARMONIZERS,
    feature_harmonizers,
    get_harmonizer,
    harmonizer_options,
    image_harmonizers,
    make_harmonizer,
)


@pytest.mark.parametrize("name", sorted(HARMONIZERS))
def test_every_registered_harmonizer_loads(name):
    spec = get_harmonizer(name)
    obj = spec.load()
    if spec.level == "features":
        assert inspect.isclass(obj)
        assert all(hasattr(obj, m) for m in ("fit", "transform"))
    else:
        assert callable(obj)


def test_names_by_level():
    assert set(feature_harmonizers()) | set(image_harmonizers()) == set(HARMONIZERS)
    assert "longitudinal" in feature_harmonizers()
    assert "longitudinal" not in feature_harmonizers(cross_sectional=True)
    with pytest.raises(HarmonizeError, match=r"unknown harmonizer 'zscore' .*one of combat"):
        get_harmonizer("zscore", level="features")


def test_make_harmonizer_refuses_options_it_does_not_take():
    assert harmonizer_options("combat")["eb"] is True
    assert "smooth_df" in harmonizer_options("gam") and "eb" in harmonizer_options("gam")
    with pytest.raises(HarmonizeError, match=r"combat: unknown option.*smooth_df"):
        make_harmonizer("combat", smooth_df=5)


@pytest.mark.parametrize("name", feature_harmonizers(cross_sectional=True))
def test_each_cross_sectional_harmonizer_removes_a_site_shift(name):
    """Two sites, one shifted by +5: after harmonization the site means agree (< 0.5)."""
    rng = np.random.default_rng(0)
    n = 40
    site = np.repeat(["a", "b"], n)
    age = rng.uniform(20, 80, 2 * n)
    X = pd.DataFrame({f"f{j}": 10 + 0.05 * age + rng.normal(0, 1, 2 * n) for j in range(4)})
    X.loc[site == "b"] += 5.0
    h = make_harmonizer(name)
    out = h.fit(X, pd.Series(site), pd.DataFrame({"age": age})).transform(
        X, pd.Series(site), pd.DataFrame({"age": age}))
    gap = np.abs(out[site == "a"].mean() - out[site == "b"].mean())
    assert np.all(np.asarray(gap) < 0.5), gap


def test_cli_and_study_use_the_registry(tmp_path):
    from test_study import STUDY, _write_study

    from mrharmony.errors import StudyError
    from mrharmony.harmonize import cli_eval
    from mrharmony.study.config import load_study

    assert image_harmonizers() == cli_eval.IMAGE_METHODS
    assert set(cli_eval.HARMONIZERS) == {*feature_harmonizers(cross_sectional=True), "none"}
    # every cross-sectional harmonizer is accepted by a study, the longitudinal one is not
    ok = STUDY.replace('methods = ["combat"]',
                       f"methods = {list(feature_harmonizers(cross_sectional=True))!r}")
    assert load_study(_write_study(tmp_path / "ok", ok)).harmonize.methods == \
        feature_harmonizers(cross_sectional=True)
    bad = STUDY.replace('methods = ["combat"]', 'methods = ["longitudinal"]')
    with pytest.raises(StudyError, match=r"unknown method 'longitudinal' .combat, covbat"):
        load_study(_write_study(tmp_path / "bad", bad))
