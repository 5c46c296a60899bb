"""``report.html`` of a study: the tables and figures a study team puts in a paper.

Every number shown comes from ``report.json`` (:func:`~mrharmony.study.analysis.
compute_numbers`, recomputable from ``features.csv``); the figures are drawn from the
feature tables and the reconstructed maps in the task store.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mrharmony.study.analysis import SURVEY_FOLD, _feature_cols
from mrharmony.study.config import Study
from mrharmony.study.plan import Plan, measurable_range_ms
from mrharmony.study.store import TaskStore

__all__ = ["write_study_report"]


def _save_figure(fig: Any, path: Path) -> Path:
    """Write a report figure (PNG, 110 dpi; its folder made) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cov_table(numbers: Mapping[str, Any]) -> pd.DataFrame:
    arms = numbers["arms"]
    table = pd.DataFrame({arm: pd.Series(entry["cov_pct"], dtype=float)
                          for arm, entry in arms.items()})
    if "native_over_shared_cov" in numbers:
        table["native / shared"] = pd.Series(numbers["native_over_shared_cov"], dtype=float)
    if "in_range_features" in numbers:
        table["in TI/TE range"] = [c in set(numbers["in_range_features"]) for c in table.index]
    table.index = [_pretty(c) for c in table.index]
    return table


def _pretty(column: str) -> str:
    protocol, quantity, region, feature = ([*column.split("__"), "", "", "", ""])[:4]
    return f"{protocol} {quantity} {region} ({feature})"


def _accuracy_table(numbers: Mapping[str, Any]) -> pd.DataFrame | None:
    """``report.json["accuracy"]`` as a table: each region against its true value."""
    records = numbers.get("accuracy")
    if not records:
        return None
    table = pd.DataFrame(records).rename(columns={
        "truth": "true value", "mean_error_pct": "mean error across sites (%)",
        "sd_error_pct": "SD of error across sites (%)",
        "max_abs_error_pct": "largest site error (%)", "in_range": "in TI/TE range"})
    return table.drop(columns=["n_sites"])


def _accuracy_figure(numbers: Mapping[str, Any], out_dir: Path) -> Path | None:
    """Mean error (%) of every in-range region against its reference, per arm."""
    records = [r for r in numbers.get("accuracy") or [] if r["in_range"]
               and r["mean_error_pct"] is not None]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted({r["arm"] for r in records})
    names = sorted({(r["protocol"], r["quantity"], r["region"]) for r in records})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(names)), 4.8))
    width = 0.8 / len(arms)
    x = np.arange(len(names))
    for i, arm in enumerate(arms):
        by = {(r["protocol"], r["quantity"], r["region"]): r for r in records
              if r["arm"] == arm}
        mean = [by[n]["mean_error_pct"] if n in by else np.nan for n in names]
        sd = [(by[n]["sd_error_pct"] or 0.0) if n in by else 0.0 for n in names]
        ax.bar(x + i * width, mean, width, yerr=sd, capsize=2, label=arm)
    tol = float(next(iter(numbers["accuracy_summary"].values()))["tolerance_pct"])
    ax.axhspan(-tol, tol, color="0.85", zorder=0, label=f"±{tol:g} %")
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(x + 0.4 - width / 2, [f"{q.upper()} {r}" for _, q, r in names],
                  rotation=90, fontsize=7)
    ax.set_ylabel("error vs reference (%)")
    ax.set_title("in-range regions: mean ± SD over sites", fontsize=9)
    ax.set_yscale("symlog", linthresh=10.0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, out_dir / "figures" / "accuracy_per_region.png")


