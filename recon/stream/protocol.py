"""MRD (Gadgetron/ISMRMRD) streaming messages on asyncio streams, with limits.

The message formats are those of :mod:`ismrmrd.serialization` (``ProtocolSerializer``
and ``ProtocolDeserializer``), which this module uses to encode and decode every
message. What they lack for a network server is added here:

* incremental asynchronous reads (``StreamReader.readexactly``): a message is only
  decoded once all of its bytes have arrived, so a slow client never blocks the loop;
* limits checked from the fixed-size part of a message *before* its payload is read
  (header XML size, samples x channels, image size, text size), so a hostile length
  field cannot make the server allocate gigabytes;
* message-id validation and a distinction between a clean end of stream (at a message
  boundary) and a truncated message;
* a safe ISMRMRD XML header parse (no DTD / entities) with a :class:`StreamError`
  naming the problem.

:class:`Mrd2Source` decodes the other protocol a connection may speak, MRD v2 (a yardl
binary stream, ``mrd-python``), with the same kind of limits (:func:`mrd2_field_limit`);
:func:`is_mrd2_start` tells the two apart from the first bytes.

Wire format (little-endian): ``uint16`` message id, then

=====  ==================  ====================================================
id     name                payload
=====  ==================  ====================================================
1      CONFIG_FILE         1024 bytes, NUL-padded config name (``default.xml``)
2      CONFIG_TEXT         ``uint32`` length + XML text
3      HEADER              ``uint32`` length + ISMRMRD header XML
4      CLOSE               none
5      TEXT                ``uint32`` length + UTF-8 text
1008   ACQUISITION         340-byte header, trajectory (float32), data (complex64)
1022   IMAGE               198-byte header, ``uint64`` attribute length + XML, data
1026   WAVEFORM            40-byte header, data (uint32)
1030   NDARRAY             ``uint16`` type, version, ndim, ``uint64`` dims, data
=====  ==================  ====================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import ismrmrd
import numpy as np
from ismrmrd.image import get_dtype_from_data_type
from ismrmrd.serialization import (
    ConfigFile,
    ConfigText,
    ISMRMRDMessageID,
    ProtocolDeserializer,
    ProtocolSerializer,
)

from mrharmony.errors import MrHarmonyError, StreamError
from mrharmony.formats.header import parse_ismrmrd_header

__all__ = [
    "CLOSE_BYTES",
    "KNOWN_IDS",
    "AcquisitionBytes",
    "ConfigFile",
    "ConfigText",
    "EndOfStream",
    "Message",
    "MessageId",
    "MessageReader",
    "Mrd2Source",
    "StreamLimits",
    "acquisition_key",
    "acquisition_sizes",
    "decode_acquisition",
    "decode_acquisitions",
    "encode_message",
    "is_mrd2_start",
    "mrd2_field_limit",
    "parse_header_xml",
    "read_message",
    "write_message",
]

MessageId = ISMRMRDMessageID
KNOWN_IDS = frozenset(int(m) for m in ISMRMRDMessageID if m != ISMRMRDMessageID.UNPEEKED)
CLOSE_BYTES = struct.pack("<H", int(MessageId.CLOSE))

_ACQ_HEADER_BYTES = ctypes.sizeof(ismrmrd.AcquisitionHeader)  # 340
_IMAGE_HEADER_BYTES = ctypes.sizeof(ismrmrd.ImageHeader)  # 198
_WAVEFORM_HEADER_BYTES = ctypes.sizeof(ismrmrd.WaveformHeader)  # 40
_CONFIG_FILE_BYTES = 1024
# (number_of_samples, available_channels, active_channels) are adjacent uint16 fields
_ACQ_SIZES = struct.Struct("<HxxH")
_ACQ_SIZES_OFFSET = ismrmrd.AcquisitionHeader.number_of_samples.offset
_ACQ_TRAJ_DIMS = struct.Struct("<H")
_ACQ_TRAJ_DIMS_OFFSET = ismrmrd.AcquisitionHeader.trajectory_dimensions.offset
# flags (uint64) and the slice and repetition counters (uint16) the slice assembly needs
_ACQ_FLAGS = struct.Struct("<Q")
_ACQ_FLAGS_OFFSET = ismrmrd.AcquisitionHeader.flags.offset
_ACQ_SLICE_OFFSET = ismrmrd.AcquisitionHeader.idx.offset + ismrmrd.EncodingCounters.slice.offset
_ACQ_REP_OFFSET = (ismrmrd.AcquisitionHeader.idx.offset
                   + ismrmrd.EncodingCounters.repetition.offset)
_ACQ_ID = int(ISMRMRDMessageID.ACQUISITION)
_ACQ_ID_LO, _ACQ_ID_HI = _ACQ_ID & 0xFF, _ACQ_ID >> 8
_NAMES = {int(m): m.name for m in ISMRMRDMessageID}


@dataclass(frozen=True)
class StreamLimits:
    """Size limits applied to incoming messages (checked before a payload is read).

    Attributes
    ----------
    max_config_bytes : int
        Largest CONFIG_TEXT payload (bytes).
    max_header_bytes : int
        Largest ISMRMRD XML header (bytes).
    max_text_bytes : int
        Largest TEXT payload (bytes).
    max_samples_x_channels : int
        Largest ``number_of_samples * active_channels`` of one acquisition (complex
        samples); 2**22 is 4 M samples = 32 MiB of complex64.
    max_trajectory_dimensions : int
        Largest ``trajectory_dimensions`` of one acquisition.
    max_waveform_values : int
        Largest ``number_of_samples * channels`` of one waveform.
    max_image_bytes : int
        Largest image payload (pixel data) in bytes.
    max_attribute_bytes : int
        Largest image attribute (meta XML) string in bytes.
    max_ndarray_bytes : int
        Largest NDARRAY payload in bytes.
    """

    max_config_bytes: int = 1 << 20
    max_header_bytes: int = 4 << 20
    max_text_bytes: int = 1 << 20
    max_samples_x_channels: int = 1 << 22
    max_trajectory_dimensions: int = 4
    max_waveform_values: int = 1 << 20
    max_image_bytes: int = 1 << 30
    max_attribute_bytes: int = 4 << 20
    max_ndarray_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if int(value) < 0:
                raise StreamError(f"StreamLimits.{name}: {value} is negative")


class AcquisitionBytes(NamedTuple):
    """An ACQUISITION as the server's receive loop keeps it: the fields that group it
    into slices and its wire bytes (decoded later, in a worker).

    Attributes
    ----------
    flags : int
        ``AcquisitionHeader.flags``.
    slice, repetition : int
        ``idx.slice`` and ``idx.repetition``.
    payload : bytes or memoryview
        The message bytes after the id (header, trajectory, data).
    """

    flags: int
    slice: int
    repetition: int
    payload: bytes | memoryview


def acquisition_key(payload: bytes | memoryview) -> AcquisitionBytes:
    """:class:`AcquisitionBytes` of one ACQUISITION payload (bytes after the id), its
    sizes unchecked (:func:`acquisition_sizes` checks them)."""
    if len(payload) < _ACQ_HEADER_BYTES:
        raise StreamError(f"ACQUISITION: {len(payload)} bytes is shorter than the "
                          f"{_ACQ_HEADER_BYTES}-byte acquisition header")
    (flags,) = _ACQ_FLAGS.unpack_from(payload, _ACQ_FLAGS_OFFSET)
    (slice_,) = _ACQ_TRAJ_DIMS.unpack_from(payload, _ACQ_SLICE_OFFSET)
    (rep,) = _ACQ_TRAJ_DIMS.unpack_from(payload, _ACQ_REP_OFFSET)
    return AcquisitionBytes(flags, slice_, rep, payload)


class EndOfStream(Exception):
    """The peer closed the connection cleanly at a message boundary (no CLOSE sent)."""


@dataclass
class Message:
    """One decoded message.

    Attributes
    ----------
    id : int
        Message id (:class:`MessageId`).
    value : Any
        The decoded object: :class:`ConfigFile`, :class:`ConfigText`, ISMRMRD header,
        ``str`` (TEXT), :class:`ismrmrd.Acquisition`, :class:`ismrmrd.Image`,
        :class:`ismrmrd.Waveform`, ``numpy.ndarray`` or None (CLOSE).
    nbytes : int
        Bytes on the wire, id included.
    payload : bytes
        The message bytes after the id for ACQUISITION, IMAGE, WAVEFORM and NDARRAY
        (what ``ismrmrd`` objects' ``to_bytes`` gives), the XML text as received for
        HEADER, empty otherwise.
    """

    id: int
    value: Any
    nbytes: int
    payload: bytes = b""

    @property
    def name(self) -> str:
        """Protocol name of the message (``ACQUISITION``, ...)."""
        return _NAMES.get(self.id, str(self.id))


def message_name(msg_id: int) -> str:
    """Protocol name of a message id (the number itself when unknown)."""
    return _NAMES.get(int(msg_id), str(msg_id))


async def _read(reader: asyncio.StreamReader, n: int, what: str) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as exc:
        raise StreamError(
            f"{what}: truncated message, expected {n} bytes, got {len(exc.partial)} "
            "before the connection ended"
        ) from None


def _over(what: str, field: str, value: int, limit: int) -> StreamError:
    return StreamError(f"{what}: {field} = {value} is over the limit of {limit}")


async def _read_length_prefixed(
    reader: asyncio.StreamReader, what: str, limit: int, field: str
) -> tuple[bytes, bytes]:
    raw_len = await _read(reader, 4, what)
    (length,) = struct.unpack("<I", raw_len)
    if length > limit:
        raise _over(what, field, length, limit)
    return raw_len, await _read(reader, length, what)


def parse_header_xml(xml: bytes | str, *, source: str = "HEADER") -> Any:
    """Parse the ISMRMRD header of a stream (:func:`mrharmony.formats.header.parse_ismrmrd_header`
    with :class:`StreamError`): no DTDs or entities in any encoding, schema-valid, with an
    ``<encoding>``.
    """
    return parse_ismrmrd_header(xml, source=source, error=StreamError)


def _deserialize(blob: bytes) -> Any:
    """Decode one complete message (id included) with ismrmrd's ProtocolDeserializer."""
    return next(ProtocolDeserializer(io.BytesIO(blob)).deserialize())


async def read_message(
    reader: asyncio.StreamReader | MessageReader, *, limits: StreamLimits | None = None,
    decode_acquisitions: bool = True,
) -> Message:
    """Read and decode the next message, checking ids and limits before payloads.

    Parameters
    ----------
    reader : asyncio.StreamReader or MessageReader
        The connection.
    limits : StreamLimits, optional
        Size limits (defaults: :class:`StreamLimits`).
    decode_acquisitions : bool
        False: an ACQUISITION's ``value`` is only its :class:`ismrmrd.AcquisitionHeader`
        (flags and counters) and the data stay in ``payload``, to be decoded elsewhere
        (a worker) with :meth:`ismrmrd.Acquisition.from_bytes`.

    Returns
    -------
    Message

    Raises
    ------
    EndOfStream
        The peer closed the connection before the first byte of a message.
    StreamError
        Truncated message, unknown message id, a length over a limit, or a payload
        that does not decode (for a HEADER: invalid ISMRMRD XML).
    """
    limits = limits or StreamLimits()
    try:
        raw_id = await reader.readexactly(2)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EndOfStream("connection closed") from None
        raise StreamError("message id: truncated message, expected 2 bytes, got 1 before "
                          "the connection ended") from None
    (msg_id,) = struct.unpack("<H", raw_id)
    if msg_id not in KNOWN_IDS:
        raise StreamError(
            f"message id {msg_id}: unknown (expected one of {sorted(KNOWN_IDS)})"
        )
    what = message_name(msg_id)
    parts = [raw_id]
    if msg_id == MessageId.CLOSE:
        return Message(msg_id, None, 2)
    if msg_id == MessageId.CONFIG_FILE:
        payload = await _read(reader, _CONFIG_FILE_BYTES, what)
        try:
            name = payload.split(b"\x00", 1)[0].decode("utf-8")
        except UnicodeDecodeError:
            raise StreamError(f"{what}: the config name is not UTF-8") from None
        return Message(msg_id, ConfigFile(name), 2 + _CONFIG_FILE_BYTES)
    if msg_id in (MessageId.CONFIG_TEXT, MessageId.TEXT, MessageId.HEADER):
        limit, field = {
            MessageId.CONFIG_TEXT: (limits.max_config_bytes, "config length"),
            MessageId.TEXT: (limits.max_text_bytes, "text length"),
            MessageId.HEADER: (limits.max_header_bytes, "header length"),
        }[msg_id]
        raw_len, body = await _read_length_prefixed(reader, what, limit, field)
        nbytes = 6 + len(body)
        if msg_id == MessageId.HEADER:
            return Message(msg_id, parse_header_xml(body, source=what), nbytes, body)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise StreamError(f"{what}: the payload is not UTF-8 text") from None
        value = ConfigText(text) if msg_id == MessageId.CONFIG_TEXT else text
        return Message(msg_id, value, nbytes)
    if msg_id == MessageId.ACQUISITION:
        # fast path: the sizes come from the fixed-size header with struct, the arrays
        # are decoded with np.frombuffer (no per-field Python, no deep copies)
        head_bytes = await _read(reader, _ACQ_HEADER_BYTES, what)
        ns, nc = _ACQ_SIZES.unpack_from(head_bytes, _ACQ_SIZES_OFFSET)
        (nt,) = _ACQ_TRAJ_DIMS.unpack_from(head_bytes, _ACQ_TRAJ_DIMS_OFFSET)
        if ns * nc > limits.max_samples_x_channels:
            raise _over(what, f"samples x channels ({ns} x {nc})", ns * nc,
                        limits.max_samples_x_channels)
        if nt > limits.max_trajectory_dimensions:
            raise _over(what, "trajectory_dimensions", nt, limits.max_trajectory_dimensions)
        body = await _read(reader, 4 * ns * nt + 8 * ns * nc, what)
        payload = head_bytes + body
        if not decode_acquisitions:
            head = ismrmrd.AcquisitionHeader.from_buffer_copy(head_bytes)
            return Message(msg_id, head, 2 + len(payload), payload)
        return Message(msg_id, decode_acquisition(payload), 2 + len(payload), payload)
    elif msg_id == MessageId.WAVEFORM:
        head_bytes = await _read(reader, _WAVEFORM_HEADER_BYTES, what)
        head = ismrmrd.WaveformHeader.from_buffer_copy(head_bytes)
        n = int(head.number_of_samples) * int(head.channels)
        if n > limits.max_waveform_values:
            raise _over(what, "samples x channels", n, limits.max_waveform_values)
        parts += [head_bytes, await _read(reader, 4 * n, what)]
    elif msg_id == MessageId.IMAGE:
        head_bytes = await _read(reader, _IMAGE_HEADER_BYTES, what)
        head = ismrmrd.ImageHeader.from_buffer_copy(head_bytes)
        try:
            itemsize = get_dtype_from_data_type(int(head.data_type)).itemsize
        except TypeError:
            raise StreamError(f"{what}: unknown image data_type {int(head.data_type)}") from None
        n = int(head.channels) * int(head.matrix_size[0]) * int(head.matrix_size[1]) * int(
            head.matrix_size[2])
        if n * itemsize > limits.max_image_bytes:
            raise _over(what, "pixel bytes", n * itemsize, limits.max_image_bytes)
        raw_len = await _read(reader, 8, what)
        (attr_len,) = struct.unpack("<Q", raw_len)
        if attr_len > limits.max_attribute_bytes:
            raise _over(what, "attribute length", attr_len, limits.max_attribute_bytes)
        parts += [head_bytes, raw_len, await _read(reader, attr_len + n * itemsize, what)]
    else:  # NDARRAY
        fixed = await _read(reader, 6, what)
        dtype_code, _ver, ndim = struct.unpack("<HHH", fixed)
        if ndim > 8:
            raise _over(what, "ndim", ndim, 8)
        dims_raw = await _read(reader, 8 * ndim, what)
        dims = struct.unpack("<" + "Q" * ndim, dims_raw)
        try:
            itemsize = get_dtype_from_data_type(dtype_code).itemsize
        except TypeError:
            raise StreamError(f"{what}: unknown data type {dtype_code}") from None
        n = 1
        for d in dims:
            n *= int(d)
        if n * itemsize > limits.max_ndarray_bytes:
            raise _over(what, "bytes", n * itemsize, limits.max_ndarray_bytes)
        parts += [fixed, dims_raw, await _read(reader, n * itemsize, what)]
    blob = b"".join(parts)
    try:
        value = _deserialize(blob)
    except (ValueError, TypeError, EOFError, UnicodeDecodeError) as exc:
        raise StreamError(f"{what}: payload does not decode ({exc})") from None
    return Message(msg_id, value, len(blob), blob[2:])


def acquisition_sizes(payload: bytes | memoryview, *,
                      what: str = "ACQUISITION") -> tuple[int, int, int]:
    """``(number_of_samples, active_channels, trajectory_dimensions)`` of an ACQUISITION
    payload (bytes after the id), read with ``struct`` from its fixed-size header.

    Raises
    ------
    StreamError
        If the payload length does not match these sizes.
    """
    if len(payload) < _ACQ_HEADER_BYTES:
        raise StreamError(f"{what}: {len(payload)} bytes is shorter than the "
                          f"{_ACQ_HEADER_BYTES}-byte acquisition header")
    ns, nc = _ACQ_SIZES.unpack_from(payload, _ACQ_SIZES_OFFSET)
    (nt,) = _ACQ_TRAJ_DIMS.unpack_from(payload, _ACQ_TRAJ_DIMS_OFFSET)
    expected = _ACQ_HEADER_BYTES + 4 * ns * nt + 8 * ns * nc
    if len(payload) != expected:
        raise StreamError(f"{what}: payload is {len(payload)} bytes, the header "
                          f"({ns} samples x {nc} channels, {nt} trajectory dimensions) "
                          f"needs {expected}")
    return ns, nc, nt


def decode_acquisition(payload: bytes | memoryview, *, what: str = "ACQUISITION") -> Any:
    """Decode one ACQUISITION payload (header, trajectory, data; no message id).

    Equivalent to :meth:`ismrmrd.Acquisition.from_bytes` (same header, ``data`` of shape
    ``(active_channels, number_of_samples)`` complex64 and ``traj`` of shape
    ``(number_of_samples, trajectory_dimensions)`` float32, both owned, aligned and
    writable), without its per-field Python paths: one ``from_buffer_copy`` of the
    fixed-size header and one ``np.frombuffer`` per array.

    Parameters
    ----------
    payload : bytes or memoryview
        The message bytes after the ``uint16`` id.
    what : str
        Name used in error messages.

    Returns
    -------
    ismrmrd.Acquisition

    Raises
    ------
    StreamError
        If the payload length does not match the sizes in its header.
    """
    ns, nc, nt = acquisition_sizes(payload, what=what)
    head = ismrmrd.AcquisitionHeader.from_buffer_copy(payload)
    off = _ACQ_HEADER_BYTES
    traj = np.frombuffer(payload, np.float32, count=ns * nt, offset=off).reshape(ns, nt).copy()
    data = np.frombuffer(payload, np.complex64, count=ns * nc,
                         offset=off + 4 * ns * nt).reshape(nc, ns).copy()
    return ismrmrd.Acquisition(head, data=data, trajectory=traj)


def decode_acquisitions(payloads: list[bytes], *, what: str = "ACQUISITION") -> list[Any]:
    """Decode many ACQUISITION payloads, batching those of equal size.

    Acquisitions with the same ``(number_of_samples, active_channels,
    trajectory_dimensions)`` are decoded together: their bytes are joined once and their
    trajectories and data are cut out as two stacked arrays (one copy each); every
    :class:`ismrmrd.Acquisition` holds a view of one row. The result equals
    ``[decode_acquisition(p) for p in payloads]`` (and :meth:`ismrmrd.Acquisition.from_bytes`).

    Parameters
    ----------
    payloads : list of bytes
        Message bytes after the id, in order.
    what : str
        Name used in error messages.

    Returns
    -------
    list of ismrmrd.Acquisition
        In the order of ``payloads``.

    Raises
    ------
    StreamError
        If a payload length does not match the sizes in its header.
    """
    by_size: dict[tuple[int, int, int], list[int]] = {}
    for i, p in enumerate(payloads):
        by_size.setdefault(acquisition_sizes(p, what=what), []).append(i)
    out: list[Any] = [None] * len(payloads)
    from_buffer_copy = ismrmrd.AcquisitionHeader.from_buffer_copy
    acquisition = ismrmrd.Acquisition
    off = _ACQ_HEADER_BYTES
    for (ns, nc, nt), idx in by_size.items():
        if len(idx) == 1:
            out[idx[0]] = decode_acquisition(payloads[idx[0]], what=what)
            continue
        rows = np.frombuffer(b"".join([payloads[i] for i in idx]), np.uint8).reshape(len(idx), -1)
        doff = off + 4 * ns * nt
        trajs = rows[:, off:doff].copy().view(np.float32).reshape(len(idx), ns, nt)
        datas = rows[:, doff:].copy().view(np.complex64).reshape(len(idx), nc, ns)
        for k, i in enumerate(idx):
            out[i] = acquisition(from_buffer_copy(payloads[i]), data=datas[k], trajectory=trajs[k])
    return out


class MessageReader:
    """A buffered reader for a server's receive loop: many messages per socket read.

    It wraps an :class:`asyncio.StreamReader`, reads from it in chunks of up to
    ``chunk_bytes`` and serves :meth:`readexactly` from its own buffer, so
    :func:`read_message` accepts it in place of the StreamReader (same results, same
    errors). :meth:`pop_acquisitions` takes, without awaiting, every ACQUISITION that
    is already complete in the buffer (:meth:`pop_acquisition` one of them), which takes
    the per-message cost of the event loop (three ``readexactly`` awaits, a timeout, a
    header object and a copy of the payload per acquisition) down to a few ``struct``
    reads and one copy per run of acquisitions.

    Parameters
    ----------
    reader : asyncio.StreamReader
        The connection.
    chunk_bytes : int
        Largest single read from ``reader`` (bytes).
    on_receive : callable, optional
        Called with the reader after every read from the connection (after
        :attr:`wait_s` and :attr:`bytes_read` are updated); an exception it raises ends
        the read (the server's minimum receive rate).

    Attributes
    ----------
    wait_s : float
        Seconds spent waiting for the connection's reads (time the caller was not
        waiting for it, e.g. while the server applies back-pressure, is not counted).
    bytes_read : int
        Bytes received from the connection.
    """

    def __init__(self, reader: asyncio.StreamReader, *, chunk_bytes: int = 1 << 20,
                 on_receive: Callable[[MessageReader], None] | None = None) -> None:
        self._reader = reader
        self._buf = bytearray()
        self._chunk = int(chunk_bytes)
        self.on_receive = on_receive
        self.wait_s = 0.0
        self.bytes_read = 0

    async def _recv(self, n: int) -> bytes:
        """One read from the connection, timed: :attr:`wait_s` (s) and :attr:`bytes_read`
        accumulate, then ``on_receive(self)`` runs (it may raise to end the connection,
        e.g. a receive rate below a minimum)."""
        t0 = time.monotonic()
        chunk = await self._reader.read(n)
        self.wait_s += time.monotonic() - t0
        self.bytes_read += len(chunk)
        if self.on_receive is not None:
            self.on_receive(self)
        return chunk

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not yet consumed."""
        return len(self._buf)

    async def readexactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes (as :meth:`asyncio.StreamReader.readexactly`).

        Raises
        ------
        asyncio.IncompleteReadError
            The connection ended first; ``partial`` holds what was received.
        """
        buf = self._buf
        while len(buf) < n:
            chunk = await self._recv(max(self._chunk, n - len(buf)))
            if not chunk:
                partial = bytes(buf)
                buf.clear()
                raise asyncio.IncompleteReadError(partial, n)
            buf += chunk
        with memoryview(buf) as view:
            out = bytes(view[:n])
        del buf[:n]  # O(1) in CPython: the bytearray start moves
        return out

    async def peek(self, n: int) -> bytes:
        """The next ``n`` bytes without consuming them (fewer if the connection ends
        first; empty at its end)."""
        buf = self._buf
        while len(buf) < n:
            chunk = await self._recv(max(self._chunk, n - len(buf)))
            if not chunk:
                break
            buf += chunk
        return bytes(buf[:n])

    async def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes: what is buffered, else what one read returns (empty only at
        the end of the connection)."""
        buf = self._buf
        if not buf:
            return await self._recv(max(1, min(n, self._chunk)))
        out = bytes(buf[:n])
        del buf[:len(out)]
        return out

    async def fill(self, n: int) -> bool:
        """Read until at least ``n`` bytes are buffered (nothing is consumed); False if
        the connection ended first."""
        buf = self._buf
        while len(buf) < n:
            chunk = await self._recv(max(self._chunk, n - len(buf)))
            if not chunk:
                return False
            buf += chunk
        return True

    def acquisition_bytes_needed(self, limits: StreamLimits) -> int:
        """Bytes to buffer before the next message, an ACQUISITION, is complete: its
        whole size once its fixed header is buffered, else that header's size; 1 for an
        empty buffer (a message must follow); 0 when the next message is another kind,
        is over a limit, or is complete (:func:`read_message` takes it then)."""
        buf = self._buf
        if not buf:
            return 1
        if len(buf) < 2 or buf[0] != _ACQ_ID_LO or buf[1] != _ACQ_ID_HI:
            return 0
        head = 2 + _ACQ_HEADER_BYTES
        if len(buf) < head:
            return head
        ns, nc = _ACQ_SIZES.unpack_from(buf, 2 + _ACQ_SIZES_OFFSET)
        (nt,) = _ACQ_TRAJ_DIMS.unpack_from(buf, 2 + _ACQ_TRAJ_DIMS_OFFSET)
        if ns * nc > limits.max_samples_x_channels or nt > limits.max_trajectory_dimensions:
            return 0
        n = head + 4 * ns * nt + 8 * ns * nc
        return n if len(buf) < n else 0

    def pop_acquisitions(self, limits: StreamLimits, max_count: int = 256
                         ) -> list[AcquisitionBytes]:
        """All ACQUISITION messages already complete at the front of the buffer (up to
        ``max_count``), taken in bulk without awaiting.

        The sizes, flags and counters are read with ``struct`` from the buffer; the
        messages are cut out with one copy for the whole run, and every payload is a
        ``memoryview`` of that copy (no per-acquisition copy or header object).
        Stops at the first message that is not an acquisition, is incomplete, or is over
        a limit (:func:`read_message` then reads it and raises the error).

        Returns
        -------
        list of AcquisitionBytes
            Possibly empty; each payload is the wire bytes after the id.
        """
        buf = self._buf
        end = len(buf)
        head = 2 + _ACQ_HEADER_BYTES
        max_snc, max_nt = limits.max_samples_x_channels, limits.max_trajectory_dimensions
        sizes_at, traj_at = 2 + _ACQ_SIZES_OFFSET, 2 + _ACQ_TRAJ_DIMS_OFFSET
        flags_at, slice_at, rep_at = (2 + _ACQ_FLAGS_OFFSET, 2 + _ACQ_SLICE_OFFSET,
                                      2 + _ACQ_REP_OFFSET)
        unpack_sizes, unpack_u16 = _ACQ_SIZES.unpack_from, _ACQ_TRAJ_DIMS.unpack_from
        unpack_flags = _ACQ_FLAGS.unpack_from
        found: list[tuple[int, int, int, int, int]] = []
        pos = 0
        while len(found) < max_count:
            if end - pos < head or buf[pos] != _ACQ_ID_LO or buf[pos + 1] != _ACQ_ID_HI:
                break
            ns, nc = unpack_sizes(buf, pos + sizes_at)
            (nt,) = unpack_u16(buf, pos + traj_at)
            if ns * nc > max_snc or nt > max_nt:
                break
            n = head + 4 * ns * nt + 8 * ns * nc
            if end - pos < n:
                break
            found.append((pos, n, unpack_flags(buf, pos + flags_at)[0],
                          unpack_u16(buf, pos + slice_at)[0], unpack_u16(buf, pos + rep_at)[0]))
            pos += n
        if not found:
            return []
        with memoryview(buf) as view:
            block = memoryview(bytes(view[:pos]))
        del buf[:pos]
        return [AcquisitionBytes(flags, slice_, rep, block[p + 2:p + n])
                for p, n, flags, slice_, rep in found]

    def pop_acquisition(self, limits: StreamLimits) -> Message | None:
        """The next message if it is an ACQUISITION already complete in the buffer.

        Its value is the :class:`ismrmrd.AcquisitionHeader` and its payload the wire
        bytes after the id (as ``read_message(..., decode_acquisitions=False)``).
        Returns None otherwise (another message, an incomplete one, or one over a limit:
        :func:`read_message` then reads it and raises the error).
        """
        buf = self._buf
        if len(buf) < 2 + _ACQ_HEADER_BYTES or buf[0] != _ACQ_ID_LO or buf[1] != _ACQ_ID_HI:
            return None
        ns, nc = _ACQ_SIZES.unpack_from(buf, 2 + _ACQ_SIZES_OFFSET)
        (nt,) = _ACQ_TRAJ_DIMS.unpack_from(buf, 2 + _ACQ_TRAJ_DIMS_OFFSET)
        if ns * nc > limits.max_samples_x_channels or nt > limits.max_trajectory_dimensions:
            return None
        n = 2 + _ACQ_HEADER_BYTES + 4 * ns * nt + 8 * ns * nc
        if len(buf) < n:
            return None
        with memoryview(buf) as view:
            payload = bytes(view[2:n])
        del buf[:n]
        return Message(_ACQ_ID, ismrmrd.AcquisitionHeader.from_buffer_copy(payload), n, payload)


def encode_message(obj: Any) -> bytes:
    """Encode one object as an MRD message with :class:`ProtocolSerializer`.

    Parameters
    ----------
    obj : ConfigFile, ConfigText, ismrmrdHeader, str, Acquisition, Image, Waveform or ndarray
        ``str`` is sent as TEXT; wrap config names in :class:`ConfigFile` and config
        XML in :class:`ConfigText`.

    Returns
    -------
    bytes
        The message, id included.

    Raises
    ------
    StreamError
        If the object type has no message, or a config name is 1024 bytes or longer.
    """
    buf = io.BytesIO()
    try:
        ProtocolSerializer(buf).serialize(obj)
    except (TypeError, ValueError) as exc:
        raise StreamError(f"cannot encode {type(obj).__name__}: {exc}") from None
    return buf.getvalue()


async def write_message(writer: asyncio.StreamWriter, obj: Any | None) -> int:
    """Encode and send one message (``None`` sends CLOSE), waiting for buffer space.

    Returns
    -------
    int
        Bytes written.
    """
    data = CLOSE_BYTES if obj is None else encode_message(obj)
    writer.write(data)
    await writer.drain()
    return len(data)


# --------------------------------------------------------------------------- MRD v2


def is_mrd2_start(first: bytes) -> bool:
    """Whether the first bytes of a connection start an MRD v2 (yardl) stream rather
    than a v1 message (whose ``uint16`` id is 1 to 5)."""
    from mrharmony.formats.mrd2 import MRD2_MAGIC

    return first[:len(MRD2_MAGIC)] == MRD2_MAGIC[:len(first)] and len(first) > 0


def mrd2_field_limit(limits: StreamLimits) -> int:
    """Largest single field (string or array, bytes) accepted in an MRD v2 stream: the
    largest acquisition (complex64), header or image the v1 limits allow."""
    return max(8 * limits.max_samples_x_channels, limits.max_header_bytes,
               limits.max_image_bytes)


class _Closed(Exception):
    """The consumer of an :class:`Mrd2Source` went away."""


class _LoopInput(io.BufferedIOBase):
    """A blocking binary file for a worker thread that reads an asyncio connection
    (through its :class:`MessageReader`) on the event loop."""

    def __init__(self, source: Mrd2Source) -> None:
        super().__init__()
        self._source = source

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._source._call(self._source._read(len(b)))
        n = len(data)
        memoryview(b).cast("B")[:n] = data
        return n


class Mrd2Source:
    """Decode an MRD v2 (yardl binary) stream arriving on an asyncio connection.

    ``mrd-python`` decodes synchronously, so a worker thread runs the decoder; it pulls
    the bytes from the connection on the event loop (with the idle timeout) and hands
    each decoded item back through a bounded queue, so neither side runs ahead of the
    other. ``transform(index, item)`` runs in the thread too (the server turns
    acquisitions into v1 wire bytes there, the client images into ``ismrmrd.Image``).

    Parameters
    ----------
    reader : MessageReader
        The connection, positioned at the yardl magic.
    limits : StreamLimits
        Sizes: no single field over :func:`mrd2_field_limit`.
    idle_timeout_s : float or None
        Longest wait for more bytes (s).
    transform : callable, optional
        ``transform(index, item) -> value``, run in the worker thread.
    """

    def __init__(self, reader: MessageReader, *, limits: StreamLimits,
                 idle_timeout_s: float | None = None,
                 transform: Any = None) -> None:
        self._reader = reader
        self._limits = limits
        self._timeout = idle_timeout_s
        self._transform = transform
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue(maxsize=64)
        self._closed = False
        self.bytes_in = 0
        import threading

        self._thread = threading.Thread(target=self._run, name="mrh-mrd2-decoder", daemon=True)
        self._thread.start()

    async def _read(self, n: int) -> bytes:
        if self._timeout is None:
            data = await self._reader.read_some(n)
        else:
            try:
                async with asyncio.timeout(self._timeout):
                    data = await self._reader.read_some(n)
            except TimeoutError:
                raise StreamError(f"timeout: nothing received for {self._timeout:g} s") from None
        self.bytes_in += len(data)
        return data

    def _call(self, coro: Any) -> Any:
        """Run ``coro`` on the loop from the worker thread and wait for it."""
        import concurrent.futures

        if self._closed:
            coro.close()
            raise _Closed
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except RuntimeError:  # the loop is closed
            coro.close()
            raise _Closed from None
        while True:
            try:
                return fut.result(timeout=0.25)
            except concurrent.futures.TimeoutError:
                if self._closed:
                    fut.cancel()
                    raise _Closed from None
            except concurrent.futures.CancelledError:
                raise _Closed from None

    def _post(self, kind: str, value: Any = None) -> None:
        self._call(self._queue.put((kind, value)))

    def _run(self) -> None:
        from mrharmony.formats.mrd2 import open_mrd2_reader

        try:
            try:
                reader = open_mrd2_reader(_LoopInput(self),
                                          max_field_bytes=mrd2_field_limit(self._limits))
                self._post("header", reader.read_header())
                for i, item in enumerate(reader.read_data()):
                    value = item if self._transform is None else self._transform(i, item)
                    self._post("item", value)
                self._post("end")
            except (_Closed, StreamError):
                raise
            except EOFError:
                raise StreamError("MRD v2 stream: truncated (the connection ended inside "
                                  "a record or before the end of the stream)") from None
            except MrHarmonyError as exc:
                raise StreamError(f"MRD v2 stream: {exc}") from None
            except Exception as exc:  # decoding errors of the generated code: any type
                text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise StreamError(f"MRD v2 stream: does not decode ({text})") from None
        except _Closed:
            return
        except StreamError as exc:
            with contextlib.suppress(_Closed):
                self._post("error", exc)

    async def next(self) -> tuple[str, Any]:
        """The next event: ``("header", mrd.Header or None)``, ``("item", value)`` or
        ``("end", None)``.

        Raises
        ------
        StreamError
            A truncated or undecodable stream, a field over the limit, a timeout.
        """
        kind, value = await self._queue.get()
        if kind == "error":
            raise value
        return kind, value

    def close(self) -> None:
        """Stop the worker thread (it ends at its next read or hand-over)."""
        self._closed = True
