"""Command-line interface of the simulator: ``mrharmony simulate`` and ``mrharmony site``."""

from __future__ import annotations

import warnings
from pathlib import Path

import click

from mrharmony.cliutil import console

__all__ = ["simulate", "site"]


@click.command("simulate")
@click.argument("seq", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("phantom_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--site", "-s", "site_name", required=True,
              help="Site preset name (see `mrharmony site list`) or a site TOML file.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="ISMRMRD HDF5 file to write.")
@click.option("--backend", type=click.Choice(["numpy", "cupy"]), default="numpy",
              show_default=True, help="Array backend of the Bloch engine.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the thermal noise (same seed, same raw data).")
@click.option("--native", is_flag=True,
              help="Run the site vendor's native flavour (SEQ must be a protocol TOML).")
@click.option("--isochromats", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Isochromats per voxel (> 1 models T2' dephasing and intravoxel "
                   "spoiling; spoiled GRE with long T2 needs 32-256).")
@click.option("--noise/--no-noise", default=True, show_default=True,
              help="Add the site's thermal noise (--no-noise: noiseless data, no noise scans).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def simulate(seq: Path, phantom_dir: Path, site_name: str, output: Path, backend: str, seed: int,
             native: bool, isochromats: int, noise: bool, force: bool) -> None:
    """Simulate SEQ (a .seq file, or a protocol .toml built on the site's scanner) on the
    phantom in PHANTOM_DIR at a virtual site, and write ISMRMRD raw data."""
    from mrharmony.phantoms import Phantom
    from mrharmony.simulation.raw import SimulationWarning, simulate_raw
    from mrharmony.simulation.site import load_site

    if output.exists() and not force:
        raise FileExistsError(f"{output}: exists (use --force to replace it)")
    if not seq.exists():
        raise FileNotFoundError(f"{seq}: no such file")
    if not phantom_dir.is_dir():
        raise FileNotFoundError(f"{phantom_dir}: no such phantom folder")
    site_obj = load_site(site_name)
    out = console()
    phantom = Phantom.load(phantom_dir)
    out.print(f"simulating [bold]{seq.name}[/] on {phantom.name or phantom_dir.name} "
                  f"{phantom.shape} at {site_obj.name} ({site_obj.coil.channels} channels, "
                  f"{site_obj.field_strength_t:g} T){' [native]' if native else ''}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SimulationWarning)
        path = simulate_raw(seq, phantom, site_obj, output, seed=seed, backend=backend,
                            native=native, progress=True, overwrite=force,
                            isochromats_per_voxel=isochromats, noise=noise)
    for w in caught:
        if issubclass(w.category, SimulationWarning):
            click.echo(f"mrharmony: warning: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out.print(f"wrote {path}")


@click.group("site")
def site() -> None:
    """Virtual sites: scanner, fields, coil array, noise and vendor implementation."""


@site.command("list")
def site_list() -> None:
    """List the shipped site presets."""
    from rich.table import Table

    from mrharmony.simulation.site import list_sites, load_site

    table = Table(title="virtual sites")
    for col in ("site", "vendor", "scanner", "B0 (T)", "coil", "B0 res. (ppm)",
                "B1 centre (%)", "RF spoil (deg)", "RF TBW", "k filter", "prescan norm."):
        table.add_column(col, no_wrap=col in ("site", "scanner"), overflow="fold")
    for name in list_sites():
        s = load_site(name)
        table.add_row(
            name, s.vendor, s.scanner, f"{s.field_strength_t:g}",
            f"{s.coil.channels} ch {s.coil.geometry}" if s.coil.channels > 1 else "body",
            f"{s.b0.residual_ppm:g}", f"{s.b1.center_pct:+g}",
            f"{s.native.rf_spoiling_inc_deg:g}", f"{s.native.rf_time_bw_product:g}",
            s.native.kspace_filter, "yes" if s.native.prescan_normalize else "no",
        )
    console().print(table)
