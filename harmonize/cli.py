"""``mrharmony harmonize``: feature-level (ComBat family) and image-level harmonization."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mrharmony.cliutil import LazyGroup
from mrharmony.errors import HarmonizeError

__all__ = ["harmonize", "read_table", "split_names"]


@click.group(cls=LazyGroup, lazy_commands={
    "combat": "mrharmony.harmonize.cli_combat:combat",
    "apply": "mrharmony.harmonize.cli_combat:apply",
    "image": "mrharmony.harmonize.cli_eval:image",
    "train": "mrharmony.harmonize.cli_learn:train",
    # simulation and recon are higher layers: the dataset builder is in the study layer
    "dataset": "mrharmony.study.dataset_cli:dataset",
})
def harmonize() -> None:
    """Harmonize feature tables (ComBat family) or images (intensity normalisation); train and
    apply learned harmonizers (dataset, train, apply)."""


def split_names(text: str | None) -> list[str]:
    """Column names from a comma-separated option value (``"age, sex"`` -> [age, sex])."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def read_table(path: Path, *, text_columns: list[str] | tuple[str, ...] = ()) -> Any:
    """Read a feature table (CSV) given on the command line.

    Parameters
    ----------
    path : Path
        The CSV file.
    text_columns : list of str
        Columns read as text, never as numbers (batch and subject labels: ``1`` stays
        ``"1"``, not ``1.0``); absent names are ignored.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    HarmonizeError
        If it is not a readable CSV.
    """
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such feature table")
    try:
        return pd.read_csv(path, dtype=dict.fromkeys(text_columns, str))
    except (ValueError, pd.errors.ParserError) as exc:
        raise HarmonizeError(f"{path}: unreadable CSV ({exc})") from exc
