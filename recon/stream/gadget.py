"""mrharmony's reconstruction as a Gadgetron external Python gadget.

Gadgetron (4.x) runs foreign-language steps of a chain through its *external* node:
it starts ``python -m gadgetron <port> <module> <target>`` (active mode, ``<execute>``)
or connects to a process already listening (passive mode, ``<connect port=.../>``),
then streams MRD messages to it through :class:`gadgetron.external.Connection` from the
``gadgetron`` PyPI package. :func:`recon` is such a target::

    <external>
      <execute name="mrharmony.recon.stream.gadget" target="recon" type="python"/>
      <configuration>
        <property name="method" value="auto"/>
        <property name="backend" value="numpy"/>
      </configuration>
    </external>

(see ``mrharmony_external.xml`` beside this module for a whole chain). Acquisitions
are collected per slice exactly as in ``mrharmony serve`` (:class:`SliceAssembler`) and
each finished slice goes back into the chain as :class:`ismrmrd.Image`; anything that
is not an acquisition passes through unchanged. For passive mode run
:func:`listen` (``python -m mrharmony.recon.stream.gadget 18000``).
"""

from __future__ import annotations

import logging
import struct
import sys
from typing import Any

import ismrmrd

from mrharmony.errors import MrHarmonyError, StreamError
from mrharmony.formats.header import check_xml, parse_ismrmrd_header
from mrharmony.recon.stream.assembly import SliceAssembler
from mrharmony.recon.stream.pipelines import PIPELINES, pipeline_from_config

__all__ = ["GADGET_MESSAGE_ERROR", "chain_xml_path", "config_pipeline", "listen", "recon",
           "send_error"]

log = logging.getLogger("mrharmony.stream.gadget")

#: Message id with which an external gadget reports an error to Gadgetron (``uint16`` id,
#: ``uint64`` length, UTF-8 text); Gadgetron ends the chain with it and reports it to its
#: client. Sent after the last image, so every slice that can be reconstructed still is.
GADGET_MESSAGE_ERROR = 8


def chain_xml_path() -> Any:
    """The shipped Gadgetron chain ``mrharmony_external.xml`` (an importlib resource)."""
    from importlib import resources

    return resources.files("mrharmony.recon.stream").joinpath("mrharmony_external.xml")


def config_pipeline(config: Any) -> tuple[str, str]:
    """``(method, backend)`` from the ``<configuration>`` Gadgetron forwards.

    Parameters
    ----------
    config : xml.etree.ElementTree.Element, bytes, str or None
        ``connection.config`` (an Element; None when the configuration is empty or did
        not parse) or raw XML.

    Returns
    -------
    (str, str)
        Reconstruction method and backend (default ``auto`` and ``numpy``).

    Raises
    ------
    StreamError
        Unknown method, backend or pipeline name.
    """
    import xml.etree.ElementTree as ET

    from mrharmony.recon.stream.protocol import ConfigText

    if config is None:
        pipe = PIPELINES["default.xml"]
    else:
        text = config if isinstance(config, str) else (
            config.decode() if isinstance(config, bytes) else ET.tostring(config, "unicode"))
        pipe = pipeline_from_config(ConfigText(text)) if text.strip() else PIPELINES["default.xml"]
    return pipe.method, pipe.backend or "numpy"


def recon(connection: Any) -> None:
    """Gadgetron external target: reconstruct acquisitions slice by slice.

    Parameters
    ----------
    connection : gadgetron.external.Connection
        Iterable of items from Gadgetron with ``header``, ``config`` and ``send``.
    """
    from mrharmony.recon.stream.jobs import reconstruct_to_mrd

    raw = getattr(connection, "raw_bytes", None)
    try:
        # the gadgetron package parsed these already; refuse DTDs/entities all the same
        if raw is not None and getattr(raw, "config", None):
            check_xml(raw.config, source="gadget configuration", error=StreamError)
        if raw is not None and getattr(raw, "header", None):
            parse_ismrmrd_header(raw.header, source="HEADER", error=StreamError)
        method, backend = config_pipeline(connection.config)
    except StreamError as exc:
        log.error("mrharmony gadget: %s", exc)
        send_error(connection, f"mrharmony error: {exc}")
        return
    header = connection.header
    log.info("mrharmony gadget: method %s, backend %s", method, backend)
    connection.filter(ismrmrd.Acquisition)  # everything else is passed back unchanged
    assembler = SliceAssembler()
    index = 0
    errors: list[str] = []

    def emit(group: list[Any]) -> None:
        nonlocal index
        first = next((a for a in group if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)),
                     group[0])
        where = f"slice {int(first.idx.slice)} repetition {int(first.idx.repetition)}"
        try:
            blobs = reconstruct_to_mrd(header, group, method=method, backend=backend)
        except Exception as exc:  # every failure is reported, with a traceback in the log
            text = str(exc) if isinstance(exc, MrHarmonyError) and str(exc) else (
                f"{type(exc).__name__}: {exc}")
            errors.append(f"{where}: reconstruction failed: {text}")
            log.error("mrharmony gadget: %s", errors[-1], exc_info=exc)
            return
        for blob in blobs:
            img = ismrmrd.Image.from_bytes(blob)
            index += 1
            img.image_index = index
            connection.send(img)

    for acq in connection:
        for group in assembler.add(acq):
            emit(group)
    for group in assembler.flush():
        emit(group)
    for text in errors:
        send_error(connection, f"mrharmony error: {text}")
    log.info("mrharmony gadget: sent %d image(s), %d error(s)", index, len(errors))


def send_error(connection: Any, text: str) -> None:
    """Report an error to Gadgetron through an external-gadget connection.

    Parameters
    ----------
    connection : gadgetron.external.Connection
        Its ``socket`` (``write(bytes)``) carries the message.
    text : str
        The error, sent as an ERROR message (:data:`GADGET_MESSAGE_ERROR`, ``uint64``
        length, UTF-8).
    """
    data = text.encode("utf-8")
    connection.socket.write(struct.pack("<HQ", GADGET_MESSAGE_ERROR, len(data)) + data)


def listen(port: int) -> None:
    """Passive mode: wait for Gadgetron on ``port`` and run :func:`recon` (one chain)."""
    from gadgetron.external import listen as gt_listen

    if not 0 < port < 65536:
        raise StreamError(f"port: {port} is outside 1..65535")
    gt_listen(port, recon)


if __name__ == "__main__":  # pragma: no cover - manual passive mode
    logging.basicConfig(level=logging.INFO)
    listen(int(sys.argv[1]) if len(sys.argv) > 1 else 18000)
