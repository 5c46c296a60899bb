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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import queue
import ssl
import struct
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures import Future as _ThreadFuture
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import ismrmrd
import numpy as np

from mrharmony.errors import StreamError
from mrharmony.fileio import atomic_path
from mrharmony.formats.flags import flag_mask
from mrharmony.formats.header import check_xml, parse_ismrmrd_header
from mrharmony.formats.raw import RawStreamWriter
from mrharmony.recon.stream.protocol import (
    CLOSE_BYTES,
    ConfigText,
    EndOfStream,
    MessageId,
    MessageReader,
    Mrd2Source,
    StreamLimits,
    decode_acquisitions,
    encode_message,
    is_mrd2_start,
    read_message,
)

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

_LAST_IN_SLICE = int(flag_mask("LAST_IN_SLICE"))
_NOISE = int(flag_mask("IS_NOISE_MEASUREMENT"))
_LAST_IN_MEASUREMENT = int(flag_mask("LAST_IN_MEASUREMENT"))
_IMAGE_INDEX_OFFSET = ismrmrd.ImageHeader.image_index.offset
_RECON_METHODS = ("auto", "fft", "grappa", "sense", "cs", "tv", "nufft")
_RECON_BACKENDS = ("auto", "numpy", "cupy", "bart")


# --------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class Pipeline:
    """A reconstruction selected by a config name.

    Attributes
    ----------
    name : str
        Config name the client sends (``default.xml``).
    method : str
        :func:`~mrharmony.recon.reconstruct_acquisitions` method.
    backend : str or None
        Array backend; None uses the server's ``--backend``.
    description : str
        One line for ``mrharmony serve --list-pipelines`` and the docs.
    """

    name: str
    method: str
    backend: str | None = None
    description: str = ""


def _pipelines() -> MappingProxyType:
    items = [
        Pipeline("default.xml", "auto", None, "automatic: FFT (fully sampled Cartesian), "
                 "CG-SENSE (undersampled), gridding/EPI by trajectory"),
        Pipeline("mrharmony_auto.xml", "auto", None, "same as default.xml"),
        Pipeline("mrharmony_fft.xml", "fft", None, "zero-filled FFT, POCS partial Fourier, SoS"),
        Pipeline("mrharmony_grappa.xml", "grappa", None, "GRAPPA"),
        Pipeline("mrharmony_sense.xml", "sense", None, "CG-SENSE with ESPIRiT maps"),
        Pipeline("mrharmony_cs.xml", "cs", None, "L1-wavelet compressed sensing"),
        Pipeline("mrharmony_tv.xml", "tv", None, "total-variation SENSE"),
        Pipeline("mrharmony_nufft.xml", "nufft", None, "non-Cartesian NUFFT gridding"),
        Pipeline("mrharmony_bart.xml", "sense", "bart", "BART ecalib + pics"),
        Pipeline("Generic_Cartesian_FFT.xml", "fft", None, "Gadgetron name alias: FFT"),
        Pipeline("Generic_Cartesian_Grappa.xml", "grappa", None, "Gadgetron name alias: GRAPPA"),
    ]
    return MappingProxyType({p.name: p for p in items})


PIPELINES: MappingProxyType = _pipelines()


def _config_properties(text: str, *, source: str) -> dict[str, str]:
    """``name -> value`` of ``<property>``/``<parameter>`` elements of a config XML.

    Both ``<property name="method" value="sense"/>`` and Gadgetron's
    ``<property><name>method</name><value>sense</value></property>`` are understood.
    """
    check_xml(text, source=source, error=StreamError)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise StreamError(f"{source}: the config is not well-formed XML ({exc})") from None
    props: dict[str, str] = {}
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag not in ("property", "parameter"):
            continue
        name = el.get("name") or (el.findtext("name") or "")
        value = el.get("value") if el.get("value") is not None else (el.findtext("value") or "")
        if name:
            props[name.strip()] = value.strip()
    return props


