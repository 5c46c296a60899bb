"""The one-call evaluation of a harmonized wide table against the unharmonized one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from mrharmony.errors import HarmonizeError

from ._inputs import HarmonizerFactory
from .agreement import _cube, bland_altman_sites, cov_across_sites, icc
from .associations import preservation_of_associations
from .discriminability import site_discriminability
from .site_tests import ks_tests, site_effect_tests

__all__ = ["evaluate_tables", "feature_columns"]


def feature_columns(table: pd.DataFrame, exclude: Sequence[str]) -> list[str]:
    """Numeric columns of a wide table that are not ids or covariates."""
    return [c for c in table.columns
            if c not in set(exclude) and pd.api.types.is_numeric_dtype(table[c])]


def _traveling(table: pd.DataFrame, subject: str, batch: str, feats: list[str]) -> bool:
    """True when >= 2 subjects were scanned once at every site (ICC design)."""
    if subject not in table.columns:
        return False
    try:
        _cube(table[feats[:1]], table[subject].to_numpy(), table[batch].to_numpy())
    except HarmonizeError:
        return False
    return True


def evaluate_tables(
    before: pd.DataFrame,
    after: pd.DataFrame,
    *,
    batch: str = "site",
    covariates: Sequence[str] = (),
    subject: str = "subject",
    truth: pd.DataFrame | None = None,
    harmonizer: HarmonizerFactory | Any | None = None,
    classifier: Literal["logistic", "random_forest"] = "logistic",
    n_splits: int = 5,
    n_permutations: int = 100,
    seed: int = 0,
) -> dict[str, pd.DataFrame]:
    """Evaluate a harmonized wide table against the unharmonized one.

    Parameters
    ----------
    before, after
        Wide tables with the same rows (scans) in the same order: id columns
        (``subject``, ``batch``), covariates and feature columns.
    batch, subject, covariates
        Column names. Numeric covariates are tested for preservation of association.
    truth
        True effects (simulation): index = feature, one column per covariate, in feature
        units per covariate unit.
    harmonizer
        Harmonizer factory (e.g. ``ComBat``). When given, the discriminability row
        ``"before + harmonizer in CV"`` refits it inside every fold on ``before``: the
        unbiased figure. The ``"after table"`` row classifies the harmonized table as
        given; if that table was harmonized on all scans at once it is optimistic
        (the harmonizer saw the test folds), and it is labelled so.

    Returns
    -------
    dict of DataFrames: ``discriminability``, ``site_tests``, ``ks``, ``cov``, ``summary``
    and, when applicable, ``icc`` and ``bland_altman`` (when >= 2 subjects were scanned
    once at every site; the CoV is then the within-subject CoV),
    ``associations`` (numeric covariates) and ``spurious`` (permutation test after).
    """
    for nm, tab in (("before", before), ("after", after)):
        missing = sorted({batch, *covariates} - set(tab.columns))
        if missing:
            raise HarmonizeError(f"{nm}: missing columns {missing}")
    if len(before) != len(after):
        raise HarmonizeError(f"after: {len(after)} rows, before: {len(before)}; the tables "
                             "must hold the same scans in the same order")
    ids = [c for c in (subject, batch) if c in before.columns and c in after.columns]
    if not all(np.array_equal(before[c].astype(str), after[c].astype(str)) for c in ids):
        raise HarmonizeError(f"after: columns {ids} differ from before; same scans, same order")
    exclude = [batch, subject, *covariates]
    feats = feature_columns(before, exclude)
    missing = sorted(set(feats) - set(after.columns))
    if not feats or missing:
        raise HarmonizeError(f"after: feature columns missing: {missing[:5]}" if missing
                             else "before: no numeric feature column")
    xb, xa = before[feats], after[feats]
    site = before[batch].astype(str).to_numpy()
    cov = before[list(covariates)] if covariates else None
    tables: dict[str, pd.DataFrame] = {}

    after_key = "after table (harmonized before the split: optimistic if fitted on all scans)"
    opts = {"classifier": classifier, "n_splits": n_splits, "n_permutations": n_permutations,
            "seed": seed}
    rows = {"before": site_discriminability(xb, site, **opts),
            after_key: site_discriminability(xa, site, **opts)}
    if harmonizer is not None:
        rows["before + harmonizer in CV"] = site_discriminability(
            xb, site, covariates=cov, harmonizer=harmonizer, **opts)
    tables["discriminability"] = pd.DataFrame({k: v.as_dict() for k, v in rows.items()}).T

    tb, ta = site_effect_tests(xb, site), site_effect_tests(xa, site)
    tables["site_tests"] = pd.concat({"before": tb, "after": ta}, axis=1)
    kb, ka = ks_tests(xb, site), ks_tests(xa, site)
    tables["ks"] = kb.rename(columns={"statistic": "ks_before", "p_value": "p_before"}).assign(
        ks_after=ka["statistic"].to_numpy(), p_after=ka["p_value"].to_numpy())
    trav = _traveling(before, subject, batch, feats)
    subj = before[subject].to_numpy() if trav else None
    tables["cov"] = pd.DataFrame({"cov_pct_before": cov_across_sites(xb, site, subject=subj),
                                  "cov_pct_after": cov_across_sites(xa, site, subject=subj)})
    summary = {
        "site accuracy before": rows["before"].accuracy,
        "site accuracy after (table)": rows[after_key].accuracy,
        "chance accuracy": rows["before"].chance_accuracy,
        "features with ANOVA p<0.05 before (%)": 100 * float((tb["anova_p"] < 0.05).mean()),
        "features with ANOVA p<0.05 after (%)": 100 * float((ta["anova_p"] < 0.05).mean()),
        "features with Levene p<0.05 before (%)": 100 * float((tb["levene_p"] < 0.05).mean()),
        "features with Levene p<0.05 after (%)": 100 * float((ta["levene_p"] < 0.05).mean()),
        "mean KS statistic before": float(kb["statistic"].mean()),
        "mean KS statistic after": float(ka["statistic"].mean()),
        "median CoV before (%)": float(tables["cov"]["cov_pct_before"].median()),
        "median CoV after (%)": float(tables["cov"]["cov_pct_after"].median()),
    }
    if harmonizer is not None:
        summary["site accuracy, harmonizer in CV"] = rows["before + harmonizer in CV"].accuracy
    if trav:
        ib, ia = icc(xb, subj, site), icc(xa, subj, site)
        tables["icc"] = pd.concat({"before": ib, "after": ia}, axis=1)
        summary["median ICC(2,1) before"] = float(ib["icc2_1"].median())
        summary["median ICC(2,1) after"] = float(ia["icc2_1"].median())
        sites = sorted(pd.unique(site))
        ba = []
        for other in sites[1:]:
            for nm, x in (("before", xb), ("after", xa)):
                try:
                    r = bland_altman_sites(x, subj, site, other, sites[0])
                except HarmonizeError:
                    continue
                ba.append(r.assign(site_a=other, site_b=sites[0], table=nm))
        if ba:
            tables["bland_altman"] = pd.concat(ba).rename_axis("feature").reset_index()
    numeric = [c for c in covariates if pd.api.types.is_numeric_dtype(before[c])]
    assoc = []
    for var in numeric:
        t = None if truth is None or var not in truth.columns else truth[var]
        try:
            res = preservation_of_associations(xb, xa, before[list(covariates)], var, truth=t)
        except HarmonizeError:
            continue
        assoc.append(res.assign(variable=var))
        if t is not None:
            summary[f"mean |beta error| {var} before"] = float(res["abs_error_before"].mean())
            summary[f"mean |beta error| {var} after"] = float(res["abs_error_after"].mean())
    if assoc:
        tables["associations"] = pd.concat(assoc).rename_axis("feature").reset_index()
    tables["summary"] = pd.DataFrame({"value": summary}).rename_axis("metric")
    return tables
