"""Kill tests: SIGKILL ``train`` / ``ablate`` at random moments (seeded, bounded), resume,
and compare with an uninterrupted run: no duplicate, torn, lost or extra record."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from curvkit.cli import main
from curvkit.experiments.checkpoint import CHECKPOINTS
from curvkit.experiments.lock import LOCK_FILE
from curvkit.experiments.store import RESULTS, collect_runs, load_runs, read_records

TRAIN = textwrap.dedent("""
    [task]
    dataset = {{ name = "teacher", n_train = 64, n_val = 16, n_test = 16, in_dim = 4, out_dim = 2 }}
    model = {{ name = "mlp", width = 6, depth = 1 }}
    batch_size = 16

    [train]
    steps = {steps}
    seeds = [0, 1]
    eval_every = 10
    checkpoint_every = 20
    dtype = "float64"

    [optimizer]
    lr = 0.1
    estimator = "ggn"
    preconditioner = "kronecker"
    {ablate}
    """)
GRID = '[ablate]\noptimizer = [{ label = "kfac", lr = 0.1, estimator = "ggn", ' \
       'preconditioner = "kronecker" }, { label = "Adam", torch = "Adam", lr = 0.01 }]'


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CURVKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def _config(tmp_path: Path, steps: int, ablate: str = "") -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(TRAIN.format(steps=steps, ablate=ablate))
    return path


def _signature(runs) -> dict:
    """What must not depend on interruptions: per run, status, every step's loss and
    accepted flag, every evaluation's losses."""
    out = {}
    for rid, r in runs.items():
        evals = [(e["step"], e.get("train_loss"), e.get("test_loss")) for e in r.evals]
        out[rid] = (r.status, r.step_series("loss"), r.step_series("accepted")[1], evals,
                    r.end.get("steps") if r.end else None)
    return out


def _check_file(out: Path) -> None:
    """Every line parses and is valid; the chosen attempts are whole, without duplicates."""
    raw = (out / RESULTS).read_bytes()
    assert raw.endswith(b"\n")
    records = [json.loads(line) for line in raw.splitlines()]
    assert records == list(read_records(out / RESULTS))  # nothing skipped
    for run in collect_runs(records).values():
        assert run.status == "finished" and not run.damaged
        steps = run.step_series("loss")[0]
        assert steps == list(range(len(steps)))
        assert len({e["step"] for e in run.evals}) == len(run.evals)
    assert not (out / LOCK_FILE).exists()
    assert not list((out / CHECKPOINTS).glob("*.pt"))  # removed once each run ended


def _kill_at_random_moments(argv: list[str], out: Path, seed: int, kills: int,
                            resume: list[str]) -> int:
    """Start ``argv``, SIGKILL it at a random moment once it has written records; again
    with ``resume`` appended, up to ``kills`` times. Returns how many kills hit a process
    that was still running."""
    rng = random.Random(seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    hits = 0
    for k in range(kills):
        cmd = argv + (resume if k else [])
        # stderr to a file, not a pipe: jobs the command started (submitit) inherit it
        log = out.parent / f"kill{k}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "curvkit", *cmd], env=env,
                                    stdout=subprocess.DEVNULL, stderr=fh)
        deadline = time.monotonic() + 180
        try:
            before = (out / RESULTS).stat().st_size if (out / RESULTS).exists() else 0
            while proc.poll() is None and time.monotonic() < deadline:
                if (out / RESULTS).exists() and (out / RESULTS).stat().st_size > before:
                    break  # started writing: past the imports and the grid check
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.8))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                hits += 1
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                proc.kill()
            proc.wait(timeout=60)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    return hits


@pytest.mark.slow  # subprocesses; test_ablate.py's SIGKILL test and the next one run by default
def test_train_killed_at_random_moments_resumes_to_the_uninterrupted_records(tmp_path):
    cfg = _config(tmp_path, steps=400)
    reference, out = tmp_path / "ref", tmp_path / "out"
    assert main(["train", str(cfg), "--out", str(reference), "--no-progress"]) == 0
    argv = ["train", str(cfg), "--out", str(out), "--no-progress"]
    hits = _kill_at_random_moments(argv, out, seed=0, kills=2, resume=["--resume"])
    assert hits >= 1
    assert main([*argv, "--resume"]) == 0
    _check_file(out)
    assert _signature(load_runs(out)) == _signature(load_runs(reference))


