"""Evaluation figures (PNG): per-site boxplots, PCA before/after, Bland--Altman.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas (no
pyplot state, no display needed) and written atomically. Every function returns the
path of the PNG it wrote and refuses to overwrite an existing file unless ``force``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mrharmony.errors import HarmonizeError
from mrharmony.fileio import atomic_path

__all__ = ["plot_bland_altman", "plot_pca", "plot_site_boxplots"]


def _figure(width_in: float, height_in: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path, force: bool) -> Path:
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists (use --force / force=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def plot_site_boxplots(before: pd.DataFrame, batch: Sequence[Any], path: str | Path, *,
                       after: pd.DataFrame | None = None, features: Sequence[str] | None = None,
                       max_features: int = 6, force: bool = False) -> Path:
    """Boxplots of each feature per site, before (and after) harmonization.

    Parameters
    ----------
    before, after
        Samples x features tables (same rows).
    batch
        Site label per sample.
    features
        Columns to show (default: the first ``max_features``).
    """
    feats = list(features or list(before.columns)[:max_features])
    if not feats:
        raise HarmonizeError("plot_site_boxplots: no feature to plot")
    site = np.asarray(batch).astype(str)
    sites = sorted(set(site))
    tables = [("before", before)] + ([("after", after)] if after is not None else [])
    fig = _figure(2.6 * len(feats), 2.4 * len(tables))
    axes = np.atleast_2d(fig.subplots(len(tables), len(feats), squeeze=False))
    for r, (label, tab) in enumerate(tables):
        for c, feat in enumerate(feats):
            ax = axes[r, c]
            data = [tab[feat].to_numpy(np.float64)[site == s] for s in sites]
            ax.boxplot([d[np.isfinite(d)] for d in data], tick_labels=sites)
            ax.set_title(f"{feat} ({label})", fontsize=8)
            ax.tick_params(labelsize=7)
    return _save(fig, path, force)


def plot_pca(before: pd.DataFrame, batch: Sequence[Any], path: str | Path, *,
             after: pd.DataFrame | None = None, force: bool = False) -> Path:
    """First two principal components (standardised features), coloured by site.

    Missing values are replaced by the feature mean before the PCA.
    """
    from sklearn.decomposition import PCA

    site = np.asarray(batch).astype(str)
    sites = sorted(set(site))
    tables = [("before", before)] + ([("after", after)] if after is not None else [])
    fig = _figure(4.2 * len(tables), 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(tables), squeeze=False)[0])
    for ax, (label, tab) in zip(axes, tables, strict=True):
        x = tab.to_numpy(np.float64)
        x = np.where(np.isnan(x), np.nanmean(x, axis=0), x)
        sd = x.std(axis=0)
        x = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
        n_comp = min(2, *x.shape)
        pcs = PCA(n_components=n_comp).fit(x)
        z = pcs.transform(x)
        if n_comp == 1:
            z = np.column_stack([z, np.zeros(len(z))])
        for s in sites:
            ax.scatter(z[site == s, 0], z[site == s, 1], s=12, label=s, alpha=0.8)
        ev = 100 * pcs.explained_variance_ratio_
        ax.set_xlabel(f"PC1 ({ev[0]:.0f} %)")
        ax.set_ylabel(f"PC2 ({ev[1]:.0f} %)" if n_comp > 1 else "")
        ax.set_title(label)
    axes[-1].legend(fontsize=7, title="site", title_fontsize=7)
    return _save(fig, path, force)


def plot_bland_altman(a: Sequence[float], b: Sequence[float], path: str | Path, *,
                      label: str = "", z: float = 1.96, force: bool = False) -> Path:
    """Bland--Altman plot: difference (a - b) against mean, bias and limits of agreement."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise HarmonizeError(f"plot_bland_altman: need two 1-D series of equal length >= 2, "
                             f"got {a.shape} and {b.shape}")
    mean, diff = (a + b) / 2, a - b
    bias, sd = np.nanmean(diff), np.nanstd(diff, ddof=1)
    fig = _figure(4.5, 3.5)
    ax = fig.subplots()
    ax.scatter(mean, diff, s=12)
    for y, style, txt in ((bias, "-", "bias"), (bias - z * sd, "--", f"-{z:g} SD"),
                          (bias + z * sd, "--", f"+{z:g} SD")):
        ax.axhline(y, color="k", linestyle=style, linewidth=1)
        ax.annotate(f"{txt} {y:.3g}", (1.0, y), xycoords=("axes fraction", "data"),
                    fontsize=7, ha="right", va="bottom")
    ax.set_xlabel("mean of pair")
    ax.set_ylabel("difference (a - b)")
    ax.set_title(label or "Bland-Altman", fontsize=9)
    return _save(fig, path, force)
