"""The ``local`` executor: runs in this process, or in ``jobs`` spawned processes."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curvkit.experiments.executors.base import Executor, Pending, Write, resume_dict, run_one
from curvkit.experiments.runner import execute
from curvkit.options import option

_WORKER: dict[str, Any] = {}


def _worker_init(q: Any, cache_dir: Any, threads: int, parent: int, out: str) -> None:
    _WORKER.update(queue=q, cache_dir=cache_dir, parent=parent, out=out, threads=threads)


def _worker_run(spec: dict[str, Any], attempt: int, resume: dict[str, Any] | None) -> str:
    q = _WORKER["queue"]

    def emit(rec: dict[str, Any]) -> None:
        if os.getppid() != _WORKER["parent"]:
            os._exit(3)  # the parent (the only writer) is gone: stop instead of blocking
        q.put(rec)

    run_id = run_one(spec, attempt, resume, emit, _WORKER["out"], _WORKER["cache_dir"],
                     _WORKER["threads"])
    q.put({"type": "_done", "run": run_id})
    return run_id


class LocalExecutor(Executor):
    """Runs on this machine: in this process (jobs = 1), or in spawned processes."""

    name = "local"

    @dataclass
    class Options:
        jobs: int = option(1, "parallel processes (1: in this process)", min=1)
        threads: int = option(0, "torch threads per worker process (0: torch's default)",
                              min=0)

    def run(self, todo: list[Pending], write: Write, *, out: Path, cache_dir: Any,
            steps: Callable[[str, int], None]) -> list[str]:
        if self.options.jobs > 1 and len(todo) > 1:
            return self._parallel(todo, write, out, cache_dir)
        for spec, attempt, resume in todo:
            execute(spec, lambda rec: write(rec, True), attempt=attempt, cache_dir=cache_dir,
                    progress=lambda n, _r=spec.run_id: steps(_r, n), checkpoint_dir=out,
                    resume=resume)
        return []

    def _parallel(self, todo: list[Pending], write: Write, out: Path, cache_dir: Any
                  ) -> list[str]:
        """Runs in spawned processes; records come back through a queue, in order."""
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        errors: list[str] = []
        done_runs: set[str] = set()
        with ProcessPoolExecutor(max_workers=self.options.jobs, mp_context=ctx,
                                 initializer=_worker_init,
                                 initargs=(q, str(cache_dir) if cache_dir else None,
                                           self.options.threads, os.getpid(),
                                           str(out))) as pool:
            futures = {pool.submit(_worker_run, spec.to_dict(), attempt,
                                   resume_dict(resume)): spec
                       for spec, attempt, resume in todo}
            waiting = set(futures)
            while waiting:
                try:
                    rec = q.get(timeout=0.2)
                except queue_mod.Empty:
                    rec = None
                if rec is not None:
                    if rec.get("type") == "_done":
                        done_runs.add(rec["run"])
                    else:
                        write(rec, False)
                for fut in [f for f in waiting if f.done()]:
                    spec = futures[fut]
                    err = fut.exception()
                    if err is not None:
                        errors.append(f"run {spec.run_id} [{spec.label}, seed {spec.seed}]: "
                                      f"worker failed: {type(err).__name__}: {err}")
                        waiting.discard(fut)
                    elif spec.run_id in done_runs:
                        waiting.discard(fut)
        return errors