def test_train_refuses_to_restart_an_interrupted_run_without_resume(tmp_path, capsys):
    cfg = _config(tmp_path, steps=60)
    out = tmp_path / "out"
    argv = ["train", str(cfg), "--out", str(out), "--no-progress"]
    # an interrupted run: records through a checkpoint, then the process "died"
    from curvkit.experiments import runner

    class Stop(BaseException):  # not recorded as a failed run, like a kill
        pass

    real = runner.checkpoint.save

    def save_then_die(path, state):
        real(path, state)
        raise Stop

    runner.checkpoint.save = save_then_die
    try:
        with pytest.raises(Stop):
            main(argv)
    finally:
        runner.checkpoint.save = real
    assert not (out / LOCK_FILE).exists()  # released on the way out
    assert main(argv) == 2
    assert "holds an interrupted run of this config (steps 0..19 recorded); pass --resume" \
        in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 0
    recs = list(read_records(out / RESULTS))
    assert [r["step"] for r in recs if r["type"] == "resume"] == [20]
    assert sum(r["type"] == "start" for r in recs) == 1
    _check_file(out)


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_ablate_killed_at_random_moments_resumes_to_the_uninterrupted_records(tmp_path, jobs):
    cfg = _config(tmp_path, steps=300, ablate=GRID)
    reference, out = tmp_path / "ref", tmp_path / "out"
    assert main(["ablate", str(cfg), "--out", str(reference), "--no-progress"]) == 0
    argv = ["ablate", str(cfg), "--out", str(out), "--no-progress", "--jobs", str(jobs)]
    hits = _kill_at_random_moments(argv, out, seed=jobs, kills=5, resume=[])
    assert hits >= 1
    assert main(argv) == 0
    _check_file(out)
    assert _signature(load_runs(out)) == _signature(load_runs(reference))


@pytest.mark.slow
def test_train_killed_many_times(tmp_path):
    cfg = _config(tmp_path, steps=1000)
    reference, out = tmp_path / "ref", tmp_path / "out"
    assert main(["train", str(cfg), "--out", str(reference), "--no-progress"]) == 0
    argv = ["train", str(cfg), "--out", str(out), "--no-progress"]
    assert _kill_at_random_moments(argv, out, seed=7, kills=8, resume=["--resume"]) >= 2
    assert main([*argv, "--resume"]) == 0
    _check_file(out)
    assert _signature(load_runs(out)) == _signature(load_runs(reference))


@pytest.mark.slow
def test_ablate_with_submitit_killed_at_random_moments(tmp_path):
    """The jobs of a killed command are cancelled by the next one before it resumes."""
    pytest.importorskip("submitit")
    cfg = _config(tmp_path, steps=300, ablate=GRID)
    reference, out = tmp_path / "ref", tmp_path / "out"
    assert main(["ablate", str(cfg), "--out", str(reference), "--no-progress"]) == 0
    cfg.write_text(cfg.read_text() + '\n[executor]\nname = "submitit"\ncluster = "local"\n'
                                     'poll_seconds = 0.05\n')
    argv = ["ablate", str(cfg), "--out", str(out), "--no-progress"]
    assert _kill_at_random_moments(argv, out, seed=3, kills=3, resume=[]) >= 1
    assert main(argv) == 0
    _check_file(out)
    assert _signature(load_runs(out)) == _signature(load_runs(reference))


@pytest.mark.slow
def test_ablate_with_ray_killed_at_random_moments(tmp_path):
    pytest.importorskip("ray")
    cfg = _config(tmp_path, steps=300, ablate=GRID)
    reference, out = tmp_path / "ref", tmp_path / "out"
    assert main(["ablate", str(cfg), "--out", str(reference), "--no-progress"]) == 0
    cfg.write_text(cfg.read_text() + '\n[executor]\nname = "ray"\nnum_cpus = 2\n')
    argv = ["ablate", str(cfg), "--out", str(out), "--no-progress"]
    assert _kill_at_random_moments(argv, out, seed=5, kills=2, resume=[]) >= 1
    assert main(argv) == 0
    _check_file(out)
    assert _signature(load_runs(out)) == _signature(load_runs(reference))
