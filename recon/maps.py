"""Quantitative maps: T1 (inversion recovery), T2 (multi-echo spin echo), ADC and DTI.

All fits are vectorised over voxels. ``signal`` has the varied parameter (TI, TE, b) on
axis 0 and any spatial shape after it; the returned maps have that spatial shape.
Voxels outside ``mask`` (and voxels whose signal is all zero) get 0 in every map.
Arithmetic is float64; maps are returned as float32 (``evecs`` too).

Models
------
- IR: ``|a + b exp(-TI/T1)|`` (magnitude data), fitted by reduced-dimension non-linear
  least squares with polarity restoration (RD-NLS-PR, Barral et al. 2010): for each T1
  on a log grid ``a, b`` are the closed-form least-squares solution; the points before
  the magnitude minimum are negated, with and without the minimum itself, and the best
  of both is kept; T1 is refined by parabolic steps on the residual in log T1.
- MESE: ``s0 exp(-TE/T2)``, log-linear weighted least squares start, then a vectorised
  Levenberg–Marquardt on ``(s0, 1/T2)``; optionally without the first echo (it carries
  no stimulated-echo pathway and is often higher than the rest of the decay).
- ADC: ``s0 exp(-b ADC)``, log-linear weighted least squares with weights ``S^2`` from an
  ordinary fit (Salvador et al. 2005), b in s/mm^2.
- DTI: ``ln S = ln S0 - b g^T D g``, weighted linear least squares as in dipy's
  ``TensorModel(fit_method="WLS")``; FA and MD from the eigenvalues.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mrharmony.errors import ReconError

__all__ = ["fit_adc", "fit_dti", "fit_t1_ir", "fit_t2_epg", "fit_t2_mese"]

#: Voxels per chunk in the T1 grid search (bounds memory to ~50 MB).
_CHUNK = 4096  # voxels per vectorised block


def _prepare(
    signal: Any, values: Any, mask: Any, *, name: str, values_name: str, min_points: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """Flatten ``signal`` to (n, V) float64 over the mask; validate the parameter axis."""
    s = np.asarray(signal)
    v = np.asarray(values, dtype=np.float64).ravel()
    if s.ndim < 1 or s.shape[0] != v.size:
        raise ReconError(
            f"{name}: signal axis 0 has {s.shape[0] if s.ndim else 0} points but "
            f"{values_name} has {v.size}"
        )
    if v.size < min_points:
        raise ReconError(f"{values_name}: need at least {min_points} values, got {v.size}")
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ReconError(f"{values_name}: values must be finite and >= 0, got {v.tolist()}")
    spatial = s.shape[1:]
    flat = np.abs(s.reshape(s.shape[0], -1)).astype(np.float64)
    if mask is None:
        m = np.ones(flat.shape[1], dtype=bool)
    else:
        mask = np.asarray(mask)
        if mask.shape != spatial:
            raise ReconError(f"mask: expected shape {spatial}, got {mask.shape}")
        m = mask.astype(bool).ravel()
    bad = m & ~np.all(np.isfinite(flat), axis=0)
    if bad.any():
        first = np.unravel_index(int(np.flatnonzero(bad)[0]), spatial) if spatial else ()
        raise ReconError(
            f"{name}: {int(bad.sum())} voxels in the mask have NaN/inf signal "
            f"(first at index {tuple(int(i) for i in first)})"
        )
    m &= np.any(flat > 0, axis=0)
    return flat[:, m], v, m, spatial


def _unflatten(values: np.ndarray, m: np.ndarray, spatial: tuple[int, ...]) -> np.ndarray:
    out = np.zeros((m.size, *values.shape[1:]), dtype=np.float32)
    out[m] = values
    return out.reshape(*spatial, *values.shape[1:])


def _ir_residual(
    restored: np.ndarray, ti: np.ndarray, t1: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form ``a, b`` of ``a + b exp(-TI/T1)`` per voxel and the residual sum."""
    n = ti.size
    e = np.exp(-ti[:, None] / t1[None, :])
    s_e, s_ee = e.sum(0), (e**2).sum(0)
    s_d, s_ed = restored.sum(0), (e * restored).sum(0)
    det = n * s_ee - s_e**2
    det = np.where(np.abs(det) > 0, det, 1.0)
    a = (s_ee * s_d - s_e * s_ed) / det
    b = (n * s_ed - s_e * s_d) / det
    rss = np.sum((restored - a[None, :] - b[None, :] * e) ** 2, axis=0)
    return a, b, rss