def _convergence_section(plan: Plan, records: Mapping[str, Mapping[str, Any]],
                         study: Study) -> Any:
    """How converged the simulated raw data are (simulate task records), or None."""
    from mrharmony.harmonize.report import ReportSection
    from mrharmony.simulation.raw import CONVERGENCE_FACTOR

    rows = []
    n_fast = 0
    for scan in plan.scans:
        info = (records.get(scan.simulate_key) or {}).get("info") or {}
        pct = info.get("isochromat_convergence_pct")
        n_fast += info.get("simulation_path") == "fast"
        if pct is not None:
            rows.append({"protocol": scan.protocol, "arm": scan.arm, "pct": float(pct)})
    if not rows:
        return None
    table = (pd.DataFrame(rows).groupby(["protocol", "arm"])["pct"]
             .agg(["median", "max"]).reset_index())
    n = study.simulation.isochromats_per_voxel
    table.columns = ["protocol", "arm", f"median change with {CONVERGENCE_FACTOR} x "
                     "isochromats (%)", "largest (%)"]
    worst = float(table["largest (%)"].max())
    verdict = ("converged: the raw data no longer depend on it" if worst <= 5.0 else
               "NOT converged: spoiling, crusher and slice-profile pathways are not "
               "resolved, so the raw data (and everything measured from them) are off by an "
               "amount of this order; raise [simulation] isochromats_per_voxel")
    text = (f"Each scan's simulation was checked: the whole signal of a few voxels (one per "
            f"tissue, slowest T2 first) with {n} and {CONVERGENCE_FACTOR * n} isochromats "
            f"per voxel differs by up to {worst:.1f} %: {verdict}.")
    if study.simulation.spoiling == "ideal":
        text += (" Spoiling is ideal (transverse magnetisation zeroed before every excitation "
                 "and inversion): no coherence crosses from one shot to the next, and the "
                 "vendors' spoiler and RF-spoiling differences are not simulated.")
    tol = study.simulation.fast_path_tol_pct
    if tol > 0:
        text += (f" Fast path (within {tol:g} % of the full engine's peak signal on probe "
                 f"voxels, else the full engine): {n_fast} of {len(plan.scans)} scans.")
    return ReportSection("Simulation convergence", text=text,
                         tables={"Signal change per protocol and arm": table})


def _accuracy_findings(numbers: Mapping[str, Any]) -> list[str]:
    lines = []
    for arm, entry in (numbers.get("accuracy_summary") or {}).items():
        worst = entry["worst"]
        lines.append(
            f"Accuracy, {arm}: {entry['n_within']} of {entry['n_in_range']} in-range regions "
            f"within {entry['tolerance_pct']:g} % of their reference value (mean over sites); "
            f"worst {worst['quantity'].upper()} {worst['region']} "
            f"{worst['mean_error_pct']:+.1f} %.")
    return lines


