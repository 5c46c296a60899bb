"""Bloch kernels: numba on the CPU, array-module (NumPy/CuPy) code on any device.

Two operations are needed (see :mod:`mrharmony.simulation.timeline`):

- :func:`rf_affine_numba` / :func:`rf_affine_xp`: the affine map ``M -> A M + c`` that one
  RF shape applies to a spin class (df, position, B1 scale, R1, R2). Each RF step is a
  rotation about the effective field ``2 pi (B1x, B1y, df + G.r)`` (exact for constant
  B1 and mean gradient over the step) with relaxation split symmetrically around it
  (Strang splitting, error O(dt^3) per step).
- :func:`run_ops_numba` / :func:`run_ops_xp`: execute the timeline for a chunk of spins,
  accumulating ``sum_s w[c, s] * Mxy_s`` for every ADC sample. The numba kernel keeps
  each spin's state in registers across all operations (groups of :data:`LANES` spins
  per thread), so it is compute- rather than memory-bound; a readout RUN is a tight
  complex-rotate-and-accumulate loop.

Conventions: ``dM/dt = gamma M x B``; free precession is ``Mxy <- Mxy exp(-i 2 pi (df dt +
m . r))`` (the FFT k-space convention of the sequence library), M0 = 1 (PD is applied in
the receive weights). State is float64 (accuracy over 10^5-10^6 operations); the numba
kernels use IEEE arithmetic (the run kernel allows only reassociation and fused
multiply-add, see ``_REASSOC``), so results are reproducible for a given build.
"""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import Any

import numba
import numpy as np

__all__ = ["LANES", "RUN_B_TOL", "rf_affine_numba", "rf_affine_xp", "run_ops_numba", "run_ops_xp"]

_TWO_PI = 2.0 * math.pi


def _cache_dir() -> str:
    """Where the compiled kernels are cached: ``$NUMBA_CACHE_DIR`` if the user set one,
    else ``$XDG_CACHE_HOME/mrharmony/numba`` (``~/.cache/...``) — never inside the
    installed package, where a reinstall would leave them behind."""
    if numba.config.CACHE_DIR:
        return str(numba.config.CACHE_DIR)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mrharmony", "numba")


def _njit(**options: Any) -> Any:
    """``numba.njit(cache=True, **options)`` with the cache in :func:`_cache_dir`.

    numba picks a function's cache location when it is decorated, from its global
    ``config.CACHE_DIR``; that setting is changed only for the decoration and restored.
    """

    def decorate(func: Any) -> Any:
        saved = numba.config.CACHE_DIR
        numba.config.CACHE_DIR = _cache_dir()
        try:
            return numba.njit(cache=True, **options)(func)
        finally:
            numba.config.CACHE_DIR = saved

    return decorate


@_njit(fastmath=False, inline="always")
def _relax_affine(a: np.ndarray, i: int, e1: float, e2: float) -> None:
    for j in range(4):
        a[i, j] *= e2
        a[i, 4 + j] *= e2
        a[i, 8 + j] *= e1
    a[i, 11] += 1.0 - e1


