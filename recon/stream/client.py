"""An MRD streaming client, like Gadgetron's ``gadgetron_ismrmrd_client``.

It sends a config (a name such as ``default.xml``, or XML text), the ISMRMRD header,
the acquisitions and CLOSE, while it receives images (and TEXT messages) until the
server's CLOSE. Sending and receiving run concurrently, so images come back while the
scan is still being sent. It speaks the same protocol as a Gadgetron server, so it
works against ``mrharmony serve`` and against a real Gadgetron (port 9002). With
``mrd2=True`` it sends an MRD v2 (yardl) stream instead and reads the MRD v2 reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ismrmrd
import numpy as np

from mrharmony.errors import StreamError
from mrharmony.formats.flags import has_flag
from mrharmony.recon.stream.protocol import (
    ConfigFile,
    ConfigText,
    EndOfStream,
    MessageId,
    StreamLimits,
    encode_message,
    read_message,
    write_message,
)

__all__ = [
    "StreamResult",
    "client_ssl_context",
    "image_to_recon",
    "stream_acquisitions",
    "stream_file",
    "write_stream_outputs",
]

_WRITE_BUFFER_BYTES = 1 << 20  # drain the socket buffer beyond this
_CLIENT_LIMITS = StreamLimits(max_image_bytes=1 << 31, max_text_bytes=16 << 20)


@dataclass
class StreamResult:
    """What came back from one streamed scan.

    Attributes
    ----------
    images : list of ismrmrd.Image
        Images in arrival order.
    texts : list of str
        TEXT messages from the server (errors start with ``mrharmony error:`` on ours).
    image_times_s : list of float
        ``time.perf_counter()`` at the arrival of each image.
    last_sent_s : dict
        ``(slice, repetition) -> time.perf_counter()`` after the acquisition carrying
        ``ACQ_LAST_IN_SLICE`` of that slice was handed to the socket.
    closed : bool
        The server ended with CLOSE.
    """

    images: list[Any] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    image_times_s: list[float] = field(default_factory=list)
    last_sent_s: dict[tuple[int, int], float] = field(default_factory=dict)
    closed: bool = False
    image_event: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def latencies_s(self) -> list[float]:
        """Per image: arrival minus the send time of its slice's last acquisition (s)."""
        out = []
        for img, t in zip(self.images, self.image_times_s, strict=True):
            key = (int(img.slice), int(img.repetition))
            if key in self.last_sent_s:
                out.append(t - self.last_sent_s[key])
        return out


def client_ssl_context(*, ca: Path | None = None, cert: Path | None = None,
                       key: Path | None = None, check_hostname: bool = True) -> ssl.SSLContext:
    """TLS context for the client: verify the server with ``ca`` (default: system CAs),
    present ``cert``/``key`` when the server requires client certificates.

    Raises
    ------
    StreamError
        If a file is missing or does not load.
    """
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.check_hostname = check_hostname
    try:
        if cert is not None:
            ctx.load_cert_chain(str(cert), str(key) if key else None)
    except (OSError, ssl.SSLError) as exc:
        raise StreamError(f"TLS: cannot load client certificate {cert}: {exc}") from None
    return ctx


Pace = Callable[[int, Any, StreamResult], Awaitable[None]]


