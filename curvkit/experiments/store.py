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
           nonfinite, rejected, state_bytes, preconditioner_bytes, reason / error
    resume run, attempt, step     (the attempt continues from its checkpoint at ``step``:
                                   readers forget its steps >= step and evals > step
                                   written before this record)

Validation. Readers never trust the file: every line is parsed and checked field by field
(:func:`validate_record`); a line that fails is skipped with a :class:`StoreWarning`
naming ``file:line`` and the field. Each attempt is then checked as a whole
(:meth:`Run.check`): its steps must be consecutive from 0 and agree with its ``end``
record, so an attempt with a lost or skipped ``steps`` line is *damaged*: it is never
reported as finished, and ``ablate``/``train`` run it again as a new attempt.

Runs and attempts. A run id is the hash of the fully resolved config and the seed. A run
that was interrupted continues from its checkpoint in the same attempt (a ``resume``
record, see :mod:`curvkit.experiments.checkpoint`) when the records up to the checkpoint
are whole, else it is restarted with ``attempt + 1`` (finished runs are never rerun;
failed ones only with ``--retry-failed``); readers take, per run, the latest attempt that
has an ``end`` record, else the latest attempt (a partial run), and ignore the records of
every other attempt, so an interrupted attempt never duplicates data.
Non-finite floats are written as ``null`` (strict JSON).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = "results.jsonl"
TERMINAL = ("finished", "diverged", "failed")
RECORD_TYPES = ("start", "steps", "eval", "end", "resume")


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


class StoreWarning(UserWarning):
    """A record of a results file was skipped (or a run found damaged) while reading."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any, none: bool = False) -> bool:
    if value is None:
        return none
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _list_of(rec: dict[str, Any], key: str, check: Callable[[Any], bool], n: int | None,
             what: str) -> str:
    values = rec.get(key)
    if not isinstance(values, list):
        return f"{key}: expected a list, got {values!r:.60}"
    if n is not None and len(values) != n:
        return f"{key}: {len(values)} entries, but {n} steps"
    for i, v in enumerate(values):
        if not check(v):
            return f"{key}[{i}]: expected {what}, got {v!r:.60}"
    return ""


def validate_record(rec: Any) -> str:
    """Why a parsed line is not a valid record ("" if it is). Checks every field the
    readers use, with its type, so that nothing downstream meets a surprise."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    kind = rec.get("type")
    if kind not in RECORD_TYPES:
        return f"type: expected one of {', '.join(RECORD_TYPES)}, got {kind!r:.60}"
    if not isinstance(rec.get("run"), str) or not rec["run"]:
        return f"run: expected a run id (str), got {rec.get('run')!r:.60}"
    if "attempt" not in rec:
        return "attempt: missing"
    if not _is_int(rec["attempt"]) or rec["attempt"] < 1:
        return f"attempt: expected an int >= 1, got {rec['attempt']!r:.60}"
    if kind == "start":
        for key, ok, what in (("config_id", lambda v: isinstance(v, str), "str"),
                              ("label", lambda v: isinstance(v, str), "str"),
                              ("seed", _is_int, "int"),
                              ("index", _is_int, "int"),
                              ("config", lambda v: isinstance(v, dict), "a table")):
            if key in rec and not ok(rec[key]):
                return f"{key}: expected {what}, got {rec[key]!r:.60}"
        return ""
    if kind == "steps":
        why = _list_of(rec, "step", lambda v: _is_int(v) and v >= 0, None, "a step number")
        if why:
            return why
        n = len(rec["step"])
        if n == 0:
            return "step: empty"
        if any(b != a + 1 for a, b in zip(rec["step"], rec["step"][1:])):
            return "step: not consecutive"
        why = (_list_of(rec, "loss", lambda v: _is_num(v, none=True), n, "a number or null")
               or _list_of(rec, "time", _is_num, n, "a number"))
        if why:
            return why
        for key in ("time_curvature", "accepted"):
            if key in rec:
                why = _list_of(rec, key, lambda v: _is_num(v, none=True), n, "a number")
                if why:
                    return why
        for key in ("nonfinite", "rejected"):
            if key in rec and not _is_int(rec[key]):
                return f"{key}: expected an int, got {rec[key]!r:.60}"
        info = rec.get("info", {})
        if not isinstance(info, dict):
            return f"info: expected a table, got {info!r:.60}"
        for key, values in info.items():
            if not isinstance(values, list) or len(values) != n:
                return f"info.{key}: expected a list of {n} entries"
        return ""
    if kind == "eval":
        if not _is_int(rec.get("step")) or rec["step"] < 0:
            return f"step: expected a step number, got {rec.get('step')!r:.60}"
        for key, value in rec.items():
            if key in ("time", "wall") or key.endswith(("_loss", "_accuracy")):
                if not _is_num(value, none=True):
                    return f"{key}: expected a number or null, got {value!r:.60}"
        if "snapshot" in rec and not isinstance(rec["snapshot"], dict):
            return f"snapshot: expected a table, got {rec['snapshot']!r:.60}"
        return ""
    if kind == "end":
        if "status" not in rec:
            return "status: missing"
        if rec["status"] not in TERMINAL:
            return f"status: expected one of {', '.join(TERMINAL)}, got {rec['status']!r:.60}"
        if "steps" in rec and not _is_int(rec["steps"]):
            return f"steps: expected an int, got {rec['steps']!r:.60}"
        for key in ("time", "wall"):
            if key in rec and not _is_num(rec[key], none=True):
                return f"{key}: expected a number, got {rec[key]!r:.60}"
        for key in ("nonfinite", "rejected", "state_bytes", "preconditioner_bytes"):
            if key in rec and not _is_int(rec[key]):
                return f"{key}: expected an int, got {rec[key]!r:.60}"
        final = rec.get("final", {})
        if not isinstance(final, dict) or any(
                k.endswith(("_loss", "_accuracy")) and not _is_num(v, none=True)
                for k, v in final.items()):
            return f"final: expected a table of numbers, got {final!r:.60}"
        for key in ("reason", "error"):
            if key in rec and not isinstance(rec[key], str):
                return f"{key}: expected str, got {rec[key]!r:.60}"
        return ""
    # resume
    if not _is_int(rec.get("step")) or rec["step"] < 0:
        return f"step: expected a step number, got {rec.get('step')!r:.60}"
    return ""


