"""``mrharmony validate``: the simulator against a real measurement.

\b
mrharmony validate meas.dat --seq meas.seq -o out/validate
mrharmony validate meas.dat --seq meas.seq -o out/validate --t1-ms 300 --t2-ms 200 --force
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

__all__ = ["validate"]


@click.command("validate")
@click.argument("meas", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seq", "seq", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The Pulseq file the scanner played.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder (validation.json, validation.png, simulated.h5).")
@click.option("--measurement", type=int, default=None,
              help="twix only: measurement of a multi-measurement file (default: last).")
@click.option("--shape", type=click.Choice(["auto", "sphere", "cylinder"]), default="auto",
              show_default=True, help="Phantom shape (auto: sphere for a square FOV).")
@click.option("--diameter-mm", type=float, default=None,
              help="Phantom diameter in mm (default: 90 % of the smaller in-plane FOV).")
@click.option("--t1-ms", type=float, default=None,
              help="Phantom T1 in ms (default: doped water at the measured field).")
@click.option("--t2-ms", type=float, default=None,
              help="Phantom T2 in ms (default: doped water at the measured field).")
@click.option("--seed", type=int, default=0, show_default=True, help="Simulation seed.")
@click.option("--force", is_flag=True, help="Replace an existing non-empty output folder.")
def validate(meas: Path, seq: Path, out_dir: Path, measurement: int | None, shape: str,
             diameter_mm: float | None, t1_ms: float | None, t2_ms: float | None, seed: int,
             force: bool) -> None:
    """Compare the measured raw data MEAS with a simulation of the same .seq.

    Simulates SEQ on a uniform doped-water phantom at the measured field strength,
    reconstructs measured and simulated data the same way and writes the comparison
    (slice profile: FWHM, side lobes, correlation; image: NRMSE, correlation).
    """
    from rich.console import Console
    from rich.logging import RichHandler

    from mrharmony.study.validate import validate_measurement

    console = Console(stderr=True)
    handler = RichHandler(console=console, show_path=False, show_time=False)
    logger = logging.getLogger("mrharmony.study.validate")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with console.status("validating (reading, simulating, reconstructing)"):
            result = validate_measurement(
                meas, seq, out_dir, measurement=measurement, force=force, seed=seed,
                shape=shape, diameter_mm=diameter_mm, t1_ms=t1_ms, t2_ms=t2_ms,
            )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    def num(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    if result["kind"] == "slice_profile":
        fw, sl = result["fwhm_mm"], result["sidelobe_level"]
        rel = result["fwhm_rel_diff"]
        click.echo(f"slice profile: FWHM measured {num(fw['measured'], '.2f')} mm, simulated "
                   f"{num(fw['simulated'], '.2f')} mm "
                   f"({num(None if rel is None else 100 * rel, '+.1f')} %); "
                   f"side lobes {num(sl['measured'], '.3f')} / {num(sl['simulated'], '.3f')}; "
                   f"correlation {num(result['correlation'], '.4f')}")
    else:
        click.echo(f"image: NRMSE {num(result['nrmse'], '.3f')}, correlation "
                   f"{num(result['correlation'], '.4f')}")
    click.echo(str(out_dir / "validation.json"))
    click.echo(str(out_dir / "validation.png"))