def fit_t1_ir(
    signal: Any,
    ti_ms: Any,
    *,
    mask: Any = None,
    t1_range_ms: tuple[float, float] = (5.0, 6000.0),
    n_grid: int = 200,
) -> dict[str, np.ndarray]:
    """Fit T1 from magnitude inversion-recovery images (RD-NLS with polarity restoration).

    Parameters
    ----------
    signal : array_like, shape (n_ti, ...)
        Images at each inversion time (magnitude used; complex input is made magnitude).
    ti_ms : array_like, shape (n_ti,)
        Inversion times, ms (any order).
    mask : array_like of bool, shape signal.shape[1:], optional
        Voxels to fit.
    t1_range_ms : (float, float)
        T1 search range, ms.
    n_grid : int
        Log-spaced T1 grid points (200 over the default range: 4.4 % steps), refined by
        four parabolic steps on the exact residual with a shrinking bracket.

    Returns
    -------
    dict
        ``t1_ms``, ``a``, ``b`` (signed: restored signal ``a + b exp(-TI/T1)``, so an
        ideal inversion has ``b = -2 a``), ``rmse`` (same units as the signal).

    Raises
    ------
    ReconError
        Fewer than 3 TIs, shape mismatch, non-finite data in the mask, or a bad range.

    References
    ----------
    J. K. Barral et al., "A robust methodology for in vivo T1 mapping", Magn. Reson.
    Med. 64:1057–1067 (2010).
    """
    d, ti, m, spatial = _prepare(signal, ti_ms, mask, name="fit_t1_ir",
                                 values_name="ti_ms", min_points=3)
    lo, hi = float(t1_range_ms[0]), float(t1_range_ms[1])
    if not 0 < lo < hi or n_grid < 10:
        raise ReconError(f"t1_range_ms: need 0 < low < high and n_grid >= 10, got "
                         f"{t1_range_ms}, {n_grid}")
    order = np.argsort(ti)
    ti, d = ti[order], d[order]
    n = ti.size
    grid = np.geomspace(lo, hi, n_grid)
    log_step = float(np.log(grid[1] / grid[0]))
    basis = np.stack([np.ones((n_grid, n)), np.exp(-ti[None, :] / grid[:, None])], axis=2)
    q, _ = np.linalg.qr(basis)  # (G, n, 2) orthonormal bases
    q_flat = q.transpose(0, 2, 1).reshape(2 * n_grid, n)
    n_vox = d.shape[1]
    t1, a, b, rss = (np.empty(n_vox) for _ in range(4))
    idx_min = np.argmin(d, axis=0)
    points = np.arange(n)[:, None]
    for start in range(0, n_vox, _CHUNK):
        sl = slice(start, start + _CHUNK)
        dc = d[:, sl]
        energy = np.sum(dc**2, axis=0)
        best = None
        for extra in (0, 1):  # negate the points before the minimum, then with it
            cand = np.where(points < (idx_min[sl] + extra)[None, :], -dc, dc)
            proj = (q_flat @ cand).reshape(n_grid, 2, -1)
            res = energy[None, :] - np.sum(proj**2, axis=1)
            log_t1 = np.log(grid[np.argmin(res, axis=0)])
            # Refine log T1 by parabolic steps on the exact residual, shrinking bracket.
            step = log_step
            for _ in range(4):
                r_m, r_0, r_p = (_ir_residual(cand, ti, np.exp(log_t1 + o))[2]
                                 for o in (-step, 0.0, step))
                curv = r_m - 2 * r_0 + r_p
                shift = np.where(curv > 0, 0.5 * (r_m - r_p) / np.where(curv > 0, curv, 1),
                                 0.0)
                log_t1 = log_t1 + np.clip(shift, -1, 1) * step
                step /= 4
            t1_c = np.exp(np.clip(log_t1, np.log(lo), np.log(hi)))
            fit = (t1_c, *_ir_residual(cand, ti, t1_c))
            if best is None:
                best = fit
            else:  # keep, per voxel, the polarity with the lower refined residual
                better = fit[3] < best[3]
                best = tuple(np.where(better, f, o) for f, o in zip(fit, best, strict=True))
        t1[sl], a[sl], b[sl], rss[sl] = best
    return {
        "t1_ms": _unflatten(t1, m, spatial),
        "a": _unflatten(a, m, spatial),
        "b": _unflatten(b, m, spatial),
        "rmse": _unflatten(np.sqrt(rss / n), m, spatial),
    }