async def stream_acquisitions(
    header: Any,
    acquisitions: list[Any],
    *,
    host: str = "127.0.0.1",
    port: int = 9002,
    config: str = "default.xml",
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    pace: Pace | None = None,
    timeout_s: float = 600.0,
    connect_timeout_s: float = 30.0,
    mrd2: bool = False,
) -> StreamResult:
    """Stream one scan to a server and collect the images it sends back.

    Parameters
    ----------
    header : ismrmrd.xsd.ismrmrdHeader or str
        ISMRMRD header (object or XML).
    acquisitions : list of ismrmrd.Acquisition
        Sent in order (noise scans first, as a scanner does).
    host, port : str, int
        Server address.
    config : str
        Config name (CONFIG_FILE, e.g. ``default.xml``) or XML text starting with
        ``<`` (CONFIG_TEXT).
    ssl_context : ssl.SSLContext, optional
        TLS (see :func:`client_ssl_context`).
    server_hostname : str, optional
        Name to verify the server certificate against (default ``host``).
    pace : callable, optional
        ``await pace(i, acq, result)`` before acquisition ``i`` is sent: real-time
        playback, or waiting for images (``result.image_event``).
    timeout_s : float
        Longest wait for the server's CLOSE after everything was sent (s).
    connect_timeout_s : float
        Longest wait for the TCP/TLS connection (s).
    mrd2 : bool
        Speak MRD v2 (a yardl stream: header, acquisitions, end of stream) instead of
        the v1 protocol. The config travels in the header's user parameter string
        ``mrharmony.config``; the images come back as MRD v2 and are returned as
        ``ismrmrd.Image`` objects like v1 images. MRD v2 has no text message: a server error
        shows as a reply stream without its end marker (a text in ``result.texts``).

    Returns
    -------
    StreamResult

    Raises
    ------
    StreamError
        Connection refused or lost, a malformed reply, or no CLOSE within the timeout.
    """
    if isinstance(header, str | bytes):
        from mrharmony.recon.stream.protocol import parse_header_xml

        header = parse_header_xml(header, source="header")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context, limit=1 << 20,
                                    server_hostname=(server_hostname or host)
                                    if ssl_context else None),
            connect_timeout_s)
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        raise StreamError(f"cannot connect to {host}:{port}: {exc}") from None
    result = StreamResult()
    if mrd2:
        from mrharmony.formats.mrd2 import Mrd2Encoder, acquisition_to_mrd2

        encoder = Mrd2Encoder()
        receiver = asyncio.create_task(_receive_mrd2(reader, result))
    else:
        receiver = asyncio.create_task(_receive(reader, result))
    try:
        if mrd2:
            writer.write(encoder.begin(_mrd2_header(header, config)))
            await writer.drain()
        else:
            cfg: Any = (ConfigText(config) if config.lstrip().startswith("<")
                        else ConfigFile(config))
            await write_message(writer, cfg)
            await write_message(writer, header)
        for i, acq in enumerate(acquisitions):
            if pace is not None:
                await pace(i, acq, result)
            if receiver.done():
                break  # the server ended the connection (error text received)
            if mrd2:
                import mrd

                writer.write(encoder.items([mrd.StreamItem.Acquisition(acquisition_to_mrd2(acq))]))
            else:
                writer.write(encode_message(acq))
            if has_flag(acq.flags, "LAST_IN_SLICE"):
                await writer.drain()
                result.last_sent_s[(int(acq.idx.slice), int(acq.idx.repetition))] = \
                    time.perf_counter()
            elif writer.transport.get_write_buffer_size() > _WRITE_BUFFER_BYTES:
                await writer.drain()
        if not receiver.done():
            if mrd2:
                writer.write(encoder.end())
                await writer.drain()
            else:
                await write_message(writer, None)
    except (ConnectionError, ssl.SSLError):
        pass  # the receiver reports what the server said before it closed
    try:
        await asyncio.wait_for(receiver, timeout_s)
    except TimeoutError:
        raise StreamError(f"{host}:{port}: no CLOSE from the server within {timeout_s:g} s "
                          f"({len(result.images)} image(s) received)") from None
    finally:
        receiver.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            await writer.wait_closed()
    return result


async def _receive(reader: asyncio.StreamReader, result: StreamResult) -> None:
    while True:
        try:
            msg = await read_message(reader, limits=_CLIENT_LIMITS)
        except (EndOfStream, ConnectionError):
            return
        except ssl.SSLError as exc:
            raise StreamError(f"TLS: the server ended the session ({exc.reason or exc})") from None
        if msg.id == MessageId.IMAGE:
            result.images.append(msg.value)
            result.image_times_s.append(time.perf_counter())
            result.image_event.set()
        elif msg.id == MessageId.TEXT:
            result.texts.append(str(msg.value))
        elif msg.id == MessageId.CLOSE:
            result.closed = True
            return
        # acquisitions/waveforms/arrays returned by a pass-through chain are ignored


def _mrd2_header(header: Any, config: str) -> Any:
    """The MRD v2 header to send: ``header`` with the config as the user parameter
    string ``mrharmony.config`` (replacing one already there)."""
    import mrd

    from mrharmony.formats.mrd2 import header_to_mrd2
    from mrharmony.recon.stream.pipelines import MRD2_CONFIG_PARAMETER

    out = header_to_mrd2(header)
    if out.user_parameters is None:
        out.user_parameters = mrd.UserParametersType()
    params = [p for p in out.user_parameters.user_parameter_string
              if p.name != MRD2_CONFIG_PARAMETER]
    params.append(mrd.UserParameterStringType(name=MRD2_CONFIG_PARAMETER, value=config))
    out.user_parameters.user_parameter_string = params
    return out


def _mrd2_reply_item(_index: int, item: Any) -> Any:
    """Decoder-thread side of the client: MRD v2 images become ``ismrmrd.Image``."""
    from mrharmony.formats.mrd2 import image_from_mrd2

    name = type(item).__name__
    if name.startswith("StreamItem.Image") and name != "StreamItem.ImageArray":
        return image_from_mrd2(item)
    return None


