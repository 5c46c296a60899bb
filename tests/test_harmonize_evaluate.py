"""Evaluation: site discriminability without leakage, site tests, ICC, CoV, Bland-Altman,
biological associations, permutation tests and image similarity."""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mrharmony.errors import HarmonizeError
from mrharmony.harmonize.evaluate import (
    MeanCentering,
    association_effects,
    bland_altman,
    bland_altman_sites,
    cov_across_sites,
    evaluate_tables,
    icc,
    image_similarity,
    ks_tests,
    preservation_of_associations,
    site_discriminability,
    site_effect_tests,
    spurious_association_test,
)

N_SITES, PER_SITE, N_FEAT = 3, 30, 12
AGE_BETA = np.linspace(-0.05, 0.05, N_FEAT)  # feature units per year (ground truth)


def _cohort(seed=0, *, shift=0.0, scale=0.0, n_sites=N_SITES, per_site=PER_SITE):
    """Wide table: site location (``shift`` SDs) and scale (``scale`` log-SD) effects."""
    rng = np.random.default_rng(seed)
    n = n_sites * per_site
    site = np.repeat([f"S{i}" for i in range(n_sites)], per_site)
    age = rng.uniform(20, 80, n)
    sex = rng.choice(["F", "M"], n)
    biology = 10 + np.outer(age, AGE_BETA) + 0.3 * (sex == "M")[:, None]
    gamma = rng.normal(0, shift, (n_sites, N_FEAT))
    delta = np.exp(rng.normal(0, scale, (n_sites, N_FEAT)))
    idx = np.repeat(np.arange(n_sites), per_site)
    x = biology + gamma[idx] + delta[idx] * rng.normal(0, 1, (n, N_FEAT))
    feats = pd.DataFrame(x, columns=[f"roi{j}" for j in range(N_FEAT)])
    meta = pd.DataFrame({"subject": [f"p{i}" for i in range(n)], "site": site, "age": age,
                         "sex": sex})
    return pd.concat([meta, feats], axis=1)


def _xyc(table):
    feats = [c for c in table.columns if c.startswith("roi")]
    return table[feats], table["site"].to_numpy(), table[["age", "sex"]]


# --------------------------------------------------------------------------------------
# site discriminability
# --------------------------------------------------------------------------------------
def test_no_site_effect_is_at_chance():
    X, site, _ = _xyc(_cohort(1))
    r = site_discriminability(X, site, n_permutations=20, seed=0)
    assert r.chance_balanced_accuracy == pytest.approx(1 / 3)
    # stated band: |balanced accuracy - 1/3| <= 0.15 (90 samples: binomial SD ~ 0.05)
    assert abs(r.balanced_accuracy - 1 / 3) <= 0.15
    assert r.p_value > 0.05
    assert len(r.fold_accuracy) == 5


def test_strong_site_effect_is_found():
    X, site, _ = _xyc(_cohort(2, shift=1.0, scale=0.3))
    r = site_discriminability(X, site, n_permutations=10, seed=0)
    assert r.accuracy >= 0.9  # stated: near 1 with 1-SD site shifts on 12 features
    assert r.p_value == pytest.approx(1 / 11)  # no permutation reaches it
    rf = site_discriminability(X, site, classifier="random_forest", n_permutations=0)
    assert rf.accuracy >= 0.9


def test_mean_centering_inside_cv_removes_location_effect():
    X, site, cov = _xyc(_cohort(3, shift=1.0))
    r = site_discriminability(X, site, covariates=cov, harmonizer=MeanCentering,
                              n_permutations=0)
    assert abs(r.balanced_accuracy - 1 / 3) <= 0.15
    assert np.isnan(r.p_value)
    assert r.harmonizer == "MeanCentering"


class _Recorder:
    """Mock harmonizer: records which samples (DataFrame index) it was fitted on."""

    log: ClassVar[list] = []

    def fit(self, X, batch, covariates=None):
        _Recorder.log.append(("fit", frozenset(X.index)))
        assert list(covariates.index) == list(X.index)  # covariates travel with X
        return self

    def transform(self, X, batch, covariates=None):
        _Recorder.log.append(("transform", frozenset(X.index)))
        return X


