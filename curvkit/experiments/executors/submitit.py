"""The ``submitit`` executor: every run is a Slurm job (through submitit).

A job cannot reach this process, so each job appends its records to its own file
``DIR/submitit/records/<run>.<attempt>.jsonl`` (one writer per file, fsync'ed lines, like
``results.jsonl``), and this process tails those files, moving every complete line into
``results.jsonl`` as it appears. The results directory must be on a filesystem the nodes
share (as Slurm setups have). ``cluster = "local"`` runs the jobs as local processes
through submitit's local executor (what the tests use); ``"debug"`` runs them in this
process. Needs the ``slurm`` extra.

Jobs outlive a killed ``ablate``: the ids of the jobs in flight are kept in
``DIR/submitit/jobs.json``, and the next command on the directory cancels those still
running before it resumes their runs (from their checkpoints, as with any executor).
"""

from __future__ import annotations

import json
import os
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from curvkit.errors import ConfigError
from curvkit.experiments.executors.base import Executor, Pending, Write, resume_dict, run_one
from curvkit.experiments.store import ResultsWriter, validate_record, write_json_atomic
from curvkit.options import option

FOLDER = "submitit"
JOBS = "jobs.json"       # the jobs of the command in progress (cancelled if it was killed)


def _job(spec: dict[str, Any], attempt: int, resume: dict[str, Any] | None, records: str,
         out: str, cache_dir: Any, threads: int) -> str:
    with ResultsWriter(records) as writer:
        return run_one(spec, attempt, resume, writer.append, out, cache_dir, threads)


def stop_orphans(folder: Path, submitit: Any) -> None:
    """Cancel the jobs of an earlier command on this directory that was killed: they would
    go on writing the checkpoints of the runs this command resumes. Local jobs are
    processes of this machine (their id is their pid, checked to be a submitit job)."""
    try:
        listed = json.loads((folder / JOBS).read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return
    cluster, ids = listed.get("cluster"), [str(i) for i in listed.get("jobs", [])]
    for job_id in ids:
        if cluster == "slurm":
            try:
                submitit.SlurmJob(folder / "logs", job_id).cancel(check=False)
            except Exception as err:  # already gone, or scancel unavailable here
                warnings.warn(f"submitit: could not cancel job {job_id} of an earlier "
                              f"command ({err})", UserWarning, stacklevel=2)
        elif cluster == "local" and job_id.isdigit():
            pid = int(job_id)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"submitit" in cmdline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                deadline = time.monotonic() + 10
                while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
    (folder / JOBS).unlink(missing_ok=True)


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
        stop_orphans(folder, submitit)
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
        write_json_atomic(folder / JOBS, {"cluster": ex.cluster,
                                          "jobs": [str(j.job_id) for j in jobs]})
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
        (folder / JOBS).unlink(missing_ok=True)
        return errors
