"""MRD messages on asyncio streams: round trips, limits, and every bad-input case against
the server (the client gets a TEXT naming the problem, then CLOSE; the server survives)."""

from __future__ import annotations

import asyncio
import struct

import ismrmrd
import numpy as np
import pytest

from mrharmony.errors import StreamError
from mrharmony.recon.stream.client import stream_acquisitions
from mrharmony.recon.stream.protocol import (
    ConfigFile,
    ConfigText,
    EndOfStream,
    MessageId,
    StreamLimits,
    encode_message,
    parse_header_xml,
    read_message,
)
from mrharmony.recon.stream.scanner import synthetic_cartesian_scan
from mrharmony.recon.stream.server import (
    ServerSettings,
    SliceAssembler,
    StreamServer,
    pipeline_from_config,
)

TIMEOUT_S = 30.0  # guard against hangs only


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


async def decode_all(data: bytes, limits: StreamLimits | None = None) -> list:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    out = []
    while True:
        try:
            out.append(await read_message(reader, limits=limits))
        except EndOfStream:
            return out


@pytest.fixture(scope="module")
def scan():
    return synthetic_cartesian_scan(nx=16, ny=16, n_coils=2, n_slices=2, seed=7)


def test_every_message_type_round_trips(scan):
    header, acqs = scan
    img = ismrmrd.Image.from_array(np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4))
    img.attribute_string = "<ismrmrdMeta/>"
    wav = ismrmrd.Waveform.from_array(np.arange(10, dtype=np.uint32).reshape(2, 5))
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    objs = [ConfigFile("default.xml"), ConfigText("<c/>"), header, acqs[3], img, wav,
            "hello", arr]
    data = b"".join(encode_message(o) for o in objs) + struct.pack("<H", 4)
    msgs = run(decode_all(data))
    assert [m.id for m in msgs] == [1, 2, 3, 1008, 1022, 1026, 5, 1030, 4]
    assert sum(m.nbytes for m in msgs) == len(data)
    assert msgs[0].value == "default.xml" and isinstance(msgs[0].value, ConfigFile)
    assert isinstance(msgs[1].value, ConfigText)
    assert msgs[2].value.encoding[0].encodedSpace.matrixSize.x == 16
    np.testing.assert_array_equal(msgs[3].value.data, acqs[3].data)
    assert msgs[3].value.idx.kspace_encode_step_1 == acqs[3].idx.kspace_encode_step_1
    np.testing.assert_array_equal(msgs[4].value.data, img.data)
    np.testing.assert_array_equal(msgs[5].value.data, wav.data)
    assert msgs[6].value == "hello"
    np.testing.assert_array_equal(msgs[7].value, arr)


@pytest.mark.parametrize(("blob_fn", "match"), [
    (lambda acq: struct.pack("<H", 77), "message id 77: unknown"),
    (lambda acq: encode_message(acq)[:-5], "ACQUISITION: truncated message"),
    (lambda acq: b"\xf0", "message id: truncated"),
    (lambda acq: struct.pack("<HI", 3, 10 << 20), "header length = 10485760 is over"),
    (lambda acq: struct.pack("<HI", 3, 5) + b"<a/>!", "not valid ISMRMRD header XML"),
    (lambda acq: struct.pack("<HI", 5, 2) + b"\xff\xfe", "TEXT: the payload is not UTF-8"),
])
def test_reader_rejects_bad_messages(scan, blob_fn, match):
    with pytest.raises(StreamError, match=match):
        run(decode_all(blob_fn(scan[1][2])))


def test_limits_are_checked_before_the_payload(scan):
    acq = scan[1][2]  # 2 coils x 16 samples
    with pytest.raises(StreamError, match=r"samples x channels \(16 x 2\) = 32 is over the "
                                          "limit of 31"):
        # only the fixed header is supplied: the limit must trip before the payload read
        run(decode_all(encode_message(acq)[:2 + 340], StreamLimits(max_samples_x_channels=31)))


def test_header_parser_refuses_entities():
    xml = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><ismrmrdHeader/>'
    with pytest.raises(StreamError, match="DTDs and entity"):
        parse_header_xml(xml)