def test_harmonizer_is_fitted_inside_each_fold_only():
    from sklearn.model_selection import StratifiedKFold

    X, site, cov = _xyc(_cohort(4, shift=0.5))
    X = X.set_axis([f"scan{i}" for i in range(len(X))])
    _Recorder.log = []
    site_discriminability(X, site, covariates=cov, harmonizer=_Recorder, n_splits=5,
                          n_permutations=0, seed=7)
    folds = [(frozenset(X.index[tr]), frozenset(X.index[te])) for tr, te in
             StratifiedKFold(5, shuffle=True, random_state=7).split(X, site.astype(str))]
    fits = [s for kind, s in _Recorder.log if kind == "fit"]
    assert len(fits) == 5
    for (train, test), fitted in zip(folds, fits, strict=True):
        assert fitted == train  # fitted on the training fold ...
        assert not fitted & test  # ... and never saw a held-out sample
    transformed = [s for kind, s in _Recorder.log if kind == "transform"]
    assert set(transformed) == {s for f in folds for s in f}


class _Memorizer:
    """Passes the samples it was fitted on through unchanged and blanks all others.

    Harmonized before the split (leaky), every sample was "seen": the site stays fully
    predictable. Fitted inside the folds, every held-out sample is blanked, so the
    classifier can only guess: the accuracy tells which protocol ran.
    """

    def fit(self, X, batch, covariates=None):
        self.seen = set(X.index)
        return self

    def transform(self, X, batch, covariates=None):
        out = X.copy()
        out.loc[~X.index.isin(list(self.seen))] = 0.0
        return out


def test_leaky_protocol_is_not_what_the_code_does():
    X, site, _ = _xyc(_cohort(5, shift=1.0))
    leaky_table = _Memorizer().fit(X, site).transform(X, site)
    leaky = site_discriminability(leaky_table, site, n_permutations=0)
    proper = site_discriminability(X, site, harmonizer=_Memorizer, n_permutations=0)
    assert leaky.accuracy >= 0.9  # harmonize-then-split: the test folds were seen
    assert proper.accuracy <= 0.5  # split-then-harmonize: held-out samples never seen


@pytest.mark.skipif(importlib.util.find_spec("mrharmony.harmonize.combat") is None,
                    reason="ComBat not available yet")
def test_combat_inside_cv_brings_site_prediction_to_chance():
    from mrharmony.harmonize.combat import ComBat

    X, site, cov = _xyc(_cohort(6, shift=1.0, scale=0.3))
    before = site_discriminability(X, site, n_permutations=0)
    after = site_discriminability(X, site, covariates=cov, n_permutations=0,
                                  harmonizer=lambda: ComBat())
    assert before.accuracy >= 0.9
    assert abs(after.balanced_accuracy - 1 / 3) <= 0.15


def test_discriminability_refuses_small_sites():
    X, site, _ = _xyc(_cohort(7, per_site=4))
    with pytest.raises(HarmonizeError, match="fewer than n_splits=5"):
        site_discriminability(X, site)
    with pytest.raises(HarmonizeError, match="factory"):
        site_discriminability(X, site, n_splits=2, harmonizer=42, n_permutations=0)


# --------------------------------------------------------------------------------------
# site tests
# --------------------------------------------------------------------------------------
def test_site_tests_match_scipy_per_feature():
    X, site, _ = _xyc(_cohort(8, shift=0.4, scale=0.4))
    X = X.copy()
    X.iloc[3, 2] = np.nan  # one missing value: omitted for that feature only
    res = site_effect_tests(X, site)
    for col in X.columns[:4]:
        groups = [X[col][site == s].dropna().to_numpy() for s in np.unique(site)]
        assert res.loc[col, "anova_f"] == pytest.approx(stats.f_oneway(*groups).statistic)
        assert res.loc[col, "kruskal_p"] == pytest.approx(stats.kruskal(*groups).pvalue)
        assert res.loc[col, "levene_w"] == pytest.approx(stats.levene(*groups).statistic)
        assert res.loc[col, "bartlett_p"] == pytest.approx(stats.bartlett(*groups).pvalue)
    ks = ks_tests(X, site, mode="pairwise")
    assert len(ks) == 3 * N_FEAT
    row = ks[(ks.feature == "roi0") & (ks.site_a == "S0") & (ks.site_b == "S2")].iloc[0]
    ref = stats.ks_2samp(X["roi0"][site == "S0"], X["roi0"][site == "S2"])
    assert row.statistic == pytest.approx(ref.statistic)
    rest = ks_tests(X, site)
    row = rest[(rest.feature == "roi1") & (rest.site_a == "S1")].iloc[0]
    assert row.site_b == "rest"
    ref = stats.ks_2samp(X["roi1"][site == "S1"], X["roi1"][site != "S1"])
    assert row.p_value == pytest.approx(ref.pvalue)


