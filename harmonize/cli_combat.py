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

__all__ = ["apply", "combat"]

_METHODS = ("combat", "covbat", "gam", "longitudinal")


def _require(table: Any, columns: list[str], path: Path, what: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise HarmonizeError(f"{path}: {what} column(s) {missing} not in the table "
                             f"(columns: {list(table.columns)[:12]})")


def _feature_columns(table: Any, used: list[str], features: list[str]) -> list[str]:
    import pandas as pd

    if features:
        return features
    cols = [c for c in table.columns
            if c not in used and pd.api.types.is_numeric_dtype(table[c])]
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


def _make_model(method: str, options: dict[str, Any], smooth: list[str]) -> Any:
    from mrharmony.harmonize.combat import ComBat
    from mrharmony.harmonize.combat_variants import ComBatGAM, CovBat, LongitudinalComBat

    if method == "gam":
        return ComBatGAM(smooth=smooth or ("age",), **options)
    return {"combat": ComBat, "covbat": CovBat, "longitudinal": LongitudinalComBat}[method](
        **options)


@click.command("combat")
@click.argument("features_csv", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch", "batch_col", required=True, help="Batch (site/scanner) column.")
@click.option("--covariates", default="", help="Comma-separated covariates to preserve.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Harmonized CSV.")
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also save the fitted model here (for `harmonize apply`).")
@click.option("--method", type=click.Choice(_METHODS), default="combat", show_default=True)
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
           features: str, force: bool) -> None:
    """Fit ComBat (or a variant) on FEATURES_CSV and write the harmonized table."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    for path in [output] + ([model_path] if model_path else []):
        if path.exists() and not force:
            raise FileExistsError(f"{path}: exists (use --force to replace it)")
    table = read_table(features_csv)
    cov_cols = split_names(covariates)
    _require(table, [batch_col, *cov_cols], features_csv, "batch/covariate")
    ids = [subject_col] if subject_col in table.columns else []
    feats = _feature_columns(table, [batch_col, *cov_cols, *ids], split_names(features))
    _require(table, feats, features_csv, "feature")
    if ref_batch is not None and ref_batch not in set(table[batch_col].astype(str)):
        raise HarmonizeError(f"--ref-batch: {ref_batch!r} is not a value of {batch_col!r}")
    batch = table[batch_col].astype(str).to_numpy()
    options = {"parametric": not nonparametric, "eb": not no_eb, "mean_only": mean_only,
               "ref_batch": ref_batch, "categorical": split_names(categorical)}
    model = _make_model(method, options, split_names(smooth))
    cov = table[cov_cols] if cov_cols else None
    kwargs: dict[str, Any] = {}
    if method == "longitudinal":
        if not ids:
            raise HarmonizeError(f"--method longitudinal: subject column {subject_col!r} "
                                 "not in the table")
        kwargs["subject"] = table[subject_col].astype(str).to_numpy()
    with console.status(f"fitting {model.model_kind} on {len(table)} scans x "
                        f"{len(feats)} features"):
        harmonized = model.fit(table[feats], batch, cov, **kwargs).transform(
            table[feats], batch, cov, **kwargs)
    out = table.copy()
    out[feats] = harmonized.to_numpy()
    _write_table(out, output, force)
    console.print(f"wrote {output}: {len(table)} scans, {len(feats)} features, "
                  f"{len(model.batches_)} batches ({model.model_kind})")
    if model_path is not None:
        extra = {"batch_column": batch_col, "covariate_columns": cov_cols,
                 "feature_columns": feats, "subject_column": subject_col if ids else None}
        model.save(model_path, force=force, extra=extra)
        console.print(f"wrote {model_path}")


@click.command("apply")
@click.argument("model_path", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("features_csv", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Harmonized CSV.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def apply(model_path: Path, features_csv: Path, output: Path, force: bool) -> None:
    """Apply a saved MODEL to new scans of fitted sites (their own covariates are used)."""
    from rich.console import Console

    from mrharmony.harmonize.model_io import load_model, read_metadata

    console = Console(stderr=True, highlight=False)
    if output.exists() and not force:
        raise FileExistsError(f"{output}: exists (use --force to replace it)")
    extra = read_metadata(model_path).get("extra", {})
    if "batch_column" not in extra:
        raise HarmonizeError(f"{model_path}: no column names stored (save it with "
                             "`harmonize combat --model`)")
    model = load_model(model_path)
    table = read_table(features_csv)
    cov_cols = extra["covariate_columns"]
    feats = extra["feature_columns"]
    _require(table, [extra["batch_column"], *cov_cols, *feats], features_csv, "model")
    batch = table[extra["batch_column"]].astype(str).to_numpy()
    kwargs: dict[str, Any] = {}
    if model.model_kind == "LongitudinalComBat":
        _require(table, [extra["subject_column"]], features_csv, "subject")
        kwargs["subject"] = table[extra["subject_column"]].astype(str).to_numpy()
    with console.status(f"applying {model.model_kind} to {len(table)} scans"):
        harmonized = model.transform(table[feats], batch,
                                     table[cov_cols] if cov_cols else None, **kwargs)
    out = table.copy()
    out[feats] = harmonized.to_numpy()
    _write_table(out, output, force)
    console.print(f"wrote {output}: {len(table)} scans harmonized with {model_path}")
