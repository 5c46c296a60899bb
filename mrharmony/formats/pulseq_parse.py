"""Low-level parser of the Pulseq text format (versions 1.2.0 to 1.5.x).

This module turns the text of a ``.seq`` file into plain tables (NumPy arrays with the
1-based line number of every row) without interpreting them; :mod:`.pulseq` builds the
sequence model on top. Every syntax problem raises
:class:`~mrharmony.errors.SequenceFileError` naming the file and the line.

The format is specified in ``doc/specification.tex`` of the pulseq/pulseq repository.
Shapes are stored run-length compressed: the derivative of the samples is written, and a
value that appears twice in a row is followed by the number of further repetitions.
:func:`decompress_shape` undoes this without a loop over samples.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrharmony.errors import SequenceFileError

__all__ = ["ADCEvent", "ExtensionSpec", "GradientEvent", "ParsedFile", "RFEvent", "Rasters",
           "Table", "decompress_shape", "parse_text"]  # fmt: skip

_HEADER = re.compile(r"^[ \t]*(\[[A-Za-z_]+\]|extension[ \t]+\S+[ \t]+\S+)[ \t]*\r?$", re.MULTILINE)
_KNOWN_SECTIONS = (
    "[VERSION]", "[DEFINITIONS]", "[BLOCKS]", "[RF]", "[GRADIENTS]", "[TRAP]", "[ADC]",
    "[DELAYS]", "[EXTENSIONS]", "[SHAPES]", "[SIGNATURE]",
)  # fmt: skip
_RF_USES = {"e": "excitation", "r": "refocusing", "i": "inversion", "s": "saturation",
            "p": "preparation", "o": "other", "u": "undefined"}  # fmt: skip
_GAMMA_HZ_PER_T = 42.576e6
_DEFAULT_RASTERS = (10e-6, 1e-6, 100e-9, 10e-6)  # grad, rf, adc, block (pypulseq defaults)


@dataclass(frozen=True, eq=False)
class Table:
    """Numeric rows of one event section.

    Attributes
    ----------
    ids : np.ndarray
        (n,) int64 event IDs, in file order.
    values : np.ndarray
        (n, ncols) float64 values after the ID, in the file's units (not yet scaled).
    lines : np.ndarray
        (n,) int64 1-based line numbers of the rows.
    chars : tuple of str
        One trailing character column per row (the RF ``use`` of v1.5), else empty.
    """

    ids: np.ndarray
    values: np.ndarray
    lines: np.ndarray
    chars: tuple[str, ...] = ()

    @classmethod
    def empty(cls, ncols: int) -> Table:
        return cls(np.zeros(0, np.int64), np.zeros((0, ncols)), np.zeros(0, np.int64), ())

    def index(self) -> dict[int, int]:
        """Map event ID -> row."""
        return {int(i): k for k, i in enumerate(self.ids)}


@dataclass(frozen=True, eq=False)
class ExtensionSpec:
    """The rows of one ``extension <NAME> <type>`` specification (tokens kept as text)."""

    name: str
    type_id: int
    line: int
    rows: dict[int, tuple[int, list[str]]] = field(default_factory=dict)  # id -> (line, tokens)
    bad_rows: list[tuple[int, str]] = field(default_factory=list)  # (line, problem)


@dataclass(eq=False)
class ParsedFile:
    """Everything a ``.seq`` file states, as tables; see :func:`parse_text`."""

    source: str
    version: tuple[int, int, int]
    definitions: dict[str, Any]
    blocks: np.ndarray  # (n, 8) int64: id, duration/delay id, rf, gx, gy, gz, adc, ext
    block_lines: np.ndarray
    rf: Table
    gradients: Table
    traps: Table
    adc: Table
    delays: Table
    extensions: Table  # values: type, ref, next
    extension_specs: dict[int, ExtensionSpec]  # by numeric type ID
    shapes: dict[int, tuple[int, np.ndarray, int]]  # id -> (num_samples, stored data, line)
    signature_type: str | None = None
    signature_hash: str | None = None
    signature_ok: bool | None = None

    @property
    def version_combined(self) -> int:
        major, minor, rev = self.version
        return 1_000_000 * major + 1000 * minor + rev


#: Largest magnitude of any number in a Pulseq table or shape. Physical values stay far
#: below it (gradients ~1e7 Hz/m, durations ~1e9 raster steps, IDs ~1e7); beyond it a
#: value is corrupt and would overflow the float arithmetic downstream.
MAX_ABS_VALUE = 1e12


def _err(source: str, line: int | None, msg: str) -> SequenceFileError:
    where = f"{source}, line {line}" if line is not None else source
    return SequenceFileError(f"{where}: {msg}")


def _parse_value(token: str) -> int | float | None:
    try:
        return int(token)
    except ValueError:
        pass
    try:
        return float(token)
    except ValueError:
        return None


def _definitions(source: str, rows: list[tuple[int, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _, text in rows:
        parts = text.split(None, 1)
        key = parts[0]
        raw = parts[1].strip() if len(parts) > 1 else ""
        tokens = raw.split()
        values = [_parse_value(t) for t in tokens]
        if not tokens:
            out[key] = ""
        elif any(v is None for v in values):
            out[key] = raw
        elif len(values) == 1:
            out[key] = values[0]
        else:
            out[key] = np.asarray(values, dtype=np.float64)
    return out


def _table(
    source: str,
    section: str,
    rows: list[tuple[int, str]],
    ncols: tuple[int, ...],
    *,
    char_last: bool = False,
) -> Table:
    """Rows of whitespace-separated numbers; ``ncols`` = allowed counts incl. the ID."""
    if not rows:
        return Table.empty(max(ncols) - 1 - int(char_last))
    tokens = [text.split() for _, text in rows]
    lengths = np.fromiter((len(t) for t in tokens), np.int64, len(tokens))
    expected = int(lengths[0])
    if expected not in ncols:
        raise _err(
            source,
            rows[0][0],
            f"{section} row has {expected} fields, expected {' or '.join(map(str, ncols))}",
        )
    bad = np.flatnonzero(lengths != expected)
    if bad.size:
        k = int(bad[0])
        raise _err(
            source, rows[k][0], f"{section} row has {lengths[k]} fields, expected {expected}"
        )
    chars: tuple[str, ...] = ()
    if char_last:
        chars = tuple(t[-1] for t in tokens)
        bad_chars = [k for k, c in enumerate(chars) if len(c) != 1 or not c.isalpha()]
        if bad_chars:
            k = bad_chars[0]
            raise _err(source, rows[k][0], f"{section} 'use' field {chars[k]!r} is not a letter")
        tokens = [t[:-1] for t in tokens]
    try:
        arr = np.array(tokens, dtype=np.float64)
    except ValueError:
        for (line, _), toks in zip(rows, tokens, strict=True):
            for t in toks:
                if _parse_value(t) is None:
                    raise _err(source, line, f"{section}: {t!r} is not a number") from None
        raise  # pragma: no cover - unreachable
    if not np.all(np.isfinite(arr)):
        k = int(np.flatnonzero(~np.all(np.isfinite(arr), axis=1))[0])
        raise _err(source, rows[k][0], f"{section}: non-finite value")
    huge = np.abs(arr) > MAX_ABS_VALUE
    if huge.any():
        k = int(np.flatnonzero(huge.any(axis=1))[0])
        value = float(arr[k][huge[k]][0])
        raise _err(source, rows[k][0], f"{section}: value {value:g} is out of range "
                   f"(|value| <= {MAX_ABS_VALUE:g} for every Pulseq quantity)")
    ids_f = arr[:, 0]
    ids = ids_f.astype(np.int64)
    lines = np.fromiter((ln for ln, _ in rows), np.int64, len(rows))
    bad_id = np.flatnonzero((ids != ids_f) | (ids <= 0))
    if bad_id.size:
        k = int(bad_id[0])
        raise _err(source, int(lines[k]), f"{section}: ID {ids_f[k]!r} is not a positive integer")
    uniq, counts = np.unique(ids, return_counts=True)
    if np.any(counts > 1):
        dup = int(uniq[np.flatnonzero(counts > 1)[0]])
        rows_dup = np.flatnonzero(ids == dup)
        raise _err(source, int(lines[rows_dup[1]]), f"{section}: duplicate ID {dup}")
    return Table(ids, arr[:, 1:], lines, chars)


def _shapes(
    source: str, rows: list[tuple[int, str]]
) -> dict[int, tuple[int, np.ndarray, int]]:
    shapes: dict[int, tuple[int, np.ndarray, int]] = {}
    k = 0
    n = len(rows)
    while k < n:
        line, text = rows[k]
        parts = text.split()
        if len(parts) != 2 or parts[0] != "shape_id":
            raise _err(source, line, f"[SHAPES]: expected 'shape_id <id>', got {text!r}")
        sid = _parse_value(parts[1])
        if not isinstance(sid, int) or sid <= 0:
            raise _err(source, line, f"[SHAPES]: shape ID {parts[1]!r} is not a positive integer")
        if sid in shapes:
            raise _err(source, line, f"[SHAPES]: duplicate shape ID {sid}")
        if k + 1 >= n:
            raise _err(source, line, f"[SHAPES]: shape {sid} has no 'num_samples' line")
        line2, text2 = rows[k + 1]
        parts2 = text2.split()
        num = _parse_value(parts2[1]) if len(parts2) == 2 else None
        if parts2[0] != "num_samples" or not isinstance(num, int) or num < 0:
            raise _err(source, line2, f"[SHAPES]: expected 'num_samples <n>', got {text2!r}")
        j = k + 2
        while j < n and not rows[j][1].startswith("shape_id"):
            j += 1
        samples = [t for _, t in rows[k + 2 : j]]
        try:
            data = np.array(samples, dtype=np.float64)
        except ValueError:
            for ln, t in rows[k + 2 : j]:
                if _parse_value(t) is None:
                    msg = f"[SHAPES]: sample {t!r} of shape {sid} is not a number"
                    raise _err(source, ln, msg) from None
            raise  # pragma: no cover
        if data.size == 0:
            raise _err(source, line, f"[SHAPES]: shape {sid} has no samples")
        if not np.all(np.isfinite(data)):
            bad = int(np.flatnonzero(~np.isfinite(data))[0])
            raise _err(source, rows[k + 2 + bad][0], f"[SHAPES]: non-finite sample in shape {sid}")
        if np.any(np.abs(data) > MAX_ABS_VALUE):
            bad = int(np.flatnonzero(np.abs(data) > MAX_ABS_VALUE)[0])
            raise _err(source, rows[k + 2 + bad][0], f"[SHAPES]: sample {data[bad]:g} of shape "
                       f"{sid} is out of range (|value| <= {MAX_ABS_VALUE:g})")
        shapes[sid] = (num, data, line)
        k = j
    return shapes


def decompress_shape(
    num_samples: int, data: np.ndarray, *, force_compressed: bool = False
) -> np.ndarray:
    """Decompress one Pulseq shape (run-length encoded derivative), without a sample loop.

    Parameters
    ----------
    num_samples : int
        Declared number of samples after decompression.
    data : np.ndarray
        Stored values.
    force_compressed : bool
        Treat the data as compressed even when it has ``num_samples`` entries (files older
        than v1.4.0, where that length did not mark an uncompressed shape).

    Returns
    -------
    np.ndarray
        (num_samples,) float64 samples.

    Raises
    ------
    ValueError
        Malformed run-length data or a length different from ``num_samples`` (the caller
        turns this into a :class:`SequenceFileError` naming the shape and line).
    """
    data = np.asarray(data, dtype=np.float64)
    if data.size == num_samples and not force_compressed:
        return data.copy()
    n = data.size
    # Candidate pairs: two equal consecutive values. The stream is read greedily from the
    # left: a pair at p consumes p, p+1 and the count at p+2. Only the candidate pairs are
    # visited (one per run), never the samples.
    cand = np.flatnonzero(data[:-1] == data[1:]) if n > 1 else np.zeros(0, np.int64)
    reps = np.ones(n, dtype=np.int64)
    next_free = 0
    for p in cand.tolist():
        if p < next_free:
            continue
        if p + 2 >= n:
            raise ValueError(f"run of value {data[p]} at stored sample {p} has no count")
        count = data[p + 2]
        if count < 0 or count != np.floor(count):
            raise ValueError(f"run count {count} at stored sample {p + 2} is not an integer >= 0")
        reps[p] = int(count) + 2
        reps[p + 1] = 0
        reps[p + 2] = 0
        next_free = p + 3
    total = int(reps.sum())
    if total != num_samples:
        raise ValueError(f"decompresses to {total} samples, num_samples says {num_samples}")
    return np.cumsum(np.repeat(data, reps))


def _sections(source: str, text: str) -> list[tuple[str, int, list[tuple[int, str]]]]:
    """Split the text into (header, header line, [(line, stripped text), ...])."""
    out: list[tuple[str, int, list[tuple[int, str]]]] = []
    matches = list(_HEADER.finditer(text))
    # line number of each match start, computed incrementally (no per-line loop over text)
    line_at = 1
    last_pos = 0
    starts: list[int] = []
    for m in matches:
        line_at += text.count("\n", last_pos, m.start())
        last_pos = m.start()
        starts.append(line_at)
    # content before the first header must be comments or blank
    pre_end = matches[0].start() if matches else len(text)
    for k, raw in enumerate(text[:pre_end].splitlines(), 1):
        s = raw.strip()
        if s and not s.startswith("#"):
            raise _err(source, k, f"text outside any section: {s[:40]!r}")
    for idx, m in enumerate(matches):
        body_start = m.end()
        body_end = matches[idx + 1].start() if idx + 1 < len(matches) else len(text)
        body = text[body_start:body_end]
        first_line = starts[idx]
        rows = []
        for off, raw in enumerate(body.split("\n")):
            s = raw.strip()
            if s and s[0] != "#":
                rows.append((first_line + off, s))
        out.append((m.group(1).strip(), first_line, rows))
    return out


def _check_signature(
    source: str, raw: bytes, sig_type: str | None, sig_hash: str | None, line: int
) -> bool | None:
    if sig_type is None or sig_hash is None:
        return None
    algo = sig_type.lower()
    if algo not in hashlib.algorithms_available:
        return None  # cannot verify an unknown hash type; not an error
    pos = raw.find(b"[SIGNATURE]")
    head = raw[:pos]
    candidates = [head]
    for ending in (b"\r\n", b"\n"):
        if head.endswith(ending):
            candidates.insert(0, head[: -len(ending)])
            break
    for cand in candidates:
        if hashlib.new(algo, cand).hexdigest().lower() == sig_hash.lower():
            return True
    raise _err(
        source,
        line,
        f"[SIGNATURE]: {sig_type} hash {sig_hash} does not match the file content "
        "(file modified or truncated; verify_signature=False reads it anyway)",
    )


def parse_text(raw: bytes, source: str, *, verify_signature: bool = True) -> ParsedFile:
    """Parse the bytes of a ``.seq`` file into tables.

    Parameters
    ----------
    raw : bytes
        File content.
    source : str
        Name used in error messages (the file path).
    verify_signature : bool
        Check the ``[SIGNATURE]`` hash when present (md5, sha1, sha256, ...).

    Returns
    -------
    ParsedFile

    Raises
    ------
    SequenceFileError
        Any syntax error, unknown section, missing ``[VERSION]``/``[BLOCKS]``, or a
        signature that does not match (message names the file and the line).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _err(source, line, "not a text file (invalid UTF-8)") from None
    if text.startswith("\x01pulseq\x02"):
        raise _err(source, 1, "binary Pulseq files are not supported")
    sections = _sections(source, text)
    if not sections:
        raise _err(source, None, "no Pulseq sections found (empty or not a .seq file)")

    version: tuple[int, int, int] | None = None
    definitions: dict[str, Any] = {}
    block_rows: list[tuple[int, str]] | None = None
    raw_rows: dict[str, tuple[int, list[tuple[int, str]]]] = {}
    ext_specs: dict[int, ExtensionSpec] = {}
    sig_type = sig_hash = None
    sig_line = 0
    for header, line, rows in sections:
        if header.startswith("extension"):
            _, name, tid = header.split()
            tid_v = _parse_value(tid)
            if not isinstance(tid_v, int) or tid_v <= 0:
                raise _err(source, line, f"extension {name}: type ID {tid!r} is not an integer > 0")
            if tid_v in ext_specs:
                raise _err(source, line, f"extension {name}: type ID {tid_v} defined twice")
            spec = ExtensionSpec(name, tid_v, line)
            for ln, t in rows:
                toks = t.split()
                eid = _parse_value(toks[0])
                if not isinstance(eid, int) or eid <= 0 or eid in spec.rows:
                    # judged only if the extension is one the reader interprets: unknown
                    # extensions are ignored whatever their format
                    spec.bad_rows.append((ln, f"ID {toks[0]!r} is not a new integer > 0"))
                    continue
                spec.rows[eid] = (ln, toks[1:])
            ext_specs[tid_v] = spec
            continue
        if header not in _KNOWN_SECTIONS:
            raise _err(source, line, f"unknown section {header}")
        if header in raw_rows or (header == "[BLOCKS]" and block_rows is not None):
            raise _err(source, line, f"section {header} appears twice")
        if header == "[VERSION]":
            vals = {}
            for ln, t in rows:
                parts = t.split()
                v = _parse_value(parts[1]) if len(parts) == 2 else None
                if parts[0] not in ("major", "minor", "revision") or not isinstance(v, int):
                    raise _err(source, ln, f"[VERSION]: malformed line {t!r}")
                vals[parts[0]] = v
            if "major" not in vals or "minor" not in vals:
                raise _err(source, line, "[VERSION] lacks 'major' or 'minor'")
            version = (vals["major"], vals["minor"], vals.get("revision", 0))
            if version[0] != 1 or version < (1, 2, 0):
                raise _err(
                    source, line, f"unsupported Pulseq version {'.'.join(map(str, version))} "
                    "(supported: 1.2.0 to 1.5.x)"
                )
            raw_rows[header] = (line, rows)
        elif header == "[DEFINITIONS]":
            definitions = _definitions(source, rows)
            raw_rows[header] = (line, rows)
        elif header == "[SIGNATURE]":
            d = _definitions(source, rows)
            sig_type = str(d.get("Type")) if "Type" in d else None
            sig_hash = str(d.get("Hash")) if "Hash" in d else None
            sig_line = line
            raw_rows[header] = (line, rows)
        elif header == "[BLOCKS]":
            if version is None:
                raise _err(source, line, "[BLOCKS] before [VERSION] (the version sets its format)")
            block_rows = rows
        else:
            raw_rows[header] = (line, rows)

    if version is None:
        raise _err(source, None, "no [VERSION] section")
    if block_rows is None or not block_rows:
        raise _err(source, None, "no [BLOCKS] section (a sequence must have at least one block)")
    vc = 1_000_000 * version[0] + 1000 * version[1] + version[2]

    def rows_of(name: str) -> list[tuple[int, str]]:
        return raw_rows.get(name, (0, []))[1]

    # blocks: <1.3 has no extension column (some 1.2.x writers add it; accept both)
    bt = _table(source, "[BLOCKS]", block_rows, (7, 8) if vc < 1_004_000 else (8,))
    blocks = np.zeros((bt.ids.size, 8), dtype=np.int64)
    blocks[:, 0] = bt.ids
    vals = bt.values
    if not np.all(vals == np.floor(vals)) or np.any(vals < 0):
        k = int(np.flatnonzero(np.any((vals != np.floor(vals)) | (vals < 0), axis=1))[0])
        raise _err(source, int(bt.lines[k]), "[BLOCKS]: fields must be integers >= 0")
    blocks[:, 1 : 1 + vals.shape[1]] = vals.astype(np.int64)

    if vc >= 1_005_000:
        rf = _table(source, "[RF]", rows_of("[RF]"), (12,), char_last=True)
        grads = _table(source, "[GRADIENTS]", rows_of("[GRADIENTS]"), (7,))
        adc = _table(source, "[ADC]", rows_of("[ADC]"), (9,))
    elif vc >= 1_004_000:
        # + 2 fields: the pTx shim magnitude and phase shape IDs of the modified Pulseq
        # (v1.4.5) that MRzero writes for parallel-transmit pulses.
        rf = _table(source, "[RF]", rows_of("[RF]"), (8, 10))
        grads = _table(source, "[GRADIENTS]", rows_of("[GRADIENTS]"), (5,))
        adc = _table(source, "[ADC]", rows_of("[ADC]"), (6,))
    else:
        rf = _table(source, "[RF]", rows_of("[RF]"), (7, 9))  # 9: pTx shims (v1.3.9)
        grads = _table(source, "[GRADIENTS]", rows_of("[GRADIENTS]"), (4,))
        adc = _table(source, "[ADC]", rows_of("[ADC]"), (6,))
    traps = _table(source, "[TRAP]", rows_of("[TRAP]"), (6,))
    if "[DELAYS]" in raw_rows and vc >= 1_004_000:
        raise _err(source, raw_rows["[DELAYS]"][0], "[DELAYS] is not allowed from version 1.4.0 on")
    delays = _table(source, "[DELAYS]", rows_of("[DELAYS]"), (2,))
    exts = _table(source, "[EXTENSIONS]", rows_of("[EXTENSIONS]"), (4,))
    shapes = _shapes(source, rows_of("[SHAPES]"))
    common = np.intersect1d(grads.ids, traps.ids)
    if common.size:
        k = int(np.flatnonzero(traps.ids == common[0])[0])
        raise _err(source, int(traps.lines[k]), f"gradient ID {common[0]} is used in both "
                   "[GRADIENTS] and [TRAP]")

    sig_ok = None
    if verify_signature:
        sig_ok = _check_signature(source, raw, sig_type, sig_hash, sig_line)
    return ParsedFile(
        source=source,
        version=version,
        definitions=definitions,
        blocks=blocks,
        block_lines=bt.lines,
        rf=rf,
        gradients=grads,
        traps=traps,
        adc=adc,
        delays=delays,
        extensions=exts,
        extension_specs=ext_specs,
        shapes=shapes,
        signature_type=sig_type,
        signature_hash=sig_hash,
        signature_ok=sig_ok,
    )