def fit_t2_mese(
    signal: Any,
    te_ms: Any,
    *,
    mask: Any = None,
    skip_first_echo: bool = False,
    max_iter: int = 30,
    t2_max_ms: float = 5000.0,
) -> dict[str, np.ndarray]:
    """Fit a mono-exponential T2 decay to multi-echo spin-echo images.

    Parameters
    ----------
    signal : array_like, shape (n_te, ...)
        Echo images (magnitude used).
    te_ms : array_like, shape (n_te,)
        Echo times, ms.
    mask : array_like of bool, optional
        Voxels to fit.
    skip_first_echo : bool
        Leave the first echo out (stimulated echoes make it stand out of the decay).
    max_iter : int
        Levenberg–Marquardt iterations.
    t2_max_ms : float
        Upper bound of T2 (slower decays are reported as this value), ms.

    Returns
    -------
    dict
        ``t2_ms``, ``s0`` (signal extrapolated to TE = 0), ``rmse``.

    Raises
    ------
    ReconError
        Fewer than 2 echoes used, shape mismatch or non-finite data in the mask.
    """
    d, te, m, spatial = _prepare(signal, te_ms, mask, name="fit_t2_mese",
                                 values_name="te_ms", min_points=3 if skip_first_echo else 2)
    if skip_first_echo:
        first = int(np.argmin(te))
        keep = np.arange(te.size) != first
        te, d = te[keep], d[keep]
    r_min = 1.0 / float(t2_max_ms)
    # Log-linear start weighted by S^2 (the variance of log S is sigma^2 / S^2).
    logd = np.log(np.maximum(d, 1e-12 * d.max(initial=1.0)))
    w = d**2
    sw, swt, swtt = w.sum(0), (w * te[:, None]).sum(0), (w * te[:, None] ** 2).sum(0)
    swy, swty = (w * logd).sum(0), (w * te[:, None] * logd).sum(0)
    det = np.where(sw * swtt - swt**2 > 0, sw * swtt - swt**2, 1.0)
    slope = (sw * swty - swt * swy) / det
    r2 = np.maximum(-slope, r_min)
    s0 = np.exp((swy + r2 * swt) / np.maximum(sw, 1e-300))
    lam = np.full(d.shape[1], 1e-3)

    def cost(s0_: np.ndarray, r2_: np.ndarray) -> np.ndarray:
        return np.sum((d - s0_ * np.exp(-np.outer(te, r2_))) ** 2, axis=0)

    current = cost(s0, r2)
    for _ in range(int(max_iter)):
        e = np.exp(-np.outer(te, r2))
        res = d - s0 * e
        j0, j1 = e, -te[:, None] * s0 * e
        h00, h01, h11 = (j0 * j0).sum(0), (j0 * j1).sum(0), (j1 * j1).sum(0)
        g0, g1 = (j0 * res).sum(0), (j1 * res).sum(0)
        a00, a11 = h00 * (1 + lam), h11 * (1 + lam)
        det = a00 * a11 - h01**2
        det = np.where(np.abs(det) > 0, det, np.inf)
        ds0 = (a11 * g0 - h01 * g1) / det
        dr2 = (a00 * g1 - h01 * g0) / det
        s0_new, r2_new = s0 + ds0, np.maximum(r2 + dr2, r_min)
        new = cost(s0_new, r2_new)
        ok = new < current
        s0, r2 = np.where(ok, s0_new, s0), np.where(ok, r2_new, r2)
        current = np.where(ok, new, current)
        lam = np.where(ok, lam / 10, lam * 10)
        if np.all(np.abs(dr2) <= 1e-9 * r2):
            break
    return {
        "t2_ms": _unflatten(1.0 / r2, m, spatial),
        "s0": _unflatten(s0, m, spatial),
        "rmse": _unflatten(np.sqrt(current / te.size), m, spatial),
    }


