"""One client connection of the streaming server (MRD v1 messages or an MRD v2 stream).

:class:`_Session` reads the config, the header and the acquisitions (complete ones taken
in bulk from the receive buffer), groups them into slices (:mod:`.assembly`), hands
completed slices to the server's fair scheduler, sends the images back under a write
timeout, and applies every per-connection guarantee: idle and session timeouts, the
minimum receive rate, the bytes-held and jobs-per-connection caps (back-pressure), errors
to the client as TEXT + CLOSE, raw saving in its own thread (:mod:`.rawsave`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import ssl
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ismrmrd
import numpy as np

from mrharmony.errors import StreamError
from mrharmony.fileio import atomic_path
from mrharmony.recon.stream.assembly import _NOISE, SliceAssembler
from mrharmony.recon.stream.pipelines import MRD2_CONFIG_PARAMETER, Pipeline, pipeline_from_config
from mrharmony.recon.stream.protocol import (
    CLOSE_BYTES,
    AcquisitionBytes,
    EndOfStream,
    MessageId,
    MessageReader,
    Mrd2Source,
    StreamLimits,
    acquisition_key,
    encode_message,
    is_mrd2_start,
    read_message,
)
from mrharmony.recon.stream.rawsave import _describe, _RawSaver

if TYPE_CHECKING:
    from mrharmony.recon.stream.server import StreamServer

log = logging.getLogger("mrharmony.stream")

_IMAGE_INDEX_OFFSET = ismrmrd.ImageHeader.image_index.offset


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

    async def _fill(self, n: int) -> bool:
        """Buffer ``n`` bytes (an acquisition being received) under the idle timeout;
        False if the connection ended first (:meth:`next_message` then says how)."""
        timeout = self.server.settings.idle_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.fill(n)
        except TimeoutError:
            raise StreamError(f"timeout: nothing received for {timeout:g} s") from None

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
        max_bytes = settings.max_session_bytes
        while True:
            # complete acquisitions already buffered are taken in bulk, without awaiting
            batch = self.reader.pop_acquisitions(limits)
            if batch:
                received["ACQUISITION"] = received.get("ACQUISITION", 0) + len(batch)
                self.counts.bytes_in += sum(len(a.payload) for a in batch) + 2 * len(batch)
                for item in batch:
                    # back-pressure as before, per acquisition: a new job, bytes held
                    # over the limit, or the raw writer behind
                    if ((self._on_acquisition(item) or self.held_bytes > max_bytes
                         or (self.raw is not None and self.raw.backlogged))
                            and self._busy()):
                        await self._relieve()
                await asyncio.sleep(0)  # a long burst yields to the other connections
                continue
            need = self.reader.acquisition_bytes_needed(limits)
            if need and await self._fill(need):
                continue  # more data buffered: taken in bulk above
            msg = await self.next_message()
            if msg.id == MessageId.ACQUISITION:
                # the header's fields only: data are decoded in the worker
                self._on_acquisition(acquisition_key(msg.payload))
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
    def _on_acquisition(self, item: AcquisitionBytes) -> bool:
        """Group one acquisition (grouping fields + wire bytes); submit completed slices.
        True if a slice was submitted."""
        payload = item.payload
        if item.flags & _NOISE and isinstance(payload, memoryview):
            # noise scans are kept for the whole session: their own bytes, not a view
            # that would keep the whole received block alive
            item = item._replace(payload=bytes(payload))
        if self.raw is not None:
            self.raw.append(item.payload)
        self.held_bytes += len(payload)
        groups = self.assembler.add_key(item.flags, item.slice, item.repetition, item)
        if not groups:
            return False
        if self.raw is not None:
            self.raw.flush()  # slice complete: its lines go to disk
        for group in groups:
            self._submit(group)
        return True

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
                    self._on_acquisition(acquisition_key(obj[1]))
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

    def _submit(self, group: list[AcquisitionBytes]) -> None:
        self.counts.groups += 1
        nbytes = sum(len(a.payload) for a in group if not a.flags & _NOISE)
        task = asyncio.create_task(self._job(group, nbytes))
        self.jobs.add(task)
        task.add_done_callback(self.jobs.discard)

    async def _job(self, group: list[AcquisitionBytes], nbytes: int) -> None:
        first = next((a for a in group if not a.flags & _NOISE), group[0])
        where = f"slice {first.slice} repetition {first.repetition}"
        try:
            blobs = await self.server.schedule_job(self.id, self.header_xml,
                                                   [a.payload for a in group], self.pipeline)
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
