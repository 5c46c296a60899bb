"""ComBat: agreement with neuroCombat 0.2.12 (run here) and the anchor's defects, fixed."""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pandas as pd
import pytest

from mrharmony.errors import HarmonizeError
from mrharmony.harmonize.combat import ComBat, HarmonizeWarning

neuroCombat_mod = pytest.importorskip("neuroCombat")
neuroCombat = neuroCombat_mod.neuroCombat
neuroCombatFromTraining = neuroCombat_mod.neuroCombatFromTraining

SITES = np.array(["s1", "s2", "s3", "s4"])


def make_data(seed: int = 1, n_per=(12, 15, 9, 20), p: int = 40):
    """Sites with additive and multiplicative effects, age and sex effects.

    Ages are integers so that neuroCombat's float32 cast of continuous covariates is exact.
    """
    rng = np.random.default_rng(seed)
    n = sum(n_per)
    site = np.repeat(SITES[: len(n_per)], n_per)
    code = np.unique(site, return_inverse=True)[1]
    age = rng.integers(20, 80, n).astype(float)
    sex = rng.choice(["F", "M"], n)
    X = rng.normal(size=(n, p)) * rng.uniform(0.5, 2, p) + 0.05 * age[:, None]
    X += (sex == "M")[:, None] * 0.7
    X += rng.normal(0, 1, (len(n_per), p))[code] * np.arange(len(n_per))[code, None]
    X *= rng.uniform(0.5, 1.5, (len(n_per), p))[code]
    X += 10.0
    return X, site, pd.DataFrame({"age": age, "sex": sex})


def run_anchor(X, site, cov, **kwargs):
    """neuroCombat on samples x features input (it wants features x samples)."""
    covars = pd.DataFrame({"site": site})
    cat, num = None, None
    if cov is not None:
        covars = pd.concat([covars, cov], axis=1)
        cat, num = ["sex"], ["age"]
    with contextlib.redirect_stdout(io.StringIO()):
        out = neuroCombat(X.T.copy(), covars, "site", categorical_cols=cat,
                          continuous_cols=num, **kwargs)
    return out["data"].T


OPTIONS = [
    pytest.param({}, id="parametric"),
    pytest.param({"parametric": False}, id="nonparametric"),
    pytest.param({"eb": False}, id="eb-off"),
    pytest.param({"mean_only": True}, id="mean-only"),
    pytest.param({"mean_only": True, "parametric": False}, id="mean-only-nonparametric"),
    pytest.param({"mean_only": True, "eb": False}, id="mean-only-eb-off"),
]


@pytest.mark.parametrize("with_cov", [False, True], ids=["no-cov", "age-sex"])
@pytest.mark.parametrize("opts", OPTIONS)
def test_agrees_with_neurocombat(opts, with_cov):
    X, site, cov = make_data()
    cov = cov if with_cov else None
    ref = run_anchor(X, site, cov, **opts)
    ours = ComBat(**opts).fit_transform(X, site, cov)
    # 1e-8 absolute on values ~10: the agreement bound (we see ~1e-13)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-8)


def test_reference_batch_anchor_crashes_ours_matches_shimmed_anchor(monkeypatch):
    X, site, cov = make_data(seed=2)
    with pytest.raises(AttributeError, match="int"):  # np.int is gone from NumPy
        run_anchor(X, site, cov, ref_batch="s2")
    monkeypatch.setattr(np, "int", int, raising=False)  # shim the removed alias
    for opts in ({}, {"eb": False}, {"mean_only": True}):
        for c in (None, cov):
            ref = run_anchor(X, site, c, ref_batch="s2", **opts)
            model = ComBat(ref_batch="s2", **opts)
            ours = model.fit_transform(X, site, c)
            np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-8)
            # the reference batch is returned bit-for-bit unchanged
            np.testing.assert_array_equal(ours[site == "s2"], X[site == "s2"])
    ref = run_anchor(X, site, None, ref_batch="s2", parametric=False)
    ours = ComBat(ref_batch="s2", parametric=False).fit_transform(X, site)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-8)


def test_reference_batch_closed_form_without_eb():
    """sva semantics, own derivation.

    x -> (x - mean_b) / sd_b(ddof 1) * sd_ref(ddof 0) + mean_ref.
    """
    X, site, _ = make_data(seed=3)
    out = ComBat(ref_batch="s1", eb=False).fit_transform(X, site)
    r = X[site == "s1"]
    for s in SITES:
        xb = X[site == s]
        expect = (xb - xb.mean(0)) / xb.std(0, ddof=1) * r.std(0) + r.mean(0)
        if s == "s1":
            expect = xb
        np.testing.assert_allclose(out[site == s], expect, rtol=1e-12, atol=1e-12)


