"""``mrharmony study run``: the whole loop for a multi-site study, on Dask.

1. :func:`~mrharmony.study.plan.preflight` checks the study (sites exist, every
   protocol builds on every site's scanner, phantom files exist) before any work.
2. :func:`~mrharmony.study.plan.plan_tasks` turns it into content-addressed tasks:
   phantom -> sequence -> simulate -> recon -> features, one chain per
   subject x site x arm x protocol x repeat (sequences once per scanner and flavour).
3. :func:`~mrharmony.study.execute.run_graph` runs them on a local
   ``dask.distributed`` cluster or on ``--scheduler``; finished tasks live in
   ``OUT/.mrharmony/tasks`` and are reused by ``--resume``.
4. The client gathers ``features.csv``, harmonizes, evaluates and writes the BIDS-like
   tree and ``report.html`` (:mod:`mrharmony.study.analysis`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mrharmony.study.config import Study, load_study
from mrharmony.study.execute import dask_client, run_graph
from mrharmony.study.store import TaskStore

__all__ = ["StudyResult", "run_study"]

log = logging.getLogger("mrharmony.study")

MARKER = ".mrharmony"


@dataclass
class StudyResult:
    """What a study run produced.

    Attributes
    ----------
    out_dir : Path
    records : dict
        Task key -> record (status ``done``/``failed``/``skipped``, ``cached``, timings).
    ran, cached, failed, skipped : int
        Task counts of this run.
    report : Path or None
        ``report.html`` (None when no features could be computed).
    numbers : dict
        The report's numbers (also in ``report.json``).
    stage_seconds : dict
        Wall-clock seconds of task work per stage (summed over workers) and of the
        final analysis.
    """

    out_dir: Path
    records: dict[str, dict[str, Any]]
    ran: int = 0
    cached: int = 0
    failed: int = 0
    skipped: int = 0
    report: Path | None = None
    numbers: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _prepare_out_dir(out_dir: Path, *, resume: bool, force: bool) -> None:
    marker = out_dir / MARKER
    if out_dir.exists() and any(out_dir.iterdir()):
        if not marker.is_dir():
            raise FileExistsError(
                f"{out_dir}: exists and is not a study output folder (choose another -o)")
        if not (resume or force):
            raise FileExistsError(
                f"{out_dir}: holds a previous run (use --resume to reuse its finished "
                "tasks, or --force to start again)")
        if force and not resume:
            shutil.rmtree(marker / "tasks", ignore_errors=True)
    marker.mkdir(parents=True, exist_ok=True)


def run_study(study: Study | str | Path, out_dir: str | Path, *,
              scheduler: str | None = None, workers: int | None = None,
              threads_per_task: int = 1, resume: bool = False, force: bool = False,
              progress: bool = True,
              on_result: Callable[[dict[str, Any]], None] | None = None) -> StudyResult:
    """Run a study end to end.

    Parameters
    ----------
    study : Study or path
        A validated study or the path of its TOML file.
    out_dir : path
        Output folder (BIDS-like tree, ``features.csv``, ``report.html``).
    scheduler : str, optional
        Address of a running Dask scheduler (``tcp://host:8786``); default: a local
        cluster with ``workers`` processes.
    workers : int, optional
        Worker processes of the local cluster (default: one per core).
    threads_per_task : int
        Threads each task may use (numba/BLAS); 1 keeps a local cluster from
        oversubscribing the cores.
    resume : bool
        Reuse finished tasks of a previous (possibly interrupted) run in ``out_dir``.
    force : bool
        Discard a previous run in ``out_dir``.
    progress : bool
        Show a progress bar.
    on_result : callable, optional
        Called with every task record as it completes.

    Returns
    -------
    StudyResult

    Raises
    ------
    StudyError
        If the study is invalid (before any work starts).
    FileExistsError
        If ``out_dir`` holds a previous run and neither ``resume`` nor ``force`` is set.
    """
    from mrharmony.study.analysis import analyse
    from mrharmony.study.plan import plan_tasks, preflight

    if not isinstance(study, Study):
        study = load_study(study)
    out_dir = Path(out_dir)
    resolved = preflight(study)  # raises StudyError before any work
    _prepare_out_dir(out_dir, resume=resume, force=force)
    store = TaskStore(out_dir / MARKER / "tasks")
    store.clean_temporaries()
    plan = plan_tasks(study, resolved)
    (out_dir / MARKER / "study.json").write_text(json.dumps(study.to_mapping(), indent=1))

    log_path = out_dir / MARKER / "tasks.jsonl"
    records: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log_file, \
            _progress(progress, len(plan.specs), study.study.name) as advance:
        def handle(record: dict[str, Any]) -> None:
            entry = {k: record.get(k) for k in
                     ("stage", "key", "label", "status", "cached", "elapsed_s", "error")}
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()
            if record.get("status") == "failed":
                log.error("task %s failed: %s (inputs: %s)", record.get("label"),
                          record.get("error"), json.dumps(record.get("inputs"), default=str))
            advance(record)
            if on_result is not None:
                on_result(record)

        with dask_client(scheduler, workers) as client:
            records = run_graph(client, plan.specs, store.root,
                                threads=threads_per_task, on_result=handle)
    result = StudyResult(out_dir=out_dir, records=records)
    for record in records.values():
        status = record.get("status")
        if status == "done":
            if record.get("cached"):
                result.cached += 1
            else:
                result.ran += 1
                stage = str(record["stage"])
                result.stage_seconds[stage] = (result.stage_seconds.get(stage, 0.0)
                                               + float(record.get("elapsed_s") or 0.0))
        elif status == "failed":
            result.failed += 1
        else:
            result.skipped += 1
    result.stage_seconds["tasks_wall"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    report, numbers = analyse(study, plan, store, records, out_dir)
    result.stage_seconds["analysis_wall"] = time.perf_counter() - t1
    result.report, result.numbers = report, numbers
    failures = [r for r in records.values() if r.get("status") != "done"]
    (out_dir / MARKER / "failures.json").write_text(json.dumps(failures, indent=1, default=str))
    return result


class _progress:
    """Rich progress bar over tasks (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int, title: str) -> None:
        self.enabled, self.total, self.title = enabled, total, title
        self._progress: Any = None

    def __enter__(self) -> Callable[[dict[str, Any]], None]:
        if not self.enabled:
            return lambda record: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self._progress = Progress("[progress.description]{task.description}", BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(), transient=False)
        self._progress.__enter__()
        task = self._progress.add_task(f"study {self.title}", total=self.total)

        def advance(record: dict[str, Any]) -> None:
            status = record.get("status")
            note = "cached" if record.get("cached") else status
            self._progress.update(task, advance=1,
                                  description=f"{record.get('label', '')[:48]:<48} {note}")
            if status == "failed":
                self._progress.console.print(
                    f"[red]failed[/red] {record.get('label')}: {record.get('error')}")

        return advance

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


def check_study(path: str | Path) -> Study:
    """Load and preflight a study without running it (``mrharmony study check``)."""
    from mrharmony.study.plan import preflight

    study = load_study(path)
    preflight(study)
    return study

