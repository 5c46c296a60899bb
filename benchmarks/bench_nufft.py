"""NUFFT adjoint benchmark: mrharmony vs finufft (direct call) vs SigPy, CPU.

Problem (issue 5): 256 radial spokes x 512 samples x 8 coils onto a 256 x 256 image.
Every method's error is measured against a finufft reference at eps = 1e-12 (after the
sqrt(N^2) scale, see :mod:`mrharmony.recon.nufft`), so speed is compared at stated
accuracy. Rows:

- ``finufft``: ``finufft.nufft2d1`` called directly (plans, sets points, executes).
- ``ours one-shot``: :func:`mrharmony.recon.nufft.nufft_adjoint` (the same work).
- ``ours planned``: :class:`~mrharmony.recon.nufft.NUFFT` reused (points set once), as in
  CG-SENSE and gridding of many repetitions.
- ``ours Toeplitz normal``: one ``A^H W A`` application (what each CG-SENSE iteration
  costs) against ``forward`` + ``adjoint``.
- ``sigpy``: ``sigpy.nufft_adjoint`` (Kaiser–Bessel, oversampling 1.25, width 4).
- CG-SENSE (20 iterations, 10 with ``--quick``; Pipe–Menon weights): ours (Toeplitz,
  complex64) vs SigPy ``SenseRecon`` with the same weights.

Run: ``python benchmarks/bench_nufft.py [--quick]``. Reference figure on an idle
2-core machine for the finufft call: 0.07–0.17 s.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import numpy as np


def _best(fn: Callable[[], object], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    import finufft
    import sigpy

    from mrharmony.recon.nufft import NUFFT, nufft_adjoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--spokes", type=int, default=256)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--n", type=int, default=256, help="image size")
    args = parser.parse_args(argv)
    repeats = 2 if args.quick else 5

    n, rng = args.n, np.random.default_rng(0)
    angles = np.pi * np.arange(args.spokes) / args.spokes
    r = (np.arange(args.samples) - args.samples // 2) * n / args.samples
    coords = np.stack([np.outer(np.cos(angles), r).ravel(),
                       np.outer(np.sin(angles), r).ravel()], axis=1)
    m = coords.shape[0]
    data = (rng.standard_normal((args.coils, m)) + 1j * rng.standard_normal((args.coils, m)))
    xr, yr = 2 * np.pi * coords[:, 0] / n, 2 * np.pi * coords[:, 1] / n
    ref = finufft.nufft2d1(xr, yr, data, (n, n), eps=1e-12, isign=1) / n

    def err(img: np.ndarray) -> float:
        return float(np.linalg.norm(img - ref) / np.linalg.norm(ref))

    rows: list[tuple[str, float, float]] = []
    for eps in (1e-6, 1e-3):
        out = finufft.nufft2d1(xr, yr, data, (n, n), eps=eps, isign=1) / n
        t = _best(lambda eps=eps: finufft.nufft2d1(xr, yr, data, (n, n), eps=eps, isign=1),
                  repeats)
        rows.append((f"finufft eps={eps:g} (c128)", t, err(out)))
        out = nufft_adjoint(data, coords, (n, n), eps=eps)
        t = _best(lambda eps=eps: nufft_adjoint(data, coords, (n, n), eps=eps), repeats)
        rows.append((f"ours one-shot eps={eps:g} (c128)", t, err(out)))
        for dtype in (np.complex128, np.complex64):
            op = NUFFT(coords, (n, n), eps=eps, dtype=dtype)
            d = data.astype(dtype)
            out = op.adjoint(d)
            t = _best(lambda op=op, d=d: op.adjoint(d), repeats)
            rows.append((f"ours planned eps={eps:g} ({np.dtype(dtype).name})", t, err(out)))
    out = sigpy.nufft_adjoint(data, coords, (args.coils, n, n))
    t = _best(lambda: sigpy.nufft_adjoint(data, coords, (args.coils, n, n)), repeats)
    rows.append(("sigpy default (c128)", t, err(out)))
    d64 = data.astype(np.complex64)
    out = sigpy.nufft_adjoint(d64, coords, (args.coils, n, n))
    t = _best(lambda: sigpy.nufft_adjoint(d64, coords, (args.coils, n, n)), repeats)
    rows.append(("sigpy default (c64)", t, err(out)))

    t_finufft = rows[0][1]
    print(f"NUFFT adjoint: {args.spokes} spokes x {args.samples} samples x {args.coils} coils "
          f"-> {n}x{n}; best of {repeats}")
    print(f"{'method':40s} {'time s':>8s} {'rel.err':>9s} {'vs finufft':>10s}")
    for name, t, e in rows:
        print(f"{name:40s} {t:8.3f} {e:9.1e} {t_finufft / t:9.2f}x")

    # Normal operator per CG-SENSE iteration: Toeplitz vs forward + adjoint (planned).
    op = NUFFT(coords, (n, n), eps=1e-6, dtype=np.complex64)
    w = np.ones(m)
    kernel = op.toeplitz_kernel(w)
    img = (rng.standard_normal((args.coils, n, n)) + 0j).astype(np.complex64)
    op.adjoint(op.forward(img))
    t_fa = _best(lambda: op.adjoint(op.forward(img)), repeats)
    t_tp = _best(lambda: op.normal_toeplitz(img, kernel), repeats)
    print(f"normal operator A^H A, {args.coils} coils: forward+adjoint {t_fa:.3f} s, "
          f"Toeplitz {t_tp:.3f} s ({t_fa / t_tp:.2f}x)")

    # Non-Cartesian CG-SENSE, density-weighted: ours vs SigPy SenseRecon.
    n_iter = 10 if args.quick else 20
    import sigpy.mri.app as mr_app

    from mrharmony.recon.dcf import pipe_menon_dcf
    from mrharmony.recon.noncartesian import cg_sense

    x, y = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    maps = np.stack([np.exp(-((x - np.cos(a)) ** 2 + (y - np.sin(a)) ** 2)) * np.exp(1j * a)
                     for a in 2 * np.pi * np.arange(args.coils) / args.coils])
    maps = (maps / np.sqrt(np.sum(np.abs(maps) ** 2, axis=0))).astype(np.complex64)
    obj = ((x / 0.8) ** 2 + (y / 0.9) ** 2 < 1).astype(np.complex64)
    ksp = NUFFT(coords, (n, n)).forward(maps * obj)
    t0 = time.perf_counter()
    w = pipe_menon_dcf(coords, (n, n))
    t_dcf = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = cg_sense(NUFFT(coords, (n, n)), ksp, maps, weights=w, max_iter=n_iter, tol=0)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = mr_app.SenseRecon(ksp, maps, weights=w, coord=coords, max_iter=n_iter,
                            show_pbar=False).run()
    t_sigpy = time.perf_counter() - t0
    diff = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    print(f"CG-SENSE {n_iter} it, {args.coils} coils {n}x{n}: ours {t_ours:.2f} s "
          f"(+ Pipe-Menon DCF {t_dcf:.2f} s), sigpy SenseRecon {t_sigpy:.2f} s "
          f"({t_sigpy / t_ours:.1f}x); "
          f"NRMSE ours vs sigpy {diff:.1e}, ours vs object "
          f"{np.linalg.norm(ours - obj) / np.linalg.norm(obj):.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
