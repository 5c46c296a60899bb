"""Reconstruction pipelines of the streaming server, selected by the client's config.

A CONFIG_FILE name (``default.xml``, a Gadgetron chain name) or a CONFIG_TEXT document
(``property``/``parameter`` elements ``pipeline``, ``method``, ``backend``) selects a
:class:`Pipeline` from :data:`PIPELINES`; an MRD v2 stream names it in the header's user
parameter :data:`MRD2_CONFIG_PARAMETER`.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from mrharmony.errors import StreamError
from mrharmony.formats.header import check_xml
from mrharmony.recon.stream.protocol import ConfigText

__all__ = ["MRD2_CONFIG_PARAMETER", "PIPELINES", "Pipeline", "pipeline_from_config"]

_RECON_METHODS = ("auto", "fft", "grappa", "sense", "cs", "tv", "nufft")
_RECON_BACKENDS = ("auto", "numpy", "cupy", "bart")

#: Header user parameter (string) that selects the pipeline of an MRD v2 stream: a config
#: name (``default.xml``, ...) or config XML; ``default.xml`` when absent.
MRD2_CONFIG_PARAMETER = "mrharmony.config"


@dataclass(frozen=True)
class Pipeline:
    """A reconstruction selected by a config name.

    Attributes
    ----------
    name : str
        Config name the client sends (``default.xml``).
    method : str
        :func:`~mrharmony.recon.reconstruct_acquisitions` method.
    backend : str or None
        Array backend; None uses the server's ``--backend``.
    description : str
        One line for ``mrharmony serve --list-pipelines`` and the docs.
    """

    name: str
    method: str
    backend: str | None = None
    description: str = ""


def _pipelines() -> MappingProxyType:
    items = [
        Pipeline("default.xml", "auto", None, "automatic: FFT (fully sampled Cartesian), "
                 "CG-SENSE (undersampled), gridding/EPI by trajectory"),
        Pipeline("mrharmony_auto.xml", "auto", None, "same as default.xml"),
        Pipeline("mrharmony_fft.xml", "fft", None, "zero-filled FFT, POCS partial Fourier, SoS"),
        Pipeline("mrharmony_grappa.xml", "grappa", None, "GRAPPA"),
        Pipeline("mrharmony_sense.xml", "sense", None, "CG-SENSE with ESPIRiT maps"),
        Pipeline("mrharmony_cs.xml", "cs", None, "L1-wavelet compressed sensing"),
        Pipeline("mrharmony_tv.xml", "tv", None, "total-variation SENSE"),
        Pipeline("mrharmony_nufft.xml", "nufft", None, "non-Cartesian NUFFT gridding"),
        Pipeline("mrharmony_bart.xml", "sense", "bart", "BART ecalib + pics"),
        Pipeline("Generic_Cartesian_FFT.xml", "fft", None, "Gadgetron name alias: FFT"),
        Pipeline("Generic_Cartesian_Grappa.xml", "grappa", None, "Gadgetron name alias: GRAPPA"),
    ]
    return MappingProxyType({p.name: p for p in items})


PIPELINES: MappingProxyType = _pipelines()


def _config_properties(text: str, *, source: str) -> dict[str, str]:
    """``name -> value`` of ``<property>``/``<parameter>`` elements of a config XML.

    Both ``<property name="method" value="sense"/>`` and Gadgetron's
    ``<property><name>method</name><value>sense</value></property>`` are understood.
    """
    check_xml(text, source=source, error=StreamError)
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise StreamError(f"{source}: the config is not well-formed XML ({exc})") from None
    props: dict[str, str] = {}
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag not in ("property", "parameter"):
            continue
        name = el.get("name") or (el.findtext("name") or "")
        value = el.get("value") if el.get("value") is not None else (el.findtext("value") or "")
        if name:
            props[name.strip()] = value.strip()
    return props


def pipeline_from_config(config: Any) -> Pipeline:
    """Select the pipeline for a CONFIG_FILE name or a CONFIG_TEXT document.

    Parameters
    ----------
    config : ConfigFile, ConfigText or str
        A name from :data:`PIPELINES` (a path is reduced to its file name), or XML
        whose ``property``/``parameter`` elements name ``pipeline``, ``method`` and/or
        ``backend``. An XML config without these selects ``default.xml``.

    Returns
    -------
    Pipeline

    Raises
    ------
    StreamError
        Unknown pipeline name, method or backend, or malformed XML.
    """
    text = str(config)
    if isinstance(config, ConfigText) or text.lstrip().startswith("<"):
        props = _config_properties(text, source="CONFIG_TEXT")
        base = PIPELINES["default.xml"]
        if "pipeline" in props:
            base = _named_pipeline(props["pipeline"])
        method = props.get("method", base.method)
        backend = props.get("backend", base.backend)
        if method not in _RECON_METHODS:
            raise StreamError(f"CONFIG_TEXT: method {method!r}: expected one of "
                              f"{', '.join(_RECON_METHODS)}")
        if backend is not None and backend not in _RECON_BACKENDS:
            raise StreamError(f"CONFIG_TEXT: backend {backend!r}: expected one of "
                              f"{', '.join(_RECON_BACKENDS)}")
        return replace(base, name="CONFIG_TEXT", method=method, backend=backend)
    return _named_pipeline(text)


def _named_pipeline(name: str) -> Pipeline:
    key = name.strip().replace("\\", "/").rsplit("/", 1)[-1]
    if key not in PIPELINES:
        raise StreamError(f"config {name!r}: unknown pipeline (known: {', '.join(PIPELINES)})")
    return PIPELINES[key]
