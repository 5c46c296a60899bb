"""The streaming fast path: struct/np.frombuffer acquisition decoding, the buffered
MessageReader and the batched raw writer, checked against ismrmrd's own serialization
(the reference implementation) on varied acquisitions."""

from __future__ import annotations

import asyncio
import ctypes
import io

import ismrmrd
import numpy as np
import pytest
from ismrmrd.serialization import ProtocolDeserializer

from mrharmony.errors import StreamError
from mrharmony.formats.raw import RawStreamWriter, read_raw
from mrharmony.recon.stream.protocol import (
    CLOSE_BYTES,
    ConfigFile,
    EndOfStream,
    MessageId,
    MessageReader,
    StreamLimits,
    acquisition_sizes,
    decode_acquisition,
    decode_acquisitions,
    encode_message,
    read_message,
)
from mrharmony.recon.stream.scanner import synthetic_cartesian_scan
from mrharmony.recon.stream.server import ServerSettings

HEAD_BYTES = ctypes.sizeof(ismrmrd.AcquisitionHeader)
TIMEOUT_S = 30.0  # guard against hangs only


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def _acquisition(rng: np.random.Generator, ns: int, nc: int, nt: int,
                 k: int) -> ismrmrd.Acquisition:
    data = (rng.standard_normal((nc, ns)) + 1j * rng.standard_normal((nc, ns))).astype(
        np.complex64)
    traj = rng.standard_normal((ns, nt)).astype(np.float32) if nt else None
    acq = ismrmrd.Acquisition.from_array(data, traj)
    acq.flags = int(rng.integers(0, 2**63))
    acq.scan_counter = k
    acq.idx.kspace_encode_step_1 = k % 7
    acq.idx.slice = k % 3
    acq.idx.repetition = k % 2
    acq.idx.user[5] = 40000 + k
    acq.sample_time_us = 2.5 + k
    acq.position[:] = rng.standard_normal(3).astype(np.float32)
    acq.user_float[7] = -1.5 * k
    acq.physiology_time_stamp[2] = 123456 + k
    acq.channel_mask[15] = 2**63 + k
    return acq


@pytest.fixture(scope="module")
def varied() -> list[ismrmrd.Acquisition]:
    rng = np.random.default_rng(20261124)
    # odd sizes, trajectories of 0..4 dimensions, single samples/channels, empty data,
    # and repeated sizes (batched together)
    sizes = [(7, 3, 0), (7, 3, 0), (1, 1, 1), (33, 5, 2), (64, 8, 3), (64, 8, 3), (5, 2, 4),
             (0, 4, 2), (9, 0, 0), (7, 3, 0), (33, 5, 2), (2, 1, 0)]
    return [_acquisition(rng, ns, nc, nt, k) for k, (ns, nc, nt) in enumerate(sizes)]


def _assert_same(fast: ismrmrd.Acquisition, ref: ismrmrd.Acquisition) -> None:
    # exact equality: decoding only moves bytes
    assert bytes(fast.getHead()) == bytes(ref.getHead())
    for name in ("flags", "scan_counter", "number_of_samples", "active_channels",
                 "trajectory_dimensions", "sample_time_us"):
        assert getattr(fast, name) == getattr(ref, name)
    assert fast.idx.user[5] == ref.idx.user[5] and fast.idx.slice == ref.idx.slice
    assert list(fast.channel_mask) == list(ref.channel_mask)
    for a, b in ((fast.data, ref.data), (fast.traj, ref.traj)):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.flags.writeable and a.flags.aligned and a.flags.c_contiguous
        np.testing.assert_array_equal(a, b)


def test_decode_acquisition_equals_ismrmrd_from_bytes(varied):
    for acq in varied:
        payload = acq.to_bytes()
        assert acquisition_sizes(payload) == (acq.number_of_samples, acq.active_channels,
                                              acq.trajectory_dimensions)
        ref = ismrmrd.Acquisition.from_bytes(payload)
        _assert_same(decode_acquisition(payload), ref)
        _assert_same(decode_acquisition(memoryview(payload)), ref)
        assert decode_acquisition(payload) == ref  # ismrmrd's own __eq__


def test_decode_acquisitions_batches_and_keeps_order(varied):
    payloads = [a.to_bytes() for a in varied]
    fast = decode_acquisitions(payloads)
    assert len(fast) == len(varied)
    for f, p in zip(fast, payloads, strict=True):
        _assert_same(f, ismrmrd.Acquisition.from_bytes(p))
    # rows of one batch are independent: writing one leaves its neighbours alone
    fast[0].data[:] = 0
    np.testing.assert_array_equal(fast[1].data, varied[1].data)
    assert decode_acquisitions([]) == []


def test_decode_rejects_payloads_that_do_not_match_their_header(varied):
    payload = varied[3].to_bytes()
    with pytest.raises(StreamError, match="needs"):
        decode_acquisition(payload[:-4])
    with pytest.raises(StreamError, match="needs"):
        decode_acquisitions([payload, payload + b"\0" * 8])
    with pytest.raises(StreamError, match="shorter than the 340-byte"):
        decode_acquisition(payload[:100])


