"""After the tasks: gather features, harmonize, evaluate, lay out the tree, write the report.

Everything here runs on the client and reads only the task store, so it is cheap and
is redone on every run (``--resume`` included). The numbers in ``report.html`` come
from :func:`compute_numbers`, which uses only ``features.csv`` and the evaluation API
(:mod:`mrharmony.harmonize.evaluate`): anyone can recompute them from the CSV.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mrharmony.fileio import atomic_path
from mrharmony.study.config import Study
from mrharmony.study.plan import Plan
from mrharmony.study.store import TaskStore

__all__ = ["BIDS_VERSION", "BIOLOGY_VIF_MAX", "DERIVATIVES", "ID_COLUMNS", "analyse",
           "biology_numbers", "compute_numbers", "harmonized_tables", "materialise_tree",
           "read_features_csv", "recon_flavour_numbers", "scan_truth", "wide_table",
           "write_dataset_files"]

#: Columns that identify a scan in the wide feature table.
ID_COLUMNS = ("subject", "site", "arm", "repeat", "vendor", "field_t")
SURVEY_FOLD = 2.5  # inter-scanner reproducibility, shared Pulseq vs vendor (the survey)


#: pandas < 3 parses floats with a fast, inexact parser unless asked; pandas 3 parses them
#: exactly by default and deprecates the argument.
_EXACT_FLOATS = ({"float_precision": "round_trip"}
                 if int(pd.__version__.split(".")[0]) < 3 else {})


def read_features_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a tidy ``features.csv`` with every float64 exactly as written.

    Parameters
    ----------
    path : str or os.PathLike
        A ``features.csv`` written by the study runner (per scan or the study's own).

    Returns
    -------
    pandas.DataFrame
        The table; float columns equal the written values bit for bit, so numbers
        recomputed from it equal those in ``report.json``.
    """
    return pd.read_csv(path, **_EXACT_FLOATS)


def gather_features(plan: Plan, store: TaskStore, records: Mapping[str, Mapping[str, Any]],
                    ) -> pd.DataFrame:
    """Concatenate the tidy feature tables of every finished scan."""
    frames = []
    for scan in plan.scans:
        record = records.get(scan.features_key)
        if record is None or record.get("status") != "done":
            continue
        frames.append(read_features_csv(store.path("features", scan.features_key)
                                        / "features.csv"))
    if not frames:
        return pd.DataFrame()
    tidy = pd.concat(frames, ignore_index=True)
    order = [c for c in ("subject", "site", "arm", "repeat", "protocol", "quantity", "region",
                         "feature", "value") if c in tidy.columns]
    rest = [c for c in tidy.columns if c not in order]
    return tidy[order + rest].sort_values(
        ["subject", "site", "arm", "repeat", "protocol", "region", "feature"],
        kind="stable").reset_index(drop=True)


