"""Building protocols into `.seq` files, and reading `.seq` files back.

Writing is atomic: the sequence is written to a temporary file in the target folder and
renamed into place only when complete, so a failed build never leaves a partial `.seq`.
"""

from __future__ import annotations

import contextlib
import gc
import io
import warnings
from pathlib import Path

import pypulseq as pp

from mrharmony.errors import SequenceFileError
from mrharmony.fileio import atomic_path
from mrharmony.sequences.builders import get_builder
from mrharmony.sequences.protocol import Protocol, load_protocol
from mrharmony.sequences.scanner import ScannerProfile, load_scanner

__all__ = ["build", "build_file", "read_seq", "write_seq"]


def build(protocol: Protocol | str | Path, scanner: ScannerProfile | str) -> pp.Sequence:
    """Build a protocol on a scanner.

    Parameters
    ----------
    protocol : Protocol or path
        A validated protocol, or the path of a protocol TOML file.
    scanner : ScannerProfile or str
        A profile, a shipped scanner name, or the path of a scanner TOML file.

    Returns
    -------
    pypulseq.Sequence
        The sequence, with achieved TE/TR/TI in its ``[DEFINITIONS]``.

    Raises
    ------
    ConfigError
        Invalid protocol or scanner file.
    ProtocolError
        The protocol is impossible on this scanner (the message names the parameter and
        the limit).
    """
    if not isinstance(protocol, Protocol):
        protocol = load_protocol(protocol)
    profile = load_scanner(scanner)
    return get_builder(protocol.builder)(protocol, profile)


def write_seq(
    seq: pp.Sequence, path: str | Path, *, force: bool = False, check_timing: bool = True
) -> Path:
    """Write a sequence to ``path`` atomically (temporary file, then rename).

    Parameters
    ----------
    seq : pypulseq.Sequence
        The sequence to write (signed with an MD5 signature, duplicates removed).
    path : str or Path
        Target file; ``.seq`` is appended if missing.
    force : bool
        Replace an existing file. Without it an existing file is an error.
    check_timing : bool
        Let pypulseq re-check the timing while writing (it only warns). Builders have
        already checked (and raised) in ``finalize``, so :func:`build_file` skips it.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``force`` is false.
    """
    path = Path(path)
    if path.suffix != ".seq":
        path = path.with_name(path.name + ".seq")
    if path.exists() and not force:
        raise FileExistsError(f"{path}: exists (use --force / force=True to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".seq") as tmp:
        seq.write(str(tmp), create_signature=True, check_timing=check_timing)
    return path


def build_file(
    protocol: Protocol | str | Path,
    scanner: ScannerProfile | str,
    path: str | Path,
    *,
    force: bool = False,
) -> tuple[pp.Sequence, Path]:
    """Build a protocol and write it to ``path``; nothing is written if the build fails.

    Returns
    -------
    (pypulseq.Sequence, Path)
    """
    target = Path(path)
    if target.suffix != ".seq":
        target = target.with_name(target.name + ".seq")
    if target.exists() and not force:
        raise FileExistsError(f"{target}: exists (use --force / force=True to replace it)")
    seq = build(protocol, scanner)  # raises if the timing check fails
    return seq, write_seq(seq, target, force=force, check_timing=False)


def read_seq(path: str | Path, scanner: ScannerProfile | str | None = None) -> pp.Sequence:
    """Read any Pulseq file with pypulseq.

    Parameters
    ----------
    path : str or Path
        The `.seq` file.
    scanner : ScannerProfile or str, optional
        If given, the sequence's system limits (used by timing checks) are this
        scanner's; otherwise pypulseq's defaults, overridden by the file's raster
        definitions.

    Raises
    ------
    SequenceFileError
        Missing file, or a file pypulseq cannot parse (the message says why).
    """
    path = Path(path)
    if not path.is_file():
        raise SequenceFileError(f"{path}: no such file")
    system = load_scanner(scanner).to_opts() if scanner is not None else pp.Opts()
    seq = pp.Sequence(system=system)
    failure: str | None = None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            seq.read(str(path), detect_rf_use=True)
        except Exception as exc:  # pypulseq raises bare KeyError/ValueError/RuntimeError
            # keep only the text: the exception's traceback holds pypulseq's frame and,
            # with it, the file handle pypulseq leaves open when parsing fails
            failure = f"{type(exc).__name__}: {exc}"
        finally:
            # collect that handle here, where its ResourceWarning is silenced (later it
            # would surface in whatever code runs when the collector next comes round)
            gc.collect()
    if failure is not None:
        raise SequenceFileError(f"{path}: pypulseq cannot read this file ({failure})")
    return seq
