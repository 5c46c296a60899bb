"""Pulseq sequence reader: the model the Bloch engine and the raw-data writer execute.

:func:`read_pulseq` reads any ``.seq`` file the specification allows (versions 1.2.0 to
1.5.x, from MATLAB Pulseq, pypulseq, JEMRIS, KomaMRI and others) into a
:class:`PulseqSequence`: blocks with their RF, gradient and ADC events, labels,
triggers, soft delays, rotations and RF shims. Unknown extensions are ignored, as the
specification asks, unless the file lists them in ``RequiredExtensions``.

Conventions (Pulseq, see ``doc/specification.tex`` of pulseq/pulseq):

- Gradients are in Hz/m (gamma-bar * G), RF amplitudes in Hz (gamma-bar * B1).
- Shaped samples sit at raster centres: sample ``i`` of a default-timed shape is at
  ``delay + (i + 0.5) * raster``; an ADC sample ``i`` at ``delay + (i + 0.5) * dwell``.
- Arbitrary gradients on the default raster are piecewise linear through their first
  value at the start, the samples at the raster centres and their last value at the end.
  Files before v1.5.0 do not store first/last; they are restored as pypulseq and MATLAB
  Pulseq do (first = last value of the gradient that ended at the block start on that
  channel, last = linear extrapolation of the final two samples).
- The ROTATIONS extension (v1.5.1) rotates the block's gradients:
  ``g_physical = R(q) @ g_file`` with the standard unit-quaternion matrix.
- Gradient axes x, y, z are the physical scanner (patient LPS) axes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mrharmony.errors import SequenceFileError
from mrharmony.formats.pulseq_parse import (
    ADCEvent,
    GradientEvent,
    ParsedFile,
    Rasters,
    RFEvent,
    arbitrary_samples,
    build_adc,
    build_rf,
    build_traps,
    fail,
    parse_text,
    rasters_of,
)

__all__ = ["ADCEvent", "ADCRecord", "Block", "GradientEvent", "PulseqSequence", "RFEvent",
           "RFShim", "Rasters", "SoftDelay", "Trigger", "quaternion_to_matrix",
           "read_pulseq"]  # fmt: skip

#: Counters and flags of the LABELSET/LABELINC extensions (spec v1.5), initialised to 0.
SUPPORTED_LABELS = (
    "SLC", "SEG", "REP", "AVG", "SET", "ECO", "PHS", "LIN", "PAR", "ACQ",
    "NAV", "REV", "SMS", "REF", "IMA", "OFF", "NOISE", "PMC", "NOROT", "NOPOS", "NOSCL",
    "NOSLC", "ONCE", "TRID",
)  # fmt: skip
_KNOWN_EXTENSIONS = ("LABELSET", "LABELINC", "TRIGGERS", "DELAYS", "ROTATIONS", "RF_SHIMS")


@dataclass(frozen=True)
class Trigger:
    """TRIGGERS extension: type (1 output, 2 input), channel, delay and duration (s)."""

    type: int
    channel: int
    delay_s: float
    duration_s: float


@dataclass(frozen=True)
class SoftDelay:
    """DELAYS extension: duration = value / factor + offset_s for the UI parameter ``hint``.

    The block keeps the duration written in the file (the default value,
    ``default_value``), as an interpreter does when the user changes nothing.
    """

    num: int
    offset_s: float
    factor: float
    hint: str
    default_value: float


@dataclass(frozen=True, eq=False)
class RFShim:
    """RF_SHIMS extension: per transmit channel magnitude and phase (rad)."""

    magnitudes: np.ndarray
    phases_rad: np.ndarray


@dataclass(frozen=True, eq=False)
class ADCRecord:
    """One ADC of the sequence in playing order (what a raw-data writer needs)."""

    block_index: int  # Block.index: 1-based position, seq.blocks[block_index - 1]
    block_id: int  # ID in [BLOCKS]
    t_start_s: float  # absolute time of sample 0 (block start + delay + dwell / 2)
    num_samples: int
    dwell_s: float
    labels: dict[str, int]
    rotation: np.ndarray | None
    freq_offset_hz: float
    phase_offset_rad: float
    freq_ppm: float
    phase_ppm: float
    sample_offset: int  # index of sample 0 in the concatenation of all ADC samples


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrix of a quaternion ``(w, x, y, z)`` (normalised first).

    Parameters
    ----------
    q : array_like
        (4,) quaternion, real part first, as in the ROTATIONS extension.

    Returns
    -------
    np.ndarray
        (3, 3) float64 matrix R with ``g_physical = R @ g_file``.
    """
    q = np.asarray(q, dtype=np.float64)
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm < 1e-9:
        raise SequenceFileError(f"rotation quaternion {q.tolist()} has zero or invalid norm")
    w, x, y, z = q / norm
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