@_njit(parallel=True, fastmath=False)
def rf_affine_numba(
    b1_hz: np.ndarray,
    dt_s: np.ndarray,
    m: np.ndarray,
    df_hz: np.ndarray,
    pos_m: np.ndarray,
    b1_scale: np.ndarray,
    r1: np.ndarray,
    r2: np.ndarray,
) -> np.ndarray:
    """Affine maps (n_classes, 12) = rows ``[A00 A01 A02 c0 | A10 .. c1 | A20 .. c2]``.

    Parameters
    ----------
    b1_hz : (n,) complex128; dt_s : (n,) s; m : (n, 3) 1/m
        The RF shape (see :class:`~mrharmony.simulation.timeline.RFShape`).
    df_hz, b1_scale, r1, r2 : (n_classes,) float64; pos_m : (n_classes, 3) float64
        One representative spin per class: off-resonance (Hz), relative B1, 1/T1, 1/T2
        (1/s), position (m).
    """
    n_cls = df_hz.shape[0]
    n = b1_hz.shape[0]
    out = np.zeros((n_cls, 12))
    for i in numba.prange(n_cls):
        out[i, 0] = 1.0
        out[i, 5] = 1.0
        out[i, 10] = 1.0
        px, py, pz = pos_m[i, 0], pos_m[i, 1], pos_m[i, 2]
        last_h = -1.0
        e1 = 1.0
        e2 = 1.0
        for k in range(n):
            h = dt_s[k]
            if h != last_h:
                e1 = math.exp(-0.5 * r1[i] * h)
                e2 = math.exp(-0.5 * r2[i] * h)
                last_h = h
            _relax_affine(out, i, e1, e2)
            wx = _TWO_PI * b1_scale[i] * b1_hz[k].real
            wy = _TWO_PI * b1_scale[i] * b1_hz[k].imag
            wz = _TWO_PI * (df_hz[i] + (m[k, 0] * px + m[k, 1] * py + m[k, 2] * pz) / h)
            wn = math.sqrt(wx * wx + wy * wy + wz * wz)
            if wn > 0.0:
                nx, ny, nz = wx / wn, wy / wn, wz / wn
                th = wn * h
                c = math.cos(th)
                s = -math.sin(th)  # rotation by -theta (left-handed precession)
                t = 1.0 - c
                r00 = c + t * nx * nx
                r01 = t * nx * ny - s * nz
                r02 = t * nx * nz + s * ny
                r10 = t * nx * ny + s * nz
                r11 = c + t * ny * ny
                r12 = t * ny * nz - s * nx
                r20 = t * nx * nz - s * ny
                r21 = t * ny * nz + s * nx
                r22 = c + t * nz * nz
                for j in range(4):
                    a0 = out[i, j]
                    a1 = out[i, 4 + j]
                    a2 = out[i, 8 + j]
                    out[i, j] = r00 * a0 + r01 * a1 + r02 * a2
                    out[i, 4 + j] = r10 * a0 + r11 * a1 + r12 * a2
                    out[i, 8 + j] = r20 * a0 + r21 * a1 + r22 * a2
            _relax_affine(out, i, e1, e2)
    return out


def rf_affine_xp(
    xp: ModuleType,
    b1_hz: np.ndarray,
    dt_s: np.ndarray,
    m: np.ndarray,
    df_hz: Any,
    pos_m: Any,
    b1_scale: Any,
    r1: Any,
    r2: Any,
) -> Any:
    """Array-module twin of :func:`rf_affine_numba` (vectorised over classes)."""
    n_cls = df_hz.shape[0]
    a = xp.zeros((n_cls, 3, 4))
    a[:, 0, 0] = a[:, 1, 1] = a[:, 2, 2] = 1.0

    def relax(e1: Any, e2: Any) -> None:
        a[:, 0:2, :] *= e2[:, None, None]
        a[:, 2, :] *= e1[:, None]
        a[:, 2, 3] += 1.0 - e1

    for k in range(b1_hz.shape[0]):
        h = float(dt_s[k])
        e1 = xp.exp(-0.5 * r1 * h)
        e2 = xp.exp(-0.5 * r2 * h)
        relax(e1, e2)
        wx = _TWO_PI * b1_scale * float(b1_hz[k].real)
        wy = _TWO_PI * b1_scale * float(b1_hz[k].imag)
        wz = _TWO_PI * (df_hz + pos_m @ xp.asarray(m[k] / h))
        wn = xp.sqrt(wx * wx + wy * wy + wz * wz)
        safe = xp.where(wn > 0, wn, 1.0)
        nx, ny, nz = wx / safe, wy / safe, wz / safe
        c = xp.cos(wn * h)
        s = -xp.sin(wn * h)
        t = 1.0 - c
        rot = xp.stack(
            [
                xp.stack([c + t * nx * nx, t * nx * ny - s * nz, t * nx * nz + s * ny], -1),
                xp.stack([t * nx * ny + s * nz, c + t * ny * ny, t * ny * nz - s * nx], -1),
                xp.stack([t * nx * nz - s * ny, t * ny * nz + s * nx, c + t * nz * nz], -1),
            ],
            axis=-2,
        )
        a = xp.matmul(rot, a)
        relax(e1, e2)
    return a.reshape(n_cls, 12)


