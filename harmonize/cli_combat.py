"""``mrharmony harmonize combat`` and ``mrharmony harmonize apply``: feature tables.

A feature table is a wide CSV: one row per scan, a batch (site) column, covariate
columns, optional identifier columns and numeric feature columns. Feature columns are,
unless ``--features`` lists them, every numeric column that is not the batch, a covariate
or an identifier; other columns are copied to the output unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mrharmony.errors import HarmonizeError
from mrharmony.harmonize.cli import read_table, split_names
from mrharmony.harmonize.registry import feature_harmonizers, make_harmonizer

__all__ = ["apply", "combat"]

_METHODS = feature_harmonizers(family="combat")
_MODES = {"covbat": ("reference", "pooled"), "longitudinal": ("reference", "moments")}


def _require(table: Any, columns: list[str], path: Path, what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise HarmonizeError(f"{path}: {what} column(s) {missing} not in the table "
                             f"(columns: {list(table.columns)[:12]})")


def _labels(table: Any, column: str, path: Path, what: str) -> Any:
    """A label column (read as text) as a string array; empty cells are refused."""
    values = table[column]
    empty = values.isna() | (values.astype(str).str.strip() == "")
    if empty.any():
        rows = [int(i) + 2 for i in values.index[empty][:5]]  # CSV line numbers
        raise HarmonizeError(f"{path}: {what} column {column!r} is empty on line(s) {rows} "
                             f"({int(empty.sum())} in all); every scan needs a {what}")
    return values.astype(str).str.strip().to_numpy()


def _check_numeric(table: Any, columns: list[str], path: Path) -> None:
    """Refuse feature columns with cells that are not numbers (a silent skip otherwise)."""
    import pandas as pd

    for c in columns:
        col = table[c]
        if pd.api.types.is_numeric_dtype(col):
            continue
        numbers = pd.to_numeric(col, errors="coerce")
        bad = numbers.isna() & col.notna()
        rows = [int(i) + 2 for i in col.index[bad][:5]]
        raise HarmonizeError(f"{path}: feature column {c!r} has non-numeric cells "
                             f"{list(col[bad].astype(str)[:5])} on line(s) {rows}; fix them "
                             "or leave them empty (missing values are allowed)")


def _feature_columns(table: Any, used: list[str], features: list[str], path: Path) -> list[str]:
    import pandas as pd

    if features:
        _require(table, features, path, "feature")
        _check_numeric(table, features, path)
        return features
    cols = []
    for c in table.columns:
        if c in used:
            continue
        if pd.api.types.is_numeric_dtype(table[c]):
            cols.append(c)
            continue
        numbers = pd.to_numeric(table[c], errors="coerce")
        if numbers.notna().sum() > 0.5 * table[c].notna().sum():
            _check_numeric(table, [c], path)  # a numeric column with a few bad cells
    if not cols:
        raise HarmonizeError("no numeric feature columns left after removing batch, "
                             f"covariate and id columns {used}")
    return cols


def _write_table(table: Any, output: Path, force: bool) -> None:
    from mrharmony.fileio import atomic_path

    if output.exists() and not force:
        raise FileExistsError(f"{output}: exists (use --force to replace it)")
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output, suffix=".tmp") as tmp, open(tmp, "w", newline="") as fh:
        table.to_csv(fh, index=False, float_format="%.17g")


def _make_model(method: str, options: dict[str, Any], smooth: list[str],
                mode: str | None = None) -> Any:
    if mode is not None:
        if method not in _MODES:
            raise HarmonizeError(f"--mode: only for --method covbat or longitudinal, not "
                                 f"{method!r}")
        if mode not in _MODES[method]:
            raise HarmonizeError(f"--mode {mode}: not a mode of --method {method} "
                                 f"(one of {', '.join(_MODES[method])})")
        options = {**options, "mode": mode}
    if method == "gam":
        options = {**options, "smooth": smooth or ("age",)}
    return make_harmonizer(method, **options)


@click.command("combat")
@click.argument("features_csv", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch", "batch_col", required=True, help="Batch (site/scanner) column.")
@click.option("--covariates", default="", help="Comma-separated covariates to preserve.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Harmonized CSV.")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also save the fitted model here (for `harmonize apply`).")
@click.option("--method", type=click.Choice(_METHODS), default="combat", show_default=True)
@click.option("--mode", type=click.Choice(("reference", "pooled", "moments")), default=None,
              help="Estimator of --method covbat/longitudinal (recorded in --model). "
              "reference (default): the authors' algorithm (covbat: R CovBat/covbat.py, "
              "residuals scaled by their own SD before the PCA, the first PCs whose "
              "cumulative variance exceeds 95 %; longitudinal: longCombat, one REML mixed "
              "model per feature). pooled (covbat variant): residuals scaled by the ComBat "
              "pooled SD, PCs until the cumulative variance reaches 95 %. moments "
              "(longitudinal variant): vectorised moment estimator of the variance "
              "components, fast for many features, differs from longCombat.")
@click.option("--ref-batch", default=None, help="Reference batch (returned unchanged).")
@click.option("--nonparametric", is_flag=True, help="Non-parametric empirical Bayes.")
@click.option("--no-eb", is_flag=True, help="No empirical Bayes shrinkage.")
@click.option("--mean-only", is_flag=True, help="Adjust batch means only.")
@click.option("--categorical", default="", help="Numeric covariates to treat as categorical.")
@click.option("--smooth", default="", help="Spline covariates for --method gam (default age).")
@click.option("--subject", "subject_col", default="subject", show_default=True,
              help="Subject id column (required by --method longitudinal; never a feature).")
@click.option("--features", default="", help="Comma-separated feature columns (default: "
              "all other numeric columns).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
def combat(features_csv: Path, batch_col: str, covariates: str, output: Path,
           model_path: Path | None, method: str, ref_batch: str | None, nonparametric: bool,
           no_eb: bool, mean_only: bool, categorical: str, smooth: str, subject_col: str,
           features: str, force: bool, mode: str | None = None) -> None:
    """Fit ComBat (or a variant) on FEATURES_CSV and write the harmonized table."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    for path in [output] + ([model_path] if model_path else []):
        if path.exists() and not force:
            raise FileExistsError(f"{path}: exists (use --force to replace it)")
    table = read_table(features_csv, text_columns=[batch_col, subject_col])
    cov_cols = split_names(covariates)
    _require(table, [batch_col, *cov_cols], features_csv, "batch/covariate")
    ids = [subject_col] if subject_col in table.columns else []
    feats = _feature_columns(table, [batch_col, *cov_cols, *ids], split_names(features),
                             features_csv)
    batch = _labels(table, batch_col, features_csv, "batch")
    if ref_batch is not None and ref_batch not in set(batch):
        raise HarmonizeError(f"--ref-batch: {ref_batch!r} is not a value of {batch_col!r}")
    options = {"parametric": not nonparametric, "eb": not no_eb, "mean_only": mean_only,
               "ref_batch": ref_batch, "categorical": split_names(categorical)}
    model = _make_model(method, options, split_names(smooth), mode)
    cov = table[cov_cols] if cov_cols else None
    kwargs: dict[str, Any] = {}
    if method == "longitudinal":
        if not ids:
            raise HarmonizeError(f"--method longitudinal: subject column {subject_col!r} "
                                 "not in the table")
        kwargs["subject"] = _labels(table, subject_col, features_csv, "subject")
    with console.status(f"fitting {model.model_kind} on {len(table)} scans x "
                        f"{len(feats)} features"):
        harmonized = model.fit(table[feats], batch, cov, **kwargs).transform(
            table[feats], batch, cov, **kwargs)
    out = table.copy()
    out[feats] = harmonized.to_numpy()
    # the model first: if it cannot be written, neither is the table (no half result)
    if model_path is not None:
        extra = {"batch_column": batch_col, "covariate_columns": cov_cols,
                 "feature_columns": feats, "subject_column": subject_col if ids else None}
        try:
            model.save(model_path, force=force, extra=extra)
        except OSError as exc:
            raise HarmonizeError(f"{model_path}: cannot write the model "
                                 f"({exc.strerror or exc})") from exc
    try:
        _write_table(out, output, force)
    except BaseException:
        if model_path is not None:
            model_path.unlink(missing_ok=True)
        raise
    kind = model.model_kind + (f", mode {model.mode}" if hasattr(model, "mode") else "")
    console.print(f"wrote {output}: {len(table)} scans, {len(feats)} features, "
                  f"{len(model.batches_)} batches ({kind})")
    if model_path is not None:
        console.print(f"wrote {model_path}")