class Block:
    """One block of the sequence (a light view into :class:`PulseqSequence`).

    Attributes
    ----------
    index : int
        1-based position in the file, i.e. playing order (``seq.blocks[index - 1]``).
    id : int
        Block ID in ``[BLOCKS]``.
    start_s, duration_s : float
        Absolute start time and duration.
    rf : RFEvent or None
    adc : ADCEvent or None
    gx, gy, gz : GradientEvent or None
        Gradients as written in the file (before the block's rotation).
    rotation : np.ndarray or None
        (3, 3) rotation of the ROTATIONS extension (already applied by
        :meth:`gradient_waveform`).
    """

    __slots__ = ("_i", "_seq")

    def __init__(self, seq: PulseqSequence, index: int) -> None:
        self._seq = seq
        self._i = index

    def __repr__(self) -> str:
        parts = [f"Block(index={self.index}, id={self.id}, duration_s={self.duration_s:.6g}"]
        for name in ("rf", "gx", "gy", "gz", "adc"):
            ev = getattr(self, name)
            if ev is not None:
                parts.append(f"{name}={ev.id}")
        return ", ".join(parts) + ")"

    @property
    def index(self) -> int:
        """1-based position in the file (``seq.blocks[index - 1]``)."""
        return self._i + 1

    @property
    def id(self) -> int:
        return int(self._seq._block_ids[self._i])

    @property
    def start_s(self) -> float:
        return float(self._seq._block_starts[self._i])

    @property
    def duration_s(self) -> float:
        return float(self._seq._block_durations[self._i])

    @property
    def rf(self) -> RFEvent | None:
        return self._seq._rf.get(int(self._seq._events[self._i, 0]))

    @property
    def adc(self) -> ADCEvent | None:
        return self._seq._adc.get(int(self._seq._events[self._i, 4]))

    def _grad(self, axis: int) -> GradientEvent | None:
        return self._seq._grads.get(int(self._seq._events[self._i, 1 + axis]))

    @property
    def gx(self) -> GradientEvent | None:
        return self._grad(0)

    @property
    def gy(self) -> GradientEvent | None:
        return self._grad(1)

    @property
    def gz(self) -> GradientEvent | None:
        return self._grad(2)

    @property
    def rotation(self) -> np.ndarray | None:
        rid = int(self._seq._rotation_ids[self._i])
        return self._seq._rotations[rid].copy() if rid else None

    @property
    def labels_after(self) -> dict[str, int]:
        """Label counters and flags after this block's LABELSET/LABELINC."""
        return self._seq._labels_at(self._i)

    @property
    def triggers(self) -> tuple[Trigger, ...]:
        return self._seq._triggers.get(self._i, ())

    @property
    def soft_delay(self) -> SoftDelay | None:
        return self._seq._soft_delays.get(self._i)

    @property
    def rf_shim(self) -> RFShim | None:
        return self._seq._rf_shims.get(self._i)

    def gradient_waveform(self) -> tuple[np.ndarray, np.ndarray]:
        """Piecewise-linear gradient of the block on the physical axes.

        Returns
        -------
        t_s : np.ndarray
            (K,) increasing breakpoint times relative to the block start, from 0 to the
            block duration.
        g_hz_per_m : np.ndarray
            (K, 3) float64 gradient in Hz/m on x, y, z after the block's rotation; zero
            where no gradient plays. Linear between breakpoints.
        """
        t, g = self._seq._combo_waveform(self._i)
        return t.copy(), g.copy()


