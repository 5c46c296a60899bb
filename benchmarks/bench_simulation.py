"""Bloch engine speed: mrharmony vs MRzeroCore on the same single-slice GRE ``.seq``.

Run ``python benchmarks/bench_simulation.py`` (``--quick`` for 64 x 64 only). For each
matrix size it builds the ``gre2d`` example protocol (1 slice, no dummy scans) with our
sequence builder, writes it, and simulates a disc phantom with both engines: ours with
``isochromats_per_voxel`` isochromats (T2' spread), MRzeroCore (if installed) with its
default PDG settings and box voxels. It prints wall times, the speed ratio, our
spin-steps per second (isochromats x time steps, where a time step is one ADC sample,
one merged free-precession interval or one RF pulse) and the machine's
memory-bandwidth-limited spin-steps per second: the copy bandwidth measured with NumPy
divided by the 24 bytes an array-at-a-time implementation moves per spin-step (read and
write Mx, My, Mz in float32).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tomllib
import warnings
from pathlib import Path

import numba
import numpy as np

from mrharmony.formats.pulseq import read_pulseq
from mrharmony.phantoms import Phantom
from mrharmony.sequences.io import build
from mrharmony.sequences.protocol import protocol_from_mapping
from mrharmony.simulation.engine import simulate
from mrharmony.simulation.spins import SpinSystem
from mrharmony.simulation.timeline import OP_RUN, OP_SAMPLE, compile_timeline

ROOT = Path(__file__).resolve().parents[1]
BYTES_PER_SPIN_STEP = 24


def copy_bandwidth_gb_s(n_bytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best-of-``repeats`` NumPy copy bandwidth (read + write) in GB/s."""
    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best / 1e9


def write_gre(n: int, directory: Path) -> Path:
    """The gre2d example protocol at an ``n`` x ``n`` matrix, one slice, no dummies."""
    with open(ROOT / "examples" / "protocols" / "gre2d.toml", "rb") as f:
        data = tomllib.load(f)
    data.update(matrix=[n, n], n_slices=1, dummy_scans=0)
    path = directory / f"gre{n}.seq"
    build(protocol_from_mapping(data), "siemens-prisma").write(str(path))
    return path


def disc_phantom(n: int, fov_mm: float = 256.0, thickness_mm: float = 5.0) -> Phantom:
    """Disc of random-but-seeded tissue values (T2* < T2 so T2' spreads exist)."""
    rng = np.random.default_rng(0)
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    inside = ((i - n / 2 + 0.5) ** 2 + (j - n / 2 + 0.5) ** 2 < (0.45 * n) ** 2)[..., None]
    shape = (n, n, 1)

    def field(lo: float, hi: float) -> np.ndarray:
        return np.where(inside, rng.uniform(lo, hi, shape), 1.0).astype(np.float32)

    t1 = field(600, 1500)
    t2 = np.minimum(field(50, 120), t1)
    affine = np.diag([fov_mm / n, fov_mm / n, thickness_mm, 1.0])
    affine[:3, 3] = [-fov_mm / 2, -fov_mm / 2, 0.0]
    return Phantom(
        pd=np.where(inside, rng.uniform(0.6, 1.0, shape), 0).astype(np.float32),
        t1_ms=t1, t2_ms=t2, t2star_ms=(t2 * 0.6).astype(np.float32),
        adc_mm2_s=np.where(inside, 1e-3, 0).astype(np.float32),
        b0_hz=np.where(inside, rng.normal(0, 5, shape), 0).astype(np.float32),
        labels=inside.astype(np.int16), label_names={1: "disc"}, affine=affine, field_t=3.0,
        name="disc",
    )


def time_steps(seq) -> int:
    """Time steps of our engine: samples + merged free intervals + RF pulses."""
    tl = compile_timeline(seq)
    n_other = int(np.sum((tl.op != OP_SAMPLE) & (tl.op != OP_RUN)))
    return tl.n_samples + n_other


def run_ours(seq, phantom: Phantom, iso: int) -> tuple[float, int]:
    spins = SpinSystem.from_phantom(phantom, isochromats_per_voxel=iso)
    t0 = time.perf_counter()
    simulate(seq, spins)
    return time.perf_counter() - t0, spins.n_spins


def run_mrzero(path: Path, phantom: Phantom) -> float | None:
    try:
        import MRzeroCore as mr0
    except ImportError:
        return None
    pos = phantom.positions_mm() * np.array([-1e-3, -1e-3, 1e-3])
    m = phantom.mask
    t2 = phantom.t2_ms[m] * 1e-3
    t2s = phantom.t2star_ms[m] * 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = mr0.CustomVoxelPhantom(
            pos.tolist(), PD=phantom.pd[m].tolist(), T1=(phantom.t1_ms[m] * 1e-3).tolist(),
            T2=t2.tolist(), T2dash=(1 / (1 / t2s - 1 / t2)).tolist(),
            D=phantom.adc_mm2_s[m].tolist(), B0=phantom.b0_hz[m].tolist(),
            voxel_size=(np.array(phantom.voxel_size_mm) * 1e-3).tolist(), voxel_shape="box",
        ).build()
        t0 = time.perf_counter()
        mseq = mr0.Sequence.import_file(str(path))
        graph = mr0.compute_graph(mseq, data, 200, 1e-3)
        mr0.execute_graph(graph, mseq, data, print_progress=False)
        return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 x 64 only")
    parser.add_argument("--iso", type=int, default=2, help="isochromats per voxel (T2' spread)")
    parser.add_argument("--no-mrzero", action="store_true", help="skip MRzeroCore")
    args = parser.parse_args(argv)
    sizes = [64] if args.quick else [64, 128, 256]
    bw = copy_bandwidth_gb_s()
    limit = bw * 1e9 / BYTES_PER_SPIN_STEP
    print(f"threads: {numba.get_num_threads()}  copy bandwidth: {bw:.1f} GB/s  "
          f"-> bandwidth-limited {limit / 1e6:.0f} M spin-steps/s "
          f"({BYTES_PER_SPIN_STEP} B per spin-step)")
    print(f"{'matrix':>8} {'spins':>8} {'steps':>8} {'ours s':>8} {'MRzero s':>9} "
          f"{'ratio':>7} {'Mspin-steps/s':>14} {'of BW limit':>11}")
    with tempfile.TemporaryDirectory() as tmp:
        # Warm-up: numba compilation / cache load is not part of the timings.
        path = write_gre(16, Path(tmp))
        run_ours(read_pulseq(path), disc_phantom(16), 1)
        for n in sizes:
            path = write_gre(n, Path(tmp))
            seq = read_pulseq(path)
            phantom = disc_phantom(n)
            t_ours, n_spins = run_ours(seq, phantom, args.iso)
            steps = time_steps(seq)
            rate = n_spins * steps / t_ours
            t_mr0 = None
            if not args.no_mrzero and n <= 128:
                t_mr0 = run_mrzero(path, phantom)
            mr0_text = f"{t_mr0:9.2f}" if t_mr0 is not None else f"{'-':>9}"
            ratio = f"{t_mr0 / t_ours:7.1f}" if t_mr0 is not None else f"{'-':>7}"
            print(f"{n:>5}^2 {n_spins:>8} {steps:>8} {t_ours:8.2f} {mr0_text} {ratio} "
                  f"{rate / 1e6:14.0f} {rate / limit:10.1f}x")


if __name__ == "__main__":
    main()
