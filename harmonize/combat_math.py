"""ComBat numerics on feature chunks: design fit, sufficient statistics, empirical Bayes.

Part of :mod:`mrharmony.harmonize.combat` (split out to keep modules small). Every
function is vectorised over the features of a chunk; loops run over batches only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

__all__ = ["Design", "HarmonizeWarning", "adjust_chunk", "adjust_linear", "chunk_stats",
           "eb_mean_only", "eb_nonparametric", "eb_parametric", "linear_coefs"]


class HarmonizeWarning(UserWarning):
    """A harmonization fell back to a simpler model for part of the data."""


# --------------------------------------------------------------------------- chunk maths


def solve_design(Y: np.ndarray, M: np.ndarray, D: np.ndarray) -> np.ndarray:
    """Least-squares coefficients (k x c) per feature using only observed entries."""
    k = D.shape[1]
    B = np.empty((k, Y.shape[1]))
    full = M.all(axis=0)
    if full.all():
        return np.linalg.solve(D.T @ D, D.T @ Y)
    if full.any():
        G = D.T @ D
        B[:, full] = np.linalg.solve(G, D.T @ Y[:, full])
    if not full.all():
        part = ~full
        Mp = M[:, part].astype(np.float64)
        Yp = np.where(M[:, part], Y[:, part], 0.0)
        G = np.einsum("nf,ni,nj->fij", Mp, D, D, optimize=True)
        rhs = (D.T @ Yp).T[:, :, None]
        B[:, part] = (np.linalg.pinv(G) @ rhs)[:, :, 0].T
    return B


class Design:
    """The design of one fit and its small cross-products, shared by all feature chunks.

    ``D = [batch indicators (reference column all ones), covariates]``; ``Z`` the plain
    batch indicators; ``WZ = [Z, Z * x_1, ..., Z * x_q]`` (n, B (1 + q)) so that one matmul
    ``WZ.T @ Y`` gives every per-batch sum a complete-data chunk needs.
    """

    def __init__(self, D: np.ndarray, Z: np.ndarray, ref: int | None) -> None:
        self.D, self.Z, self.ref = D, Z, ref
        self.n_batch = Z.shape[1]
        self.codes = Z.argmax(axis=1)
        x = D[:, self.n_batch:]
        self.q = x.shape[1]
        B, q = self.n_batch, self.q
        self.WZ = np.hstack([Z, (Z[:, :, None] * x[:, None, :]).reshape(len(Z), B * q)])
        self.G = D.T @ D
        rows = np.ones(len(Z), bool) if ref is None else Z[:, ref] > 0
        self.G_var = D[rows].T @ D[rows]
        self.var_rows = rows
        self.n_b = Z.sum(axis=0)
        self.x_sum = Z.T @ x  # (B, q)
        self.x_gram = np.einsum("nb,ni,nj->bij", Z, x, x)  # (B, q, q)


def _buffer(work: np.ndarray | None, shape: tuple[int, int]) -> np.ndarray | None:
    """A C-contiguous (n, c) view of a reusable flat work buffer (None: allocate)."""
    size = shape[0] * shape[1]
    if work is None or work.size < size:
        return None
    return work[:size].reshape(shape)


def complete_stats(Y: np.ndarray, ds: Design,
                   work: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Pass 1 for a chunk without missing values, from per-batch sufficient statistics.

    Data are shifted by their first row (exact for a constant feature, and it keeps the
    sums of squares free of cancellation); then ``WZ.T @ Y`` and ``Z.T @ Y**2`` give the
    design fit, the pooled variance and the batch moments of the standardised data.
    ``work`` is an optional flat float64 buffer reused across chunks (fresh pages are
    expensive to fault in).
    """
    B, q, n = ds.n_batch, ds.q, Y.shape[0]
    shift = np.asarray(Y[0], dtype=np.float64)
    T = np.subtract(Y, shift, out=_buffer(work, Y.shape), dtype=np.float64,
                    casting="unsafe")
    S = ds.WZ.T @ T  # (B (1 + q), c)
    S1, Sx = S[:B], S[B:].reshape(B, q, T.shape[1])
    T *= T
    S2 = ds.Z.T @ T  # (B, c)
    del T
    DtY = np.vstack([S1, Sx.sum(axis=0)])
    if ds.ref is not None:
        DtY[ds.ref] = S1.sum(axis=0)
    B_hat = np.linalg.solve(ds.G, DtY)
    # residual sum of squares on the variance rows: sum y^2 - 2 b'D'y + b'G b
    if ds.ref is None:
        rss = S2.sum(axis=0) - np.einsum("kc,kc->c", B_hat, DtY)
        n_var = float(n)
    else:
        r = ds.ref
        Dty_r = np.zeros_like(DtY)
        Dty_r[r] = S1[r]
        Dty_r[B:] = Sx[r]
        rss = (S2[r] - 2 * np.einsum("kc,kc->c", B_hat, Dty_r)
               + np.einsum("kc,kl,lc->c", B_hat, ds.G_var, B_hat))
        n_var = float(ds.n_b[r])
    var_pooled = np.maximum(rss, 0.0) / n_var
    tot = S2.sum(axis=0)
    degenerate = (tot == 0) | (var_pooled <= 1e-20 * tot / n)
    var_pooled = np.where(degenerate, 1.0, var_pooled)
    n_obs = np.repeat(ds.n_b[:, None], Y.shape[1], axis=1)
    if ds.ref is None:
        grand = (ds.n_b[:, None] / n * B_hat[:B]).sum(axis=0)
    else:
        grand = B_hat[ds.ref].copy()
    beta = B_hat[B:]
    # u = y - x beta within batch b: sum u and sum u^2 from the sufficient statistics
    su = S1 - ds.x_sum @ beta
    su2 = (S2 - 2 * np.einsum("bjc,jc->bc", Sx, beta)
           + np.einsum("jc,bjk,kc->bc", beta, ds.x_gram, beta))
    nb = ds.n_b[:, None]
    xbar = (su / nb - grand) / np.sqrt(var_pooled)
    ss = np.maximum(su2 - su**2 / nb, 0.0) / var_pooled
    grand = grand + shift
    B_hat[:B] += shift if ds.ref is None else 0.0
    if ds.ref is not None:
        B_hat[ds.ref] += shift
    return {"B_hat": B_hat, "grand_mean": grand, "var_pooled": var_pooled, "n_obs": n_obs,
            "xbar": xbar, "ss": ss, "degenerate": degenerate}