def _montage(plan: Plan, store: TaskStore, records: Mapping[str, Any], study: Study,
             out_dir: Path) -> list[Path]:
    """One PNG per protocol: the reconstructed map (or image) of every site and arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    from mrharmony.sequences import load_protocol

    figures = []
    subject = plan.scans[0].subject if plan.scans else None
    for entry in study.protocols:
        scans = [s for s in plan.scans if s.protocol == entry.name and s.subject == subject
                 and s.repeat == 0 and records.get(s.recon_key, {}).get("status") == "done"]
        if not scans:
            continue
        arms = sorted({s.arm for s in scans})
        sites = list(dict.fromkeys(s.site for s in scans))
        fig, axes = plt.subplots(len(arms), len(sites), squeeze=False, layout="constrained",
                                 figsize=(2.2 * len(sites), 2.7 * len(arms)))
        name = "map.nii.gz" if entry.maps != "none" else "image.nii.gz"
        vmax = None
        sampled = measurable_range_ms(load_protocol(study.protocol_path(entry)), entry.maps)
        if sampled is not None:  # show the relaxation times the protocol can measure
            vmax = 1.5 * sampled[1]
        for scan in scans:
            img = np.asarray(nib.load(store.path("recon", scan.recon_key) / name).dataobj)
            img = img.reshape((*img.shape[:3], -1))[..., img.shape[2] // 2, 0] \
                if img.ndim >= 3 else img
            if vmax is None:
                vmax = float(np.nanpercentile(np.abs(img), 99.5)) or 1.0
            ax = axes[arms.index(scan.arm), sites.index(scan.site)]
            ax.imshow(np.rot90(np.abs(img)), cmap="gray" if entry.maps == "none" else "magma",
                      vmin=0, vmax=vmax)
            ax.set_title(f"{scan.site}\n{scan.arm}", fontsize=7)
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        unit = {"t1": "T1 (ms)", "t2": "T2 (ms)", "adc": "ADC (mm²/s)"}.get(entry.maps, "")
        fig.suptitle(f"{entry.name} {unit}  (colour range 0–{vmax:.4g})", fontsize=9)
        path = _save_figure(fig, out_dir / "figures" / f"montage_{entry.name}.png")
        figures.append(path)
    return figures


def _cov_bars(cov: pd.DataFrame, arms: list[str], out_dir: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [c for c in cov.columns if c in arms]
    if cov.empty or not arms:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(cov)), 5.6))
    width = 0.8 / len(arms)
    x = np.arange(len(cov))
    for i, arm in enumerate(arms):
        ax.bar(x + i * width, cov[arm].to_numpy(float), width, label=arm)
    labels = list(cov.index)
    if "in TI/TE range" in cov.columns:  # mark what the protocol cannot measure
        labels = [name if ok else f"{name} [out of range]"
                  for name, ok in zip(cov.index, cov["in TI/TE range"], strict=True)]
    ax.set_xticks(x + 0.4 - width / 2, labels, rotation=90, fontsize=6)
    ax.set_ylabel("inter-site CoV (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = _save_figure(fig, out_dir / "figures" / "cov_per_feature.png")
    return path


def _findings(numbers: Mapping[str, Any]) -> str:
    arms = numbers["arms"]
    lines = []
    for arm, entry in arms.items():
        if entry.get("mean_cov_pct") is not None:
            text = f"Mean inter-site CoV, {arm}: {entry['mean_cov_pct']:.2f} %"
            if entry.get("mean_cov_pct_in_range") is not None:
                text += (f" over all regions, {entry['mean_cov_pct_in_range']:.2f} % over the "
                         "regions whose true T1/T2 lies within the TIs/TEs the protocol "
                         "samples")
            lines.append(text + ".")
    if "in_range_features" in numbers:
        lines.append(
            "Spheres whose reference T1 (T2) lies outside the protocol's inversion (echo) "
            "times cannot be measured by it; they are listed in the tables but left out of "
            "the in-range means and of the native/shared ratio.")
    fold = numbers.get("native_over_shared_cov_median")
    if fold is not None:
        lines.append(
            f"Median ratio of inter-site CoV, native / shared: {fold:.2f} "
            f"(the survey this project follows reports {SURVEY_FOLD:g}-fold better "
            "inter-scanner reproducibility for a shared Pulseq sequence in a phantom).")
        lines.append(
            "Why: in the shared arm every site plays the same RF pulses, spoilers, "
            "crushers and timing, so what remains between sites is hardware (B0 and B1+ "
            "non-uniformity, gradient errors, coils, noise) and field strength. In the "
            "native arm each vendor's pulse shape and time-bandwidth product change the "
            "slice profile, which biases T2 from multi-echo spin echoes through "
            "stimulated echoes and biases T1 through imperfect inversion; k-space "
            "filters and prescan normalisation add vendor-specific smoothing and "
            "intensity scaling. The simulated fold depends on how different the native "
            "flavours are (see each site's [native] table), and differences in field "
            "strength (1.5 T vs 3 T) remain in both arms because the phantom's true T1 "
            "and T2 depend on the field; the error table against the true values at "
            "each site's field separates the two.")
    for arm, entry in arms.items():
        sc = entry.get("site_classification")
        if sc:
            lines.append(
                f"Site classification ({arm}, {sc['n_splits']}-fold CV): accuracy "
                f"{sc['accuracy']:.2f} (chance {entry['chance']:.2f}).")
        sch = entry.get("site_classification_harmonized_in_cv")
        if sch:
            lines.append(
                f"Site classification with {sch['harmonizer']} fitted inside each fold: "
                f"accuracy {sch['accuracy']:.2f} (chance {entry['chance']:.2f}).")
        if entry.get("mean_icc2_1") is not None:
            lines.append(f"Mean ICC(2,1) across sites, {arm}: {entry['mean_icc2_1']:.3f}.")
        truth = numbers.get("truth_age_slope") or {}
        for column, slope in (entry.get("age_slope") or {}).items():
            true = _truth_for(column, truth)
            if slope is not None and np.isfinite(true):
                lines.append(f"Age slope of {_pretty(column)}, {arm}: {slope:.3g} per year "
                             f"(cohort truth {true:.3g}).")
    return "\n\n".join(lines)


def write_study_report(study: Study, plan: Plan, store: TaskStore,
                       records: Mapping[str, Mapping[str, Any]], out_dir: Path,
                       tidy: pd.DataFrame, wide: pd.DataFrame,
                       harmonized: Mapping[str, pd.DataFrame],
                       numbers: Mapping[str, Any]) -> Path:
    """Write ``report.html`` (figures under ``figures/``) and return its path."""
    from mrharmony.harmonize.plots import plot_pca, plot_site_boxplots
    from mrharmony.harmonize.report import ReportSection, write_html_report

    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    status = pd.Series([r.get("status") for r in records.values()]).value_counts()
    overview = pd.DataFrame({
        "item": ["scans planned", "sites", "arms", "protocols", "tasks done", "tasks failed",
                 "tasks skipped"],
        "value": [len(plan.scans), len(study.sites.names), ", ".join(study.sites.arms),
                  ", ".join(p.name for p in study.protocols), int(status.get("done", 0)),
                  int(status.get("failed", 0)), int(status.get("skipped", 0))],
    })
    sections = [ReportSection("Study", text=study.study.description,
                              tables={"Overview": overview})]
    if numbers.get("recon_flavours"):
        sections.append(_recon_section(numbers, plan, out_dir))
    cov = _cov_table(numbers)
    bars = _cov_bars(cov, list(numbers["arms"]), out_dir)
    mean_cov = pd.DataFrame({"arm": list(numbers["arms"]),
                             "mean CoV (%)": [e.get("mean_cov_pct")
                                              for e in numbers["arms"].values()]})
    if "in_range_features" in numbers:
        mean_cov["mean CoV, in TI/TE range (%)"] = [
            e.get("mean_cov_pct_in_range") for e in numbers["arms"].values()]
    tables = {"Mean inter-site CoV (%) per arm": mean_cov,
              "Inter-site coefficient of variation (%) per feature": cov}
    sections.append(ReportSection("Findings", text=_findings(numbers)))
    accuracy = _accuracy_table(numbers)
    if accuracy is not None:
        figure = _accuracy_figure(numbers, out_dir)
        sections.append(ReportSection(
            "Accuracy against the phantom's reference values",
            text=" ".join(_accuracy_findings(numbers)) + " A site that agrees with the others "
            "but not with the truth is reproducible, not accurate: a study must recover the "
            "phantom's values before its site comparison means anything.",
            tables={"Error against the reference value at each site's field": accuracy},
            figures=[figure] if figure else []))
    if numbers.get("biology"):
        sections.append(_biology_section(numbers, out_dir))
    sections.append(ReportSection("Reproducibility across sites", tables=tables,
                                  figures=[bars] if bars else []))
    convergence = _convergence_section(plan, records, study)
    if convergence is not None:
        sections.append(convergence)
    montages = _montage(plan, store, records, study, out_dir)
    if montages:
        sections.append(ReportSection("Maps and images per site", figures=montages))
    figures = []
    h_arm = study.harmonize.arm
    for name, table in harmonized.items():
        feats = _feature_cols(table)
        before = wide[wide["arm"] == h_arm].reset_index(drop=True)
        tag = name.replace("+", "_")
        figures.append(plot_site_boxplots(before[feats], before["site"],
                                          fig_dir / f"boxplots_{tag}.png",
                                          after=table[feats], force=True))
        if len(feats) >= 2 and len(table) >= 3:
            figures.append(plot_pca(before[feats], before["site"], fig_dir / f"pca_{tag}.png",
                                    after=table[feats], force=True))
    if figures:
        text = ("Per-site boxplots and the first two principal components of the "
                "standardised features before and after each harmonizer.")
        if wide["subject"].nunique() == 1:
            text += (" With a single object (one phantom) scanned everywhere, a harmonizer "
                     "such as ComBat makes the sites agree by construction: it estimates each "
                     "site's offset from that object and removes it. That is a calibration "
                     "to the object, not evidence that site effects can be removed from "
                     "other subjects.")
        sections.append(ReportSection("Harmonization", text=text, figures=figures))
    traveling = _traveling_tables(numbers)
    if traveling:
        sections.append(ReportSection("Traveling subjects", tables=traveling))
    failures = [r for r in records.values() if r.get("status") != "done"]
    if failures:
        sections.append(ReportSection("Failed tasks", tables={"Failures": pd.DataFrame(
            [{"task": r.get("label"), "status": r.get("status"), "error": r.get("error")}
             for r in failures])}))
    return write_html_report(out_dir / "report.html", f"Study: {study.study.name}", sections,
                             force=True)


#: A method keeps an effect when its mean absolute relative error on the primary effects is
#: at most this (the issue's "within 25 % of the true slope").
KEEPS_EFFECT_REL = 0.25


def _biology_answer(summary: Mapping[str, Any]) -> str:
    """One sentence per effect: which methods keep it, which do not (with the numbers)."""
    lines = []
    effects = sorted({e for per in summary["methods"].values() for e in per})
    for effect in effects:
        keep, lose = [], []
        for method, per in summary["methods"].items():
            entry = per.get(effect)
            if not entry or entry.get("bias") is None:
                continue
            cov = entry.get("coverage")
            text = (f"{method} (error {100 * entry['abs_error']:.0f} %, bias "
                    f"{100 * entry['bias']:+.0f} %, coverage {100 * cov:.0f} %)"
                    if cov is not None else method)
            (keep if entry["abs_error"] <= KEEPS_EFFECT_REL else lose).append(text)
        if keep or lose:
            lines.append(f"The {effect} effect is kept (mean absolute error within "
                         f"{100 * KEEPS_EFFECT_REL:.0f} % of the truth) by "
                         f"{', '.join(keep) or 'no method'}; not by "
                         f"{', '.join(lose) or 'any other method'}.")
        fprs = [f"{m} {100 * per[effect]['false_positive_rate']:.0f} %"
                for m, per in summary["methods"].items()
                if per.get(effect, {}).get("false_positive_rate") is not None]
        if fprs:
            lines.append(f"False-positive rate of the {effect} test on null features "
                         f"(p < 0.05): {', '.join(fprs)}.")
    lines.append(f"Model: {summary['model']}; {summary['reason']}. The truth is the same "
                 "fit on the phantoms' site-free values of the same subjects.")
    return " ".join(lines)


def _biology_figure(records: list[Mapping[str, Any]], out_dir: Path) -> Path | None:
    """Estimate with its 95 % CI against the truth, per method, for every scored effect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = pd.DataFrame(records)
    rec = rec[rec["kind"] != "weak"]
    panels = list(dict.fromkeys(zip(rec["effect"], rec["feature"], strict=True)))[:12]
    if not panels:
        return None
    methods = list(dict.fromkeys(rec["method"]))
    ncol = min(3, len(panels))
    nrow = int(np.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.0 * nrow), squeeze=False)
    for ax, (effect, feature) in zip(axes.ravel(), panels, strict=False):
        rows = rec[(rec["effect"] == effect) & (rec["feature"] == feature)].set_index("method")
        x = np.arange(len(methods))
        est = rows.reindex(methods)["estimate"].to_numpy(float)
        lo = rows.reindex(methods)["ci_low"].to_numpy(float)
        hi = rows.reindex(methods)["ci_high"].to_numpy(float)
        ax.errorbar(x, est, yerr=[est - lo, hi - est], fmt="o", capsize=3)
        ax.axhline(float(rows["true"].iloc[0]), color="k", ls="--", lw=1, label="truth")
        ax.set_xticks(x, methods, rotation=30, fontsize=7)
        ax.set_title(f"{effect}: {_pretty(feature)}", fontsize=8)
        ax.legend(fontsize=6)
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    path = _save_figure(fig, out_dir / "figures" / "biology.png")
    return path