@_njit(fastmath=False, inline="always")
def _diffuse(
    mx: np.ndarray, my: np.ndarray, dten: np.ndarray, s0: int, b: np.ndarray, row: int
) -> None:
    """Attenuate M_xy of one lane group by exp(-b : D) (second-order series when tiny)."""
    for j in range(mx.shape[0]):
        x = 0.0
        for c in range(6):
            x += dten[s0 + j, c] * b[row, c]
        if x > 0.0:
            fac = 1.0 - x + 0.5 * x * x if x < 1e-3 else math.exp(-x)
            mx[j] *= fac
            my[j] *= fac


#: LLVM may reassociate sums and fuse multiply-adds (so the per-sample sum over lanes
#: vectorises, about 3x faster); no approximate functions, NaN/Inf assumptions or
#: reciprocal tricks. Results are deterministic for a given build.
_REASSOC = {"reassoc", "contract"}

@_njit(fastmath=_REASSOC)
def _run_one_coil(
    mx: np.ndarray, my: np.ndarray, cr: np.ndarray, ci: np.ndarray, wr: np.ndarray,
    wi: np.ndarray, out: np.ndarray, col: int, nrun: int,
) -> None:
    """Tight loop of a RUN for one coil: rotate the lanes, add their weighted sum."""
    for i in range(nrun):
        acc_r = 0.0
        acc_i = 0.0
        for j in range(LANES):
            t = mx[j] * cr[j] - my[j] * ci[j]
            my[j] = mx[j] * ci[j] + my[j] * cr[j]
            mx[j] = t
            acc_r += wr[j] * mx[j] - wi[j] * my[j]
            acc_i += wr[j] * my[j] + wi[j] * mx[j]
        out[col + i] += complex(acc_r, acc_i)


#: Diffusion attenuation exp(-b:D) over a whole RUN (e.g. a readout) below which it is
#: spread geometrically over the run's samples instead of following the exact per-sample
#: b (relative signal error < 0.2 * RUN_B_TOL = 2e-5 within the run, exact at its end).
RUN_B_TOL = 1e-4

#: Spins processed together by one thread (independent recurrences the CPU overlaps and
#: vectorises); spin arrays passed to :func:`run_ops_numba` are padded to a multiple.
LANES = 32


