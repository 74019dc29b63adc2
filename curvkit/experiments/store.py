"""The results store: ``results.jsonl``, one JSON object per line, appended durably.

Durability. Every record is one line written with a single ``os.write`` on a descriptor
opened with ``O_APPEND``, then ``os.fsync``'ed. A process killed by SIGKILL therefore
leaves every line it finished writing intact, and at worst one torn last line (a write
cut short: a multi-page write interrupted by the fatal signal, a full disk, a crash of the
machine); readers skip a line that does not parse, and
the writer truncates a torn tail (bytes after the last newline) before it appends, so the
file is valid JSONL again. Exactly one process writes a results file: ``ablate --jobs N``
workers send their records to the parent, and under torch.distributed only rank 0 writes.

Records (``type``)::

    start  run, attempt, config_id, label, seed, config, params, time
    steps  run, attempt, step[], loss[], time[], time_curvature[], accepted[], nonfinite,
           rejected, info{key: []}       (per-step values, a chunk of consecutive steps)
    eval   run, attempt, step, time, wall, {train,val,test}_{loss,accuracy}, snapshot{}
    end    run, attempt, status (finished | diverged | failed), steps, time, wall, final{},
           nonfinite, rejected, reason / error

Runs and attempts. A run id is the hash of the fully resolved config and the seed. A run
that was interrupted is restarted with ``attempt + 1`` (finished runs are never rerun;
failed ones only with ``--retry-failed``); readers take, per run, the latest attempt that
has an ``end`` record, else the latest attempt (a partial run), and ignore the records of
every other attempt, so an interrupted attempt never duplicates data.
Non-finite floats are written as ``null`` (strict JSON).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = "results.jsonl"
TERMINAL = ("finished", "diverged", "failed")


def _finite(value: Any) -> Any:
    """Non-finite floats → None, recursively (tensors and numpy scalars → Python numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _finite(tolist())
    item = getattr(value, "item", None)
    if callable(item):
        return _finite(item())
    return str(value)


def encode(record: dict[str, Any]) -> bytes:
    """One record as one line of strict JSON (UTF-8, newline-terminated)."""
    return (json.dumps(_finite(record), separators=(",", ":"), allow_nan=False) + "\n").encode()


class ResultsWriter:
    """Appends records to a results file: one ``write`` per line, flushed and fsync'ed."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired = repair(self.path)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict[str, Any]) -> None:
        data = encode(record)
        view = memoryview(data)
        # a regular file takes the whole line in one write; the loop only matters for
        # short writes (a full disk)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def repair(path: str | os.PathLike) -> int:
    """Truncate a torn last line (bytes after the last newline); returns bytes removed."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with path.open("rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        # scan backwards for the last newline
        pos, chunk = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            fh.seek(start)
            block = fh.read(pos - start)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
    return size - keep


def read_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The records of a results file; lines that do not parse (a torn tail) are skipped."""
    path = Path(path)
    if not path.exists():
        return
    with path.open("rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break  # torn last line: the writer repairs it before appending
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(record, dict) and "type" in record and "run" in record:
                yield record


@dataclass
class Run:
    """The records of one attempt of one run, as readers see it."""

    run: str
    attempt: int
    start: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        return self.end["status"] if self.end else "incomplete"

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def label(self) -> str:
        return self.start.get("label", self.run)

    @property
    def config_id(self) -> str:
        return self.start.get("config_id", self.run)

    @property
    def seed(self) -> int:
        return int(self.start.get("seed", 0))

    def step_series(self, key: str) -> tuple[list[int], list[Any]]:
        """(steps, values) of a per-step series: ``loss``, ``time``, ``time_curvature``,
        ``accepted``, or an ``info`` key."""
        xs, ys = [], []
        for rec in self.steps:
            values = rec.get(key) if key in rec else rec.get("info", {}).get(key)
            if values is None:
                continue
            xs.extend(rec["step"])
            ys.extend(values)
        return xs, ys


def collect_runs(records: Iterable[dict[str, Any]]) -> dict[str, Run]:
    """Per run id, the attempt readers use: the latest attempt with an ``end`` record, else
    the latest attempt (a run in progress or interrupted)."""
    attempts: dict[str, dict[int, Run]] = {}
    for rec in records:
        rid, att = str(rec["run"]), int(rec.get("attempt", 1))
        run = attempts.setdefault(rid, {}).setdefault(att, Run(rid, att))
        kind = rec["type"]
        if kind == "start":
            run.start = rec
        elif kind == "steps":
            run.steps.append(rec)
        elif kind == "eval":
            run.evals.append(rec)
        elif kind == "end" and run.end is None:
            run.end = rec
    out = {}
    for rid, by_attempt in attempts.items():
        ended = [a for a in sorted(by_attempt) if by_attempt[a].finished]
        out[rid] = by_attempt[ended[-1]] if ended else by_attempt[max(by_attempt)]
    return out


def run_status(path: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """Per run id: (status of the chosen attempt, highest attempt number seen)."""
    highest: dict[str, int] = {}
    records = list(read_records(path))
    for rec in records:
        rid = str(rec["run"])
        highest[rid] = max(highest.get(rid, 0), int(rec.get("attempt", 1)))
    return {rid: (run.status, highest[rid]) for rid, run in collect_runs(records).items()}


def load_runs(directory: str | os.PathLike) -> dict[str, Run]:
    return collect_runs(read_records(Path(directory) / RESULTS))


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_text_atomic(path, json.dumps(_finite(data), indent=1, allow_nan=False) + "\n")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a whole file so that readers see the old or the new content, never a mix."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
