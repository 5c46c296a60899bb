"""``mrharmony seq``: build, check, plot and describe Pulseq sequences."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import click

from mrharmony.cliutil import console
from mrharmony.errors import MrHarmonyError

__all__ = ["seq"]


@click.group()
def seq() -> None:
    """Build, check and plot Pulseq sequences for any vendor's scanner."""


@seq.command("list")
@click.option("--builder", "builder", default=None, help="List the protocol keys of one builder.")
def seq_list(builder: str | None) -> None:
    """List the sequence builders and scanner profiles (or one builder's keys)."""
    from rich.table import Table

    from mrharmony.config import describe_fields
    from mrharmony.sequences import BUILDER_SUMMARIES, PROTOCOL_CLASSES, list_scanners, load_scanner

    out = console()
    if builder is not None:
        if builder not in PROTOCOL_CLASSES:
            raise MrHarmonyError(
                f"builder: unknown builder {builder!r} (one of {', '.join(PROTOCOL_CLASSES)})"
            )
        table = Table(title=f"protocol keys of '{builder}'")
        for col in ("key", "unit", "default", "meaning"):
            table.add_column(col)
        for row in describe_fields(PROTOCOL_CLASSES[builder]):
            table.add_row(*row)
        out.print(table)
        return
    table = Table(title="builders")
    table.add_column("builder")
    table.add_column("sequence")
    for name, summary in BUILDER_SUMMARIES.items():
        table.add_row(name, summary)
    out.print(table)
    table = Table(title="scanners")
    for col in ("scanner", "vendor", "model", "B0 (T)", "Gmax (mT/m)", "Smax (T/m/s)",
                "grad/RF/ADC raster (us)"):
        table.add_column(col)
    for name in list_scanners():
        s = load_scanner(name)
        table.add_row(
            s.name, s.vendor, s.model, f"{s.field_strength_t:g}", f"{s.max_grad_mt_per_m:g}",
            f"{s.max_slew_t_per_m_per_s:g}",
            f"{s.grad_raster_time_us:g}/{s.rf_raster_time_us:g}/{s.adc_raster_time_us:g}",
        )
    out.print(table)


def _summary(seq_obj: Any, scanner: Any) -> dict[str, Any]:
    import numpy as np

    from mrharmony.sequences.check import gradient_usage

    usage = gradient_usage(seq_obj)
    defs = seq_obj.definitions
    return {
        "duration_s": float(seq_obj.duration()[0]),
        "blocks": len(seq_obj.block_events),
        "te_ms": [float(t) * 1e3 for t in np.atleast_1d(defs.get("TE", []))],
        "tr_ms": float(np.atleast_1d(defs["TR"])[0]) * 1e3 if "TR" in defs else None,
        "ti_ms": [float(t) * 1e3 for t in np.atleast_1d(defs.get("TI", []))],
        "grad_pct": 100 * max(usage.max_grad_mt_per_m) / scanner.max_grad_mt_per_m,
        "slew_pct": 100 * max(usage.max_slew_t_per_m_per_s) / scanner.max_slew_t_per_m_per_s,
    }


def _fmt_ms(values: list[float]) -> str:
    if not values:
        return "-"
    text = ", ".join(f"{v:.4g}" for v in values[:3])
    return text + (", ..." if len(values) > 3 else "")