@_njit(parallel=True, fastmath=_REASSOC)
def run_ops_numba(
    op: np.ndarray,
    arg: np.ndarray,
    o0: int,
    o1: int,
    col0: int,
    free_dt: np.ndarray,
    free_m: np.ndarray,
    op_b: np.ndarray,
    run_p: np.ndarray,
    run_n: np.ndarray,
    run_k: np.ndarray,
    sample_b: np.ndarray,
    run_b: np.ndarray,
    run_exact: np.ndarray,
    inst_shape: np.ndarray,
    inst_cos: np.ndarray,
    inst_sin: np.ndarray,
    aff: np.ndarray,
    cls_idx: np.ndarray,
    pos: np.ndarray,
    df: np.ndarray,
    r1: np.ndarray,
    r2: np.ndarray,
    dten: np.ndarray,
    w: np.ndarray,
    state: np.ndarray,
    out: np.ndarray,
    buf: np.ndarray,
) -> None:
    """Run operations ``o0:o1`` for all spins; ``out[t, c, k - col0] += w[c, s] * Mxy``.

    With many coils pass ``buf`` (N, n_cols) complex64: the kernel then stores every
    spin's M_xy there instead (``out`` untouched) and the caller forms ``w @ buf`` with
    BLAS; otherwise pass an empty (0, 0) ``buf``.

    Spins are processed in groups of :data:`LANES` (N must be a multiple; pad with
    zero-weight spins). ``out`` has one (n_coils, n_cols) accumulator per thread block
    (first axis), so the parallel loop needs no atomics; the caller sums over that axis.
    ``op_b`` is (n_ops, 6) or (0, 6) without diffusion, ``sample_b`` (n_samples, 6) and
    ``run_b`` (n_runs, 6, total b of each run) likewise; ``dten`` (N, 6) matching.
    ``run_exact`` (n_runs,) bool: apply diffusion per sample in that run (else spread
    geometrically, see ``RUN_B_TOL``); decided once for all spins by the caller.
    ``state`` (N, 3) float64 is read at the start and written back at the end.
    """
    n = pos.shape[0]
    n_groups = n // LANES
    nt = out.shape[0]
    nc = w.shape[0]
    has_b = op_b.shape[0] > 0
    use_buf = buf.shape[0] > 0
    for tb in numba.prange(nt):
        g_lo = tb * n_groups // nt
        g_hi = (tb + 1) * n_groups // nt
        mx = np.empty(LANES)
        my = np.empty(LANES)
        mz = np.empty(LANES)
        cr = np.empty(LANES)
        ci = np.empty(LANES)
        e1 = np.empty(LANES)
        rc = np.empty(LANES)
        rs = np.empty(LANES)
        wr = np.empty((nc, LANES))
        wi = np.empty((nc, LANES))
        for g in range(g_lo, g_hi):
            s0 = g * LANES
            diff = False
            for j in range(LANES):
                mx[j] = state[s0 + j, 0]
                my[j] = state[s0 + j, 1]
                mz[j] = state[s0 + j, 2]
                cr[j] = 1.0
                ci[j] = 0.0
                e1[j] = 1.0
                for c in range(nc):
                    wr[c, j] = w[c, s0 + j].real
                    wi[c, j] = w[c, s0 + j].imag
                if has_b:
                    for c in range(6):
                        if dten[s0 + j, c] != 0.0:
                            diff = True
            last_p = -1
            for o in range(o0, o1):
                code = op[o]
                if code == 0 or code == 3:
                    p = arg[o] if code == 0 else run_p[arg[o]]
                    if p != last_p:
                        dt = free_dt[p]
                        for j in range(LANES):
                            s = s0 + j
                            ph = -_TWO_PI * (
                                df[s] * dt
                                + free_m[p, 0] * pos[s, 0]
                                + free_m[p, 1] * pos[s, 1]
                                + free_m[p, 2] * pos[s, 2]
                            )
                            e2 = math.exp(-r2[s] * dt)
                            e1[j] = math.exp(-r1[s] * dt)
                            cr[j] = e2 * math.cos(ph)
                            ci[j] = e2 * math.sin(ph)
                        last_p = p
                    if code == 0:
                        for j in range(LANES):
                            t = mx[j] * cr[j] - my[j] * ci[j]
                            my[j] = mx[j] * ci[j] + my[j] * cr[j]
                            mx[j] = t
                            mz[j] = mz[j] * e1[j] + (1.0 - e1[j])
                        if diff:
                            _diffuse(mx, my, dten, s0, op_b, o)
                    else:
                        q = arg[o]
                        k0 = run_k[q]
                        nrun = run_n[q]
                        # Diffusion weighting during a run (e.g. a readout) is usually tiny:
                        # below _RUN_B_TOL it is spread evenly over the run's samples (folded
                        # into the rotation), else applied exactly sample by sample.
                        per_sample = diff and run_exact[q]
                        for j in range(LANES):
                            rc[j] = cr[j]
                            rs[j] = ci[j]
                        if diff and not per_sample:
                            for j in range(LANES):
                                x = 0.0
                                for c in range(6):
                                    x += dten[s0 + j, c] * run_b[q, c]
                                fac = math.exp(-x / nrun)
                                rc[j] *= fac
                                rs[j] *= fac
                        if nc == 1 and not per_sample and not use_buf:
                            _run_one_coil(mx, my, rc, rs, wr[0], wi[0], out[tb, 0],
                                          k0 - col0, nrun)
                        general = nc > 1 or per_sample or use_buf
                        for i in range(nrun if general else 0):
                            for j in range(LANES):
                                t = mx[j] * rc[j] - my[j] * rs[j]
                                my[j] = mx[j] * rs[j] + my[j] * rc[j]
                                mx[j] = t
                            if per_sample:
                                _diffuse(mx, my, dten, s0, sample_b, k0 + i)
                            col = k0 + i - col0
                            if use_buf:
                                for j in range(LANES):
                                    buf[s0 + j, col] = complex(mx[j], my[j])
                                continue
                            for c in range(nc):
                                acc_r = 0.0
                                acc_i = 0.0
                                for j in range(LANES):
                                    acc_r += wr[c, j] * mx[j] - wi[c, j] * my[j]
                                    acc_i += wr[c, j] * my[j] + wi[c, j] * mx[j]
                                out[tb, c, col] += complex(acc_r, acc_i)
                        for j in range(LANES):
                            en = e1[j] ** nrun
                            mz[j] = mz[j] * en + (1.0 - en)
                elif code == 1:
                    r = arg[o]
                    k = inst_shape[r]
                    cph = inst_cos[r]
                    sph = inst_sin[r]
                    for j in range(LANES):
                        a = cls_idx[k, s0 + j]
                        ux = mx[j] * cph + my[j] * sph
                        uy = my[j] * cph - mx[j] * sph
                        vx = aff[a, 0] * ux + aff[a, 1] * uy + aff[a, 2] * mz[j] + aff[a, 3]
                        vy = aff[a, 4] * ux + aff[a, 5] * uy + aff[a, 6] * mz[j] + aff[a, 7]
                        mz[j] = aff[a, 8] * ux + aff[a, 9] * uy + aff[a, 10] * mz[j] + aff[a, 11]
                        mx[j] = vx * cph - vy * sph
                        my[j] = vx * sph + vy * cph
                elif code == 4:  # ideal spoiling
                    for j in range(LANES):
                        mx[j] = 0.0
                        my[j] = 0.0
                else:
                    col = arg[o] - col0
                    if use_buf:
                        for j in range(LANES):
                            buf[s0 + j, col] = complex(mx[j], my[j])
                        continue
                    for c in range(nc):
                        acc_r = 0.0
                        acc_i = 0.0
                        for j in range(LANES):
                            acc_r += wr[c, j] * mx[j] - wi[c, j] * my[j]
                            acc_i += wr[c, j] * my[j] + wi[c, j] * mx[j]
                        out[tb, c, col] += complex(acc_r, acc_i)
            for j in range(LANES):
                state[s0 + j, 0] = mx[j]
                state[s0 + j, 1] = my[j]
                state[s0 + j, 2] = mz[j]


