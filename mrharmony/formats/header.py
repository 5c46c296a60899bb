"""The one ISMRMRD/MRD XML header parser (files, streams and configs alike).

Every XML document that reaches mrharmony from outside — the header of an ISMRMRD or MRD
file, a HEADER or CONFIG_TEXT message of a stream, a Gadgetron config — is first checked
by :func:`check_xml`: expat decodes it in whatever encoding it declares (UTF-8, UTF-16 with
or without a BOM, Latin-1, ...) and any document type declaration or entity declaration
is refused, so neither entity expansion ("billion laughs") nor external entities can
happen. Only then is it handed to the ISMRMRD schema binding.
"""

from __future__ import annotations

import threading
import warnings
import xml.parsers.expat
from typing import Any

from mrharmony.errors import MrHarmonyError, RawDataError

__all__ = ["check_xml", "header_to_xml", "parse_ismrmrd_header"]


class _Refused(Exception):
    pass


def check_xml(
    document: bytes | str, *, source: str = "XML", error: type[Exception] = RawDataError,
    what: str = "XML",
) -> None:
    """Check that ``document`` is well-formed XML without DTDs or entity declarations.

    Parameters
    ----------
    document : bytes or str
        The XML document. Bytes are decoded by the parser from their BOM or XML
        declaration, so the check holds in every encoding.
    source : str
        Name used in error messages.
    error : type
        Exception type raised on refusal (the caller's domain error).
    what : str
        What the document should be, for the message of a malformed one.

    Raises
    ------
    error
        If the document declares a DTD or an entity, or is not well-formed.
    """
    parser = xml.parsers.expat.ParserCreate()

    def refuse(*_args: Any) -> None:
        raise _Refused

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    try:
        parser.Parse(document, True)
    except _Refused:
        raise error(f"{source}: DTDs and entity declarations are not allowed") from None
    except (xml.parsers.expat.ExpatError, ValueError, UnicodeError) as exc:
        raise error(f"{source}: not valid {what} (not well-formed: {exc})") from None


def parse_ismrmrd_header(
    document: bytes | str, *, source: str = "header", error: type[Exception] = RawDataError
) -> Any:
    """Parse an ISMRMRD (MRD v1) XML header safely.

    Parameters
    ----------
    document : bytes or str
        The header document, in any encoding its declaration names.
    source : str
        Name used in error messages (a file name, ``"HEADER"``).
    error : type
        Exception type raised on a bad header (``RawDataError`` for files,
        ``StreamError`` for streams).

    Returns
    -------
    ismrmrd.xsd.ismrmrdHeader

    Raises
    ------
    error
        If the document declares a DTD or entities, is not well-formed, does not follow
        the ISMRMRD schema, or has no ``<encoding>``.
    """
    check_xml(document, source=source, error=error, what="ISMRMRD header XML")
    try:
        with warnings.catch_warnings():
            # a value of the wrong type (e.g. "256.0" for an integer) is an error here,
            # not a warning and a silently defaulted field
            warnings.simplefilter("error")
            header = _schema_parse(document)
    except MrHarmonyError:
        raise
    except Exception as exc:  # xsdata raises parser-specific exception and warning types
        text = " ".join(str(exc).split())
        raise error(f"{source}: not valid ISMRMRD header XML ({text})") from None
    if not getattr(header, "encoding", None):
        raise error(f"{source}: the ISMRMRD header has no <encoding>")
    return header


_XSDATA = threading.local()


def _schema_parse(document: bytes | str) -> Any:
    """``ismrmrd.xsd.CreateFromDocument`` (same parser settings) with an xsdata
    ``XmlContext`` kept per thread: building the binding's class metadata costs ~6 ms,
    every call of ``CreateFromDocument`` pays it again (a server parses one header per
    connection); a parse with the metadata built is ~1 ms."""
    from ismrmrd.xsd import ismrmrdHeader
    from xsdata.formats.dataclass.context import XmlContext
    from xsdata.formats.dataclass.parsers import XmlParser
    from xsdata.formats.dataclass.parsers.config import ParserConfig

    context = getattr(_XSDATA, "context", None)
    if context is None:
        context = _XSDATA.context = XmlContext()
    parser = XmlParser(config=ParserConfig(fail_on_unknown_properties=True), context=context)
    if isinstance(document, str):
        return parser.from_string(document, ismrmrdHeader)
    return parser.from_bytes(document, ismrmrdHeader)


def _plain(obj: Any, seen: set[int] | None = None) -> None:
    """Replace NumPy scalars in a header dataclass tree by Python numbers, in place (the
    XML binding writes ``np.float64(128.0)`` for them under NumPy 2)."""
    import dataclasses

    import numpy as np

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, list):
        for i, item in enumerate(obj):
            if isinstance(item, np.generic):
                obj[i] = item.item()
            else:
                _plain(item, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, np.generic):
                setattr(obj, f.name, value.item())
            elif isinstance(value, list) or dataclasses.is_dataclass(value):
                _plain(value, seen)


def header_to_xml(header: Any) -> str:
    """Serialise an ``ismrmrd.xsd.ismrmrdHeader`` to its XML text (the one header writer).

    NumPy scalars anywhere in the header are written as plain numbers.
    """
    import ismrmrd.xsd

    _plain(header)
    return ismrmrd.xsd.ToXML(header)