def test_read_message_fast_path_equals_protocol_deserializer(varied):
    wire = b"".join(encode_message(a) for a in varied)

    async def go():
        reader = asyncio.StreamReader()
        reader.feed_data(wire)
        reader.feed_eof()
        return [await read_message(reader) for _ in varied]

    msgs = run(go())
    gen = ProtocolDeserializer(io.BytesIO(wire)).deserialize()
    ref = [next(gen) for _ in varied]  # it raises EOFError at the end instead of stopping
    for msg, r, acq in zip(msgs, ref, varied, strict=True):
        assert msg.id == MessageId.ACQUISITION and msg.payload == acq.to_bytes()
        assert msg.nbytes == 2 + len(msg.payload)
        _assert_same(msg.value, r)


def _wire(scan) -> tuple[bytes, int]:
    header, acqs = scan
    wav = ismrmrd.Waveform.from_array(np.arange(12, dtype=np.uint32).reshape(3, 4))
    parts = [encode_message(ConfigFile("default.xml")), encode_message(header)]
    parts += [encode_message(a) for a in acqs[:5]] + [encode_message(wav), encode_message("hi")]
    parts += [encode_message(a) for a in acqs[5:]] + [CLOSE_BYTES]
    return b"".join(parts), len(acqs) + 5


async def _fed(chunks: list[bytes]) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    for c in chunks:
        reader.feed_data(c)
    reader.feed_eof()
    return reader


def test_message_reader_gives_the_messages_of_read_message():
    scan = synthetic_cartesian_scan(nx=16, ny=16, n_coils=2, n_slices=2, seed=5)
    wire, count = _wire(scan)
    rng = np.random.default_rng(3)
    cuts = np.sort(rng.integers(0, len(wire), 40))
    chunks = [wire[a:b] for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(wire)], strict=True)]

    async def plain():
        reader = await _fed([wire])
        return [await read_message(reader, decode_acquisitions=False) for _ in range(count)]

    async def buffered():
        mr = MessageReader(await _fed(chunks), chunk_bytes=97)  # many small socket reads
        out = []
        while len(out) < count:
            msg = mr.pop_acquisition(StreamLimits())
            out.append(msg if msg is not None else
                       await read_message(mr, decode_acquisitions=False))
        with pytest.raises(EndOfStream):
            await read_message(mr)
        return out

    ref, got = run(plain()), run(buffered())
    assert [m.id for m in got] == [m.id for m in ref]
    for a, b in zip(got, ref, strict=True):
        assert a.nbytes == b.nbytes and a.payload == b.payload
        if a.id == MessageId.ACQUISITION:
            assert bytes(a.value) == bytes(b.value)  # the AcquisitionHeader


def test_message_reader_keeps_the_error_paths(varied):
    wire = encode_message(varied[4])  # 64 samples x 8 channels, 3 trajectory dimensions

    async def errors(data: bytes, limits: StreamLimits) -> str:
        mr = MessageReader(await _fed([data]))
        assert mr.pop_acquisition(limits) is None  # incomplete or over a limit
        with pytest.raises(StreamError) as info:
            await read_message(mr, limits=limits)
        return str(info.value)

    async def reference(data: bytes, limits: StreamLimits) -> str:
        with pytest.raises(StreamError) as info:
            await read_message(await _fed([data]), limits=limits)
        return str(info.value)

    cases = [(wire[:-10], StreamLimits()), (wire[:200], StreamLimits()),
             (wire, StreamLimits(max_samples_x_channels=511)),
             (wire, StreamLimits(max_trajectory_dimensions=2)), (b"\x07\x00", StreamLimits())]
    for data, limits in cases:
        assert run(errors(data, limits)) == run(reference(data, limits))


def test_raw_writer_buffers_and_writes_everything(tmp_path):
    header, acqs = synthetic_cartesian_scan(nx=16, ny=16, n_coils=3, n_slices=2, seed=9)
    payloads = [encode_message(a)[2:] for a in acqs]
    writer = RawStreamWriter(tmp_path / "s.h5", ismrmrd.xsd.ToXML(header),
                             flush_bytes=10 * len(payloads[-1]))
    for p in payloads[:25]:
        writer.append(p)
    assert writer.count == 20  # two automatic flushes of 10, five still buffered
    writer.flush()
    assert writer.count == 25
    for p in payloads[25:]:
        writer.append(p)
    path = writer.close()  # writes what is still buffered
    raw = read_raw(path)
    got = list(raw.noise) + list(raw.acquisitions)
    assert len(got) == len(acqs) and not (tmp_path / "s.h5.part").exists()
    by_counter = {int(a.scan_counter): a for a in acqs}
    for a in got:
        ref = by_counter[int(a.scan_counter)]
        assert bytes(a.getHead()) == bytes(ref.getHead())
        np.testing.assert_array_equal(a.data, ref.data)


def test_blas_threads_setting_is_validated():
    assert ServerSettings().blas_threads == 1
    with pytest.raises(StreamError, match="blas_threads"):
        ServerSettings(blas_threads=-1)
