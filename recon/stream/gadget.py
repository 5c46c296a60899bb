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
import sys
from typing import Any

import ismrmrd

from mrharmony.errors import ReconError, StreamError
from mrharmony.recon.stream.server import PIPELINES, SliceAssembler, pipeline_from_config

__all__ = ["chain_xml_path", "config_pipeline", "listen", "recon"]

log = logging.getLogger("mrharmony.stream.gadget")


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
    from mrharmony.recon.stream.server import reconstruct_to_mrd

    method, backend = config_pipeline(connection.config)
    header = connection.header
    log.info("mrharmony gadget: method %s, backend %s", method, backend)
    connection.filter(ismrmrd.Acquisition)  # everything else is passed back unchanged
    assembler = SliceAssembler()
    index = 0

    def emit(group: list[Any]) -> None:
        nonlocal index
        try:
            blobs = reconstruct_to_mrd(header, group, method=method, backend=backend)
        except (ReconError, ValueError) as exc:
            log.error("mrharmony gadget: reconstruction failed: %s", exc)
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
    log.info("mrharmony gadget: sent %d image(s)", index)


def listen(port: int) -> None:
    """Passive mode: wait for Gadgetron on ``port`` and run :func:`recon` (one chain)."""
    from gadgetron.external import listen as gt_listen

    if not 0 < port < 65536:
        raise StreamError(f"port: {port} is outside 1..65535")
    gt_listen(port, recon)


if __name__ == "__main__":  # pragma: no cover - manual passive mode
    logging.basicConfig(level=logging.INFO)
    listen(int(sys.argv[1]) if len(sys.argv) > 1 else 18000)