def _warn(message: str) -> None:
    warnings.warn(message, StoreWarning, stacklevel=3)


def read_records(path: str | os.PathLike, warn: bool = True) -> Iterator[dict[str, Any]]:
    """The valid records of a results file. A line that does not parse or is not a valid
    record (:func:`validate_record`) is skipped with a :class:`StoreWarning` naming
    ``file:line`` and why; a torn last line (no newline: an interrupted write, which the
    writer truncates before it appends) ends the file."""
    path = Path(path)
    if not path.exists():
        return
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                if warn:
                    _warn(f"{path}:{lineno}: skipped an incomplete last line (an interrupted "
                          f"write; the next writer truncates it)")
                break
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                why = "not UTF-8"
            except json.JSONDecodeError as err:
                why = f"not valid JSON ({err.msg} at column {err.colno})"
            else:
                why = validate_record(record)
                if not why:
                    yield record
                    continue
            if warn:
                _warn(f"{path}:{lineno}: skipped record: {why}")


@dataclass
class Run:
    """The records of one attempt of one run, as readers see it."""

    run: str
    attempt: int
    start: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    damaged: str = ""          # why the records of this attempt are not whole ("" if they are)

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

    @property
    def steps_done(self) -> int:
        """Steps recorded (the records are consecutive from step 0 unless ``damaged``)."""
        return self.steps[-1]["step"][-1] + 1 if self.steps else 0

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

    def resume_at(self, step: int) -> None:
        """Forget what an interrupted process recorded after its checkpoint at ``step``
        (a ``resume`` record: the run continues from there)."""
        kept = []
        for rec in self.steps:
            if rec["step"][0] >= step:
                continue
            if rec["step"][-1] >= step:  # a chunk across the checkpoint (not written so)
                n = step - rec["step"][0]
                rec = {**rec, **{k: v[:n] for k, v in rec.items()
                                 if isinstance(v, list) and len(v) == len(rec["step"])},
                       "info": {k: v[:n] for k, v in rec.get("info", {}).items()}}
            kept.append(rec)
        self.steps = kept
        self.evals = [e for e in self.evals if e["step"] <= step]
        self.end = None

    def check(self) -> str:
        """Why this attempt's records are not whole: steps missing (a skipped or lost line),
        an end record whose step count disagrees with the steps recorded, or (finished runs)
        an evaluation missing at step 0, every ``eval_every`` steps or the last step."""
        expected = 0
        for rec in self.steps:
            first = rec["step"][0]
            if first != expected:
                if first > expected:
                    return f"steps {expected}..{first - 1} are missing"
                return f"step {first} is recorded twice"
            expected = rec["step"][-1] + 1
        if self.end is not None and self.end["status"] != "failed" and \
                self.end.get("steps", expected) != expected:
            return (f"its end record says {self.end['steps']} steps, but steps "
                    f"0..{expected - 1} are recorded")
        if self.end is not None and not self.start:
            return "its start record is missing"
        if self.end is not None and self.end["status"] == "finished":
            every = self.start.get("config", {}).get("train", {}).get("eval_every")
            if _is_int(every) and every > 0:
                wanted = {0, expected, *range(every, expected + 1, every)}
                lost = sorted(wanted - {e["step"] for e in self.evals})
                if lost:
                    return f"its evaluation at step {lost[0]} is missing"
        return ""


