"""MRD streaming server: equality with the offline recon, incremental output, many clients,
nothing lost on disconnect, graceful shutdown, TLS."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess

import ismrmrd
import numpy as np
import pytest
from ismrmrd.serialization import ConfigFile, ProtocolDeserializer, ProtocolSerializer

from mrharmony.errors import StreamError
from mrharmony.formats.raw import read_raw
from mrharmony.recon.pipeline import reconstruct, reconstruct_acquisitions
from mrharmony.recon.stream.client import client_ssl_context, image_to_recon, stream_acquisitions
from mrharmony.recon.stream.protocol import encode_message
from mrharmony.recon.stream.scanner import synthetic_cartesian_scan
from mrharmony.recon.stream.server import ServerSettings, StreamServer

TIMEOUT_S = 60.0  # generous wall-clock guard against hangs, not a timing assertion


def write_ismrmrd_file(path, header, acqs) -> None:
    """Write a scan with the ismrmrd package's own Dataset writer."""
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=True) as ds:
        ds.write_xml_header(ismrmrd.xsd.ToXML(header))
        for a in acqs:
            ds.append_acquisition(a)


def nrmse(ref: np.ndarray, x: np.ndarray) -> float:
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def by_slice(images) -> dict[int, np.ndarray]:
    return {int(r.slice): np.asarray(r.data) for r in map(image_to_recon, images)}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


async def started(**kw) -> StreamServer:
    kw.setdefault("executor", "thread")
    return await StreamServer(ServerSettings(port=0, **kw)).start()


def plain_ismrmrd_client(port: int, path) -> list:
    """A client built only on ismrmrd.serialization and the socket module."""
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as ds:
        header = ismrmrd.xsd.CreateFromDocument(ds.read_xml_header())
        acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as sock:
        with sock.makefile("wb") as out:
            ser = ProtocolSerializer(out)
            ser.serialize(ConfigFile("default.xml"))
            ser.serialize(header)
            for a in acqs:
                ser.serialize(a)
            ser.close()  # CLOSE + flush
        with sock.makefile("rb") as inp:
            return [o for o in ProtocolDeserializer(inp).deserialize()
                    if isinstance(o, ismrmrd.Image)]


def test_plain_ismrmrd_client_gets_the_offline_reconstruction(tmp_path):
    header, acqs = synthetic_cartesian_scan(nx=64, ny=64, n_coils=4, n_slices=3, seed=1)
    path = tmp_path / "scan.h5"
    write_ismrmrd_file(path, header, acqs)

    async def go():
        server = await started()
        try:
            return await asyncio.to_thread(plain_ismrmrd_client, server.port, path)
        finally:
            await server.shutdown()

    images = run(go())
    offline = reconstruct(read_raw(path), method="auto", backend="numpy")
    got = by_slice(images)
    assert sorted(got) == [0, 1, 2]
    for ref in offline:
        # same code path on the same prewhitened data: equal up to float32 round-off
        assert nrmse(np.asarray(ref.data), got[ref.slice]) < 1e-6
    # geometry survives the MRD image header
    rec = image_to_recon(images[0])
    ref = next(r for r in offline if r.slice == rec.slice)
    np.testing.assert_allclose(rec.affine_ras(), ref.affine_ras(), atol=1e-4)


def test_first_image_arrives_before_the_last_slice_is_sent():
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=3, seed=2)
    last_slice_start = next(i for i, a in enumerate(acqs)
                            if a.idx.slice == 2 and not a.is_flag_set(19))
    state = {}

    async def pace(i, _acq, result):
        if i == last_slice_start:
            # hold the last slice back until an image has come back; a server that
            # only reconstructs at the end of the stream would never send one
            await asyncio.wait_for(result.image_event.wait(), TIMEOUT_S / 2)
            state["images_before_last_slice"] = len(result.images)

    async def go():
        server = await started()
        try:
            return await stream_acquisitions(header, acqs, port=server.port, pace=pace)
        finally:
            await server.shutdown()

    result = run(go())
    assert state["images_before_last_slice"] >= 1
    assert len(result.images) == 3 and result.closed


def test_sixteen_concurrent_clients_each_get_their_own_images():
    scans = [synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=2, seed=100 + c)
             for c in range(16)]

    async def go():
        server = await started(executor="process", workers=2)
        try:
            return await asyncio.gather(*(stream_acquisitions(h, a, port=server.port)
                                          for h, a in scans))
        finally:
            await server.shutdown()

    results = run(go())
    for (header, acqs), result in zip(scans, results, strict=True):
        assert result.closed and not result.texts
        offline = reconstruct_acquisitions(header, acqs, backend="numpy")
        got = by_slice(result.images)
        assert len(got) == 2
        for ref in offline:  # identical computation in a worker process
            assert nrmse(np.asarray(ref.data), got[ref.slice]) < 1e-6


