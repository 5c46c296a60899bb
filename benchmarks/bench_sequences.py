"""Time building + writing each example protocol next to pypulseq's own example scripts.

Both run in this process, on the same machine, each timed as the best of ``--repeat``
runs. Workloads differ in size, so the fair figure is the time per 1000 blocks; the
ratio column is (ours per block) / (pypulseq example per block): below 1 means faster.

Usage::

    python benchmarks/fetch_pypulseq_examples.py   # once: the peer scripts
    python benchmarks/bench_sequences.py [--scanner siemens-prisma] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from mrharmony.sequences import build_file, load_protocol  # noqa: E402

from seqtools import pypulseq_examples_dir, run_pypulseq_example  # noqa: E402

#: Our builder -> the closest pypulseq example script.
PEERS = {
    "gre2d": "write_gre",
    "epi": "write_epi",
    "dwi_epi": "write_epi_se",
    "tse": "write_tse",
    "mprage": "write_MPRAGE",
    "radial": "write_radial_gre",
    "irse": "write_haste",
    "mese": "write_tse",
}


def _best(fn, repeat: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _blocks_in(path: Path) -> int:
    text = path.read_text().split("[BLOCKS]", 1)[1]
    lines = text.split("[", 1)[0].splitlines()
    return sum(1 for line in lines if line.strip() and not line.startswith("#"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scanner", default="siemens-prisma")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    peers_dir = pypulseq_examples_dir()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        for proto_path in sorted((ROOT / "examples" / "protocols").glob("*.toml")):
            protocol = load_protocol(proto_path)
            out = tmp_path / f"{protocol.builder}.seq"

            def ours(protocol=protocol, out=out):
                return build_file(protocol, args.scanner, out, force=True)

            t_ours, _ = _best(ours, args.repeat)
            n_ours = _blocks_in(out)
            peer = PEERS.get(protocol.builder)
            t_peer = n_peer = None
            if peer and peers_dir is not None:
                peer_out = tmp_path / f"peer_{peer}.seq"
                t_peer, _ = _best(
                    lambda peer=peer, peer_out=peer_out: run_pypulseq_example(
                        peers_dir / f"{peer}.py", peer_out
                    ),
                    args.repeat,
                )
                n_peer = _blocks_in(peer_out)
            rows.append((protocol.builder, n_ours, t_ours, peer, n_peer, t_peer))
    print(f"scanner {args.scanner}; best of {args.repeat}; times in seconds")
    header = (f"{'builder':8} {'blocks':>7} {'ours s':>7} {'ms/kblk':>8} | {'pypulseq example':18} "
              f"{'blocks':>7} {'peer s':>7} {'ms/kblk':>8} | {'ratio':>5}")
    print(header)
    print("-" * len(header))
    for builder, n_o, t_o, peer, n_p, t_p in rows:
        per_o = 1e6 * t_o / n_o
        if t_p is None:
            print(f"{builder:8} {n_o:7d} {t_o:7.3f} {per_o:8.2f} | {'-':18} {'':>7} {'':>7} "
                  f"{'':>8} | {'':>5}")
            continue
        per_p = 1e6 * t_p / n_p
        print(f"{builder:8} {n_o:7d} {t_o:7.3f} {per_o:8.2f} | {peer:18} {n_p:7d} {t_p:7.3f} "
              f"{per_p:8.2f} | {per_o / per_p:5.2f}")
    if peers_dir is None:
        print("pypulseq examples not found: run benchmarks/fetch_pypulseq_examples.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
