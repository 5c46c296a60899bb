"""Run a graph of content-addressed tasks on Dask (local cluster or an existing one).

The graph is a list of :class:`TaskSpec` in dependency order. Each task is submitted as
one Dask future whose arguments include the futures of its inputs, so Dask schedules it
when they are done, on any worker. A task whose input failed is skipped (and reported);
independent tasks go on. Results are small records (see :class:`TaskStore.run`); the
outputs themselves stay in the task store, which must be on a file system every worker
sees.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrharmony.study.store import TaskStore

__all__ = ["TaskSpec", "dask_client", "default_workers", "run_graph", "run_task"]


@dataclass(frozen=True)
class TaskSpec:
    """One node of the study graph.

    Attributes
    ----------
    stage : str
        Stage name; selects the function in :data:`mrharmony.study.tasks.STAGES`.
    key : str
        Content address (see :func:`~mrharmony.study.store.task_key`).
    params : dict
        JSON-serialisable parameters of the stage function.
    inputs : dict
        Role -> key of the input tasks (``{"raw": "<key>"}``).
    label : str
        Human-readable name for progress and error reports.
    """

    stage: str
    key: str
    params: dict[str, Any]
    inputs: dict[str, str] = field(default_factory=dict)
    label: str = ""


def run_task(spec: TaskSpec, store_root: str, threads: int,
             *input_records: dict[str, Any]) -> dict[str, Any]:
    """Execute one task (on a worker): skip if an input failed, else run via the store."""
    from mrharmony.study.tasks import STAGES, limit_threads

    store = TaskStore(store_root)
    failed = [r for r in input_records if r.get("status") != "done"]
    describe = {"label": spec.label, "params": spec.params, "inputs": spec.inputs}
    if failed:
        first = failed[0]
        return {
            "stage": spec.stage, "key": spec.key, "status": "skipped", "cached": False,
            "path": str(store.path(spec.stage, spec.key)), "elapsed_s": 0.0, "info": {},
            "error": f"input {first.get('label', first.get('stage'))} did not finish",
            "inputs": describe, "label": spec.label,
        }
    input_dirs = {role: store.path(stage_of(key, input_records), key)
                  for role, key in spec.inputs.items()}
    fn = STAGES[spec.stage]
    with limit_threads(threads):
        record = store.run(spec.stage, spec.key,
                           lambda work: fn(spec.params, input_dirs, work), describe=describe)
    record["label"] = spec.label
    return record


def stage_of(key: str, records: Sequence[dict[str, Any]]) -> str:
    """The stage of the input task with ``key`` (from its record)."""
    for record in records:
        if record.get("key") == key:
            return str(record["stage"])
    raise KeyError(f"input task {key[:12]} is not among the inputs")


def default_workers() -> int:
    """Workers of the embedded local cluster: one per core (at least 1)."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else (os.cpu_count() or 1))


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None,
                ) -> Iterator[Any]:
    """A ``distributed.Client``: to ``scheduler`` when given, else a local cluster.

    The local cluster has ``workers`` single-threaded worker processes (default: one
    per core); numerical libraries inside each task use ``threads`` threads (see
    :func:`run_graph`).
    """
    import logging

    import dask
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.ERROR)
    with dask.config.set({"distributed.admin.tick.limit": "60s"}):
        if scheduler:
            client = Client(scheduler, timeout="30s")
            try:
                yield client
            finally:
                client.close()
            return
        n = workers or default_workers()
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                               dashboard_address=":0", scheduler_port=0,
                               silence_logs=50)
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()


def run_graph(client: Any, specs: Sequence[TaskSpec], store_root: Path, *,
              threads: int = 1,
              on_result: Callable[[dict[str, Any]], None] | None = None,
              ) -> dict[str, dict[str, Any]]:
    """Submit ``specs`` (in dependency order) and wait for all of them.

    Parameters
    ----------
    client : distributed.Client
    specs : sequence of TaskSpec
        Every task's inputs must appear earlier in the sequence.
    store_root : path
        The task store (shared by all workers).
    threads : int
        Threads each task may use for numerical work (numba, BLAS).
    on_result : callable, optional
        Called with each record as it completes (progress, logging).

    Returns
    -------
    dict
        key -> record, for every task.
    """
    from distributed import as_completed

    futures: dict[str, Any] = {}
    for spec in specs:
        deps = [futures[k] for k in spec.inputs.values()]
        futures[spec.key] = client.submit(
            run_task, spec, str(store_root), threads, *deps,
            key=f"{spec.stage}-{spec.key}", pure=False, retries=0,
        )
    records: dict[str, dict[str, Any]] = {}
    by_future = {f.key: k for k, f in futures.items()}
    for future in as_completed(list(futures.values())):
        try:
            record = future.result()
        except Exception as exc:  # a worker died: report it like a failed task
            key = by_future[future.key]
            spec = next(s for s in specs if s.key == key)
            record = {"stage": spec.stage, "key": key, "status": "failed", "cached": False,
                      "error": f"{type(exc).__name__}: {exc}", "label": spec.label,
                      "inputs": {"params": spec.params}, "elapsed_s": 0.0, "info": {}}
        records[record["key"]] = record
        if on_result is not None:
            on_result(record)
    return records
