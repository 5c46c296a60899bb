"""Files of ``mrharmony bench``: leaderboard JSON/CSV, biology JSON, PNG plots, HTML.

:func:`write_bench` writes the whole folder atomically
(:func:`mrharmony.fileio.atomic_directory`): a reader sees the previous folder or the
complete new one. The HTML page leads with the answer (per scenario, the methods that
remove the site while keeping the biology), then the figures, then the table.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mrharmony.errors import StudyError
from mrharmony.study.bench import BenchResult, jsonable

__all__ = ["LEADERBOARD_COLUMNS", "image_verdicts", "verdicts", "write_bench"]

#: The leaderboard keys every record has, in CSV column order.
LEADERBOARD_COLUMNS = ("scenario", "method", "level", "learned", "evaluation", "status",
                       "site_accuracy", "site_balanced_accuracy", "site_chance", "icc",
                       "effect_bias", "effect_abs_error", "age_bias", "diagnosis_bias",
                       "coverage", "false_positive_rate", "ssim", "psnr", "mae",
                       "lesion_contrast_error", "spurious_energy", "hallucination_pass",
                       "n_effects", "n_null_tests", "n_scans", "n_sites", "seconds", "reason")

#: A method "removes the site" when its CV site accuracy is at most chance + this.
SITE_MARGIN = 0.15
#: ... and "keeps the biology" when its mean |relative error| of the true effects is at
#: most this, and its false-positive rate on null effects at most FPR_MAX.
BIAS_MAX = 0.25
FPR_MAX = 0.10


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def verdicts(leaderboard: list[dict[str, Any]]) -> dict[str, dict[str, list[str]]]:
    """Per scenario: methods that remove the site and keep the biology, and the others.

    Rules (stated on the page): *removes the site* = site accuracy <= chance +
    :data:`SITE_MARGIN`; *keeps the biology* = mean |relative error| of the true effects
    <= :data:`BIAS_MAX` (where the scenario has true effects) and false-positive rate <=
    :data:`FPR_MAX` (where it has null effects).

    Returns
    -------
    dict
        ``{scenario: {"both": [...], "site_only": [...], "biology_only": [...],
        "neither": [...]}}`` over the records with status ``ok``.
    """
    out: dict[str, dict[str, list[str]]] = {}
    for r in leaderboard:
        if r.get("status") != "ok":
            continue
        d = out.setdefault(r["scenario"], {"both": [], "site_only": [], "biology_only": [],
                                           "neither": []})
        site_ok = (_finite(r["site_accuracy"]) and _finite(r["site_chance"])
                   and r["site_accuracy"] <= r["site_chance"] + SITE_MARGIN)
        bio_ok = True
        checked = False
        if _finite(r.get("effect_abs_error")):
            checked = True
            bio_ok &= r["effect_abs_error"] <= BIAS_MAX
        if _finite(r.get("false_positive_rate")):
            checked = True
            bio_ok &= r["false_positive_rate"] <= FPR_MAX
        bio_ok &= checked
        key = ("both" if site_ok and bio_ok else "site_only" if site_ok
               else "biology_only" if bio_ok else "neither")
        d[key].append(r["method"])
    return out


def image_verdicts(leaderboard: list[dict[str, Any]]) -> dict[str, Any]:
    """The image-translation answer: methods ranked by SSIM, and which hallucinate.

    Returns
    -------
    dict
        ``{"ranking": [(method, ssim), ...] best first, "pass": [...], "hallucinate":
        [...], "learned": [...]}`` over the ``image-translation`` records with status
        ``ok`` (empty lists when there are none). *Hallucinate* = fails the test
        (:data:`~mrharmony.study.bench_learned.CONTRAST_TOL`,
        :data:`~mrharmony.study.bench_learned.SPURIOUS_MAX`).
    """
    recs = [r for r in leaderboard if r.get("scenario") == "image-translation"
            and r.get("status") == "ok" and _finite(r.get("ssim"))]
    recs.sort(key=lambda r: -float(r["ssim"]))
    return {"ranking": [(r["method"], float(r["ssim"])) for r in recs],
            "pass": [r["method"] for r in recs if r.get("hallucination_pass") is True],
            "hallucinate": [r["method"] for r in recs if r.get("hallucination_pass") is False],
            "learned": [r["method"] for r in recs if r.get("learned")]}


def _image_answer(leaderboard: list[dict[str, Any]]) -> list[str]:
    from mrharmony.study.bench_learned import CONTRAST_TOL, SPURIOUS_MAX

    iv = image_verdicts(leaderboard)
    if not iv["ranking"]:
        return []
    by = {r["method"]: r for r in leaderboard if r.get("scenario") == "image-translation"}
    rows = []
    for m, _ in iv["ranking"]:
        r = by[m]
        rows.append(f"<tr><td>{html.escape(m)}{' (learned)' if r.get('learned') else ''}</td>"
                    + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in
                              ("ssim", "psnr", "mae", "lesion_contrast_error",
                               "spurious_energy", "site_accuracy"))
                    + f"<td>{'pass' if r.get('hallucination_pass') else '<b>FAIL</b>'}</td>"
                    "</tr>")
    best = iv["ranking"][0]
    return [
        "<h2>Image translation: who wins, who hallucinates</h2>",
        f"<p>Held-out subjects harmonized from site-B and site-C to site-A. Best SSIM: "
        f"<b>{html.escape(best[0])}</b> ({best[1]:.3f}). Hallucination test passed "
        f"(lesion contrast within {CONTRAST_TOL:.0%} of the target-site truth and spurious "
        f"energy outside true edges at most {SPURIOUS_MAX:g}): "
        f"<b>{html.escape(', '.join(iv['pass']) or 'none')}</b>; "
        f"<b>hallucinate / fail</b>: {html.escape(', '.join(iv['hallucinate']) or 'none')}."
        "</p>",
        "<table><tr><th>method</th><th>ssim</th><th>psnr (dB)</th><th>mae (rel.)</th>"
        "<th>lesion contrast error</th><th>spurious energy</th><th>site acc.</th>"
        "<th>hallucination</th></tr>", *rows, "</table>"]


def _plot(leaderboard: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mrharmony.fileio import atomic_path

    df = pd.DataFrame(leaderboard)
    df = df[df["status"] == "ok"]
    scenarios = list(dict.fromkeys(df["scenario"]))
    n = max(len(scenarios), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.9 * rows), squeeze=False)
    for ax, s in zip(axes.ravel(), scenarios, strict=False):
        d = df[df["scenario"] == s]
        y_col = "effect_abs_error" if d["effect_abs_error"].notna().any() \
            else "false_positive_rate"
        for _, r in d.iterrows():
            if not (_finite(r["site_accuracy"]) and _finite(r[y_col])):
                continue
            marker = "s" if r["level"] == "image" else "o"
            ax.scatter(r["site_accuracy"], r[y_col], marker=marker,
                       color="tab:red" if r["method"] in ("raw", "raw-image") else "tab:blue")
            ax.annotate(r["method"], (r["site_accuracy"], r[y_col]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        chance = d["site_chance"].dropna()
        if len(chance):
            ax.axvline(float(chance.iloc[0]), color="grey", ls="--", lw=1)
        ax.axhline(BIAS_MAX if y_col == "effect_abs_error" else 0.05, color="grey", ls=":",
                   lw=1)
        ax.set_title(s, fontsize=10)
        ax.set_xlabel("site accuracy (CV; dashed: chance)")
        ax.set_ylabel("mean |relative effect error|" if y_col == "effect_abs_error"
                      else "false-positive rate")
    for ax in axes.ravel()[len(scenarios):]:
        ax.axis("off")
    fig.suptitle("Site removal (left is better) vs biology preservation (down is better); "
                 "squares: image level", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _plot_age(biology: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mrharmony.fileio import atomic_path

    df = pd.DataFrame(biology)
    sel = df[(df["effect"] == "age") & (df["feature"] == "gm_volume_ml")]
    scenarios = [s for s in dict.fromkeys(sel["scenario"]) if s != "null-effect"]
    fig, axes = plt.subplots(1, max(len(scenarios), 1), figsize=(3.6 * max(len(scenarios), 1),
                                                                 3.6), squeeze=False)
    for ax, s in zip(axes.ravel(), scenarios, strict=False):
        d = sel[sel["scenario"] == s].reset_index(drop=True)
        y = np.arange(len(d))
        ax.errorbar(d["estimate"], y, xerr=[d["estimate"] - d["ci_low"],
                                           d["ci_high"] - d["estimate"]], fmt="o", ms=4)
        if len(d):
            ax.axvline(float(d["true"].iloc[0]), color="tab:red", lw=1)
        ax.set_yticks(y, d["method"], fontsize=7)
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("GM volume age slope (mL/y)")
    fig.suptitle("Age slope of GM volume with 95 % CI; red: site-free truth", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _fmt(x: Any) -> str:
    if isinstance(x, bool) or x is None:
        return "–" if x is None else ("yes" if x else "no")
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else f"{x:.3g}" if abs(x) < 0.01 and x != 0 \
            else f"{x:.3f}"
    return html.escape(str(x))


def _html(result: BenchResult, figures: list[str]) -> str:
    v = verdicts(result.leaderboard)
    info = result.info
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mrharmony bench</title>",
             "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;"
             "padding:2px 6px;text-align:right}td:first-child,td:nth-child(2){text-align:left}"
             "</style></head><body>",
             "<h1>mrharmony bench: which harmonizers remove the site and keep the biology</h1>",
             f"<p>{html.escape(info['config'])} run, seed {info['seed']}, "
             f"{info['seconds']:.0f} s. A method <b>removes the site</b> when its "
             f"cross-validated site accuracy is at most chance + {SITE_MARGIN}; it <b>keeps "
             f"the biology</b> when the mean |relative error| of the true age/diagnosis "
             f"effects is at most {BIAS_MAX} and the false-positive rate on null effects at "
             f"most {FPR_MAX}. Truth: the same OLS on the site-free data of the same scans "
             "(see docs/bench.md).</p>", *_image_answer(result.leaderboard),
             "<h2>Answer (site removal and biology)</h2><ul>"]
    for s, d in v.items():
        both = ", ".join(d["both"]) or "none"
        parts.append(f"<li><b>{html.escape(s)}</b> ({html.escape(info['scenarios'][s])}): "
                     f"removes site and keeps biology: <b>{html.escape(both)}</b>; site only: "
                     f"{html.escape(', '.join(d['site_only']) or 'none')}; biology only: "
                     f"{html.escape(', '.join(d['biology_only']) or 'none')}; neither: "
                     f"{html.escape(', '.join(d['neither']) or 'none')}</li>")
    parts.append("</ul>")
    if info.get("skipped"):
        parts.append("<p>Skipped methods: " + "; ".join(
            f"{html.escape(k)} ({html.escape(r)})" for k, r in info["skipped"].items())
                     + "</p>")
    parts.append("<h2>Figures</h2>")
    for f in figures:
        parts.append(f"<p><img src='{html.escape(f)}' style='max-width:100%'></p>")
    parts.append("<h2>Leaderboard</h2><table><tr>")
    cols = [c for c in LEADERBOARD_COLUMNS if c != "reason"] + ["reason"]
    parts.extend(f"<th>{html.escape(c)}</th>" for c in cols)
    parts.append("</tr>")
    for r in result.leaderboard:
        parts.append("<tr>" + "".join(f"<td>{_fmt(r.get(c, ''))}</td>" for c in cols)
                     + "</tr>")
    parts.append("</table></body></html>")
    return "\n".join(parts)


def write_bench(result: BenchResult, out_dir: str | os.PathLike[str], *,
                force: bool = False) -> Path:
    """Write ``leaderboard.json``, ``leaderboard.csv``, ``biology.json``,
    ``bench.json`` (run information), PNG figures and ``index.html``.

    Parameters
    ----------
    result : BenchResult
    out_dir : path
        Output folder; an existing one is refused unless ``force`` (then replaced).
    force : bool

    Returns
    -------
    Path

    Raises
    ------
    StudyError
        ``out_dir`` exists and ``force`` is not set.
    """
    from mrharmony.fileio import atomic_directory

    out = Path(out_dir)
    if out.exists() and not force:
        raise StudyError(f"{out}: exists (use --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    board = [{c: r.get(c) for c in LEADERBOARD_COLUMNS} for r in result.leaderboard]
    with atomic_directory(out) as tmp:
        (tmp / "leaderboard.json").write_text(
            json.dumps(jsonable(board), indent=1, allow_nan=False) + "\n")
        pd.DataFrame(board, columns=list(LEADERBOARD_COLUMNS)).to_csv(
            tmp / "leaderboard.csv", index=False)
        (tmp / "biology.json").write_text(
            json.dumps(jsonable(result.biology), indent=0, allow_nan=False) + "\n")
        (tmp / "bench.json").write_text(json.dumps(jsonable(
            {**result.info, "verdicts": verdicts(result.leaderboard)}), indent=1,
            allow_nan=False) + "\n")
        figures = []
        if any(r["status"] == "ok" for r in result.leaderboard):
            _plot(result.leaderboard, tmp / "site_vs_bias.png")
            figures.append("site_vs_bias.png")
        if any(b["feature"] == "gm_volume_ml" and b["effect"] == "age" and
               b["scenario"] != "null-effect" for b in result.biology):
            _plot_age(result.biology, tmp / "age_slope_gm.png")
            figures.append("age_slope_gm.png")
        (tmp / "index.html").write_text(_html(result, figures))
    return out
