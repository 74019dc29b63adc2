"""The base of executors: run pending runs, hand their records to one writer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from curvkit.experiments.runner import Resume, RunSpec
from curvkit.parts import Part

# (spec, attempt if the run starts over, the interrupted attempt to resume or None)
Pending = tuple[RunSpec, int, "Resume | None"]
# write(record, per_step): the writer; per_step is True when ``steps`` progress was
# already reported through the ``steps`` callback
Write = Callable[[dict[str, Any], bool], None]


class Executor(Part):
    """Runs pending runs somewhere and streams their records back to one writer."""

    kind = "executor"

    def run(self, todo: list[Pending], write: Write, *, out: Path, cache_dir: Any,
            steps: Callable[[str, int], None]) -> list[str]:
        """Execute every pending run; call ``write`` with each record, in the order each
        run emits them (runs may interleave). Returns errors of runs whose execution
        itself failed (a worker died); exceptions inside a run are ``failed`` records.
        Every executor part defines it; the base says which one did not."""
        raise TypeError(f"executor {getattr(self, 'name', '?')!r} "
                        f"({type(self).__name__}) does not define run()")


def run_one(spec: dict[str, Any], attempt: int, resume: dict[str, Any] | None,
            emit: Callable[[dict[str, Any]], None], out: str, cache_dir: Any,
            threads: int = 0) -> str:
    """Execute one run from plain data (what remote workers receive); returns its id."""
    from curvkit.experiments.runner import execute

    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    run = RunSpec(**spec)
    execute(run, emit, attempt=attempt, cache_dir=cache_dir, checkpoint_dir=out,
            resume=Resume(**resume) if resume else None)
    return run.run_id


def resume_dict(resume: Resume | None) -> dict[str, Any] | None:
    return None if resume is None else {"attempt": resume.attempt, "steps": resume.steps,
                                         "last_eval": resume.last_eval}
