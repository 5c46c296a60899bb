"""``mrharmony convert``: raw data between formats (twix + .seq → ISMRMRD, ISMRMRD ↔ MRD v2)."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["convert"]


@click.group("convert")
def convert() -> None:
    """Convert raw data between formats."""


@convert.command("twix")
@click.argument("meas", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seq", "seq", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The Pulseq file the scanner played.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output raw file: ISMRMRD HDF5 (.h5) or MRD v2 (.mrd).")
@click.option("--measurement", type=int, default=None,
              help="Measurement of a multi-measurement file (0-based; default: the last).")
@click.option("--reference", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="EPI: twix of the same EPI with phase encoding off (ghost-correction "
                   "reference, stored as phase-correction data).")
@click.option("--reference-seq", "reference_seq", default=None,
              type=click.Path(dir_okay=False, path_type=Path), help="The .seq of --reference.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def convert_twix_cmd(meas: Path, seq: Path, output: Path, measurement: int | None,
                     reference: Path | None, reference_seq: Path | None, force: bool) -> None:
    """Convert a Siemens twix MEAS.dat measured with a Pulseq SEQ into ISMRMRD (or MRD v2)."""
    from mrharmony.formats.twix import convert_twix

    click.echo(str(convert_twix(meas, seq, output, measurement=measurement, force=force,
                                reference=reference, reference_seq=reference_seq)))


@convert.command("mrd")
@click.argument("source", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Output file: .mrd (MRD v2) for an ISMRMRD input, .h5 for an MRD v2 input.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def convert_mrd_cmd(source: Path, output: Path, force: bool) -> None:
    """Convert raw data between ISMRMRD HDF5 (MRD v1) and MRD v2, either way."""
    from mrharmony.formats.mrd2 import convert_mrd

    click.echo(str(convert_mrd(source, output, force=force)))
