"""The streaming server against hostile clients and full disks: raw saving off the event
loop and failing softly, safe header parsing in every encoding, per-connection caps and
fair scheduling, write timeouts, a minimum receive rate and a session deadline, and every
reconstruction failure reported to the client."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import statistics
import struct
import threading
from typing import ClassVar

import ismrmrd
import numpy as np
import pytest

from mrharmony.errors import RawDataError, ReconError, StreamError
from mrharmony.formats.header import parse_ismrmrd_header
from mrharmony.formats.raw import RawStreamWriter, read_raw
from mrharmony.recon.io import check_not_empty
from mrharmony.recon.stream import jobs as jobs_mod
from mrharmony.recon.stream import rawsave as rawsave_mod
from mrharmony.recon.stream import server as server_mod
from mrharmony.recon.stream.client import stream_acquisitions
from mrharmony.recon.stream.protocol import (
    CLOSE_BYTES,
    ConfigFile,
    ConfigText,
    EndOfStream,
    MessageId,
    encode_message,
    parse_header_xml,
    read_message,
)
from mrharmony.recon.stream.scanner import synthetic_cartesian_scan
from mrharmony.recon.stream.server import (
    ServerSettings,
    StreamServer,
    reconstruct_to_mrd,
)

TIMEOUT_S = 60.0  # guard against hangs only, never a timing assertion
_LAST_IN_SLICE = 1 << 7


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


async def started(**kw) -> StreamServer:
    kw.setdefault("executor", "thread")
    return await StreamServer(ServerSettings(port=0, **kw)).start()


async def read_all(reader: asyncio.StreamReader) -> list:
    """Messages from the server until its CLOSE or the end of the connection."""
    msgs = []
    while True:
        try:
            msg = await read_message(reader)
        except (EndOfStream, StreamError, ConnectionError):
            return msgs
        msgs.append(msg)
        if msg.id == MessageId.CLOSE:
            return msgs


def texts_of(msgs) -> list[str]:
    return [m.value for m in msgs if m.id == MessageId.TEXT]


def empty_acquisitions(n: int, slice_index: int) -> list:
    """``n`` acquisitions with 0 samples (2 channels), flagged LAST_IN_SLICE."""
    out = []
    for k in range(n):
        acq = ismrmrd.Acquisition.from_array(np.zeros((2, 0), np.complex64))
        acq.idx.kspace_encode_step_1 = k
        acq.idx.slice = slice_index
        acq.flags = _LAST_IN_SLICE
        out.append(acq)
    return out


# --------------------------------------------------------------------------- 1. raw saving


class _RecordingWriter(RawStreamWriter):
    """The real writer, recording the threads it runs in; ``fail_at`` makes its n-th
    flush raise ENOSPC (a full disk)."""

    threads: ClassVar[set[int]] = set()
    flushes = 0
    fail_at: int | None = None

    def __init__(self, *args, **kwargs):
        type(self).threads.add(threading.get_ident())
        super().__init__(*args, **kwargs)

    def append(self, payload):
        type(self).threads.add(threading.get_ident())
        super().append(payload)

    def flush(self):
        type(self).threads.add(threading.get_ident())
        cls = type(self)
        cls.flushes += 1
        if cls.fail_at is not None and cls.flushes >= cls.fail_at:
            # the data of this flush reach the file, then the disk is full
            super().flush()
            raise OSError(errno.ENOSPC, "No space left on device", str(self.part))
        super().flush()


@pytest.fixture
def recording_writer(monkeypatch):
    class W(_RecordingWriter):
        threads: ClassVar[set[int]] = set()
        flushes = 0
        fail_at = None

    monkeypatch.setattr(rawsave_mod, "RawStreamWriter", W)
    return W


def test_raw_writing_runs_off_the_event_loop(tmp_path, recording_writer):
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=3, seed=21)

    async def go():
        server = await started(save_raw=tmp_path / "raw")
        try:
            loop_thread = threading.get_ident()
            return loop_thread, await stream_acquisitions(header, acqs, port=server.port)
        finally:
            await server.shutdown()

    loop_thread, result = run(go())
    assert len(result.images) == 3 and not result.texts
    assert recording_writer.threads and loop_thread not in recording_writer.threads
    saved = read_raw(next((tmp_path / "raw").glob("*.h5")))
    assert len(saved.noise) + len(saved.acquisitions) == len(acqs)


def test_full_disk_disables_saving_and_the_reconstruction_goes_on(tmp_path, recording_writer,
                                                                 caplog):
    recording_writer.fail_at = 2  # the second slice's flush: ENOSPC
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=4, seed=22)
    raw_dir = tmp_path / "raw"

    async def go():
        server = await started(save_raw=raw_dir)
        try:
            first = await stream_acquisitions(header, acqs, port=server.port)
            recording_writer.fail_at = None
            second = await stream_acquisitions(header, acqs, port=server.port)  # healthy
            return first, second
        finally:
            await server.shutdown()

    with caplog.at_level(logging.WARNING, logger="mrharmony.stream"):
        first, second = run(go())
    assert len(first.images) == 4 and first.closed  # every slice reconstructed
    assert len(first.texts) == 1 and "saving disabled" in first.texts[0]
    assert "No space left on device" in first.texts[0]
    assert any("saving disabled: OSError: No space left on device" in r.getMessage()
               for r in caplog.records)
    assert not list(raw_dir.glob("*.part"))  # no orphan partial file
    files = sorted(raw_dir.glob("*.h5"))
    assert len(files) == 1  # only the second connection's file
    assert len(read_raw(files[0]).acquisitions) == len(acqs) - 1  # minus the noise scan
    assert len(second.images) == 4 and not second.texts
    logs = sorted(raw_dir.glob("*.json"))
    assert len(logs) == 2 and '"raw_file": null' in logs[0].read_text()


def test_read_only_raw_folder_disables_saving_only(tmp_path, monkeypatch, caplog):
    class ReadOnly(RawStreamWriter):
        def __init__(self, path, *args, **kwargs):  # what h5py raises on a read-only mount
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(rawsave_mod, "RawStreamWriter", ReadOnly)
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=2, seed=23)

    async def go():
        server = await started(save_raw=tmp_path / "raw")
        try:
            return await asyncio.gather(*(stream_acquisitions(header, acqs, port=server.port)
                                          for _ in range(2)))
        finally:
            await server.shutdown()

    with caplog.at_level(logging.WARNING, logger="mrharmony.stream"):
        results = run(go())
    for result in results:
        assert len(result.images) == 2 and result.closed
        assert [t for t in result.texts if "saving disabled" in t]
    assert sum("Read-only file system" in r.getMessage() for r in caplog.records) >= 2
    assert not list((tmp_path / "raw").glob("*.h5*"))


def test_serve_refuses_an_unwritable_raw_folder_in_one_line(tmp_path, capsys):
    from mrharmony.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["serve", "--port", "0", "--save-raw", str(blocker / "raw")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--save-raw" in err and "Traceback" not in err


# --------------------------------------------------------------------------- 2. headers


_DTD_HEADER = """<?xml version="1.0" encoding="{enc}"?>
<!DOCTYPE ismrmrdHeader [
  <!ENTITY lol "lol">
  <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <studyInformation><studyID>&lol3;</studyID></studyInformation>
</ismrmrdHeader>
"""


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-le", "utf-16-be"])
def test_headers_with_a_dtd_are_refused_in_every_encoding(encoding):
    doc = _DTD_HEADER.format(enc=encoding.split("-le")[0].split("-be")[0]).encode(encoding)
    with pytest.raises(StreamError, match="DTDs and entity declarations are not allowed"):
        parse_header_xml(doc)
    with pytest.raises(RawDataError, match="DTDs and entity declarations are not allowed"):
        parse_ismrmrd_header(doc, source="file")


def test_an_entity_reference_is_never_expanded():
    header, _ = synthetic_cartesian_scan(nx=16, ny=16, n_coils=1, n_slices=1, seed=24)
    xml = ismrmrd.xsd.ToXML(header)
    # an undeclared entity cannot be expanded: the document is refused, not defaulted
    hostile = xml.replace("<encoding>", "<encoding>&xxe;", 1)
    for doc in (hostile.encode("utf-16"), hostile):
        with pytest.raises(StreamError, match="not well-formed"):
            parse_header_xml(doc)
    # a config with an internal entity is refused before ElementTree could expand it
    config = ConfigText('<?xml version="1.0"?><!DOCTYPE c [<!ENTITY m "sense">]>'
                        '<c><property name="method" value="&m;"/></c>')
    with pytest.raises(StreamError, match="DTDs"):
        server_mod.pipeline_from_config(config)


def test_server_refuses_a_utf16_header_with_a_dtd():
    doc = _DTD_HEADER.format(enc="UTF-16").encode("utf-16")

    async def go():
        server = await started()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(encode_message(ConfigFile("default.xml"))
                         + struct.pack("<HI", int(MessageId.HEADER), len(doc)) + doc)
            await writer.drain()
            msgs = await read_all(reader)
            writer.close()
            return msgs
        finally:
            await server.shutdown()

    msgs = run(go())
    assert texts_of(msgs) == ["mrharmony error: HEADER: DTDs and entity declarations are "
                              "not allowed"]
    assert msgs[-1].id == MessageId.CLOSE


# --------------------------------------------------------------------------- 3. caps


def test_connections_over_the_cap_get_an_error_text():
    header, acqs = synthetic_cartesian_scan(nx=16, ny=16, n_coils=1, n_slices=1, seed=25)

    async def go():
        server = await started(max_connections=2)
        try:
            held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
            while server.active_connections < 2:
                await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            refused = await read_all(reader)
            writer.close()
            for _, w in held:
                w.write(CLOSE_BYTES)
                await w.drain()
            for r, w in held:
                await read_all(r)
                w.close()
            while server.active_connections:
                await asyncio.sleep(0.01)
            ok = await stream_acquisitions(header, acqs, port=server.port)
            return refused, ok, server.connections_refused
        finally:
            await server.shutdown()

    refused, ok, count = run(go())
    assert [m.id for m in refused] == [MessageId.TEXT, MessageId.CLOSE]
    assert "too many connections" in refused[0].value and "2" in refused[0].value
    assert count == 1
    assert len(ok.images) == 1 and not ok.texts  # a slot is free again


def test_session_byte_cap_ends_a_connection_that_never_completes_a_slice():
    header, acqs = synthetic_cartesian_scan(nx=64, ny=64, n_coils=4, n_slices=1, seed=26)
    per_line = 340 + 64 * 4 * 8

    async def go():
        server = await started(max_session_bytes=20 * per_line)
        try:
            bad = await stream_acquisitions(header, acqs, port=server.port, timeout_s=20)
            small, small_acqs = synthetic_cartesian_scan(nx=16, ny=16, n_coils=1, n_slices=1,
                                                         seed=27)
            ok = await stream_acquisitions(small, small_acqs, port=server.port)
            return bad, ok
        finally:
            await server.shutdown()

    bad, ok = run(go())
    assert not bad.images and len(bad.texts) == 1
    assert "over the limit of" in bad.texts[0] and "--max-session-bytes" in bad.texts[0]
    assert len(ok.images) == 1 and not ok.texts  # the server goes on


def test_session_byte_cap_applies_back_pressure_to_completed_slices():
    """Completed slices waiting for a worker count against the cap; the connection waits
    for them instead of failing, and every image arrives."""
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=6, seed=28)
    per_slice = 32 * (340 + 32 * 2 * 8)

    async def go():
        server = await started(workers=1, max_session_bytes=2 * per_slice)
        try:
            return await stream_acquisitions(header, acqs, port=server.port)
        finally:
            await server.shutdown()

    result = run(go())
    assert len(result.images) == 6 and not result.texts


def _one_line_slices(n: int) -> tuple:
    """A header and ``n`` acquisitions, each a complete one-line slice."""
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=1, seed=29)
    line = acqs[5]
    out = []
    for k in range(n):
        acq = ismrmrd.Acquisition(line.getHead(), data=line.data.copy(),
                                  trajectory=line.traj.copy())
        acq.flags = _LAST_IN_SLICE
        acq.idx.slice = 0
        acq.scan_counter = k
        out.append(acq)
    return header, out


def test_a_flood_of_tiny_slices_does_not_delay_another_client():
    """One client sends 2000 one-line slices; another client's image arrives within 2x
    of its latency on the same server unloaded (fair round-robin scheduling)."""
    flood_header, flood = _one_line_slices(2000)
    header, acqs = synthetic_cartesian_scan(nx=128, ny=128, n_coils=8, n_slices=1, seed=30)

    async def latency(port: int) -> float:
        result = await stream_acquisitions(header, acqs, port=port)
        assert len(result.images) == 1
        return result.latencies_s()[0]

    async def go():
        server = await started(workers=1)
        try:
            await latency(server.port)  # warm-up
            unloaded = [await latency(server.port) for _ in range(3)]
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(encode_message(ConfigFile("default.xml"))
                         + encode_message(flood_header)
                         + b"".join(encode_message(a) for a in flood))
            replies = 0

            async def count_replies():
                nonlocal replies
                while True:
                    msg = await read_message(reader)
                    replies += 1
                    if msg.id == MessageId.CLOSE:
                        return

            counter = asyncio.create_task(count_replies())
            while replies < 20:  # the flood is being reconstructed
                await asyncio.sleep(0.01)
            loaded = [await latency(server.port) for _ in range(3)]
            flood_replies = replies
            writer.transport.abort()
            counter.cancel()
            with pytest.raises((asyncio.CancelledError, StreamError, EndOfStream,
                                ConnectionError)):
                await counter
            return unloaded, loaded, flood_replies
        finally:
            await server.shutdown()

    unloaded, loaded, flood_replies = run(go())
    assert flood_replies < 2000  # the flood was still going on while the client streamed
    # generous: medians of 3, 2x, plus the one tiny slice of the flood running ahead
    assert statistics.median(loaded) <= 2 * statistics.median(unloaded) + 0.05, (
        unloaded, loaded)


# --------------------------------------------------------------------------- 4. timeouts


def _non_reading_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def _echo_flood(n: int) -> bytes:
    """Config, a header and ``n`` 256 KiB images, which the server echoes back."""
    header, _ = synthetic_cartesian_scan(nx=16, ny=16, n_coils=1, n_slices=1, seed=31)
    image = ismrmrd.Image.from_array(np.zeros((1, 1, 256, 256), np.float32))
    blob = encode_message(image)
    return encode_message(ConfigFile("default.xml")) + encode_message(header) + blob * n


@pytest.mark.parametrize("at_shutdown", [False, True])
def test_a_client_that_never_reads_is_dropped_after_the_write_timeout(at_shutdown, caplog):
    data = _echo_flood(48)  # 12 MiB echoed: more than any socket buffer holds

    async def go():
        server = await started(write_timeout_s=0.3, drain_timeout_s=600)
        try:
            sock = _non_reading_socket(server.port)
            _reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(data)  # never drained, never read
            while server.active_connections < 1:
                await asyncio.sleep(0.01)
            if at_shutdown:
                # would wait for the 600 s drain timeout if the write were not timed
                await asyncio.wait_for(server.shutdown(), 20)
            while server.connections_served < 1:
                await asyncio.sleep(0.01)
            writer.transport.abort()
            return server.connections_served
        finally:
            await server.shutdown()

    with caplog.at_level(logging.INFO, logger="mrharmony.stream"):
        assert run(go()) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert any("dropped: write timeout: the client read nothing for 0.3 s" in m
               for m in messages), messages


def _trickle_client(port: int, head: bytes, trickle: bytes, interval_s: float):
    async def go():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head)
        await writer.drain()

        async def dribble():
            for i in range(len(trickle)):
                writer.write(trickle[i:i + 1])
                await writer.drain()
                await asyncio.sleep(interval_s)

        sender = asyncio.create_task(dribble())
        msgs = await read_all(reader)
        sender.cancel()
        with pytest.raises((asyncio.CancelledError, ConnectionError)):
            await sender
        writer.close()
        return msgs, sender

    return go()


def test_a_client_below_the_minimum_receive_rate_is_dropped():
    header, _ = synthetic_cartesian_scan(nx=16, ny=16, n_coils=1, n_slices=1, seed=32)

    async def go():
        server = await started(min_receive_bytes_per_s=200, receive_rate_window_s=0.3)
        try:
            msgs, _ = await _trickle_client(server.port, encode_message(ConfigFile("default.xml")),
                                            encode_message(header), 0.02)  # 50 bytes/s
            return msgs
        finally:
            await server.shutdown()

    msgs = run(go())
    texts = texts_of(msgs)
    assert len(texts) == 1 and "receive rate" in texts[0]
    assert "under the minimum of 200 bytes/s" in texts[0]
    assert msgs[-1].id == MessageId.CLOSE


def test_a_session_past_its_deadline_is_ended():
    header, _ = synthetic_cartesian_scan(nx=16, ny=16, n_coils=1, n_slices=1, seed=33)
    # a valid, slow but steady client: 8-byte TEXT messages, fast enough for the rate check
    chatter = encode_message("hi") * 200

    async def go():
        server = await started(session_timeout_s=0.5, min_receive_bytes_per_s=0)
        try:
            msgs, _ = await _trickle_client(
                server.port, encode_message(ConfigFile("default.xml")) + encode_message(header),
                chatter, 0.005)
            return msgs
        finally:
            await server.shutdown()

    msgs = run(go())
    assert texts_of(msgs) == ["mrharmony error: session deadline: connected for more than "
                              "0.5 s (--session-timeout-s)"]


# --------------------------------------------------------------------------- 5. failures


def test_empty_acquisitions_are_refused_with_a_recon_error():
    header, _ = synthetic_cartesian_scan(nx=16, ny=16, n_coils=2, n_slices=1, seed=34)
    group = empty_acquisitions(1, slice_index=0)
    with pytest.raises(ReconError, match=r"is empty: 0 samples x 2 channels"):
        check_not_empty(group)
    with pytest.raises(ReconError, match="is empty"):
        reconstruct_to_mrd(header, group, method="auto", backend="numpy")


def test_empty_slices_reach_the_client_as_errors_and_the_stream_goes_on():
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=2, seed=35)
    stream = acqs + empty_acquisitions(3, slice_index=1)

    async def go():
        server = await started()
        try:
            return await stream_acquisitions(header, stream, port=server.port)
        finally:
            await server.shutdown()

    result = run(go())
    assert len(result.images) == 2 and result.closed
    assert len(result.texts) == 3
    assert all("reconstruction failed" in t and "is empty: 0 samples x 2 channels" in t
               for t in result.texts)


def test_an_unexpected_failure_is_reported_with_a_traceback_in_the_log(monkeypatch, caplog):
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=2, seed=36)
    real = jobs_mod.reconstruct_to_mrd

    def flaky(hdr, group, **kw):
        if any(int(a.idx.slice) == 1 for a in group):
            return 1 // 0  # a bug, not a ReconError
        return real(hdr, group, **kw)

    monkeypatch.setattr(jobs_mod, "reconstruct_to_mrd", flaky)

    async def go():
        server = await started()
        try:
            return await stream_acquisitions(header, acqs, port=server.port)
        finally:
            await server.shutdown()

    with caplog.at_level(logging.ERROR, logger="mrharmony.stream"):
        result = run(go())
    assert len(result.images) == 1 and result.closed
    assert result.texts == ["mrharmony error: slice 1 repetition 0: reconstruction failed: "
                            "ZeroDivisionError: integer division or modulo by zero"]
    logged = [r for r in caplog.records if "ZeroDivisionError" in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the traceback is in the log


def test_gadget_reports_failures_to_gadgetron_after_the_images():
    pytest.importorskip("gadgetron")
    from gadgetron.external import Connection
    from gadgetron.external import constants as gtc
    from gadgetron.external.readers import read, read_image

    from mrharmony.recon.stream.gadget import GADGET_MESSAGE_ERROR, recon

    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=2, seed=37)
    ours, theirs = socket.socketpair()
    errors: list[BaseException] = []

    def gadget_side():
        try:
            with Connection(theirs) as conn:
                recon(conn)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    thread = threading.Thread(target=gadget_side, daemon=True)
    thread.start()
    out = (encode_message(ConfigText("<configuration/>")) + encode_message(header)
           + b"".join(encode_message(a) for a in acqs + empty_acquisitions(3, slice_index=7))
           + CLOSE_BYTES)
    with ours:
        ours.settimeout(TIMEOUT_S)
        ours.sendall(out)
        reply = ours.makefile("rb")
        images, texts = [], []
        while (mid := read(reply, gtc.GadgetMessageIdentifier)) != gtc.GADGET_MESSAGE_CLOSE:
            if mid == GADGET_MESSAGE_ERROR:
                (n,) = struct.unpack("<Q", reply.read(8))
                texts.append(reply.read(n).decode())
            else:
                assert mid == gtc.GADGET_MESSAGE_ISMRMRD_IMAGE and not texts  # images first
                images.append(read_image(reply))
    thread.join(TIMEOUT_S)
    assert not errors, errors
    assert len(images) == 2
    assert len(texts) == 3 and all("is empty: 0 samples x 2 channels" in t for t in texts)
