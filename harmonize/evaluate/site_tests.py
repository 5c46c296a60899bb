"""Per-feature tests of a site effect: ANOVA, Kruskal--Wallis, Levene, Bartlett, KS.

Kolmogorov--Smirnov: ``mode="vs_rest"`` compares each site with all *other* sites pooled
(independent samples, K tests per feature); ``mode="pairwise"`` runs all K(K-1)/2 site
pairs. p-values are unadjusted.
"""

from __future__ import annotations

from itertools import combinations
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from mrharmony.errors import HarmonizeError

from ._inputs import _frame, _groups, _labels, _quiet

__all__ = ["ks_tests", "site_effect_tests"]


def site_effect_tests(X: Any, batch: Any) -> pd.DataFrame:
    """ANOVA, Kruskal--Wallis, Levene (median-centred) and Bartlett tests per feature.

    Returns
    -------
    DataFrame indexed by feature: ``anova_f, anova_p, kruskal_h, kruskal_p, levene_w,
    levene_p, bartlett_t, bartlett_p`` (NaNs omitted per feature; NaN statistic for a
    constant feature).
    """
    df = _frame(X)
    groups = list(_groups(df, _labels(batch, len(df)), min_size=2).values())
    with _quiet():
        out = {}
        for key, fn in (("anova", stats.f_oneway), ("kruskal", stats.kruskal),
                        ("levene", stats.levene), ("bartlett", stats.bartlett)):
            res = fn(*groups, axis=0, nan_policy="omit")
            out[key] = (np.atleast_1d(res.statistic), np.atleast_1d(res.pvalue))
    names = {"anova": "anova_f", "kruskal": "kruskal_h", "levene": "levene_w",
             "bartlett": "bartlett_t"}
    cols = {}
    for key, (stat, p) in out.items():
        cols[names[key]] = stat
        cols[f"{key}_p"] = p
    return pd.DataFrame(cols, index=df.columns)


def ks_tests(X: Any, batch: Any, *, mode: Literal["vs_rest", "pairwise"] = "vs_rest",
             ) -> pd.DataFrame:
    """Two-sample Kolmogorov--Smirnov tests per feature between sites.

    Parameters
    ----------
    mode
        ``"vs_rest"``: each site against all other sites pooled; ``"pairwise"``: every
        pair of sites.

    Returns
    -------
    Long DataFrame: ``feature, site_a, site_b, statistic, p_value`` (``site_b`` is
    ``"rest"`` in vs_rest mode).
    """
    df = _frame(X)
    b = _labels(batch, len(df))
    groups = _groups(df, b, min_size=1)
    data = df.to_numpy()
    if mode == "vs_rest":
        pairs = [(s, "rest", g, data[b != s]) for s, g in groups.items()]
    elif mode == "pairwise":
        pairs = [(s, t, groups[s], groups[t]) for s, t in combinations(groups, 2)]
    else:
        raise HarmonizeError(f"mode: {mode!r} is not 'vs_rest' or 'pairwise'")
    frames = []
    with _quiet():
        for s, t, a, c in pairs:
            res = stats.ks_2samp(a, c, axis=0, nan_policy="omit")
            frames.append(pd.DataFrame({"feature": df.columns, "site_a": s, "site_b": t,
                                        "statistic": np.atleast_1d(res.statistic),
                                        "p_value": np.atleast_1d(res.pvalue)}))
    return pd.concat(frames, ignore_index=True)
