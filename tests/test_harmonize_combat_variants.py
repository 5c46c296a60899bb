"""ComBat-GAM, CovBat, longitudinal and traveling-subject ComBat on simulated truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mrharmony.errors import HarmonizeError
from mrharmony.harmonize import ComBat, ComBatGAM, CovBat, LongitudinalComBat, TravelingComBat
from mrharmony.harmonize.combat import bspline_basis


def test_bspline_basis_partition_of_unity():
    x = np.linspace(-5, 105, 50)
    basis = bspline_basis(x, np.array([0.0, 30.0, 60.0, 100.0]))
    assert basis.shape == (50, 6)
    np.testing.assert_allclose(basis.sum(axis=1), 1.0, atol=1e-12)


def test_gam_recovers_nonlinear_age_better_than_linear():
    rng = np.random.default_rng(0)
    n, p = 300, 20
    site = rng.choice(["a", "b", "c"], n)
    code = np.unique(site, return_inverse=True)[1]
    age = rng.uniform(20, 90, n)
    # age distribution differs by site so a mis-specified age effect leaks into gamma
    age = np.where(code == 2, age * 0.6 + 10, age)
    truth = 5 + np.sin((age[:, None] - 20) / 70 * np.pi) * rng.uniform(1, 2, p)
    noise = rng.normal(0, 0.2, (n, p))
    X = truth + noise + np.array([0.0, 1.0, -1.0])[code, None]
    cov = pd.DataFrame({"age": age})
    gam = ComBatGAM(smooth=("age",), mean_only=True)
    def err(out):  # error up to the common offset (ComBat maps onto the pooled mean)
        e = out - truth - noise
        return np.abs(e - e.mean(axis=0)).mean()

    err_gam = err(gam.fit_transform(X, site, cov))
    err_lin = err(ComBat(mean_only=True).fit_transform(X, site, cov))
    # site offsets are 1; the spline model leaves < 1/2 the linear model's error
    assert err_gam < 0.5 * err_lin
    np.testing.assert_allclose(gam.transform(X[:7], site[:7], cov[:7]),
                               gam.transform(X, site, cov)[:7], atol=1e-12)
    with pytest.raises(HarmonizeError, match="smooth term"):
        ComBatGAM(smooth=("bmi",)).fit(X, site, cov)


@pytest.mark.parametrize("mode", ["reference", "pooled"])
def test_covbat_aligns_site_covariance(mode):
    rng = np.random.default_rng(1)
    n, p = 240, 12
    site = np.repeat(["a", "b"], n // 2)
    X = rng.normal(size=(n, p))
    # site b: strong shared component along one direction (covariance site effect)
    u = rng.normal(size=p)
    u /= np.linalg.norm(u)
    X[site == "b"] += rng.normal(0, 2.0, (n // 2, 1)) * u
    X += 3.0

    def ratio(Y):  # variance along u, site b over site a (1 without a site effect)
        return np.var(Y[site == "b"] @ u) / np.var(Y[site == "a"] @ u)

    assert ratio(ComBat().fit_transform(X, site)) > 2.0  # ComBat only scales per feature
    model = CovBat(pct_var=0.95, mode=mode)
    out = model.fit_transform(X, site)
    # truth 1; sampling error of a variance ratio at n = 120 per site is ~ 0.2
    assert ratio(out) == pytest.approx(1.0, abs=0.3)
    np.testing.assert_allclose(model.transform(X, site), out, atol=1e-12)


@pytest.mark.parametrize("mode", ["reference", "moments"])
def test_longitudinal_random_intercept(mode):
    rng = np.random.default_rng(2)
    m, visits, p = 60, 3, 15
    subj = np.repeat(np.arange(m), visits)
    site = np.repeat(rng.choice(["a", "b", "c"], m), visits)
    code = np.unique(site, return_inverse=True)[1]
    time = np.tile(np.arange(visits, dtype=float), m)
    sigma_u, sigma_e = 2.0, 0.5
    eta = rng.normal(0, sigma_u, (m, p))[subj]
    clean = 10 + 0.3 * time[:, None] + eta + rng.normal(0, sigma_e, (subj.size, p))
    X = clean + np.array([0.0, 1.5, -1.0])[code, None]
    cov = pd.DataFrame({"time": time})
    model = LongitudinalComBat(mode=mode)
    out = model.fit_transform(X, site, cov, subject=subj)
    lam = sigma_u**2 / sigma_e**2
    # REML or moment estimate of the variance ratio: within 50 % of the truth (60 subjects)
    assert np.median(model.lambda_) == pytest.approx(lam, rel=0.5)
    # the within-subject slope is preserved (true 0.3 per visit)
    slope = np.polyfit(time, (out - out.mean(0)).mean(1), 1)[0]
    assert slope == pytest.approx(0.3, abs=0.05)
    # site offsets (1.5, -1) are removed up to the subject sampling error
    resid = out - clean
    assert np.abs(resid.mean(0)).max() < 0.5
    assert np.abs([resid[code == k].mean() - resid.mean() for k in range(3)]).max() < 0.35
    with pytest.raises(HarmonizeError, match="subject labels are required"):
        LongitudinalComBat().fit(X, site, cov)


def test_traveling_subjects_recover_site_bias():
    rng = np.random.default_rng(3)
    p, m = 25, 12
    bias = {"a": 0.0, "b": 2.0, "c": -1.0}
    ts_subj = np.repeat(np.arange(m), 3)
    ts_site = np.tile(["a", "b", "c"], m)
    mu = rng.normal(10, 3, (m, p))
    X_ts = mu[ts_subj] + np.array([bias[s] for s in ts_site])[:, None]
    X_ts += rng.normal(0, 0.1, X_ts.shape)
    model = TravelingComBat(eb=False).fit(X_ts, ts_site, subject=ts_subj)
    # a cohort that never travelled, with very different biology per site
    site = np.repeat(["a", "b", "c"], 30)
    truth = rng.normal(0, 3, (90, p)) + np.where(site == "b", 5.0, 0.0)[:, None]
    X = truth + np.array([bias[s] for s in site])[:, None]
    out = model.transform(X, site)
    shift = X - out
    expected = np.array([bias[s] for s in site]) - np.mean(list(bias.values()))
    # noise 0.1 over 12 subjects: bias recovered within 0.1; biology (+5 at b) kept
    np.testing.assert_allclose(shift, np.broadcast_to(expected[:, None], shift.shape),
                               atol=0.1)
    with pytest.raises(HarmonizeError, match="one site only"):
        TravelingComBat().fit(X, site, subject=np.arange(90))