# --------------------------------------------------------------------------------------
# event libraries
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rasters:
    """Raster times of the file, in seconds."""

    grad_s: float
    rf_s: float
    adc_s: float
    block_s: float


@dataclass(frozen=True, eq=False)
class RFEvent:
    """An RF pulse as played (one library event, shared by all blocks that use it).

    Attributes
    ----------
    id : int
        Event ID in ``[RF]``.
    t_s : np.ndarray
        (n,) sample times relative to the block start, delay included; each sample lasts
        one RF raster (default timing) and is centred on its time.
    signal_hz : np.ndarray
        (n,) complex128 B1 in Hz (gamma-bar * B1), magnitude and phase shapes applied,
        without the frequency/phase offsets below.
    delay_s : float
        Start of the RF shape relative to the block start.
    center_s : float
        Time of the effective rotation relative to the block start (delay included).
    shape_duration_s : float
        Duration of the shape (the pulse occupies ``[delay_s, delay_s + shape_duration_s]``).
    freq_offset_hz, phase_offset_rad, freq_ppm, phase_ppm : float
        Offsets; the frequency offset's phase is referenced to the shape start
        (``t_s - delay_s``), ppm terms are weighted with the Larmor frequency in MHz.
    use : str
        ``excitation``, ``refocusing``, ``inversion``, ``saturation``, ``preparation``,
        ``other`` or ``undefined``. Files before v1.5 do not store it; it is inferred
        from the flip angle as MATLAB Pulseq and pypulseq do.
    shim : np.ndarray or None
        (n_tx,) complex weights of the transmit channels of a parallel-transmit pulse
        (the pTx rows of the modified Pulseq v1.3.9/v1.4.5 that MRzero writes), or None
        for an ordinary single-channel pulse.
    """

    id: int
    t_s: np.ndarray
    signal_hz: np.ndarray
    delay_s: float
    center_s: float
    shape_duration_s: float
    freq_offset_hz: float
    phase_offset_rad: float
    freq_ppm: float
    phase_ppm: float
    use: str
    shim: np.ndarray | None = None

    @property
    def end_s(self) -> float:
        """End of the pulse relative to the block start."""
        return self.delay_s + self.shape_duration_s

    def flip_angle_deg(self) -> float:
        """Nominal flip angle, ``360 * |sum(signal * dt)|`` in degrees."""
        edges = sample_edges(self.t_s - self.delay_s, self.shape_duration_s)
        dt = np.diff(edges)
        return float(abs(np.sum(self.signal_hz * dt)) * 360.0)


