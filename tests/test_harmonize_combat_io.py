"""ComBat model files (exact round trip, version refusal) and the harmonize CLI."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pandas as pd
import pytest

from mrharmony.cli import main
from mrharmony.errors import HarmonizeError, ModelFileError
from mrharmony.harmonize import (
    ComBat,
    ComBatGAM,
    CovBat,
    LongitudinalComBat,
    TravelingComBat,
    load_model,
)

neuroCombat_mod = pytest.importorskip("neuroCombat")


def table(seed: int = 0, n: int = 60, p: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    site = rng.choice(["GE", "Philips", "Siemens"], n)
    code = np.unique(site, return_inverse=True)[1]
    age = rng.integers(20, 80, n).astype(float)
    sex = rng.choice(["F", "M"], n)
    X = 3 + 0.02 * age[:, None] + rng.normal(size=(n, p)) + np.array([0, 0.8, -0.5])[code, None]
    df = pd.DataFrame(X, columns=[f"roi_{i}" for i in range(p)])
    df.insert(0, "subject", [f"sub-{i:03d}" for i in range(n)])
    df.insert(1, "site", site)
    df.insert(2, "age", age)
    df.insert(3, "sex", sex)
    return df


def test_anchor_estimates_need_pickle(tmp_path):
    import contextlib
    import io

    nc = __import__("neuroCombat.neuroCombat", fromlist=["neuroCombat"])
    public = [n for n in dir(nc) if not n.startswith("_")]
    assert not any(n.lower().startswith(("save", "load", "write", "read")) for n in public)
    df = table()
    feats = [c for c in df if c.startswith("roi_")]
    with contextlib.redirect_stdout(io.StringIO()):
        est = nc.neuroCombat(df[feats].to_numpy().T, df[["site"]], "site")["estimates"]
    with open(tmp_path / "est.npz", "wb") as fh:
        np.savez(fh, **{k: np.asarray(v) for k, v in est.items() if v is not None})
    with np.load(tmp_path / "est.npz", allow_pickle=False) as npz, \
            pytest.raises(ValueError, match="pickle"):
        npz["batches"]  # the anchor's batch levels are an object array: pickle only


@pytest.mark.parametrize("make", [
    lambda: ComBat(),
    lambda: ComBat(parametric=False, ref_batch="GE"),
    lambda: ComBatGAM(smooth=("age",)),
    lambda: CovBat(n_pc=3),
], ids=["combat", "nonparam-ref", "gam", "covbat"])
def test_round_trip_is_exact(tmp_path, make):
    df = table()
    feats = [c for c in df if c.startswith("roi_")]
    model = make().fit(df[feats], df["site"], df[["age", "sex"]])
    path = model.save(tmp_path / "m.model")
    again = type(model).load(path)
    a = model.transform(df[feats], df["site"], df[["age", "sex"]])
    b = again.transform(df[feats], df["site"], df[["age", "sex"]])
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert again.batches_ == model.batches_
    with pytest.raises(FileExistsError):
        model.save(path)
    with zipfile.ZipFile(path) as zf:  # numeric .npy members only, no pickle
        assert all(n.endswith(".npy") for n in zf.namelist())


def test_longitudinal_and_traveling_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    subj = np.repeat(np.arange(20), 3)
    site = np.tile(["a", "b", "c"], 20)
    X = rng.normal(size=(60, 4)) + rng.normal(0, 2, (20, 4))[subj]
    lm = LongitudinalComBat().fit(X, site, subject=subj)
    tm = TravelingComBat().fit(X, site, subject=subj)
    lm2 = load_model(lm.save(tmp_path / "l.model"))
    tm2 = load_model(tm.save(tmp_path / "t.model"))
    np.testing.assert_array_equal(lm.transform(X, site, subject=subj),
                                  lm2.transform(X, site, subject=subj))
    np.testing.assert_array_equal(tm.transform(X, site), tm2.transform(X, site))


def _rewrite_meta(src, dst, change):
    with np.load(src, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays["__metadata__"].tobytes())
    change(meta)
    arrays["__metadata__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(dst, "wb") as fh:
        np.savez(fh, **arrays)


def test_incompatible_or_corrupt_files_are_refused(tmp_path):
    df = table()
    feats = [c for c in df if c.startswith("roi_")]
    path = ComBat().fit(df[feats], df["site"]).save(tmp_path / "m.model")
    _rewrite_meta(path, tmp_path / "v9.model", lambda m: m.update(format_version=9))
    with pytest.raises(ModelFileError, match="format_version 9 is not supported"):
        load_model(tmp_path / "v9.model")
    _rewrite_meta(path, tmp_path / "kind.model", lambda m: m.update(model="Evil"))
    with pytest.raises(ModelFileError, match="unknown model kind"):
        load_model(tmp_path / "kind.model")
    with open(tmp_path / "obj.model", "wb") as fh:  # a pickled object array
        np.savez(fh, __metadata__=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "obj.model")
    (tmp_path / "junk.model").write_bytes(b"not a zip")
    with pytest.raises(ModelFileError, match="unreadable"):
        load_model(tmp_path / "junk.model")
    with pytest.raises(HarmonizeError, match="not a CovBat"):
        CovBat.load(path)


def test_cli_combat_then_apply(tmp_path):
    df = table(p=5)
    src = tmp_path / "features.csv"
    df.to_csv(src, index=False)
    out, model = tmp_path / "harmonized.csv", tmp_path / "site.model"
    args = ["harmonize", "combat", str(src), "--batch", "site", "--covariates", "age,sex",
            "-o", str(out), "--model", str(model)]
    assert main(args) == 0
    res = pd.read_csv(out)
    feats = [c for c in df if c.startswith("roi_")]
    expect = ComBat().fit_transform(df[feats], df["site"], df[["age", "sex"]])
    np.testing.assert_allclose(res[feats].to_numpy(), expect.to_numpy(), atol=1e-12)
    assert res["subject"].tolist() == df["subject"].tolist()  # id column passed through
    assert main(args) == 2  # refuses to overwrite without --force
    new = tmp_path / "new.csv"
    df.iloc[::4].to_csv(new, index=False)
    applied = tmp_path / "applied.csv"
    assert main(["harmonize", "apply", str(model), str(new), "-o", str(applied)]) == 0
    np.testing.assert_allclose(pd.read_csv(applied)[feats].to_numpy(),
                               expect.to_numpy()[::4], atol=1e-12)
    bad = ["harmonize", "combat", str(src), "--batch", "site", "--covariates", "iq",
           "-o", str(tmp_path / "x.csv")]
    assert main(bad) == 2
    ref = ["harmonize", "combat", str(src), "--batch", "site", "--ref-batch", "GE",
           "--method", "gam", "--covariates", "age", "-o", str(tmp_path / "g.csv")]
    assert main(ref) == 0
    got = pd.read_csv(tmp_path / "g.csv")
    ge = df["site"] == "GE"
    np.testing.assert_allclose(got.loc[ge, feats].to_numpy(), df.loc[ge, feats].to_numpy(),
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("method", ["covbat", "longitudinal"])
def test_cli_variants_round_trip(tmp_path, method):
    df = table(seed=2, n=60, p=4)
    df["subject"] = [f"sub-{i // 3:02d}" for i in range(len(df))]  # 3 scans per subject
    src = tmp_path / "f.csv"
    df.to_csv(src, index=False)
    out, model = tmp_path / "h.csv", tmp_path / "m.model"
    assert main(["harmonize", "combat", str(src), "--batch", "site", "--covariates", "age",
                 "--method", method, "-o", str(out), "--model", str(model)]) == 0
    again = tmp_path / "a.csv"
    assert main(["harmonize", "apply", str(model), str(src), "-o", str(again)]) == 0
    feats = [c for c in df if c.startswith("roi_")]
    np.testing.assert_allclose(pd.read_csv(again)[feats], pd.read_csv(out)[feats],
                               atol=1e-12)
