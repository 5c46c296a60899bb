"""Agreement across sites: ICC, coefficient of variation, Bland--Altman.

- ICC(2,1) (two-way random, absolute agreement) and ICC(3,1) (two-way mixed,
  consistency) follow Shrout & Fleiss (1979) with subjects as targets and sites as
  raters, from the two-way ANOVA mean squares (complete subjects only).
- CoV: with subjects (traveling subjects) the within-subject between-site SD over the
  within-subject mean, averaged over subjects; without, the SD of site means over their
  mean. Percent; ddof=1.
- Bland--Altman: bias = mean(a - b), limits = bias +/- 1.96 SD(a - b) (ddof=1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from mrharmony.errors import HarmonizeError

from ._inputs import _frame, _labels

__all__ = ["bland_altman", "bland_altman_sites", "cov_across_sites", "icc"]


def _cube(X: Any, subject: Any, site: Any) -> tuple[np.ndarray, pd.Index, list, list]:
    """(subjects x sites x features) array of the subjects measured at every site."""
    df = _frame(X)
    subj = _labels(subject, len(df), "subject")
    site = _labels(site, len(df), "site")
    key = pd.DataFrame({"subject": subj, "site": site})
    dup = key.duplicated()
    if dup.any():
        raise HarmonizeError(f"subject/site: {int(dup.sum())} repeated (subject, site) scans, "
                             f"first {tuple(key[dup].iloc[0])}; average repeats first")
    sites = list(pd.unique(site))
    per_subject = key.groupby("subject", sort=False)["site"].nunique()
    complete = list(per_subject.index[per_subject == len(sites)])
    if len(complete) < 2:
        raise HarmonizeError(f"subject: {len(complete)} subjects were measured at all "
                             f"{len(sites)} sites; need >= 2 traveling subjects")
    sub_idx = pd.Index(complete).get_indexer(subj)
    site_idx = pd.Index(sites).get_indexer(site)
    keep = sub_idx >= 0
    cube = np.full((len(complete), len(sites), df.shape[1]), np.nan)
    cube[sub_idx[keep], site_idx[keep]] = df.to_numpy()[keep]
    return cube, df.columns, complete, sites


def icc(X: Any, subject: Any, site: Any) -> pd.DataFrame:
    """ICC(2,1) and ICC(3,1) per feature (Shrout & Fleiss 1979), sites as raters.

    Parameters
    ----------
    X
        Samples x features of traveling subjects (one scan per subject and site).
    subject, site
        Subject and site label per sample. Subjects not measured at every site are left
        out (the count used is reported).

    Returns
    -------
    DataFrame indexed by feature: ``icc2_1, icc3_1, ms_subject, ms_site, ms_error,
    n_subjects, n_sites``.
    """
    cube, columns, _, _ = _cube(X, subject, site)
    n, k = cube.shape[:2]
    grand = cube.mean(axis=(0, 1))
    ss_rows = k * ((cube.mean(axis=1) - grand) ** 2).sum(axis=0)
    ss_cols = n * ((cube.mean(axis=0) - grand) ** 2).sum(axis=0)
    ss_total = ((cube - grand) ** 2).sum(axis=(0, 1))
    msr = ss_rows / (n - 1)
    msc = ss_cols / (k - 1)
    mse = (ss_total - ss_rows - ss_cols) / ((n - 1) * (k - 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        icc2 = (msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)
        icc3 = (msr - mse) / (msr + (k - 1) * mse)
    return pd.DataFrame({"icc2_1": icc2, "icc3_1": icc3, "ms_subject": msr, "ms_site": msc,
                         "ms_error": mse, "n_subjects": n, "n_sites": k}, index=columns)


def cov_across_sites(X: Any, batch: Any, *, subject: Any | None = None) -> pd.Series:
    """Coefficient of variation across sites, percent (see module notes)."""
    df = _frame(X)
    b = _labels(batch, len(df))
    with np.errstate(invalid="ignore", divide="ignore"):
        if subject is None:
            means = df.groupby(b, sort=False).mean()
            if len(means) < 2:
                raise HarmonizeError("batch: only one site; CoV across sites needs >= 2")
            return (100 * means.std(ddof=1) / means.mean().abs()).rename("cov_pct")
        cube, columns, _, _ = _cube(df, subject, b)
        cv = cube.std(axis=1, ddof=1) / np.abs(cube.mean(axis=1))
    return pd.Series(100 * np.nanmean(cv, axis=0), index=columns, name="cov_pct")


def bland_altman(a: Any, b: Any, *, z: float = 1.96) -> pd.DataFrame:
    """Bland--Altman agreement of paired measurements (rows are pairs).

    Returns
    -------
    DataFrame indexed by feature: ``bias`` (mean of a - b), ``sd_diff`` (ddof=1),
    ``loa_lower``, ``loa_upper`` (bias -/+ z sd), ``mean`` (of the pair means), ``n``.
    """
    fa, fb = _frame(a, "a"), _frame(b, "b")
    if fa.shape != fb.shape:
        raise HarmonizeError(f"bland_altman: shapes {fa.shape} and {fb.shape} differ")
    d = fa.to_numpy() - fb.to_numpy()
    n = np.sum(~np.isnan(d), axis=0)
    if n.min() < 2:
        raise HarmonizeError("bland_altman: a feature has fewer than 2 complete pairs")
    bias = np.nanmean(d, axis=0)
    sd = np.nanstd(d, axis=0, ddof=1)
    mean = np.nanmean((fa.to_numpy() + fb.to_numpy()) / 2, axis=0)
    return pd.DataFrame({"bias": bias, "sd_diff": sd, "loa_lower": bias - z * sd,
                         "loa_upper": bias + z * sd, "mean": mean, "n": n}, index=fa.columns)


def bland_altman_sites(X: Any, subject: Any, site: Any, site_a: Any, site_b: Any,
                       ) -> pd.DataFrame:
    """Bland--Altman of site_a against site_b over the subjects scanned at both."""
    df = _frame(X)
    subj = _labels(subject, len(df), "subject")
    st = _labels(site, len(df), "site")
    a = df[st == site_a].set_axis(subj[st == site_a])
    b = df[st == site_b].set_axis(subj[st == site_b])
    common = a.index.intersection(b.index)
    if len(common) < 2:
        raise HarmonizeError(f"bland_altman_sites: {len(common)} subjects scanned at both "
                             f"{site_a!r} and {site_b!r}; need >= 2")
    return bland_altman(a.loc[common], b.loc[common])
