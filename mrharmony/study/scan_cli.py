"""``mrharmony scan``: the virtual scanner (simulate a sequence and stream it to a server)."""

from __future__ import annotations

from pathlib import Path

import click

from mrharmony.errors import StreamError
from mrharmony.recon.stream_cli import client_tls, parse_host_port, tls_options

__all__ = ["scan"]


@click.command("scan")
@click.argument("seq", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("phantom_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--site", required=True, help="Virtual site name or TOML.")
@click.option("--stream", "address", required=True, help="Server as HOST:PORT.")
@click.option("--realtime", is_flag=True, help="Send each readout at its acquisition time.")
@click.option("--speed", default=1.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Playback speed with --realtime (2 = twice real time).")
@click.option("--config", "config", default="default.xml", show_default=True,
              help="Pipeline name on the server.")
@click.option("--seed", default=0, show_default=True, type=int, help="Noise seed.")
@click.option("--backend", default="numpy", show_default=True,
              type=click.Choice(["numpy", "cupy"]), help="Bloch simulation backend.")
@click.option("--keep-raw", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also keep the simulated ISMRMRD file.")
@click.option("-o", "--output", "out_dir", default=None,
              type=click.Path(file_okay=False, path_type=Path),
              help="Write the returned images here (NIfTI + JSON).")
@tls_options
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
def scan(seq: Path, phantom_dir: Path, site: str, address: str, realtime: bool, speed: float,
         config: str, seed: int, backend: str, keep_raw: Path | None, out_dir: Path | None,
         tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None,
         tls_server_name: str | None, force: bool) -> None:
    """Virtual scanner: simulate SEQ on PHANTOM_DIR at a site and stream it to a server."""
    from mrharmony.recon.stream.client import write_stream_outputs
    from mrharmony.study.scan import scan_to_server

    host, port = parse_host_port(address)
    for path in ([keep_raw] if keep_raw else []) + (
            [out_dir / f"{seq.stem}.nii.gz"] if out_dir else []):
        if path.exists() and not force:
            raise FileExistsError(f"{path}: exists (use --force to replace it)")
    if keep_raw is not None and keep_raw.exists():
        keep_raw.unlink()
    ctx = client_tls(tls_ca, tls_cert, tls_key)
    header, result = scan_to_server(seq, phantom_dir, site, host=host, port=port, config=config,
                                    realtime=realtime, speed=speed, seed=seed, backend=backend,
                                    ssl_context=ctx, keep_raw=keep_raw)
    for text in result.texts:
        click.echo(f"server: {text}", err=True)
    click.echo(f"received {len(result.images)} image(s) from {host}:{port}", err=True)
    if out_dir is not None:
        for path in write_stream_outputs(result.images, out_dir, seq.stem, header=header,
                                         force=force):
            click.echo(str(path))
    elif not result.images:
        raise StreamError(f"{host}:{port} returned no images")
