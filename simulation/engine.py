"""Isochromat Bloch simulation of a Pulseq sequence: :func:`simulate`.

Pipeline: the sequence is compiled once into a spin-independent event timeline
(:mod:`~mrharmony.simulation.timeline`); the spins are processed in chunks (bounded
memory); for each chunk, every unique RF shape is integrated once per *spin class* (spins
that see the same fields during the pulse: same off-resonance, B1 scale, relaxation and
position projected onto the gradient directions used during the pulse) into an affine
map ``M -> A M + c``, and the timeline is executed by the kernels of
:mod:`~mrharmony.simulation.kernels` with analytic free precession between events.

Signal model: ``s_c(t_k) = exp(+i phi_k) * sum_s coil_sens[c, voxel(s)] * pd_s * Mxy_s(t_k)``
with ``phi_k`` the ADC phase (phase offset + frequency offset since the ADC start), i.e.
the receiver demodulates at the ADC's frequency/phase offset like a scanner. Spins precess
left-handed (``Mxy ~ exp(-i 2 pi (df + k.r))``, so ``s = sum m exp(-i 2 pi k.r)``); RF
and ADC phases of the Pulseq file, which are right-handed, enter conjugated (RF
``conj(signal) exp(-i (phase + 2 pi freq t))``, receiver ``exp(+i phi)``), so that an RF
or ADC frequency offset ``f = gamma G x0`` selects / centres position ``x0`` as the
Pulseq specification defines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numba
import numpy as np
import scipy.sparse

from mrharmony.backend import get_xp, to_numpy
from mrharmony.errors import SimulationError
from mrharmony.simulation.kernels import (
    LANES,
    RUN_B_TOL,
    rf_affine_numba,
    rf_affine_xp,
    run_ops_numba,
    run_ops_xp,
)
from mrharmony.simulation.spins import GAMMA_BAR_HZ_PER_T, SpinSystem
from mrharmony.simulation.timeline import OP_RUN, OP_SAMPLE, Timeline, compile_timeline

__all__ = ["run_timeline", "simulate", "spin_classes", "timeline_for"]

#: From this many coils on, the numba path stores M_xy and applies the coil weights with
#: one BLAS matrix product per time chunk (cheaper than per-coil sums in the kernel).
BUFFER_MIN_COILS = 4

#: Default RF integration step (s): raster samples merged into steps of at most this.
RF_MAX_STEP_S = 10e-6

#: Default number of isochromats per chunk (about 200 bytes each plus 4 bytes per RF shape).
DEFAULT_CHUNK = 1 << 18


def _larmor(
    seq: Any, spins: SpinSystem, b0_t: float | None, larmor_hz: float | None
) -> float | None:
    if larmor_hz is not None:
        return float(larmor_hz)
    if b0_t is not None:
        return float(b0_t) * GAMMA_BAR_HZ_PER_T
    b0_def = getattr(seq, "definitions", {}).get("B0")
    if isinstance(b0_def, (int, float)) and b0_def > 0:
        return float(b0_def) * GAMMA_BAR_HZ_PER_T
    if spins.field_t:
        return float(spins.field_t) * GAMMA_BAR_HZ_PER_T
    return None


def spin_classes(shape_m: np.ndarray, spins: SpinSystem) -> tuple[np.ndarray, np.ndarray]:
    """Group spins that experience identical fields during an RF shape.

    Parameters
    ----------
    shape_m : ndarray (n, 3)
        Gradient moments of the shape's steps (1/m).
    spins : SpinSystem
        The spins of the chunk.

    Returns
    -------
    representative : ndarray (n_classes,) int64
        Index of one spin per class.
    inverse : ndarray (N,) int64
        Class of every spin.

    Notes
    -----
    Positions enter only through their projection onto the span of the gradient moments,
    so a 2-D slice under a slice-select gradient, or any object under a non-selective
    pulse, collapses to the distinct (df, B1, R1, R2) combinations. Keys are rounded
    (1e-6 Hz, 1e-9 relative B1, 1e-9 m), far below any effect on the result.
    """
    _, sv, vt = np.linalg.svd(shape_m, full_matrices=False) if shape_m.size else (None, [], [])
    rank = int(np.sum(np.asarray(sv) > 1e-12 * max(float(np.max(sv, initial=0.0)), 1e-300)))
    cols = [
        np.round(spins.df_hz, 6),
        np.round(spins.b1_scale, 9),
        spins.r1_per_s,
        spins.r2_per_s,
    ]
    if rank:
        proj = spins.position_m @ np.asarray(vt)[:rank].T
        cols.extend(np.round(proj, 9).T)
    keys = np.column_stack(cols)
    _, rep, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return rep, inverse.reshape(-1)


def _rf_tables(
    tl: Timeline, spins: SpinSystem, *, use_numba: bool, xp: Any
) -> tuple[Any, Any]:
    """Affine table (n_total_classes, 12) and class index (n_shapes, N) for a chunk."""
    affs, idx = [], np.zeros((max(len(tl.rf_shapes), 1), spins.n_spins), dtype=np.int32)
    offset = 0
    for k, shape in enumerate(tl.rf_shapes):
        rep, inverse = spin_classes(shape.m, spins)
        args = (
            spins.df_hz[rep],
            spins.position_m[rep],
            spins.b1_scale[rep],
            spins.r1_per_s[rep],
            spins.r2_per_s[rep],
        )
        if use_numba:
            aff = rf_affine_numba(shape.b1_hz, shape.dt_s, shape.m, args[0],
                                  np.ascontiguousarray(args[1]), *args[2:])
        else:
            aff = rf_affine_xp(xp, shape.b1_hz, shape.dt_s, shape.m,
                               *(xp.asarray(a) for a in args))
        affs.append(aff)
        idx[k] = inverse + offset
        offset += rep.size
    if not affs:
        aff_all = np.zeros((1, 12)) if use_numba else xp.zeros((1, 12))
    else:
        aff_all = np.concatenate(affs) if use_numba else xp.concatenate(affs)
    return aff_all, (idx if use_numba else xp.asarray(idx))


def _pad_lanes(spins: SpinSystem) -> SpinSystem:
    """Append zero-PD spins (at the first spin's place) up to a multiple of LANES."""
    extra = (-spins.n_spins) % LANES
    if extra == 0:
        return spins
    idx = np.concatenate([np.arange(spins.n_spins), np.zeros(extra, dtype=np.int64)])
    padded = spins.subset(idx)
    pd = padded.pd.copy()
    pd[spins.n_spins :] = 0.0
    return replace(padded, pd=pd)


def _time_chunks(tl: Timeline, max_cols: int) -> list[tuple[int, int, int, int]]:
    """Split the ops into ranges holding at most ``max_cols`` ADC samples each."""
    per_op = np.zeros(tl.n_ops, dtype=np.int64)
    per_op[tl.op == OP_SAMPLE] = 1
    is_run = tl.op == OP_RUN
    per_op[is_run] = tl.run_n[tl.arg[is_run]]
    cum = np.cumsum(per_op)
    chunks = []
    o0, c0 = 0, 0
    while c0 < tl.n_samples:
        # Last op whose cumulative count stays within c0 + max_cols (at least one op).
        o1 = max(int(np.searchsorted(cum, c0 + max_cols, side="right")), o0 + 1)
        while o1 > o0 + 1 and o1 < tl.n_ops and per_op[o1 - 1] == 0:
            o1 -= 1  # end the chunk on a sampling op
        c1 = int(cum[o1 - 1])
        chunks.append((o0, o1, c0, c1))
        o0, c0 = o1, c1
    return chunks


def _run_b(tl: Timeline) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample b (n_samples, 6) and total b of every RUN (n_runs, 6); empty without."""
    if tl.sample_b is None:
        return np.zeros((0, 6)), np.zeros((0, 6))
    cum = np.concatenate([np.zeros((1, 6)), np.cumsum(tl.sample_b, axis=0)])
    return tl.sample_b, cum[tl.run_k + tl.run_n] - cum[tl.run_k]


def _run_exact(tl: Timeline, spins: SpinSystem) -> np.ndarray:
    """RUNs whose diffusion attenuation exceeds RUN_B_TOL for some spin (all spins)."""
    _, run_b = _run_b(tl)
    if run_b.shape[0] == 0:
        return np.zeros(tl.run_n.size, dtype=np.bool_)
    x_max = np.max(spins.diffusion_tensor_m2_s() @ run_b.T, axis=0)
    return x_max > RUN_B_TOL


def _run_chunk_numba(
    tl: Timeline, sub: SpinSystem, aff: Any, cls_idx: Any, dten: np.ndarray, w: np.ndarray,
    tchunks: list[tuple[int, int, int, int]], run_exact: np.ndarray,
) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
    """Run the timeline for one spin chunk with the numba kernel, one time chunk at a time."""
    state = np.zeros((sub.n_spins, 3))
    state[:, 2] = 1.0
    op_b = tl.op_b if tl.op_b is not None else np.zeros((0, 6))
    sample_b, run_b = _run_b(tl)
    pos = np.ascontiguousarray(sub.position_m)
    inst_cos = np.cos(tl.rf_inst_phase_rad)
    inst_sin = np.sin(tl.rf_inst_phase_rad)
    n_threads = numba.get_num_threads()
    sparse_w = scipy.sparse.issparse(w)
    use_buf = sparse_w or w.shape[0] >= BUFFER_MIN_COILS
    w_kernel = np.zeros((1, sub.n_spins), dtype=np.complex64) if sparse_w else w
    empty = np.zeros((0, 0), dtype=np.complex64)
    for o0, o1, c0, c1 in tchunks:
        if use_buf:
            out = np.zeros((1, 1, 1), dtype=np.complex128)
            buf = np.empty((sub.n_spins, c1 - c0), dtype=np.complex64)
        else:
            out = np.zeros((n_threads, w.shape[0], c1 - c0), dtype=np.complex128)
            buf = empty
        run_ops_numba(
            tl.op, tl.arg, o0, o1, c0, tl.free_dt_s, tl.free_m, op_b,
            tl.run_p, tl.run_n, tl.run_k, sample_b, run_b, run_exact, tl.rf_inst_shape,
            inst_cos, inst_sin,
            aff, cls_idx, pos, sub.df_hz, sub.r1_per_s, sub.r2_per_s, dten, w_kernel, state,
            out, buf,
        )
        # Many coils: one complex64 GEMM (BLAS) instead of per-coil sums in the kernel.
        yield o0, o1, c0, c1, (w @ buf) if use_buf else out.sum(axis=0)


def _run_chunk_xp(
    tl: Timeline, sub: SpinSystem, aff: Any, cls_idx: Any, dten: np.ndarray, w: np.ndarray,
    tchunks: list[tuple[int, int, int, int]], run_exact: np.ndarray, xp: Any,
) -> Iterator[tuple[int, int, int, int, np.ndarray]]:
    """Run the timeline for one spin chunk with the array-module kernel (NumPy or CuPy)."""
    state = xp.zeros((sub.n_spins, 3))
    state[:, 2] = 1.0
    dev = [xp.asarray(a) for a in (sub.position_m, sub.df_hz, sub.r1_per_s, sub.r2_per_s,
                                   dten, w)]
    for o0, o1, c0, c1 in tchunks:
        part = run_ops_xp(
            xp, tl.op, tl.arg, o0, o1, c0, c1 - c0, tl.free_dt_s, tl.free_m,
            tl.op_b, tl.run_p, tl.run_n, tl.run_k, tl.sample_b, run_exact,
            tl.rf_inst_shape, tl.rf_inst_phase_rad, aff, cls_idx, *dev, state,
        )
        yield o0, o1, c0, c1, to_numpy(part)


def run_timeline(
    tl: Timeline,
    spins: SpinSystem,
    weights: Callable[[SpinSystem, slice], Any],
    n_out: int,
    *,
    backend: str = "numpy",
    chunk_size: int | None = None,
    progress: bool = False,
    sparse_weights: bool = False,
    _kernel: str = "auto",
) -> np.ndarray:
    """Run a compiled timeline on spins and sum weighted M_xy into ``n_out`` channels.

    Parameters
    ----------
    tl : Timeline
        From :func:`~mrharmony.simulation.timeline.compile_timeline` (with ``diffusion``
        set when the spins diffuse).
    spins : SpinSystem
        The isochromats.
    weights : callable
        ``weights(sub, sl)`` gives the weights of the spins ``sub`` (``spins[sl]``, padded
        with zero-PD spins to a multiple of the kernel's lanes on the CPU): an
        (n_out, len(sub)) complex array, or a ``scipy.sparse`` matrix of that shape (one
        channel per group of spins: the CPU kernel then stores every spin's M_xy and the
        sum is one sparse product).
    n_out : int
        Number of output channels (coils, or spin groups).
    backend, chunk_size, progress
        As :func:`simulate`.
    sparse_weights : bool
        ``weights`` returns sparse matrices (sizes the per-spin buffer).

    Returns
    -------
    ndarray (n_out, n_samples) complex128
        ``sum_s w[c, s] M_xy,s(t_k)``, before the receiver's demodulation.
    """
    use_numba = backend == "numpy" and _kernel != "xp"
    xp = get_xp("cuda") if backend == "cupy" else np
    chunk = int(chunk_size or DEFAULT_CHUNK)
    if sparse_weights and not use_numba:
        chunk = min(chunk, max(LANES, 2**27 // (8 * n_out)))  # dense (n_out, chunk) weights
    many = n_out >= BUFFER_MIN_COILS or sparse_weights
    if use_numba and many:
        # Per-spin M_xy buffer (spins x samples) complex64 for the coil GEMM: < ~256 MiB.
        max_cols = max(64, 2**28 // (8 * min(chunk, spins.n_spins)))
    elif use_numba:
        max_cols = max(64, 16384 // n_out)  # per-thread accumulators stay in cache
    else:
        # The array-module kernel buffers (spins x samples) complex128: keep it < ~1 GiB.
        max_cols = max(64, 2**30 // (16 * min(chunk, spins.n_spins)))
    tchunks = _time_chunks(tl, max_cols)
    starts = list(range(0, spins.n_spins, chunk))
    signal = np.zeros((n_out, tl.n_samples), dtype=np.complex128)
    diffusion = tl.op_b is not None

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(starts) * len(tchunks), desc="Bloch", unit="chunk")
    run_exact = _run_exact(tl, spins) if diffusion else np.zeros(tl.run_n.size, np.bool_)
    for s0 in starts:
        sl = slice(s0, min(s0 + chunk, spins.n_spins))
        sub = spins.subset(sl)
        if use_numba:
            sub = _pad_lanes(sub)
        aff, cls_idx = _rf_tables(tl, sub, use_numba=use_numba, xp=xp)
        w = weights(sub, sl)
        if scipy.sparse.issparse(w) and not use_numba:
            w = w.toarray()
        dten = sub.diffusion_tensor_m2_s() if diffusion else np.zeros((sub.n_spins, 6))
        if use_numba:
            parts = _run_chunk_numba(tl, sub, aff, cls_idx, dten, w, tchunks, run_exact)
        else:
            parts = _run_chunk_xp(tl, sub, aff, cls_idx, dten,
                                  np.asarray(w, dtype=np.complex64), tchunks, run_exact, xp)
        for _, _, c0, c1, part in parts:
            signal[:, c0:c1] += part
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return signal


def timeline_for(
    seq: Any,
    spins: SpinSystem,
    *,
    gradient_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    gradient_delay_s: tuple[float, float, float] = (0.0, 0.0, 0.0),
    b0_t: float | None = None,
    larmor_hz: float | None = None,
    rf_max_step_s: float | None = RF_MAX_STEP_S,
    spoiling: str = "none",
) -> Timeline:
    """The timeline :func:`simulate` compiles for ``seq`` on ``spins`` (same arguments).

    Compile it once and pass it as ``simulate(timeline=)`` to simulate several spin
    systems of the same phantom's field (the Larmor frequency comes from ``b0_t``,
    ``larmor_hz``, the file or the phantom as in :func:`simulate`; diffusion is compiled
    in when any isochromat diffuses; ``spoiling`` as in
    :func:`~mrharmony.simulation.timeline.compile_timeline`).
    """
    return compile_timeline(
        seq,
        gradient_scale=tuple(gradient_scale),
        gradient_delay_s=tuple(gradient_delay_s),
        larmor_hz=_larmor(seq, spins, b0_t, larmor_hz),
        diffusion=bool(np.any(spins.d_m2_s != 0)),
        rf_max_step_s=rf_max_step_s,
        spoiling=spoiling,
    )


def simulate(
    seq: Any,
    spins: SpinSystem,
    *,
    coil_sens: np.ndarray | None = None,
    backend: str = "numpy",
    chunk_size: int | None = None,
    progress: bool = False,
    gradient_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    gradient_delay_s: tuple[float, float, float] = (0.0, 0.0, 0.0),
    b0_t: float | None = None,
    larmor_hz: float | None = None,
    rf_max_step_s: float | None = RF_MAX_STEP_S,
    timeline: Timeline | None = None,
    spoiling: str = "none",
    _kernel: str = "auto",
) -> np.ndarray:
    """Simulate the noiseless receive signal of a Pulseq sequence on an isochromat ensemble.

    Parameters
    ----------
    seq : PulseqSequence
        From :func:`mrharmony.formats.pulseq.read_pulseq`.
    spins : SpinSystem
        The isochromats (e.g. :meth:`SpinSystem.from_phantom`).
    coil_sens : ndarray (n_coils, n_voxels_flat) complex, optional
        Receive sensitivity of every coil at every phantom voxel (C order); one uniform
        coil when omitted.
    backend : {"numpy", "cupy"}
        ``"numpy"`` runs the numba CPU kernels (threads: ``numba.set_num_threads``);
        ``"cupy"`` runs the array-module kernels on the GPU.
    chunk_size : int, optional
        Isochromats per chunk (memory bound); default 262144.
    progress : bool
        Show a progress bar over chunks.
    gradient_scale : (3,) float
        Per-axis (x, y, z) gradient amplitude scaling (site imperfection).
    gradient_delay_s : (3,) float
        Per-axis gradient delay in seconds (site imperfection).
    b0_t, larmor_hz : float, optional
        Field / Larmor frequency for ppm offsets of RF and ADC events (Larmor frequency
        wins; else ``b0_t``; else the ``B0`` definition of the file; else the phantom's
        field). Off-resonance itself is already in ``spins.df_hz``.
    rf_max_step_s : float or None
        RF integration step: raster samples are merged into steps of at most this length
        with their average B1 (keeps the B1 integral and gradient moment exactly; error
        second order in the step, below 1e-3 of M0 for 10 us steps, see the tests).
        ``None`` integrates every raster sample (exact piecewise-constant RF, slower
        for long shaped pulses on large, heterogeneous phantoms).
    timeline : Timeline, optional
        ``seq`` already compiled with these gradient errors, Larmor frequency, diffusion
        setting and RF step (e.g. ``FastPathResult.timeline`` after a fast-path
        fall-back): used as it is instead of compiling ``seq`` again.
    spoiling : {"none", "ideal"}
        ``"none"``: the spoilers and RF phases as played; the isochromats dephase what
        they can (enough of them are needed, see
        :func:`~mrharmony.simulation.raw.isochromat_convergence`). ``"ideal"``: M_xy is
        set to zero before every excitation and inversion
        (:func:`~mrharmony.simulation.timeline.spoiled_pulses`), so no coherence crosses
        from one shot to the next whatever the isochromat count; refused for balanced
        sequences. Ignored when ``timeline`` is given (it was compiled with its own).

    Returns
    -------
    ndarray (n_coils, total_adc_samples) complex64
        Signal in the order of ``seq.adc_records()``, in units of M0 * PD * sensitivity
        summed over isochromats; no noise.

    Raises
    ------
    SimulationError
        On an unknown backend, wrong ``coil_sens`` shape, no ADC, an ADC sample during an
        RF pulse, or ppm offsets without a known Larmor frequency.
    """
    if backend not in ("numpy", "cupy"):
        raise SimulationError(f"backend: expected 'numpy' or 'cupy', got {backend!r}")
    if not isinstance(spins, SpinSystem):
        raise SimulationError(f"spins: expected a SpinSystem, got {type(spins).__name__}")
    if spins.n_spins == 0:
        raise SimulationError("spins: the spin system is empty (no voxel with PD > 0)")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise SimulationError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    if coil_sens is None:
        sens = np.ones((1, spins.n_voxels), dtype=np.complex64)
    else:
        sens = np.asarray(coil_sens)
        if sens.ndim != 2 or sens.shape[1] != spins.n_voxels:
            raise SimulationError(
                f"coil_sens: expected shape (n_coils, {spins.n_voxels}), got {sens.shape}"
            )
        sens = sens.astype(np.complex64, copy=False)
    if rf_max_step_s is not None and not (np.isfinite(rf_max_step_s) and rf_max_step_s > 0):
        raise SimulationError(f"rf_max_step_s: must be > 0 or None, got {rf_max_step_s!r}")
    for name, val in (("gradient_scale", gradient_scale), ("gradient_delay_s", gradient_delay_s)):
        if np.shape(val) != (3,) or not np.all(np.isfinite(val)):
            raise SimulationError(f"{name}: expected 3 finite values (x, y, z), got {val!r}")

    if timeline is not None and not isinstance(timeline, Timeline):
        raise SimulationError(f"timeline: expected a Timeline, got {type(timeline).__name__}")
    tl = timeline if timeline is not None else timeline_for(
        seq, spins, gradient_scale=gradient_scale, gradient_delay_s=gradient_delay_s,
        b0_t=b0_t, larmor_hz=larmor_hz, rf_max_step_s=rf_max_step_s, spoiling=spoiling)

    def weights(sub: SpinSystem, _: slice) -> np.ndarray:
        # Receive weights (complex64): coil sensitivity at the voxel times PD (0 for padding).
        return sens[:, sub.voxel_index] * sub.pd.astype(np.float32)[None, :]

    signal = run_timeline(tl, spins, weights, sens.shape[0], backend=backend,
                          chunk_size=chunk_size, progress=progress, _kernel=_kernel)
    # Left-handed precession: the receiver at ADC frequency f brings spins at f (Hz)
    # to DC by exp(+i 2 pi f t) (the conjugate of Pulseq's right-handed ADC phase).
    signal *= np.exp(1j * tl.sample_demod_rad)[None, :]
    return signal.astype(np.complex64)
