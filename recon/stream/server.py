"""An asyncio MRD streaming server that reconstructs slice by slice.

A client (``gadgetron_ismrmrd_client``, :mod:`mrharmony.recon.stream.client`, a scanner)
sends a config (name or XML), the ISMRMRD header, then acquisitions, and finally CLOSE.
The config selects a :class:`Pipeline` from :data:`PIPELINES`. Acquisitions are
collected per slice by :class:`SliceAssembler`; when the last acquisition of a slice
arrives (flag ``ACQ_LAST_IN_SLICE``, or ``ACQ_LAST_IN_MEASUREMENT``), that slice's
acquisitions (with all noise scans so far, for prewhitening) are reconstructed by
:func:`mrharmony.recon.reconstruct_acquisitions` in a process or thread pool, and the
images are sent back at once, while the client keeps streaming. Whatever is left at
CLOSE is reconstructed then. Images sent by the client are echoed back unchanged
(pass-through, as in a Gadgetron chain); waveforms are saved with ``--save-raw``.

The server also speaks MRD v2 (the yardl stream of ``mrd-python``, what Pingvin /
Gadgetron 5 read and write): a connection whose first bytes are the yardl magic
``b"yardl"`` (a v1 connection starts with a ``uint16`` message id 1 to 5) is decoded by
:class:`~mrharmony.recon.stream.protocol.Mrd2Source`, its acquisitions are converted to
v1 and go through the same slice assembly and reconstruction, and the images go back as
an MRD v2 stream (header, images, end of stream). The pipeline comes from the header's
user parameter string ``mrharmony.config`` (:data:`MRD2_CONFIG_PARAMETER`). MRD v2 has no
text message: errors are logged, and the reply stream ends without its end marker.

Errors (truncated or unknown messages, over-limit lengths, bad header XML, data before
the header, a second header) end that connection with a TEXT message naming the
problem followed by CLOSE; the server keeps serving everyone else. A silent client is
dropped after ``idle_timeout_s``. :meth:`StreamServer.shutdown` (SIGTERM in
``mrharmony serve``) stops accepting, lets running connections finish, then exits.

Modules: :mod:`.server` (this one: :class:`ServerSettings`, :class:`StreamServer`, the
fair scheduler and the worker pool), :mod:`.session` (one connection), :mod:`.assembly`
(:class:`SliceAssembler`), :mod:`.pipelines` (:data:`PIPELINES`, config selection),
:mod:`.jobs` (what runs in the pool: :func:`reconstruct_to_mrd`), :mod:`.rawsave`
(``--save-raw``); their public names are importable from here too.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrharmony.errors import StreamError
from mrharmony.recon.stream.assembly import SliceAssembler
from mrharmony.recon.stream.jobs import (
    _limit_fft_threads,
    _limit_worker_threads,
    _recon_job_blobs,
    _warm_up,
    reconstruct_to_mrd,
)
from mrharmony.recon.stream.pipelines import (
    MRD2_CONFIG_PARAMETER,
    PIPELINES,
    Pipeline,
    pipeline_from_config,
)
from mrharmony.recon.stream.protocol import (
    CLOSE_BYTES,
    StreamLimits,
    encode_message,
)
from mrharmony.recon.stream.rawsave import check_raw_dir
from mrharmony.recon.stream.session import _Session

__all__ = [
    "MRD2_CONFIG_PARAMETER",
    "PIPELINES",
    "Pipeline",
    "ServerSettings",
    "SliceAssembler",
    "StreamServer",
    "check_raw_dir",
    "pipeline_from_config",
    "reconstruct_to_mrd",
    "server_ssl_context",
]

log = logging.getLogger("mrharmony.stream")


@dataclass(frozen=True)
class ServerSettings:
    """Settings of :class:`StreamServer`.

    Attributes
    ----------
    host : str
        Address to bind; loopback unless set explicitly.
    port : int
        TCP port; 0 picks a free one (see :attr:`StreamServer.port`).
    workers : int
        Reconstruction workers (processes or threads).
    executor : {"thread", "process"}
        Pool kind. Threads: no transfer cost, lowest latency on small machines (the FFTs
        and BLAS release the GIL). Processes: isolation and parallel Python-heavy recon
        on many cores (started with ``spawn``: a script that starts the server needs an
        ``if __name__ == "__main__":`` guard).
    backend : str
        Array backend for pipelines that do not name one.
    save_raw : Path or None
        Folder for one ISMRMRD file (+ JSON log) per connection.
    idle_timeout_s : float
        A connection that sends nothing for this long is dropped (s).
    drain_timeout_s : float
        Graceful shutdown waits this long for running connections (s).
    limits : StreamLimits
        Message size limits.
    tls_cert, tls_key : Path or None
        PEM certificate chain and key; both set enables TLS.
    tls_client_ca : Path or None
        CA bundle; set to require and verify client certificates.
    blas_threads : int
        BLAS/OpenMP threads (``threadpoolctl``) and SciPy FFT threads per reconstruction
        worker; 0 leaves the libraries' defaults. The default 1 avoids oversubscription:
        the workers are the parallelism, and OpenBLAS or FFT threads beside them (and
        beside the event loop) more than double the CPU time of a slice. With
        ``executor="thread"`` the limit is process-wide while the server runs.
    max_connections : int
        Connections served at once; one more gets a TEXT error and CLOSE.
    max_session_bytes : int
        Acquisition bytes one connection may hold that are not reconstructed yet
        (incomplete slices, noise scans, slices waiting for a worker), in bytes. While
        slices wait for a worker the connection is not read (back-pressure); over the
        limit with nothing left to wait for, the connection ends with an error.
    max_jobs_per_connection : int
        Slices of one connection queued or running at once; at the limit the connection
        is not read until one finishes. Queued slices reach the workers round-robin
        across connections, so one client's backlog does not delay another's images.
    write_timeout_s : float
        A client that reads nothing for this long while the server has data for it is
        dropped (s); also bounds the wait for such a client at shutdown.
    session_timeout_s : float
        Longest a connection may last (s); 0: no limit.
    min_receive_bytes_per_s : float
        Lowest receive rate (bytes/s), averaged over ``receive_rate_window_s`` of time
        spent waiting for the client (time the server stops reading, for back-pressure,
        does not count); a slower client is dropped. 0: no minimum.
    receive_rate_window_s : float
        Window of the receive-rate check (s of waiting for the client).
    raw_queue_bytes : int
        Bytes queued for the raw-file writer thread before the connection stops being
        read until the disk catches up.
    """

    host: str = "127.0.0.1"
    port: int = 9002
    workers: int = 2
    executor: str = "thread"
    backend: str = "numpy"
    save_raw: Path | None = None
    idle_timeout_s: float = 60.0
    drain_timeout_s: float = 300.0
    limits: StreamLimits = field(default_factory=StreamLimits)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    blas_threads: int = 1
    max_connections: int = 64
    max_session_bytes: int = 1 << 30
    max_jobs_per_connection: int = 8
    write_timeout_s: float = 60.0
    session_timeout_s: float = 4 * 3600.0
    min_receive_bytes_per_s: float = 64.0
    receive_rate_window_s: float = 60.0
    raw_queue_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_session_bytes", "max_jobs_per_connection",
                     "raw_queue_bytes"):
            if int(getattr(self, name)) < 1:
                raise StreamError(f"{name}: {getattr(self, name)} must be >= 1")
        for name in ("write_timeout_s", "receive_rate_window_s"):
            if not float(getattr(self, name)) > 0:
                raise StreamError(f"{name}: {getattr(self, name)} must be > 0")
        for name in ("session_timeout_s", "min_receive_bytes_per_s"):
            if not float(getattr(self, name)) >= 0:
                raise StreamError(f"{name}: {getattr(self, name)} must be >= 0")
        if self.workers < 1:
            raise StreamError(f"workers: {self.workers} must be >= 1")
        if self.executor not in ("process", "thread"):
            raise StreamError(f"executor {self.executor!r}: expected 'process' or 'thread'")
        if not 0 <= self.port <= 65535:
            raise StreamError(f"port: {self.port} is outside 0..65535")
        if self.blas_threads < 0:
            raise StreamError(f"blas_threads: {self.blas_threads} must be >= 0")
        if self.idle_timeout_s <= 0:
            raise StreamError(f"idle_timeout_s: {self.idle_timeout_s} must be > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise StreamError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise StreamError("--tls-client-ca needs --tls-cert and --tls-key")


def server_ssl_context(cert: Path, key: Path, *, client_ca: Path | None = None) -> ssl.SSLContext:
    """TLS context for the server (TLS 1.2+); ``client_ca`` requires client certificates.

    Raises
    ------
    StreamError
        If a file is missing or the certificate/key do not load.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert), str(key))
        if client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(client_ca))
    except (OSError, ssl.SSLError) as exc:
        raise StreamError(f"TLS: cannot load {cert} / {key} / {client_ca}: {exc}") from None
    return ctx


