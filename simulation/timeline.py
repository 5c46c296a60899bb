"""Compile a Pulseq sequence into the event-driven timeline the Bloch kernels execute.

The timeline is a flat program of three operations, independent of the spins:

``FREE p``
    Free precession and relaxation over an interval with duration ``free_dt_s[p]`` and
    zeroth gradient moment ``free_m[p]`` (1/m, i.e. the integral of G in Hz/m over time).
    Consecutive intervals without RF or ADC are merged into one: free precession composes
    exactly (phases add, relaxation factors multiply), and the gradient moment is computed
    exactly for piecewise-linear gradients, so no time stepping is needed between events.
    Identical intervals (e.g. the dwell steps of a Cartesian readout) share one ``p`` so
    the kernels compute each spin's rotation once per run.
``RF r``
    One RF pulse instance: shape ``rf_inst_shape[r]`` (a piecewise-constant complex B1 on
    its raster, with the frequency offset and the gradient moment of each raster step
    folded in) played with phase offset ``rf_inst_phase_rad[r]``. Both are the complex
    conjugate of the Pulseq RF (``signal * exp(i (phase + 2 pi freq t))``), because the
    kernels precess spins left-handed (``M_xy ~ exp(-i 2 pi (df + G.r) t)``): a pulse at
    ``freq = gamma G z0`` then excites ``z0``, as the Pulseq specification defines. The
    per-spin effect of a shape is an affine map of M that the engine computes once and
    reuses, rotating it by the phase offset (the Bloch equation commutes with rotations
    about z).
``SAMPLE k``
    Record M_xy for ADC sample ``k`` (order of ``seq.adc_records()``).
``RUN q``
    ``run_n[q]`` repetitions of (``FREE run_p[q]``, ``SAMPLE``) for the consecutive
    samples from ``run_k[q]``: a readout on a constant gradient (or any run of identical
    dwell intervals) as one operation, so the kernels loop over samples without decoding.
``SPOIL``
    Only with ``spoiling="ideal"``: set M_xy to zero (ideal spoiling), just before every
    pulse that starts a new pathway (see :func:`spoiled_pulses`).

Diffusion: when requested, each ``FREE`` operation also carries the b-matrix increment
``(2 pi)^2 int k(t) k(t)^T dt`` of its interval, where ``k`` is the dephasing moment of
the spin group since the last excitation (reset at excitation, negated at refocusing
pulses, both taken at the pulse centre). The engine attenuates M_xy by ``exp(-b : D)``.
This is the standard single-pathway (k-space) approximation: it is exact for spin-echo
and gradient-echo diffusion preparation (PGSE gives exp(-bD) exactly) and neglects the
different diffusion histories of stimulated and higher-order echo pathways and
diffusion during RF pulses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mrharmony.errors import SequenceFileError, SimulationError

__all__ = [
    "OP_FREE",
    "OP_RF",
    "OP_RUN",
    "OP_SAMPLE",
    "OP_SPOIL",
    "SPOILING",
    "RFShape",
    "Timeline",
    "check_spoiling",
    "compile_timeline",
    "spoiled_pulses",
]

OP_FREE = 0
OP_RF = 1
OP_SAMPLE = 2
OP_RUN = 3
OP_SPOIL = 4

#: Spoiling models: ``"none"`` (the gradients and RF phases as played, the isochromats
#: dephase what they dephase) and ``"ideal"`` (M_xy = 0 before every pulse that starts a
#: new pathway, as if the spoiler before it dephased a real voxel completely).
SPOILING = ("none", "ideal")

#: A sequence whose net gradient moment between consecutive excitations stays below this
#: on every axis (1/m, i.e. under one cycle per metre) is balanced: ideal spoiling would
#: remove its steady state, so it is refused.
BALANCED_MOMENT_PER_M = 1.0

_TIME_EPS_S = 1e-12


@dataclass(frozen=True, eq=False)
class RFShape:
    """A unique RF pulse shape as the spins see it (phase offset excluded).

    Attributes
    ----------
    b1_hz : ndarray (n,) complex128
        gamma*B1/(2 pi) per step in Hz, frequency-offset modulation included.
    dt_s : ndarray (n,) float64
        Step durations (consecutive identical raster samples merged).
    m : ndarray (n, 3) float64
        Gradient moment of each step in 1/m (physical LPS axes).
    """

    b1_hz: np.ndarray
    dt_s: np.ndarray
    m: np.ndarray

    @property
    def duration_s(self) -> float:
        """Total duration in seconds."""
        return float(self.dt_s.sum())


@dataclass(frozen=True, eq=False)
class Timeline:
    """Spin-independent program of a sequence (see module docstring).

    ``op_b`` is ``None`` unless compiled with ``diffusion=True``; otherwise (n_ops, 6)
    holding ``bxx, 2 bxy, 2 bxz, byy, 2 byz, bzz`` in s/m^2 for FREE operations, and
    ``sample_b`` (n_samples, 6) the same for the free interval before each sample of a RUN.
    ``sample_k`` (n_samples, 3) is the dephasing moment (1/m) of the primary
    coherence pathway there (reset at excitation, negated at refocusing pulses, both at
    the pulse centre: the k-space trajectory), ``sample_tau_s`` (n_samples,) the same for
    time (the phase an off-resonance ``df`` adds to that pathway is ``-2 pi df tau``:
    time since excitation for a gradient echo, ``t - TE`` after a refocusing pulse).
    """

    op: np.ndarray
    arg: np.ndarray
    free_dt_s: np.ndarray
    free_m: np.ndarray
    rf_shapes: list[RFShape]
    rf_inst_shape: np.ndarray
    rf_inst_phase_rad: np.ndarray
    sample_t_s: np.ndarray
    sample_demod_rad: np.ndarray
    op_b: np.ndarray | None = None
    run_p: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    run_n: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    run_k: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    sample_b: np.ndarray | None = None
    sample_k: np.ndarray | None = None
    sample_tau_s: np.ndarray | None = None
    duration_s: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        """Total number of ADC samples."""
        return int(self.sample_t_s.size)

    @property
    def n_ops(self) -> int:
        """Number of operations."""
        return int(self.op.size)


class _Moment:
    """Exact zeroth moment M(t) = int_0^t G dt of piecewise-linear gradients (per axis)."""

    def __init__(self, segments: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]):
        self.axes = []
        for t0, t1, g0, g1 in segments:
            order = np.argsort(t0, kind="stable")
            t0, t1, g0, g1 = t0[order], t1[order], g0[order], g1[order]
            length = t1 - t0
            area = 0.5 * (g0 + g1) * length
            slope = np.divide(g1 - g0, length, out=np.zeros_like(length), where=length > 0)
            cum_end = np.cumsum(area)
            self.axes.append((t0, length, g0, slope, cum_end - area))

    def __call__(self, t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        out = np.zeros((*t.shape, 3))
        for a, (t0, length, g0, slope, cum_start) in enumerate(self.axes):
            if t0.size == 0:
                continue
            j = np.searchsorted(t0, t, side="right") - 1
            valid = j >= 0
            jj = np.where(valid, j, 0)
            tau = np.clip(t - t0[jj], 0.0, length[jj])
            val = cum_start[jj] + g0[jj] * tau + 0.5 * slope[jj] * tau * tau
            out[..., a] = np.where(valid, val, 0.0)
        return out

    def breakpoints(self) -> np.ndarray:
        pts = [np.concatenate([t0, t0 + length]) for t0, length, *_ in self.axes]
        return np.unique(np.concatenate(pts)) if pts else np.zeros(0)


def _gradient_segments(
    seq: Any, scale: np.ndarray, delay_s: np.ndarray
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    per_axis: list[list[tuple[np.ndarray, ...]]] = [[], [], []]
    for block in seq.blocks:
        t, g = block.gradient_waveform()
        t = np.asarray(t, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64).reshape(t.size, 3) if t.size else np.zeros((0, 3))
        if t.size < 2:
            continue
        if np.any(np.diff(t) < -_TIME_EPS_S):
            raise SequenceFileError(
                f"block {_bid(block)}: gradient waveform times are not increasing"
            )
        for a in range(3):
            ga = g[:, a]
            if not np.any(ga):
                continue
            base = float(block.start_s) + delay_s[a]
            per_axis[a].append(
                (t[:-1] + base, t[1:] + base, ga[:-1] * scale[a], ga[1:] * scale[a])
            )
    out = []
    for a in range(3):
        if per_axis[a]:
            out.append(tuple(np.concatenate([p[i] for p in per_axis[a]]) for i in range(4)))
        else:
            empty = np.zeros(0)
            out.append((empty, empty, empty, empty))
    return out  # type: ignore[return-value]


def _rf_edges(rf: Any, raster_s: float) -> np.ndarray:
    """Edges (relative to the block start) of the interval each RF sample stands for.

    The shape occupies ``[delay_s, delay_s + shape_duration_s]``; inner edges are the
    midpoints between sample times (each sample lasts one raster for default timing).
    """
    t = np.asarray(rf.t_s, dtype=np.float64)
    start = float(getattr(rf, "delay_s", t[0] - raster_s / 2))
    duration = getattr(rf, "shape_duration_s", None)
    end = start + float(duration) if duration is not None else t[-1] + raster_s / 2
    mid = 0.5 * (t[1:] + t[:-1])
    return np.concatenate([[start], mid, [max(end, float(t[-1]))]])


def _bid(block: Any) -> int:
    return int(getattr(block, "id", block.index))


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
        h.update(b"|")
    return h.hexdigest()


def _merge_runs(b1: np.ndarray, dt: np.ndarray, m: np.ndarray) -> RFShape:
    """Merge consecutive steps with the same B1 and gradient (exact: constant field)."""
    rate = m / dt[:, None]
    same = np.ones(b1.size, dtype=bool)
    same[1:] = (b1[1:] == b1[:-1]) & np.all(np.abs(rate[1:] - rate[:-1]) <= 1e-9, axis=1)
    same[0] = False
    group = np.cumsum(~same) - 1
    n = int(group[-1]) + 1
    dt_g = np.bincount(group, weights=dt, minlength=n)
    m_g = np.stack([np.bincount(group, weights=m[:, a], minlength=n) for a in range(3)], axis=1)
    first = np.flatnonzero(~same)
    return RFShape(b1_hz=b1[first].copy(), dt_s=dt_g, m=m_g)


def _coarsen(shape: RFShape, max_step_s: float | None) -> RFShape:
    """Merge consecutive RF steps into steps of at most ``max_step_s`` (average B1).

    The merged step keeps the B1 integral and the gradient moment exactly; the rotation
    differs from the raster product by the commutator of neighbouring steps, which is
    second order in the step length (midpoint rule). Steps already longer than
    ``max_step_s`` (merged constant samples) are left alone.
    """
    if max_step_s is None or shape.dt_s.size < 2:
        return shape
    start = np.concatenate([[0.0], np.cumsum(shape.dt_s)[:-1]])
    group = np.floor(start / max_step_s + 1e-9).astype(np.int64)
    _, group = np.unique(group, return_inverse=True)
    group = group.reshape(-1)
    n = int(group.max()) + 1
    dt = np.bincount(group, weights=shape.dt_s, minlength=n)
    area = shape.b1_hz * shape.dt_s
    b1 = (np.bincount(group, weights=area.real, minlength=n)
          + 1j * np.bincount(group, weights=area.imag, minlength=n)) / dt
    m = np.stack([np.bincount(group, weights=shape.m[:, a], minlength=n) for a in range(3)], 1)
    return RFShape(b1_hz=b1, dt_s=dt, m=m)


def _ppm_hz(value: Any, larmor_hz: float | None, what: str) -> float:
    v = float(value or 0.0)
    if v == 0.0:
        return 0.0
    if larmor_hz is None:
        raise SimulationError(
            f"{what} uses a ppm offset but the Larmor frequency is unknown: pass larmor_hz "
            "or b0_t to simulate()"
        )
    return v * 1e-6 * larmor_hz


def _use_kind(rf: Any, shape: RFShape) -> str:
    use = str(getattr(rf, "use", "") or "").lower()
    if use.startswith("e"):
        return "excitation"
    if use.startswith("r"):
        return "refocusing"
    if use.startswith(("i", "s", "p")):
        return "excitation"  # inversion/saturation/preparation: a new pathway starts
    flip = 2 * np.pi * float(np.sum(np.abs(shape.b1_hz) * shape.dt_s))
    return "refocusing" if flip >= np.deg2rad(150) else "excitation"


def spoiled_pulses(rf_kind: list[str], rf_centre: np.ndarray,
                   sample_t: np.ndarray) -> np.ndarray:
    """The RF pulses that ideal spoiling zeroes M_xy before.

    Every excitation (and, with Pulseq 1.5 ``use`` fields, every inversion, saturation
    or preparation pulse; they compile to ``"excitation"``), and every refocusing-sized
    pulse (>= 150 deg, or ``use`` refocusing) that no ADC sample follows before the next
    excitation: an inversion (IR, MPRAGE) in a file without ``use`` fields. A refocusing
    pulse of an echo train is never spoiled before (its stimulated echoes are real
    signal, within the train).

    Parameters
    ----------
    rf_kind : list of str
        ``"excitation"`` or ``"refocusing"`` per RF instance (the timeline's pathway rule).
    rf_centre : ndarray (n_rf,)
        Pulse centres in seconds.
    sample_t : ndarray (n_samples,)
        ADC sample times in seconds.

    Returns
    -------
    ndarray (n_rf,) bool
    """
    kind = np.asarray(rf_kind)
    exc = kind == "excitation"
    out = exc.copy()
    ref = np.flatnonzero(~exc)
    if ref.size:
        exc_t = np.sort(rf_centre[exc])
        samples = np.sort(np.asarray(sample_t, dtype=np.float64))
        t = rf_centre[ref]
        nxt = np.searchsorted(exc_t, t, side="right")
        t_next = np.full(t.size, np.inf)
        has = nxt < exc_t.size
        t_next[has] = exc_t[nxt[has]]
        n_between = (np.searchsorted(samples, t_next, side="left")
                     - np.searchsorted(samples, t, side="right"))
        out[ref] = n_between == 0
    return out


def check_spoiling(spoiling: str) -> None:
    """Raise :class:`SimulationError` unless ``spoiling`` is one of :data:`SPOILING`."""
    if spoiling not in SPOILING:
        raise SimulationError(f"spoiling: expected one of {', '.join(SPOILING)}, "
                              f"got {spoiling!r}")


def _check_spoiled(moment: Any, rf_centre: np.ndarray, spoil: np.ndarray) -> None:
    """Refuse ideal spoiling for a balanced sequence (no net moment between excitations)."""
    t = np.sort(rf_centre[spoil])
    if t.size < 2:
        return
    net = np.abs(np.diff(moment(t), axis=0))
    if np.all(net < BALANCED_MOMENT_PER_M):
        raise SimulationError(
            "spoiling = 'ideal' on a balanced sequence (net gradient moment between "
            f"excitations below {BALANCED_MOMENT_PER_M:g} /m on every axis, e.g. bSSFP): "
            "its steady state lives on transverse magnetisation; simulate it with "
            "spoiling = 'none'")


def compile_timeline(
    seq: Any,
    *,
    gradient_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    gradient_delay_s: tuple[float, float, float] = (0.0, 0.0, 0.0),
    larmor_hz: float | None = None,
    diffusion: bool = False,
    rf_max_step_s: float | None = None,
    spoiling: str = "none",
) -> Timeline:
    """Compile a :class:`~mrharmony.formats.pulseq.PulseqSequence` into a Timeline.

    Parameters
    ----------
    seq : PulseqSequence
        The sequence (blocks with ``start_s``, ``rf``, ``adc``, ``gradient_waveform()``).
    gradient_scale : (3,) float
        Per-axis (x, y, z) amplitude scaling of the gradients (site imperfection, 1 = ideal).
    gradient_delay_s : (3,) float
        Per-axis delay of the gradient waveforms in seconds (site imperfection).
    larmor_hz : float, optional
        Larmor frequency in Hz, needed only for RF/ADC ppm offsets.
    diffusion : bool
        Also compute the b-matrix increments of the free intervals (``op_b``).
    rf_max_step_s : float, optional
        Merge RF raster samples into steps of at most this length (seconds) with their
        average B1 (second-order accurate). ``None`` (default) integrates every raster
        sample exactly as a piecewise-constant field.
    spoiling : {"none", "ideal"}
        ``"ideal"`` inserts a ``SPOIL`` operation (M_xy = 0) before every pulse
        :func:`spoiled_pulses` selects: coherences never cross from one shot to the
        next, as in a real voxel whose spoilers dephase them, whatever the isochromat
        count. It also removes the effect of the spoiler moments and of RF spoiling
        (site differences of native protocols) along with the isochromat artefacts.

    Returns
    -------
    Timeline

    Raises
    ------
    SimulationError
        If an ADC sample falls inside an RF pulse or the sequence has no ADC, a ppm
        offset is used without a Larmor frequency, ``spoiling`` is unknown, or ideal
        spoiling is asked of a balanced sequence.
    """
    check_spoiling(spoiling)
    scale = np.asarray(gradient_scale, dtype=np.float64).reshape(3)
    gdelay = np.asarray(gradient_delay_s, dtype=np.float64).reshape(3)
    moment = _Moment(_gradient_segments(seq, scale, gdelay))
    rf_raster = float(getattr(seq.raster, "rf_s", 1e-6))

    # --- RF pulses -------------------------------------------------------------------
    rf_blocks = [b for b in seq.blocks if b.rf is not None]
    rf_start = np.zeros(len(rf_blocks))
    rf_end = np.zeros(len(rf_blocks))
    rf_centre = np.zeros(len(rf_blocks))
    inst_shape = np.zeros(len(rf_blocks), dtype=np.int32)
    inst_phase = np.zeros(len(rf_blocks))
    shapes: list[RFShape] = []
    shape_kind: list[str] = []
    keys: dict[str, int] = {}
    # Fast path: with no gradient delays, a block's RF shape as the spins see it depends
    # only on its RF event, frequency offset and the block's own gradient waveform.
    quick: dict[tuple[Any, ...], tuple[str, Any, float]] = {}
    for i, block in enumerate(rf_blocks):
        rf = block.rf
        edges_rel = _rf_edges(rf, rf_raster)
        t_rel = np.asarray(rf.t_s, dtype=np.float64)
        freq = float(rf.freq_offset_hz or 0.0) + _ppm_hz(
            getattr(rf, "freq_ppm", 0.0), larmor_hz, f"block {_bid(block)} RF freq_ppm"
        )
        phase = float(rf.phase_offset_rad or 0.0) + _ppm_hz(
            getattr(rf, "phase_ppm", 0.0), larmor_hz, f"block {_bid(block)} RF phase_ppm"
        )
        shim_w = _single_channel_shim(block)
        qkey = None
        if not np.any(gdelay):
            t_g, g_g = block.gradient_waveform()
            # RFEvent.id names the library event; the entry keeps a reference to rf.
            rf_key = ("id", rf.id) if hasattr(rf, "id") else ("obj", id(rf))
            qkey = (rf_key, freq, shim_w, _digest(np.asarray(t_g), np.asarray(g_g)))
        if qkey is not None and qkey in quick:
            key, _, centre_rel = quick[qkey]
        else:
            sig = np.asarray(rf.signal_hz, dtype=np.complex128) * shim_w
            edges = edges_rel + float(block.start_s)
            # Pulseq phases are right-handed (RF phase phi + 2 pi f t, f = gamma G z
            # selects +z); the kernels precess spins left-handed (M_xy ~ exp(-i 2 pi
            # gamma G z t)), so the RF enters conjugated: exp(-i (phi + 2 pi f t)).
            b1 = np.conj(sig) * np.exp(-2j * np.pi * freq * (t_rel - edges_rel[0]))
            m = np.diff(moment(edges), axis=0)
            dt = np.diff(edges)
            b1 = np.round(b1.real, 9) + 1j * np.round(b1.imag, 9)
            m = np.round(m, 9)
            dt = np.round(dt, 13)
            key = _digest(b1, dt, m)
            if key not in keys:
                keys[key] = len(shapes)
                shape = _coarsen(_merge_runs(b1, dt, m), rf_max_step_s)
                shapes.append(shape)
                shape_kind.append(_use_kind(rf, shape))
            centre_rel = float(t_rel[int(np.argmax(np.abs(sig)))])
            if qkey is not None:
                quick[qkey] = (key, rf, centre_rel)
        inst_shape[i] = keys[key]
        inst_phase[i] = -phase  # conjugated, as the shape (see above)
        rf_start[i] = edges_rel[0] + float(block.start_s)
        rf_end[i] = edges_rel[-1] + float(block.start_s)
        rf_centre[i] = centre_rel + float(block.start_s)

    # --- ADC samples -----------------------------------------------------------------
    t_parts, demod_parts = [], []
    for block in seq.blocks:
        adc = block.adc
        if adc is None:
            continue
        n = int(adc.num_samples)
        t_rel = float(adc.delay_s) + (np.arange(n) + 0.5) * float(adc.dwell_s)
        freq = float(adc.freq_offset_hz or 0.0) + _ppm_hz(
            getattr(adc, "freq_ppm", 0.0), larmor_hz, f"block {_bid(block)} ADC freq_ppm"
        )
        phase = float(adc.phase_offset_rad or 0.0) + _ppm_hz(
            getattr(adc, "phase_ppm", 0.0), larmor_hz, f"block {_bid(block)} ADC phase_ppm"
        )
        t_parts.append(t_rel + float(block.start_s))
        demod = phase + 2 * np.pi * freq * (t_rel - float(adc.delay_s))
        modulation = getattr(adc, "phase_modulation_rad", None)
        if modulation is not None:
            demod = demod + np.asarray(modulation, dtype=np.float64)
        demod_parts.append(demod)
    if not t_parts:
        raise SimulationError("sequence has no ADC events: nothing to simulate")
    sample_t = np.concatenate(t_parts)
    demod = np.concatenate(demod_parts)
    n_samples = sample_t.size

    # --- anchors: RF pulses (intervals) and ADC samples (instants), in time order ---
    a_start = np.concatenate([rf_start, sample_t])
    a_end = np.concatenate([rf_end, sample_t])
    a_kind = np.concatenate(
        [np.full(len(rf_blocks), OP_RF, np.int8), np.full(n_samples, OP_SAMPLE, np.int8)]
    )
    a_arg = np.concatenate(
        [np.arange(len(rf_blocks), dtype=np.int32), np.arange(n_samples, dtype=np.int32)]
    )
    order = np.lexsort((-a_kind, a_start))  # samples before an RF starting at the same time
    a_start, a_end, a_kind, a_arg = a_start[order], a_end[order], a_kind[order], a_arg[order]
    prev_end = np.concatenate([[0.0], a_end[:-1]])
    overlap = a_start < prev_end - 1e-9
    if np.any(overlap):
        i = int(np.argmax(overlap))
        raise SimulationError(
            f"event at t = {a_start[i] * 1e3:.6f} ms starts before the RF pulse ending at "
            f"{prev_end[i] * 1e3:.6f} ms (ADC sampling during RF is not supported)"
        )
    gap_dt = np.maximum(a_start - prev_end, 0.0)
    gap_m = moment(a_start) - moment(prev_end)
    has_gap = (gap_dt > _TIME_EPS_S) | np.any(gap_m != 0.0, axis=1)

    rows = np.column_stack([np.round(gap_dt, 13), np.round(gap_m, 7)])[has_gap]
    if rows.size:
        uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
    else:
        uniq, inverse = np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
    n_anchor = a_start.size
    op = np.empty(2 * n_anchor, dtype=np.int8)
    arg = np.empty(2 * n_anchor, dtype=np.int32)
    op[0::2] = OP_FREE
    op[1::2] = a_kind
    free_arg = np.zeros(n_anchor, dtype=np.int32)
    free_arg[has_gap] = inverse.reshape(-1)
    arg[0::2] = free_arg
    arg[1::2] = a_arg
    keep = np.ones(2 * n_anchor, dtype=bool)
    keep[0::2] = has_gap
    # Nothing after the last ADC sample matters.
    last = int(np.flatnonzero(op[keep] == OP_SAMPLE)[-1]) + 1
    op, arg = op[keep][:last], arg[keep][:last]

    op_b = None
    if diffusion:
        op_b = _diffusion_b(
            moment, keep, a_start, prev_end, has_gap, rf_centre,
            [shape_kind[s] for s in inst_shape], last,
        )
    rf_kind = [shape_kind[s] for s in inst_shape]
    n_spoil = 0
    if spoiling == "ideal":
        spoil = spoiled_pulses(rf_kind, rf_centre, sample_t)
        _check_spoiled(moment, rf_centre, spoil)
        at = np.flatnonzero((op == OP_RF) & spoil[np.where(op == OP_RF, arg, 0)])
        n_spoil = int(at.size)
        op = np.insert(op, at, OP_SPOIL)
        arg = np.insert(arg, at, 0)
        if op_b is not None:
            op_b = np.insert(op_b, at, 0.0, axis=0)
    op, arg, op_b, runs, sample_b = _fuse_runs(op, arg, op_b, n_samples)
    # The pathway's dephasing moment and time in one pass: time is a fourth "moment".
    def moment_and_time(t: np.ndarray) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return np.concatenate([moment(t), t[..., None]], axis=-1)

    centres, offsets = _pathway_offsets(moment_and_time, rf_centre, rf_kind)
    path = moment_and_time(sample_t) + offsets[np.searchsorted(centres, sample_t, side="right")]
    sample_k, sample_tau = path[:, :3], path[:, 3]
    return Timeline(
        op=op,
        arg=arg,
        run_p=runs[0],
        run_n=runs[1],
        run_k=runs[2],
        sample_b=sample_b,
        sample_k=sample_k,
        sample_tau_s=sample_tau,
        free_dt_s=uniq[:, 0].copy(),
        free_m=uniq[:, 1:4].copy(),
        rf_shapes=shapes,
        rf_inst_shape=inst_shape,
        rf_inst_phase_rad=inst_phase,
        sample_t_s=sample_t,
        sample_demod_rad=demod,
        op_b=op_b,
        duration_s=float(getattr(seq, "duration_s", a_end[-1])),
        info={"n_rf": len(rf_blocks), "n_rf_shapes": len(shapes), "spoiling": spoiling,
              "n_spoil": n_spoil},
    )


def _fuse_runs(
    op: np.ndarray, arg: np.ndarray, op_b: np.ndarray | None, n_samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[np.ndarray, ...], np.ndarray | None]:
    """Replace runs of (FREE p, SAMPLE k), (FREE p, SAMPLE k+1), ... by RUN operations."""
    n = op.size
    pair = np.zeros(n, dtype=bool)
    pair[:-1] = (op[:-1] == OP_FREE) & (op[1:] == OP_SAMPLE)
    starts = np.flatnonzero(pair)
    empty = np.zeros(0, dtype=np.int32)
    if starts.size == 0:
        return op, arg, op_b, (empty, empty, empty), None
    p = arg[starts]
    k = arg[starts + 1]
    cont = np.zeros(starts.size, dtype=bool)
    cont[1:] = (starts[1:] == starts[:-1] + 2) & (p[1:] == p[:-1]) & (k[1:] == k[:-1] + 1)
    group = np.cumsum(~cont) - 1
    size = np.bincount(group)
    first = np.flatnonzero(~cont)
    fuse = size[group] >= 2
    keep = np.ones(n, dtype=bool)
    keep[starts[fuse]] = False
    keep[starts[fuse] + 1] = False
    lead = starts[first][size >= 2]
    keep[lead] = True  # the first FREE of each run becomes the RUN op
    new_op = op.copy()
    new_arg = arg.copy()
    new_op[lead] = OP_RUN
    new_arg[lead] = np.arange(lead.size, dtype=np.int32)
    runs = (
        p[first][size >= 2].astype(np.int32),
        size[size >= 2].astype(np.int32),
        k[first][size >= 2].astype(np.int32),
    )
    sample_b = None
    if op_b is not None:
        sample_b = np.zeros((n_samples, 6))
        sample_b[k[fuse]] = op_b[starts[fuse]]
        op_b = op_b[keep]
    return new_op[keep], new_arg[keep], op_b, runs, sample_b


def _single_channel_shim(block: Any) -> complex:
    """Weight of the one transmit channel a shimmed pulse drives (1 without a shim).

    Shims come from the Pulseq v1.5 ``RF_SHIMS`` extension of the block (channel ``c``
    plays ``mag[c] * exp(1j * phase[c])`` times the pulse) or from the pTx RF rows of the
    modified Pulseq that MRzero writes (:attr:`RFEvent.shim`). The virtual sites model
    one transmit field (the body coil's B1+ map): a pulse that drives several channels
    needs a B1+ map per channel, which they do not have, and is refused.
    """
    rf = block.rf
    weights = getattr(rf, "shim", None)
    ext = getattr(block, "rf_shim", None)
    if ext is not None:
        ext_w = np.asarray(ext.magnitudes) * np.exp(1j * np.asarray(ext.phases_rad))
        if weights is not None and np.asarray(weights).size != ext_w.size:
            raise SimulationError(
                f"block {_bid(block)}: the RF row shims {np.asarray(weights).size} channels "
                f"but the RF_SHIMS extension {ext_w.size}"
            )
        weights = ext_w if weights is None else weights * ext_w
    if weights is None:
        return 1.0
    if np.asarray(weights).size != 1:
        raise SimulationError(
            f"block {_bid(block)}: RF event {getattr(rf, 'id', '?')} is a parallel-transmit "
            f"pulse on {np.asarray(weights).size} channels; the virtual sites have one "
            "transmit channel (no per-channel B1+ maps), so it cannot be simulated here"
        )
    return complex(np.asarray(weights).ravel()[0])


def _pathway_offsets(
    moment: Any, rf_centre: np.ndarray, rf_kind: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted RF centres and offsets ``o`` with k(t) = M(t) + o[j + 1] after centre j.

    ``moment(t)`` gives (..., d) values (the gradient moment; time itself may be one
    more column, for the pathway's dephasing time). ``o[0]`` applies before the first
    pulse (moment counted from t = 0). An excitation resets the dephasing moment of the
    primary pathway to zero, a refocusing pulse negates it, both at the pulse centre.
    """
    order = np.argsort(rf_centre, kind="stable")
    centres = rf_centre[order]
    m_c = moment(centres)
    offsets = np.zeros((centres.size, m_c.shape[-1]))
    prev = np.zeros(m_c.shape[-1])
    for j, idx in enumerate(order):
        prev = -2.0 * m_c[j] - prev if rf_kind[idx] == "refocusing" else -m_c[j]
        offsets[j] = prev
    return centres, np.concatenate([-moment(np.zeros(1))[:1], offsets])


def _diffusion_b(
    moment: _Moment,
    keep: np.ndarray,
    a_start: np.ndarray,
    prev_end: np.ndarray,
    has_gap: np.ndarray,
    rf_centre: np.ndarray,
    rf_kind: list[str],
    last: int,
) -> np.ndarray:
    """b-matrix increments (2 pi)^2 int k k^T dt of the FREE operations (see module doc)."""
    centres, offsets = _pathway_offsets(moment, rf_centre, rf_kind)
    pts = np.unique(np.concatenate([moment.breakpoints(), a_start, prev_end, centres]))
    h = np.diff(pts)
    mid = 0.5 * (pts[1:] + pts[:-1])
    seg = np.searchsorted(centres, mid, side="right") - 1
    off = offsets[seg + 1]
    x = np.sqrt(3.0 / 5.0)
    acc = np.zeros((h.size, 6))
    comps = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
    for node, w in ((-x, 5.0 / 9.0), (0.0, 8.0 / 9.0), (x, 5.0 / 9.0)):
        k = moment(mid + 0.5 * h * node) + off
        for c, (i, j) in enumerate(comps):
            acc[:, c] += w * 0.5 * h * k[:, i] * k[:, j]
    acc *= (2 * np.pi) ** 2
    acc[:, [1, 2, 4]] *= 2.0  # b : D = sum_ii b_ii D_ii + 2 sum_i<j b_ij D_ij
    cum = np.concatenate([np.zeros((1, 6)), np.cumsum(acc, axis=0)])
    b_gap = cum[np.searchsorted(pts, a_start)] - cum[np.searchsorted(pts, prev_end)]
    n_anchor = a_start.size
    full = np.zeros((2 * n_anchor, 6))
    full[0::2] = b_gap
    full[0::2][~has_gap] = 0.0
    return full[keep][:last].astype(np.float64)
