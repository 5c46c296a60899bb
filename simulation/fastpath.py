"""Fast simulation path: each distinct tissue class once, encoding phase per voxel.

With linear gradients, an isochromat at ``r + d`` with off-resonance ``f + df`` differs
from one at ``r`` with ``f`` only by the phase ``exp(-i 2 pi (M(t).d + df t))`` that
gradients and off-resonance wind between events. If the RF pulses play no gradient
along ``d`` (``d`` orthogonal to the slice-select directions, the span ``S`` of the
pulses' gradient moments), ``df`` is small against the pulses' bandwidth, and the voxel
signal is carried by one coherence pathway (the sequence dephases the others:
spoilers, crushers, RF spoiling, or a single shot), then

    s_v(t) = m_c(t) exp(-i 2 pi (k(t).d_v + tau(t) df_v))

where ``m_c`` is the signal of the voxel's *class* (its isochromats, with the voxel's
tissue, T2' spread, B1 scale and diffusivity, placed at the voxel's position projected
onto ``S``, on resonance), ``d_v`` the voxel's position orthogonal to ``S``, ``df_v``
its mean off-resonance, and ``k(t)``, ``tau(t)`` the pathway's dephasing moment and
dephasing time (reset at excitation, negated at refocusing pulses;
:attr:`Timeline.sample_k`, :attr:`Timeline.sample_tau_s`): the standard signal model of
MR imaging with B0 inhomogeneity. Pathways the sequence does not suppress (long-T2
fluid across TRs, unbalanced in-plane moments the point-like voxels do not dephase)
break it, so :func:`fast_simulate` first compares it with the full isochromat engine on
probe voxels (the scan's own isochromats, fields and gradient errors) and returns
nothing when they differ by more than 1 % of the peak signal.

Voxels that share a class are simulated once; the B1 scale is rounded to a grid
(``b1_tol``, 0.5 % by default) so that smooth transmit maps do not make every voxel its
own class. k-space is then formed directly per coil as ``sum_v sens_c(v) PD_v s_v(t)``
in time chunks, one matrix product per chunk (general trajectories; its cost grows as
voxels x samples x coils).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import scipy.sparse

from mrharmony.simulation.engine import run_timeline, timeline_for
from mrharmony.simulation.kernels import voxel_signals_numba
from mrharmony.simulation.spins import SpinSystem
from mrharmony.simulation.timeline import Timeline

__all__ = ["FastPathResult", "fast_simulate", "voxel_classes"]

log = logging.getLogger(__name__)

#: Largest relative L2 difference (per probe voxel, whole signal) between the fast path
#: and the full engine for the fast path's result to be used.
CHECK_TOL = 0.01
#: Probe voxels simulated with the full engine.
N_PROBES = 6


@dataclass
class FastPathResult:
    """What :func:`fast_simulate` did.

    Attributes
    ----------
    signal : ndarray (n_coils, n_samples) complex64 or None
        The signal (as :func:`~mrharmony.simulation.engine.simulate` returns it), or
        ``None`` when the fast path does not apply (see ``reason``).
    n_classes, n_voxels : int
        Classes simulated and voxels they stand for.
    check_pct : float
        Largest difference between the fast path and the full engine over the probe
        voxels' samples, in percent of that voxel's peak signal (NaN when not checked).
    reason : str
        Why the fast path was not used (empty when it was).
    timeline : Timeline or None
        The compiled timeline (with the engine's RF step), when one was compiled: a
        fall-back to :func:`~mrharmony.simulation.engine.simulate` with the same
        arguments reuses it (``timeline=``) instead of compiling the sequence again.
    """

    signal: np.ndarray | None
    n_classes: int = 0
    n_voxels: int = 0
    check_pct: float = float("nan")
    reason: str = ""
    timeline: Timeline | None = field(default=None, repr=False)


def _voxel_runs(spins: SpinSystem) -> tuple[np.ndarray, int] | None:
    """Voxel of each run of isochromats and the isochromats per voxel, or None."""
    vi = spins.voxel_index
    n = vi.size
    change = np.flatnonzero(np.diff(vi)) + 1
    starts = np.concatenate([[0], change])
    counts = np.diff(np.concatenate([starts, [n]]))
    if counts.size == 0 or np.any(counts != counts[0]) or np.unique(vi[starts]).size != starts.size:
        return None
    return vi[starts], int(counts[0])


def _rf_span(tl: Timeline) -> np.ndarray:
    """Orthonormal rows spanning the gradient moments played during RF pulses (k, 3)."""
    if not tl.rf_shapes:
        return np.zeros((0, 3))
    m = np.concatenate([np.cumsum(s.m, axis=0) for s in tl.rf_shapes])
    if not np.any(m):
        return np.zeros((0, 3))
    _, sv, vt = np.linalg.svd(m, full_matrices=False)
    return vt[: int(np.sum(sv > 1e-6 * sv.max()))]


def _iso_of(groups: np.ndarray, n_iso: int) -> np.ndarray:
    """Isochromat indices of voxels (or classes) ``groups``, ``n_iso`` each."""
    return (np.asarray(groups)[:, None] * n_iso + np.arange(n_iso)[None, :]).reshape(-1)


def voxel_classes(
    spins: SpinSystem, span: np.ndarray, n_iso: int, *, b1_tol: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, SpinSystem, np.ndarray]:
    """Group voxels whose isochromats see the same fields up to a translation.

    Parameters
    ----------
    spins : SpinSystem
        Voxel-contiguous isochromats, ``n_iso`` per voxel
        (:meth:`SpinSystem.from_phantom`).
    span : ndarray (k, 3)
        Orthonormal directions of the RF pulses' gradients (positions along them stay).
    n_iso : int
        Isochromats per voxel.
    b1_tol : float
        Bin width of the voxel's B1 scale (relative); 0 keeps exact values.

    Returns
    -------
    cls : ndarray (n_vox,) int64
        Class of every voxel (in the order of the spins' voxels).
    shift_m : ndarray (n_vox, 3)
        Each voxel's centre orthogonal to ``span`` (m): its translation from its class.
    df_hz : ndarray (n_vox,)
        Each voxel's mean off-resonance (Hz), factored out of its class (the class's
        isochromats keep only the voxel's T2' spread about it).
    classes : SpinSystem
        ``n_iso`` isochromats per class at unit voxel PD (``voxel_index`` = class).
    pd_vox : ndarray (n_vox,)
        Each voxel's PD (sum over its isochromats).
    """
    n_vox = spins.n_spins // n_iso

    def per(a: np.ndarray) -> np.ndarray:
        return a.reshape(n_vox, n_iso, *a.shape[1:])

    pos = per(spins.position_m)
    centre = pos.mean(axis=1)
    proj = np.eye(3) - span.T @ span
    shift = centre @ proj.T
    rel = pos - shift[:, None, :]  # isochromat positions with the voxel moved onto S
    pd = per(spins.pd)
    pd_vox = pd.sum(axis=1)
    unit_pd = np.divide(pd, pd_vox[:, None], out=np.zeros_like(pd), where=pd_vox[:, None] > 0)
    df = per(spins.df_hz)
    df_mean = df.mean(axis=1)
    spread = df - df_mean[:, None]
    b1 = per(spins.b1_scale)[:, 0]
    if b1_tol > 0:
        b1 = np.round(b1 / b1_tol) * b1_tol
    d = spins.d_m2_s
    d = per(d).reshape(n_vox, -1)
    cols = [np.round(b1, 9)[:, None],
            per(spins.r1_per_s), per(spins.r2_per_s), d, np.round(spread, 6),
            np.round(unit_pd, 9), np.round(rel.reshape(n_vox, -1), 9)]
    keys = np.concatenate([np.asarray(c, dtype=np.float64).reshape(n_vox, -1) for c in cols],
                          axis=1)
    _, first, cls = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    cls = cls.reshape(-1)
    rep = spins.subset(_iso_of(first, n_iso))
    classes = SpinSystem(
        position_m=rel[first].reshape(-1, 3),
        pd=unit_pd[first].reshape(-1),
        r1_per_s=rep.r1_per_s,
        r2_per_s=rep.r2_per_s,
        df_hz=spread[first].reshape(-1),
        b1_scale=np.repeat(b1[first], n_iso),
        d_m2_s=rep.d_m2_s,
        voxel_index=np.repeat(np.arange(first.size), n_iso),
        n_voxels=int(first.size),
        field_t=spins.field_t,
    )
    return cls, shift, df_mean, classes, pd_vox


def _as_groups(spins: SpinSystem, n_groups: int, n_iso: int) -> SpinSystem:
    """The same spins with ``voxel_index`` renumbered 0..n_groups-1, ``n_iso`` each."""
    return replace(spins, voxel_index=np.repeat(np.arange(n_groups), n_iso),
                               n_voxels=n_groups)


def _group_weights(classes: SpinSystem) -> Any:
    """Weights for :func:`run_timeline`: one channel per class (sparse, unit PD)."""
    def weights(sub: SpinSystem, sl: slice) -> Any:
        n = sub.n_spins
        rows = classes.voxel_index[sl]
        vals = classes.pd[sl]
        cols = np.arange(rows.size)
        return scipy.sparse.csr_matrix((vals, (rows, cols)), shape=(classes.n_voxels, n))
    return weights


def _continues(tl: Timeline) -> np.ndarray:
    """Samples that repeat the previous sample's k and tau step (inside a RUN)."""
    cont = np.zeros(tl.n_samples, dtype=np.bool_)
    for k0, n in zip(tl.run_k, tl.run_n, strict=True):
        cont[int(k0) + 2: int(k0) + int(n)] = True
    return cont


def _form_kspace(
    class_sig: np.ndarray, cls: np.ndarray, shift_m: np.ndarray, df_hz: np.ndarray,
    k: np.ndarray, tau_s: np.ndarray, cont: np.ndarray, w: np.ndarray,
    max_bytes: int = 1 << 27,
) -> np.ndarray:
    """``sum_v w[c, v] class_sig[cls[v], t] exp(-i 2 pi (k(t).shift_v + tau(t) df_v))``."""
    n_vox = cls.size
    n_t = k.shape[0]
    out = np.zeros((w.shape[0], n_t), dtype=np.complex128)
    step = max(1, max_bytes // (8 * max(n_vox, 1)))
    wc = w.astype(np.complex64)
    cls = np.ascontiguousarray(cls, dtype=np.int64)
    shift_m = np.ascontiguousarray(shift_m, dtype=np.float64)
    df_hz = np.ascontiguousarray(df_hz, dtype=np.float64)
    for t0 in range(0, n_t, step):
        t1 = min(t0 + step, n_t)
        chunk_cont = cont[t0:t1].copy()
        chunk_cont[:1] = False  # each chunk starts from an exact exponential
        e = np.empty((n_vox, t1 - t0), dtype=np.complex64)
        voxel_signals_numba(np.ascontiguousarray(class_sig[:, t0:t1]), cls, shift_m, df_hz,
                            np.ascontiguousarray(k[t0:t1]), np.ascontiguousarray(tau_s[t0:t1]),
                            chunk_cont, e)
        out[:, t0:t1] = wc @ e
    return out


def fast_simulate(
    seq: Any,
    spins: SpinSystem,
    *,
    coil_sens: np.ndarray,
    backend: str = "numpy",
    gradient_scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    gradient_delay_s: tuple[float, float, float] = (0.0, 0.0, 0.0),
    b0_t: float | None = None,
    b1_tol: float = 0.005,
    check_tol: float = CHECK_TOL,
    n_probes: int = N_PROBES,
    progress: bool = False,
    seed: int = 0,
    spoiling: str = "none",
) -> FastPathResult:
    """Simulate like :func:`~mrharmony.simulation.engine.simulate`, one class at a time.

    Parameters
    ----------
    seq : PulseqSequence
        The sequence.
    spins : SpinSystem
        Voxel-contiguous isochromats from :meth:`SpinSystem.from_phantom`.
    coil_sens : ndarray (n_coils, n_voxels_flat) complex
        Receive sensitivities.
    backend : {"numpy", "cupy"}
        Engine backend for the class and probe simulations.
    gradient_scale, gradient_delay_s, b0_t
        As the full engine (site gradient errors; field for ppm offsets).
    b1_tol : float
        Bin width of the voxels' B1 scale (relative) for grouping (0: exact classes).
    check_tol : float
        Largest difference from the full engine on a probe voxel, as a fraction of its
        peak signal, for the result to be returned.
    n_probes : int
        Probe voxels (the farthest from the factorisation origin first, then seeded
        random ones).
    progress : bool
        Progress bar of the class simulation.
    seed : int
        Seed of the random probe choice.
    spoiling : {"none", "ideal"}
        Spoiling model of the class, probe and full-engine simulations (as
        :func:`~mrharmony.simulation.engine.simulate`).

    Returns
    -------
    FastPathResult
        ``signal`` is ``None`` when the fast path does not apply or fails its check;
        ``reason`` then says why.
    """
    runs = _voxel_runs(spins)
    if runs is None:
        return FastPathResult(None, reason="isochromats are not grouped voxel by voxel")
    vox, n_iso = runs
    tl = timeline_for(seq, spins, gradient_scale=gradient_scale,
                      gradient_delay_s=gradient_delay_s, b0_t=b0_t, spoiling=spoiling)
    span = _rf_span(tl)
    if span.shape[0] >= 3:
        return FastPathResult(None, reason="RF pulses play gradients along all three axes",
                              timeline=tl)
    cls, shift, df_vox, classes, pd_vox = voxel_classes(spins, span, n_iso, b1_tol=b1_tol)
    n_classes = classes.n_voxels
    if n_classes * 2 > cls.size:
        return FastPathResult(None, n_classes=n_classes, n_voxels=cls.size,
                              reason=f"{n_classes} classes for {cls.size} voxels (no saving)",
                              timeline=tl)
    proj = np.eye(3) - span.T @ span
    k = tl.sample_k @ proj.T
    tau = tl.sample_tau_s
    cont = _continues(tl)
    log.info("fast path: %d classes for %d voxels, %d isochromats each", n_classes, cls.size,
             n_iso)

    # Check first, on probe voxels against the full engine (cheap when it fails): the
    # voxels farthest from the factorisation origin, then seeded random ones.
    rng = np.random.default_rng(seed)
    dist = np.linalg.norm(shift, axis=1)
    order = list(np.argsort(-dist, kind="stable")[: max(n_probes // 2, 1)])
    rest = np.setdiff1d(np.arange(cls.size), order)
    order += list(rng.choice(rest, size=min(n_probes - len(order), rest.size), replace=False))
    probes = np.asarray(order, dtype=np.int64)
    pcls, pinv = np.unique(cls[probes], return_inverse=True)
    probe_sig = []
    for group, members in ((spins, probes), (classes, pcls)):
        sub = _as_groups(group.subset(_iso_of(members, n_iso)), members.size, n_iso)
        probe_sig.append(run_timeline(tl, sub, _group_weights(sub), members.size,
                                      backend=backend, sparse_weights=True))
    full, psig = probe_sig
    fast = _form_kspace(psig, pinv.reshape(-1), shift[probes], df_vox[probes], k, tau, cont,
                        np.diag(pd_vox[probes]).astype(np.float32))
    peak = np.max(np.abs(full), axis=1)
    err = np.max(np.abs(fast - full), axis=1) / np.where(peak > 0, peak, 1.0)
    check_pct = float(100 * np.max(err))
    if check_pct > 100 * check_tol:
        log.info("fast path not used: %.3g %% of peak from the full engine", check_pct)
        return FastPathResult(None, n_classes, int(cls.size), check_pct,
                              reason=f"differs from the full engine by {check_pct:.2g} % of the "
                                     f"peak signal on probe voxels (limit {100 * check_tol:g} "
                                     "%)", timeline=tl)

    class_sig = run_timeline(tl, classes, _group_weights(classes), n_classes,
                             backend=backend, progress=progress, sparse_weights=True)
    sens = np.asarray(coil_sens)
    w = sens[:, vox] * pd_vox[None, :].astype(np.float32)
    signal = _form_kspace(class_sig, cls, shift, df_vox, k, tau, cont, w)
    signal *= np.exp(1j * tl.sample_demod_rad)[None, :]
    return FastPathResult(signal.astype(np.complex64), n_classes, int(cls.size), check_pct,
                          timeline=tl)