class PulseqSequence:
    """A Pulseq sequence read from a file; create it with :func:`read_pulseq`.

    Attributes
    ----------
    source : str
        File path (or ``"<text>"``).
    version : tuple of int
        (major, minor, revision) of the file format.
    definitions : dict
        ``[DEFINITIONS]``: numbers parsed (int, float or float64 array), strings kept.
    raster : Rasters
    blocks : list of Block
    duration_s : float
    signature_ok : bool or None
        True when the ``[SIGNATURE]`` hash was verified, None when there is none.
    """

    def __init__(self, parsed: ParsedFile) -> None:
        self.source = parsed.source
        self.version = parsed.version
        self.definitions = parsed.definitions
        self.signature_ok = parsed.signature_ok
        _build(self, parsed)
        self.blocks = [Block(self, i) for i in range(self._block_ids.size)]
        self._combo_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._concat: tuple[np.ndarray, np.ndarray] | None = None

    # -- set by _build ----------------------------------------------------------------
    raster: Rasters
    duration_s: float
    _block_ids: np.ndarray
    _block_starts: np.ndarray
    _block_durations: np.ndarray
    _events: np.ndarray  # (n, 5): rf, gx, gy, gz, adc IDs (0 = none)
    _rotation_ids: np.ndarray
    _rotations: dict[int, np.ndarray]
    _rf: dict[int, RFEvent]
    _adc: dict[int, ADCEvent]
    _grads: dict[int, GradientEvent]
    _triggers: dict[int, tuple[Trigger, ...]]
    _soft_delays: dict[int, SoftDelay]
    _rf_shims: dict[int, RFShim]
    _label_names: tuple[str, ...]
    _label_change_blocks: np.ndarray  # (m,) block indices where labels change
    _label_states: np.ndarray  # (m + 1, n_labels) int64; row 0 = initial zeros

    def __repr__(self) -> str:
        v = ".".join(map(str, self.version))
        return (
            f"PulseqSequence({self.source!r}, v{v}, {len(self.blocks)} blocks, "
            f"{self.duration_s:.6g} s, {self.num_adc_samples} ADC samples)"
        )

    def __len__(self) -> int:
        return len(self.blocks)

    # -- vectorised views (read-only) for the engine -----------------------------------
    @property
    def block_starts_s(self) -> np.ndarray:
        """(n_blocks,) absolute block start times (s)."""
        v = self._block_starts.view()
        v.setflags(write=False)
        return v

    @property
    def block_durations_s(self) -> np.ndarray:
        """(n_blocks,) block durations (s)."""
        v = self._block_durations.view()
        v.setflags(write=False)
        return v

    def event_ids(self) -> np.ndarray:
        """(n_blocks, 5) int64 event IDs per block: rf, gx, gy, gz, adc (0 = none)."""
        return self._events.copy()

    @property
    def rf_library(self) -> dict[int, RFEvent]:
        """RF events by ID (blocks share them)."""
        return dict(self._rf)

    @property
    def adc_library(self) -> dict[int, ADCEvent]:
        """ADC events by ID."""
        return dict(self._adc)

    @property
    def gradient_library(self) -> dict[int, GradientEvent]:
        """Gradient events by ID, as written (before rotations)."""
        return dict(self._grads)

    # -- labels ------------------------------------------------------------------------
    def _labels_at(self, index: int) -> dict[str, int]:
        row = int(np.searchsorted(self._label_change_blocks, index, side="right"))
        state = self._label_states[row]
        return {name: int(v) for name, v in zip(self._label_names, state, strict=True)}

    @property
    def used_labels(self) -> tuple[str, ...]:
        """Labels the file sets to a non-zero value somewhere (LABELSET/LABELINC)."""
        if self._label_states.size == 0:
            return ()
        used = np.any(self._label_states != 0, axis=0)
        return tuple(n for n, u in zip(self._label_names, used, strict=True) if u)

    def labels_table(self) -> tuple[tuple[str, ...], np.ndarray]:
        """Label counters and flags after every block, vectorised.

        Returns
        -------
        names : tuple of str
        values : np.ndarray
            (n_blocks, n_labels) int64 state after each block's LABELSET/LABELINC.
        """
        rows = np.searchsorted(self._label_change_blocks, np.arange(len(self.blocks)), "right")
        return self._label_names, self._label_states[rows]

    # -- waveforms ---------------------------------------------------------------------
    def _combo_waveform(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        ev = self._events[index]
        key = (int(ev[1]), int(ev[2]), int(ev[3]), int(self._rotation_ids[index]),
               float(self._block_durations[index]))
        hit = self._combo_cache.get(key)
        if hit is not None:
            return hit
        duration = float(self._block_durations[index])
        events = [self._grads.get(k) for k in key[:3]]
        times = [np.array([0.0, duration])]
        times.extend(e.t_s for e in events if e is not None)
        t = np.unique(np.concatenate(times))
        g = np.zeros((t.size, 3))
        for axis, e in enumerate(events):
            if e is not None:
                g[:, axis] = np.interp(t, e.t_s, e.g_hz_per_m, left=0.0, right=0.0)
        if key[3]:
            g = g @ self._rotations[key[3]].T
        t.setflags(write=False)
        g.setflags(write=False)
        self._combo_cache[key] = (t, g)
        return t, g

    def gradient_waveforms_concat(self) -> tuple[np.ndarray, np.ndarray]:
        """Gradient waveform of the whole sequence, physical axes, piecewise linear.

        Returns
        -------
        t_s : np.ndarray
            (K,) non-decreasing absolute times (s). Each block contributes its breakpoints
            from its start to its end, so a block boundary appears twice (a zero-length
            segment); values at a repeated time may differ only where a gradient jumps.
        g_hz_per_m : np.ndarray
            (K, 3) float64 gradient in Hz/m on x, y, z (rotations applied).

        Both arrays are computed once and returned read-only.
        """
        if self._concat is not None:
            return self._concat
        n = len(self.blocks)
        pieces_t = []
        pieces_g = []
        # blocks sharing gradients, rotation and duration share one waveform: gather them
        keys = np.column_stack(
            [self._events[:, 1:4], self._rotation_ids, self._block_durations]
        )  # float64 holds the integer IDs exactly
        uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        first_block = np.zeros(uniq.shape[0], np.int64)
        first_block[inverse[::-1]] = np.arange(n)[::-1]
        for b in first_block.tolist():
            t, g = self._combo_waveform(b)
            pieces_t.append(t)
            pieces_g.append(g)
        lengths = np.array([p.size for p in pieces_t], np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        cat_t = np.concatenate(pieces_t)
        cat_g = np.concatenate(pieces_g, axis=0)
        blk_len = lengths[inverse]
        total = int(blk_len.sum())
        # ragged gather: for every block, the indices offsets[u] .. offsets[u] + len - 1
        starts_out = np.concatenate(([0], np.cumsum(blk_len)[:-1]))
        idx = np.arange(total) - np.repeat(starts_out - offsets[inverse], blk_len)
        t_abs = cat_t[idx] + np.repeat(self._block_starts, blk_len)
        g_abs = cat_g[idx]
        t_abs.setflags(write=False)
        g_abs.setflags(write=False)
        self._concat = (t_abs, g_abs)
        return self._concat

    # -- ADC ---------------------------------------------------------------------------
    @property
    def num_adc_samples(self) -> int:
        """Total number of ADC samples of the sequence."""
        ids = self._events[:, 4]
        counts = {k: a.num_samples for k, a in self._adc.items()}
        return int(sum(counts[int(i)] for i in ids[ids > 0]))

    def adc_records(self) -> list[ADCRecord]:
        """All ADC events in playing order, with absolute timing and label state.

        Returns
        -------
        list of ADCRecord
            ``labels`` is the state after the block's LABELSET and LABELINC (the spec
            applies them before the ADC captures the counters).
        """
        out = []
        offset = 0
        names = self._label_names
        rows = np.searchsorted(self._label_change_blocks, np.flatnonzero(self._events[:, 4]),
                               "right")
        for k, b in enumerate(np.flatnonzero(self._events[:, 4]).tolist()):
            adc = self._adc[int(self._events[b, 4])]
            rid = int(self._rotation_ids[b])
            state = self._label_states[rows[k]]
            out.append(
                ADCRecord(
                    block_index=b + 1,
                    block_id=int(self._block_ids[b]),
                    t_start_s=float(self._block_starts[b] + adc.delay_s + 0.5 * adc.dwell_s),
                    num_samples=adc.num_samples,
                    dwell_s=adc.dwell_s,
                    labels={nm: int(v) for nm, v in zip(names, state, strict=True)},
                    rotation=self._rotations[rid].copy() if rid else None,
                    freq_offset_hz=adc.freq_offset_hz,
                    phase_offset_rad=adc.phase_offset_rad,
                    freq_ppm=adc.freq_ppm,
                    phase_ppm=adc.phase_ppm,
                    sample_offset=offset,
                )
            )
            offset += adc.num_samples
        return out

    def adc_sample_times(self) -> np.ndarray:
        """(total_samples,) absolute times of all ADC samples, in playing order (s)."""
        blocks = np.flatnonzero(self._events[:, 4])
        if blocks.size == 0:
            return np.zeros(0)
        adcs = [self._adc[int(i)] for i in self._events[blocks, 4]]
        n = np.array([a.num_samples for a in adcs], np.int64)
        dwell = np.array([a.dwell_s for a in adcs])
        t0 = self._block_starts[blocks] + np.array([a.delay_s for a in adcs]) + 0.5 * dwell
        starts = np.concatenate(([0], np.cumsum(n)[:-1]))
        i = np.arange(int(n.sum())) - np.repeat(starts, n)
        return np.repeat(t0, n) + i * np.repeat(dwell, n)

    def rf_times(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """RF pulses in playing order.

        Returns
        -------
        t_center_s : np.ndarray
            (n_rf,) absolute times of the pulse centres (s).
        block_positions : np.ndarray
            (n_rf,) 0-based positions in ``seq.blocks``.
        uses : list of str
            ``RFEvent.use`` of each pulse.
        """
        blocks = np.flatnonzero(self._events[:, 0])
        rfs = [self._rf[int(i)] for i in self._events[blocks, 0]]
        t = self._block_starts[blocks] + np.array([r.center_s for r in rfs])
        return t, blocks, [r.use for r in rfs]

    def kspace_at_adc(self) -> np.ndarray:
        """k-space position (1/m) at every ADC sample, physical axes.

        The gradient waveform is integrated analytically (it is piecewise linear). k is
        set to zero at the centre of every excitation pulse (use ``excitation`` or
        ``undefined``, as pypulseq does) and negated at the centre of every refocusing
        pulse; other pulses (inversion, saturation, ...) leave it unchanged.

        Returns
        -------
        np.ndarray
            (total_samples, 3) float64, in the order of :meth:`adc_records`.
        """
        t_adc = self.adc_sample_times()
        if t_adc.size == 0:
            return np.zeros((0, 3))
        t, g = self.gradient_waveforms_concat()
        # cumulative moment at the breakpoints (zero-length segments add nothing), and the
        # slope of every segment: the moment is quadratic within a segment
        dt = np.diff(t)
        dg = np.diff(g, axis=0)
        m_bp = np.concatenate((np.zeros((1, 3)), np.cumsum(dt[:, None] * (g[:-1] + 0.5 * dg),
                                                            axis=0)))
        half_slope = np.zeros_like(dg)
        np.divide(0.5 * dg, dt[:, None], out=half_slope, where=dt[:, None] > 0)

        def moment(tq: np.ndarray) -> np.ndarray:
            i = np.clip(np.searchsorted(t, tq, side="right") - 1, 0, t.size - 2)
            h = (tq - t[i])[:, None]
            return m_bp[i] + h * (g[i] + half_slope[i] * h)

        m_adc = moment(t_adc)
        t_rf, _, uses = self.rf_times()
        exc = np.array([u in ("excitation", "undefined") for u in uses], dtype=bool)
        ref = np.array([u == "refocusing" for u in uses], dtype=bool)
        keep = exc | ref
        t_ev = t_rf[keep]
        is_exc = exc[keep]
        m_ev = moment(t_ev) if t_ev.size else np.zeros((0, 3))
        # k(t) = m(t) + d(period); d changes at excitation (d = -m) and refocusing
        # (d = -2 m - d). A loop over RF events (not samples) builds d per period.
        d = np.zeros((t_ev.size + 1, 3))
        cur = np.zeros(3)  # before any excitation: k = m - m(0) = m
        d[0] = cur
        for j in range(t_ev.size):
            cur = -m_ev[j] if is_exc[j] else -2.0 * m_ev[j] - cur
            d[j + 1] = cur
        period = np.searchsorted(t_ev, t_adc, side="right")
        return m_adc + d[period]

    def waveform_at(self, t_abs_s: np.ndarray) -> np.ndarray:
        """Gradient at absolute times.

        Parameters
        ----------
        t_abs_s : np.ndarray
            (n,) absolute times (s).

        Returns
        -------
        np.ndarray
            (n, 3) gradient in Hz/m on x, y, z (rotations applied); the value just after
            the time where the waveform jumps.
        """
        t, g = self.gradient_waveforms_concat()
        tq = np.asarray(t_abs_s, dtype=np.float64)
        i = np.clip(np.searchsorted(t, tq, side="right") - 1, 0, t.size - 2)
        seg = t[i + 1] - t[i]
        w = np.divide(tq - t[i], seg, out=np.zeros_like(tq), where=seg > 0)
        return g[i] + w[:, None] * (g[i + 1] - g[i])


def read_pulseq(
    path_or_text: str | os.PathLike[str] | bytes, *, verify_signature: bool = True
) -> PulseqSequence:
    """Read a Pulseq ``.seq`` file (versions 1.2.0 to 1.5.x).

    Parameters
    ----------
    path_or_text : str, PathLike or bytes
        Path of the file, or the file content itself (``str`` containing a newline or
        ``bytes``).
    verify_signature : bool
        Verify the ``[SIGNATURE]`` hash when the file has one (a mismatch is an error).

    Returns
    -------
    PulseqSequence

    Raises
    ------
    SequenceFileError
        Unreadable file, syntax error, bad signature, an event ID a block references but
        no section defines, an unknown required extension, or an event longer than its
        block. The message names the file and the line.
    FileNotFoundError
        The path does not exist (also a :class:`SequenceFileError`).
    """
    if isinstance(path_or_text, bytes):
        raw, source = path_or_text, "<text>"
    elif isinstance(path_or_text, str) and "\n" in path_or_text:
        raw, source = path_or_text.encode("utf-8"), "<text>"
    else:
        p = Path(path_or_text)
        if not p.is_file():
            raise _MissingSeqFile(f"{p}: no such .seq file")
        raw, source = p.read_bytes(), str(p)
    parsed = parse_text(raw, source, verify_signature=verify_signature)
    return PulseqSequence(parsed)


class _MissingSeqFile(SequenceFileError, FileNotFoundError):
    """A .seq path that does not exist."""


# ----------------------------------------------------------------------------------------
# building the model from the parsed tables
# ----------------------------------------------------------------------------------------
def _block_durations(seq: PulseqSequence, parsed: ParsedFile, arb: dict[int, tuple]) -> np.ndarray:
    """Durations: stored (v1.4+) or the longest event incl. [DELAYS] (v1.2/1.3)."""
    blocks = parsed.blocks
    if parsed.version_combined >= 1_004_000:
        return blocks[:, 1] * seq.raster.block_s
    ends = np.zeros((blocks.shape[0], 6))
    lookup_rf = {k: e.end_s for k, e in seq._rf.items()}
    lookup_adc = {k: e.end_s for k, e in seq._adc.items()}
    lookup_g = {k: e.end_s for k, e in seq._grads.items()}
    lookup_g.update({k: a[6] + a[7] for k, a in arb.items()})
    dl = {int(i): float(v[0]) * 1e-6 for i, v in zip(parsed.delays.ids, parsed.delays.values,
                                                     strict=True)}
    for col, table in ((2, lookup_rf), (3, lookup_g), (4, lookup_g), (5, lookup_g),
                       (6, lookup_adc), (1, dl)):
        ids = blocks[:, col]
        nz = np.flatnonzero(ids)
        if col == 1:
            missing = [int(b) for b in nz if int(ids[b]) not in table]
            if missing:
                raise fail(parsed, int(parsed.block_lines[missing[0]]),
                            f"block references delay {int(ids[missing[0]])}, which [DELAYS] "
                            "does not define")
        ends[nz, col - 1] = [table[int(i)] for i in ids[nz]]
    return ends.max(axis=1)


def _check_references(parsed: ParsedFile, seq: PulseqSequence, arb: dict) -> None:
    names = {2: ("RF", seq._rf), 6: ("ADC", seq._adc)}
    grads = set(seq._grads) | set(arb)
    for col in (2, 3, 4, 5, 6):
        ids = parsed.blocks[:, col]
        known = np.array(sorted(grads if col in (3, 4, 5) else names[col][1]), np.int64)
        bad = np.flatnonzero((ids != 0) & ~np.isin(ids, known))
        if bad.size:
            b = int(bad[0])
            kind = "gradient" if col in (3, 4, 5) else names[col][0]
            raise fail(parsed, int(parsed.block_lines[b]),
                        f"block {int(parsed.blocks[b, 0])} references {kind} event "
                        f"{int(ids[b])}, which the file does not define")


def _build_gradients(seq: PulseqSequence, parsed: ParsedFile) -> None:
    grads = build_traps(parsed)
    arb = {int(g): arbitrary_samples(parsed, seq.raster, k)
           for k, g in enumerate(parsed.gradients.ids.tolist())}
    seq._grads = grads
    _check_references(parsed, seq, arb)
    durations = _block_durations(seq, parsed, arb)
    seq._block_durations = durations
    # v1.5 stores first/last; older files: restore them from the block context
    need = {g for g, a in arb.items() if a[1] is None}
    first_of: dict[int, float] = {}
    last_of: dict[int, float] = {}
    for g, a in arb.items():
        amp, first, last, t_rel, w, regular, delay, dur = a
        if a[2] is None:
            if not regular:
                last_of[g] = float(w[-1])
            else:
                last_of[g] = float(1.5 * w[-1] - 0.5 * w[-2]) if w.size > 1 else float(w[-1])
    if need:
        # the first use of each gradient (blocks in order, then x, y, z, as Pulseq reads)
        ev = parsed.blocks[:, 3:6]
        flat = ev.reshape(-1)
        ids, pos = np.unique(flat, return_index=True)
        for g, p in zip(ids.tolist(), pos.tolist(), strict=True):
            if g not in need:
                continue
            b, axis = divmod(p, 3)
            first = 0.0
            prev = int(ev[b - 1, axis]) if b > 0 else 0
            if arb[g][6] == 0 and prev in arb:  # no delay: continues the previous block
                pa = arb[prev]
                if pa[6] + pa[7] + 1e-12 >= durations[b - 1]:  # which ended at its end
                    first = last_of.get(prev, pa[2] if pa[2] is not None else 0.0)
            first_of[g] = first
    for g, a in arb.items():
        amp, first, last, t_rel, w, regular, delay, dur = a
        if first is None:
            first = first_of.get(g, 0.0) if regular else float(w[0])
            last = last_of[g]
        if regular:
            t = np.concatenate(([0.0], t_rel, [dur])) + delay
            gv = np.concatenate(([first], w, [last]))
        else:
            t = t_rel + delay
            gv = np.asarray(w, dtype=np.float64).copy()
        t.setflags(write=False)
        gv.setflags(write=False)
        grads[g] = GradientEvent(g, "arbitrary", t, gv, amp, delay, float(first), float(last))


def _ext_chains(parsed: ParsedFile) -> dict[int, list[tuple[int, int, int]]]:
    """Extension list ID -> [(type, ref, line)] following the ``next`` links."""
    tab = parsed.extensions
    row = tab.index()
    values = tab.values.tolist()
    lines = tab.lines.tolist()
    known: dict[int, list[tuple[int, int, int]]] = {0: []}  # entry -> chain from it
    chains: dict[int, list[tuple[int, int, int]]] = {}
    for head in np.unique(parsed.blocks[:, 7]).tolist():
        if head == 0:
            continue
        path: list[int] = []
        cur = head
        while cur not in known:  # walk until a list tail that is already resolved
            if cur not in row:
                b = int(np.flatnonzero(parsed.blocks[:, 7] == head)[0])
                line = int(parsed.block_lines[b]) if cur == head else None
                raise fail(parsed, line, f"extension list entry {cur} (from block "
                           f"{int(parsed.blocks[b, 0])}) is not in [EXTENSIONS]")
            if cur in path:
                raise fail(parsed, lines[row[cur]], f"extension list {head} loops")
            path.append(cur)
            cur = int(values[row[cur]][2])
        tail = known[cur]
        for entry in reversed(path):
            typ, ref, _ = values[row[entry]]
            tail = [(int(typ), int(ref), lines[row[entry]]), *tail]
            known[entry] = tail
        chains[head] = known[head]
    return chains


def _spec_value(parsed: ParsedFile, spec, ref: int, line: int) -> tuple[int, list[str]]:
    if ref not in spec.rows:
        raise fail(parsed, line, f"extension {spec.name} object {ref} is not defined "
                    f"(extension {spec.name} {spec.type_id} at line {spec.line})")
    return spec.rows[ref]


def _num(parsed: ParsedFile, tok: str, line: int, what: str) -> float:
    try:
        return float(tok)
    except ValueError:
        raise fail(parsed, line, f"{what}: {tok!r} is not a number") from None


def _head_actions(parsed: ParsedFile, chain: list[tuple[int, int, int]], names: list[str]
                  ) -> dict[str, Any]:
    """Interpret one extension list (shared by every block that references it)."""
    specs = parsed.extension_specs
    act: dict[str, Any] = {"labels": [], "triggers": [], "delay": None, "rot": None,
                           "shim": None}
    for typ, ref, line in chain:
        spec = specs.get(typ)
        if spec is None or spec.name not in _KNOWN_EXTENSIONS:
            continue  # unknown extensions are ignored (specification)
        ln, toks = _spec_value(parsed, spec, ref, line)
        what = f"extension {spec.name} object {ref}"
        if spec.name in ("LABELSET", "LABELINC"):
            if len(toks) != 2:
                raise fail(parsed, ln, f"{what}: expected '<value> <label>'")
            if toks[1] not in names:  # a label newer than this reader: keep it
                names.append(toks[1])
            val = int(_num(parsed, toks[0], ln, what))
            act["labels"].append((names.index(toks[1]), spec.name == "LABELSET", val))
        elif spec.name == "TRIGGERS":
            if len(toks) != 4:
                raise fail(parsed, ln, f"{what}: expected 'type channel delay duration'")
            t = [_num(parsed, x, ln, what) for x in toks]
            act["triggers"].append(Trigger(int(t[0]), int(t[1]), t[2] * 1e-6, t[3] * 1e-6))
        elif spec.name == "DELAYS":
            if len(toks) != 4:
                raise fail(parsed, ln, f"{what}: expected 'num offset factor hint'")
            num, off, fac = (_num(parsed, x, ln, what) for x in toks[:3])
            act["delay"] = (int(num), off * 1e-6, fac, toks[3])
        elif spec.name == "ROTATIONS":
            if act["rot"] is not None:
                raise fail(parsed, line, "only one ROTATIONS object is allowed per block")
            vals = np.array([_num(parsed, x, ln, what) for x in toks])
            if vals.size not in (4, 9):
                raise fail(parsed, ln, f"{what}: expected a quaternion (4 numbers)")
            mat = quaternion_to_matrix(vals) if vals.size == 4 else vals.reshape(3, 3)
            if not np.allclose(mat @ mat.T, np.eye(3), atol=1e-4):
                raise fail(parsed, ln, f"{what}: not a rotation")
            act["rot"] = (ref, mat)
        elif spec.name == "RF_SHIMS":
            vals = np.array([_num(parsed, x, ln, what) for x in toks])
            if vals.size == 0 or vals.size != 2 * int(vals[0]) + 1:
                raise fail(parsed, ln, f"{what}: expected num_chan, then magnitude/phase pairs")
            act["shim"] = RFShim(vals[1::2].copy(), vals[2::2].copy())
    # the specification applies all LABELSETs before all LABELINCs
    act["labels"].sort(key=lambda op: not op[1])
    return act


def _label_states(ops: list[tuple[int, int, bool, int]], n_labels: int, n_changes: int
                  ) -> np.ndarray:
    """States after each label-changing block, vectorised per label.

    ``ops`` = (change index, label, is_set, value) in playing order. Within one label the
    state after op i is ``v_set + sum(increments since that set)``.
    """
    states = np.zeros((n_changes + 1, n_labels), np.int64)
    if not ops:
        return states
    arr = np.array([(c, lab, int(st), v) for c, lab, st, v in ops], np.int64)
    for lab in np.unique(arr[:, 1]).tolist():
        sel = arr[arr[:, 1] == lab]
        is_set = sel[:, 2].astype(bool)
        val = sel[:, 3]
        csum = np.cumsum(np.where(is_set, 0, val))
        last_set = np.maximum.accumulate(np.where(is_set, np.arange(sel.shape[0]), -1))
        base = np.where(last_set >= 0, val[last_set] - csum[np.maximum(last_set, 0)], 0)
        after = base + csum
        # state after change c = after the last op of this label at or before c
        k = np.searchsorted(sel[:, 0], np.arange(n_changes), side="right") - 1
        states[1:, lab] = np.where(k >= 0, after[np.maximum(k, 0)], 0)
    return states


def _build_extensions(seq: PulseqSequence, parsed: ParsedFile) -> None:
    specs = parsed.extension_specs
    for spec in specs.values():
        if spec.name in _KNOWN_EXTENSIONS and spec.bad_rows:
            line, problem = spec.bad_rows[0]
            raise fail(parsed, line, f"extension {spec.name}: {problem}")
    required = parsed.definitions.get("RequiredExtensions", "")
    required = str(required).split() if required else []
    present = {s.name for s in specs.values()}
    for name in required:
        if name not in _KNOWN_EXTENSIONS:
            raise fail(parsed, None, f"RequiredExtensions lists {name}, which this reader "
                       f"does not support (supported: {', '.join(_KNOWN_EXTENSIONS)})")
        if name not in present:
            raise fail(parsed, None, f"RequiredExtensions lists {name} but the file has no "
                       f"'extension {name}' section")
    names = list(SUPPORTED_LABELS)
    seq._triggers, seq._soft_delays, seq._rf_shims, seq._rotations = {}, {}, {}, {}
    n = parsed.blocks.shape[0]
    seq._rotation_ids = np.zeros(n, np.int64)
    actions = {h: _head_actions(parsed, c, names) for h, c in _ext_chains(parsed).items()}
    heads = parsed.blocks[:, 7]
    change_blocks: list[int] = []
    ops: list[tuple[int, int, bool, int]] = []
    for b in np.flatnonzero(heads).tolist():
        act = actions[int(heads[b])]
        if act["labels"]:
            c = len(change_blocks)
            change_blocks.append(b)
            ops.extend((c, lab, st, v) for lab, st, v in act["labels"])
        if act["triggers"]:
            seq._triggers[b] = tuple(act["triggers"])
        if act["delay"] is not None:
            num, off, fac, hint = act["delay"]
            default = (float(seq._block_durations[b]) - off) * fac
            seq._soft_delays[b] = SoftDelay(num, off, fac, hint, default)
        if act["rot"] is not None:
            ref, mat = act["rot"]
            seq._rotations[ref] = mat
            seq._rotation_ids[b] = ref
        if act["shim"] is not None:
            seq._rf_shims[b] = act["shim"]
    seq._label_names = tuple(names)
    seq._label_change_blocks = np.asarray(change_blocks, np.int64)
    seq._label_states = _label_states(ops, len(names), len(change_blocks))


def _check_event_fit(seq: PulseqSequence, parsed: ParsedFile) -> None:
    """No event may last longer than its block (the spec requires an error)."""
    dur = seq._block_durations
    tol = 1e-9 + 1e-9 * dur
    for col, lib, kind in ((0, seq._rf, "RF"), (1, seq._grads, "gradient x"),
                           (2, seq._grads, "gradient y"), (3, seq._grads, "gradient z"),
                           (4, seq._adc, "ADC")):
        ids = seq._events[:, col]
        uniq = np.unique(ids[ids > 0])
        if uniq.size == 0:
            continue
        ends = np.array([lib[int(i)].end_s for i in uniq])
        e = ends[np.searchsorted(uniq, ids).clip(0, uniq.size - 1)]
        bad = np.flatnonzero((ids > 0) & (e > dur + tol))
        if bad.size:
            b = int(bad[0])
            raise fail(parsed, int(parsed.block_lines[b]),
                        f"block {int(seq._block_ids[b])}: {kind} event {int(ids[b])} ends at "
                        f"{e[b] * 1e6:.3f} us, after the block duration {dur[b] * 1e6:.3f} us")


def _build(seq: PulseqSequence, parsed: ParsedFile) -> None:
    seq.raster = rasters_of(parsed)
    seq._rf = build_rf(parsed, seq.raster)
    seq._adc = build_adc(parsed)
    _build_gradients(seq, parsed)  # also checks references and sets block durations
    seq._block_ids = parsed.blocks[:, 0].copy()
    seq._events = parsed.blocks[:, 2:7].copy()
    _check_event_fit(seq, parsed)
    seq._block_starts = np.concatenate(([0.0], np.cumsum(seq._block_durations)[:-1]))
    seq.duration_s = float(np.sum(seq._block_durations))
    _build_extensions(seq, parsed)
