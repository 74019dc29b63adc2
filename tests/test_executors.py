"""Executors as parts: local, Ray (a local cluster) and submitit (its local executor) give
the same records on a small grid."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from curvkit.cli import main
from curvkit.experiments.store import RESULTS, load_runs, read_records
from curvkit.registry import get_registry

CONFIG = textwrap.dedent("""
    [task]
    dataset = { name = "teacher", n_train = 48, n_val = 8, n_test = 16, in_dim = 4, out_dim = 2 }
    model = { name = "mlp", width = 6, depth = 1 }
    batch_size = 16

    [train]
    steps = 6
    seeds = [0, 1]
    eval_every = 3
    checkpoint_every = 2
    dtype = "float64"

    [optimizer]
    lr = 0.1

    [ablate]
    optimizer = [{ label = "kfac", lr = 0.1, estimator = "ggn", preconditioner = "kronecker" },
                 { label = "Adam", torch = "Adam", lr = 0.01 }]
    """)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CURVKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def _config(tmp_path: Path, executor: str = "") -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(CONFIG + ("\n[executor]\n" + textwrap.dedent(executor) if executor else ""))
    return path


def _signature(out: Path) -> dict:
    runs = load_runs(out)
    assert len(runs) == 4 and all(r.status == "finished" and not r.damaged
                                  for r in runs.values())
    return {rid: (r.label, r.seed, r.step_series("loss"), r.step_series("accepted"),
                  [(e["step"], e["train_loss"], e["test_loss"]) for e in r.evals],
                  r.end["steps"]) for rid, r in runs.items()}


def _ordered(out: Path) -> dict:
    """Per run, the record types in file order (runs may interleave between runs)."""
    seq: dict = {}
    for rec in read_records(out / RESULTS):
        seq.setdefault(rec["run"], []).append(rec["type"])
    return seq


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    d = tmp_path_factory.mktemp("local")
    cfg = _config(d)
    assert main(["ablate", str(cfg), "--out", str(d / "out"), "--no-progress"]) == 0
    return d / "out"


def test_executors_are_registered_parts():
    reg = get_registry()
    assert {"local", "ray", "submitit"} <= set(reg.names("executor"))
    assert reg.get("executor", "ray").plugin == "curvkit"


def test_executor_options_are_validated_with_file_and_path(tmp_path, capsys):
    cfg = _config(tmp_path, 'name = "ray"\nnum_cpu = 1\n')
    assert main(["ablate", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}: executor.num_cpu: unknown option; did you mean 'num_cpus'" in err
    cfg = _config(tmp_path, 'name = "ray"\n')
    assert main(["ablate", str(cfg), "--out", str(tmp_path / "o"), "--no-progress",
                 "--executor", "submitit"]) == 2
    assert "the config's [executor] is for 'ray', but --executor submitit" in \
        capsys.readouterr().err


@pytest.mark.slow  # test_ablate.py compares --jobs 2 with sequential runs by default
def test_local_jobs_match_in_process(tmp_path, local):
    out = tmp_path / "out"
    assert main(["ablate", str(_config(tmp_path)), "--out", str(out), "--no-progress",
                 "--executor", "local", "--jobs", "2"]) == 0
    assert _signature(out) == _signature(local)
    assert _ordered(out) == _ordered(local)


def test_ray_local_cluster_gives_the_records_of_the_local_executor(tmp_path, local):
    ray = pytest.importorskip("ray")
    cfg = _config(tmp_path, 'name = "ray"\nnum_cpus = 2\nthreads = 1\n')
    out = tmp_path / "out"
    try:
        assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert not ray.is_initialized()  # a cluster it started is shut down
    assert _signature(out) == _signature(local)
    assert _ordered(out) == _ordered(local)


@pytest.mark.slow
def test_submitit_local_executor_gives_the_records_of_the_local_executor(tmp_path, local):
    pytest.importorskip("submitit")
    cfg = _config(tmp_path, 'name = "submitit"\ncluster = "local"\npoll_seconds = 0.1\n')
    out = tmp_path / "out"
    assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert _signature(out) == _signature(local)
    assert _ordered(out) == _ordered(local)
    assert not list((out / "submitit" / "records").glob("*.jsonl"))  # moved, then removed


def test_submitit_debug_executor_in_process(tmp_path, local):
    pytest.importorskip("submitit")
    cfg = _config(tmp_path, 'name = "submitit"\ncluster = "debug"\npoll_seconds = 0.05\n')
    out = tmp_path / "out"
    assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert _signature(out) == _signature(local)