def _weighted_loglinear(
    design: np.ndarray, logd: np.ndarray, weights: np.ndarray
) -> np.ndarray:
    """Per-voxel weighted least squares: design (n, p), logd/weights (n, V) -> (V, p)."""
    xtwx = np.einsum("np,nv,nq->vpq", design, weights, design)
    xtwy = np.einsum("np,nv,nv->vp", design, weights, logd)
    return np.linalg.solve(xtwx, xtwy[..., None])[..., 0]


def fit_adc(
    signal: Any, bvals_s_mm2: Any, *, mask: Any = None
) -> dict[str, np.ndarray]:
    """Fit the apparent diffusion coefficient, ``S = s0 exp(-b ADC)``.

    Parameters
    ----------
    signal : array_like, shape (n_b, ...)
        Diffusion-weighted images (magnitude used; average directions beforehand for a
        trace-weighted ADC).
    bvals_s_mm2 : array_like, shape (n_b,)
        b-values, s/mm^2 (at least two distinct).
    mask : array_like of bool, optional
        Voxels to fit.

    Returns
    -------
    dict
        ``adc_mm2_s`` (mm^2/s) and ``s0``.

    Raises
    ------
    ReconError
        Fewer than two distinct b-values, shape mismatch or non-finite data.
    """
    d, b, m, spatial = _prepare(signal, bvals_s_mm2, mask, name="fit_adc",
                                values_name="bvals_s_mm2", min_points=2)
    if np.unique(b).size < 2:
        raise ReconError(f"bvals_s_mm2: need two distinct b-values, got {b.tolist()}")
    design = np.stack([np.ones_like(b), -b], axis=1)
    logd = np.log(np.maximum(d, 1e-12 * d.max(initial=1.0)))
    ols = _weighted_loglinear(design, logd, np.ones_like(d))
    pred = np.exp(design @ ols.T)
    params = _weighted_loglinear(design, logd, pred**2)
    return {
        "adc_mm2_s": _unflatten(params[:, 1], m, spatial),
        "s0": _unflatten(np.exp(params[:, 0]), m, spatial),
    }


