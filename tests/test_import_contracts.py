"""Layering contracts, checked on the source (every import statement, lazy ones included).

``formats`` sits under every stage and imports only the core; ``sequences`` and
``phantoms`` import only the core and ``formats``; nothing below the orchestration layer
imports ``mrharmony.study``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = {"mrharmony", "mrharmony.errors", "mrharmony.config", "mrharmony.backend",
        "mrharmony.fileio", "mrharmony.cliutil"}
STAGES = ("sequences", "phantoms", "simulation", "recon", "harmonize")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return {m for m in out if m == "mrharmony" or m.startswith("mrharmony.")}


def _files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    return module in CORE or any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize(("folder", "allowed"), [
    ("mrharmony/formats", ("mrharmony.formats",)),
    ("sequences", ("mrharmony.formats", "mrharmony.sequences")),
    ("phantoms", ("mrharmony.formats", "mrharmony.phantoms")),
])
def test_lower_layers_import_only_what_is_below_them(folder, allowed):
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in _files(folder) for m in _imports(p)
           if not _allowed(m, allowed)}
    assert not bad, sorted(bad)


def test_no_stage_imports_the_orchestration_layer():
    bad = {f"{p.relative_to(ROOT)}: {m}" for folder in ("mrharmony/formats", *STAGES)
           for p in _files(folder) for m in _imports(p) if m.startswith("mrharmony.study")}
    assert not bad, sorted(bad)


def test_the_contract_checker_sees_imports():
    assert "mrharmony.formats.raw" in _imports(ROOT / "simulation" / "raw.py")


@pytest.mark.parametrize(("folder", "forbidden"), [
    ("simulation", ("mrharmony.recon", "mrharmony.harmonize", "mrharmony.study")),
    ("recon", ("mrharmony.simulation", "mrharmony.harmonize", "mrharmony.study")),
    ("harmonize", ("mrharmony.sequences", "mrharmony.simulation", "mrharmony.recon",
                   "mrharmony.study")),
])
def test_stages_do_not_import_their_peers(folder, forbidden):
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in _files(folder) for m in _imports(p)
           if any(m == f or m.startswith(f + ".") for f in forbidden)}
    assert not bad, sorted(bad)


def test_simulation_runs_seq_files_and_never_builds_a_protocol():
    """``simulate_raw`` takes a ``.seq``: the simulator uses the sequence library's protocol
    and scanner definitions (native flavour, site hardware), never its builders. Only the
    stage's CLI module builds a protocol TOML (``mrharmony simulate PROTOCOL.toml``)."""
    allowed = ("mrharmony.sequences.protocol", "mrharmony.sequences.scanner")
    bad = {f"{p.relative_to(ROOT)}: {m}" for p in _files("simulation") if p.name != "cli.py"
           for m in _imports(p) if m.startswith("mrharmony.sequences")
           and not any(m == a or m.startswith(a + ".") for a in allowed)}
    assert not bad, sorted(bad)


def test_only_the_entry_point_imports_the_top_level_cli():
    """Each stage owns its CLI module; ``mrharmony.cli`` only registers them (by name)."""
    folders = ("mrharmony", "sequences", "phantoms", "simulation", "recon", "harmonize", "study")
    bad = {f"{p.relative_to(ROOT)}: {m}" for folder in folders for p in _files(folder)
           for m in _imports(p) if m == "mrharmony.cli" and p.name != "__main__.py"}
    assert not bad, sorted(bad)
