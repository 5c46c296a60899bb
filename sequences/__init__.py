"""Vendor-agnostic sequence library: protocols + scanner profiles -> Pulseq `.seq` files.

Typical use::

    from mrharmony.sequences import load_protocol, build_file

    seq, path = build_file("examples/protocols/gre2d.toml", "siemens-prisma", "gre.seq")

See :mod:`mrharmony.sequences.protocol` for the protocol keys and
:mod:`mrharmony.sequences.scanner` for the hardware profiles.
"""

from mrharmony.sequences.builders import BUILDER_SUMMARIES, BUILDERS, get_builder
from mrharmony.sequences.io import build, build_file, read_seq, write_seq
from mrharmony.sequences.protocol import PROTOCOL_CLASSES, Protocol, load_protocol
from mrharmony.sequences.scanner import ScannerProfile, list_scanners, load_scanner

__all__ = [
    "BUILDERS",
    "BUILDER_SUMMARIES",
    "PROTOCOL_CLASSES",
    "Protocol",
    "ScannerProfile",
    "build",
    "build_file",
    "get_builder",
    "list_scanners",
    "load_protocol",
    "load_scanner",
    "read_seq",
    "write_seq",
]
