"""ComBat speed and peak memory: mrharmony vs neuroCombat 0.2.12 and neuroHarmonize 2.5.2.

Each (method, size) runs in its own subprocess: the data are generated there (column
blocks, no full-size temporaries), then the harmonization call is timed and the peak
resident memory (``ru_maxrss``) is read at the end. We report the peak RSS, the RSS
before the call (Python + libraries + input) and their difference ("extra"), next to the
input size. Parametric EB, no covariates, 10 sites.

    python benchmarks/bench_combat.py --quick      # ~1,000 x 4,000 (seconds)
    python benchmarks/bench_combat.py              # 2,000 x 10,000 and the Dask path
    python benchmarks/bench_combat.py --full       # 5,000 x 20,000 and 2,000 x 100,000

The Dask case builds a lazy (n x p) array whose feature chunks are generated on demand,
fits ComBat in two passes and streams the harmonized chunks into an HDF5 file, so the
data never sit in memory at once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

N_SITES = 10


def make_data(n: int, p: int, seed: int = 0, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Samples x features float64 with additive and multiplicative site effects."""
    site = np.arange(n) % N_SITES
    X = np.empty((n, p))
    for s in range(0, p, block):
        rng = np.random.default_rng([seed, s])
        c = min(p, s + block) - s
        shift = rng.normal(0, 1, (N_SITES, c))
        scale = rng.uniform(0.7, 1.4, (N_SITES, c))
        X[:, s:s + c] = rng.standard_normal((n, c)) * scale[site] + shift[site] + 5.0
    return X, site


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(method: str, n: int, p: int) -> dict:
    """Run one method in this process; returns timing and memory figures."""
    if method == "ours-dask":
        return _worker_dask(n, p)
    import pandas as pd

    X, site = make_data(n, p)
    if method == "neuroCombat":
        from neuroCombat import neuroCombat

        covars = pd.DataFrame({"site": site})
    elif method == "neuroHarmonize":
        from neuroHarmonize import harmonizationLearn

        covars = pd.DataFrame({"SITE": site})
    else:
        from mrharmony.harmonize.combat import ComBat
    before = _current_rss_mib()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if method == "neuroCombat":
            out = neuroCombat(X.T, covars, "site")["data"].T
        elif method == "neuroHarmonize":
            out = harmonizationLearn(X, covars)[1]
        elif method == "ours":
            out = ComBat().fit_transform(X, site)
        else:  # ours-inplace
            out = ComBat(copy=False).fit_transform(X, site)
    wall = time.perf_counter() - t0
    checksum = float(np.nansum(out[:, :50]))
    return {"wall_s": wall, "peak_mib": _rss_mib(), "before_mib": before,
            "input_mib": n * p * 8 / 2**20, "checksum": checksum}


def _worker_dask(n: int, p: int) -> dict:
    import dask
    import dask.array as da
    import h5py

    from mrharmony.harmonize.combat import ComBat

    chunk = max(1, min(p, 2**21 // n))  # 16 MiB float64 blocks
    site = np.arange(n) % N_SITES

    def gen(block_info=None):
        _, (c0, c1) = block_info[None]["array-location"]
        rng = np.random.default_rng([0, c0])
        c = c1 - c0
        shift = rng.normal(0, 1, (N_SITES, c))
        scale = rng.uniform(0.7, 1.4, (N_SITES, c))
        return rng.standard_normal((n, c)) * scale[site] + shift[site] + 5.0

    X = da.map_blocks(gen, chunks=((n,), tuple(min(chunk, p - s)
                                               for s in range(0, p, chunk))),
                      dtype=np.float64)
    before = _current_rss_mib()
    with tempfile.TemporaryDirectory() as tmp, dask.config.set(scheduler="threads",
                                                               num_workers=2):
        t0 = time.perf_counter()
        model = ComBat().fit(X, site)
        out = model.transform(X, site)
        with h5py.File(os.path.join(tmp, "out.h5"), "w") as fh:
            dset = fh.create_dataset("x", shape=(n, p), dtype="f8", chunks=(n, chunk))
            da.store(out, dset, lock=True)
        wall = time.perf_counter() - t0
        with h5py.File(os.path.join(tmp, "out.h5"), "r") as fh:
            checksum = float(np.nansum(fh["x"][:, :50]))
    return {"wall_s": wall, "peak_mib": _rss_mib(), "before_mib": before,
            "input_mib": n * p * 8 / 2**20, "checksum": checksum}


def run(method: str, n: int, p: int, timeout_s: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(n), str(p)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                             check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout_s:.0f} s"}
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {res.returncode}: {tail[:80]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small size only (seconds)")
    ap.add_argument("--full", action="store_true", help="the issue's sizes (minutes)")
    ap.add_argument("--skip-anchors", action="store_true", help="only mrharmony")
    ap.add_argument("--timeout", type=float, default=900.0, help="per run, seconds")
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "N", "P"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        method, n, p = args.worker
        print(json.dumps(worker(method, int(n), int(p))))
        return 0
    if args.quick:
        sizes = [(1000, 4000)]
        dask_sizes = [(1000, 8000)]
    elif args.full:
        sizes = [(5000, 20000), (2000, 100000)]
        dask_sizes = [(2000, 100000)]
    else:
        sizes = [(2000, 10000)]
        dask_sizes = [(2000, 40000)]
    anchors = [] if args.skip_anchors else ["neuroCombat", "neuroHarmonize"]
    print(f"ComBat, {N_SITES} sites, parametric EB, no covariates; {os.cpu_count()} CPUs")
    header = (f"{'size (n x p)':>16} {'method':>15} {'time s':>8} {'peak MiB':>9} "
              f"{'extra MiB':>9} {'input MiB':>9} {'speed-up':>9}")
    print(header)
    for n, p in sizes:
        results = {m: run(m, n, p, args.timeout) for m in [*anchors, "ours", "ours-inplace"]}
        times = [r["wall_s"] for m, r in results.items() if m in anchors and "wall_s" in r]
        best = min(times) if times else None
        for m, r in results.items():
            if "error" in r:
                print(f"{n:>7} x {p:<7} {m:>15} {r['error']}")
                continue
            speed = f"{best / r['wall_s']:.1f}x" if best and m.startswith("ours") else ""
            print(f"{n:>7} x {p:<7} {m:>15} {r['wall_s']:8.2f} {r['peak_mib']:9.0f} "
                  f"{r['peak_mib'] - r['before_mib']:9.0f} {r['input_mib']:9.0f} {speed:>9}")
        sums = {m: round(r["checksum"], 6) for m, r in results.items() if "checksum" in r}
        print(f"{'':16} checksum of the first 50 harmonized features: {sums}")
    for n, p in dask_sizes:
        r = run("ours-dask", n, p, args.timeout)
        if "error" in r:
            print(f"{n:>7} x {p:<7} {'ours-dask':>15} {r['error']}")
            continue
        print(f"{n:>7} x {p:<7} {'ours-dask':>15} {r['wall_s']:8.2f} {r['peak_mib']:9.0f} "
              f"{r['peak_mib'] - r['before_mib']:9.0f} {r['input_mib']:9.0f}   (lazy input, "
              "HDF5 output)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