@dataclass(frozen=True, eq=False)
class ADCEvent:
    """An ADC readout (dwell in s; sample ``i`` at ``delay_s + (i + 0.5) * dwell_s``)."""

    id: int
    num_samples: int
    dwell_s: float
    delay_s: float
    freq_offset_hz: float
    phase_offset_rad: float
    freq_ppm: float = 0.0
    phase_ppm: float = 0.0
    phase_modulation_rad: np.ndarray | None = None  # (num_samples,) v1.5 phase shape

    @property
    def end_s(self) -> float:
        return self.delay_s + self.num_samples * self.dwell_s

    def sample_times_s(self) -> np.ndarray:
        """(num_samples,) sample times relative to the block start."""
        return self.delay_s + (np.arange(self.num_samples) + 0.5) * self.dwell_s


@dataclass(frozen=True, eq=False)
class GradientEvent:
    """A gradient on one channel as a piecewise-linear waveform.

    Attributes
    ----------
    id : int
        ID in ``[TRAP]`` or ``[GRADIENTS]``.
    kind : str
        ``"trap"`` or ``"arbitrary"``.
    t_s : np.ndarray
        (m,) breakpoint times relative to the block start (delay included).
    g_hz_per_m : np.ndarray
        (m,) values at the breakpoints, Hz/m.
    amplitude_hz_per_m : float
        Peak amplitude as stored.
    delay_s : float
    first_hz_per_m, last_hz_per_m : float
        Values at the start and at the end of the event.
    """

    id: int
    kind: str
    t_s: np.ndarray
    g_hz_per_m: np.ndarray
    amplitude_hz_per_m: float
    delay_s: float
    first_hz_per_m: float
    last_hz_per_m: float

    @property
    def end_s(self) -> float:
        return float(self.t_s[-1])

    @property
    def area_per_m(self) -> float:
        """Zeroth moment (1/m)."""
        g, t = self.g_hz_per_m, self.t_s
        return float(0.5 * np.sum(np.diff(t) * (g[1:] + g[:-1])))


