"""``mrharmony study``: run and check multi-site studies."""

from __future__ import annotations

import logging
from pathlib import Path

import click

__all__ = ["study"]


@click.group()
def study() -> None:
    """Run multi-site reproducibility studies end to end (locally or on a Dask cluster)."""


@study.command("run")
@click.argument("study_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (BIDS-like tree, features.csv, report.html).")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Existing Dask scheduler, e.g. tcp://host:8786 (default: local cluster).")
@click.option("--workers", type=click.IntRange(1, 1024), default=None,
              help="Worker processes of the local cluster (default: one per core).")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Threads per task for numerical work.")
@click.option("--resume", is_flag=True, help="Reuse finished tasks of a previous run.")
@click.option("--force", is_flag=True, help="Discard a previous run in the output folder.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def study_run(study_file: Path, output: Path, scheduler: str | None, workers: int | None,
              threads: int, resume: bool, force: bool, quiet: bool) -> None:
    """Run STUDY_FILE: sequences, simulation, recon, features, harmonization, report."""
    from rich.console import Console

    from mrharmony.study.runner import run_study

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run_study(study_file, output, scheduler=scheduler, workers=workers,
                       threads_per_task=threads, resume=resume, force=force,
                       progress=not quiet)
    console = Console(highlight=False)
    console.print(f"tasks: {result.ran} ran, {result.cached} reused, {result.failed} failed, "
                  f"{result.skipped} skipped")
    times = ", ".join(f"{k} {v:.1f} s" for k, v in result.stage_seconds.items())
    console.print(f"time: {times}")
    if result.report is not None:
        console.print(f"report: {result.report}")
    if result.failed or result.skipped:
        console.print(f"failures are listed in {output / '.mrharmony' / 'failures.json'}")
        raise SystemExit(1)


@study.command("check")
@click.argument("study_file", type=click.Path(dir_okay=False, path_type=Path))
def study_check(study_file: Path) -> None:
    """Validate STUDY_FILE (sites, protocols on every scanner, phantoms) without running it."""
    from mrharmony.study.config import load_study
    from mrharmony.study.plan import plan_tasks, preflight

    s = load_study(study_file)
    plan = plan_tasks(s, preflight(s))
    stages: dict[str, int] = {}
    for spec in plan.specs:
        stages[spec.stage] = stages.get(spec.stage, 0) + 1
    click.echo(f"{study_file}: ok; {len(plan.scans)} scans, tasks: "
               + ", ".join(f"{k} {v}" for k, v in stages.items()))