async def _send_partial_and_vanish(port: int, header, acqs, n: int) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(encode_message(ConfigFile("default.xml")) + encode_message(header))
    for a in acqs[:n]:
        writer.write(encode_message(a))
    writer.write(encode_message(ismrmrd.Waveform.from_array(
        np.arange(12, dtype=np.uint32).reshape(3, 4))))  # e.g. ECG
    await writer.drain()
    writer.transport.abort()  # killed client: no CLOSE, connection reset


def test_killed_client_leaves_a_readable_raw_file_and_a_healthy_server(tmp_path):
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=3, seed=3)
    # noise scan + 19 of the 32 lines of slice 0: no image is due yet, so the killed
    # client's socket closes with FIN (unread data would turn it into a RST, after which
    # the kernel may drop bytes the server has not read yet)
    n_sent = 20

    async def go():
        server = await started(save_raw=tmp_path / "raw")
        try:
            await _send_partial_and_vanish(server.port, header, acqs, n_sent)
            while server.connections_served < 1:
                await asyncio.sleep(0.02)
            # the server still serves a well-behaved client
            return await stream_acquisitions(header, acqs, port=server.port)
        finally:
            await server.shutdown()

    result = run(go())
    assert len(result.images) == 3 and result.closed
    files = sorted((tmp_path / "raw").glob("*.h5"))
    assert len(files) == 2 and not list((tmp_path / "raw").glob("*.part"))
    partial = read_raw(files[0])
    assert len(partial.noise) + len(partial.acquisitions) == n_sent
    np.testing.assert_array_equal(partial.acquisitions[-1].data, acqs[n_sent - 1].data)
    with ismrmrd.Dataset(str(files[0]), "dataset", create_if_needed=False) as ds:
        np.testing.assert_array_equal(ds.read_waveform(0).data,
                                      np.arange(12, dtype=np.uint32).reshape(3, 4))
    log = files[0].with_suffix(".json").read_text()
    assert "without CLOSE" in log
    complete = read_raw(files[1])
    assert len(complete.noise) + len(complete.acquisitions) == len(acqs)


def test_shutdown_stops_accepting_and_finishes_running_streams():
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=3, seed=4)

    async def go():
        server = await started()
        port = server.port
        halfway = asyncio.Event()
        resume = asyncio.Event()

        async def pace(i, _acq, _result):
            if i == len(acqs) // 2:
                halfway.set()
                await resume.wait()

        client = asyncio.create_task(stream_acquisitions(header, acqs, port=port, pace=pace))
        await halfway.wait()
        stopping = asyncio.create_task(server.shutdown())
        await asyncio.sleep(0.1)
        with pytest.raises(StreamError, match="cannot connect"):
            await stream_acquisitions(header, acqs[:2], port=port, connect_timeout_s=5)
        resume.set()
        result = await client
        await stopping
        return result

    result = run(go())
    assert len(result.images) == 3 and result.closed


def _make_certs(tmp_path):
    def ossl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp_path)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
         "-keyout", "ca.key", "-out", "ca.pem")
    for name in ("server", "client"):
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", f"{name}.key", "-out", f"{name}.csr")
        ext = tmp_path / f"{name}.ext"
        ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        ossl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-out", f"{name}.pem", "-extfile", ext.name)
    return tmp_path


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool")
def test_tls_with_client_certificates(tmp_path):
    d = _make_certs(tmp_path)
    header, acqs = synthetic_cartesian_scan(nx=32, ny=32, n_coils=2, n_slices=1, seed=5)

    async def go():
        server = await started(tls_cert=d / "server.pem", tls_key=d / "server.key",
                               tls_client_ca=d / "ca.pem")
        try:
            good = client_ssl_context(ca=d / "ca.pem", cert=d / "client.pem",
                                      key=d / "client.key")
            ok = await stream_acquisitions(header, acqs, port=server.port, ssl_context=good)
            anonymous = client_ssl_context(ca=d / "ca.pem")
            try:
                refused = await stream_acquisitions(header, acqs, port=server.port,
                                                    ssl_context=anonymous, timeout_s=10)
            except StreamError:  # TLS alert from the server: certificate required
                refused = None
            return ok, refused
        finally:
            await server.shutdown()

    ok, refused = run(go())
    assert len(ok.images) == 1 and ok.closed
    assert refused is None or not refused.images  # no certificate, no images