def collect_runs(records: Iterable[dict[str, Any]], source: str = "results",
                 warn: bool = True) -> dict[str, Run]:
    """Per run id, the attempt readers use: the latest whole attempt with an ``end`` record,
    else the latest attempt (a run in progress, interrupted, or damaged: never reported as
    finished). Invalid records are skipped with a warning."""
    attempts: dict[str, dict[int, Run]] = {}
    for i, rec in enumerate(records):
        why = validate_record(rec)  # again: records may come from elsewhere than a file
        if why:
            if warn:
                _warn(f"{source}: record {i + 1}: skipped: {why}")
            continue
        rid, att = str(rec["run"]), int(rec.get("attempt", 1))
        run = attempts.setdefault(rid, {}).setdefault(att, Run(rid, att))
        kind = rec["type"]
        if kind == "start":
            run.start = rec
        elif kind == "steps":
            run.steps.append(rec)
        elif kind == "eval":
            run.evals.append(rec)
        elif kind == "resume":
            run.resume_at(int(rec["step"]))
        elif kind == "end" and run.end is None:
            run.end = rec
    out = {}
    for rid, by_attempt in attempts.items():
        for run in by_attempt.values():
            run.damaged = run.check()
            if run.damaged and run.end is not None:
                if warn:
                    _warn(f"{source}: run {rid} attempt {run.attempt} ended "
                          f"{run.end['status']!r}, but {run.damaged}; it counts as "
                          f"unfinished and is re-run on resume")
                run.end = None
        ended = [a for a in sorted(by_attempt) if by_attempt[a].finished]
        out[rid] = by_attempt[ended[-1]] if ended else by_attempt[max(by_attempt)]
    return out


def run_status(path: str | os.PathLike) -> dict[str, tuple[str, int]]:
    """Per run id: (status of the chosen attempt, highest attempt number seen)."""
    return {rid: (run.status, attempt)
            for rid, (run, attempt) in load_attempts(path).items()}


def load_attempts(path: str | os.PathLike) -> dict[str, tuple[Run, int]]:
    """Per run id: (the attempt readers use, highest attempt number seen)."""
    highest: dict[str, int] = {}
    records = list(read_records(path))
    for rec in records:
        rid = str(rec["run"])
        highest[rid] = max(highest.get(rid, 0), int(rec["attempt"]))
    return {rid: (run, highest[rid])
            for rid, run in collect_runs(records, str(path)).items()}


def load_runs(directory: str | os.PathLike) -> dict[str, Run]:
    path = Path(directory) / RESULTS
    return collect_runs(read_records(path), str(path))


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