def test_nonparametric_large_batches_do_not_underflow():
    X, site, _ = make_data(seed=4, n_per=(1000, 800), p=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the anchor's 0/0
        anchor = run_anchor(X, site, None, parametric=False)
    assert np.isnan(anchor).any()  # (2 pi d)^(-n/2) underflows to 0 in the anchor
    ours = ComBat(parametric=False).fit_transform(X, site)
    assert np.isfinite(ours).all()
    # own reference: sva's int.eprior formula with scipy's logsumexp, feature by feature
    from scipy.special import logsumexp

    model = ComBat(parametric=False).fit(X, site)
    sd = np.sqrt(model.var_pooled_)
    for i, s in enumerate(["s1", "s2"]):
        z = (X[site == s] - model.grand_mean_) / sd
        g, d = z.mean(0), z.var(0, ddof=1)
        for f in range(X.shape[1]):
            j = np.arange(X.shape[1]) != f
            loglh = (-0.5 * len(z) * np.log(2 * np.pi * d[j])
                     - ((z[:, [f]] - g[j]) ** 2).sum(0) / (2 * d[j]))
            w = np.exp(loglh - logsumexp(loglh))
            # 1e-9: log-space weights differ only by rounding
            np.testing.assert_allclose(model.gamma_star_[i, f], w @ g[j], rtol=1e-9)
            np.testing.assert_allclose(model.delta_star_[i, f], w @ d[j], rtol=1e-9)


@pytest.mark.parametrize("with_cov", [False, True], ids=["no-cov", "age-sex"])
def test_one_nan_does_not_spread(with_cov):
    X, site, cov = make_data(seed=5)
    cov = cov if with_cov else None
    Xn = X.copy()
    Xn[3, 7] = np.nan
    Xn[20, 7] = np.nan
    Xn[0, 2] = np.nan
    assert np.isnan(run_anchor(Xn, site, cov)).all()  # anchor: one NaN -> all NaN
    ours = ComBat().fit_transform(Xn, site, cov)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(Xn))
    # without EB each feature is independent: the NaN feature equals a complete-case fit
    rows = ~np.isnan(Xn[:, 7])
    cc = ComBat(eb=False).fit_transform(X[rows][:, [7, 8]], site[rows],
                                         None if cov is None else cov[rows])
    full = ComBat(eb=False).fit_transform(Xn, site, cov)
    np.testing.assert_allclose(full[rows, 7], cc[:, 0], rtol=1e-10, atol=1e-10)


def test_one_subject_batch_falls_back_to_mean_only():
    X, site, _ = make_data(seed=6)
    site = site.copy()
    site[-1] = "s5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert np.isnan(run_anchor(X, site, None)).all()  # anchor: all NaN
    model = ComBat()
    with pytest.warns(HarmonizeWarning, match="one sample"):
        out = model.fit_transform(X, site)
    assert np.isfinite(out).all()
    i = model.batches_.index("s5")
    g = model.gamma_hat_[i]
    t2 = np.var(g, ddof=1)
    g_star = (t2 * g + g.mean()) / (t2 + 1)  # sva mean-only shrinkage
    np.testing.assert_allclose(model.delta_star_[i], 1.0)
    np.testing.assert_allclose(out[-1], X[-1] - g_star * np.sqrt(model.var_pooled_),
                               rtol=1e-12)


