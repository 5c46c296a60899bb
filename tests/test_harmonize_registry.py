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
    """Every entry imports -- learned ones too, without PyTorch (their networks are
    imported only when they train or run), so the registry can inspect their options."""
    spec = get_harmonizer(name)
    obj = spec.load()
    if spec.level == "features" or spec.learned:
        assert inspect.isclass(obj)
        assert all(hasattr(obj, m) for m in ("fit", "transform"))
        assert isinstance(harmonizer_options(name), dict)
    else:
        assert callable(obj)
    if spec.learned:
        from mrharmony.harmonize.learned.base import LearnedHarmonizer

        assert issubclass(obj, LearnedHarmonizer) and obj.method == name


def test_learned_modules_import_without_torch(tmp_path):
    """The learned harmonizers' modules import with torch unavailable (the user may lack
    the ``learn`` extra; their networks are imported only inside methods)."""
    import importlib.util
    import subprocess
    import sys

    modules = sorted({HARMONIZERS[n].target.split(":")[0] for n in HARMONIZERS
                      if HARMONIZERS[n].learned})
    modules = [m for m in modules if importlib.util.find_spec(m) is not None]
    code = ("import sys; sys.modules['torch'] = None\n"
            + "".join(f"import {m}\n" for m in modules)
            + "from mrharmony.harmonize.registry import harmonizer_options, learned_harmonizers\n"
            "for n in learned_harmonizers():\n"
            "    try:\n        harmonizer_options(n)\n"
            "    except ModuleNotFoundError as e:\n"
            "        assert 'torch' not in str(e), e\n")
    # from an empty folder: the interpreter must import the installed (or editable)
    # package, never the source folder ``mrharmony/`` of the working directory
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]


def test_names_by_level():
    assert set(feature_harmonizers(learned=None)) | set(image_harmonizers(learned=None)) \
        == set(HARMONIZERS)
    assert set(feature_harmonizers()) | set(image_harmonizers()) == \
        {n for n, s in HARMONIZERS.items() if not s.learned}
    assert {"deepharmony", "mispel"} <= set(image_harmonizers(learned=True))
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
