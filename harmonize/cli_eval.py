"""``mrharmony harmonize image`` and ``mrharmony evaluate``.

``harmonize image METHOD IMAGES... -o DIR`` writes one harmonized NIfTI per input into
DIR (same file names; voxels outside the mask unchanged). ``evaluate BEFORE.csv
AFTER.csv --batch site -o REPORT_DIR`` writes the evaluation tables (CSV), figures (PNG)
and a self-contained ``report.html``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mrharmony.errors import HarmonizeError
from mrharmony.fileio import atomic_path
from mrharmony.harmonize.cli import read_table, split_names
from mrharmony.harmonize.registry import feature_harmonizers, harmonizer_class, image_harmonizers

__all__ = ["evaluate", "image"]

IMAGE_METHODS = image_harmonizers()
#: Harmonizers refitted inside the site classifier's folds ("none": skip that row).
HARMONIZERS = (*feature_harmonizers(cross_sectional=True), "none")


def _load_nifti(path: Path) -> Any:
    import nibabel as nib

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image")
    try:
        return nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise HarmonizeError(f"{path}: not a readable NIfTI image ({exc})") from exc


def _save_nifti(img: Any, path: Path) -> None:
    from mrharmony.formats.nifti import save_nifti

    save_nifti(img, path, force=True)


@click.command("image")
@click.argument("method", type=click.Choice(IMAGE_METHODS))
@click.argument("images", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (one image per input, same file name).")
@click.option("--mask", "-m", "masks", multiple=True, type=click.Path(dir_okay=False,
              path_type=Path), help="Brain mask: one for all images, or one per image "
              "(repeat). Default: non-zero voxels.")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="histogram: the reference image.")
@click.option("--reference-mask", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="histogram: mask of the reference image.")
@click.option("--modality", type=click.Choice(["t1", "t2", "flair", "pd"]), default="t1",
              show_default=True, help="whitestripe: contrast (selects the WM peak).")
@click.option("--width", type=click.FloatRange(0, 0.5, min_open=True, max_open=True),
              default=0.05, show_default=True, help="whitestripe: half-width (quantile).")
@click.option("--landmarks", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="nyul: apply these saved landmarks instead of learning them "
                   "(learnt landmarks are saved as OUTPUT/nyul_landmarks.json).")
@click.option("--control-mask", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ravel: control-voxel (CSF) mask on the common grid.")
@click.option("--factors", type=click.IntRange(1), default=1, show_default=True,
              help="ravel: number of unwanted factors.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
def image(method: str, images: tuple[Path, ...], output: Path, masks: tuple[Path, ...],
          reference: Path | None, reference_mask: Path | None, modality: str, width: float,
          landmarks: Path | None, control_mask: Path | None, factors: int,
          force: bool) -> None:
    """Intensity-harmonize IMAGES (NIfTI) with METHOD; write them to OUTPUT.

    \b
    zscore       (x - mean) / sd in the mask
    histogram    quantile-match every image to --reference
    nyul         learn Nyúl landmarks from IMAGES (or apply --landmarks)
    whitestripe  WhiteStripe with --modality, --width
    ravel        RAVEL on a common grid with --control-mask, --factors
    """
    from rich.progress import track

    from mrharmony.harmonize import image as im

    names = [p.name for p in images]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise HarmonizeError(f"images: file names {dup} repeat; outputs would collide")
    if len(masks) not in (0, 1, len(images)):
        raise HarmonizeError(f"--mask: {len(masks)} masks for {len(images)} images "
                             "(give 0, 1 or one per image)")
    targets = [output / n for n in names]
    extra = [output / "nyul_landmarks.json"] if method == "nyul" and landmarks is None else []
    existing = [str(t) for t in targets + extra if t.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]}: exists (use --force to replace "
                              f"{len(existing)} output(s))")
    if method == "histogram" and reference is None:
        raise HarmonizeError("histogram: --reference is required")
    if method == "ravel" and control_mask is None:
        raise HarmonizeError("ravel: --control-mask is required")
    imgs = [_load_nifti(p) for p in images]
    mask_imgs = [_load_nifti(p) for p in masks]
    per_mask = (mask_imgs * len(imgs) if len(mask_imgs) == 1 else mask_imgs) or [None] * len(imgs)
    output.mkdir(parents=True, exist_ok=True)

    if method == "ravel":
        out_imgs = im.Ravel(n_factors=factors).fit_transform(
            imgs, mask=per_mask[0] if per_mask[0] is not None else (imgs[0].get_fdata() != 0),
            control_mask=_load_nifti(control_mask))
    else:
        if method == "nyul":
            if landmarks is not None:
                nyul = im.NyulNormalizer.load(landmarks)
            else:
                nyul = im.NyulNormalizer().fit(imgs, per_mask)
                nyul.save(output / "nyul_landmarks.json", force=force)
        ref = _load_nifti(reference) if reference is not None else None
        ref_mask = _load_nifti(reference_mask) if reference_mask is not None else None
        out_imgs = []
        for img, m in track(list(zip(imgs, per_mask, strict=True)), description=method,
                            transient=True):
            if method == "zscore":
                out_imgs.append(im.zscore(img, mask=m))
            elif method == "histogram":
                out_imgs.append(im.match_histogram(img, ref, mask=m, reference_mask=ref_mask))
            elif method == "nyul":
                out_imgs.append(nyul.transform(img, mask=m))
            else:
                out_imgs.append(im.whitestripe(img, mask=m, modality=modality, width=width))
    for img, target in zip(out_imgs, targets, strict=True):
        _save_nifti(img, target)
    click.echo(f"wrote {len(targets)} {method}-harmonized image(s) to {output}")


def _write_csv(table: Any, path: Path, *, index: bool) -> Path:
    with atomic_path(path, suffix=".tmp") as tmp, open(tmp, "w", newline="") as fh:
        table.to_csv(fh, index=index, float_format="%.10g")
    return path


def _harmonizer(name: str) -> Any:
    return None if name == "none" else harmonizer_class(name)


@click.command("evaluate")
@click.argument("before", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("after", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch", required=True, help="Site (batch) column.")
@click.option("--covariates", default="", help="Comma-separated covariate columns "
              "(numeric ones are tested for preserved associations).")
@click.option("--subject", default="subject", show_default=True,
              help="Subject column (traveling subjects enable ICC and Bland-Altman).")
@click.option("--truth", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV of true effects: a 'feature' column and one column per covariate.")
@click.option("--harmonizer", type=click.Choice(HARMONIZERS), default="combat",
              show_default=True, help="Harmonizer refitted inside each CV fold of the site "
              "classifier (on BEFORE); 'none' skips that row.")
@click.option("--classifier", type=click.Choice(["logistic", "random_forest"]),
              default="logistic", show_default=True)
@click.option("--folds", type=click.IntRange(2), default=5, show_default=True)
@click.option("--permutations", type=click.IntRange(0), default=100, show_default=True,
              help="Label permutations for the classifier p-value.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Report folder (tables, figures, report.html).")
@click.option("--force", is_flag=True, help="Overwrite an existing report.")
def evaluate(before: Path, after: Path, batch: str, covariates: str, subject: str,
             truth: Path | None, harmonizer: str, classifier: str, folds: int,
             permutations: int, seed: int, output: Path, force: bool) -> None:
    """Evaluate harmonization: BEFORE.csv and AFTER.csv hold the same scans, same order."""
    from rich.console import Console

    from mrharmony.harmonize import plots
    from mrharmony.harmonize.evaluate import evaluate_tables, feature_columns
    from mrharmony.harmonize.report import ReportSection, write_html_report

    report = output / "report.html"
    if report.exists() and not force:
        raise FileExistsError(f"{report}: exists (use --force to replace the report)")
    tb, ta = read_table(before), read_table(after)
    covs = split_names(covariates)
    truth_df = None
    if truth is not None:
        truth_df = read_table(truth)
        if "feature" not in truth_df.columns:
            raise HarmonizeError(f"{truth}: needs a 'feature' column")
        truth_df = truth_df.set_index("feature")
    console = Console(stderr=True)
    with console.status("evaluating (site classifier with permutations)..."):
        tables = evaluate_tables(tb, ta, batch=batch, covariates=covs, subject=subject,
                                 truth=truth_df, harmonizer=_harmonizer(harmonizer),
                                 classifier=classifier, n_splits=folds,
                                 n_permutations=permutations, seed=seed)
    output.mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        _write_csv(table, output / f"{name}.csv", index=name != "ks")
    feats = feature_columns(tb, [batch, subject, *covs])
    site = tb[batch].astype(str).to_numpy()
    figs = {
        "per-site boxplots": plots.plot_site_boxplots(tb[feats], site, output / "boxplots.png",
                                                      after=ta[feats], force=True),
        "PCA before/after": plots.plot_pca(tb[feats], site, output / "pca.png",
                                           after=ta[feats], force=True),
    }
    if "bland_altman" in tables:
        ba = tables["bland_altman"]
        first = ba.iloc[0]
        pairs = tb.assign(_f=ta[first.feature].to_numpy())
        a = pairs[pairs[batch].astype(str) == str(first.site_a)].set_index(subject)["_f"]
        b = pairs[pairs[batch].astype(str) == str(first.site_b)].set_index(subject)["_f"]
        common = a.index.intersection(b.index)
        figs[f"Bland-Altman {first.feature}, {first.site_a} - {first.site_b} (after)"] = (
            plots.plot_bland_altman(a[common], b[common], output / "bland_altman.png",
                                    label=f"{first.feature} (after)", force=True))
    text = ("Site discriminability: a classifier predicts the site from the features "
            f"({classifier}, {folds}-fold stratified CV, {permutations} permutations). "
            "The row 'before + harmonizer in CV' refits the harmonizer on each training "
            "fold only; the 'after table' row uses the harmonized table as given, which is "
            "optimistic when that table was harmonized on all scans at once.")
    sections = [ReportSection("Summary", tables={"summary": tables["summary"]}),
                ReportSection("Site discriminability", text=text,
                              tables={"classifier": tables["discriminability"]}),
                ReportSection("Site effects per feature",
                              text="ANOVA, Kruskal-Wallis, Levene and Bartlett per feature; "
                                   "KS: each site against all other sites pooled.",
                              tables={"tests": tables["site_tests"], "KS": tables["ks"],
                                      "CoV across sites (%)": tables["cov"]}),
                ReportSection("Figures", figures=figs)]
    for key, title in (("icc", "Reliability (traveling subjects): ICC"),
                       ("bland_altman", "Bland-Altman (traveling subjects)"),
                       ("associations", "Biological associations before/after")):
        if key in tables:
            sections.append(ReportSection(title, tables={key: tables[key]}))
    write_html_report(report, f"Harmonization evaluation: {after.name} vs {before.name}",
                      sections, force=True)
    summ = tables["summary"]["value"]
    click.echo(f"site accuracy before {summ['site accuracy before']:.3f}, after (table) "
               f"{summ['site accuracy after (table)']:.3f}"
               + (f", harmonizer in CV {summ['site accuracy, harmonizer in CV']:.3f}"
                  if "site accuracy, harmonizer in CV" in summ else "")
               + f" (chance {summ['chance accuracy']:.3f}); report: {report}")
