"""The ``ray`` executor: every run is a Ray task; records stream back through a Ray queue.

``address = ""`` starts a local Ray cluster in this process (``num_cpus`` CPUs, no
dashboard) and shuts it down afterwards; any other address (``"auto"``,
``"ray://head:10001"``) joins an existing cluster, which stays up. Every task needs the
results directory on a shared filesystem for its checkpoint (a local cluster has it);
the records themselves travel through a :class:`ray.util.queue.Queue` to this process,
the only writer of ``results.jsonl``. Needs the ``ray`` extra.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curvkit.errors import ConfigError
from curvkit.experiments.executors.base import Executor, Pending, Write, resume_dict, run_one
from curvkit.options import option


def _task(spec: dict[str, Any], attempt: int, resume: dict[str, Any] | None, queue: Any,
          out: str, cache_dir: Any, threads: int) -> str:
    def emit(rec: dict[str, Any]) -> None:
        queue.put(rec)

    return run_one(spec, attempt, resume, emit, out, cache_dir, threads)


class RayExecutor(Executor):
    """Runs every run as a Ray task, on a local or an existing Ray cluster."""

    name = "ray"

    @dataclass
    class Options:
        address: str = option("", "Ray cluster to join (\"auto\", \"ray://host:port\"); "
                                  "\"\": start a local cluster for this command")
        num_cpus: int = option(0, "CPUs of a local cluster (0: Ray's default)", min=0)
        cpus_per_run: float = option(1.0, "CPUs Ray reserves for each run", min=0.01)
        threads: int = option(1, "torch threads per run (0: torch's default)", min=0)

    def run(self, todo: list[Pending], write: Write, *, out: Path, cache_dir: Any,
            steps: Callable[[str, int], None]) -> list[str]:
        try:
            import ray
            from ray.util.queue import Empty, Queue
        except ImportError as err:
            raise ConfigError("executor.name: 'ray' needs the ray package (pip install "
                              "'curvkit[ray]')") from err
        o = self.options
        started = not ray.is_initialized()
        if started:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
            if o.address:
                kwargs["address"] = o.address
            elif o.num_cpus:
                kwargs["num_cpus"] = o.num_cpus
            ray.init(**kwargs)
        errors: list[str] = []
        try:
            queue = Queue()
            task = ray.remote(num_cpus=o.cpus_per_run, max_retries=0)(_task)
            refs = {task.remote(spec.to_dict(), attempt, resume_dict(resume), queue,
                                str(out), str(cache_dir) if cache_dir else None,
                                o.threads): spec
                    for spec, attempt, resume in todo}
            waiting = set(refs)

            def drain() -> None:
                while True:
                    try:
                        batch = queue.get_nowait_batch(max(1, queue.qsize()))
                    except Empty:
                        return
                    if not batch:
                        return
                    for rec in batch:
                        write(rec, False)

            while waiting:
                ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0.2)
                drain()  # a task's records are queued before its result is ready
                for ref in ready:
                    waiting.discard(ref)
                    spec = refs[ref]
                    try:
                        ray.get(ref)
                    except Exception as err:  # the task itself died (not a failed run)
                        errors.append(f"run {spec.run_id} [{spec.label}, seed {spec.seed}]: "
                                      f"Ray task failed: {type(err).__name__}: {err}")
                if not ready:
                    time.sleep(0.05)
            drain()
            queue.shutdown()
        finally:
            if started and not o.address:
                ray.shutdown()
        return errors