def run_ops_xp(
    xp: ModuleType,
    op: np.ndarray,
    arg: np.ndarray,
    o0: int,
    o1: int,
    col0: int,
    n_cols: int,
    free_dt: np.ndarray,
    free_m: np.ndarray,
    op_b: np.ndarray | None,
    run_p: np.ndarray,
    run_n: np.ndarray,
    run_k: np.ndarray,
    sample_b: np.ndarray | None,
    run_exact: np.ndarray,
    inst_shape: np.ndarray,
    inst_phase: np.ndarray,
    aff: Any,
    cls_idx: Any,
    pos: Any,
    df: Any,
    r1: Any,
    r2: Any,
    dten: Any,
    w: Any,
    state: Any,
) -> Any:
    """Array-module twin of :func:`run_ops_numba`; returns (n_coils, n_cols) complex128.

    Vectorised over spins with a host loop over operations (the CuPy path; on NumPy it is
    the reference the numba kernel is tested against). ``state`` is updated in place.
    """
    mxy = state[:, 0] + 1j * state[:, 1]
    mz = state[:, 2].copy()
    buf = xp.zeros((pos.shape[0], n_cols), dtype=xp.complex128)
    has_diff = op_b is not None and bool(xp.any(dten != 0))
    last_p = -1
    rot = e1 = None
    for o in range(o0, o1):
        code = int(op[o])
        if code == 3:
            q = int(arg[o])
            p, nrun, k0 = int(run_p[q]), int(run_n[q]), int(run_k[q])
            if p != last_p:
                dt = float(free_dt[p])
                ph = -_TWO_PI * (df * dt + pos @ xp.asarray(free_m[p]))
                rot = xp.exp(-r2 * dt + 1j * ph)
                e1 = xp.exp(-r1 * dt)
                last_p = p
            # M_xy(k0 + i) = M_xy * rot^(i+1) * exp(-D : cumulative b); the same rule as
            # the numba kernel for small totals (geometric spreading, see _RUN_B_TOL).
            powers = xp.arange(1, nrun + 1)
            step = rot
            exact_b = has_diff and bool(run_exact[q])
            if has_diff:
                cum_b = np.cumsum(sample_b[k0 : k0 + nrun], axis=0)
                if not exact_b:
                    step = rot * xp.exp(-(dten @ xp.asarray(cum_b[-1])) / nrun)
            block = mxy[:, None] * step[:, None] ** powers[None, :]
            if exact_b:
                block = block * xp.exp(-(dten @ xp.asarray(cum_b).T))
            buf[:, k0 - col0 : k0 - col0 + nrun] = block
            mxy = block[:, -1]
            mz = mz * e1**nrun + (1.0 - e1**nrun)
        elif code == 0:
            p = int(arg[o])
            if p != last_p:
                dt = float(free_dt[p])
                ph = -_TWO_PI * (df * dt + pos @ xp.asarray(free_m[p]))
                rot = xp.exp(-r2 * dt + 1j * ph)
                e1 = xp.exp(-r1 * dt)
                last_p = p
            mxy = mxy * rot
            mz = mz * e1 + (1.0 - e1)
            if has_diff:
                x = dten @ xp.asarray(op_b[o])
                mxy = mxy * xp.exp(-x)
        elif code == 1:
            r = int(arg[o])
            a = aff[cls_idx[int(inst_shape[r])]]
            u = mxy * np.exp(-1j * float(inst_phase[r]))
            vx = a[:, 0] * u.real + a[:, 1] * u.imag + a[:, 2] * mz + a[:, 3]
            vy = a[:, 4] * u.real + a[:, 5] * u.imag + a[:, 6] * mz + a[:, 7]
            mz = a[:, 8] * u.real + a[:, 9] * u.imag + a[:, 10] * mz + a[:, 11]
            mxy = (vx + 1j * vy) * np.exp(1j * float(inst_phase[r]))
        elif code == 4:  # ideal spoiling
            mxy = xp.zeros_like(mxy)
        else:
            buf[:, int(arg[o]) - col0] = mxy
    state[:, 0] = mxy.real
    state[:, 1] = mxy.imag
    state[:, 2] = mz
    return w.astype(xp.complex128) @ buf