def test_constant_feature_gives_nan_not_error():
    X, site, _ = _xyc(_cohort(9))
    X = X.assign(const=1.0)
    res = site_effect_tests(X, site)
    assert np.isnan(res.loc["const", "anova_f"])


# --------------------------------------------------------------------------------------
# ICC, CoV, Bland-Altman
# --------------------------------------------------------------------------------------
# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges
SF_TABLE = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9],
                     [6, 2, 4, 7]], dtype=float)


def _long(table):
    n, k = table.shape
    return (np.repeat([f"t{i}" for i in range(n)], k), np.tile([f"j{j}" for j in range(k)], n),
            table.ravel())


def test_icc_matches_shrout_fleiss_table():
    subj, site, y = _long(SF_TABLE)
    res = icc(pd.DataFrame({"y": y}), subj, site)
    # published values (Shrout & Fleiss 1979, Table 4), 2 decimals
    assert res.loc["y", "icc2_1"] == pytest.approx(0.29, abs=0.005)
    assert res.loc["y", "icc3_1"] == pytest.approx(0.71, abs=0.005)


def test_icc_matches_statsmodels_anova():
    import statsmodels.formula.api as smf
    from statsmodels.stats.anova import anova_lm

    rng = np.random.default_rng(10)
    n, k = 15, 4
    table = rng.normal(0, 1, (n, 1)) * 2 + rng.normal(0, 0.5, (1, k)) + rng.normal(0, 1, (n, k))
    subj, site, y = _long(table)
    df = pd.DataFrame({"subject": subj, "site": site, "y": y})
    aov = anova_lm(smf.ols("y ~ C(subject) + C(site)", data=df).fit())
    ms = aov["mean_sq"]
    msr, msc, mse = ms["C(subject)"], ms["C(site)"], ms["Residual"]
    icc2 = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
    icc3 = (msr - mse) / (msr + (k - 1) * mse)
    # shuffle the rows and add an incomplete subject: it must be left out
    extra = pd.DataFrame({"subject": ["lone"], "site": ["j0"], "y": [100.0]})
    df2 = pd.concat([df, extra]).sample(frac=1, random_state=0)
    res = icc(df2[["y"]], df2["subject"], df2["site"])
    assert res.loc["y", "icc2_1"] == pytest.approx(icc2, rel=1e-10)
    assert res.loc["y", "icc3_1"] == pytest.approx(icc3, rel=1e-10)
    assert res.loc["y", "n_subjects"] == n


def test_cov_and_bland_altman_by_hand():
    subj, site, y = _long(SF_TABLE)
    X = pd.DataFrame({"y": y})
    within = np.mean(SF_TABLE.std(axis=1, ddof=1) / SF_TABLE.mean(axis=1)) * 100
    assert cov_across_sites(X, site, subject=subj)["y"] == pytest.approx(within)
    means = SF_TABLE.mean(axis=0)
    assert cov_across_sites(X, site)["y"] == pytest.approx(100 * means.std(ddof=1)
                                                           / means.mean())
    a, b = SF_TABLE[:, 0], SF_TABLE[:, 3]
    d = a - b
    ba = bland_altman(a, b).iloc[0]
    assert ba.bias == pytest.approx(d.mean())
    assert ba.loa_lower == pytest.approx(d.mean() - 1.96 * d.std(ddof=1))
    assert ba.loa_upper == pytest.approx(d.mean() + 1.96 * d.std(ddof=1))
    ba2 = bland_altman_sites(X, subj, site, "j0", "j3").iloc[0]
    assert ba2.bias == pytest.approx(ba.bias)
    with pytest.raises(HarmonizeError, match="repeated"):
        icc(pd.DataFrame({"y": [1.0, 2, 3, 4, 5]}), ["a", "a", "a", "b", "b"],
            ["x", "x", "y", "x", "y"])


