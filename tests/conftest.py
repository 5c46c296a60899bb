from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

EXAMPLES = ROOT / "examples" / "protocols"
CORPUS = ROOT.parent / "shared" / "pulseq-corpus"


@pytest.fixture(scope="session")
def examples_dir() -> Path:
    return EXAMPLES