def test_pipeline_names_and_config_xml():
    assert pipeline_from_config(ConfigFile("default.xml")).method == "auto"
    assert pipeline_from_config(ConfigFile("/some/dir/mrharmony_sense.xml")).method == "sense"
    gt_style = ("<configuration><property><name>method</name><value>grappa</value></property>"
                "</configuration>")
    assert pipeline_from_config(ConfigText(gt_style)).method == "grappa"
    assert pipeline_from_config(ConfigText('<c><property name="pipeline" '
                                           'value="mrharmony_fft.xml"/></c>')).method == "fft"
    with pytest.raises(StreamError, match="unknown pipeline"):
        pipeline_from_config(ConfigFile("nope.xml"))
    with pytest.raises(StreamError, match="method 'magic'"):
        pipeline_from_config(ConfigText('<c><property name="method" value="magic"/></c>'))


def test_slice_assembler_groups_by_last_in_slice(scan):
    _, acqs = scan
    asm = SliceAssembler()
    groups = [g for a in acqs for g in asm.add(a)]
    assert len(groups) == 2 and asm.pending_acquisitions == 0
    assert all(g[0].is_flag_set(19) for g in groups)  # the noise scan leads each group
    assert [len(g) for g in groups] == [17, 17]


async def _exchange(port: int, payload: bytes, *, eof: bool = True) -> list:
    """Send raw bytes, half-close, and read every reply message until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    if eof:
        writer.write_eof()
    out = []
    while True:
        try:
            out.append(await read_message(reader))
        except (EndOfStream, ConnectionError):
            break
        if out[-1].id == MessageId.CLOSE:
            break
    writer.close()
    return out


def _bad_inputs(header, acqs):
    cfg = encode_message(ConfigFile("default.xml"))
    hdr = encode_message(header)
    big = acqs[2].getHead()
    big.number_of_samples = 60000
    big.active_channels = 128
    head_over = ismrmrd.Acquisition(big)
    return {
        "truncated": (cfg + hdr + encode_message(acqs[2])[:100], "truncated message"),
        "unknown id": (cfg + hdr + struct.pack("<H", 4242), "message id 4242: unknown"),
        "header too long": (cfg + struct.pack("<HI", 3, 1 << 30), "header length"),
        "samples x channels": (cfg + hdr + encode_message(head_over)[:2 + 340],
                               "samples x channels"),
        "invalid header": (cfg + struct.pack("<HI", 3, 9) + b"<nothing>",
                           "not valid ISMRMRD header XML"),
        "data before header": (cfg + encode_message(acqs[2]), "ACQUISITION before the HEADER"),
        "second header": (cfg + hdr + hdr, "HEADER: not allowed after the HEADER"),
        "no config": (hdr, "expected CONFIG_FILE or CONFIG_TEXT first"),
        "unknown config": (encode_message(ConfigFile("magic.xml")), "unknown pipeline"),
    }


def test_each_bad_input_gets_a_text_and_close_and_the_server_survives(scan):
    header, acqs = scan

    async def go():
        server = await StreamServer(ServerSettings(port=0, executor="thread",
                                                   idle_timeout_s=0.5)).start()
        try:
            replies = {}
            for name, (payload, _) in _bad_inputs(header, acqs).items():
                replies[name] = await _exchange(server.port, payload)
            # a client that connects and stays silent is dropped after the idle timeout
            replies["silent"] = await _exchange(server.port, b"", eof=False)
            good = await stream_acquisitions(header, acqs, port=server.port)
            return replies, good
        finally:
            await server.shutdown()

    replies, good = run(go())
    expected = {k: v[1] for k, v in _bad_inputs(header, acqs).items()}
    expected["silent"] = "timeout: nothing received for 0.5 s"
    for name, match in expected.items():
        msgs = replies[name]
        texts = [m.value for m in msgs if m.id == MessageId.TEXT]
        assert texts and match in texts[0], (name, texts)
        assert msgs[-1].id == MessageId.CLOSE, name
    assert len(good.images) == 2 and good.closed and not good.texts


def test_server_passes_images_through_and_accepts_text_and_waveforms(scan):
    header, _ = scan
    img = ismrmrd.Image.from_array(np.full((1, 1, 3, 5), 7.0, np.float32))
    wav = ismrmrd.Waveform.from_array(np.arange(8, dtype=np.uint32).reshape(2, 4))
    payload = b"".join(encode_message(o) for o in (
        ConfigFile("default.xml"), header, "hello from the client", wav, img)) + \
        struct.pack("<H", 4)

    async def go():
        server = await StreamServer(ServerSettings(port=0, executor="thread")).start()
        try:
            return await _exchange(server.port, payload)
        finally:
            await server.shutdown()

    msgs = run(go())
    assert [m.id for m in msgs] == [MessageId.IMAGE, MessageId.CLOSE]
    np.testing.assert_array_equal(msgs[0].value.data, img.data)
