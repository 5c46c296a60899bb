"""``mrharmony serve`` / ``stream``: online reconstruction over MRD streams."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click

from mrharmony.errors import StreamError

__all__ = ["client_tls", "parse_host_port", "serve", "stream", "tls_options"]

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) -> ``(host, port)``.

    Raises
    ------
    StreamError
        If the port is missing or not in 1..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise StreamError(f"--stream {text!r}: expected HOST:PORT, e.g. 127.0.0.1:9002")
    host = host.strip("[]")
    try:
        number = int(port)
    except ValueError:
        raise StreamError(f"--stream {text!r}: port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise StreamError(f"--stream {text!r}: port {number} is outside 1..65535")
    return host, number


def tls_options(func: Any) -> Any:
    """Add the client TLS options (``--tls-ca``, ``--tls-cert``, ...) to a command."""
    for opt in reversed([
        click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="CA bundle to verify the server (enables TLS)."),
        click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Client certificate (PEM) for servers that require one."),
        click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Key of --tls-cert (PEM)."),
        click.option("--tls-server-name", default=None,
                     help="Name to check the server certificate against (default: host)."),
    ]):
        func = opt(func)
    return func


def client_tls(tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None) -> Any:
    """The client SSL context of the TLS options (None: plain TCP)."""
    if tls_ca is None and tls_cert is None:
        return None
    from mrharmony.recon.stream.client import client_ssl_context

    return client_ssl_context(ca=tls_ca, cert=tls_cert, key=tls_key)


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback must be given explicitly; "
                   "use TLS on links that leave the machine.")
@click.option("--port", default=9002, show_default=True, type=click.IntRange(0, 65535),
              help="TCP port (0: pick a free one; it is printed).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 256),
              help="Reconstruction workers (threads, or processes with --executor process).")
@click.option("--executor", default="thread", show_default=True,
              type=click.Choice(["process", "thread"]),
              help="Worker pool: threads (lowest latency; NumPy/SciPy release the GIL) or "
                   "processes (isolation, parallel Python-heavy recon on many cores).")
@click.option("--backend", default="numpy", show_default=True,
              type=click.Choice(["auto", "numpy", "cupy", "bart"]),
              help="Array backend for pipelines that do not name one.")
@click.option("--save-raw", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write every received stream to DIR/<time>_conn<N>.h5 (+ .json log).")
@click.option("--idle-timeout-s", default=60.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Drop a client that sends nothing for this long (s).")
@click.option("--drain-timeout-s", default=300.0, show_default=True,
              type=click.FloatRange(min=0), help="On SIGTERM, wait this long for clients (s).")
@click.option("--max-header-bytes", default=4 << 20, show_default=True,
              type=click.IntRange(min=1), help="Largest ISMRMRD header XML (bytes).")
@click.option("--max-samples-x-channels", default=1 << 22, show_default=True,
              type=click.IntRange(min=1), help="Largest samples x channels of one acquisition.")
@click.option("--max-connections", default=64, show_default=True, type=click.IntRange(min=1),
              help="Connections served at once; more get a TEXT error and are closed.")
@click.option("--max-session-bytes", default=1 << 30, show_default=True,
              type=click.IntRange(min=1),
              help="Received, not yet reconstructed acquisition bytes one connection may "
                   "hold (incomplete slices, noise, queued slices) (bytes).")
@click.option("--max-jobs-per-connection", default=8, show_default=True,
              type=click.IntRange(min=1),
              help="Slices of one connection queued or running at once; beyond, the "
                   "connection is not read until one finishes (slices are scheduled "
                   "round-robin across connections).")
@click.option("--write-timeout-s", default=60.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Drop a client that reads nothing for this long while images wait (s).")
@click.option("--session-timeout-s", default=14400.0, show_default=True,
              type=click.FloatRange(min=0),
              help="Longest a connection may last (s); 0: no limit.")
@click.option("--min-receive-bytes-per-s", default=64.0, show_default=True,
              type=click.FloatRange(min=0),
              help="Drop a client sending slower than this, averaged over "
                   "--receive-rate-window-s of waiting for it (bytes/s); 0: no minimum.")
@click.option("--receive-rate-window-s", default=60.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Window of the receive-rate check (s).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Server certificate chain (PEM); with --tls-key enables TLS.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Server key (PEM).")
@click.option("--tls-client-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Require client certificates signed by this CA.")
@click.option("--list-pipelines", is_flag=True, help="List the config names and exit.")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
def serve(host: str, port: int, workers: int, executor: str, backend: str,
          save_raw: Path | None, idle_timeout_s: float, drain_timeout_s: float,
          max_header_bytes: int, max_samples_x_channels: int, max_connections: int,
          max_session_bytes: int, max_jobs_per_connection: int, write_timeout_s: float,
          session_timeout_s: float, min_receive_bytes_per_s: float,
          receive_rate_window_s: float, tls_cert: Path | None, tls_key: Path | None,
          tls_client_ca: Path | None, list_pipelines: bool, log_level: str) -> None:
    """Run the MRD streaming reconstruction server (Gadgetron-compatible protocol)."""
    from mrharmony.recon.stream.protocol import StreamLimits
    from mrharmony.recon.stream.server import (
        PIPELINES,
        ServerSettings,
        StreamServer,
        check_raw_dir,
    )

    if list_pipelines:
        for p in PIPELINES.values():
            click.echo(f"{p.name:30s} {p.method:7s} {p.description}")
        return
    logging.basicConfig(level=getattr(logging, log_level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ServerSettings(
        host=host, port=port, workers=workers, executor=executor, backend=backend,
        save_raw=save_raw, idle_timeout_s=idle_timeout_s, drain_timeout_s=drain_timeout_s,
        limits=StreamLimits(max_header_bytes=max_header_bytes,
                            max_samples_x_channels=max_samples_x_channels),
        tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca,
        max_connections=max_connections, max_session_bytes=max_session_bytes,
        max_jobs_per_connection=max_jobs_per_connection, write_timeout_s=write_timeout_s,
        session_timeout_s=session_timeout_s, min_receive_bytes_per_s=min_receive_bytes_per_s,
        receive_rate_window_s=receive_rate_window_s,
    )
    if save_raw is not None:
        check_raw_dir(save_raw)  # before anything starts: one line, exit 2
    if host not in _LOOPBACK and tls_cert is None:
        logging.getLogger("mrharmony.stream").warning(
            "listening on %s without TLS: raw data will cross the network unencrypted", host)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = await StreamServer(settings).start()
        click.echo(f"mrharmony serve: listening on {host}:{server.port}", err=True)
        await server.serve_until(stop)

    asyncio.run(main())


@click.command("stream")
@click.argument("raw", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Server address.")
@click.option("--port", default=9002, show_default=True, type=click.IntRange(1, 65535))
@click.option("--config", "config", default="default.xml", show_default=True,
              help="Pipeline name (see `mrharmony serve --list-pipelines`), or a Gadgetron "
                   "config name when streaming to a Gadgetron server.")
@click.option("--config-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Send this XML file's text as the config (CONFIG_TEXT).")
@click.option("-o", "--output", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--timeout-s", default=600.0, show_default=True, type=click.FloatRange(min=1),
              help="Longest wait for the server after the last acquisition (s).")
@click.option("--mrd2/--mrd1", "mrd2", default=None,
              help="Protocol: MRD v2 (yardl stream, as Pingvin) or the v1 (Gadgetron/ISMRMRD) "
                   "messages. Default: MRD v2 for an MRD v2 RAW, v1 otherwise.")
@tls_options
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
def stream(raw: Path, host: str, port: int, config: str, config_file: Path | None,
           out_dir: Path, timeout_s: float, mrd2: bool | None, tls_ca: Path | None,
           tls_cert: Path | None, tls_key: Path | None, tls_server_name: str | None,
           force: bool) -> None:
    """Stream RAW (ISMRMRD HDF5 or MRD v2) to a server, write the images as NIfTI + JSON."""
    from rich.progress import Progress

    from mrharmony.formats.raw import load_raw, sniff_format
    from mrharmony.recon.stream.client import stream_acquisitions, write_stream_outputs

    stem = raw.name.removesuffix(".h5").removesuffix(".mrd")
    target = out_dir / f"{stem}.nii.gz"
    if target.exists() and not force:
        raise FileExistsError(f"{target}: exists (use --force to replace it)")
    if mrd2 is None:
        mrd2 = sniff_format(raw) == "mrd2"
    data = load_raw(raw)
    acqs = list(data.noise) + list(data.acquisitions)
    cfg = config_file.read_text() if config_file is not None else config
    ctx = client_tls(tls_ca, tls_cert, tls_key)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"streaming {raw.name}", total=len(acqs))

        async def pace(_i: int, _acq: Any, _result: Any) -> None:
            progress.advance(task)

        result = asyncio.run(stream_acquisitions(
            data.header, acqs, host=host, port=port, config=cfg, ssl_context=ctx,
            server_hostname=tls_server_name, pace=pace, timeout_s=timeout_s, mrd2=mrd2))
    for text in result.texts:
        click.echo(f"server: {text}", err=True)
    if not result.images:
        raise StreamError(f"{host}:{port} returned no images"
                          + (f": {result.texts[-1]}" if result.texts else ""))
    for path in write_stream_outputs(result.images, out_dir, stem, header=data.header,
                                     force=force):
        click.echo(str(path))