@seq.command("build")
@click.argument("protocol", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--scanner", "-s", required=True, help="Scanner name (see `seq list`) or TOML path.")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output .seq file.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def seq_build(protocol: Path, scanner: str, output: Path, force: bool) -> None:
    """Build PROTOCOL (a TOML file) for one scanner and write a .seq file."""
    from mrharmony.sequences import build_file, load_scanner

    profile = load_scanner(scanner)
    seq_obj, path = build_file(protocol, profile, output, force=force)
    s = _summary(seq_obj, profile)
    console().print(
        f"wrote {path}: {s['duration_s']:.3f} s, {s['blocks']} blocks, TE {_fmt_ms(s['te_ms'])} "
        f"ms, TR {s['tr_ms']:.4g} ms"
        + (f", TI {_fmt_ms(s['ti_ms'])} ms" if s["ti_ms"] else "")
        + f", peak gradient {s['grad_pct']:.0f} %, peak slew {s['slew_pct']:.0f} % of "
        f"{profile.name} limits"
    )


def _build_one(protocol_path: str, scanner: str, out_dir: str, force: bool) -> dict[str, Any]:
    """Worker for build-all: never raises, returns a result row."""
    from mrharmony.errors import MrHarmonyError as _UserError
    from mrharmony.sequences import build_file, load_protocol, load_scanner

    row: dict[str, Any] = {"protocol": Path(protocol_path).stem, "scanner": scanner}
    try:
        protocol = load_protocol(protocol_path)
        profile = load_scanner(scanner)
        row["protocol"] = protocol.name
        target = Path(out_dir) / scanner / f"{protocol.name}.seq"
        seq_obj, path = build_file(protocol, profile, target, force=force)
        row.update(_summary(seq_obj, profile), status="ok", file=str(path))
    except (_UserError, FileExistsError) as exc:
        row.update(status="refused", reason=str(exc).split(": ", 1)[-1])
    except Exception as exc:  # a builder bug: reported, never hides the other builds
        row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
    return row


@seq.command("build-all")
@click.argument("protocol_dir", type=click.Path(file_okay=False, exists=True, path_type=Path),
                default=Path("examples/protocols"))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (one sub-folder per scanner).")
@click.option("--scanner", "-s", "scanners", multiple=True,
              help="Scanner(s) to build for; default: every shipped profile.")
@click.option("--jobs", "-j", type=click.IntRange(1, 256), default=None,
              help="Parallel build processes (default: CPU count).")
@click.option("--force", is_flag=True, help="Overwrite existing .seq files.")
def seq_build_all(protocol_dir: Path, output: Path, scanners: tuple[str, ...], jobs: int | None,
                  force: bool) -> None:
    """Build every protocol in PROTOCOL_DIR for every scanner and print a summary table.

    A protocol that is impossible on a scanner is reported as refused, with the reason.
    A summary is also written to OUTPUT/summary.csv.
    """
    import csv

    from rich.progress import Progress
    from rich.table import Table

    from mrharmony.sequences import list_scanners, load_scanner

    protocols = sorted(protocol_dir.glob("*.toml"))
    if not protocols:
        raise MrHarmonyError(f"{protocol_dir}: no protocol .toml files")
    names = list(scanners) or list(list_scanners())
    for name in names:
        load_scanner(name)  # fail fast on a bad name
    tasks = [(str(p), s) for p in protocols for s in names]
    rows: list[dict[str, Any]] = []
    jobs = jobs or os.cpu_count() or 1
    out = console()
    with Progress(console=out, transient=True) as progress:
        bar = progress.add_task("building", total=len(tasks))
        if jobs == 1:
            for p, s in tasks:
                rows.append(_build_one(p, s, str(output), force))
                progress.advance(bar)
        else:
            with ProcessPoolExecutor(max_workers=jobs) as pool:
                futures = [pool.submit(_build_one, p, s, str(output), force) for p, s in tasks]
                for fut in as_completed(futures):
                    rows.append(fut.result())
                    progress.advance(bar)
    rows.sort(key=lambda r: (r["protocol"], r["scanner"]))
    table = Table(title=f"{len(protocols)} protocols x {len(names)} scanners -> {output}")
    for col in ("protocol", "scanner", "status", "TE (ms)", "TR (ms)", "TI (ms)", "time (s)",
                "G %", "slew %", "note"):
        table.add_column(col, overflow="fold")
    for r in rows:
        ok = r["status"] == "ok"
        table.add_row(
            r["protocol"], r["scanner"],
            {"ok": "[green]ok", "refused": "[yellow]refused", "error": "[red]error"}[r["status"]],
            _fmt_ms(r.get("te_ms", [])) if ok else "",
            f"{r['tr_ms']:.4g}" if ok and r.get("tr_ms") else "",
            _fmt_ms(r.get("ti_ms", [])) if ok else "",
            f"{r['duration_s']:.1f}" if ok else "",
            f"{r['grad_pct']:.0f}" if ok else "",
            f"{r['slew_pct']:.0f}" if ok else "",
            "" if ok else r.get("reason", ""),
        )
    out.print(table)
    output.mkdir(parents=True, exist_ok=True)
    with (output / "summary.csv").open("w", newline="") as fh:
        fields = ["protocol", "scanner", "status", "te_ms", "tr_ms", "ti_ms", "duration_s",
                  "blocks", "grad_pct", "slew_pct", "file", "reason"]
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (" ".join(f"{v:.6g}" for v in r[k]) if isinstance(r.get(k), list)
                                 else r.get(k, "")) for k in fields})
    n_ok = sum(r["status"] == "ok" for r in rows)
    n_ref = sum(r["status"] == "refused" for r in rows)
    n_err = sum(r["status"] == "error" for r in rows)
    out.print(f"{n_ok} built, {n_ref} refused, {n_err} failed; summary: "
                  f"{output / 'summary.csv'}")
    if n_err:
        sys.exit(1)


