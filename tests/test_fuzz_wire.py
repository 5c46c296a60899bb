"""Bounded fuzzing of the MRD v1 wire protocol: the parser and a running server.

Each case applies seeded random mutations to a valid client stream (CONFIG, HEADER,
noise scan and acquisitions of two slices, CLOSE): truncation, flipped bytes, a wrong
message id, huge or "negative" (sign bit set) length and size fields, random garbage
inserted between messages, a message dropped, repeated or swapped. The number of cases
is fixed and every case has its own seed, so a run is deterministic and a failure names
the seed that reproduces it.

* Parser: every mutated stream either parses or raises the project's named error
  (:class:`~mrharmony.errors.MrHarmonyError`; :class:`EndOfStream` marks a clean end),
  never another exception; the server's fast path (``MessageReader.pop_acquisitions``
  between ``read_message`` calls, over chunk sizes that cut messages anywhere) returns
  the same acquisitions as plain ``read_message`` and stops at the same errors.
* Server: every mutated stream is answered (images, an error TEXT, CLOSE, or the end of
  the connection) within a bound; failures reach the log only as named errors (no
  internal error, no exception from inside a dependency); afterwards a well-formed client
  on the same server still gets all of its images.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct

import numpy as np
import pytest

from mrharmony.errors import MrHarmonyError, StreamError
from mrharmony.recon.stream.client import stream_acquisitions
from mrharmony.recon.stream.pipelines import pipeline_from_config
from mrharmony.recon.stream.protocol import (
    CLOSE_BYTES,
    ConfigFile,
    ConfigText,
    EndOfStream,
    MessageId,
    MessageReader,
    StreamLimits,
    acquisition_key,
    decode_acquisitions,
    encode_message,
    read_message,
)
from mrharmony.recon.stream.scanner import synthetic_cartesian_scan
from mrharmony.recon.stream.server import ServerSettings, StreamServer

N_PARSER_CASES = 300
N_SERVER_CASES = 40
REPLY_BOUND_S = 30.0  # a mutated stream must be answered within this (a hang guard only)
TIMEOUT_S = 120.0

# small limits, so that "huge" fields hit a limit instead of waiting for data
LIMITS = StreamLimits(max_config_bytes=1 << 16, max_header_bytes=1 << 16,
                      max_text_bytes=1 << 16, max_samples_x_channels=1 << 14,
                      max_waveform_values=1 << 14, max_image_bytes=1 << 20,
                      max_attribute_bytes=1 << 16, max_ndarray_bytes=1 << 20)

_HUGE = (0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 0xFFFF, 0x8000, 1 << 20, 0)
_IDS = (0, 1, 2, 3, 4, 5, 6, 1008, 1022, 1026, 1030, 0xFFFF, 0x8000, 1009)


@pytest.fixture(scope="module")
def scan():
    header, acqs = synthetic_cartesian_scan(nx=16, ny=16, n_coils=2, n_slices=2, seed=90)
    return header, acqs


def valid_messages(scan, *, text_config: bool = False) -> list[bytes]:
    """The messages of a well-formed client stream, each with its id."""
    header, acqs = scan
    config = (ConfigText('<configuration><property name="method" value="fft"/>'
                         '</configuration>') if text_config else ConfigFile("default.xml"))
    return ([encode_message(config), encode_message(header)]
            + [encode_message(a) for a in acqs] + [CLOSE_BYTES])


def mutate_stream(messages: list[bytes], rng: np.random.Generator) -> bytes:
    """One to three message- or byte-level mutations of a message stream."""
    msgs = [bytearray(m) for m in messages]
    for _ in range(int(rng.integers(1, 4))):
        op = int(rng.integers(0, 8))
        i = int(rng.integers(0, len(msgs)))
        m = msgs[i]
        if op == 0:  # truncate the whole stream anywhere
            data = b"".join(msgs)
            return data[: int(rng.integers(0, len(data) + 1))]
        if op == 1:  # flip random bytes of one message
            for _ in range(int(rng.integers(1, 9))):
                if m:
                    m[int(rng.integers(0, len(m)))] = int(rng.integers(0, 256))
        elif op == 2 and len(m) >= 2:  # a wrong message id
            struct.pack_into("<H", m, 0, int(rng.choice(_IDS)))
        elif op == 3 and len(m) >= 6:  # a huge / "negative" length or size field
            mid = struct.unpack_from("<H", m)[0]
            value = int(rng.choice(_HUGE))
            if mid in (2, 3, 5):  # CONFIG_TEXT, HEADER, TEXT: uint32 length
                struct.pack_into("<I", m, 2, value)
            elif mid == 1008 and len(m) >= 2 + 340:  # samples, channels or traj. dims
                offset = 2 + int(rng.choice([30, 34, 36, 38, 40, 42]))
                struct.pack_into("<H", m, offset, value & 0xFFFF)
            else:
                struct.pack_into("<I", m, int(rng.integers(2, len(m) - 3)), value)
        elif op == 4:  # random garbage between two messages
            garbage = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8)
            msgs.insert(i, bytearray(garbage.tobytes()))
        elif op == 5 and len(msgs) > 1:  # drop a message
            del msgs[i]
        elif op == 6:  # repeat a message (a second HEADER, CONFIG, CLOSE ...)
            msgs.insert(int(rng.integers(0, len(msgs) + 1)), bytearray(m))
        elif op == 7:  # swap two messages
            j = int(rng.integers(0, len(msgs)))
            msgs[i], msgs[j] = msgs[j], msgs[i]
    return b"".join(msgs)


def _stream_reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def parse_plain(data: bytes) -> tuple[list[bytes], Exception | None]:
    """Every message with :func:`read_message` (acquisitions decoded there); the named
    error that stopped it, if any. Other exceptions propagate."""
    reader = _stream_reader(data)
    payloads: list[bytes] = []
    while True:
        try:
            msg = await read_message(reader, limits=LIMITS)
        except EndOfStream:
            return payloads, None
        except MrHarmonyError as exc:
            return payloads, exc
        if msg.id in (MessageId.CONFIG_FILE, MessageId.CONFIG_TEXT):
            with contextlib.suppress(MrHarmonyError):
                pipeline_from_config(msg.value)
        elif msg.id == MessageId.ACQUISITION:
            payloads.append(bytes(msg.payload))
        elif msg.id == MessageId.CLOSE:
            return payloads, None


async def parse_server_path(data: bytes, chunk: int) -> tuple[list[bytes], Exception | None]:
    """The server's receive path: complete acquisitions in bulk from the buffer, more
    bytes buffered while an acquisition is incomplete, anything else (and what does not
    complete) through ``read_message`` without decoding; the payloads are then decoded in
    a batch as in a worker."""
    reader = MessageReader(_stream_reader(data), chunk_bytes=chunk)
    payloads: list[bytes] = []
    error: Exception | None = None
    while True:
        batch = reader.pop_acquisitions(LIMITS)
        if batch:
            for item in batch:
                assert acquisition_key(item.payload) == item
            payloads += [bytes(item.payload) for item in batch]
            continue
        need = reader.acquisition_bytes_needed(LIMITS)
        if need and await reader.fill(need):
            continue
        try:
            msg = await read_message(reader, limits=LIMITS, decode_acquisitions=False)
        except EndOfStream:
            break
        except MrHarmonyError as exc:
            error = exc
            break
        if msg.id == MessageId.ACQUISITION:
            payloads.append(bytes(msg.payload))
        elif msg.id == MessageId.CLOSE:
            break
    if payloads:
        decoded = decode_acquisitions(payloads)
        assert [a.to_bytes() for a in decoded] == payloads
    return payloads, error


def test_wire_parser_survives_mutated_streams(scan):
    messages = [valid_messages(scan), valid_messages(scan, text_config=True)]
    for seed in range(N_PARSER_CASES):
        rng = np.random.default_rng(seed)
        data = mutate_stream(messages[seed % 2], rng)
        chunk = int(rng.choice([1, 7, 341, 4096, 1 << 20]))
        try:
            plain, plain_error = asyncio.run(parse_plain(data))
            fast, fast_error = asyncio.run(parse_server_path(data, chunk))
        except Exception as exc:
            pytest.fail(f"seed {seed}: {type(exc).__name__} escaped the parser: {exc}")
        assert fast == plain, f"seed {seed}: the fast path parsed other acquisitions"
        assert (fast_error is None) == (plain_error is None), (
            f"seed {seed}: fast path {fast_error!r} vs read_message {plain_error!r}")


def test_wire_parser_accepts_the_valid_stream(scan):
    """The fuzz baseline: the unmutated stream parses completely on both paths."""
    _header, acqs = scan
    data = b"".join(valid_messages(scan))
    plain, plain_error = asyncio.run(parse_plain(data))
    fast, fast_error = asyncio.run(parse_server_path(data, 341))
    assert plain_error is None and fast_error is None
    assert plain == fast == [a.to_bytes() for a in acqs]


async def _reply(port: int, data: bytes) -> list:
    """Send a whole stream (then EOF) and read the server's messages until its CLOSE or
    the end of the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    msgs = []
    try:
        try:
            writer.write(data)
            await writer.drain()
            writer.write_eof()
        except (ConnectionError, OSError):
            pass  # the server refused the stream and closed first
        while True:
            try:
                msg = await read_message(reader)
            except (EndOfStream, StreamError, ConnectionError):
                break
            msgs.append(msg)
            if msg.id == MessageId.CLOSE:
                break
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return msgs