def fit_dti(
    signal: Any, bvals_s_mm2: Any, bvecs: Any, *, mask: Any = None
) -> dict[str, np.ndarray]:
    """Fit a diffusion tensor per voxel (weighted linear least squares).

    Parameters
    ----------
    signal : array_like, shape (n, ...)
        Diffusion-weighted images including at least one b = 0.
    bvals_s_mm2 : array_like, shape (n,)
        b-values, s/mm^2.
    bvecs : array_like, shape (n, 3)
        Gradient directions (normalised here; ignored where b = 0), in the image axes.
    mask : array_like of bool, optional
        Voxels to fit.

    Returns
    -------
    dict
        ``fa`` (0–1), ``md_mm2_s``, ``evals`` (..., 3) descending, mm^2/s, ``evecs``
        (..., 3, 3) with eigenvector ``i`` in column ``i``, ``tensor_mm2_s`` (..., 6) in
        the order Dxx, Dxy, Dxz, Dyy, Dyz, Dzz, and ``s0``.

    Raises
    ------
    ReconError
        Fewer than 6 non-collinear directions with b > 0, no b = 0 image, or shape
        mismatch.
    """
    d, b, m, spatial = _prepare(signal, bvals_s_mm2, mask, name="fit_dti",
                                values_name="bvals_s_mm2", min_points=7)
    g = np.asarray(bvecs, dtype=np.float64)
    if g.shape != (b.size, 3):
        raise ReconError(f"bvecs: expected shape ({b.size}, 3), got {g.shape}")
    norm = np.linalg.norm(g, axis=1)
    dw = b > 0
    if np.any(dw & (norm < 1e-6)):
        raise ReconError("bvecs: a diffusion-weighted volume (b > 0) has a zero direction")
    g = np.where(norm[:, None] > 1e-6, g / np.where(norm > 1e-6, norm, 1)[:, None], 0.0)
    gx, gy, gz = g.T
    design = np.stack([
        -b * gx * gx, -2 * b * gx * gy, -2 * b * gx * gz,
        -b * gy * gy, -2 * b * gy * gz, -b * gz * gz, np.ones_like(b),
    ], axis=1)
    if np.linalg.matrix_rank(design) < 7:
        raise ReconError(
            "bvecs/bvals_s_mm2: the scheme cannot determine a tensor (need a b = 0 image "
            "and at least 6 non-collinear directions with b > 0)"
        )
    logd = np.log(np.maximum(d, 1e-12 * d.max(initial=1.0)))
    ols = _weighted_loglinear(design, logd, np.ones_like(d))
    pred = np.exp(design @ ols.T)
    p = _weighted_loglinear(design, logd, pred**2)
    tensor = np.empty((p.shape[0], 3, 3))
    tensor[:, 0, 0], tensor[:, 0, 1], tensor[:, 0, 2] = p[:, 0], p[:, 1], p[:, 2]
    tensor[:, 1, 1], tensor[:, 1, 2], tensor[:, 2, 2] = p[:, 3], p[:, 4], p[:, 5]
    tensor[:, 1, 0], tensor[:, 2, 0], tensor[:, 2, 1] = p[:, 1], p[:, 2], p[:, 4]
    evals, evecs = np.linalg.eigh(tensor)
    evals, evecs = evals[:, ::-1], evecs[:, :, ::-1]
    md = evals.mean(axis=1)
    num = np.sqrt(np.sum((evals - md[:, None]) ** 2, axis=1))
    den = np.sqrt(np.sum(evals**2, axis=1))
    fa = np.sqrt(1.5) * num / np.where(den > 0, den, 1.0)
    return {
        "fa": _unflatten(np.clip(fa, 0.0, 1.0), m, spatial),
        "md_mm2_s": _unflatten(md, m, spatial),
        "evals": _unflatten(evals, m, spatial),
        "evecs": _unflatten(evecs, m, spatial),
        "tensor_mm2_s": _unflatten(p[:, :6], m, spatial),
        "s0": _unflatten(np.exp(p[:, 6]), m, spatial),
    }