def test_constant_feature_unchanged_and_harmless():
    X, site, _ = make_data(seed=7)
    Xc = np.column_stack([X, np.full(len(X), 2.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # anchor divides by g_old = 0
        anchor = run_anchor(Xc, site, None)
    assert not np.allclose(anchor[:, -1], 2.0)  # anchor moves a constant feature
    assert np.abs(anchor[:, :-1] - run_anchor(X, site, None)).max() > 1e-3  # and others
    with pytest.warns(HarmonizeWarning, match="constant"):
        ours = ComBat().fit_transform(Xc, site)
    np.testing.assert_array_equal(ours[:, -1], 2.0)
    np.testing.assert_allclose(ours[:, :-1], ComBat().fit_transform(X, site), atol=1e-12)


def test_confounded_covariate_named():
    X, site, cov = make_data(seed=8)
    cov = cov.assign(field=np.where(np.isin(site, ["s1", "s2"]), "1.5T", "3T"))
    covars = pd.concat([pd.DataFrame({"site": site}), cov], axis=1)
    with pytest.raises(np.linalg.LinAlgError), contextlib.redirect_stdout(io.StringIO()):
        neuroCombat(X.T.copy(), covars, "site", categorical_cols=["field"])  # says nothing
    with pytest.raises(HarmonizeError, match="confounded with batch: \\['field'\\]"):
        ComBat().fit(X, site, cov)


def test_apply_to_new_subjects_uses_their_covariates():
    X, site, cov = make_data(seed=9)
    anchor = run_anchor(X, site, cov)
    est = None
    covars = pd.concat([pd.DataFrame({"site": site}), cov], axis=1)
    with contextlib.redirect_stdout(io.StringIO()):
        est = neuroCombat(X.T.copy(), covars, "site", categorical_cols=["sex"],
                          continuous_cols=["age"])["estimates"]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", DeprecationWarning)  # anchor's int(array)
        again = neuroCombatFromTraining(X.T.copy(), site, est)["data"].T
    assert np.abs(again - anchor).max() > 0.05  # anchor ignores covariates on apply
    train = np.arange(len(X)) % 3 != 0
    model = ComBat().fit(X[train], site[train], cov[train].reset_index(drop=True))
    whole = model.transform(X, site, cov)
    np.testing.assert_allclose(whole[train], model.transform(X[train], site[train],
                                                             cov[train]), atol=1e-12)
    new = ~train
    np.testing.assert_allclose(model.transform(X[new], site[new], cov[new]), whole[new],
                               atol=1e-12)
    fitted = ComBat().fit(X, site, cov)
    np.testing.assert_allclose(fitted.transform(X, site, cov), ComBat().fit_transform(
        X, site, cov), atol=1e-12)


def test_add_batch_without_refitting():
    X, site, _ = make_data(seed=10)
    old = site != "s4"
    with contextlib.redirect_stdout(io.StringIO()):
        est = neuroCombat(X[old].T.copy(), pd.DataFrame({"site": site[old]}),
                          "site")["estimates"]
        with pytest.raises(ValueError, match="not part of the training"):
            neuroCombatFromTraining(X[~old].T.copy(), site[~old], est)
    model = ComBat(ref_batch="s1").fit(X[old], site[old])
    before = model.gamma_star_.copy(), model.delta_star_.copy()
    model.add_batch(X[~old], site[~old])
    np.testing.assert_array_equal(model.gamma_star_[:3], before[0])
    np.testing.assert_array_equal(model.delta_star_[:3], before[1])
    # with a reference batch and no covariates, the joint fit gives the same estimates
    joint = ComBat(ref_batch="s1").fit(X, site)
    np.testing.assert_allclose(model.gamma_star_[3], joint.gamma_star_[3], atol=1e-12)
    np.testing.assert_allclose(model.delta_star_[3], joint.delta_star_[3], rtol=1e-12)
    np.testing.assert_allclose(model.transform(X, site), joint.transform(X, site),
                               atol=1e-10)
    with pytest.raises(HarmonizeError, match="already fitted"):
        model.add_batch(X[~old], site[~old])


def test_pandas_in_pandas_out_and_chunking():
    X, site, cov = make_data(seed=11)
    df = pd.DataFrame(X, columns=[f"roi{i}" for i in range(X.shape[1])],
                      index=pd.Index([f"scan{i}" for i in range(len(X))], name="scan"))
    out = ComBat().fit_transform(df, pd.Series(site), cov)
    assert isinstance(out, pd.DataFrame)
    assert out.index.equals(df.index) and out.columns.equals(df.columns)
    small = ComBat(chunk_features=7).fit_transform(X, site, cov)
    np.testing.assert_allclose(out.to_numpy(), small, atol=1e-12)
    with pytest.raises(HarmonizeError, match="unknown batch"):
        ComBat().fit(X, site).transform(X, np.where(site == "s1", "s9", site))
    with pytest.raises(HarmonizeError, match="not seen at fit"):
        ComBat().fit(X, site, cov).transform(X, site, cov.assign(sex="X"))


def test_copy_false_writes_in_place():
    X, site, _ = make_data(seed=12)
    expect = ComBat().fit_transform(X, site)
    Y = X.copy()
    out = ComBat(copy=False).fit_transform(Y, site)
    assert out is Y
    np.testing.assert_allclose(Y, expect, atol=1e-12)


def test_dask_two_pass_matches_numpy():
    da = pytest.importorskip("dask.array")
    X, site, cov = make_data(seed=13, p=50)
    X[4, 3] = np.nan
    dx = da.from_array(X, chunks=(X.shape[0] // 2, 16))
    model = ComBat()
    out = model.fit(dx, site, cov).transform(dx, site, cov)
    assert isinstance(out, da.Array)
    res = out.compute(scheduler="synchronous")
    np.testing.assert_allclose(res, ComBat().fit_transform(X, site, cov), atol=1e-12,
                               equal_nan=True)


@pytest.mark.parametrize("ref", [None, "s3"])
def test_sufficient_statistics_match_direct_residuals_at_large_offset(ref):
    """The complete-data path (per-batch sums, shifted by the first row) against the
    masked path (explicit residuals), on features with mean 1e6 and unit noise."""
    X, site, cov = make_data(seed=14, p=12)
    X = X + 1e6
    Xn = np.column_stack([X, X[:, 0]])
    Xn[5, -1] = np.nan  # forces the masked (explicit residual) path for the whole chunk
    fast = ComBat(eb=False, ref_batch=ref).fit(X, site, cov)
    slow = ComBat(eb=False, ref_batch=ref, chunk_features=13).fit(Xn, site, cov)
    for name in ("grand_mean_", "var_pooled_", "gamma_star_", "delta_star_"):
        a, b = getattr(fast, name), getattr(slow, name)[..., :12]
        # relative 1e-9: cancellation-free to ~1e-16 * (offset / sd) would be 1e-10
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9 * np.abs(b).max())
    np.testing.assert_allclose(fast.transform(X, site, cov),
                               slow.transform(Xn, site, cov)[:, :12], rtol=1e-12)
