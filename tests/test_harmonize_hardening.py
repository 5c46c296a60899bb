"""Harmonization edge cases: label columns, model files, partial outputs, near-confounding,
index alignment and non-numeric feature cells (each reproduced, then refused or fixed)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from mrharmony.cli import main
from mrharmony.errors import HarmonizeError
from mrharmony.harmonize import ComBat
from mrharmony.harmonize.combat_design import CONDITION_REFUSE, CONDITION_WARN, design_condition
from mrharmony.harmonize.combat_math import HarmonizeWarning


def table(seed: int = 0, n: int = 60, p: int = 5, sites=(1, 2, 3)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    site = rng.choice(np.asarray(sites), n)
    code = np.unique(site, return_inverse=True)[1]
    age = rng.integers(20, 80, n).astype(float)
    X = 3 + 0.02 * age[:, None] + rng.normal(size=(n, p)) + np.array([0, 0.8, -0.5])[code, None]
    df = pd.DataFrame(X, columns=[f"roi_{i}" for i in range(p)])
    df.insert(0, "site", site)
    df.insert(1, "age", age)
    return df


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def test_integer_sites_stay_integer_labels_and_apply_accepts_them(tmp_path, capsys):
    df = table()
    src = tmp_path / "in.csv"
    df.to_csv(src, index=False)
    code, err = run(["harmonize", "combat", str(src), "--batch", "site", "--covariates", "age",
                     "-o", str(tmp_path / "out.csv"), "--model", str(tmp_path / "m.model")],
                    capsys)
    assert code == 0, err
    model = ComBat.load(tmp_path / "m.model")
    assert model.batches_ == ["1", "2", "3"]  # not '1.0', '2.0', '3.0'
    code, err = run(["harmonize", "apply", str(tmp_path / "m.model"), str(src),
                     "-o", str(tmp_path / "applied.csv")], capsys)
    assert code == 0, err
    a = pd.read_csv(tmp_path / "out.csv")
    b = pd.read_csv(tmp_path / "applied.csv")
    np.testing.assert_allclose(a.filter(like="roi_"), b.filter(like="roi_"), atol=1e-10)


def test_empty_site_cell_is_refused_with_its_line(tmp_path, capsys):
    df = table().astype({"site": object})
    df.loc[4, "site"] = None
    src = tmp_path / "in.csv"
    df.to_csv(src, index=False)
    code, err = run(["harmonize", "combat", str(src), "--batch", "site",
                     "-o", str(tmp_path / "out.csv")], capsys)
    assert code == 2
    assert "empty on line(s) [6]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.csv").exists()


def test_empty_model_file_is_a_model_error_not_an_abort(tmp_path, capsys):
    df = table()
    src = tmp_path / "in.csv"
    df.to_csv(src, index=False)
    (tmp_path / "empty.model").write_bytes(b"")
    code, err = run(["harmonize", "apply", str(tmp_path / "empty.model"), str(src),
                     "-o", str(tmp_path / "out.csv")], capsys)
    assert code == 2
    assert "empty file" in err
    assert not (tmp_path / "out.csv").exists()


def test_unwritable_model_path_leaves_no_table(tmp_path, capsys):
    df = table()
    src = tmp_path / "in.csv"
    df.to_csv(src, index=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    code, err = run(["harmonize", "combat", str(src), "--batch", "site",
                     "-o", str(tmp_path / "out.csv"), "--model", str(blocker / "m.model")],
                    capsys)
    assert code == 2
    assert "cannot write the model" in err
    assert not (tmp_path / "out.csv").exists()


def test_non_numeric_cell_in_a_feature_column_is_refused(tmp_path, capsys):
    df = table().astype({"roi_2": object})
    df.loc[7, "roi_2"] = "n/a?"
    src = tmp_path / "in.csv"
    df.to_csv(src, index=False)
    code, err = run(["harmonize", "combat", str(src), "--batch", "site",
                     "-o", str(tmp_path / "out.csv")], capsys)
    assert code == 2
    assert "'roi_2' has non-numeric cells ['n/a?'] on line(s) [9]" in err
    assert not (tmp_path / "out.csv").exists()


def test_near_confounded_covariate_is_refused_and_collinear_one_warned():
    rng = np.random.default_rng(3)
    n = 90
    site = np.repeat(["A", "B", "C"], 30)
    code = np.repeat([0.0, 1.0, 2.0], 30)
    X = 10 + rng.normal(size=(n, 4))
    # site code + 1e-8 noise: rank-complete, so the exact check passes; the condition
    # number (~1e8) is what catches it
    near = pd.DataFrame({"c": code + 1e-8 * rng.normal(size=n)})
    Z = (site[:, None] == np.array(["A", "B", "C"])[None]).astype(float)
    assert design_condition(Z, near.to_numpy()) > 1e6
    with pytest.raises(HarmonizeError, match="condition number"):
        ComBat().fit(X, site, near)
    # strongly collinear (~99.95 % explained by site): a warning with the number
    strong = pd.DataFrame({"c": code + 0.02 * rng.normal(size=n)})
    cond = design_condition(Z, strong.to_numpy())
    assert CONDITION_WARN < cond < CONDITION_REFUSE
    with pytest.warns(HarmonizeWarning, match="condition number"):
        ComBat().fit(X, site, strong)
    # an ordinary covariate: no warning
    age = pd.DataFrame({"age": rng.uniform(20, 80, n)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ComBat().fit(X, site, age)


def test_pandas_inputs_are_aligned_by_index_or_refused():
    rng = np.random.default_rng(5)
    n = 48
    idx = pd.Index([f"scan{i:02d}" for i in range(n)])
    X = pd.DataFrame(10 + rng.normal(size=(n, 3)), index=idx)
    site = pd.Series(np.repeat(["A", "B", "C"], 16), index=idx)
    age = pd.DataFrame({"age": rng.uniform(20, 80, n)}, index=idx)
    X.iloc[:, 0] += 0.05 * age["age"].to_numpy()
    expect = ComBat().fit_transform(X, site, age)
    order = rng.permutation(n)
    got = ComBat().fit_transform(X, site.iloc[order], age.iloc[order])
    np.testing.assert_allclose(got.to_numpy(), expect.to_numpy(), atol=1e-12)
    foreign = age.set_axis([f"other{i}" for i in range(n)])
    with pytest.raises(HarmonizeError, match="index does not match"):
        ComBat().fit(X, site, foreign)
