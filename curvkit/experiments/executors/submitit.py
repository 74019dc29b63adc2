"""The ``submitit`` executor: every run is a Slurm job (through submitit).

A job cannot reach this process, so each job appends its records to its own file
``DIR/submitit/records/<run>.<attempt>.jsonl`` (one writer per file, fsync'ed lines, like
``results.jsonl``), and this process tails those files, moving every complete line into
``results.jsonl`` as it appears. The results directory must be on a filesystem the nodes
share (as Slurm setups have). ``cluster = "local"`` runs the jobs as local processes
through submitit's local executor (what the tests use); ``"debug"`` runs them in this
process. Needs the ``slurm`` extra.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from curvkit.errors import ConfigError
from curvkit.experiments.executors.base import Executor, Pending, Write, resume_dict, run_one
from curvkit.experiments.store import ResultsWriter, validate_record
from curvkit.options import option

FOLDER = "submitit"


def _job(spec: dict[str, Any], attempt: int, resume: dict[str, Any] | None, records: str,
         out: str, cache_dir: Any, threads: int) -> str:
    with ResultsWriter(records) as writer:
        return run_one(spec, attempt, resume, writer.append, out, cache_dir, threads)


class _Tail:
    """Complete lines appended to a file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not validate_record(rec):
                out.append(rec)
        return out


class SubmititExecutor(Executor):
    """Runs every run as a Slurm job through submitit (or submitit's local executor)."""

    name = "submitit"

    @dataclass
    class Options:
        cluster: Literal["slurm", "local", "debug", "auto"] = option(
            "auto", "submitit cluster: slurm, local (processes here), debug (this process), "
                    "auto (slurm if available, else local)")
        partition: str = option("", "Slurm partition (\"\": the cluster's default)")
        timeout_min: int = option(60, "time limit of each job (minutes)", min=1)
        cpus_per_task: int = option(1, "CPUs per job", min=1)
        mem_gb: float = option(4.0, "memory per job (GB)", min=0.1)
        array_parallelism: int = option(64, "jobs of the array running at once", min=1)
        threads: int = option(1, "torch threads per run (0: torch's default)", min=0)
        poll_seconds: float = option(0.5, "how often the job files are read", min=0.01)

    def run(self, todo: list[Pending], write: Write, *, out: Path, cache_dir: Any,
            steps: Callable[[str, int], None]) -> list[str]:
        try:
            import submitit
        except ImportError as err:
            raise ConfigError("executor.name: 'submitit' needs the submitit package (pip "
                              "install 'curvkit[slurm]')") from err
        o = self.options
        folder = Path(out) / FOLDER
        records = folder / "records"
        records.mkdir(parents=True, exist_ok=True)
        cluster = None if o.cluster == "auto" else o.cluster
        ex = submitit.AutoExecutor(folder=folder / "logs", cluster=cluster)
        params: dict[str, Any] = {"timeout_min": o.timeout_min, "cpus_per_task": o.cpus_per_task,
                                  "mem_gb": o.mem_gb}
        if ex.cluster == "slurm":
            params["slurm_array_parallelism"] = o.array_parallelism
            if o.partition:
                params["slurm_partition"] = o.partition
        ex.update_parameters(**params)
        jobs = []
        tails = []
        for spec, attempt, resume in todo:
            path = records / f"{spec.run_id}.{attempt}.jsonl"
            path.unlink(missing_ok=True)  # left by an earlier, interrupted command
            tails.append(_Tail(path))
            jobs.append(ex.submit(_job, spec.to_dict(), attempt, resume_dict(resume),
                                  str(path), str(out), str(cache_dir) if cache_dir else None,
                                  o.threads))
        errors: list[str] = []
        waiting = set(range(len(jobs)))
        while waiting:
            for i in sorted(waiting):
                done = jobs[i].done()
                for rec in tails[i].read():
                    write(rec, False)
                if done:
                    for rec in tails[i].read():
                        write(rec, False)
                    waiting.discard(i)
                    spec = todo[i][0]
                    try:
                        jobs[i].result()
                    except Exception as err:  # the job itself died (not a failed run)
                        errors.append(f"run {spec.run_id} [{spec.label}, seed {spec.seed}]: "
                                      f"job {jobs[i].job_id} failed: {type(err).__name__}: "
                                      f"{str(err)[-500:]}")
                    tails[i].path.unlink(missing_ok=True)
            if waiting:
                time.sleep(o.poll_seconds)
        return errors
