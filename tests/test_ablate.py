"""Ablation grids: expansion, validation before any run, durable resumable results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from curvkit.cli import main
from curvkit.errors import ConfigError
from curvkit.experiments.ablate import build_grid, prepare_directory, run_grid, set_path
from curvkit.experiments.config import parse_run_config
from curvkit.experiments.store import (
    RESULTS,
    ResultsWriter,
    StoreWarning,
    collect_runs,
    encode,
    read_records,
    repair,
)

TASK = """
[task]
dataset = { name = "teacher", n_train = 48, n_val = 8, n_test = 16, in_dim = 4, out_dim = 2 }
model = { name = "mlp", width = 6, depth = 1 }
batch_size = 16
"""


def config(train: str = "steps = 6\nseeds = [0, 1]\neval_every = 3\ndtype = \"float64\"",
           optimizer: str = "lr = 0.1", ablate: str = "", extra: str = "") -> str:
    text = f"{extra}\n{TASK}\n[train]\n{train}\n\n[optimizer]\n{optimizer}\n"
    if ablate:
        text += f"\n[ablate]\n{ablate}\n"
    return textwrap.dedent(text)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CURVKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def ablate(cfg: Path, out: Path, *extra: str) -> int:
    return main(["ablate", str(cfg), "--out", str(out), "--no-progress", "--threads", "0",
                 *extra])


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def toml_doc(text: str) -> dict:
    import tomllib

    return tomllib.loads(text)


# --------------------------------------------------------------------------- grid
def test_grid_product_labels_and_nested_keys():
    doc = toml_doc(config(ablate='"optimizer.lr" = [0.1, 0.2]\n'
                                 'optimizer.solver.momentum = [0.0, 0.9]'))
    grid = build_grid(doc, check_build=False)
    assert [p.label for p in grid.points] == [
        "lr=0.1, momentum=0", "lr=0.1, momentum=0.9", "lr=0.2, momentum=0",
        "lr=0.2, momentum=0.9"]
    # the solver was given by default; setting an option made it a table
    assert grid.points[1].doc["optimizer"]["solver"] == {"name": "direct", "momentum": 0.9}
    assert len(grid.runs()) == 8
    ids = {r.run_id for r in grid.runs()}
    assert len(ids) == 8
    # the run id depends on the resolved config and the seed, nothing else
    again = build_grid(doc, check_build=False)
    assert [r.run_id for r in again.runs()] == [r.run_id for r in grid.runs()]


def test_set_path_turns_named_part_into_table():
    doc = {"optimizer": {"preconditioner": "kronecker"}}
    set_path(doc, "optimizer.preconditioner.damping", 0.1)
    assert doc == {"optimizer": {"preconditioner": {"name": "kronecker", "damping": 0.1}}}


def test_whole_optimizer_tables_with_torch_baseline():
    doc = toml_doc(config(ablate='optimizer = [{ label = "sgd", lr = 0.1 }, '
                                 '{ torch = "Adam", lr = 0.01, betas = [0.8, 0.9] }]'))
    grid = build_grid(doc, check_build=False)
    assert [p.label for p in grid.points] == ["sgd", "torch.Adam lr=0.01"]
    cfg = grid.points[1].config
    assert cfg.is_torch and cfg.optimizer.kwargs == {"lr": 0.01, "betas": (0.8, 0.9)}


def test_incompatible_points_are_skipped_with_reason():
    doc = toml_doc(config(optimizer='lr = 0.1\nestimator = "outer_product"',
                          ablate='"optimizer.preconditioner" = ["identity", "kronecker"]'))
    grid = build_grid(doc, check_build=False)
    assert [p.skipped for p in grid.points] == ["", "incompatible"]
    assert "needs capability 'kronecker'" in grid.points[1].reason
    assert "optimizer.preconditioner" in grid.points[1].reason


def test_unavailable_parts_error_or_skip():
    text = config(ablate='"optimizer.preconditioner" = ["identity", "no_such_structure"]')
    with pytest.raises(ConfigError, match=r"ablate point 2 \[preconditioner=no_such_structure\]"
                                          r": optimizer\.preconditioner: unknown "
                                          r"preconditioner 'no_such_structure'"):
        build_grid(toml_doc(text), check_build=False)
    skip = text.replace("[ablate]\n", '[ablate]\nunavailable = "skip"\n')
    grid = build_grid(toml_doc(skip), check_build=False)
    assert grid.points[1].skipped == "unavailable"
    assert "'no_such_structure' is not registered" in grid.points[1].reason


def test_other_errors_abort_before_any_run(tmp_path, capsys):
    cfg = write(tmp_path, config(ablate='"optimizer.lr" = [0.1, "fast"]'))
    assert ablate(cfg, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "ablate point 2 [lr=fast]: optimizer.lr: expected float, got 'fast'" in err
    assert not (tmp_path / "out" / RESULTS).exists()


def test_ablate_key_errors():
    for bad, msg in [('"optimizer.lr" = 0.1', r"ablate\.optimizer\.lr: expected a list"),
                     ('"optimizer.lr" = []', r"ablate\.optimizer\.lr: expected a non-empty"),
                     ('"model.width" = [1]', r"ablate\.model\.width: grid keys start with"),
                     ('"train.seeds" = [[1]]', r"ablate\.train\.seeds: seeds are always"),
                     ('unavailable = "ignore"', r"ablate\.unavailable: expected one of")]:
        with pytest.raises(ConfigError, match=msg):
            build_grid(toml_doc(config(ablate=bad)), check_build=False)


def test_duplicate_points_are_skipped():
    doc = toml_doc(config(ablate='"optimizer.lr" = [1.0, 1]'))
    grid = build_grid(doc, check_build=False)
    assert [p.skipped for p in grid.points] == ["", "duplicate"]


# --------------------------------------------------------------------------- store
def test_writer_one_line_per_record_strict_json(tmp_path):
    path = tmp_path / RESULTS
    with ResultsWriter(path) as w:
        w.append({"type": "eval", "run": "a", "loss": float("nan"), "x": [1.0, float("inf")]})
        w.append({"type": "end", "run": "a", "status": "finished"})
    raw = path.read_bytes()
    assert raw.count(b"\n") == 2 and b"NaN" not in raw and b"Infinity" not in raw
    assert lines(path)[0]["loss"] is None and lines(path)[0]["x"] == [1.0, None]
    assert encode({"a": 1}).endswith(b"\n")


def test_torn_tail_tolerated_by_reader_and_repaired_by_writer(tmp_path):
    path = tmp_path / RESULTS
    with ResultsWriter(path) as w:
        w.append({"type": "start", "run": "r", "attempt": 1})
    full = path.read_bytes()
    torn = encode({"type": "end", "run": "r", "attempt": 1, "status": "finished",
                   "steps": 0})[:17]
    path.write_bytes(full + torn)
    with pytest.warns(StoreWarning, match=r"results.jsonl:2: skipped an incomplete last line"):
        assert [r["type"] for r in read_records(path)] == ["start"]
    assert repair(path) == len(torn)
    assert path.read_bytes() == full
    path.write_bytes(full + torn)
    with ResultsWriter(path) as w:  # the writer repairs before appending
        assert w.repaired == len(torn)
        w.append({"type": "end", "run": "r", "attempt": 1, "status": "finished", "steps": 0})
    assert [r["type"] for r in read_records(path)] == ["start", "end"]


def test_readers_pick_one_attempt_per_run():
    recs = [
        {"type": "start", "run": "r", "attempt": 1},
        {"type": "steps", "run": "r", "attempt": 1, "step": [0], "loss": [9.0], "time": [0]},
        {"type": "start", "run": "r", "attempt": 2},
        {"type": "steps", "run": "r", "attempt": 2, "step": [0], "loss": [1.0], "time": [0]},
        {"type": "end", "run": "r", "attempt": 2, "status": "finished", "steps": 1},
        {"type": "start", "run": "s", "attempt": 1},
    ]
    runs = collect_runs(recs)
    assert runs["r"].attempt == 2 and runs["r"].step_series("loss") == ([0], [1.0])
    assert runs["s"].status == "incomplete"


# --------------------------------------------------------------------------- resume
def test_rerun_of_finished_ablation_adds_nothing(tmp_path, capsys):
    cfg = write(tmp_path, config(ablate='"optimizer.lr" = [0.05, 0.1]'))
    out = tmp_path / "out"
    assert ablate(cfg, out) == 0
    before = (out / RESULTS).read_bytes()
    ends = [r for r in lines(out / RESULTS) if r["type"] == "end"]
    assert len(ends) == 4 and {e["status"] for e in ends} == {"finished"}
    capsys.readouterr()
    assert ablate(cfg, out) == 0
    assert "nothing to do: all 4 runs" in capsys.readouterr().out
    assert (out / RESULTS).read_bytes() == before
    assert (out / "config.toml").read_text() == cfg.read_text()


def test_refuses_directory_of_a_different_config(tmp_path, capsys):
    out = tmp_path / "out"
    assert ablate(write(tmp_path, config()), out) == 0
    capsys.readouterr()
    changed = write(tmp_path, config(optimizer="lr = 0.2"), "other.toml")
    assert ablate(changed, out) == 2
    err = capsys.readouterr().err
    assert "holds results of a different config" in err and "optimizer.lr" in err


def test_resume_after_torn_write(tmp_path):
    cfg = write(tmp_path, config())
    out = tmp_path / "out"
    assert ablate(cfg, out) == 0
    raw = (out / RESULTS).read_bytes()
    # cut the last run's final records mid-line, as a crash during a write would
    body = raw.splitlines(keepends=True)
    cut = b"".join(body[:-2]) + body[-2][: len(body[-2]) // 2]
    (out / RESULTS).write_bytes(cut)
    runs = collect_runs(read_records(out / RESULTS))
    unfinished = [r for r in runs.values() if not r.finished]
    assert len(unfinished) == 1
    assert ablate(cfg, out) == 0
    recs = lines(out / RESULTS)  # every line parses: the torn one was truncated
    victim = unfinished[0].run
    assert sorted({r["attempt"] for r in recs if r["run"] == victim}) == [1, 2]
    runs = collect_runs(recs)
    assert all(r.status == "finished" for r in runs.values())
    assert runs[victim].attempt == 2
    # the other run was not re-run
    others = [r for r in recs if r["run"] != victim and r["type"] == "start"]
    assert len(others) == 1


def test_resume_after_sigkill(tmp_path):
    cfg = write(tmp_path, config(
        train='steps = 1500\nseeds = [0, 1, 2]\neval_every = 500\ndtype = "float64"'))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "curvkit", "ablate", str(cfg), "--out",
                             str(out), "--no-progress"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    results = out / RESULTS
    deadline = time.monotonic() + 120
    killed_run = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            recs = list(read_records(results)) if results.exists() else []
            ended = {r["run"] for r in recs if r["type"] == "end"}
            partial = [r["run"] for r in recs if r["type"] == "steps" and r["run"] not in ended]
            if ended and partial:
                killed_run = partial[-1]
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and killed_run is None:
            proc.kill()
        proc.wait(timeout=30)
    assert killed_run is not None, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    before = list(read_records(results))
    finished_before = {r["run"] for r in before if r["type"] == "end"}

    assert ablate(cfg, out) == 0
    recs = lines(results)  # the file is valid JSONL
    assert recs[: len(before)] == before  # nothing already written was lost or rewritten
    ends = [r for r in recs if r["type"] == "end"]
    assert sorted(e["run"] for e in ends) == sorted({e["run"] for e in ends})  # no duplicates
    assert len(ends) == 3
    for run in finished_before:  # finished runs were not run again
        assert sum(r["type"] == "start" and r["run"] == run for r in recs) == 1
    chosen = collect_runs(recs)[killed_run]
    # continued from its checkpoint (attempt 1), or started over if it had none yet
    assert chosen.attempt in (1, 2) and chosen.status == "finished" and not chosen.damaged
    steps, _ = chosen.step_series("loss")
    assert steps == list(range(1500))  # records after the checkpoint were forgotten


def test_parallel_jobs_match_sequential(tmp_path):
    text = config()
    seq, par = tmp_path / "seq", tmp_path / "par"
    cfg = write(tmp_path, text)
    assert ablate(cfg, seq) == 0
    assert ablate(cfg, par, "--jobs", "2") == 0
    a, b = collect_runs(read_records(seq / RESULTS)), collect_runs(read_records(par / RESULTS))
    assert set(a) == set(b) and len(a) == 2
    for rid in a:
        assert b[rid].status == "finished"
        assert a[rid].step_series("loss")[1] == b[rid].step_series("loss")[1]
        assert a[rid].evals[-1]["test_loss"] == b[rid].evals[-1]["test_loss"]


def test_diverged_run_does_not_stop_the_grid(tmp_path):
    cfg = write(tmp_path, config(optimizer="lr = 1.0",
                                 ablate='"optimizer.lr" = [1e12, 0.1]'))
    out = tmp_path / "out"
    assert ablate(cfg, out) == 0
    runs = collect_runs(read_records(out / RESULTS))
    statuses = sorted(r.status for r in runs.values())
    assert statuses == ["diverged", "diverged", "finished", "finished"]
    div = next(r for r in runs.values() if r.status == "diverged")
    assert "exceeds diverge_factor" in div.end["reason"]
    # without the factor, the optimizer skips the non-finite steps until max_nonfinite
    cfg2 = write(tmp_path, config(
        train='steps = 8\nseeds = [0]\neval_every = 4\ndtype = "float64"\n'
              'diverge_factor = 0.0\nmax_nonfinite = 2', optimizer="lr = 1e200"), "b.toml")
    assert ablate(cfg2, tmp_path / "b") == 0
    (run,) = collect_runs(read_records(tmp_path / "b" / RESULTS)).values()
    assert run.status == "diverged", run.end
    assert "non-finite" in run.end["reason"]


def test_failed_run_recorded_and_grid_continues(tmp_path, monkeypatch, capsys):
    from curvkit.experiments import runner

    real = runner.train

    def flaky(cfg, seed, *a, **k):
        if seed == 1:
            raise RuntimeError("boom")
        return real(cfg, seed, *a, **k)

    monkeypatch.setattr(runner, "train", flaky)
    cfg = write(tmp_path, config())
    out = tmp_path / "out"
    assert ablate(cfg, out) == 1
    runs = collect_runs(read_records(out / RESULTS))
    failed = [r for r in runs.values() if r.status == "failed"]
    assert len(failed) == 1 and "RuntimeError: boom" in failed[0].end["error"]
    assert sum(r.status == "finished" for r in runs.values()) == 1
    # failed runs are terminal unless asked
    capsys.readouterr()
    assert ablate(cfg, out) == 0
    assert "nothing to do" in capsys.readouterr().out
    monkeypatch.setattr(runner, "train", real)
    assert ablate(cfg, out, "--retry-failed") == 0
    runs = collect_runs(read_records(out / RESULTS))
    assert all(r.status == "finished" for r in runs.values())


def test_prepare_directory_refuses_foreign_results(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / RESULTS).write_text("")
    with pytest.raises(ConfigError, match="no config.toml"):
        prepare_directory(out, "x = 1\n", {"x": 1})


def test_run_grid_api_with_explicit_seeds(tmp_path):
    doc = toml_doc(config())
    grid = build_grid(doc)
    out = prepare_directory(tmp_path / "o", config(), doc)
    result = run_grid(grid, out, seeds=[7], progress=False)
    assert result.todo == 1 and result.statuses == {"finished": 1}
    cfg = parse_run_config(doc)
    assert cfg.run_id(7) in collect_runs(read_records(out / RESULTS))