def test_server_survives_mutated_streams(scan, caplog):
    header, acqs = scan
    messages = [valid_messages(scan), valid_messages(scan, text_config=True)]

    async def go():
        server = await StreamServer(ServerSettings(
            port=0, workers=1, executor="thread", limits=LIMITS, idle_timeout_s=10.0,
            write_timeout_s=10.0)).start()
        replies = []
        try:
            for seed in range(N_SERVER_CASES):
                data = mutate_stream(messages[seed % 2], np.random.default_rng(1000 + seed))
                try:
                    msgs = await asyncio.wait_for(_reply(server.port, data), REPLY_BOUND_S)
                except TimeoutError:
                    pytest.fail(f"seed {1000 + seed}: no answer within {REPLY_BOUND_S:g} s")
                replies.append(msgs)
            healthy = await stream_acquisitions(header, acqs, port=server.port)
            while server.active_connections:  # every mutated connection has ended
                await asyncio.sleep(0.01)
        finally:
            await server.shutdown()
        return replies, healthy

    with caplog.at_level(logging.WARNING, logger="mrharmony.stream"):
        replies, healthy = asyncio.run(asyncio.wait_for(go(), TIMEOUT_S))
    assert len(healthy.images) == 2 and not healthy.texts and healthy.closed
    # every failure is a named error: no internal error, no foreign exception
    assert not [r.getMessage() for r in caplog.records if "internal error" in r.getMessage()]
    foreign = [r.getMessage() for r in caplog.records
               if r.exc_info and not isinstance(r.exc_info[1], MrHarmonyError)]
    assert not foreign, foreign
    for seed, msgs in enumerate(replies, start=1000):
        ids = {int(m.id) for m in msgs}
        assert ids <= {int(MessageId.IMAGE), int(MessageId.TEXT), int(MessageId.CLOSE)}, seed
        for text in (m.value for m in msgs if m.id == MessageId.TEXT):
            assert text.startswith("mrharmony "), (seed, text)
    # the mix is not degenerate: some streams still reconstruct, some are refused
    assert any(m.id == MessageId.IMAGE for msgs in replies for m in msgs)
    assert any(m.id == MessageId.TEXT for msgs in replies for m in msgs)
