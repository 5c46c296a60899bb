"""The virtual scanner: simulate a Pulseq sequence at a virtual site and stream it.

:func:`scan_to_server` runs a Pulseq sequence on a phantom at a virtual site with
:func:`mrharmony.simulation.simulate_raw` (the Bloch engine simulates the whole
sequence at once), then plays the acquisitions to a streaming recon server in
acquisition order (:func:`mrharmony.recon.stream.scanner.realtime_pace`) when
``realtime`` is set, or as fast as the connection takes them otherwise. Images come
back while the "scan" goes on. It drives two stages (simulation and recon), so it lives
in the orchestration layer.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from mrharmony.recon.stream.scanner import realtime_pace

__all__ = ["scan_to_server"]


def scan_to_server(
    seq_path: str | Path,
    phantom: Any,
    site: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 9002,
    config: str = "default.xml",
    realtime: bool = False,
    speed: float = 1.0,
    seed: int = 0,
    backend: str = "numpy",
    ssl_context: Any = None,
    keep_raw: str | Path | None = None,
    timeout_s: float = 600.0,
) -> tuple[Any, Any]:
    """Simulate ``seq_path`` on ``phantom`` at ``site`` and stream it to a server.

    Parameters
    ----------
    seq_path : str or Path
        Pulseq ``.seq`` file, or a protocol TOML (built on the site's scanner first:
        :func:`mrharmony.simulation.cli.sequence_file`).
    phantom : Phantom or path
        The object, or its saved folder.
    site : str, Path or Site
        Virtual site.
    host, port, config : str, int, str
        Server and pipeline (see :func:`~mrharmony.recon.stream.client.stream_acquisitions`).
    realtime : bool
        Send each readout at its acquisition time (scaled by ``speed``).
    speed : float
        Playback speed for ``realtime``.
    seed : int
        Noise seed of the simulation.
    backend : str
        Bloch engine backend (``numpy`` or ``cupy``).
    ssl_context : ssl.SSLContext, optional
        TLS to the server.
    keep_raw : str or Path, optional
        Also keep the simulated ISMRMRD file here.
    timeout_s : float
        Longest wait for the server after the last acquisition (s).

    Returns
    -------
    (header, StreamResult)

    Raises
    ------
    StreamError, SimulationError, SiteError, SequenceFileError, PhantomError
    """
    from mrharmony.formats.raw import read_raw
    from mrharmony.recon.stream.client import stream_acquisitions
    from mrharmony.simulation import load_site, simulate_raw
    from mrharmony.simulation.cli import sequence_file

    with tempfile.TemporaryDirectory(prefix="mrharmony-scan-") as work:
        raw_path = Path(keep_raw) if keep_raw is not None else Path(work) / "scan.h5"
        site = load_site(site)
        seq_file, _ = sequence_file(seq_path, site, native=False, workdir=work)
        simulate_raw(seq_file, phantom, site, raw_path, seed=seed, backend=backend)
        raw = read_raw(raw_path)
    acqs = list(raw.noise) + list(raw.acquisitions)
    pace = realtime_pace(acqs, speed=speed) if realtime else None
    result = asyncio.run(stream_acquisitions(
        raw.header, acqs, host=host, port=port, config=config, pace=pace,
        ssl_context=ssl_context, timeout_s=timeout_s))
    return raw.header, result