def chunk_stats(Y: np.ndarray, ds: Design,
                work: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Pass 1 on one feature chunk: design fit, pooled variance, batch moments of s."""
    Y = np.asarray(Y)
    M = np.isfinite(Y)
    if M.all():
        return complete_stats(Y, ds, work)
    D, n_batch, Z, ref = ds.D, ds.n_batch, ds.Z, ds.ref
    Y = np.asarray(Y, dtype=np.float64)
    n_obs = Z.T @ M.astype(np.float64)  # (B, c)
    n_feat = M.sum(axis=0).astype(np.float64)
    Y0 = np.where(M, Y, 0.0)
    B_hat = solve_design(Y0, M, D)
    if ref is None:
        w = n_obs / np.maximum(n_obs.sum(axis=0), 1.0)
        grand = (w * B_hat[:n_batch]).sum(axis=0)
    else:
        grand = B_hat[ref].copy()
    R = Y0 - D @ B_hat
    R[~M] = 0.0
    rows = ds.var_rows
    n_var = n_feat if ref is None else n_obs[ref]
    var_pooled = np.einsum("ij,ij->j", R[rows], R[rows]) / np.maximum(n_var, 1.0)
    with np.errstate(invalid="ignore"):
        ptp = (np.where(M, Y, -np.inf).max(axis=0) - np.where(M, Y, np.inf).min(axis=0))
    scale2 = np.einsum("ij,ij->j", Y0, Y0) / np.maximum(n_feat, 1.0)
    degenerate = (~(ptp > 0)) | (n_feat < 2) | (var_pooled <= 1e-24 * scale2)
    var_pooled = np.where(degenerate, 1.0, var_pooled)
    # standardised data: Y - grand - covariate part = residual + batch part - grand
    R += D[:, :n_batch] @ B_hat[:n_batch]
    R -= grand
    R /= np.sqrt(var_pooled)
    R[~M] = 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        xbar = (Z.T @ R) / n_obs
    R -= np.nan_to_num(xbar)[ds.codes]
    R[~M] = 0.0
    ss = Z.T @ (R * R)
    return {"B_hat": B_hat, "grand_mean": grand, "var_pooled": var_pooled, "n_obs": n_obs,
            "xbar": xbar, "ss": ss, "degenerate": degenerate}


def linear_coefs(p: dict[str, np.ndarray], ref: int | None) -> tuple[np.ndarray, ...]:
    """Per-batch affine map of a chunk: ``out = A[b] * y + C[b] + x @ Bx[b]``.

    From ``out = (y - m - gamma* sd) / sqrt(delta*) + m`` with ``m = grand + x beta``;
    the reference batch and degenerate features get ``A = 1, C = 0, Bx = 0`` so they pass
    through bit-for-bit.
    """
    sd = np.sqrt(p["var_pooled"])
    A = 1.0 / np.sqrt(p["delta_star"])
    C = (1.0 - A) * p["grand_mean"] - p["gamma_star"] * sd * A
    Bx = (1.0 - A)[:, None, :] * p["beta"][None, :, :]  # (B, q, c)
    keep = p["degenerate"]
    A[:, keep], C[:, keep], Bx[:, :, keep] = 1.0, 0.0, 0.0
    if ref is not None:
        A[ref], C[ref], Bx[ref] = 1.0, 0.0, 0.0
    return A, C, Bx.reshape(-1, A.shape[1])


def adjust_linear(Y: np.ndarray, Z: np.ndarray, WX: np.ndarray, A: np.ndarray, C: np.ndarray,
                  Bx: np.ndarray, out: np.ndarray | None = None,
                  work: np.ndarray | None = None) -> np.ndarray:
    """Pass 2 on one feature chunk, as three matmuls (NaN stays where it was).

    ``work``: optional flat float64 buffer reused across chunks for the matmul results.
    """
    buf = _buffer(work, Y.shape)
    res = np.multiply(Y, np.matmul(Z, A, out=buf), out=out, dtype=np.float64,
                      casting="unsafe")
    res += np.matmul(Z, C, out=buf)
    if WX.shape[1]:
        res += np.matmul(WX, Bx, out=buf)
    return res


def adjust_chunk(Y: np.ndarray, cov: np.ndarray, codes: np.ndarray, p: dict[str, np.ndarray],
                  ref: int | None, out: np.ndarray | None = None,
                  offset: np.ndarray | None = None) -> np.ndarray:
    """Pass 2 on one feature chunk: standardise, remove batch effects, restore.

    ``offset`` (n, c) is added to the fitted mean (the subject random effects of
    :class:`~mrharmony.harmonize.combat_variants.LongitudinalComBat`).
    """
    Y = np.asarray(Y, dtype=np.float64)
    mean = p["grand_mean"][None, :] + cov @ p["beta"]
    if offset is not None:
        mean = mean + offset
    sd = np.sqrt(p["var_pooled"])[None, :]
    res = (Y - mean) / sd
    res -= p["gamma_star"][codes]
    res /= np.sqrt(p["delta_star"][codes])
    res *= sd
    res += mean
    keep = p["degenerate"]
    if keep.any():
        res[:, keep] = Y[:, keep]
    if ref is not None:
        rows = codes == ref
        if rows.any():
            res[rows] = Y[rows]
    if out is not None:
        out[...] = res
        return out
    return res


# --------------------------------------------------------------------------- empirical Bayes


def priors(g_hat: np.ndarray, d_hat: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per-batch hyper-parameters from features (NaN entries ignored)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        g_bar = np.nanmean(g_hat, axis=1)
        t2 = np.nanvar(g_hat, axis=1, ddof=1)
        m = np.nanmean(d_hat, axis=1)
        s2 = np.nanvar(d_hat, axis=1, ddof=1)
        a = (2 * s2 + m**2) / s2
        b = (m * s2 + m**3) / s2
    return g_bar, t2, a, b


def eb_parametric(g_hat: np.ndarray, d_hat: np.ndarray, n: np.ndarray, xbar: np.ndarray,
                   ss: np.ndarray, rows: Sequence[int], *, conv: float,
                   max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Parametric EB fixed point of ``sva::it.sol``, vectorised over features."""
    g_bar, t2, a, b = priors(g_hat, d_hat)
    g_star = np.zeros_like(g_hat)
    d_star = np.ones_like(d_hat)
    for i in rows:
        gh = np.nan_to_num(g_hat[i])
        xb = np.nan_to_num(xbar[i])
        prior_d = b[i] / (a[i] - 1) if a[i] > 1 else 1.0
        g_old = gh.copy()
        d_old = np.where(np.isfinite(d_hat[i]), d_hat[i], prior_d)
        for _ in range(max_iter):
            g_new = (t2[i] * n[i] * gh + d_old * g_bar[i]) / (t2[i] * n[i] + d_old)
            sum2 = ss[i] + n[i] * (xb - g_new) ** 2
            d_new = (0.5 * sum2 + b[i]) / (n[i] / 2.0 + a[i] - 1.0)
            with np.errstate(divide="ignore", invalid="ignore"):
                rg = np.abs(g_new - g_old) / g_old
                rd = np.abs(d_new - d_old) / d_old
            change = max(np.max(rg, initial=-np.inf, where=np.isfinite(rg)),
                         np.max(rd, initial=-np.inf, where=np.isfinite(rd)))
            g_old, d_old = g_new, d_new
            if not change > conv:
                break
        else:
            warnings.warn(f"ComBat: parametric EB for batch index {i} did not converge in "
                          f"{max_iter} iterations (change {change:.3g} > {conv:g})",
                          HarmonizeWarning, stacklevel=3)
        g_star[i], d_star[i] = g_old, d_old
    return g_star, d_star


def eb_mean_only(g_hat: np.ndarray, rows: Sequence[int]) -> np.ndarray:
    """``sva`` mean-only shrinkage: postmean with n = 1 and d = 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        g_bar = np.nanmean(g_hat, axis=1)
        t2 = np.nanvar(g_hat, axis=1, ddof=1)
    g_star = np.zeros_like(g_hat)
    for i in rows:
        gh = np.where(np.isfinite(g_hat[i]), g_hat[i], g_bar[i])
        g_star[i] = (t2[i] * gh + g_bar[i]) / (t2[i] + 1.0)
    return g_star


def eb_nonparametric(g_hat: np.ndarray, d_hat: np.ndarray, n: np.ndarray, xbar: np.ndarray,
                      ss: np.ndarray, rows: Sequence[int], *,
                      chunk_elems: int = 4_000_000) -> tuple[np.ndarray, np.ndarray]:
    """``sva::int.eprior`` (leave-one-feature-out), in log space, chunked over features."""
    p = g_hat.shape[1]
    g_star = np.zeros_like(g_hat)
    d_star = np.ones_like(d_hat)
    for i in rows:
        donors = np.flatnonzero(np.isfinite(g_hat[i]) & np.isfinite(d_hat[i]))
        g, d = g_hat[i, donors], d_hat[i, donors]
        logd = np.log(d)
        step = max(1, chunk_elems // max(donors.size, 1))
        for s0 in range(0, p, step):
            f = np.arange(s0, min(p, s0 + step))
            nf, xf = n[i, f][:, None], np.nan_to_num(xbar[i, f])[:, None]
            logw = -0.5 * nf * logd[None, :] - (ss[i, f][:, None]
                                                + nf * (xf - g[None, :]) ** 2) / (2 * d)
            self_pos = np.searchsorted(donors, f)
            hit = (self_pos < donors.size) & (donors[np.minimum(self_pos, donors.size - 1)] == f)
            logw[np.flatnonzero(hit), self_pos[hit]] = -np.inf
            logw -= logw.max(axis=1, keepdims=True)
            w = np.exp(logw)
            wsum = w.sum(axis=1)
            g_star[i, f] = (w @ g) / wsum
            d_star[i, f] = (w @ d) / wsum
    return g_star, d_star