def pipeline_from_config(config: Any) -> Pipeline:
    """Select the pipeline for a CONFIG_FILE name or a CONFIG_TEXT document.

    Parameters
    ----------
    config : ConfigFile, ConfigText or str
        A name from :data:`PIPELINES` (a path is reduced to its file name), or XML
        whose ``property``/``parameter`` elements name ``pipeline``, ``method`` and/or
        ``backend``. An XML config without these selects ``default.xml``.

    Returns
    -------
    Pipeline

    Raises
    ------
    StreamError
        Unknown pipeline name, method or backend, or malformed XML.
    """
    text = str(config)
    if isinstance(config, ConfigText) or text.lstrip().startswith("<"):
        props = _config_properties(text, source="CONFIG_TEXT")
        base = PIPELINES["default.xml"]
        if "pipeline" in props:
            base = _named_pipeline(props["pipeline"])
        method = props.get("method", base.method)
        backend = props.get("backend", base.backend)
        if method not in _RECON_METHODS:
            raise StreamError(f"CONFIG_TEXT: method {method!r}: expected one of "
                              f"{', '.join(_RECON_METHODS)}")
        if backend is not None and backend not in _RECON_BACKENDS:
            raise StreamError(f"CONFIG_TEXT: backend {backend!r}: expected one of "
                              f"{', '.join(_RECON_BACKENDS)}")
        return replace(base, name="CONFIG_TEXT", method=method, backend=backend)
    return _named_pipeline(text)


def _named_pipeline(name: str) -> Pipeline:
    key = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    if key not in PIPELINES:
        raise StreamError(f"config {name!r}: unknown pipeline (known: {', '.join(PIPELINES)})")
    return PIPELINES[key]


# --------------------------------------------------------------------------- slices


class SliceAssembler:
    """Collect acquisitions until a slice is complete.

    A slice ``(slice, repetition)`` is complete when an acquisition of it carries
    ``ACQ_LAST_IN_SLICE``; ``ACQ_LAST_IN_MEASUREMENT`` completes everything. Noise
    scans are kept and prepended to every completed group (they prewhiten it), so a
    slice reconstructed here equals the same slice of the offline reconstruction.
    """

    def __init__(self) -> None:
        self.noise: list[Any] = []
        self._pending: dict[tuple[int, int], list[Any]] = {}
        self._done: set[tuple[int, int]] = set()
        self.reopened: list[tuple[int, int]] = []

    def add(self, acq: Any, item: Any = None) -> list[list[Any]]:
        """Add one acquisition; return the groups it completes (noise first in each).

        Parameters
        ----------
        acq : ismrmrd.Acquisition
            Its flags and counters decide the grouping.
        item : Any, optional
            What to store and return for it (default: ``acq`` itself), e.g. a pair of
            the acquisition and its wire bytes.
        """
        item = acq if item is None else item
        flags = int(acq.flags)
        if flags & _NOISE:
            self.noise.append(item)
            return []
        key = (int(acq.idx.slice), int(acq.idx.repetition))
        if key in self._done and key not in self._pending:
            self.reopened.append(key)  # more data after the slice was declared complete
        self._pending.setdefault(key, []).append(item)
        if flags & _LAST_IN_MEASUREMENT:
            return self.flush()
        if flags & _LAST_IN_SLICE:
            self._done.add(key)
            return [self.noise + self._pending.pop(key)]
        return []

    def flush(self) -> list[list[Any]]:
        """Return every incomplete group (at the end of the stream)."""
        groups = [self.noise + self._pending[k] for k in sorted(self._pending)]
        self._done.update(self._pending)
        self._pending.clear()
        return groups

    @property
    def pending_acquisitions(self) -> int:
        """Acquisitions waiting for their slice to complete."""
        return sum(len(v) for v in self._pending.values())


# --------------------------------------------------------------------------- recon jobs


@functools.lru_cache(maxsize=32)
def _header_from_xml(xml: str) -> Any:
    return parse_ismrmrd_header(xml, source="HEADER", error=StreamError)


def _to_mrd_bytes(images: list[Any]) -> list[bytes]:
    out = []
    for im in images:
        meta = dict(im.meta)
        if "recon" in meta:
            meta["mrharmony_recon"] = json.dumps(meta["recon"], default=str)
        img = replace(im, meta=meta).to_ismrmrd_image()
        img.image_type = (ismrmrd.IMTYPE_COMPLEX if np.iscomplexobj(im.data)
                          else ismrmrd.IMTYPE_MAGNITUDE)
        out.append(img.to_bytes())
    return out


def reconstruct_to_mrd(header: Any, acquisitions: list[Any], *, method: str,
                       backend: str) -> list[bytes]:
    """Reconstruct one group and return serialised MRD images (IMAGE payloads, no id).

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader
    acquisitions : list of ismrmrd.Acquisition
        Noise scans and all acquisitions of one slice.
    method, backend : str
        See :func:`mrharmony.recon.reconstruct_acquisitions`.

    Returns
    -------
    list of bytes
        One :meth:`ismrmrd.Image.to_bytes` per image.
    """
    from mrharmony.recon.pipeline import reconstruct_acquisitions

    images = reconstruct_acquisitions(header, acquisitions, method=method, backend=backend)
    return _to_mrd_bytes(images)


