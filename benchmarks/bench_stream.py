"""Benchmark: streaming reconstruction latency and throughput vs the offline recon.

Data: synthetic 2-D Cartesian scans, 256 x 256, 8 coils (:func:`synthetic_cartesian_scan`),
``--slices`` slices per client. A ``mrharmony`` server (``--executor`` thread or process
pool, ``--workers``) runs in this process on a free loopback port; 1, 4 and 16 clients
stream at once.

* latency: readouts are sent at a scanner-like pace (``--tr-ms`` per line); for every
  image, arrival time at the client minus the time the last readout of its slice was
  handed to the socket; p50 / p95 over all images of all clients;
* the clients run in a separate process (the "scanner"), the server in this one;
* throughput: the same clients stream as fast as possible; images/s = images received /
  wall time from the first connection to the last CLOSE;
* offline: :func:`reconstruct_acquisitions` slice by slice in this process (what
  ``mrharmony recon`` does), images/s; and the same spread over ``--workers`` processes
  (ideal parallel: summed recon seconds / workers), the peer for the 16-client
  throughput;
* CPU per image (thread executor): CPU seconds of the server process (event loop,
  decoding, recon workers, raw writer) per image, next to the offline CPU seconds per
  image: a figure that other load on the machine does not change much (throughput on
  a busy machine does); best of ``--repeat`` runs.

Usage: ``python benchmarks/bench_stream.py [--quick] [--workers N] [--slices N]
[--repeat N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np


def _offline_job(seed: int, n: int, coils: int, slices: int) -> tuple[int, float]:
    from threadpoolctl import threadpool_limits

    from mrharmony.recon.pipeline import reconstruct_acquisitions
    from mrharmony.recon.stream.assembly import SliceAssembler
    from mrharmony.recon.stream.jobs import _limit_fft_threads
    from mrharmony.recon.stream.scanner import synthetic_cartesian_scan

    header, acqs = synthetic_cartesian_scan(nx=n, ny=n, n_coils=coils, n_slices=slices, seed=seed)
    asm = SliceAssembler()
    groups = [g for a in acqs for g in asm.add(a)] + asm.flush()
    _limit_fft_threads(1)  # one core per process, like the server's workers
    with threadpool_limits(limits=1):
        t0 = time.perf_counter()
        c0 = time.process_time()
        count = sum(len(reconstruct_acquisitions(header, g, backend="numpy")) for g in groups)
        _OFFLINE_CPU.append((count, time.process_time() - c0))
    return count, time.perf_counter() - t0


_OFFLINE_CPU: list[tuple[int, float]] = []  # (images, CPU s) of this process's offline runs


def _offline(n: int, coils: int, slices: int, workers: int, jobs: int) -> tuple[float, float]:
    import multiprocessing

    _offline_job(0, n, coils, slices)  # warm-up
    count, seconds = _offline_job(1, n, coils, slices)
    serial = count / seconds
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        list(pool.map(_offline_job, range(workers), [n] * workers, [coils] * workers,
                      [1] * workers))  # warm the workers
        results = list(pool.map(_offline_job, range(jobs), [n] * jobs, [coils] * jobs,
                                [slices] * jobs))
    # ideal parallel offline throughput: recon seconds summed over processes / workers
    # (data generation excluded), an upper bound that the server has to get close to
    total_images = sum(r[0] for r in results)
    parallel_s = sum(r[1] for r in results) / workers
    return serial, total_images / parallel_s


def _pace(tr_s: float):
    async def pace(i, acq, _result):
        if tr_s > 0 and not acq.is_flag_set(19):
            await asyncio.sleep(tr_s)
    return pace


async def _run_clients(port: int, scans, tr_s: float):
    from mrharmony.recon.stream.client import stream_acquisitions

    t0 = time.perf_counter()
    results = await asyncio.gather(*(
        stream_acquisitions(h, a, port=port, pace=_pace(tr_s) if tr_s > 0 else None)
        for h, a in scans))
    wall = time.perf_counter() - t0
    lat = np.concatenate([np.asarray(r.latencies_s()) for r in results])
    images = sum(len(r.images) for r in results)
    return lat, images, wall


def _client_process(port: int, nclients: int, size: int, coils: int, slices: int,
                    tr_s: float) -> tuple[np.ndarray, int, float]:
    """The scanners: all clients of one run, in their own process (own event loop)."""
    from mrharmony.recon.stream.scanner import synthetic_cartesian_scan

    scans = [synthetic_cartesian_scan(nx=size, ny=size, n_coils=coils, n_slices=slices,
                                      seed=c) for c in range(nclients)]
    return asyncio.run(_run_clients(port, scans, tr_s))


async def _bench(args) -> list[dict]:
    import multiprocessing

    from mrharmony.recon.stream.server import ServerSettings, StreamServer

    server = await StreamServer(ServerSettings(port=0, workers=args.workers,
                                               executor=args.executor)).start()
    loop = asyncio.get_running_loop()
    rows = []
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as clients:
            async def run(nclients: int, tr_s: float, slices: int):
                return await loop.run_in_executor(clients, _client_process, server.port,
                                                  nclients, args.size, args.coils, slices, tr_s)

            await run(1, 0.0, 1)  # warm-up
            for nclients in args.clients:
                lat, images, _ = await run(nclients, args.tr_ms * 1e-3, args.slices)
                rate, cpu = 0.0, float("inf")
                for _ in range(args.repeat):
                    c0 = time.process_time()
                    _, images_fast, wall_fast = await run(nclients, 0.0, args.slices)
                    # CPU of this process while the clients ran (the server is idle
                    # while the client process generates its scans)
                    cpu = min(cpu, (time.process_time() - c0) / images_fast)
                    rate = max(rate, images_fast / wall_fast)
                rows.append({"clients": nclients, "images": images,
                             "p50_ms": float(np.percentile(lat, 50) * 1e3),
                             "p95_ms": float(np.percentile(lat, 95) * 1e3),
                             "images_per_s": rate, "cpu_ms_per_image": cpu * 1e3})
    finally:
        await server.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="128 x 128, 2 slices, 1 and 4 clients")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--coils", type=int, default=8)
    parser.add_argument("--slices", type=int, default=4)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--executor", choices=("process", "thread"), default="thread")
    parser.add_argument("--tr-ms", type=float, default=5.0,
                        help="time between readouts in the latency runs (ms)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeat", type=int, default=2,
                        help="unpaced runs per client count (best is reported)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.slices, args.clients = 128, 2, [1, 4]
    print(f"streaming benchmark: {args.size}x{args.size}, {args.coils} coils, "
          f"{args.slices} slices/client, {args.workers} {args.executor} workers, "
          f"TR {args.tr_ms:g} ms, load average {os.getloadavg()[0]:.1f}")
    serial, parallel = _offline(args.size, args.coils, args.slices, args.workers,
                                jobs=max(args.workers, 2))
    offline_cpu = min(c / n for n, c in _OFFLINE_CPU) * 1e3
    rows = asyncio.run(_bench(args))
    print(f"offline recon (reconstruct_acquisitions per slice): {serial:7.1f} images/s "
          f"(1 process), {parallel:7.1f} images/s ({args.workers} processes), "
          f"{offline_cpu:.1f} ms CPU/image")
    cpu_note = "" if args.executor == "thread" else " (workers' CPU not counted)"
    print(f"{'clients':>8} {'images':>7} {'p50 ms':>8} {'p95 ms':>8} {'images/s':>9} "
          f"{'vs offline':>10} {'CPU ms/image':>13} {'CPU vs offline':>15}{cpu_note}")
    for r in rows:
        print(f"{r['clients']:8d} {r['images']:7d} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
              f"{r['images_per_s']:9.1f} {r['images_per_s'] / parallel:10.2f} "
              f"{r['cpu_ms_per_image']:13.1f} {offline_cpu / r['cpu_ms_per_image']:15.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
