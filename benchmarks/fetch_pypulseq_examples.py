"""Extract pypulseq's own example scripts (the peer for tests and benchmarks).

pypulseq 1.5 wheels no longer ship ``seq_examples``; the 1.4.2 wheel on PyPI does, and
its scripts run unchanged on pypulseq 1.5. This downloads that wheel with pip (no
dependencies, nothing installed) and extracts ``seq_examples/scripts/*.py`` into
``.cache/pypulseq-examples`` (git-ignored). Run by ``.ci/run``; idempotent.

Usage: python benchmarks/fetch_pypulseq_examples.py [DEST]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

VERSION = "1.4.2"
ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    dest = Path(args[0]) if args else ROOT / ".cache" / "pypulseq-examples"
    if (dest / "write_gre.py").is_file():
        print(f"pypulseq {VERSION} examples already in {dest}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             f"pypulseq=={VERSION}", "--only-binary=:all:", "-d", tmp],
            check=True,
        )
        wheel = next(Path(tmp).glob(f"pypulseq-{VERSION}-*.whl"))
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            for name in zf.namelist():
                if name.startswith("pypulseq/seq_examples/scripts/") and name.endswith(".py"):
                    (dest / Path(name).name).write_bytes(zf.read(name))
    print(f"extracted pypulseq {VERSION} example scripts to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