def _recon_job_blobs(header_xml: str, blobs: list[bytes], method: str,
                     backend: str) -> list[bytes]:
    """Pool entry point (threads or processes): acquisitions as wire bytes in, images as
    bytes out."""
    header = _header_from_xml(header_xml)
    acqs = decode_acquisitions(blobs)  # batched np.frombuffer decode, same as from_bytes
    return reconstruct_to_mrd(header, acqs, method=method, backend=backend)


def _limit_fft_threads(threads: int) -> int | None:
    """Cap the threads of the Cartesian recon's SciPy FFTs; return the previous cap.

    ``mrharmony.recon.cartesian`` passes ``workers=os.cpu_count()`` to every
    ``scipy.fft`` call (a module constant that ``threadpoolctl`` does not see), so with
    ``W`` recon workers on ``C`` cores the server would run ``W x C`` FFT threads. The
    workers are the parallelism; each FFT gets ``threads``. None if the module has no
    such constant (nothing to cap).
    """
    from mrharmony.recon import cartesian

    previous = getattr(cartesian, "_WORKERS", None)
    if isinstance(previous, int):
        cartesian._WORKERS = max(1, int(threads))
        return previous
    return None


def _limit_worker_threads(threads: int) -> None:
    """Process-pool initializer: cap BLAS/OpenMP and FFT threads for the worker's
    lifetime."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    _limit_fft_threads(threads)


def _warm_up() -> int:
    """Run a tiny reconstruction in a pool worker, so the first real slice does not pay
    for imports and FFT set-up; the short sleep spreads the calls over all workers."""
    from mrharmony.recon.stream.scanner import synthetic_cartesian_scan

    header, acqs = synthetic_cartesian_scan(nx=16, ny=16, n_coils=2, n_slices=1)
    reconstruct_to_mrd(header, acqs, method="auto", backend="numpy")
    time.sleep(0.2)
    return os.getpid()


#: Header user parameter (string) that selects the pipeline of an MRD v2 stream: a config
#: name (``default.xml``, ...) or config XML; ``default.xml`` when absent.
MRD2_CONFIG_PARAMETER = "mrharmony.config"


def _mrd2_item(index: int, item: Any, *, limits: StreamLimits) -> tuple[str, Any]:
    """Decoder-thread side of an MRD v2 session: name an item and convert what the
    session needs (an acquisition into its v1 header and wire bytes, after the limits)."""
    import mrd

    from mrharmony.formats.mrd2 import acquisition_bytes_from_mrd2, waveform_from_mrd2

    if isinstance(item, mrd.StreamItem.Acquisition):
        acq = item.value
        nc, ns = np.shape(acq.data) if np.ndim(acq.data) == 2 else (0, 0)
        nt = np.shape(acq.trajectory)[0] if np.ndim(acq.trajectory) == 2 else 0
        if nc * ns > limits.max_samples_x_channels:
            raise StreamError(f"MRD v2 acquisition {index}: samples x channels ({ns} x {nc}) "
                              f"= {nc * ns} is over the limit of "
                              f"{limits.max_samples_x_channels}")
        if nt > limits.max_trajectory_dimensions:
            raise StreamError(f"MRD v2 acquisition {index}: trajectory dimensions {nt} is over "
                              f"the limit of {limits.max_trajectory_dimensions}")
        return "ACQUISITION", acquisition_bytes_from_mrd2(acq, where=f"acquisition {index}")
    if isinstance(item, mrd.StreamItem.WaveformUint32):
        return "WAVEFORM", waveform_from_mrd2(item)
    name = type(item).__name__.removeprefix("StreamItem.")
    if name.startswith("Image") and name != "ImageArray":
        return "IMAGE", item
    return name, None


# --------------------------------------------------------------------------- raw files


def check_raw_dir(path: Path) -> Path:
    """Create the ``--save-raw`` folder if needed and check that files can be made in it.

    Parameters
    ----------
    path : Path
        Folder for the raw files.

    Returns
    -------
    Path

    Raises
    ------
    StreamError
        If the folder cannot be created or a file cannot be created in it.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".mrharmony-probe-"):
            pass
    except OSError as exc:
        raise StreamError(f"--save-raw {path}: cannot write there "
                          f"({exc.strerror or exc})") from None
    return path


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"