@click.command("apply")
@click.argument("model_path", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path),
              help="Harmonized CSV; for a learned image model a NIfTI file (one input) or "
              "a folder.")
@click.option("--site", default=None, help="Learned image models: the site the images "
              "come from.")
@click.option("--target", default=None, help="Learned image models that harmonize to any "
              "training site (mispel, calamiti): the target site (default: the model's).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def apply(model_path: Path, inputs: tuple[Path, ...], output: Path, site: str | None,
          target: str | None, force: bool) -> None:
    """Apply a saved MODEL to new data: a ComBat-family model file or a learned model
    folder (`harmonize train`) to a feature CSV, or a learned image model to NIfTI images.
    ComBat models use the scans' own covariates."""
    from rich.console import Console

    from mrharmony.harmonize.model_io import load_model, read_metadata

    if model_path.is_dir():  # a learned model folder
        from mrharmony.harmonize.cli_learn import apply_learned

        apply_learned(model_path, inputs, output, site, target, force)
        return
    if len(inputs) != 1:
        raise HarmonizeError(f"{model_path}: a ComBat-family model harmonizes one feature "
                             f"CSV ({len(inputs)} given)")
    features_csv = inputs[0]
    console = Console(stderr=True, highlight=False)
    if output.exists() and not force:
        raise FileExistsError(f"{output}: exists (use --force to replace it)")
    extra = read_metadata(model_path).get("extra", {})
    if "batch_column" not in extra:
        raise HarmonizeError(f"{model_path}: no column names stored (save it with "
                             "`harmonize combat --model`)")
    model = load_model(model_path)
    table = read_table(features_csv, text_columns=[extra["batch_column"],
                                                   extra.get("subject_column") or ""])
    cov_cols = extra["covariate_columns"]
    feats = extra["feature_columns"]
    _require(table, [extra["batch_column"], *cov_cols, *feats], features_csv, "model")
    _check_numeric(table, feats, features_csv)
    batch = _labels(table, extra["batch_column"], features_csv, "batch")
    kwargs: dict[str, Any] = {}
    if model.model_kind == "LongitudinalComBat":
        _require(table, [extra["subject_column"]], features_csv, "subject")
        kwargs["subject"] = _labels(table, extra["subject_column"], features_csv, "subject")
    with console.status(f"applying {model.model_kind} to {len(table)} scans"):
        harmonized = model.transform(table[feats], batch,
                                     table[cov_cols] if cov_cols else None, **kwargs)
    out = table.copy()
    out[feats] = harmonized.to_numpy()
    _write_table(out, output, force)
    console.print(f"wrote {output}: {len(table)} scans harmonized with {model_path}")