def fit_t2_epg(
    signal: Any,
    te_ms: Any,
    *,
    mask: Any = None,
    refocusing_flip_deg: float = 180.0,
    excitation_flip_deg: float = 90.0,
    time_bw_product: float | None = None,
    apodization: float = 0.5,
    t1_ms: float = 1000.0,
    t2_range_ms: tuple[float, float] = (5.0, 3000.0),
    b1_range: tuple[float, float] = (0.5, 1.5),
    n_t2: int = 160,
    n_b1: int = 51,
) -> dict[str, np.ndarray]:
    """Fit T2 and B1 to multi-echo spin-echo (CPMG) images with a stimulated-echo model.

    Every voxel's echo train is matched to a dictionary of extended-phase-graph trains
    (:func:`mrharmony.recon.epg.cpmg_echo_train`; with the slice profile of the pulses
    when ``time_bw_product`` is given) over a grid of T2 and relative B1, by the largest
    normalised inner product; T2 is refined by a parabola through the match scores of its
    grid neighbours. Unlike :func:`fit_t2_mese`, the stimulated echoes that refocusing
    pulses below 180° add to the second and later echoes are modelled rather than fitted as
    slower decay (StimFit, EMC).

    Parameters
    ----------
    signal : array_like, shape (n_te, ...)
        Echo images (magnitude used), the echoes of one CPMG train.
    te_ms : array_like, shape (n_te,)
        Echo times, ms: ``esp, 2 esp, ..., n esp`` (uniform, first echo at one spacing).
    mask : array_like of bool, optional
        Voxels to fit.
    refocusing_flip_deg, excitation_flip_deg : float
        Nominal flip angles, degrees.
    time_bw_product : float or None
        Time-bandwidth product of the slice-selective sinc pulses (the slice profile is
        modelled); None: non-selective (no profile).
    apodization : float
        Sinc window parameter of the pulses (0.5: Hann, pypulseq's default).
    t1_ms : float
        T1 assumed for the stimulated-echo pathways, ms (weak influence).
    t2_range_ms : (float, float)
        T2 grid range, ms (log-spaced).
    b1_range : (float, float)
        Relative B1 grid range.
    n_t2, n_b1 : int
        Grid sizes.

    Returns
    -------
    dict
        ``t2_ms``, ``b1`` (relative transmit field), ``s0`` (the train's amplitude for an
        equilibrium magnetisation), ``rmse`` (signal units).

    Raises
    ------
    ReconError
        Fewer than 3 echoes, echo times not ``esp, 2 esp, ...``, shape mismatch,
        non-finite data in the mask, or a bad grid.
    """
    from mrharmony.recon.epg import cpmg_echo_train

    d, te, m, spatial = _prepare(signal, te_ms, mask, name="fit_t2_epg",
                                 values_name="te_ms", min_points=3)
    order = np.argsort(te)
    te, d = te[order], d[order]
    esp = float(te[0])
    if not np.allclose(te, esp * np.arange(1, te.size + 1), rtol=1e-3, atol=1e-3):
        raise ReconError(f"fit_t2_epg: echo times must be esp, 2 esp, ... (one CPMG train), "
                         f"got {np.round(te, 3).tolist()} ms")
    lo, hi = (float(v) for v in t2_range_ms)
    b_lo, b_hi = (float(v) for v in b1_range)
    if not (0 < lo < hi and 0 < b_lo < b_hi and n_t2 >= 10 and n_b1 >= 2):
        raise ReconError(f"fit_t2_epg: bad grid t2_range_ms={t2_range_ms}, b1_range={b1_range}, "
                         f"n_t2={n_t2}, n_b1={n_b1}")
    t2_grid = np.geomspace(lo, hi, n_t2)
    b1_grid = np.linspace(b_lo, b_hi, n_b1)
    tt, bb = np.meshgrid(t2_grid, b1_grid, indexing="ij")  # (n_t2, n_b1)
    atoms = cpmg_echo_train(tt.ravel(), bb.ravel(), esp_ms=esp, n_echoes=te.size,
                            t1_ms=t1_ms, refocusing_flip_deg=refocusing_flip_deg,
                            excitation_flip_deg=excitation_flip_deg,
                            time_bw_product=time_bw_product, apodization=apodization)
    norms = np.linalg.norm(atoms, axis=1)
    unit = atoms / norms[:, None]  # (n_atoms, n_te)
    n_vox = d.shape[1]
    t2 = np.empty(n_vox)
    b1 = np.empty(n_vox)
    s0 = np.empty(n_vox)
    rss = np.empty(n_vox)
    log_step = float(np.log(t2_grid[1] / t2_grid[0]))
    chunk = max(64, 2**23 // unit.shape[0])  # score blocks of ~64 MB
    for start in range(0, n_vox, chunk):
        dc = d[:, start:start + chunk]
        score = unit @ dc  # (n_atoms, chunk): projection of the data on each atom
        best = np.argmax(score, axis=0)
        i_t2, i_b1 = np.unravel_index(best, tt.shape)
        cols = np.arange(dc.shape[1])
        sc = score.reshape(n_t2, n_b1, -1)
        inner = (i_t2 > 0) & (i_t2 < n_t2 - 1)
        im, ip = np.clip(i_t2 - 1, 0, n_t2 - 1), np.clip(i_t2 + 1, 0, n_t2 - 1)
        s_m, s_0, s_p = sc[im, i_b1, cols], sc[i_t2, i_b1, cols], sc[ip, i_b1, cols]
        curv = s_m - 2 * s_0 + s_p
        shift = np.where(inner & (curv < 0), 0.5 * (s_m - s_p) / np.where(curv < 0, curv, -1),
                         0.0)
        t2[start:start + dc.shape[1]] = t2_grid[i_t2] * np.exp(np.clip(shift, -0.5, 0.5)
                                                                 * log_step)
        b1[start:start + dc.shape[1]] = b1_grid[i_b1]
        proj = s_0
        s0[start:start + dc.shape[1]] = proj / norms[best]
        rss[start:start + dc.shape[1]] = np.maximum(np.sum(dc**2, axis=0) - proj**2, 0.0)
    return {
        "t2_ms": _unflatten(t2, m, spatial),
        "b1": _unflatten(b1, m, spatial),
        "s0": _unflatten(s0, m, spatial),
        "rmse": _unflatten(np.sqrt(rss / te.size), m, spatial),
    }
