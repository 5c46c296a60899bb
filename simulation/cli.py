"""Command-line interface of the simulator: ``mrharmony simulate`` and ``mrharmony site``.

The simulator runs ``.seq`` files (:func:`~mrharmony.simulation.raw.simulate_raw`); a
protocol TOML given to ``mrharmony simulate`` is built here first, by the sequence
library, on the site's scanner (:func:`sequence_file`): the one place of the simulation
stage that imports the sequence library's builders.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import click

from mrharmony.cliutil import console

__all__ = ["sequence_file", "simulate", "site"]


def sequence_file(source: Any, site: Any, *, native: bool, workdir: str | Path,
                  ) -> tuple[Path, dict[str, Any]]:
    """The ``.seq`` file to simulate and the header record of the native flavour.

    Parameters
    ----------
    source : str, Path or Protocol
        A Pulseq ``.seq`` file (returned as it is), or a protocol (``.toml`` file or
        :class:`~mrharmony.sequences.protocol.Protocol`), built on ``site``'s scanner by
        :func:`mrharmony.sequences.build_file` into ``workdir``.
    site : Site
        The virtual site (its scanner profile and, for ``native``, the vendor's choices).
    native : bool
        Build the vendor's native flavour of the protocol
        (:func:`~mrharmony.simulation.native.native_protocol`).
    workdir : str or Path
        Folder for the built file (``<protocol name>.seq``).

    Returns
    -------
    (Path, dict)
        The ``.seq`` file, and the ``header_info`` of
        :func:`~mrharmony.simulation.raw.simulate_raw` (empty unless ``native``).

    Raises
    ------
    SimulationError
        ``native`` with a ``.seq`` file: a ``.seq`` is the vendor-agnostic implementation
        and runs unchanged.
    ProtocolError, ConfigError
        From loading or building the protocol.
    """
    from mrharmony.errors import SimulationError
    from mrharmony.sequences import Protocol, build_file, load_protocol

    protocol = None
    if isinstance(source, Protocol):
        protocol = source
    elif Path(source).suffix.lower() == ".toml":
        protocol = load_protocol(source)
    if protocol is None:
        if native:
            raise SimulationError(
                f"{source}: the native flavour needs the protocol (TOML), not a .seq file: a "
                ".seq is the vendor-agnostic implementation and runs unchanged"
            )
        return Path(source), {}
    info: dict[str, Any] = {}
    if native:
        from mrharmony.simulation.native import native_header_info, native_protocol

        info = native_header_info(protocol, site)
        protocol = native_protocol(protocol, site)
    _, path = build_file(protocol, site.profile, Path(workdir) / f"{protocol.name}.seq")
    return path, info


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
@click.option("--isochromats", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Isochromats per voxel (> 1 models T2' dephasing, intravoxel "
                   "spoiling and the slice profile; spoiled GRE with long T2 needs 32-256, "
                   "slice-selective spin-echo trains 128-512). The run reports how much "
                   "the signal changes with 4x as many.")
@click.option("--noise/--no-noise", default=True, show_default=True,
              help="Add the site's thermal noise (--no-noise: noiseless data, no noise scans).")
@click.option("--fast-path", "fast_path_pct", type=click.FloatRange(min=0, min_open=True),
              default=None, metavar="PCT",
              help="Try the fast path (each tissue class simulated once, the encoding and "
                   "off-resonance phase applied per voxel) and use it if it differs from the "
                   "full engine by at most PCT % of the peak signal on probe voxels; "
                   "otherwise the full engine runs. The run says which.")
@click.option("--spoiling", type=click.Choice(["none", "ideal"]), default="none",
              show_default=True,
              help="Spoiling model: 'none' plays the spoilers and RF phases (enough "
                   "isochromats needed); 'ideal' zeroes the transverse magnetisation before "
                   "every excitation and inversion (spoiled sequences only; it also removes "
                   "the vendors' spoiler and RF-spoiling differences).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def simulate(seq: Path, phantom_dir: Path, site_name: str, output: Path, backend: str, seed: int,
             native: bool, isochromats: int, noise: bool, fast_path_pct: float | None,
             spoiling: str, force: bool) -> None:
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
    with (tempfile.TemporaryDirectory(prefix="mrharmony-sim-") as work,
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("always", SimulationWarning)
        seq_file, info = sequence_file(seq, site_obj, native=native, workdir=work)
        path = simulate_raw(seq_file, phantom, site_obj, output, seed=seed, backend=backend,
                            native=native, progress=True, force=force,
                            isochromats_per_voxel=isochromats, noise=noise, header_info=info,
                            check_convergence=True, fast_path_tol_pct=fast_path_pct,
                            spoiling=spoiling)
    for w in caught:
        if issubclass(w.category, SimulationWarning):
            click.echo(f"mrharmony: warning: {w.message}", err=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out.print(f"wrote {path}")
    from mrharmony.simulation.raw import header_user_parameters

    params = header_user_parameters(path)
    _print_simulation_path(out, params)
    _print_convergence(out, params, isochromats)


def _print_simulation_path(out: Any, params: dict[str, Any]) -> None:
    """Say which engine path produced the file (its header's user parameters)."""
    if "fast_path_tol_pct" not in params:
        return
    if params.get("simulation_path") == "fast":
        out.print(f"simulation path: fast ({int(params['fast_path_classes'])} classes for "
                  f"{int(params['fast_path_voxels'])} voxels; "
                  f"{float(params['fast_path_check_pct']):.2g} % of the peak signal from the "
                  "full engine on probe voxels)")
    else:
        out.print(f"simulation path: full isochromat engine (fast path not used: "
                  f"{params.get('fast_path_fallback', '')})")


#: Above this change (%) with 4x the isochromats, the CLI says the scan has not converged.
CONVERGED_PCT = 5.0


def _print_convergence(out: Any, params: dict[str, Any], isochromats: int) -> None:
    """Say how much the signal still depends on the isochromat count (header value)."""
    from mrharmony.simulation.raw import CONVERGENCE_FACTOR

    pct = params.get("isochromat_convergence_pct")
    if pct is None:
        return
    more = CONVERGENCE_FACTOR * isochromats
    verdict = ("converged" if pct <= CONVERGED_PCT else
               f"[bold]not converged[/]: raise --isochromats (x{CONVERGENCE_FACTOR} at a "
               f"time) until this is below {CONVERGED_PCT:g} %")
    out.print(f"isochromats: the signal of the slowest-decaying tissues changes by {pct:.1f} % "
              f"from {isochromats} to {more} per voxel ({verdict})")


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