def sample_edges(t_rel: np.ndarray, duration: float) -> np.ndarray:
    """Edges of the intervals each sample stands for (midpoints, then 0 and the end)."""
    if t_rel.size == 0:
        return np.zeros(1)
    mids = 0.5 * (t_rel[1:] + t_rel[:-1])
    return np.concatenate(([0.0], mids, [max(duration, float(t_rel[-1]))]))


def shape_of(parsed: ParsedFile, sid: int, what: str, line: int) -> np.ndarray:
    """Decompressed shape ``sid`` (cached on the parsed object)."""
    cache: dict[int, np.ndarray] = parsed.__dict__.setdefault("_shape_cache", {})
    if sid in cache:
        return cache[sid]
    if sid not in parsed.shapes:
        raise SequenceFileError(f"{parsed.source}, line {line}: {what} references shape {sid}, "
                                "which [SHAPES] does not define")
    num, data, sline = parsed.shapes[sid]
    try:
        out = decompress_shape(num, data, force_compressed=parsed.version < (1, 4, 0))
    except ValueError as exc:
        raise SequenceFileError(f"{parsed.source}, line {sline}: shape {sid}: {exc}") from None
    out.setflags(write=False)
    cache[sid] = out
    return out


def any_to_float(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def fail(parsed: ParsedFile, line: int | None, msg: str) -> SequenceFileError:
    where = f"{parsed.source}, line {line}" if line else parsed.source
    return SequenceFileError(f"{where}: {msg}")


def rasters_of(parsed: ParsedFile) -> Rasters:
    d = parsed.definitions
    keys = ("GradientRasterTime", "RadiofrequencyRasterTime", "AdcRasterTime",
            "BlockDurationRaster")
    vals = [any_to_float(d.get(k), dflt) for k, dflt in zip(keys, _DEFAULT_RASTERS,
                                                             strict=True)]
    for k, v in zip(keys, vals, strict=True):
        if not v > 0:
            raise fail(parsed, None, f"[DEFINITIONS] {k} = {v} must be > 0 s")
    return Rasters(*vals)


def _rf_center(t_rel: np.ndarray, signal: np.ndarray) -> float:
    """Peak of |signal| (middle of the plateau within 1e-5 of the maximum), shape time."""
    mag = np.abs(signal)
    if mag.size == 0 or mag.max() == 0:
        return float(t_rel[t_rel.size // 2]) if t_rel.size else 0.0
    peak = np.flatnonzero(mag >= mag.max() * 0.99999)
    return float(0.5 * (t_rel[peak[0]] + t_rel[peak[-1]]))


def build_rf(parsed: ParsedFile, r: Rasters) -> dict[int, RFEvent]:
    """RF events of ``[RF]`` by ID."""
    vc = parsed.version_combined
    tab = parsed.rf
    out: dict[int, RFEvent] = {}
    b0_t = any_to_float(parsed.definitions.get("B0"), 1.5)
    for k, rid in enumerate(tab.ids.tolist()):
        v = tab.values[k]
        line = int(tab.lines[k])
        if vc >= 1_005_000:
            amp, mag_id, ph_id, time_id, center_us, delay_us, fppm, pppm, freq, phase = v
            use = _RF_USES.get(tab.chars[k].lower())
            if use is None:
                raise fail(parsed, line, f"[RF] {rid}: unknown use {tab.chars[k]!r} "
                            f"(expected one of {''.join(_RF_USES)})")
        elif vc >= 1_004_000:
            amp, mag_id, ph_id, time_id, delay_us, freq, phase = v[:7]
            center_us, fppm, pppm, use = None, 0.0, 0.0, None
        else:
            amp, mag_id, ph_id, delay_us, freq, phase = v[:6]
            time_id, center_us, fppm, pppm, use = 0, None, 0.0, 0.0, None
        what = f"[RF] event {rid}"
        shim = _shim_weights(parsed, v, vc, what, line)
        mag = shape_of(parsed, int(mag_id), what, line)
        ph = shape_of(parsed, int(ph_id), what, line)
        if mag.size != ph.size:
            raise fail(parsed, line, f"{what}: magnitude shape {int(mag_id)} has {mag.size} "
                        f"samples but phase shape {int(ph_id)} has {ph.size}")
        signal = amp * mag * np.exp(2j * np.pi * ph)
        if int(time_id) > 0:
            t_rel = shape_of(parsed, int(time_id), what, line) * r.rf_s
            if t_rel.size != mag.size:
                raise fail(parsed, line, f"{what}: time shape {int(time_id)} has "
                            f"{t_rel.size} samples, magnitude has {mag.size}")
            if np.any(np.diff(t_rel) < 0):
                raise fail(parsed, line, f"{what}: time shape {int(time_id)} decreases")
            shape_dur = np.ceil(t_rel[-1] / r.rf_s - 1e-9) * r.rf_s
        else:
            t_rel = (np.arange(mag.size) + 0.5) * r.rf_s
            shape_dur = mag.size * r.rf_s
        delay = delay_us * 1e-6
        center = center_us * 1e-6 if center_us is not None else _rf_center(t_rel, signal)
        if use is None:  # files before v1.5: infer from the flip angle (as Pulseq does)
            edges = sample_edges(t_rel, shape_dur)
            flip = abs(np.sum(signal * np.diff(edges))) * 360.0
            ppm = 1e6 * freq / (b0_t * _GAMMA_HZ_PER_T)
            if flip < 90.01:
                use = "excitation"
            elif shape_dur > 6e-3 and -3.5 <= ppm <= -3.4:
                use = "saturation"
            else:
                use = "refocusing"
        t_s = t_rel + delay
        t_s.setflags(write=False)
        signal.setflags(write=False)
        out[rid] = RFEvent(rid, t_s, signal, delay, delay + center, float(shape_dur),
                           float(freq), float(phase), float(fppm), float(pppm), use, shim)
    return out


def _shim_weights(
    parsed: ParsedFile, v: np.ndarray, vc: int, what: str, line: int
) -> np.ndarray | None:
    """Transmit-channel weights of a pTx RF row (modified Pulseq v1.3.9/v1.4.5), or None.

    The two extra fields name a magnitude and a phase (rad) shape with one sample per
    transmit channel; channel ``c`` plays the pulse times ``mag[c] * exp(-1j * phase[c])``
    (the convention of MRzeroCore, which writes these files). Both IDs 0: no shim.
    """
    n_plain = 7 if vc >= 1_004_000 else 6
    if vc >= 1_005_000 or v.size <= n_plain:
        return None
    mag_id, ph_id = int(v[n_plain]), int(v[n_plain + 1])
    if mag_id == 0 and ph_id == 0:
        return None
    if mag_id == 0 or ph_id == 0:
        raise fail(parsed, line, f"{what}: pTx shim needs both a magnitude and a phase "
                   f"shape (got IDs {mag_id} and {ph_id})")
    mag = shape_of(parsed, mag_id, f"{what} (shim magnitude)", line)
    ph = shape_of(parsed, ph_id, f"{what} (shim phase)", line)
    if mag.size != ph.size:
        raise fail(parsed, line, f"{what}: shim magnitude shape {mag_id} has {mag.size} "
                   f"channels but shim phase shape {ph_id} has {ph.size}")
    w = (mag * np.exp(-1j * ph)).astype(np.complex128)
    w.setflags(write=False)
    return w


def build_adc(parsed: ParsedFile) -> dict[int, ADCEvent]:
    """ADC events of ``[ADC]`` by ID."""
    tab = parsed.adc
    out: dict[int, ADCEvent] = {}
    for k, aid in enumerate(tab.ids.tolist()):
        v = tab.values[k]
        line = int(tab.lines[k])
        if parsed.version_combined >= 1_005_000:
            num, dwell_ns, delay_us, fppm, pppm, freq, phase, ph_id = v
        else:
            num, dwell_ns, delay_us, freq, phase = v
            fppm = pppm = ph_id = 0.0
        if num < 0 or num != int(num) or dwell_ns <= 0:
            raise fail(parsed, line, f"[ADC] {aid}: num_samples {num} must be an integer "
                        f">= 0 and dwell {dwell_ns} ns > 0")
        mod = None
        if int(ph_id) > 0:
            mod = shape_of(parsed, int(ph_id), f"[ADC] event {aid}", line)
            if mod.size != int(num):
                raise fail(parsed, line, f"[ADC] {aid}: phase shape has {mod.size} samples, "
                            f"the ADC {int(num)}")
        out[aid] = ADCEvent(aid, int(num), dwell_ns * 1e-9, delay_us * 1e-6, float(freq),
                            float(phase), float(fppm), float(pppm), mod)
    return out


def build_traps(parsed: ParsedFile) -> dict[int, GradientEvent]:
    """Trapezoids of ``[TRAP]`` by ID."""
    out: dict[int, GradientEvent] = {}
    tab = parsed.traps
    for k, gid in enumerate(tab.ids.tolist()):
        amp, rise, flat, fall, delay = tab.values[k]
        if min(rise, flat, fall, delay) < 0:
            raise fail(parsed, int(tab.lines[k]), f"[TRAP] {gid}: negative time")
        t = delay * 1e-6 + np.cumsum([0.0, rise, flat, fall]) * 1e-6
        g = amp * np.array([0.0, 1.0, 1.0, 0.0])
        t.setflags(write=False)
        g.setflags(write=False)
        out[gid] = GradientEvent(gid, "trap", t, g, float(amp), delay * 1e-6, 0.0, 0.0)
    return out


def arbitrary_samples(
    parsed: ParsedFile, r: Rasters, k: int
) -> tuple[float, float | None, float | None, np.ndarray, np.ndarray, bool, float, float]:
    """(amp, first, last, t_rel, g, regular, delay, shape_dur) of [GRADIENTS] row k."""
    vc = parsed.version_combined
    gid = int(parsed.gradients.ids[k])
    line = int(parsed.gradients.lines[k])
    v = parsed.gradients.values[k]
    first = last = None
    if vc >= 1_005_000:
        amp, first, last, shape_id, time_id, delay_us = v
    elif vc >= 1_004_000:
        amp, shape_id, time_id, delay_us = v
    else:
        amp, shape_id, delay_us = v
        time_id = 0
    what = f"[GRADIENTS] event {gid}"
    w = amp * shape_of(parsed, int(shape_id), what, line)
    dt = r.grad_s
    regular = True
    if int(time_id) == 0:
        t_rel = (np.arange(w.size) + 0.5) * dt
        dur = w.size * dt
    elif int(time_id) == -1:  # oversampled by 2: samples at k * dt / 2, k = 1 .. 2N - 1
        if w.size % 2 == 0:
            raise fail(parsed, line, f"{what}: oversampled shape needs an odd sample count")
        t_rel = (np.arange(w.size) + 1) * 0.5 * dt
        dur = (w.size + 1) * 0.5 * dt
    else:
        t_rel = shape_of(parsed, int(time_id), what, line) * dt
        if t_rel.size != w.size:
            raise fail(parsed, line, f"{what}: time shape {int(time_id)} has {t_rel.size} "
                        f"samples, the amplitude shape {w.size}")
        if np.any(np.diff(t_rel) < 0):
            raise fail(parsed, line, f"{what}: time shape {int(time_id)} decreases")
        dur = float(t_rel[-1])
        # a time shape starting on a half raster is a sampled shape: add first/last points
        regular = abs(t_rel[0] / dt - 0.5) < 1e-6
    return (float(amp), first, last, t_rel, w, regular, delay_us * 1e-6, float(dur))


