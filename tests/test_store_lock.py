"""The results directory under faults: damaged records are skipped with file:line and their
runs re-run; one writer at a time (the lock), stale locks taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from curvkit.cli import main
from curvkit.experiments.lock import LOCK_FILE, DirectoryLock, LockedError, StaleLockWarning
from curvkit.experiments.report import build_report
from curvkit.experiments.store import (
    RESULTS,
    StoreWarning,
    collect_runs,
    load_runs,
    validate_record,
)

CONFIG = textwrap.dedent("""
    [task]
    dataset = { name = "teacher", n_train = 48, n_val = 8, n_test = 16, in_dim = 4, out_dim = 2 }
    model = { name = "mlp", width = 6, depth = 1 }
    batch_size = 16

    [train]
    steps = 8
    seeds = [0, 1]
    eval_every = 2
    checkpoint_every = 4
    dtype = "float64"

    [optimizer]
    lr = 0.1

    [ablate]
    "optimizer.lr" = [0.1, 0.05]
    """)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CURVKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-point × 2-seed ablation (copied by each test that damages it)."""
    d = tmp_path_factory.mktemp("finished")
    cfg = d / "cfg.toml"
    cfg.write_text(CONFIG)
    assert main(["ablate", str(cfg), "--out", str(d / "out"), "--no-progress"]) == 0
    return cfg, d / "out"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _losses(runs):
    return {rid: (r.step_series("loss")[1], [e["test_loss"] for e in r.evals])
            for rid, r in runs.items()}


def _damage_middle_steps(lines: list[bytes]) -> tuple[int, str]:
    """Cut the first steps line of a run in half (keeping its newline)."""
    i = next(i for i, ln in enumerate(lines) if b'"type":"steps"' in ln)
    rid = json.loads(lines[i])["run"]
    lines[i] = lines[i][: len(lines[i]) // 2] + b"\n"
    return i, rid


def _edit(kind: str, change):
    def damage(lines: list[bytes]) -> tuple[int, str]:
        i = next(i for i, ln in enumerate(lines) if f'"type":"{kind}"'.encode() in ln)
        rec = json.loads(lines[i])
        change(rec)
        lines[i] = json.dumps(rec).encode() + b"\n"
        return i, rec["run"]
    return damage


CASES = {
    "missing status": (_edit("end", lambda r: r.pop("status")), "status: missing"),
    "missing step": (_edit("steps", lambda r: r.pop("step")), "step: expected a list"),
    "train_loss abc": (_edit("eval", lambda r: r.update(train_loss="abc")),
                       "train_loss: expected a number or null, got 'abc'"),
    "attempt one": (_edit("end", lambda r: r.update(attempt="one")),
                    "attempt: expected an int >= 1, got 'one'"),
    "steps line cut in half": (_damage_middle_steps, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_record_is_skipped_with_file_line_and_its_run_rerun(tmp_path, finished, case):
    cfg, src = finished
    out = _copy(src, tmp_path / "out")
    reference = _losses(load_runs(src))
    damage, why = CASES[case]
    lines = (out / RESULTS).read_bytes().splitlines(keepends=True)
    index, victim = damage(lines)
    (out / RESULTS).write_bytes(b"".join(lines))

    with pytest.warns(StoreWarning) as caught:
        runs = load_runs(out)
    messages = [str(w.message) for w in caught]
    assert any(f"{out / RESULTS}:{index + 1}: skipped record: {why}" in m for m in messages), \
        messages
    assert runs[victim].status != "finished"  # never reported finished with a hole
    assert all(r.status == "finished" for rid, r in runs.items() if rid != victim)
    with pytest.warns(StoreWarning):
        build_report(out, log=lambda m: None)  # no traceback on its own files

    with pytest.warns(StoreWarning):
        assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    with pytest.warns(StoreWarning):  # the damaged line stays (append-only) and is skipped
        runs = load_runs(out)
    assert all(r.status == "finished" and not r.damaged for r in runs.values())
    assert _losses(runs) == reference  # the victim was re-run; nothing else changed
    starts = [json.loads(ln) for ln in (out / RESULTS).read_bytes().splitlines()[len(lines):]
              if b'"type":"start"' in ln]
    assert [s["run"] for s in starts] == [victim]


def test_validate_record_names_the_field():
    assert validate_record([1]) == "expected a JSON object, got list"
    assert validate_record({"type": "steps", "run": "r", "attempt": 1, "step": [0, 1],
                            "loss": [1.0], "time": [0.0, 0.1]}) == "loss: 1 entries, but 2 steps"
    assert validate_record({"type": "steps", "run": "r", "attempt": 1, "step": [0, 2],
                            "loss": [1, 2], "time": [0, 0]}) == "step: not consecutive"
    assert validate_record({"type": "end", "run": "r", "attempt": True, "status": "finished",
                            "steps": 1}).startswith("attempt: expected an int")
    assert validate_record({"type": "end", "run": "r", "attempt": 1, "status": "done",
                            "steps": 1}).startswith("status: expected one of")
    assert validate_record({"type": "eval", "run": "r", "attempt": 1, "step": 0,
                            "time": 0.0, "test_loss": None}) == ""


def test_end_record_disagreeing_with_the_steps_is_not_finished():
    recs = [{"type": "start", "run": "r", "attempt": 1},
            {"type": "steps", "run": "r", "attempt": 1, "step": [0, 1], "loss": [1, 1],
             "time": [0, 0]},
            {"type": "end", "run": "r", "attempt": 1, "status": "finished", "steps": 3}]
    with pytest.warns(StoreWarning, match="says 3 steps, but steps 0..1 are recorded"):
        run = collect_runs(recs)["r"]
    assert run.status == "incomplete" and run.damaged


def test_resume_record_forgets_what_followed_the_checkpoint():
    step = {"type": "steps", "run": "r", "attempt": 1, "time": [0, 0]}
    recs = [{"type": "start", "run": "r", "attempt": 1},
            {**step, "step": [0, 1], "loss": [5, 4]},
            {"type": "eval", "run": "r", "attempt": 1, "step": 2, "time": 0.0},
            {**step, "step": [2, 3], "loss": [3, 2]},        # after the checkpoint at 2
            {"type": "eval", "run": "r", "attempt": 1, "step": 4, "time": 0.0},
            {"type": "resume", "run": "r", "attempt": 1, "step": 2},
            {**step, "step": [2, 3], "loss": [3.5, 2.5]},
            {"type": "end", "run": "r", "attempt": 1, "status": "finished", "steps": 4}]
    run = collect_runs(recs)["r"]
    assert run.step_series("loss") == ([0, 1, 2, 3], [5, 4, 3.5, 2.5])
    assert [e["step"] for e in run.evals] == [2] and run.status == "finished"


# --------------------------------------------------------------------------- lock
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(directory: Path, **info) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    path.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "command": "x",
                                "since": "then", **info}))
    return path


