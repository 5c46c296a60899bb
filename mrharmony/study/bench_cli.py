"""``mrharmony bench``: every harmonizer on named scenarios with known biology.

\b
mrharmony bench --quick -o out/bench
mrharmony bench --quick --scenarios traveling,confounded-age --methods raw,combat -o out/b
mrharmony bench -o out/bench-full --seed 1 --force
"""

from __future__ import annotations

import time
from pathlib import Path

import click

__all__ = ["bench"]


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    return names or None


@click.command("bench")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (leaderboard.json/.csv, biology.json, index.html, PNGs).")
@click.option("--quick", is_flag=True,
              help="Small cohorts at 4 mm (minutes on 2 cores); default: the full sizes.")
@click.option("--scenarios", default=None,
              help="Comma-separated scenarios (default: all): traveling, confounded-age, "
                   "confounded-diagnosis, imbalanced, null-effect, unseen-site, "
                   "image-translation (learned and classical image methods, hallucination "
                   "test).")
@click.option("--methods", default=None,
              help="Comma-separated methods (default: all, raw and raw-image included).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of cohorts, scenario draws, site effects and CV folds.")
@click.option("--cache", "cache_dir", type=click.Path(path_type=Path), default=None,
              help="Cache of the generated cohorts (default: ~/.cache/mrharmony/bench).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def bench(out_dir: Path, quick: bool, scenarios: str | None, methods: str | None, seed: int,
          cache_dir: Path | None, force: bool) -> None:
    """Benchmark every harmonizer: site removal and biology preservation side by side."""
    from mrharmony.errors import StudyError
    from mrharmony.study.bench import run_bench
    from mrharmony.study.bench_report import image_verdicts, verdicts, write_bench

    if out_dir.exists() and not force:
        raise StudyError(f"{out_dir}: exists (use --force to replace it)")
    t0 = time.perf_counter()
    result = run_bench(scenarios=_names(scenarios), methods=_names(methods), seed=seed,
                       quick=quick, cache_dir=cache_dir, progress=True)
    write_bench(result, out_dir, force=force)
    n_ok = sum(r["status"] == "ok" for r in result.leaderboard)
    click.echo(f"{len(result.leaderboard)} records ({n_ok} ok) in "
               f"{time.perf_counter() - t0:.0f} s -> {out_dir}/index.html")
    for scenario, v in verdicts(result.leaderboard).items():
        click.echo(f"  {scenario}: removes site and keeps biology: "
                   f"{', '.join(v['both']) or 'none'}")
    iv = image_verdicts(result.leaderboard)
    if iv["ranking"]:
        click.echo("  image-translation: SSIM ranking "
                   + ", ".join(f"{m} {s:.3f}" for m, s in iv["ranking"])
                   + f"; hallucination test failed: {', '.join(iv['hallucinate']) or 'none'}")