class _RawSaver:
    """``--save-raw`` for one connection, off the event loop.

    A :class:`~mrharmony.formats.raw.RawStreamWriter` lives in one writer thread fed by a
    queue bounded in bytes (:meth:`backlogged` / :meth:`wait_space`: the session stops
    reading while the disk is behind). Any failure (full disk, read-only folder, HDF5
    error) disables saving for this connection: the thread closes and deletes the
    partial ``.h5.part``, drops what is queued, and ``on_fail(reason)`` runs on the
    event loop; reconstruction goes on.
    """

    def __init__(self, path: Path, header_xml: str, *, max_queue_bytes: int,
                 on_fail: Any) -> None:
        self.path = Path(path)
        self.part = self.path.with_name(self.path.name + ".part")
        self.failed: str | None = None
        self.count = 0
        self._loop = asyncio.get_running_loop()
        self._on_fail = on_fail
        self._max = int(max_queue_bytes)
        self._queued = 0  # bytes in the queue (updated on the loop only)
        self._space = asyncio.Event()
        self._space.set()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done: _ThreadFuture = _ThreadFuture()
        self._closing = False
        self._thread = threading.Thread(target=self._run, args=(header_xml,),
                                        name="mrh-raw-writer", daemon=True)
        self._thread.start()

    # ---- event-loop side
    def _put(self, op: str, value: Any = None, nbytes: int = 0) -> None:
        if self.failed is not None or self._closing:
            return
        self._queued += nbytes
        if self._queued >= self._max:
            self._space.clear()
        self._queue.put((op, value, nbytes))

    def append(self, payload: bytes) -> None:
        """Queue one acquisition (its wire bytes)."""
        self.count += 1
        self._put("acq", payload, len(payload))

    def append_waveform(self, wav: Any) -> None:
        """Queue one waveform."""
        self._put("wav", wav, 64)

    def flush(self) -> None:
        """Queue a flush (a slice is complete: its lines go to disk)."""
        self._put("flush")

    @property
    def backlogged(self) -> bool:
        """More than ``max_queue_bytes`` wait for the disk."""
        return not self._space.is_set()

    async def wait_space(self) -> None:
        """Wait until the queue is below its bound (or saving stopped)."""
        await self._space.wait()

    def _released(self, nbytes: int) -> None:
        self._queued -= nbytes
        if self._queued < self._max:
            self._space.set()

    def _failed(self, reason: str) -> None:
        self.failed = reason
        self._space.set()
        self._on_fail(reason)

    async def sync(self) -> None:
        """Write and flush everything queued so far; return once it is on disk (or saving
        has failed: :attr:`failed` and ``on_fail`` have then been handled)."""
        if self.failed is not None or self._closing:
            return
        done: _ThreadFuture = _ThreadFuture()
        self._queue.put(("flush", None, 0))
        self._queue.put(("sync", done, 0))
        await asyncio.wrap_future(done)

    async def close(self) -> Path | None:
        """Write what is queued, close and rename the file; the final path, or None when
        saving failed (nothing is left on disk then)."""
        if not self._closing:
            self._closing = True
            self._queue.put(("close", None, 0))
        return await asyncio.wrap_future(self._done)

    # ---- writer thread
    def _call_loop(self, fn: Any, *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone (interpreter exit)
            self._loop.call_soon_threadsafe(fn, *args)

    def _run(self, header_xml: str) -> None:
        writer: RawStreamWriter | None = None
        try:
            writer = RawStreamWriter(self.path, header_xml)
            while True:
                op, value, nbytes = self._queue.get()
                if op == "acq":
                    writer.append(value)
                elif op == "flush":
                    writer.flush()
                elif op == "wav":
                    writer.append_waveform(value)
                elif op == "sync":
                    value.set_result(None)
                else:
                    self._done.set_result(writer.close())
                    return
                if nbytes:
                    self._call_loop(self._released, nbytes)
        except BaseException as exc:  # every failure only disables saving
            reason = _describe(exc)
            self._discard(writer)
            self._call_loop(self._failed, reason)
            while True:  # drop what is queued until close
                op, value, nbytes = self._queue.get()
                if nbytes:
                    self._call_loop(self._released, nbytes)
                if op == "sync":
                    value.set_result(None)
                elif op == "close":
                    self._done.set_result(None)
                    return

    def _discard(self, writer: RawStreamWriter | None) -> None:
        """Close the HDF5 file and delete the partial file (no orphan ``.h5.part``)."""
        if writer is not None:
            writer.abort()
        with contextlib.suppress(OSError):
            self.part.unlink()


# --------------------------------------------------------------------------- server


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


@dataclass
class _Counts:
    received: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    images_sent: int = 0
    texts_sent: int = 0
    groups: int = 0
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Dropped(ConnectionError):
    """The server dropped the client (it stopped reading: write timeout)."""


def _error_text(exc: BaseException) -> str:
    """A failure for the client: our own errors as they are, anything else with its type
    (``ZeroDivisionError: ...``)."""
    from mrharmony.errors import MrHarmonyError

    text = str(exc)
    if isinstance(exc, MrHarmonyError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Session:
    """One client connection."""

    def __init__(self, server: StreamServer, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, conn_id: int) -> None:
        self.server = server
        settings = server.settings
        self.reader = MessageReader(
            reader, on_receive=self._check_rate if settings.min_receive_bytes_per_s > 0 else None)
        self.writer = writer
        self.id = conn_id
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.log = logging.LoggerAdapter(log, {"conn": conn_id})
        self.counts = _Counts()
        self.assembler = SliceAssembler()
        self.jobs: set[asyncio.Task] = set()
        self.aux: set[asyncio.Task] = set()  # warnings sent while the loop reads
        self.lock = asyncio.Lock()
        self.raw: _RawSaver | None = None
        self.pipeline: Pipeline | None = None
        self.header: Any = None
        self.header_xml = ""
        self.image_index = 0
        self.t0 = time.monotonic()
        self.mrd2 = False  # the client speaks MRD v2 (yardl); replies are MRD v2 too
        self.encoder: Any = None  # mrharmony.formats.mrd2.Mrd2Encoder of the reply
        self.dropped: str | None = None  # why the server dropped the client
        self.held_bytes = 0  # acquisition bytes received and not reconstructed yet
        self._rate_mark = (0.0, 0)  # (reader.wait_s, reader.bytes_read) at window start

    # ---- limits
    def _check_rate(self, reader: MessageReader) -> None:
        """``on_receive`` of the reader: the minimum receive rate over a window of time
        spent waiting for this client."""
        s = self.server.settings
        waited = reader.wait_s - self._rate_mark[0]
        if waited < s.receive_rate_window_s:
            return
        got = reader.bytes_read - self._rate_mark[1]
        if got < s.min_receive_bytes_per_s * waited:
            raise StreamError(f"receive rate: {got} bytes in {waited:.1f} s is under the "
                              f"minimum of {s.min_receive_bytes_per_s:g} bytes/s")
        self._rate_mark = (reader.wait_s, reader.bytes_read)

    def _busy(self) -> bool:
        s = self.server.settings
        return (len(self.jobs) >= s.max_jobs_per_connection
                or self.held_bytes > s.max_session_bytes
                or (self.raw is not None and self.raw.backlogged))

    async def _relieve(self) -> None:
        """Back-pressure: stop reading this client until its queued slices and the raw
        writer are below their limits; an error if the data held cannot shrink."""
        s = self.server.settings
        while True:
            running = {t for t in self.jobs if not t.done()}
            if not running or (len(running) < s.max_jobs_per_connection
                               and self.held_bytes <= s.max_session_bytes):
                break
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        if self.held_bytes > s.max_session_bytes:
            raise StreamError(
                f"buffered data: {self.held_bytes} bytes received and not reconstructed "
                f"(incomplete slices and noise scans) is over the limit of "
                f"{s.max_session_bytes} (--max-session-bytes)")
        if self.raw is not None and self.raw.backlogged:
            await self.raw.wait_space()

    # ---- sending
    def _drop(self, reason: str) -> None:
        if self.dropped is None:
            self.dropped = reason
            self.log.warning("conn %d: dropped: %s", self.id, reason)
        self.writer.transport.abort()

    async def _drain(self) -> None:
        """Wait for the socket buffer (call with :attr:`lock` held); drop the client after
        ``write_timeout_s``."""
        timeout = self.server.settings.write_timeout_s
        try:
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except TimeoutError:
            self._drop(f"write timeout: the client read nothing for {timeout:g} s")
            raise _Dropped(self.dropped) from None

    def _write(self, data: bytes) -> None:
        if self.dropped is not None:
            raise _Dropped(self.dropped)
        self.writer.write(data)

    async def send(self, obj: Any) -> None:
        data = CLOSE_BYTES if obj is None else encode_message(obj)
        async with self.lock:
            self._write(data)
            await self._drain()

    async def send_image_bytes(self, blob: bytes) -> None:
        if self.mrd2:
            from mrharmony.formats.mrd2 import image_to_mrd2

            img = ismrmrd.Image.from_bytes(blob)
            async with self.lock:
                self.image_index += 1
                img.image_index = self.image_index & 0xFFFF
                await self._write_mrd2(self.encoder.items([image_to_mrd2(img)]))
                self.counts.images_sent += 1
            return
        buf = bytearray(struct.pack("<H", int(MessageId.IMAGE)) + blob)
        async with self.lock:
            self.image_index += 1
            struct.pack_into("<H", buf, 2 + _IMAGE_INDEX_OFFSET, self.image_index & 0xFFFF)
            self._write(bytes(buf))
            await self._drain()
            self.counts.images_sent += 1

    async def _write_mrd2(self, data: bytes) -> None:
        """Send bytes of the MRD v2 reply stream (call with :attr:`lock` held)."""
        self._write(data)
        await self._drain()

    async def send_text(self, text: str) -> None:
        if self.mrd2 or self.dropped is not None:
            return  # MRD v2 has no text message: the problem is logged (and saved)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send(text)
            self.counts.texts_sent += 1

    async def _send_error_and_close(self, text: str) -> None:
        await self.send_text(f"mrharmony error: {text}")
        if not self.mrd2 and self.dropped is None:  # an MRD v2 reply ends without its end
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send(None)

    # ---- receiving
    async def next_message(self):
        limits = self.server.settings.limits
        timeout = self.server.settings.idle_timeout_s
        try:
            async with asyncio.timeout(timeout):
                msg = await read_message(self.reader, limits=limits, decode_acquisitions=False)
        except TimeoutError:
            raise StreamError(f"timeout: nothing received for {timeout:g} s") from None
        name = msg.name
        self.counts.received[name] = self.counts.received.get(name, 0) + 1
        self.counts.bytes_in += msg.nbytes
        return msg

    async def run(self) -> None:
        self.log.info("conn %d: connected from %s", self.id, self.peer)
        reason = "closed by client"
        deadline = self.server.settings.session_timeout_s
        try:
            budget = asyncio.timeout(deadline if deadline > 0 else None)
            try:
                async with budget:
                    await self._serve()
            except TimeoutError:
                if not budget.expired():
                    raise
                raise StreamError(f"session deadline: connected for more than {deadline:g} s "
                                  "(--session-timeout-s)") from None
        except StreamError as exc:
            reason = f"error: {exc}"
            self.counts.errors.append(str(exc))
            self.log.warning("conn %d: %s", self.id, exc)
            await self._send_error_and_close(str(exc))
        except EndOfStream:
            reason = "client disconnected without CLOSE"
            self.log.warning("conn %d: %s", self.id, reason)
        except (ConnectionError, ssl.SSLError) as exc:
            reason = f"connection lost ({exc})"
            if self.dropped is None:
                self.log.warning("conn %d: %s", self.id, reason)
        except asyncio.CancelledError:
            reason = "cancelled at shutdown"
            raise
        except Exception as exc:  # a server-side fault: keep serving others
            reason = f"internal error: {_error_text(exc)}"
            self.counts.errors.append(reason)
            self.log.exception("conn %d: %s", self.id, reason)
            await self._send_error_and_close(reason)
        finally:
            if self.dropped is not None:
                reason = f"dropped: {self.dropped}"
                if self.dropped not in self.counts.errors:
                    self.counts.errors.append(self.dropped)
            for t in self.jobs | self.aux:
                t.cancel()
            if self.raw is not None:
                await self._close_raw(reason)
            await self._close_writer()
            self.log.info(
                "conn %d: %s after %.2f s; received %s (%d bytes); sent %d image(s), %d text(s)",
                self.id, reason, time.monotonic() - self.t0, self.counts.received,
                self.counts.bytes_in, self.counts.images_sent, self.counts.texts_sent)

    async def _close_writer(self) -> None:
        """Close the connection; a client that does not take the last bytes within
        ``write_timeout_s`` is cut off (the transport would linger otherwise)."""
        if self.dropped is None:
            with contextlib.suppress(Exception):
                self.writer.close()
                async with asyncio.timeout(self.server.settings.write_timeout_s):
                    await self.writer.wait_closed()
                return
        self.writer.transport.abort()

    async def _serve(self) -> None:
        timeout = self.server.settings.idle_timeout_s
        try:
            async with asyncio.timeout(timeout):
                first = await self.reader.peek(2)
                if first and is_mrd2_start(first):
                    first = await self.reader.peek(5)
        except TimeoutError:
            raise StreamError(f"timeout: nothing received for {timeout:g} s") from None
        if not first:
            raise EndOfStream("connection closed")
        if is_mrd2_start(first):
            if len(first) < 5:
                raise StreamError("MRD v2 stream: truncated yardl magic")
            self.mrd2 = True
            await self._serve_mrd2()
            return
        msg = await self.next_message()
        if msg.id == MessageId.CLOSE:
            await self.send(None)
            return
        if msg.id not in (MessageId.CONFIG_FILE, MessageId.CONFIG_TEXT):
            raise StreamError(f"{msg.name}: expected CONFIG_FILE or CONFIG_TEXT first")
        self.pipeline = pipeline_from_config(msg.value)
        self.log.info("conn %d: pipeline %s (method %s)", self.id, self.pipeline.name,
                      self.pipeline.method)
        msg = await self.next_message()
        if msg.id == MessageId.CLOSE:
            await self.send(None)
            return
        if msg.id != MessageId.HEADER:
            raise StreamError(f"{msg.name} before the HEADER")
        self.header = msg.value
        self.header_xml = msg.payload.decode("utf-8", errors="replace")  # as sent
        self._open_raw()
        settings = self.server.settings
        limits = settings.limits
        received = self.counts.received
        burst = 0
        while True:
            # complete acquisitions already buffered are taken without awaiting
            msg = self.reader.pop_acquisition(limits)
            if msg is not None:
                received["ACQUISITION"] = received.get("ACQUISITION", 0) + 1
                self.counts.bytes_in += msg.nbytes
                burst += 1
                if burst >= 256:  # a long burst yields to the other connections
                    burst = 0
                    await asyncio.sleep(0)
            else:
                msg = await self.next_message()
            if msg.id == MessageId.ACQUISITION:
                # AcquisitionHeader only: data are decoded in the worker
                self._on_acquisition(msg.value, msg.payload)
                if self._busy():
                    await self._relieve()
            elif msg.id == MessageId.CLOSE:
                break
            elif msg.id == MessageId.WAVEFORM:
                if self.raw is not None:
                    self.raw.append_waveform(msg.value)
            elif msg.id == MessageId.IMAGE:
                await self.send(msg.value)  # pass-through
            elif msg.id == MessageId.TEXT:
                self.log.info("conn %d: client text: %s", self.id, str(msg.value)[:200])
            elif msg.id == MessageId.NDARRAY:
                self.log.info("conn %d: NDARRAY %s ignored", self.id, msg.value.shape)
            else:
                raise StreamError(f"{msg.name}: not allowed after the HEADER")
        await self._finish()
        await self.send(None)

    # ---- raw files
    def _open_raw(self) -> None:
        settings = self.server.settings
        if settings.save_raw is not None:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            path = Path(settings.save_raw) / f"{stamp}_{os.getpid()}_conn{self.id:05d}.h5"
            self.raw = _RawSaver(path, self.header_xml, max_queue_bytes=settings.raw_queue_bytes,
                                 on_fail=self._on_raw_failed)

    def _on_raw_failed(self, reason: str) -> None:
        """The raw writer thread failed (on the loop): warn, keep reconstructing."""
        text = f"saving disabled: {reason}"
        self.counts.warnings.append(text)
        self.log.warning("conn %d: %s (the partial raw file was removed; the "
                         "reconstruction goes on)", self.id, text)
        if not self.mrd2 and self.dropped is None:
            task = asyncio.get_running_loop().create_task(
                self.send_text(f"mrharmony warning: {text}"))
            self.aux.add(task)
            task.add_done_callback(self.aux.discard)

    async def _close_raw(self, reason: str) -> None:
        raw = self.raw
        try:
            saved = await raw.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never a crash for a raw file
            self.log.error("conn %d: cannot finish the raw file %s: %s", self.id, raw.part, exc)
            return
        try:
            await asyncio.to_thread(self._write_log, raw.path, saved, reason)
        except OSError as exc:
            self.log.warning("conn %d: cannot write the connection log beside %s: %s",
                             self.id, raw.path, _describe(exc))

    def _write_log(self, path: Path, saved: Path | None, reason: str) -> None:
        doc = {
            "connection": self.id, "peer": self.peer, "reason": reason,
            "pipeline": self.pipeline.name if self.pipeline else None,
            "seconds": round(time.monotonic() - self.t0, 3),
            "received": self.counts.received, "bytes_received": self.counts.bytes_in,
            "acquisitions_saved": self.raw.count if saved is not None else 0,
            "images_sent": self.counts.images_sent, "texts_sent": self.counts.texts_sent,
            "errors": self.counts.errors, "warnings": self.counts.warnings,
            "raw_file": saved.name if saved is not None else None,
        }
        target = path.with_suffix(".json")
        with atomic_path(target, suffix=".tmp") as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")

    # ---- slices
    def _on_acquisition(self, head: Any, payload: bytes) -> None:
        """Group one acquisition (v1 header + wire bytes); submit completed slices."""
        if self.raw is not None:
            self.raw.append(payload)
        self.held_bytes += len(payload)
        groups = self.assembler.add(head, (head, payload))
        if groups:
            if self.raw is not None:
                self.raw.flush()  # slice complete: its lines go to disk
            for group in groups:
                self._submit(group)

    async def _finish(self) -> None:
        """Reconstruct what is incomplete at the end of the stream and wait for all jobs."""
        for group in self.assembler.flush():
            self._submit(group)
        if self.assembler.reopened:
            self.log.warning("conn %d: data arrived after slice(s) %s were complete", self.id,
                             sorted(set(self.assembler.reopened)))
        if self.raw is not None:
            await self.raw.sync()  # a write failure is reported before CLOSE
            await asyncio.sleep(0)  # its warning task starts
        pending = self.jobs | self.aux
        if pending:
            for res in await asyncio.gather(*pending, return_exceptions=True):
                if isinstance(res, Exception) and not isinstance(res, ConnectionError):
                    self.log.error("conn %d: sending failed: %s", self.id, _error_text(res),
                                   exc_info=res)
        if self.dropped is not None:
            raise _Dropped(self.dropped)

    def _count(self, name: str) -> None:
        self.counts.received[name] = self.counts.received.get(name, 0) + 1

    async def _serve_mrd2(self) -> None:
        """An MRD v2 (yardl) session: header, stream items, end of stream.

        The pipeline is the header's user parameter string ``mrharmony.config`` (a
        config name or XML, as CONFIG_FILE/CONFIG_TEXT), else ``default.xml``.
        Acquisitions are converted to v1 wire bytes in the decoder thread and go through
        the same slice assembly and reconstruction as a v1 stream; images go back as an
        MRD v2 stream (the header, then the images, then the end of the stream).
        """
        from mrharmony.formats.header import header_to_xml
        from mrharmony.formats.mrd2 import Mrd2Encoder, header_from_mrd2
        from mrharmony.recon.stream.protocol import parse_header_xml

        settings = self.server.settings
        limits = settings.limits
        source = Mrd2Source(self.reader, limits=limits, idle_timeout_s=settings.idle_timeout_s,
                            transform=functools.partial(_mrd2_item, limits=limits))
        try:
            kind, header = await source.next()
            self._count("MRD2_HEADER")
            if header is None:
                raise StreamError("MRD v2 stream: no header (the reconstruction needs one)")
            config = next((p.value for p in (header.user_parameters.user_parameter_string
                                             if header.user_parameters else [])
                           if p.name == MRD2_CONFIG_PARAMETER), "default.xml")
            self.pipeline = pipeline_from_config(config)
            self.log.info("conn %d: MRD v2, pipeline %s (method %s)", self.id,
                          self.pipeline.name, self.pipeline.method)
            try:
                xml = header_to_xml(header_from_mrd2(header))
            except ValueError as exc:
                raise StreamError(f"MRD v2 header: {exc}") from None
            self.header = parse_header_xml(xml, source="MRD v2 header")
            self.header_xml = xml
            self._open_raw()
            self.encoder = Mrd2Encoder()
            async with self.lock:
                await self._write_mrd2(self.encoder.begin(header))
            while True:
                kind, value = await source.next()
                if kind == "end":
                    break
                name, obj = value
                self._count(name)
                if name == "ACQUISITION":
                    self._on_acquisition(*obj)
                    if self._busy():
                        await self._relieve()
                elif name == "IMAGE":  # pass-through, as in a Gadgetron chain
                    async with self.lock:
                        await self._write_mrd2(self.encoder.items([obj]))
                elif name == "WAVEFORM":
                    if self.raw is not None:
                        self.raw.append_waveform(obj)
                else:
                    self.log.info("conn %d: MRD v2 %s ignored", self.id, name)
            self.counts.bytes_in = source.bytes_in
            await self._finish()
            async with self.lock:
                await self._write_mrd2(self.encoder.end())
        finally:
            self.counts.bytes_in = source.bytes_in
            source.close()

    def _submit(self, group: list[Any]) -> None:
        self.counts.groups += 1
        nbytes = sum(len(b) for h, b in group if not int(h.flags) & _NOISE)
        task = asyncio.create_task(self._job(group, nbytes))
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    async def _job(self, group: list[Any], nbytes: int) -> None:
        noise_bit = _NOISE
        first = next((h for h, _ in group if not int(h.flags) & noise_bit), group[0][0])
        where = f"slice {int(first.idx.slice)} repetition {int(first.idx.repetition)}"
        try:
            blobs = await self.server.schedule_job(self.id, self.header_xml,
                                                   [b for _, b in group], self.pipeline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure reaches the client, with a traceback in the log
            text = f"{where}: reconstruction failed: {_error_text(exc)}"
            self.counts.errors.append(text)
            self.log.error("conn %d: %s", self.id, text, exc_info=exc)
            await self.send_text(f"mrharmony error: {text}")
            return
        finally:
            self.held_bytes -= nbytes
        for blob in blobs:
            await self.send_image_bytes(blob)
        self.log.debug("conn %d: %s: sent %d image(s)", self.id, where, len(blobs))
