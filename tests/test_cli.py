"""The command line: components, train, config errors with dotted paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from curvkit.cli import main
from curvkit.experiments.store import RESULTS, collect_runs, read_records

BASE = {
    "task": textwrap.dedent("""
        [task]
        dataset = { name = "teacher", n_train = 40, n_val = 8, n_test = 16, in_dim = 3 }
        model = { name = "mlp", width = 5, depth = 1 }
        batch_size = 20
        """),
    "train": textwrap.dedent("""
        [train]
        steps = 5
        seeds = [3, 4]
        eval_every = 2
        dtype = "float64"
        """),
    "optimizer": textwrap.dedent("""
        [optimizer]
        lr = 0.1
        """),
}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CURVKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def cfg_file(tmp_path: Path, **replace: str) -> Path:
    sections = {**BASE, **{k: textwrap.dedent(v) for k, v in replace.items()}}
    path = tmp_path / "run.toml"
    path.write_text("\n".join(v for v in sections.values() if v))
    return path


def run_cli(*argv: str) -> int:
    return main(list(argv))


# --------------------------------------------------------------------------- components
def test_components_lists_every_kind_with_options_and_source(capsys):
    assert run_cli("components") == 0
    out = capsys.readouterr().out
    for kind in ("estimator (", "preconditioner (", "solver (", "dataset (", "model ("):
        assert kind in out
    assert "  cdr — " in out and "n_train: int (default 400" in out
    assert "source: curvkit " in out
    assert "provides: " in out


def test_components_json(capsys):
    assert run_cli("components", "--json", "--kind", "dataset") == 0
    data = json.loads(capsys.readouterr().out)
    names = {p["name"] for p in data["parts"]}
    assert {"digits", "mnist1d", "cdr", "teacher"} <= names
    assert all(p["kind"] == "dataset" for p in data["parts"])
    digits = next(p for p in data["parts"] if p["name"] == "digits")
    assert digits["source"].startswith("curvkit ")
    assert any(o.startswith("val_size: int") for o in digits["options"])
    assert set(digits) >= {"description", "provides", "needs", "plugin", "source"}


# --------------------------------------------------------------------------- train
def test_train_writes_records_and_resumes(tmp_path, capsys):
    cfg = cfg_file(tmp_path)
    out = tmp_path / "out"
    assert run_cli("train", str(cfg), "--out", str(out), "--no-progress", "--threads", "0") == 0
    text = capsys.readouterr().out
    assert "status finished" in text and f"curvkit report {out}" in text
    recs = list(read_records(out / RESULTS))
    kinds = [r["type"] for r in recs]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert {r["seed"] for r in recs if r["type"] == "start"} == {3}  # the first seed only
    evals = [r for r in recs if r["type"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4, 5]
    assert {"train_loss", "val_loss", "test_loss", "time", "wall"} <= set(evals[-1])
    steps = [r for r in recs if r["type"] == "steps"]
    assert sum(len(s["step"]) for s in steps) == 5
    for key in ("loss", "time", "time_curvature", "accepted"):
        assert all(len(s[key]) == len(s["step"]) for s in steps)
    end = recs[-1]
    assert end["status"] == "finished" and end["steps"] == 5
    assert end["params"] == (3 * 5 + 5) + (5 * 4 + 4)  # teacher's default out_dim is 4
    assert (out / "config.toml").read_text() == cfg.read_text()
    # same command again: nothing to do
    assert run_cli("train", str(cfg), "--out", str(out), "--no-progress", "--threads", "0") == 0
    assert "nothing to do" in capsys.readouterr().out
    # another seed appends a second run
    assert run_cli("train", str(cfg), "--out", str(out), "--seed", "4", "--no-progress",
                   "--threads", "0") == 0
    assert len(collect_runs(read_records(out / RESULTS))) == 2


def test_train_torch_baseline(tmp_path):
    cfg = cfg_file(tmp_path, optimizer='[optimizer]\ntorch = "Adam"\nlr = 0.01\n'
                                       'betas = [0.8, 0.99]\n')
    out = tmp_path / "out"
    assert run_cli("train", str(cfg), "--out", str(out), "--no-progress", "--threads", "0") == 0
    (run,) = collect_runs(read_records(out / RESULTS)).values()
    assert run.status == "finished"
    assert run.start["config"]["optimizer"] == {"torch": "Adam", "lr": 0.01,
                                                "betas": [0.8, 0.99]}


def test_python_dash_m_entry_point(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "curvkit", "--version"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("curvkit ")


# --------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("replace, expected", [
    ({"task": '[task]\nmodel = "mpl"\n'},
     "task.model: unknown model 'mpl'; did you mean 'mlp'"),
    ({"task": '[task]\ndataset = { name = "digitz" }\n'},
     "task.dataset.name: unknown dataset 'digitz'; did you mean 'digits'"),
    ({"task": '[task]\nmodel = { name = "mlp", width = "wide" }\n'},
     "task.model.width: expected int, got 'wide'"),
    ({"task": '[task]\ndataset = { name = "teacher", n_trian = 5 }\n'},
     "task.dataset.n_trian: unknown option; did you mean 'n_train'"),
    ({"train": "[train]\nstepz = 5\n"},
     "train.stepz: unknown option; did you mean 'steps'"),
    ({"train": "[train]\nsteps = 0\n"}, "train.steps: must be >= 1, got 0"),
    ({"train": '[train]\ndtype = "float16"\n'}, "train.dtype: expected one of"),
    ({"optimizer": '[optimizer]\nlr = 0.1\nsolver = "direkt"\n'},
     "optimizer.solver: unknown solver 'direkt'; did you mean 'direct'"),
    ({"optimizer": '[optimizer]\ntorch = "Adamm"\n'},
     "optimizer.torch: unknown torch.optim optimizer 'Adamm'; did you mean 'Adam'"),
    ({"optimizer": '[optimizer]\ntorch = "Adam"\nbetaz = [0.9, 0.9]\n'},
     "optimizer.betaz: unknown argument of torch.optim.Adam; did you mean 'betas'"),
    ({"optimizer": '[optimizer]\ntorch = "SGD"\nlr = "fast"\n'},
     "optimizer.lr: expected float"),
    ({"optimizer": '[optimizer]\ntorch = "Adam"\nbetas = [0.9]\n'},
     "optimizer.betas: expected a list of 2 entries"),
    ({"optimizer": '[optimizer]\ntorch = "SGD"\nlr = -1.0\n'},
     "optimizer: torch.optim.SGD rejects these arguments"),
    ({"optimizer": ""}, "optimizer: missing [optimizer] table"),
])
def test_config_errors_name_the_dotted_path(tmp_path, capsys, replace, expected):
    cfg = cfg_file(tmp_path, **replace)
    assert run_cli("train", str(cfg), "--out", str(tmp_path / "out"), "--no-progress",
                   "--threads", "0") == 2
    err = capsys.readouterr().err
    assert f"error: {cfg}: {expected}" in err  # the file, then the dotted path
    assert not (tmp_path / "out" / RESULTS).exists()


def test_unknown_section_and_missing_file(tmp_path, capsys):
    cfg = cfg_file(tmp_path)
    cfg.write_text(cfg.read_text() + "\n[trian]\nsteps = 1\n")
    assert run_cli("train", str(cfg), "--no-progress") == 2
    assert f"error: {cfg}: trian: unknown section; did you mean 'train'" in \
        capsys.readouterr().err
    assert run_cli("train", str(tmp_path / "nope.toml")) == 2
    assert "config file not found" in capsys.readouterr().err


def test_incompatible_train_config(tmp_path, capsys):
    cfg = cfg_file(tmp_path, optimizer='[optimizer]\nestimator = "outer_product"\n'
                                       'preconditioner = "kronecker"\n')
    assert run_cli("train", str(cfg), "--out", str(tmp_path / "o"), "--no-progress") == 2
    assert "optimizer.preconditioner: preconditioner 'kronecker' needs capability " \
           "'kronecker'" in capsys.readouterr().err


def test_dry_run_lists_grid(tmp_path, capsys):
    cfg = cfg_file(tmp_path)
    cfg.write_text(cfg.read_text() + '\n[ablate]\n"optimizer.lr" = [0.1, 0.2]\n')
    assert run_cli("ablate", str(cfg), "--out", str(tmp_path / "o"), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "2 point(s), 2 to run × 2 seed(s) = 4 run(s)" in out and "[lr=0.2]" in out
    assert not (tmp_path / "o").exists()


def test_experiments_doc_tables_are_generated_from_the_options():
    from curvkit.experiments.config import schema_markdown

    doc = (Path(__file__).parents[1] / "docs" / "experiments.md").read_text()
    start = doc.index("<!-- generated:options:start -->\n") + len(
        "<!-- generated:options:start -->\n")
    end = doc.index("<!-- generated:options:end -->")
    assert doc[start:end] == schema_markdown(), (
        "docs/experiments.md is out of date: regenerate the block between the markers with "
        "curvkit.experiments.config.schema_markdown()")


# --------------------------------------------------------------------------- malformed input
@pytest.mark.parametrize("optimizer, expected", [
    ("optimizer = [1, 2]\n", "optimizer: expected a table, got [1, 2]"),
    ("[[optimizer]]\nlr = 0.1\n", "optimizer: expected a table, got [{'lr': 0.1}]"),
    ('[optimizer]\nestimator = { name = { x = 1 } }\n',
     "optimizer.estimator.name: expected str, got {'x': 1}"),
    ('[optimizer]\n[optimizer.estimator]\nggn = { damping = 1 }\n',
     "optimizer.estimator.name: missing"),
    ('[optimizer]\nlr = 0.1\n[ablate]\n"optimizer.estimator" = [{ name = { x = 1 } }, "ggn"]\n',
     "ablate point 1 [estimator={'x': 1}]: optimizer.estimator.name: expected str"),
    ('[optimizer]\nlr = 0.1\n[ablate]\noptimizer = [[1], { lr = 0.1 }]\n',
     "ablate point 1 [optimizer=[1]]: optimizer: expected a table, got [1]"),
])
def test_malformed_optimizer_is_a_config_error_naming_file_and_path(tmp_path, capsys,
                                                                     optimizer, expected):
    cfg = cfg_file(tmp_path, optimizer=optimizer)
    if optimizer.startswith("optimizer ="):  # a top-level key must precede the tables
        cfg.write_text(optimizer + cfg.read_text().replace(optimizer, ""))
    assert run_cli("ablate", str(cfg), "--out", str(tmp_path / "o"), "--no-progress") == 2
    err = capsys.readouterr().err
    assert f"error: {cfg}: {expected}" in err and "Traceback" not in err


def test_invalid_utf8_is_a_clear_error(tmp_path, capsys):
    cfg = cfg_file(tmp_path)
    cfg.write_bytes(cfg.read_bytes() + b"# caf\xe9\n")
    line = cfg.read_bytes().count(b"\n")
    assert run_cli("train", str(cfg), "--no-progress") == 2
    assert f"error: {cfg}: line {line}: not UTF-8 text (byte 0xe9" in capsys.readouterr().err


def test_grid_whose_only_point_is_incompatible_says_so(tmp_path, capsys):
    cfg = cfg_file(tmp_path, optimizer='[optimizer]\nestimator = "outer_product"\n'
                                       'preconditioner = "kronecker"\n'
                                       '[ablate]\n"optimizer.lr" = [0.1]\n')
    assert run_cli("ablate", str(cfg), "--out", str(tmp_path / "o"), "--no-progress") == 2
    err = capsys.readouterr().err
    assert f"error: {cfg}: the only configuration is incompatible: optimizer.preconditioner" \
        in err and "nothing to do" not in err
    cfg.write_text(cfg.read_text().replace('"optimizer.lr" = [0.1]',
                                           '"optimizer.preconditioner" = ["kronecker", '
                                           '{ name = "kronecker", damping = 0.1 }]'))
    assert run_cli("ablate", str(cfg), "--out", str(tmp_path / "o"), "--no-progress") == 2
    assert "every grid point is skipped; nothing can run:\n  [preconditioner=kronecker] " \
           "(incompatible)" in capsys.readouterr().err