async def _receive_mrd2(reader: asyncio.StreamReader, result: StreamResult) -> None:
    from mrharmony.recon.stream.protocol import MessageReader, Mrd2Source

    source = Mrd2Source(MessageReader(reader), limits=_CLIENT_LIMITS, idle_timeout_s=None,
                        transform=_mrd2_reply_item)
    try:
        await source.next()  # the header the server echoes
        while True:
            kind, value = await source.next()
            if kind == "end":
                result.closed = True
                return
            if value is not None:
                result.images.append(value)
                result.image_times_s.append(time.perf_counter())
                result.image_event.set()
    except StreamError as exc:
        result.texts.append(f"mrharmony error: the server's MRD v2 reply ended early (an "
                            f"error on the server; see its log): {exc}")
    except (ConnectionError, ssl.SSLError):
        result.texts.append("mrharmony error: the connection to the server was lost")
    finally:
        source.close()


async def stream_file(path: str | Path, **kwargs: Any) -> tuple[Any, StreamResult]:
    """Read a raw file (ISMRMRD HDF5 or MRD v2) and :func:`stream_acquisitions` it
    (noise scans first). An MRD v2 file is streamed as MRD v2 unless ``mrd2`` is given.

    Returns
    -------
    (header, StreamResult)

    Raises
    ------
    RawDataError
        If the file cannot be read.
    StreamError
        See :func:`stream_acquisitions`.
    """
    from mrharmony.formats.raw import load_raw, sniff_format

    raw = load_raw(path)
    kwargs.setdefault("mrd2", sniff_format(path) == "mrd2")
    acqs = list(raw.noise) + list(raw.acquisitions)
    return raw.header, await stream_acquisitions(raw.header, acqs, **kwargs)


def _meta_value(text: str) -> Any:
    for cast in (int, float):
        with contextlib.suppress(ValueError):
            return cast(text)
    return text


def image_to_recon(img: Any) -> Any:
    """Turn a received :class:`ismrmrd.Image` into a :class:`~mrharmony.recon.ReconImage`.

    The MRD array ``(channels, z, y, x)`` becomes ``(x, y, z)`` (or ``(x, y, z, channels)``);
    geometry comes from the image header, ``meta`` from its attributes (our server's
    ``mrharmony_recon`` JSON becomes ``meta["recon"]``).
    """
    from mrharmony.recon.image import ReconImage

    data = np.transpose(np.asarray(img.data), (3, 2, 1, 0))
    if data.shape[3] == 1:
        data = data[..., 0]
    meta: dict[str, Any] = {}
    if img.attribute_string:
        try:
            parsed = ismrmrd.Meta.deserialize(img.attribute_string)
        except Exception:  # foreign attribute XML: keep the image, drop the meta
            parsed = {}
        for key, value in dict(parsed).items():
            meta[key] = _meta_value(value) if isinstance(value, str) else value
    if "mrharmony_recon" in meta:
        with contextlib.suppress(ValueError, TypeError):
            meta["recon"] = json.loads(str(meta.pop("mrharmony_recon")))
    return ReconImage(
        data=data, slice=int(img.slice), contrast=int(img.contrast),
        repetition=int(img.repetition), set=int(img.set), average=int(img.average),
        position=np.array(img.position[:], float), read_dir=np.array(img.read_dir[:], float),
        phase_dir=np.array(img.phase_dir[:], float), slice_dir=np.array(img.slice_dir[:], float),
        field_of_view_mm=np.array(img.field_of_view[:], float), meta=meta,
    )


def write_stream_outputs(images: list[Any], out_dir: str | Path, stem: str, *,
                         header: Any = None, force: bool = False) -> list[Path]:
    """Write received images as NIfTI + JSON sidecars (one file per image series).

    Parameters
    ----------
    images : list of ismrmrd.Image
    out_dir : str or Path
        Output folder (created).
    stem : str
        File name stem (``<stem>.nii.gz``; ``<stem>_series<k>.nii.gz`` when the server
        sent several series).
    header : ismrmrd.xsd.ismrmrdHeader, optional
        Adds the recon matrix to the sidecar.
    force : bool
        Overwrite existing files.

    Returns
    -------
    list of Path

    Raises
    ------
    StreamError
        If there are no images.
    """
    from mrharmony.recon.output import write_nifti

    if not images:
        raise StreamError("no images were received, nothing to write")
    series: dict[int, list[Any]] = {}
    for img in images:
        series.setdefault(int(img.image_series_index), []).append(image_to_recon(img))
    out = Path(out_dir)
    written: list[Path] = []
    for k, group in sorted(series.items()):
        name = f"{stem}.nii.gz" if len(series) == 1 else f"{stem}_series{k}.nii.gz"
        written += write_nifti(group, out / name, header=header, force=force)
    return written
