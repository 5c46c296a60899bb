"""ISMRMRD headers from a protocol + scanner, or from a `.seq` file with our definitions.

The header describes what a reconstruction needs: encoded and reconstructed spaces,
encoding limits (from the Pulseq labels when present, else from the matrix), the
trajectory kind, sequence parameters (TE/TR/TI in ms, flip angle, diffusion scheme) and
the system (vendor, model, field strength, receiver channels, Larmor frequency).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import ismrmrd.xsd as mrd
import pypulseq as pp

from mrharmony.errors import SequenceFileError
from mrharmony.sequences.protocol import Protocol, load_protocol
from mrharmony.sequences.scanner import ScannerProfile, load_scanner

__all__ = ["ismrmrd_header", "ismrmrd_header_xml"]

def ismrmrd_header(
    source: Protocol | pp.Sequence | str | Path,
    scanner: ScannerProfile | str | None = None,
    *,
    receiver_channels: int = 1,
) -> mrd.ismrmrdHeader:
    """Build an ISMRMRD header for a sequence.

    The header itself is made by :func:`mrharmony.formats.layout.header_from_seq` (the one
    header builder, shared with the simulator and the twix converter) from the ``.seq``
    this sequence writes; this function resolves protocols and scanners.

    Parameters
    ----------
    source : Protocol, pypulseq.Sequence, or path
        A protocol (or protocol ``.toml``), which is built on ``scanner`` first; a built
        sequence; or a ``.seq`` file carrying our ``[DEFINITIONS]``.
    scanner : ScannerProfile or str, optional
        Required for a protocol; for a sequence, overrides its ``Scanner`` definition.
    receiver_channels : int
        Number of receive coils.

    Returns
    -------
    ismrmrd.xsd.ismrmrdHeader

    Raises
    ------
    SequenceFileError
        If a `.seq` lacks the definitions a header needs (``FOV``, ``MatrixSize``).
    ConfigError
        If a protocol is given without a scanner.
    """
    from mrharmony.errors import ConfigError
    from mrharmony.formats.layout import header_from_seq
    from mrharmony.formats.pulseq import read_pulseq
    from mrharmony.sequences.io import build, write_seq

    if isinstance(source, str | Path) and Path(source).suffix == ".toml":
        source = load_protocol(source)
    with tempfile.TemporaryDirectory(prefix="mrharmony-header-") as work:
        if isinstance(source, Protocol):
            if scanner is None:
                raise ConfigError("scanner: a protocol needs a scanner to become a header")
            source = build(source, scanner)
        if isinstance(source, pp.Sequence):
            path = write_seq(source, Path(work) / "sequence.seq", check_timing=False)
            name = "sequence"
        else:
            path, name = Path(source), str(source)
        seq = read_pulseq(path)
    defs = seq.definitions
    for key in ("FOV", "MatrixSize"):
        if key not in defs:
            raise SequenceFileError(
                f"{name}: [DEFINITIONS] lacks {key}, which an ISMRMRD header needs"
            )
    profile = load_scanner(scanner) if scanner is not None else None
    if profile is None and "Scanner" in defs:
        try:
            profile = load_scanner(str(defs["Scanner"]))
        except Exception:
            profile = None
    return header_from_seq(
        seq, n_coils=receiver_channels,
        vendor=profile.vendor if profile else None,
        model=profile.model if profile else None,
        field_t=float(profile.field_strength_t) if profile else None,
    )


def ismrmrd_header_xml(
    source: Protocol | pp.Sequence | str | Path,
    scanner: ScannerProfile | str | None = None,
    *,
    receiver_channels: int = 1,
) -> str:
    """Serialise :func:`ismrmrd_header` to ISMRMRD XML text."""
    from mrharmony.formats.header import header_to_xml

    return header_to_xml(ismrmrd_header(source, scanner, receiver_channels=receiver_channels))