@_njit(parallel=True, fastmath=False)
def voxel_signals_numba(
    class_sig: np.ndarray,
    cls: np.ndarray,
    shift: np.ndarray,
    df: np.ndarray,
    k: np.ndarray,
    tau: np.ndarray,
    cont: np.ndarray,
    out: np.ndarray,
) -> None:
    """``out[v, t] = class_sig[cls[v], t] exp(-i 2 pi (k[t].shift[v] + tau[t] df[v]))``.

    ``cont[t]`` marks a sample whose k and tau step from sample ``t - 1`` equals the
    step before it (a readout on a constant gradient): the phase factor then advances by
    one complex multiplication (in double precision) instead of a new exponential.
    ``class_sig`` (n_classes, n_t) complex128, ``out`` (n_vox, n_t) complex64.
    """
    n_vox, n_t = out.shape
    two_pi = 2.0 * np.pi
    for v in numba.prange(n_vox):
        dx, dy, dz, f = shift[v, 0], shift[v, 1], shift[v, 2], df[v]
        c = cls[v]
        e = 1.0 + 0.0j
        step = 1.0 + 0.0j
        for t in range(n_t):
            if t > 0 and cont[t]:
                if t < 2 or not cont[t - 1]:
                    ph = -two_pi * ((k[t, 0] - k[t - 1, 0]) * dx + (k[t, 1] - k[t - 1, 1]) * dy
                                    + (k[t, 2] - k[t - 1, 2]) * dz + (tau[t] - tau[t - 1]) * f)
                    step = complex(np.cos(ph), np.sin(ph))
                e = e * step
            else:
                ph = -two_pi * (k[t, 0] * dx + k[t, 1] * dy + k[t, 2] * dz + tau[t] * f)
                e = complex(np.cos(ph), np.sin(ph))
            out[v, t] = class_sig[c, t] * e
