"""``--save-raw``: one ISMRMRD file per connection, written off the event loop.

:class:`_RawSaver` feeds a :class:`~mrharmony.formats.raw.RawStreamWriter` in its own
thread through a queue bounded in bytes (the session stops reading while the disk is
behind); any failure disables saving for that connection only and removes the partial
file. :func:`check_raw_dir` checks the folder at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import tempfile
import threading
from concurrent.futures import Future as _ThreadFuture
from pathlib import Path
from typing import Any

from mrharmony.errors import StreamError
from mrharmony.formats.raw import RawStreamWriter

__all__ = ["check_raw_dir"]


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