def wide_table(tidy: pd.DataFrame, covariates: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per scan (subject, site, arm, repeat), one column per feature.

    Feature columns are named ``<protocol>__<quantity>__<region>__<feature>``.
    """
    ids = [c for c in ID_COLUMNS if c in tidy.columns]
    cov = [c for c in covariates if c in tidy.columns]
    name = (tidy["protocol"].astype(str) + "__" + tidy["quantity"].astype(str) + "__"
            + tidy["region"].astype(str) + "__" + tidy["feature"].astype(str))
    wide = (tidy.assign(column=name)
            .pivot_table(index=ids + cov, columns="column", values="value", aggfunc="first")
            .reset_index())
    wide.columns.name = None
    return wide.sort_values(ids, kind="stable").reset_index(drop=True)


def _feature_cols(wide: pd.DataFrame) -> list[str]:
    return [c for c in wide.columns if "__" in str(c)]


def _harmonizer_class(method: str) -> Any:
    from mrharmony.harmonize.registry import harmonizer_class

    return harmonizer_class(method)


def _make_harmonizer(method: str) -> Any:
    from mrharmony.harmonize.registry import make_harmonizer

    return make_harmonizer(method)


def harmonized_tables(wide: pd.DataFrame, study: Study) -> dict[str, pd.DataFrame]:
    """Harmonize the configured arm's rows with each configured method.

    Returns
    -------
    dict
        ``"<arm>+<method>"`` -> wide table (same rows and columns as the arm's rows).
    """
    h = study.harmonize
    rows = wide[wide["arm"] == h.arm].reset_index(drop=True)
    feats = _feature_cols(rows)
    # Features that are constant or missing everywhere are kept as they are.
    out: dict[str, pd.DataFrame] = {}
    if rows.empty or rows[h.batch].nunique() < 2:
        return out
    for method in h.methods:
        name, covariates = h.method_spec(method)
        cov = rows[list(covariates)] if covariates else None
        model = _make_harmonizer(name)
        X = rows[feats]
        args = (X, rows[h.batch]) + ((cov,) if cov is not None else ())
        harmonized = model.fit_transform(*args) if hasattr(model, "fit_transform") \
            else model.fit(*args).transform(*args)  # e.g. MeanCentering
        table = rows.copy()
        table[feats] = np.asarray(harmonized, dtype=np.float64)
        out[f"{h.arm}+{method}"] = table
    return out


def _arm_tables(wide: pd.DataFrame, harmonized: Mapping[str, pd.DataFrame],
                ) -> dict[str, pd.DataFrame]:
    tables = {arm: wide[wide["arm"] == arm].reset_index(drop=True)
              for arm in sorted(wide["arm"].unique())}
    tables.update(harmonized)
    return tables


def compute_numbers(tidy: pd.DataFrame, study: Study,
                    truth: pd.DataFrame | None = None,
                    volumes: Mapping[str, Mapping[str, float]] | None = None,
                    ) -> dict[str, Any]:
    """The report's numbers, from the tidy ``features.csv`` and the evaluation API.

    Returns a JSON-serialisable dict: per arm (and harmonized arm) the inter-site CoV
    (%) of every feature and its mean; for traveling subjects the ICC(2,1) and ICC(3,1),
    the site-classification accuracy with the harmonizer fitted inside every fold, and
    the recovered age slopes against the cohort's ground truth; for virtual subjects
    (``[cohort]`` or ``[[cohorts]]``) ``biology`` (:func:`biology_numbers`: raw data and
    every harmonizer, each true effect against its estimate; ``volumes`` are the subject
    phantoms' true tissue volumes, subject -> tissue -> mL) and ``biology_summary``.
    """
    from mrharmony.harmonize.evaluate import (
        association_effects,
        cov_across_sites,
        icc,
        site_discriminability,
    )

    wide = wide_table(tidy, study.harmonize.covariates)
    harmonized = harmonized_tables(wide, study)
    tables = _arm_tables(wide, harmonized)
    batch = study.harmonize.batch
    numbers: dict[str, Any] = {"n_scans": len(wide), "arms": {}}
    in_range = _in_range_columns(tidy)
    if in_range is not None:
        numbers["in_range_features"] = sorted(in_range)
    traveling = study.cohort is not None
    for arm, table in tables.items():
        feats = _feature_cols(table)
        entry: dict[str, Any] = {"n_scans": len(table)}
        subject = table["subject"] if traveling else None
        cov = cov_across_sites(table[feats], table[batch], subject=subject)
        entry["cov_pct"] = {k: _num(v) for k, v in cov.items()}
        entry["mean_cov_pct"] = _num(np.nanmean(cov.to_numpy()))
        if in_range is not None:
            keep = [c for c in cov.index if c in in_range]
            entry["mean_cov_pct_in_range"] = _num(np.nanmean(cov[keep].to_numpy())) \
                if keep else None
        if traveling:
            first = table[table["repeat"] == table["repeat"].min()] \
                if "repeat" in table.columns else table
            ic = icc(first[feats], first["subject"], first[batch])
            entry["icc"] = {col: {k: _num(v) for k, v in ic[col].items()}
                            for col in ("icc2_1", "icc3_1")}
            entry["mean_icc2_1"] = _num(np.nanmean(ic["icc2_1"].to_numpy()))
            n_sites = table[batch].nunique()
            min_per_site = int(table[batch].value_counts().min())
            folds = max(2, min(study.evaluate.cv_folds, min_per_site))
            harmonizer = None
            if arm in wide["arm"].unique() and study.harmonize.methods:
                harmonizer = _harmonizer_class(
                    study.harmonize.method_spec(study.harmonize.methods[0])[0])
            if arm in wide["arm"].unique():
                disc = site_discriminability(
                    table[feats], table[batch], n_splits=folds,
                    n_permutations=study.evaluate.permutations, seed=study.study.seed)
                entry["site_classification"] = _disc(disc)
                if harmonizer is not None:
                    covs = table[list(study.harmonize.covariates)] \
                        if study.harmonize.covariates else None
                    disc_h = site_discriminability(
                        table[feats], table[batch], covariates=covs, harmonizer=harmonizer,
                        n_splits=folds, n_permutations=study.evaluate.permutations,
                        seed=study.study.seed)
                    entry["site_classification_harmonized_in_cv"] = _disc(disc_h)
            entry["chance"] = 1.0 / n_sites
            if "age" in table.columns:
                eff = association_effects(table[feats], table[["age"]], "age")
                entry["age_slope"] = {k: _num(v) for k, v in eff["beta"].items()}
        numbers["arms"][arm] = entry
    if "native" in numbers["arms"] and "shared" in numbers["arms"]:
        native = numbers["arms"]["native"]["cov_pct"]
        shared = numbers["arms"]["shared"]["cov_pct"]
        ratios = {k: native[k] / shared[k] for k in shared
                  if k in native and shared[k] and np.isfinite(shared[k])
                  and np.isfinite(native[k]) and shared[k] > 0
                  and (in_range is None or k in in_range)}
        numbers["native_over_shared_cov"] = {k: _num(v) for k, v in ratios.items()}
        numbers["native_over_shared_cov_median"] = _num(np.median(list(ratios.values()))) \
            if ratios else None
        numbers["survey_fold"] = SURVEY_FOLD
    accuracy = accuracy_numbers(tidy)
    if accuracy:
        numbers["accuracy"], numbers["accuracy_summary"] = accuracy
    flavours = recon_flavour_numbers(numbers, study, in_range)
    if flavours:
        numbers["recon_flavours"] = flavours
    if truth is not None and traveling:
        numbers["truth_age_slope"] = {str(k): _num(v) for k, v in truth.items()}
    if (study.cohort is not None or study.cohorts) and "age" in tidy.columns:
        bio = _study_biology(tidy, wide, harmonized, study, volumes or {})
        if bio is not None:
            numbers["biology"], numbers["biology_summary"] = bio
    return numbers


def _study_biology(tidy: pd.DataFrame, wide: pd.DataFrame,
                   harmonized: Mapping[str, pd.DataFrame], study: Study,
                   volumes: Mapping[str, Mapping[str, float]],
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """:func:`biology_numbers` of the harmonized arm's rows (first repeat)."""
    h = study.harmonize
    rows = wide[wide["arm"] == h.arm].reset_index(drop=True)
    if rows.empty or rows["subject"].nunique() < 4:
        return None
    truth = scan_truth(rows, tidy, volumes)
    if truth.empty:
        return None
    cov = (tidy.drop_duplicates("subject").set_index("subject")
           .reindex(rows["subject"])[["age", "diagnosis", "sex"]].reset_index(drop=True))
    tables = {"raw": rows}
    for name, table in harmonized.items():
        tables[name.split("+", 1)[1]] = table
    null = bool(study.cohorts) and all(d.null for d in study.cohorts)
    return biology_numbers(tables, truth, cov, null=null)


#: Site enters the biology model as a covariate only when no effect variable is confounded
#: with it: the variance inflation of each (1 / (1 - R^2) of the variable on the site
#: dummies) at most this. Otherwise the model is pooled (no site term), the analysis a
#: harmonizer exists for.
BIOLOGY_VIF_MAX = 2.0
#: Biology effects: name -> model column.
BIOLOGY_EFFECTS = {"age": "age", "diagnosis": "patient"}


def scan_truth(wide: pd.DataFrame, tidy: pd.DataFrame,
               volumes: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    """Site-free true value of every feature that has one, per row of ``wide``.

    Volume features (``<protocol>__segmentation__<tissue>__volume_ml``) take the subject
    phantom's realised tissue volume (``volumes[subject][tissue]``, mL, measured on the
    cohort grid); quantitative-map features take the phantom's regional mean (the
    ``truth`` column of the tidy table). Intensity features have no truth (left out).
    """
    out = pd.DataFrame(index=wide.index)
    for col in _feature_cols(wide):
        _protocol, quantity, region, feature = str(col).split("__")
        if quantity == "segmentation" and feature == "volume_ml":
            out[col] = [volumes.get(str(s), {}).get(region, np.nan) for s in wide["subject"]]
    if "truth" in tidy.columns:
        rows = tidy[tidy["truth"].notna()]
        if not rows.empty:
            name = (rows["protocol"].astype(str) + "__" + rows["quantity"].astype(str) + "__"
                    + rows["region"].astype(str) + "__" + rows["feature"].astype(str))
            per = rows.assign(column=name).groupby(["subject", "column"])["truth"].mean()
            for col in sorted(set(name) & set(wide.columns)):
                out[col] = [per.get((s, col), np.nan) for s in wide["subject"]]
    return out.dropna(axis=1, how="all")


def _site_vif(model: pd.DataFrame, site: pd.Series, variables: list[str]) -> dict[str, float]:
    """Variance inflation of each variable by the site dummies."""
    dummies = pd.get_dummies(site.astype(str), drop_first=True, dtype=float).to_numpy()
    design = np.column_stack([np.ones(len(site)), dummies])
    out = {}
    for var in variables:
        y = model[var].to_numpy(float)
        fit = design @ np.linalg.lstsq(design, y, rcond=None)[0]
        ss = float(((y - y.mean()) ** 2).sum())
        r2 = 1.0 - float(((y - fit) ** 2).sum()) / ss if ss > 0 else 1.0
        out[var] = float("inf") if r2 >= 1.0 - 1e-12 else 1.0 / (1.0 - r2)
    return out


def _ols_ci(X: pd.DataFrame, model: pd.DataFrame, var: str) -> pd.DataFrame:
    """OLS effect of ``var`` per feature with its 95 % t interval."""
    from scipy import stats

    from mrharmony.harmonize.evaluate import association_effects

    e = association_effects(X.reset_index(drop=True), model.reset_index(drop=True), var)
    half = stats.t.ppf(0.975, e["n"] - model.shape[1] - 1) * e["se"]
    return e.assign(ci_low=e["beta"] - half, ci_high=e["beta"] + half)


def biology_numbers(tables: Mapping[str, pd.DataFrame], truth: pd.DataFrame,
                    covariates: pd.DataFrame, *, null: bool = False,
                    null_features: tuple[str, ...] | list[str] = (),
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """True effects against their estimates, per method and feature.

    Parameters
    ----------
    tables : mapping
        Method (``"raw"`` or a harmonizer name) -> wide table of the same rows (one per
        scan, with a ``site`` column).
    truth : DataFrame
        Site-free true feature values of those rows (:func:`scan_truth`).
    covariates : DataFrame
        ``age`` (years), ``diagnosis`` ("patient"/"control"), ``sex`` ("F"/"M") per row.
    null : bool, optional
        The design has no true effect: every truth is 0.
    null_features : sequence of str, optional
        Features without any true effect by construction (truth 0).

    Returns
    -------
    records : list of dict
        ``method, effect ("age" | "diagnosis"), feature, true, estimate, ci_low, ci_high``
        (feature units per year, or patient minus control), plus ``p``, ``kind``
        (``null``: zero by construction; ``primary``: ``|t| >= bench.PRIMARY_T`` in the
        site-free fit; ``weak``: neither, reported but not scored) and ``covered``.
    summary : dict
        ``model`` (the formula), ``site_covariate`` and its reason, ``vif``, and per
        method and effect ``bias`` (mean relative error of the primary effects),
        ``abs_error`` (mean absolute relative error),
        ``coverage`` (fraction of primary truths inside the 95 % CI), ``false_positive_
        rate`` (p < 0.05 on null effects), ``n_effects``, ``n_null``.

    Notes
    -----
    Model ``feature ~ 1 + age [+ patient] [+ male] [+ site]`` by OLS. The truth is the
    same OLS on the site-free values of the same scans (the slope of these subjects
    themselves, as in ``mrharmony bench``, so head-size sampling does not count as bias);
    an effect whose site-free standardised size is below ``bench.ZERO_STD_BETA`` is zero
    by construction and counts as null, as do ``null_features``. ``site`` is a covariate
    only when no effect is
    confounded with it (:data:`BIOLOGY_VIF_MAX`).
    """
    from mrharmony.study.bench import PRIMARY_T, ZERO_STD_BETA

    first = next(iter(tables.values()))
    model = pd.DataFrame({"age": covariates["age"].to_numpy(float)})
    patient = (covariates["diagnosis"].astype(str) == "patient").to_numpy(float)
    effects = {"age": "age"}
    if 2 <= patient.sum() <= len(patient) - 2:
        model["patient"] = patient
        effects["diagnosis"] = "patient"
    male = (covariates["sex"].astype(str) == "M").to_numpy(float)
    if 0 < male.sum() < len(male):
        model["male"] = male
    site = first["site"].reset_index(drop=True)
    vif = _site_vif(model, site, list(effects.values()))
    with_site = site.nunique() > 1 and max(vif.values()) <= BIOLOGY_VIF_MAX
    if with_site:
        dummies = pd.get_dummies(site.astype(str), prefix="site", drop_first=True, dtype=float)
        model = pd.concat([model, dummies], axis=1)
        reason = (f"site is a covariate (every effect's variance inflation by site <= "
                  f"{BIOLOGY_VIF_MAX:g})")
    else:
        over = [f"{k} VIF {v:.3g}" for k, v in vif.items() if v > BIOLOGY_VIF_MAX]
        reason = ("pooled model, no site term: " + (
            f"site is confounded with {', '.join(over)} > {BIOLOGY_VIF_MAX:g}" if over
            else "one site"))
    terms = [t for t, on in (("age", True), ("patient", "patient" in model),
                             ("male", "male" in model), ("site", with_site)) if on]
    feats = [c for c in truth.columns if c in first.columns]
    true_fx = {eff: _ols_ci(truth[feats], model, var) for eff, var in effects.items()}
    records: list[dict[str, Any]] = []
    summary: dict[str, Any] = {
        "model": "feature ~ 1 + " + " + ".join(terms), "site_covariate": bool(with_site),
        "reason": reason, "vif": {k: _num(v) for k, v in vif.items()}, "methods": {}}
    for method, table in tables.items():
        per: dict[str, Any] = {}
        for eff, var in effects.items():
            est = _ols_ci(table[feats], model, var)
            rel, covered, fp = [], [], []
            for feat in feats:
                t = true_fx[eff].loc[feat]
                is_null = null or feat in null_features or \
                    not abs(float(t["std_beta"])) > ZERO_STD_BETA
                true = 0.0 if is_null else float(t["beta"])
                kind = "null" if is_null else (
                    "primary" if abs(float(t["t"])) >= PRIMARY_T else "weak")
                e = est.loc[feat]
                inside = bool(e["ci_low"] <= true <= e["ci_high"])
                records.append({
                    "method": method, "effect": eff, "feature": feat, "true": _num(true),
                    "estimate": _num(float(e["beta"])), "ci_low": _num(float(e["ci_low"])),
                    "ci_high": _num(float(e["ci_high"])), "p": _num(float(e["p"])),
                    "kind": kind, "covered": inside})
                if is_null:
                    fp.append(float(e["p"]) < 0.05)
                elif kind == "primary":
                    rel.append((float(e["beta"]) - true) / true)
                    covered.append(inside)
            per[eff] = {
                "bias": _num(float(np.mean(rel))) if rel else None,
                "abs_error": _num(float(np.mean(np.abs(rel)))) if rel else None,
                "coverage": _num(float(np.mean(covered))) if covered else None,
                "false_positive_rate": _num(float(np.mean(fp))) if fp else None,
                "n_effects": len(rel), "n_null": len(fp)}
        summary["methods"][method] = per
    return records, summary


def recon_flavour_numbers(numbers: Mapping[str, Any], study: Study,
                          in_range: set[str] | None = None) -> dict[str, Any]:
    """Recon flavours of the same raw data against the one shared recon, per feature.

    For every acquisition arm with several study arms reconstructing it, the reference is
    the arm that gets one recon at every site (:meth:`ReconSection.same_at_every_site`);
    every other arm is compared with it: its inter-site CoV, the reference's, their
    difference (percentage points: the site effect that arm's recon choices add) and ratio.

    Returns
    -------
    dict
        ``{arm: {"reference", "acquisition", "cov_pct", "reference_cov_pct",
        "added_cov_pct", "ratio", "median_added_cov_pct", "median_ratio"}}`` (empty when
        the study has no such pair).
    """
    recon = study.recon
    arms = [a for a in study.sites.arms if a in numbers["arms"]]
    out: dict[str, Any] = {}
    for acq in dict.fromkeys(recon.acquisition_of(a) for a in arms):
        group = [a for a in arms if recon.acquisition_of(a) == acq]
        refs = [a for a in group if recon.same_at_every_site(a)]
        if len(group) < 2 or not refs:
            continue
        ref = refs[0]
        ref_cov = numbers["arms"][ref]["cov_pct"]
        for arm in group:
            if arm == ref:
                continue
            cov = numbers["arms"][arm]["cov_pct"]
            keys = [k for k in ref_cov if k in cov and ref_cov[k] is not None
                    and cov[k] is not None and (in_range is None or k in in_range)]
            added = {k: _num(cov[k] - ref_cov[k]) for k in keys}
            ratio = {k: _num(cov[k] / ref_cov[k]) for k in keys if ref_cov[k] > 0}
            out[arm] = {
                "reference": ref, "acquisition": acq,
                "cov_pct": {k: cov[k] for k in keys},
                "reference_cov_pct": {k: ref_cov[k] for k in keys},
                "added_cov_pct": added, "ratio": ratio,
                "median_added_cov_pct": _num(float(np.median(list(added.values()))))
                if added else None,
                "median_ratio": _num(float(np.median(list(ratio.values())))) if ratio
                else None,
            }
    return out


#: A measured phantom value is "accurate" within this relative error of its reference.
ACCURACY_TOLERANCE_PCT = 5.0


def accuracy_numbers(tidy: pd.DataFrame) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """Every region's measured mean against its true (phantom reference) value, per arm.

    Parameters
    ----------
    tidy : DataFrame
        ``features.csv`` rows; those with a ``truth`` and ``feature == "mean"`` count.

    Returns
    -------
    (records, summary) or None
        ``records``: one per (arm, protocol, quantity, region) with ``truth`` (mean over
        sites: the reference depends on the field), ``mean_error_pct`` and
        ``sd_error_pct`` (over sites, of each site's mean over repeats),
        ``max_abs_error_pct``, ``n_sites`` and ``in_range``. ``summary``: per arm, over
        in-range regions, ``n_in_range``, ``n_within`` (|mean error| <= the tolerance),
        ``tolerance_pct`` and the worst region. None without truth values.
    """
    if "truth" not in tidy.columns or tidy["truth"].isna().all():
        return None
    rows = tidy[tidy["truth"].notna() & (tidy["feature"] == "mean")].copy()
    if rows.empty:
        return None
    rows["error_pct"] = 100 * (rows["value"] - rows["truth"]) / rows["truth"]
    if "in_range" not in rows.columns:
        rows["in_range"] = True
    rows["in_range"] = rows["in_range"].fillna(False).astype(bool)
    keys = ["arm", "protocol", "quantity", "region"]
    per_site = rows.groupby([*keys, "site"]).agg(error_pct=("error_pct", "mean"),
                                                 truth=("truth", "mean"),
                                                 in_range=("in_range", "all"))
    records: list[dict[str, Any]] = []
    for key, group in per_site.groupby(level=keys, sort=True):
        err = group["error_pct"].to_numpy(dtype=np.float64)
        records.append({
            **dict(zip(keys, (str(k) for k in key), strict=True)),
            "truth": _num(float(group["truth"].mean())),
            "mean_error_pct": _num(float(np.mean(err))),
            "sd_error_pct": _num(float(np.std(err, ddof=1))) if err.size > 1 else None,
            "max_abs_error_pct": _num(float(np.max(np.abs(err)))),
            "n_sites": int(err.size),
            "in_range": bool(group["in_range"].all()),
        })
    summary: dict[str, Any] = {}
    for arm in sorted({r["arm"] for r in records}):
        ranged = [r for r in records if r["arm"] == arm and r["in_range"]
                  and r["mean_error_pct"] is not None]
        if not ranged:
            continue
        worst = max(ranged, key=lambda r: abs(r["mean_error_pct"]))
        summary[arm] = {
            "n_in_range": len(ranged),
            "n_within": sum(abs(r["mean_error_pct"]) <= ACCURACY_TOLERANCE_PCT for r in ranged),
            "tolerance_pct": ACCURACY_TOLERANCE_PCT,
            "worst": {k: worst[k] for k in ("protocol", "quantity", "region",
                                            "mean_error_pct")},
        }
    return records, summary


def _in_range_columns(tidy: pd.DataFrame) -> set[str] | None:
    """Wide-table columns whose true value lies in the protocol's sampled TI/TE range."""
    if "in_range" not in tidy.columns:
        return None
    rows = tidy[tidy["in_range"].fillna(False).astype(bool)]
    names = (rows["protocol"].astype(str) + "__" + rows["quantity"].astype(str) + "__"
             + rows["region"].astype(str) + "__" + rows["feature"].astype(str))
    return set(names)


def _disc(result: Any) -> dict[str, Any]:
    keys = ("accuracy", "balanced_accuracy", "chance_accuracy", "chance_balanced_accuracy",
            "p_value", "n_splits", "n_permutations", "harmonizer")
    return {k: _num(getattr(result, k)) for k in keys}


def _num(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


#: BIDS version the study tree follows (checked by bids-validator in the tests).
BIDS_VERSION = "1.10.0"
#: Derivatives (tables, report, figures) live here, relative to the study folder.
DERIVATIVES = Path("derivatives") / "mrharmony"


def _generated_by() -> list[dict[str, str]]:
    from mrharmony import __version__

    return [{"Name": "mrharmony", "Version": __version__,
             "Description": "vendor-agnostic MRI: Pulseq sequences, Bloch simulation at "
                            "virtual sites, reconstruction and harmonization"}]


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".tmp") as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def write_dataset_files(out_dir: Path, study: Study, subjects: list[str]) -> list[Path]:
    """``dataset_description.json``, ``README`` and ``participants.tsv`` of the raw dataset,
    and the derivative's own ``dataset_description.json``."""
    name = study.study.name
    root = out_dir / "dataset_description.json"
    _write_json(root, {
        "Name": f"mrharmony study {name}", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "Authors": [f"mrharmony (in-silico study '{name}')"],
        "GeneratedBy": _generated_by(),
        "SourceDatasets": [{"Description": "ISMRMRD raw data and Pulseq sequences in "
                                           "sourcedata/"}],
    })
    deriv = out_dir / DERIVATIVES / "dataset_description.json"
    _write_json(deriv, {
        "Name": f"mrharmony study {name}: features, harmonization, report",
        "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
        "GeneratedBy": _generated_by(),
        "SourceDatasets": [{"URL": "../.."}],
    })
    readme = out_dir / "README"
    with atomic_path(readme, suffix=".tmp") as tmp:
        tmp.write_text(
            f"mrharmony study '{name}': in-silico scans of known phantoms or virtual subjects\n"
            "at virtual sites (simulated with Pulseq sequences, reconstructed by mrharmony).\n"
            "sourcedata/: ISMRMRD raw data and the Pulseq .seq files that produced them.\n"
            f"{DERIVATIVES.as_posix()}/: feature tables, harmonized tables, report.html.\n")
    part = out_dir / "participants.tsv"
    with atomic_path(part, suffix=".tmp") as tmp:
        tmp.write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in sorted(subjects)))
    return [root, deriv, readme, part]


def _split_volumes(src: Path, src_json: Path, dst_dir: Path, stem: str, suffix: str,
                   key: str, entity: str, written: list[Path]) -> bool:
    """Write a 4-D image whose sidecar lists ``key`` per volume as one file per volume
    (``<stem>_<entity>-<k>_<suffix>``, ``key`` scalar), as BIDS asks for multi-echo and
    multi-inversion data. Returns False when the image is not such a series."""
    import nibabel as nib

    from mrharmony.formats.nifti import nifti_image, save_nifti

    meta = json.loads(src_json.read_text())
    values = meta.get(key)
    img = nib.load(str(src))
    if not isinstance(values, list) or img.ndim != 4 or img.shape[3] != len(values):
        return False
    data = np.asarray(img.dataobj)
    for k, value in enumerate(values):
        name = f"{stem}_{entity}-{k + 1}_{suffix}"
        one = nifti_image(np.ascontiguousarray(data[..., k]), img.affine)
        written.append(save_nifti(one, dst_dir / f"{name}.nii.gz", force=True))
        _write_json(dst_dir / f"{name}.json", {**meta, key: value})
        written.append(dst_dir / f"{name}.json")
    return True


def materialise_tree(plan: Plan, store: TaskStore, records: Mapping[str, Mapping[str, Any]],
                     out_dir: Path, study: Study) -> list[Path]:
    """Lay out the study as a BIDS dataset (hard links into the task store where possible).

    - ``sub-<id>/ses-<site>/anat|dwi/sub-<id>_ses-<site>_acq-<protocol>_rec-<arm>_run-<n>_
      <suffix>.nii.gz`` + ``.json``: images and maps; multi-echo and multi-inversion
      series as one file per echo (``echo-<k>``) or inversion (``inv-<k>``);
    - ``sourcedata/sequences/<scanner>[_native-<site>]/<protocol>.seq`` and
      ``sourcedata/raw/sub-<id>/ses-<site>/..._raw.h5`` (ISMRMRD);
    - ``dataset_description.json``, ``README``, ``participants.tsv`` and the derivative's
      description (:func:`write_dataset_files`).
    """
    written: list[Path] = []

    def place(src: Path, dst: Path) -> None:
        if not src.is_file():
            return
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            dst.unlink()
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
        written.append(dst)

    for key, info in plan.sequences.items():
        if records.get(key, {}).get("status") != "done":
            continue
        folder = info["scanner"] + (f"_native-{info['site']}" if info["arm"] == "native" else "")
        place(store.path("sequence", key) / "sequence.seq",
              out_dir / "sourcedata" / "sequences" / folder / f"{info['protocol']}.seq")
    maps_of = {p.name: p.maps for p in study.protocols}
    subjects = set()
    for scan in plan.scans:
        sub = f"sub-{_bids(scan.subject)}"
        ses = f"ses-{_bids(scan.site)}"
        maps = maps_of[scan.protocol]
        kind = "dwi" if maps in ("adc", "dti") else "anat"
        stem = (f"{sub}_{ses}_acq-{_bids(scan.protocol)}_rec-{_bids(scan.arm)}"
                f"_run-{scan.repeat + 1}")
        base = out_dir / sub / ses
        if records.get(scan.simulate_key, {}).get("status") == "done":
            place(store.path("simulate", scan.simulate_key) / "raw.h5",
                  out_dir / "sourcedata" / "raw" / sub / ses / f"{stem}_raw.h5")
        if records.get(scan.recon_key, {}).get("status") == "done":
            subjects.add(_bids(scan.subject))
            rdir = store.path("recon", scan.recon_key)
            suffix = {"t1": "T1map", "t2": "T2map", "adc": "ADC", "dti": "FA"}.get(maps, "")
            series = {"t1": ("InversionTime", "inv"), "t2": ("EchoTime", "echo")}.get(maps)
            image_suffix = _image_suffix(maps)
            if not (series and (rdir / "image.nii.gz").is_file() and _split_volumes(
                    rdir / "image.nii.gz", rdir / "image.json", base / kind, stem,
                    image_suffix, *series, written)):
                for ext in (".nii.gz", ".json", ".bval", ".bvec"):
                    if ext in (".nii.gz", ".json") or (rdir / f"image{ext}").is_file():
                        place(rdir / f"image{ext}", base / kind / f"{stem}_{image_suffix}{ext}")
            if suffix:
                for ext in (".nii.gz", ".json"):
                    place(rdir / f"map{ext}", base / kind / f"{stem}_{suffix}{ext}")
    written += write_dataset_files(out_dir, study, sorted(subjects))
    return written


def _image_suffix(maps: str) -> str:
    return {"t1": "IRT1", "t2": "MESE", "adc": "dwi", "dti": "dwi"}.get(maps, "T1w")


def _bids(text: Any) -> str:
    return "".join(ch for ch in str(text) if ch.isalnum())


def analyse(study: Study, plan: Plan, store: TaskStore,
            records: Mapping[str, Mapping[str, Any]], out_dir: Path,
            ) -> tuple[Path | None, dict[str, Any]]:
    """Lay out the BIDS tree, then write ``features.csv``, the harmonized tables,
    ``report.json`` and ``report.html`` under ``derivatives/mrharmony/``; returns the
    report path and its numbers."""
    from mrharmony.study.report import write_study_report

    materialise_tree(plan, store, records, out_dir, study)
    tidy = gather_features(plan, store, records)
    if tidy.empty:
        return None, {}
    out_dir = out_dir / DERIVATIVES
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(tidy, out_dir / "features.csv")
    truth = _cohort_truth(study)
    numbers = compute_numbers(tidy, study, truth, _phantom_volumes(plan, store, records))
    wide = wide_table(tidy, study.harmonize.covariates)
    _write_csv(wide, out_dir / "features_wide.csv")
    harmonized = harmonized_tables(wide, study)
    for name, table in harmonized.items():
        _write_csv(table, out_dir / f"features_harmonized_{_bids(name.split('+')[1])}.csv")
    (out_dir / "report.json").write_text(json.dumps(numbers, indent=1, allow_nan=False))
    report = write_study_report(study, plan, store, records, out_dir, tidy, wide,
                                harmonized, numbers)
    return report, numbers


def _cohort_truth(study: Study) -> pd.Series | None:
    """True age slopes of the cohort's features (per year), when the cohort states them."""
    if study.cohort is None:
        return None
    from mrharmony.phantoms import make_cohort

    c = study.cohort
    cohort = make_cohort(c.n_subjects, c.seed, age_range=(c.age_min_years, c.age_max_years))
    slopes = getattr(cohort, "true_age_slopes", None)
    return None if slopes is None else pd.Series(slopes() if callable(slopes) else slopes)


def _phantom_volumes(plan: Plan, store: TaskStore, records: Mapping[str, Mapping[str, Any]],
                     ) -> dict[str, dict[str, float]]:
    """Subject -> the true tissue volumes (mL) its phantom task recorded."""
    out: dict[str, dict[str, float]] = {}
    for scan in plan.scans:
        if scan.subject in out or records.get(scan.phantom_key, {}).get("status") != "done":
            continue
        path = store.path("phantom", scan.phantom_key) / "phantom" / "phantom.json"
        if path.is_file():
            meta = json.loads(path.read_text()).get("metadata", {})
            if "volumes_ml" in meta:
                out[scan.subject] = {k: float(v) for k, v in meta["volumes_ml"].items()}
    return out


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path, suffix=".tmp") as tmp:
        frame.to_csv(tmp, index=False)
