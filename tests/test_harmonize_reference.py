"""Reference modes of CovBat and longitudinal ComBat against the authors' algorithms.

* LongitudinalComBat(mode="reference") against longcombat-py (the Python port of R
  longCombat, Beer et al. 2020; skipped if not installed) and against an independent
  REML computation (profiled restricted likelihood of a random-intercept model).
* CovBat(mode="reference") step by step against an independent computation of the
  published algorithm (Chen et al. 2022; R ``CovBat::covbat`` with ``std.var=TRUE``):
  ComBat residuals, ``prcomp(scale.=TRUE)`` semantics (centre, divide by ``sd()``,
  ``n - 1``), the ``cumsum > percent.var`` count, L/S ComBat without EB on the scores,
  back-projection; and end to end against the same algorithm assembled from peer
  packages (neuroCombat for both ComBat stages, scikit-learn for the scaled PCA). The
  authors' own CovBat code is not installable (not on PyPI or CRAN).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize_scalar

from mrharmony.cli import main
from mrharmony.errors import HarmonizeError
from mrharmony.harmonize import (
    ComBat,
    CovBat,
    HarmonizeWarning,
    LongitudinalComBat,
    load_model,
)
from mrharmony.harmonize.combat_variants import n_components
from mrharmony.harmonize.model_io import read_metadata

# --------------------------------------------------------------------------- longitudinal


def long_table(seed: int, n_batch: int, m: int = 30, p: int = 5) -> pd.DataFrame:
    """Unbalanced longitudinal data: 1-4 visits per subject, subjects nested in sites,
    age/time/sex effects, a subject random intercept, site shifts and site scales."""
    rng = np.random.default_rng(seed)
    visits = rng.integers(1, 5, m)
    subj = np.repeat(np.arange(m), visits)
    levels = np.array([f"s{i}" for i in range(n_batch)])
    site_of = levels[np.r_[np.arange(n_batch), rng.integers(0, n_batch, m - n_batch)]]
    site = np.repeat(site_of, visits)
    code = np.unique(site, return_inverse=True)[1]
    t = np.concatenate([np.arange(v) for v in visits]).astype(float)
    age = np.repeat(rng.uniform(20, 80, m), visits) + t
    sex = np.repeat(rng.choice(["F", "M"], m), visits)
    eta = rng.normal(0, 2.0, (m, p))[subj]
    noise = rng.normal(0, 0.7, (subj.size, p)) * (1 + 0.4 * code[:, None])
    X = (10 + 0.3 * t[:, None] + 0.05 * age[:, None] + 0.8 * (sex == "M")[:, None] + eta
         + noise + rng.normal(0, 1.5, (n_batch, p))[code])
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(p)])
    df["subj"], df["site"], df["time"], df["age"], df["sex"] = subj, site, t, age, sex
    return df


CONFIGS = [(0, 2, ["age", "time", "sex"]), (1, 3, ["age", "time", "sex"]),
           (2, 4, ["time"]), (3, 3, [])]


@pytest.mark.parametrize(("seed", "n_batch", "covs"), CONFIGS,
                         ids=[f"{b}batches-{'+'.join(c) or 'nocov'}" for _, b, c in CONFIGS])
def test_longitudinal_reference_matches_longcombat_py(seed, n_batch, covs):
    lc = pytest.importorskip("longcombat")
    df = long_table(seed, n_batch)
    feats = [c for c in df if c.startswith("f")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = lc.long_combat(df, "site", "subj", "time", feats, " + ".join(covs) or "1",
                             "(1|subj)", niter=30, method="REML", verbose=False)
    cov = df[covs] if covs else None
    # polish=False: the same statsmodels L-BFGS optimum longcombat-py uses
    model = LongitudinalComBat(polish=False)
    out = model.fit_transform(df[feats], df["site"], cov, subject=df["subj"])
    expect = ref.data_combat[[f"{f}.combat" for f in feats]].to_numpy()
    # measured: <= 3e-14 (the harmonization itself moves values by 1.5-4)
    np.testing.assert_allclose(out.to_numpy(), expect, rtol=0, atol=1e-6)
    assert np.abs(expect - df[feats].to_numpy()).max() > 1.0
    np.testing.assert_allclose(model.gamma_hat_, ref.gammahat.to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.delta_hat_, ref.delta2hat.to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(model.gamma_star_, ref.gammastarhat.to_numpy(), rtol=0,
                               atol=1e-6)
    np.testing.assert_allclose(model.delta_star_, ref.delta2starhat.to_numpy(), rtol=0,
                               atol=1e-6)
    # polished REML optimum: differs only by longcombat-py's L-BFGS stopping error
    # (measured 3e-5 .. 5e-5); the moment estimator differs by far more (0.5 .. 0.65)
    tight = LongitudinalComBat().fit_transform(df[feats], df["site"], cov, subject=df["subj"])
    assert np.abs(tight.to_numpy() - expect).max() < 5e-4
    moments = LongitudinalComBat(mode="moments").fit_transform(df[feats], df["site"], cov,
                                                               subject=df["subj"])
    assert np.abs(moments.to_numpy() - expect).max() > 0.1


def _reml_profile(log_lam: float, y: np.ndarray, D: np.ndarray, subj: np.ndarray
                  ) -> tuple[float, float]:
    """-REML log-likelihood profiled over sigma^2, and sigma^2, for y ~ D + (1|subj).

    V = sigma^2 (I + lam Z Z^T); per subject (I + lam 11^T)^-1 = I - lam / (1 + n lam) 11^T.
    """
    lam = np.exp(log_lam)
    n_i = np.bincount(subj).astype(float)
    w = lam / (1 + n_i * lam)

    def hinv(A: np.ndarray) -> np.ndarray:
        sums = np.zeros((n_i.size, A.shape[1]))
        np.add.at(sums, subj, A)
        return A - (w[:, None] * sums)[subj]

    HX = hinv(D)
    G = D.T @ HX
    beta = np.linalg.solve(G, HX.T @ y)
    r = y - D @ beta
    n, k = D.shape
    s2 = float(r @ hinv(r[:, None])[:, 0]) / (n - k)
    nll = 0.5 * ((n - k) * np.log(s2) + np.log1p(n_i * lam).sum() + np.linalg.slogdet(G)[1])
    return nll, s2


def test_longitudinal_reference_is_the_reml_optimum():
    df = long_table(7, 3, m=40, p=4)
    feats = [c for c in df if c.startswith("f")]
    model = LongitudinalComBat().fit(df[feats], df["site"], df[["age", "time"]],
                                     subject=df["subj"])
    subj = df["subj"].to_numpy()
    Z = pd.get_dummies(df["site"]).to_numpy(float)
    D = np.hstack([Z, df[["age", "time"]].to_numpy()])
    for j, f in enumerate(feats):
        y = df[f].to_numpy()
        best = minimize_scalar(lambda t, y=y: _reml_profile(t, y, D, subj)[0],
                               bounds=(-12.0, 8.0), method="bounded",
                               options={"xatol": 1e-10})
        lam, s2 = np.exp(best.x), _reml_profile(best.x, y, D, subj)[1]
        # BFGS-polished statsmodels optimum vs the 1-D profile optimum (measured < 1e-7)
        assert model.lambda_[j] == pytest.approx(lam, rel=1e-5)
        assert model.var_pooled_[j] == pytest.approx(s2, rel=1e-5)
    # truth: sigma_u^2 / sigma_e^2 = 4 / 0.49 .. 4 / 1.96 (site-dependent noise)
    assert np.all((model.lambda_ > 1.0) & (model.lambda_ < 15.0))


def test_longitudinal_eb_is_longcombats_fixed_count_iteration():
    df = long_table(4, 3, m=40, p=8)
    feats = [c for c in df if c.startswith("f")]
    m = LongitudinalComBat().fit(df[feats], df["site"], subject=df["subj"])
    # independent: the niter Jacobi updates of longCombat from the model's gamma/delta hats
    g_hat, d_hat, n = m.gamma_hat_, m.delta_hat_, m.batch_counts_[:, None]
    codes = np.unique(df["site"], return_inverse=True)[1]
    g_bar, t2 = g_hat.mean(1, keepdims=True), g_hat.var(1, ddof=1, keepdims=True)
    d_bar, s2 = d_hat.mean(1, keepdims=True), d_hat.var(1, ddof=1, keepdims=True)
    lam, theta = (d_bar**2 + 2 * s2) / s2, (d_bar**3 + d_bar * s2) / s2
    # sum over scans of (s - g)^2 = (n - 1) d_hat + n (g_hat - g)^2 within each batch
    g = (n * t2 * g_hat + d_hat * g_bar) / (n * t2 + d_hat)
    d = (theta + 0.5 * ((n - 1) * d_hat + n * (g_hat - g) ** 2)) / (n / 2 + lam - 1)
    for _ in range(30):
        g, d = ((n * t2 * g_hat + d * g_bar) / (n * t2 + d),
                (theta + 0.5 * ((n - 1) * d_hat + n * (g_hat - g) ** 2)) / (n / 2 + lam - 1))
    np.testing.assert_allclose(m.gamma_star_, g, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(m.delta_star_, d, rtol=1e-12)
    assert np.bincount(codes).tolist() == m.batch_counts_.tolist()


def test_longitudinal_modes_options_and_files(tmp_path):
    df = long_table(5, 3, m=24, p=3)
    feats = [c for c in df if c.startswith("f")]
    with pytest.raises(HarmonizeError, match="no reference batch"):
        LongitudinalComBat(ref_batch="s0")
    with pytest.raises(HarmonizeError, match="mode 'reml' is not one of"):
        LongitudinalComBat(mode="reml")
    mom = LongitudinalComBat(mode="moments", ref_batch="s0").fit(df[feats], df["site"],
                                                                  subject=df["subj"])
    out = mom.transform(df[feats], df["site"], subject=df["subj"])
    s0 = (df["site"] == "s0").to_numpy()
    np.testing.assert_array_equal(out.to_numpy()[s0], df.loc[s0, feats].to_numpy())
    path = mom.save(tmp_path / "m.model")
    assert read_metadata(path)["state"]["options"]["mode"] == "moments"
    # a file written before modes existed is read as the moment estimator it was fitted by
    legacy = _drop_option(path, tmp_path / "legacy.model", "mode")
    assert load_model(legacy).mode == "moments"
    ref = LongitudinalComBat().fit(df[feats], df["site"], subject=df["subj"])
    again = load_model(ref.save(tmp_path / "r.model"))
    assert (again.mode, again.niter, again.polish) == ("reference", 30, True)
    np.testing.assert_array_equal(again.transform(df[feats], df["site"], subject=df["subj"]),
                                  ref.transform(df[feats], df["site"], subject=df["subj"]))


def test_longitudinal_reference_constant_feature_passes_through():
    df = long_table(8, 2, m=20, p=3)
    df["f1"] = 7.0
    feats = [c for c in df if c.startswith("f")]
    with pytest.warns(HarmonizeWarning, match="constant"):
        model = LongitudinalComBat().fit(df[feats], df["site"], subject=df["subj"])
    out = model.transform(df[feats], df["site"], subject=df["subj"])
    np.testing.assert_array_equal(out["f1"], df["f1"])
    assert np.isfinite(out.to_numpy()).all() and model.degenerate_.tolist() == [0, 1, 0]


def test_longitudinal_reference_reports_failed_fits_by_feature(monkeypatch):
    import mrharmony.harmonize.combat_variants as cv

    df = long_table(9, 2, m=20, p=5)
    feats = [c for c in df if c.startswith("f")]
    bad, real = df["f3"].to_numpy(), cv._reml_fit

    def flaky(y, D, subj, polish):  # every optimizer "fails" on f3 (third chunk of two)
        return (None, False) if np.array_equal(y, bad) else real(y, D, subj, polish)

    monkeypatch.setattr(cv, "_reml_fit", flaky)
    with pytest.warns(HarmonizeWarning, match=r"1 REML fit.*'f3: failed'"):
        model = LongitudinalComBat(chunk_features=2).fit(df[feats], df["site"],
                                                         subject=df["subj"])
    assert model.lambda_[3] == 0.0 and model.lambda_[[0, 1, 2, 4]].min() > 0.5
    D = pd.get_dummies(df["site"]).to_numpy(float)
    ols = np.linalg.lstsq(D, bad, rcond=None)[0]
    assert model.var_pooled_[3] == pytest.approx(((bad - D @ ols) ** 2).sum() / (len(df) - 2))


def _drop_option(src, dst, key, drop_arrays=(), change=None):
    with np.load(src, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["__metadata__"].tobytes())
    del meta["state"]["options"][key]
    for name in drop_arrays:
        del arrays[name], meta["arrays"][name]
    if change:
        change(arrays)
    arrays["__metadata__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(dst, "wb") as fh:
        np.savez(fh, **arrays)
    return dst


# --------------------------------------------------------------------------- CovBat


def covbat_data(seed: int = 5, n: int = 150, p: int = 10):
    rng = np.random.default_rng(seed)
    site = rng.choice(["a", "b", "c"], n)
    code = np.unique(site, return_inverse=True)[1]
    age = rng.uniform(20, 80, n)
    X = rng.normal(size=(n, p)) @ (0.5 * rng.normal(size=(p, p)))
    X += 0.03 * age[:, None] * rng.uniform(0.5, 2, p)
    u = rng.normal(size=p)
    X += (code == 1)[:, None] * rng.normal(0, 2, (n, 1)) * (u / np.linalg.norm(u))
    X *= rng.uniform(0.5, 5, p)  # features on different scales
    X += rng.normal(0, 1, (3, p))[code]
    return X, site, pd.DataFrame({"age": age})


def _ls_combat_no_eb(S: np.ndarray, site: np.ndarray) -> np.ndarray:
    """sva L/S ComBat without EB or covariates: pooled variance over all scans (divisor
    n), batch variance with n_b - 1, mapped onto the size-weighted mean."""
    out = np.empty_like(S)
    codes = np.unique(site, return_inverse=True)[1]
    means = np.array([S[codes == b].mean(0) for b in range(codes.max() + 1)])
    grand = S.mean(0)
    pooled = ((S - means[codes]) ** 2).mean(0)
    for b in range(codes.max() + 1):
        rows = codes == b
        out[rows] = (S[rows] - means[b]) / S[rows].std(0, ddof=1) * np.sqrt(pooled) + grand
    return out


@pytest.mark.parametrize("pct_var", [0.5, 0.8, 0.95])
def test_covbat_reference_pins_every_step(pct_var):
    X, site, cov = covbat_data()
    model = CovBat(pct_var=pct_var).fit(X, site, cov)
    out = model.transform(X, site, cov)
    # 1. ComBat (validated against neuroCombat elsewhere) and its residuals
    cb = ComBat().fit(X, site, cov)
    first = cb.transform(X, site, cov)
    mean = cb.grand_mean_ + cov.to_numpy() @ cb.beta_
    res = first - mean
    # 2. prcomp(res, center=TRUE, scale.=TRUE): correlation-matrix eigenvectors
    center, sd = res.mean(0), res.std(0, ddof=1)
    U = (res - center) / sd
    evals, evecs = np.linalg.eigh(np.corrcoef(res, rowvar=False))
    order = np.argsort(evals)[::-1]
    evals, evecs = evals[order], evecs[:, order]
    np.testing.assert_allclose(model.pc_center_, center, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.pc_scale_, sd, rtol=1e-12)
    # 3. k = first count whose cumulative proportion exceeds pct_var (R: which(...)[1])
    cum = np.cumsum(evals) / evals.sum()
    k = next(i + 1 for i, c in enumerate(cum) if c > pct_var)
    assert model.n_components_ == k
    assert min(abs(cum - pct_var)) > 1e-6  # not at a boundary: k is unambiguous
    # components match up to sign
    np.testing.assert_allclose(np.abs(model.components_.T @ evecs[:, :k]), np.eye(k),
                               atol=1e-8)
    # 4. L/S ComBat without EB on the first k scores; 5. back-projection, unscale, mean
    scores = U @ evecs
    scores[:, :k] = _ls_combat_no_eb(scores[:, :k], site)
    expect = (scores @ evecs.T) * sd + center + mean
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-9 * np.abs(X).max())
    # the pooled variant is a different estimator on these data (same k here)
    pooled = CovBat(pct_var=pct_var, mode="pooled").fit_transform(X, site, cov)
    assert np.abs(pooled - expect).max() > 1e-2


@pytest.mark.parametrize(("pct_var", "eb"), [(0.6, True), (0.9, True), (0.9, False)])
def test_covbat_reference_equals_the_algorithm_built_from_peer_packages(pct_var, eb):
    """CovBat's published algorithm assembled from peer packages, side by side:
    neuroCombat (the ComBat of Fortin et al., equal to sva/CovBat's ``combat``) for the
    mean/variance step and, without EB, for the scores; scikit-learn's StandardScaler +
    PCA for ``prcomp(center=TRUE, scale.=TRUE)`` (a common SD divisor cancels in the
    directions, the explained-variance ratios and the back-projection).

    Tolerance: 1e-6 of the data's magnitude (the issue's bound). What is left is the
    peer's: neuroCombat solves the covariate regression by inverting the normal equations
    (as R's ``solve(crossprod(design))``), 5e-8 (relative) from a least-squares solve
    with an age column in years; the EB iteration stops at a relative change of 1e-4;
    the score step amplifies both to ~4e-7."""
    import contextlib
    import io

    neuro = pytest.importorskip("neuroCombat")
    decomposition = pytest.importorskip("sklearn.decomposition")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    X, site, cov = covbat_data(seed=11, n=120, p=8)
    covars = pd.DataFrame({"site": site, "age": cov["age"].to_numpy()})
    with contextlib.redirect_stdout(io.StringIO()):
        first = neuro.neuroCombat(X.T.copy(), covars, "site", continuous_cols=["age"], eb=eb)
    est = first["estimates"]
    mean = (est["stand.mean"] + est["mod.mean"]).T
    res = first["data"].T - mean
    scaler = preprocessing.StandardScaler().fit(res)
    pca = decomposition.PCA(svd_solver="full").fit(scaler.transform(res))
    cum = np.cumsum(pca.explained_variance_ratio_)
    k = int(np.flatnonzero(cum > pct_var)[0]) + 1  # R: which(cumsum(...) > percent.var)[1]
    scores = pca.transform(scaler.transform(res))
    with contextlib.redirect_stdout(io.StringIO()):
        harmonized = neuro.neuroCombat(scores[:, :k].T.copy(), pd.DataFrame({"site": site}),
                                       "site", eb=False)["data"].T
    scores[:, :k] = harmonized
    expect = scaler.inverse_transform(pca.inverse_transform(scores)) + mean
    model = CovBat(pct_var=pct_var, eb=eb).fit(X, site, cov)
    assert model.n_components_ == k
    out = model.transform(X, site, cov)
    scale = np.abs(X).max()
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-6 * scale)
    # and it is not the ComBat output itself: the score step changed the data
    assert np.abs(out - first["data"].T).max() > 1e-3 * scale


def test_covbat_copies_of_one_site():
    """Sites that are exact copies (per-feature affine) have no covariance difference:
    after ComBat without EB their residuals coincide, the score ComBat changes nothing
    but its variance convention (pooled divisor n, batch divisor n_b - 1), so CovBat's
    residuals are ComBat's times sqrt((n_b - 1) / n_b) along the harmonized components
    and unchanged along the others."""
    rng = np.random.default_rng(11)
    n_b, p = 40, 6
    A = rng.normal(size=(n_b, p)) @ rng.normal(size=(p, p))
    X = np.vstack([A, 3.0 + A * rng.uniform(0.5, 2.0, p)])
    site = np.repeat(["a", "b"], n_b)
    c = np.sqrt((n_b - 1) / n_b)
    cb = ComBat(eb=False).fit(X, site)
    res = cb.transform(X, site) - cb.grand_mean_
    np.testing.assert_allclose(res[:n_b], res[n_b:], atol=1e-12)
    for mode in ("reference", "pooled"):
        full = CovBat(eb=False, mode=mode, pct_var=1.0).fit(X, site)
        assert full.n_components_ == p
        np.testing.assert_allclose(full.transform(X, site) - cb.grand_mean_, c * res,
                                   atol=1e-10)
        part = CovBat(eb=False, mode=mode, n_pc=2).fit(X, site)
        U = res / part.pc_scale_
        V = part.components_
        expect = (U + (c - 1) * (U @ V) @ V.T) * part.pc_scale_
        np.testing.assert_allclose(part.transform(X, site) - cb.grand_mean_, expect,
                                   atol=1e-10)


def test_pc_count_rule_at_exact_boundaries():
    ev = np.array([2.0, 1.0, 1.0])  # cumulative 0.5, 0.75, 1.0: exact in binary
    assert [n_components(ev, q) for q in (0.25, 0.5, 0.75, 0.9, 1.0)] == [1, 2, 3, 3, 3]
    assert [n_components(ev, q, strict=False) for q in (0.25, 0.5, 0.75, 1.0)] == [1, 1, 2, 3]
    assert n_components(np.array([1.0, 0.0]), 0.999) == 1  # rank-deficient tail


def test_covbat_modes_options_and_files(tmp_path):
    X, site, cov = covbat_data(p=6)
    with pytest.raises(HarmonizeError, match="mode 'std' is not one of"):
        CovBat(mode="std")
    pooled = CovBat(mode="pooled").fit(X, site, cov)
    path = pooled.save(tmp_path / "p.model")
    assert read_metadata(path)["state"]["options"]["mode"] == "pooled"
    # a file written before modes (no mode, centre in pooled-SD units, no pc_scale)
    legacy = _drop_option(path, tmp_path / "legacy.model", "mode", drop_arrays=["pc_scale"],
                          change=lambda a: a.update(pc_center=a["pc_center"]
                                                    / np.sqrt(a["var_pooled"])))
    old = load_model(legacy)
    assert old.mode == "pooled"
    np.testing.assert_allclose(old.transform(X, site, cov), pooled.transform(X, site, cov),
                               rtol=0, atol=1e-12)
    ref = load_model(CovBat().fit(X, site, cov).save(tmp_path / "r.model"))
    assert ref.mode == "reference"


def test_cli_mode_option(tmp_path):
    df = long_table(6, 3, m=24, p=3)
    src = tmp_path / "f.csv"
    df.drop(columns=["sex"]).to_csv(src, index=False)
    base = ["harmonize", "combat", str(src), "--batch", "site", "--subject", "subj",
            "--covariates", "age,time"]
    feats = [c for c in df if c.startswith("f")]
    for method, mode, expect_mode in [("covbat", None, "reference"),
                                      ("covbat", "pooled", "pooled"),
                                      ("longitudinal", None, "reference"),
                                      ("longitudinal", "moments", "moments")]:
        out, model = tmp_path / f"{method}{mode}.csv", tmp_path / f"{method}{mode}.model"
        args = [*base, "--method", method, "-o", str(out), "--model", str(model)]
        assert main(args + (["--mode", mode] if mode else [])) == 0
        assert read_metadata(model)["state"]["options"]["mode"] == expect_mode
        kw = {"subject": df["subj"].astype(str)} if method == "longitudinal" else {}
        cls = CovBat if method == "covbat" else LongitudinalComBat
        direct = cls(mode=expect_mode).fit_transform(df[feats], df["site"],
                                                     df[["age", "time"]], **kw)
        np.testing.assert_allclose(pd.read_csv(out)[feats], direct, rtol=0, atol=1e-8)
    for method, mode in [("covbat", "moments"), ("longitudinal", "pooled"),
                         ("combat", "reference")]:
        bad = tmp_path / f"bad-{method}.csv"
        assert main([*base, "--method", method, "--mode", mode, "-o", str(bad)]) == 2
        assert not bad.exists()