def test_second_process_is_refused_naming_the_holder(tmp_path, finished, capsys):
    cfg, _ = finished
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(out, pid=holder.pid, command="curvkit ablate other.toml",
                    since="2026-01-01 00:00:00 UTC")
        assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {holder.pid} on host {socket.gethostname()} since " \
               f"2026-01-01 00:00:00 UTC (command: curvkit ablate other.toml)" in err
        assert not (out / RESULTS).exists()
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, finished):
    cfg, _ = finished
    out = tmp_path / "out"
    dead = _dead_pid()
    lock = _write_lock(out, pid=dead)
    with pytest.warns(StaleLockWarning, match=f"process {dead} on .* is not alive"):
        assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert not lock.exists()  # released at the end
    assert len(load_runs(out)) == 4


def test_lock_of_another_host_and_empty_lock(tmp_path):
    d = tmp_path / "d"
    _write_lock(d, host="elsewhere", pid=os.getpid())
    with pytest.raises(LockedError, match=f"on host elsewhere .*remove {d / LOCK_FILE}"):
        DirectoryLock(d).acquire()
    (d / LOCK_FILE).write_text("")  # killed between creating and writing it
    with pytest.raises(LockedError, match="a process that is creating it"):
        DirectoryLock(d).acquire()
    old = time.time() - 3600
    os.utime(d / LOCK_FILE, (old, old))
    with pytest.warns(StaleLockWarning, match="empty lock file"):
        with DirectoryLock(d, command="test") as lock:
            assert json.loads((d / LOCK_FILE).read_text())["command"] == "test"
            with pytest.raises(LockedError, match="already locked by this process"):
                DirectoryLock(d).acquire()
            assert lock.held
    assert not (d / LOCK_FILE).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with DirectoryLock(d):  # free again: no warning
            pass