# --------------------------------------------------------------------------------------
# biological associations and permutation checks
# --------------------------------------------------------------------------------------
def test_association_effects_match_statsmodels():
    import statsmodels.formula.api as smf

    X, _, cov = _xyc(_cohort(11))
    res = association_effects(X, cov, "age")
    fit = smf.ols("roi3 ~ age + C(sex)", data=pd.concat([X, cov], axis=1)).fit()
    assert res.loc["roi3", "beta"] == pytest.approx(fit.params["age"], rel=1e-10)
    assert res.loc["roi3", "se"] == pytest.approx(fit.bse["age"], rel=1e-10)
    assert res.loc["roi3", "p"] == pytest.approx(fit.pvalues["age"], rel=1e-8)


def test_preservation_against_truth():
    table = _cohort(12, shift=1.0)
    X, site, cov = _xyc(table)
    after = MeanCentering().fit(X, site).transform(X, site)
    truth = pd.Series(AGE_BETA, index=X.columns)
    res = preservation_of_associations(X, after, cov, "age", truth=truth)
    # site shifts add noise to the age slope; removing them brings it closer to truth
    assert res["abs_error_after"].mean() < res["abs_error_before"].mean()
    # within 4 standard errors of the truth (SE = 1 / (SD_age sqrt(n)) ~ 0.006 per year)
    assert res["abs_error_after"].max() < 0.025


def test_spurious_association_permutation():
    X, _, cov = _xyc(_cohort(13))
    rng = np.random.default_rng(14)
    cov = cov.assign(noise=rng.normal(size=len(cov)))
    null = spurious_association_test(X, cov, "noise", n_permutations=200, seed=1)
    assert null["p_fwer"].min() > 0.05  # no spurious association (family-wise)
    real = spurious_association_test(X, cov, "age", n_permutations=200, seed=1)
    assert real.loc["roi0", "p_fwer"] == pytest.approx(1 / 201)  # the strongest true effect
    assert (null["p_fwer"] >= null["p_perm"]).all()


# --------------------------------------------------------------------------------------
# image similarity and the table-level evaluation
# --------------------------------------------------------------------------------------
def test_image_similarity_against_skimage():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(15)
    ref = rng.uniform(0, 100, (20, 20, 9))
    img = ref + rng.normal(0, 3, ref.shape)
    res = image_similarity(img, ref)
    dr = ref.max() - ref.min()
    assert res["psnr_db"] == pytest.approx(peak_signal_noise_ratio(ref, img, data_range=dr))
    assert res["ssim"] == pytest.approx(structural_similarity(ref, img, data_range=dr,
                                                              win_size=7), rel=1e-6)
    assert res["mae"] == pytest.approx(np.abs(img - ref).mean())
    mask = np.zeros(ref.shape, bool)
    mask[5:15, 5:15] = True
    masked = image_similarity(img, ref, mask=mask)
    assert masked["mae"] == pytest.approx(np.abs(img - ref)[mask].mean())


