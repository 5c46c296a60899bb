"""Atomic writes: the target holds the old content or the new, never a partial file."""

from __future__ import annotations

import pytest

from mrharmony.fileio import atomic_directory, atomic_path


def test_atomic_path_replaces_on_success_and_keeps_old_on_error(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with atomic_path(target, suffix=".tmp") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".tmp"
        tmp.write_text("new")
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError, match="writer failed"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer failed")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_atomic_directory_swaps_whole_folders(tmp_path):
    target = tmp_path / "phantom"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    with pytest.raises(ValueError, match="bad map"), atomic_directory(target) as tmp:
        (tmp / "c.txt").write_text("3")
        raise ValueError("bad map")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom"]