@seq.command("check")
@click.argument("seq_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--scanner", "-s", default=None,
              help="Check against this scanner's rasters and limits (default: the file's own "
                   "rasters, no amplitude verdict).")
def seq_check(seq_file: Path, scanner: str | None) -> None:
    """Check any Pulseq file: timing rules, duration, TE/TR, gradient and slew use.

    Exits 0 when the file passes, 1 when it violates a timing rule or a limit.
    """
    from mrharmony.sequences.check import check_file

    r = check_file(seq_file, scanner)
    out = console()
    out.print(f"[bold]{seq_file}[/] against {r.scanner or 'its own rasters'}")
    version = r.definitions.get("Name")
    if version is not None:
        out.print(f"  name        {version}")
    out.print(f"  duration    {r.duration_s:.4f} s in {r.n_blocks} blocks")
    if r.te_s:
        out.print(f"  TE          {_fmt_ms([t * 1e3 for t in r.te_s])} ms")
    if r.tr_s:
        out.print(f"  TR          {r.tr_s * 1e3:.4g} ms")
    if r.ti_s:
        out.print(f"  TI          {_fmt_ms([t * 1e3 for t in r.ti_s])} ms")
    g = r.usage.max_grad_mt_per_m
    sl = r.usage.max_slew_t_per_m_per_s
    glim = f" (limit {r.max_grad_mt_per_m:g})" if r.max_grad_mt_per_m else ""
    slim = f" (limit {r.max_slew_t_per_m_per_s:g})" if r.max_slew_t_per_m_per_s else ""
    out.print(f"  peak G      x {g[0]:.2f}, y {g[1]:.2f}, z {g[2]:.2f} mT/m{glim}")
    out.print(f"  peak slew   x {sl[0]:.1f}, y {sl[1]:.1f}, z {sl[2]:.1f} T/m/s{slim}")
    out.print(f"  timing      {'[green]ok' if r.timing_ok else '[red]FAILED'}")
    for err in r.timing_errors[:10]:
        out.print(f"    {err}")
    if r.max_grad_mt_per_m is not None:
        out.print(f"  limits      {'[green]ok' if r.gradients_ok else '[red]EXCEEDED'}")
    if not r.ok:
        sys.exit(1)


@seq.command("plot")
@click.argument("seq_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output PNG.")
@click.option("--time-range-ms", nargs=2, type=float, default=None,
              help="Waveform window START END in ms (default: the first TR with data).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def seq_plot(seq_file: Path, output: Path, time_range_ms: tuple[float, float] | None,
             force: bool) -> None:
    """Plot the waveforms and k-space trajectory of any Pulseq file to a PNG."""
    from mrharmony.sequences.io import read_seq
    from mrharmony.sequences.plot import plot_sequence

    if output.exists() and not force:
        raise FileExistsError(f"{output}: exists (use --force to replace it)")
    path = plot_sequence(read_seq(seq_file), output, time_range_ms=time_range_ms)
    console().print(f"wrote {path}")


@seq.command("header")
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--scanner", "-s", default=None, help="Scanner (required for a protocol TOML).")
@click.option("--coils", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="Receiver channels.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the XML here instead of standard output.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def seq_header(source: Path, scanner: str | None, coils: int, output: Path | None,
               force: bool) -> None:
    """Print the ISMRMRD header XML of a protocol TOML (+ scanner) or of a .seq file."""
    from mrharmony.sequences.header import ismrmrd_header_xml

    xml = ismrmrd_header_xml(source, scanner, receiver_channels=coils)
    if output is None:
        click.echo(xml)
        return
    if output.exists() and not force:
        raise FileExistsError(f"{output}: exists (use --force to replace it)")
    output.write_text(xml)
    console().print(f"wrote {output}")