def _biology_section(numbers: Mapping[str, Any], out_dir: Path) -> Any:
    """Biology: which methods keep each true effect, the numbers and the figure."""
    from mrharmony.harmonize.report import ReportSection

    summary = numbers["biology_summary"]
    table = pd.DataFrame([{"method": m, "effect": e, **v}
                          for m, per in summary["methods"].items() for e, v in per.items()])
    rec = pd.DataFrame(numbers["biology"])
    rec["feature"] = rec["feature"].map(_pretty)
    figure = _biology_figure(numbers["biology"], out_dir)
    return ReportSection(
        "Biology", text=_biology_answer(summary),
        tables={"Per method and effect (bias: mean relative error of the primary effects, "
                "abs_error: its mean absolute value; coverage: truth inside the 95 % CI)":
                    table,
                "True effect against its estimate (per year of age; patient minus control)":
                    rec},
        figures=[figure] if figure else [])


def _recon_section(numbers: Mapping[str, Any], plan: Plan, out_dir: Path) -> Any:
    """The harmonized-reconstruction answer: per feature, the inter-site CoV of each recon
    flavour against the one shared recon of the same raw data, a figure, and the recon
    every site got in every arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mrharmony.harmonize.report import ReportSection

    flavours = numbers["recon_flavours"]
    lines, tables = [], {}
    ref = next(iter(flavours.values()))["reference"]
    table = pd.DataFrame({f"{ref} (shared recon)": pd.Series(
        next(iter(flavours.values()))["reference_cov_pct"], dtype=float)})
    for arm, entry in flavours.items():
        table[arm] = pd.Series(entry["cov_pct"], dtype=float)
        table[f"{arm} − {entry['reference']} (pp)"] = pd.Series(entry["added_cov_pct"],
                                                                  dtype=float)
        if entry["median_added_cov_pct"] is not None:
            ref_mean = np.nanmedian(list(entry["reference_cov_pct"].values()))
            arm_mean = np.nanmedian(list(entry["cov_pct"].values()))
            lines.append(
                f"Same raw data ({entry['acquisition']} acquisition), reconstructed per site "
                f"as '{arm}' vs one shared recon '{entry['reference']}': median inter-site "
                f"CoV {arm_mean:.2f} % vs {ref_mean:.2f} %; the recon choices of '{arm}' add "
                f"a median {entry['median_added_cov_pct']:+.2f} percentage points per "
                f"feature (median ratio {entry['median_ratio']:.2f}).")
    lines.append("The raw data are the same files in every arm (one simulate task per "
                 "scan), so every difference between these columns is the reconstruction's.")
    table.index = [_pretty(c) for c in table.index]
    tables["Inter-site CoV (%) per feature: recon flavours vs the shared recon"] = table
    rows = []
    for spec in plan.specs:
        if spec.stage != "recon":
            continue
        scan = next((sc for sc in plan.scans if sc.recon_key == spec.key), None)
        if scan is None:
            continue
        rows.append({"arm": scan.arm, "site": scan.site,
                     **{k: v for k, v in spec.params.items() if k != "maps"}})
    if rows:
        recon_table = pd.DataFrame(rows).drop_duplicates().fillna("default")
        tables["Recon of every site in every arm (unset: the recon's default)"] = \
            recon_table.sort_values(["arm", "site"]).reset_index(drop=True)
    cols = [c for c in table.columns if "(pp)" not in c]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(table)), 5.2))
    width = 0.8 / len(cols)
    x = np.arange(len(table))
    for i, col in enumerate(cols):
        ax.bar(x + i * width, table[col].to_numpy(float), width, label=col)
    ax.set_xticks(x + 0.4 - width / 2, list(table.index), rotation=90, fontsize=6)
    ax.set_ylabel("inter-site CoV (%)")
    ax.set_title("Same raw data: per-site recon flavours vs one shared recon", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = _save_figure(fig, out_dir / "figures" / "cov_recon_flavours.png")
    return ReportSection("Harmonized reconstruction", text="\n\n".join(lines),
                         tables=tables, figures=[path])


def _truth_for(column: str, truth: Mapping[str, Any]) -> float:
    """The cohort's true age slope for a feature column, when the cohort states one.

    ``<protocol>__segmentation__gm__volume_ml`` matches the truth key ``gm_volume_ml``.
    """
    parts = column.split("__")
    if len(parts) == 4:
        value = truth.get(f"{parts[2]}_{parts[3]}")
        if value is not None:
            return float(value)
    return float("nan")


def _traveling_tables(numbers: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    out: dict[str, pd.DataFrame] = {}
    rows = []
    for arm, entry in numbers["arms"].items():
        for key, label in (("site_classification", "as given"),
                           ("site_classification_harmonized_in_cv", "harmonizer in CV")):
            if key in entry:
                sc = entry[key]
                rows.append({"arm": arm, "protocol": label, "accuracy": sc["accuracy"],
                             "balanced accuracy": sc["balanced_accuracy"],
                             "chance": entry["chance"], "p (permutation)": sc["p_value"]})
    if rows:
        out["Site classification (cross-validated)"] = pd.DataFrame(rows)
    icc = {arm: pd.Series(e["icc"]["icc2_1"], dtype=float)
           for arm, e in numbers["arms"].items() if "icc" in e}
    if icc:
        table = pd.DataFrame(icc)
        table.index = [_pretty(c) for c in table.index]
        out["ICC(2,1) across sites"] = table
    slopes = {arm: pd.Series(e["age_slope"], dtype=float)
              for arm, e in numbers["arms"].items() if "age_slope" in e}
    if slopes:
        table = pd.DataFrame(slopes)
        if numbers.get("truth_age_slope"):
            table["truth"] = [_truth_for(c, numbers["truth_age_slope"]) for c in table.index]
        table.index = [_pretty(c) for c in table.index]
        out["Age effect per year (OLS), against the cohort's ground truth"] = table
    return out
