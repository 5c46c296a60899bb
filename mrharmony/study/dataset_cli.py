"""``mrharmony harmonize dataset``: simulate training data for learned harmonizers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import click

__all__ = ["dataset"]


@click.command("dataset")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Dataset folder to create.")
@click.option("--quick", is_flag=True, help="64x64, 3 sites, 6 subjects, 1 slice (minutes).")
@click.option("--sites", default="", help="Comma-separated site presets or TOML files "
              "(default: siemens-prisma-3t, ge-premier-3t, philips-ingenia-1.5t"
              "[, siemens-freemax-0.55t without --quick]).")
@click.option("--subjects", type=int, default=None, help="Number of virtual subjects.")
@click.option("--matrix", type=int, default=None, help="In-plane matrix (32..128).")
@click.option("--slices", type=int, default=None, help="Axial slices per subject.")
@click.option("--contrasts", default="", help="Comma-separated: t1w, t2w (default both).")
@click.option("--isochromats", type=int, default=None, help="Isochromats per voxel.")
@click.option("--shared", is_flag=True, help="The same .seq at every site (default: each "
              "vendor's implementation of the protocols).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Replace an existing folder.")
def dataset(output: Path, quick: bool, sites: str, subjects: int | None, matrix: int | None,
            slices: int | None, contrasts: str, isochromats: int | None, shared: bool,
            seed: int, force: bool) -> None:
    """Simulate paired multi-site T1w/T2w slices of virtual traveling subjects, with truth."""
    import json

    from rich.console import Console

    from mrharmony.study.dataset import QUICK, DatasetConfig, build_dataset

    console = Console(stderr=True, highlight=False)
    base = QUICK if quick else DatasetConfig()
    changes: dict = {"seed": seed, "native": not shared}
    names = [s.strip() for s in sites.split(",") if s.strip()]
    if names:
        changes["sites"] = tuple(names)
    cons = [c.strip() for c in contrasts.split(",") if c.strip()]
    if cons:
        changes["contrasts"] = tuple(cons)
    for key, value in (("n_subjects", subjects), ("matrix", matrix), ("slices", slices),
                       ("isochromats_per_voxel", isochromats)):
        if value is not None:
            changes[key] = value
    config = replace(base, **changes)
    out = build_dataset(output, config, force=force, progress=True)
    info = json.loads((out / "dataset.json").read_text())
    t = info["timing"]
    console.print(f"wrote {out}: {t['images']} images, {len(info['sites'])} sites, "
                  f"splits {', '.join(f'{k} {len(v)}' for k, v in info['splits'].items())}"
                  f" subjects; {t['total_s']:.0f} s ({t['median_image_s']:.1f} s per image)")
