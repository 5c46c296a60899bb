"""Fast simulation path vs the full isochromat engine, side by side.

Run ``python benchmarks/bench_fastpath.py`` (``--quick`` for 64 x 64 only). For each
matrix it builds the ``epi`` example protocol (one slice, no navigators, no dummies, TE long enough
for the echo train) for
the Siemens Prisma, places the Shepp-Logan phantom at isocentre, and simulates it at the
``siemens-prisma-3t`` site (32 coils, its B0 residual, B1 map and gradient errors) with
both paths from the same isochromats. It prints the wall times, the speed ratio, the
classes the fast path simulated, its probe check and its actual difference from the
full engine over all coils and samples (percent of the peak signal).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np

from mrharmony.formats.pulseq import read_pulseq
from mrharmony.phantoms import make_shepp_logan
from mrharmony.sequences.io import build
from mrharmony.sequences.protocol import protocol_from_mapping
from mrharmony.simulation.engine import simulate
from mrharmony.simulation.fastpath import fast_simulate
from mrharmony.simulation.raw import receive_model
from mrharmony.simulation.site import b0_residual_hz, b1_scale_map, load_site
from mrharmony.simulation.spins import SpinSystem, through_plane_extent

ROOT = Path(__file__).resolve().parents[1]


def run(matrix: int, isochromats: int, directory: Path) -> None:
    with open(ROOT / "examples" / "protocols" / "epi.toml", "rb") as f:
        data = tomllib.load(f)
    data.update(matrix=[matrix, matrix], n_slices=1, navigator_lines=0, dummy_scans=0,
                te_ms=max(float(data["te_ms"]), 0.6 * matrix))  # the echo train needs it
    path = directory / f"epi{matrix}.seq"
    build(protocol_from_mapping(data), "siemens-prisma").write(str(path))
    seq = read_pulseq(path)
    ph = make_shepp_logan(matrix=matrix)
    affine = np.array(ph.affine, dtype=np.float64)
    affine[:3, 3] -= affine[:3, :3] @ ((np.array(ph.shape) - 1) / 2) + affine[:3, 3]
    ph = dataclasses.replace(ph, affine=affine)
    site = load_site("siemens-prisma-3t")
    shape = tuple(ph.shape)
    rx = receive_model(site, ph)
    spins = SpinSystem.from_phantom(
        ph, isochromats_per_voxel=isochromats,
        b0_hz_extra=b0_residual_hz(site, affine, shape, mask=np.asarray(ph.mask).ravel()),
        b1_scale=b1_scale_map(site, affine, shape), subvoxel_positions=isochromats > 1,
        through_plane_mm=through_plane_extent(seq, isochromats) if isochromats > 1 else None)
    kw = {"gradient_scale": site.gradient_scale, "gradient_delay_s": site.gradient_delay_s,
              "b0_t": site.field_strength_t}
    simulate(seq, spins.subset(slice(0, 64)), coil_sens=rx.sens, **kw)  # JIT warm-up
    t0 = time.perf_counter()
    fast = fast_simulate(seq, spins, coil_sens=rx.sens, **kw)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = simulate(seq, spins, coil_sens=rx.sens, **kw)
    t_full = time.perf_counter() - t0
    if fast.signal is None:
        print(f"EPI {matrix}^2: fast path refused ({fast.reason}); full {t_full:.1f} s")
        return
    diff = 100 * np.abs(fast.signal - full).max() / np.abs(full).max()
    print(f"EPI {matrix}^2, {spins.n_spins // isochromats} voxels x {isochromats} isochromats, "
          f"{rx.sens.shape[0]} coils: full {t_full:.2f} s, fast {t_fast:.2f} s "
          f"(x{t_full / t_fast:.1f}); {fast.n_classes} classes; probe check "
          f"{fast.check_pct:.3f} %, actual max difference {diff:.3f} % of peak")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 x 64 only")
    parser.add_argument("--isochromats", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for matrix in (64,) if args.quick else (64, 128):
            run(matrix, args.isochromats, Path(d))


if __name__ == "__main__":
    main()