class StreamServer:
    """The MRD streaming server: ``async with StreamServer(settings) as server:`` (or
    :meth:`start`, then :meth:`shutdown`).

    Parameters
    ----------
    settings : ServerSettings
    """

    def __init__(self, settings: ServerSettings | None = None) -> None:
        self.settings = settings or ServerSettings()
        self._server: asyncio.Server | None = None
        self._executor: Executor | None = None
        self._thread_limits: Any = None
        self._fft_threads: int | None = None  # FFT thread cap to restore at shutdown
        self._sessions: set[asyncio.Task] = set()
        self._next_id = 0
        self.connections_served = 0
        self.connections_refused = 0
        # fair scheduling: per-connection FIFO queues served round-robin, at most
        # `workers` jobs in the pool (so the pool's own FIFO never holds a backlog)
        self._job_queues: dict[int, deque] = {}
        self._turns: deque[int] = deque()
        self._running_jobs = 0

    async def __aenter__(self) -> StreamServer:
        return await self.start()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.shutdown()

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._server is None or not self._server.sockets:
            raise StreamError("server is not started")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def active_connections(self) -> int:
        """Connections being served now."""
        return len(self._sessions)

    def _make_executor(self) -> Executor:
        s = self.settings
        if s.executor == "thread":
            if s.blas_threads > 0 and self._thread_limits is None:
                from threadpoolctl import threadpool_limits

                self._thread_limits = threadpool_limits(limits=s.blas_threads)
                self._fft_threads = _limit_fft_threads(s.blas_threads)
            return ThreadPoolExecutor(max_workers=s.workers, thread_name_prefix="mrh-recon")
        import multiprocessing

        init = (_limit_worker_threads, (s.blas_threads,)) if s.blas_threads > 0 else (None, ())
        return ProcessPoolExecutor(max_workers=s.workers,
                                   mp_context=multiprocessing.get_context("spawn"),
                                   initializer=init[0], initargs=init[1])

    async def start(self) -> StreamServer:
        """Start the worker pool and listen.

        Raises
        ------
        StreamError
            TLS files unusable, or the address cannot be bound.
        """
        s = self.settings
        ctx = None
        if s.tls_cert is not None and s.tls_key is not None:
            ctx = server_ssl_context(s.tls_cert, s.tls_key, client_ca=s.tls_client_ca)
        if s.save_raw is not None:
            check_raw_dir(Path(s.save_raw))
        self._executor = self._make_executor()
        if s.executor == "process":
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(self._executor, _warm_up)
                                   for _ in range(s.workers)))
        try:
            self._server = await asyncio.start_server(self._on_connect, s.host, s.port, ssl=ctx,
                                                      limit=1 << 20)
        except OSError as exc:
            self._executor.shutdown(wait=False)
            self._restore_thread_limits()
            raise StreamError(f"cannot listen on {s.host}:{s.port}: {exc}") from None
        log.info("listening on %s:%d (%d %s workers, TLS %s)", s.host, self.port, s.workers,
                 s.executor, "on" if ctx else "off")
        return self

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        self._next_id += 1
        if len(self._sessions) >= self.settings.max_connections:
            await self._refuse(writer, self._next_id)
            return
        session = _Session(self, reader, writer, self._next_id)
        task = asyncio.current_task()
        if task is not None:
            self._sessions.add(task)
        try:
            await session.run()
        finally:
            self.connections_served += 1
            if task is not None:
                self._sessions.discard(task)

    async def _refuse(self, writer: asyncio.StreamWriter, conn_id: int) -> None:
        """Over ``max_connections``: TEXT error and CLOSE (MRD v1), then close."""
        self.connections_refused += 1
        limit = self.settings.max_connections
        log.warning("conn %d: refused: %d connections already (--max-connections %d)",
                    conn_id, limit, limit)
        data = encode_message(f"mrharmony error: too many connections: the server is "
                              f"serving its limit of {limit}; try again later") + CLOSE_BYTES
        try:
            writer.write(data)
            async with asyncio.timeout(self.settings.write_timeout_s):
                await writer.drain()
            writer.close()
        except (TimeoutError, ConnectionError, OSError, RuntimeError):
            writer.transport.abort()

    async def serve_until(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set, then shut down gracefully."""
        await stop.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, let running connections finish (up to ``drain_timeout_s``),
        cancel the rest, and stop the workers."""
        if self._server is not None:
            self._server.close()
        active = set(self._sessions)
        if active:
            log.info("shutdown: waiting for %d connection(s) to finish", len(active))
            _, pending = await asyncio.wait(active, timeout=self.settings.drain_timeout_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._restore_thread_limits()
        log.info("shutdown complete")

    def _restore_thread_limits(self) -> None:
        if self._thread_limits is not None:
            self._thread_limits.restore_original_limits()
            self._thread_limits = None
        if self._fft_threads is not None:
            _limit_fft_threads(self._fft_threads)
            self._fft_threads = None

    async def run_job(self, header_xml: str, blobs: list[bytes], pipeline: Pipeline) -> list[bytes]:
        """Reconstruct one group of acquisitions (wire bytes) in the pool.

        The acquisitions are decoded in the worker, not on the event loop. Returns
        serialised images.
        """
        return await self.schedule_job(0, header_xml, blobs, pipeline)

    def schedule_job(self, conn_id: int, header_xml: str, blobs: list[bytes],
                     pipeline: Pipeline) -> asyncio.Future:
        """Queue one group of connection ``conn_id`` for the pool (fair scheduling).

        Every connection has its own FIFO queue; whenever a worker is free the next
        connection in round-robin order hands it its oldest group. Cancelling the
        returned future drops a group that has not started.

        Returns
        -------
        asyncio.Future
            Resolves to the serialised images, or raises the reconstruction's error.
        """
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        backend = pipeline.backend or self.settings.backend
        q = self._job_queues.get(conn_id)
        if q is None:
            q = self._job_queues[conn_id] = deque()
            self._turns.append(conn_id)
        q.append(((header_xml, blobs, pipeline.method, backend), fut))
        self._dispatch()
        return fut

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._running_jobs < self.settings.workers and self._turns:
            conn_id = self._turns.popleft()
            q = self._job_queues[conn_id]
            args, fut = q.popleft()
            if q:
                self._turns.append(conn_id)  # back of the line
            else:
                del self._job_queues[conn_id]
            if fut.done():  # cancelled while queued
                continue
            if self._executor is None:
                fut.set_exception(StreamError("the server is shutting down"))
                continue
            if isinstance(self._executor, ProcessPoolExecutor):  # pickled: own bytes
                args = (args[0], [bytes(b) for b in args[1]], *args[2:])
            self._running_jobs += 1
            job = loop.run_in_executor(self._executor, _recon_job_blobs, *args)
            job.add_done_callback(functools.partial(self._job_done, fut))

    def _job_done(self, fut: asyncio.Future, job: asyncio.Future) -> None:
        self._running_jobs -= 1
        if not fut.done():
            if job.cancelled():
                fut.cancel()
            elif job.exception() is not None:
                fut.set_exception(job.exception())
            else:
                fut.set_result(job.result())
        elif not job.cancelled():
            job.exception()  # retrieved: no "exception was never retrieved" warning
        self._dispatch()