def test_evaluate_tables_with_traveling_subjects():
    rng = np.random.default_rng(16)
    n_subj, sites = 12, ["A", "B", "C"]
    subj_effect = rng.normal(0, 2, (n_subj, 4))
    site_shift = {"A": np.zeros(4), "B": np.array([3.0, -3, 2, 4]),
                  "C": np.array([-2.0, 3, -4, 1])}
    rows = []
    for i in range(n_subj):
        age = 20 + 5 * i
        for s in sites:
            vals = 10 + subj_effect[i] + 0.1 * age + site_shift[s] + rng.normal(0, 0.3, 4)
            rows.append({"subject": f"p{i}", "site": s, "age": float(age),
                         **{f"f{j}": v for j, v in enumerate(vals)}})
    before = pd.DataFrame(rows)
    feats = [f"f{j}" for j in range(4)]
    after = before.copy()
    after[feats] = MeanCentering().fit(before[feats], before["site"]).transform(
        before[feats], before["site"]).to_numpy()
    truth = pd.DataFrame({"age": [0.1] * 4}, index=feats)
    out = evaluate_tables(before, after, batch="site", covariates=["age"], truth=truth,
                          harmonizer=MeanCentering, n_splits=3, n_permutations=5)
    assert {"discriminability", "site_tests", "ks", "cov", "icc", "bland_altman",
            "associations", "summary"} <= set(out)
    icc_tab = out["icc"]
    assert (icc_tab[("after", "icc2_1")] > icc_tab[("before", "icc2_1")]).all()
    assert (icc_tab[("after", "icc2_1")] > 0.95).all()
    summ = out["summary"]["value"]
    assert summ["site accuracy before"] >= 0.8  # 3-SD site shifts, 36 scans, 3 folds
    assert summ["site accuracy, harmonizer in CV"] <= 0.6
    assert summ["median CoV after (%)"] < summ["median CoV before (%)"]
    ba = out["bland_altman"]
    b_after = ba[(ba.table == "after") & (ba.site_a == "B")]["bias"]
    np.testing.assert_allclose(b_after, 0, atol=0.3)  # 3 noise SDs of a 12-pair mean
    with pytest.raises(HarmonizeError, match="same scans"):
        evaluate_tables(before, after.iloc[::-1].reset_index(drop=True), covariates=["age"])


def test_cli_evaluate_writes_self_contained_report(tmp_path):
    from mrharmony.cli import main

    before = _cohort(17, shift=1.0)
    X, site, _ = _xyc(before)
    after = before.copy()
    after[X.columns] = MeanCentering().fit(X, site).transform(X, site).to_numpy()
    b, a = tmp_path / "before.csv", tmp_path / "after.csv"
    before.to_csv(b, index=False)
    after.to_csv(a, index=False)
    out = tmp_path / "report"
    args = ["evaluate", str(b), str(a), "--batch", "site", "--covariates", "age,sex",
            "--harmonizer", "mean", "--permutations", "0", "--folds", "3", "-o",
            str(out)]
    assert main(args) == 0
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert (out / "pca.png").read_bytes().startswith(b"\x89PNG")
    summary = pd.read_csv(out / "summary.csv", index_col=0)["value"]
    assert summary["site accuracy before"] >= 0.85  # 3 folds of 90 scans
    assert summary["site accuracy, harmonizer in CV"] <= 0.5
    assert main(args) == 2  # refuses to overwrite
    assert main([*args, "--force"]) == 0
    assert main(["evaluate", str(b), str(a), "--batch", "scanner", "-o",
                 str(tmp_path / "x")]) == 2


def test_report_and_plots(tmp_path):
    from mrharmony.harmonize.plots import plot_bland_altman, plot_pca, plot_site_boxplots
    from mrharmony.harmonize.report import ReportSection, write_html_report

    X, site, _ = _xyc(_cohort(18, shift=0.5))
    p1 = plot_site_boxplots(X, site, tmp_path / "box.png", after=X - 1)
    p2 = plot_pca(X, site, tmp_path / "pca.png")
    p3 = plot_bland_altman(X["roi0"], X["roi1"], tmp_path / "ba.png")
    with pytest.raises(FileExistsError):
        plot_pca(X, site, p2)
    table = pd.DataFrame({"x": [1.23456789, np.nan]}, index=["<b>", "y"])
    path = write_html_report(tmp_path / "r.html", "T & <test>", [
        ReportSection("one", text="a < b\n\nsecond", tables={"t": table}, figures=[p1, p2]),
        {"title": "two", "figures": {"BA": p3}},
    ])
    html = path.read_text()
    assert html.count("<img") == 3 and "&lt;b&gt;" in html and "1.235" in html
    assert "T &amp; &lt;test&gt;" in html
    with pytest.raises(HarmonizeError, match="unknown keys"):
        write_html_report(tmp_path / "r2.html", "x", [{"title": "a", "figure": []}])
