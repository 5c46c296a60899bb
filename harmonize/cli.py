"""``mrharmony harmonize``: feature-level (ComBat family) and image-level harmonization."""

from __future__ import annotations

import click

from mrharmony.cli import LazyGroup

__all__ = ["harmonize"]


@click.group(cls=LazyGroup, lazy_commands={
    "combat": "mrharmony.harmonize.cli_combat:combat",
    "apply": "mrharmony.harmonize.cli_combat:apply",
    "image": "mrharmony.harmonize.cli_eval:image",
})
def harmonize() -> None:
    """Harmonize feature tables (ComBat family) or images (intensity normalisation)."""
