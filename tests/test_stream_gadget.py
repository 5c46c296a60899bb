"""Interoperability with the `gadgetron` package: our gadget behind gadgetron.external's
Connection, and gadgetron's own readers/writers against our server."""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import threading
import xml.etree.ElementTree as ET

import ismrmrd
import numpy as np
import pytest

pytest.importorskip("gadgetron", reason="the Gadgetron client package (a peer) is not installed")

from gadgetron.external import Connection
from gadgetron.external import constants as gtc
from gadgetron.external.readers import read, read_image
from gadgetron.external.writers import write_acquisition, write_byte_string

from mrharmony.recon.pipeline import reconstruct_acquisitions
from mrharmony.recon.stream.client import image_to_recon
from mrharmony.recon.stream.gadget import chain_xml_path, config_pipeline, recon
from mrharmony.recon.stream.protocol import (
    ConfigText,
    EndOfStream,
    MessageId,
    encode_message,
    read_message,
)
from mrharmony.recon.stream.scanner import synthetic_cartesian_scan
from mrharmony.recon.stream.server import ServerSettings, StreamServer

TIMEOUT_S = 60.0  # guard against hangs only


@pytest.fixture(scope="module")
def scan():
    return synthetic_cartesian_scan(nx=32, ny=32, n_coils=3, n_slices=2, seed=11)


def assert_matches_offline(header, acqs, images) -> None:
    offline = {r.slice: np.asarray(r.data)
               for r in reconstruct_acquisitions(header, acqs, backend="numpy")}
    got = {int(r.slice): np.asarray(r.data) for r in map(image_to_recon, images)}
    assert sorted(got) == sorted(offline)
    for s, ref in offline.items():  # same computation: equal up to float32 round-off
        assert np.linalg.norm(got[s] - ref) / np.linalg.norm(ref) < 1e-6


def test_gadget_behind_gadgetron_connection(scan):
    """Our messages -> gadgetron.external.Connection -> our gadget -> Connection.send ->
    our reader: both directions of the external-gadget link."""
    header, acqs = scan
    ours, theirs = socket.socketpair()
    passthrough = ismrmrd.Image.from_array(np.ones((1, 1, 4, 4), np.float32))
    passthrough.image_series_index = 99
    errors: list[BaseException] = []

    def gadget_side():
        try:
            with Connection(theirs) as conn:
                recon(conn)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    thread = threading.Thread(target=gadget_side, daemon=True)
    thread.start()
    config = ConfigText('<configuration><property name="method" value="fft"/></configuration>')

    async def talk():
        reader, writer = await asyncio.open_connection(sock=ours)
        writer.write(encode_message(config) + encode_message(header))
        for a in acqs:
            writer.write(encode_message(a))
        writer.write(encode_message(passthrough) + struct.pack("<H", 4))
        await writer.drain()
        msgs = []
        while True:
            try:
                msgs.append(await read_message(reader))
            except EndOfStream:
                break
            if msgs[-1].id == MessageId.CLOSE:
                break
        writer.close()
        return msgs

    msgs = asyncio.run(asyncio.wait_for(talk(), TIMEOUT_S))
    thread.join(TIMEOUT_S)
    assert not errors, errors
    images = [m.value for m in msgs if m.id == MessageId.IMAGE]
    echoed = [im for im in images if im.image_series_index == 99]
    assert len(echoed) == 1  # non-acquisitions pass through the gadget unchanged
    recon_images = [im for im in images if im.image_series_index != 99]
    assert_matches_offline(header, acqs, recon_images)
    assert msgs[-1].id == MessageId.CLOSE


def test_gadgetron_writers_and_readers_talk_to_our_server(scan):
    header, acqs = scan
    out = io.BytesIO()
    out.write(gtc.GadgetMessageIdentifier.pack(gtc.GADGET_MESSAGE_CONFIG))
    write_byte_string(out, b"<configuration/>")
    out.write(gtc.GadgetMessageIdentifier.pack(gtc.GADGET_MESSAGE_HEADER))
    write_byte_string(out, ismrmrd.xsd.ToXML(header).encode())
    for a in acqs:
        write_acquisition(out, a)
    out.write(gtc.GadgetMessageIdentifier.pack(gtc.GADGET_MESSAGE_CLOSE))

    async def go():
        server = await StreamServer(ServerSettings(port=0, executor="thread")).start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(out.getvalue())
            await writer.drain()
            reply = await reader.read()  # until the server closes
            writer.close()
            return reply
        finally:
            await server.shutdown()

    reply = io.BytesIO(asyncio.run(asyncio.wait_for(go(), TIMEOUT_S)))
    images = []
    while (mid := read(reply, gtc.GadgetMessageIdentifier)) != gtc.GADGET_MESSAGE_CLOSE:
        assert mid == gtc.GADGET_MESSAGE_ISMRMRD_IMAGE
        images.append(read_image(reply))
    assert [int(im.image_index) for im in images] == list(range(1, len(images) + 1))
    assert_matches_offline(header, acqs, images)


def test_shipped_chain_xml_runs_our_gadget():
    root = ET.fromstring(chain_xml_path().read_text())
    execute = root.find("stream/external/execute")
    assert execute is not None and execute.get("type") == "python"
    module = __import__(execute.get("name"), fromlist=[execute.get("target")])
    assert getattr(module, execute.get("target")) is recon
    assert config_pipeline(root.find("stream/external/configuration")) == ("auto", "numpy")
    assert config_pipeline(None) == ("auto", "numpy")
    assert config_pipeline('<c><property name="method" value="sense"/></c>')[0] == "sense"
