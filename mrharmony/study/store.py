"""Content-addressed task store: finished work is never lost and never redone.

Every task has a key, the SHA-256 of its stage, its parameters, the keys of its inputs
and the store format version. A task writes into a private temporary directory; when it
succeeds, a ``task.json`` record is written there and the directory is renamed into
place in one atomic step (``<root>/<stage>/<key>``). An interrupted run therefore leaves
only complete task directories (plus stray temporaries, removed on the next run), and
``--resume`` reuses exactly the tasks whose key is unchanged: change one parameter and
only the tasks downstream of it run again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["STORE_VERSION", "TaskStore", "task_key"]

#: Bump when the layout of task outputs changes: old keys then no longer match.
STORE_VERSION = 1


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj.is_integer():
        return obj  # keep floats as floats: 3.0 and 3 hash differently on purpose
    return obj


def task_key(stage: str, params: Mapping[str, Any], inputs: Mapping[str, str] | None = None,
             ) -> str:
    """Content address of a task.

    Parameters
    ----------
    stage : str
        Stage name (``"simulate"``, ...).
    params : mapping
        JSON-serialisable parameters that determine the output.
    inputs : mapping of str to str, optional
        Keys of the tasks whose outputs this task reads, by role.

    Returns
    -------
    str
        64 hexadecimal characters.
    """
    payload = {
        "store_version": STORE_VERSION,
        "stage": stage,
        "params": _canonical(dict(params)),
        "inputs": _canonical(dict(inputs or {})),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


class TaskStore:
    """Directory of finished tasks, ``<root>/<stage>/<key>/`` with a ``task.json`` record.

    Parameters
    ----------
    root : path
        Store directory (created if missing). Must be on a file system that every Dask
        worker sees when the study runs on a cluster.
    """

    RECORD = "task.json"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, stage: str, key: str) -> Path:
        """Directory of a task's outputs."""
        return self.root / stage / key

    def record(self, stage: str, key: str) -> dict[str, Any] | None:
        """The record of a finished task, or None when it has not finished."""
        try:
            return json.loads((self.path(stage, key) / self.RECORD).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def clean_temporaries(self) -> int:
        """Remove directories left by tasks that were interrupted; returns how many."""
        removed = 0
        for tmp in self.root.glob("*/.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
        return removed

    def run(self, stage: str, key: str, fn: Callable[[Path], Mapping[str, Any] | None],
            *, describe: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run ``fn(work_dir)`` unless the task has finished before.

        ``fn`` writes its outputs into ``work_dir`` and returns extra, JSON-serialisable
        information for the record. Exceptions are caught and returned as a failed
        record (with the traceback and ``describe``, the task's inputs); nothing of a
        failed task is kept.

        Returns
        -------
        dict
            ``{"stage", "key", "status": "done" | "failed", "cached": bool, "path",
            "elapsed_s", "info", "error"}``.
        """
        final = self.path(stage, key)
        existing = self.record(stage, key)
        if existing is not None:
            return {**existing, "cached": True, "path": str(final)}
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        start = time.perf_counter()
        try:
            info = dict(fn(work) or {})
        except Exception as exc:  # reported, never raised: independent tasks go on
            shutil.rmtree(work, ignore_errors=True)
            return {
                "stage": stage, "key": key, "status": "failed", "cached": False,
                "path": str(final), "elapsed_s": time.perf_counter() - start, "info": {},
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(), "inputs": dict(describe or {}),
            }
        record = {
            "stage": stage, "key": key, "status": "done",
            "elapsed_s": round(time.perf_counter() - start, 3), "info": info,
            "inputs": dict(describe or {}), "error": None,
        }
        (work / self.RECORD).write_text(json.dumps(record, indent=1, default=str))
        try:
            os.replace(work, final)
        except OSError:
            # Another worker finished the same task first: keep theirs, drop ours.
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(Exception):
                existing = self.record(stage, key)
            if existing is None:
                raise
            return {**existing, "cached": True, "path": str(final)}
        return {**record, "cached": False, "path": str(final)}
