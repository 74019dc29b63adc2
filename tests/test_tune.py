"""[tune]: an Optuna search per grid point on the validation split, the seeds run with the
best values, the search resumable and shown in the report."""

from __future__ import annotations

import json
import textwrap

import pytest

from curvkit.cli import main
from curvkit.errors import ConfigError
from curvkit.experiments.store import load_runs
from curvkit.experiments.tune import TUNE_FILE, load_searches, parse_tune

pytest.importorskip("optuna")

CONFIG = textwrap.dedent("""
    [task]
    dataset = { name = "teacher", n_train = 48, n_val = 16, n_test = 16, in_dim = 4, out_dim = 2 }
    model = { name = "mlp", width = 6, depth = 1 }
    batch_size = 16

    [train]
    steps = 6
    seeds = [0, 1]
    eval_every = 3
    dtype = "float64"

    [optimizer]
    lr = 0.1

    [ablate]
    optimizer = [{ label = "kfac", lr = 0.1, estimator = "ggn", preconditioner = "kronecker" },
                 { label = "Adam", torch = "Adam", lr = 0.01 }]

    [tune]
    trials = 3
    steps = 4
    [tune.space]
    "optimizer.lr" = { low = 1e-3, high = 1.0, log = true }
    "optimizer.preconditioner.damping" = [0.001, 0.01]
    """)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CURVKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def test_tuned_grid_runs_the_seeds_with_the_best_values(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "out"
    assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "tune [Adam]: left out optimizer.preconditioner.damping" in printed
    searches = {s["label"]: s for s in load_searches(out).values()}
    assert set(searches) == {"kfac", "Adam"}
    for label, search in searches.items():
        trials, best = search["trials"], search["best"]
        assert len(trials) == 3 and best["trials"] == 3
        scored = [t for t in trials if t["value"] is not None]
        top = min(scored, key=lambda t: t["value"])
        assert best["params"] == top["params"] and best["value"] == top["value"]
        runs = [r for r in load_runs(out).values() if r.label == label]
        assert len(runs) == 2 and all(r.status == "finished" for r in runs)
        for r in runs:  # the runs' resolved config has the tuned values
            opt = r.start["config"]["optimizer"]
            assert opt["lr"] == best["params"]["optimizer.lr"]
            if label == "kfac":
                assert opt["preconditioner"]["damping"] == \
                    best["params"]["optimizer.preconditioner.damping"]
    lines = (out / TUNE_FILE).read_bytes()
    # re-running reuses the search and the runs: nothing is added
    assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert (out / TUNE_FILE).read_bytes() == lines
    assert "nothing to do" in capsys.readouterr().out
    # the report shows the search
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Tuning" in report and "| kfac | 3 |" in report


def test_tune_only_the_listed_points(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.replace("trials = 3", 'trials = 2\npoints = ["Adam"]'))
    out = tmp_path / "out"
    assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert [s["label"] for s in load_searches(out).values()] == ["Adam"]
    kfac = [r for r in load_runs(out).values() if r.label == "kfac"]
    assert all(r.start["config"]["optimizer"]["lr"] == 0.1 for r in kfac)  # as written
    cfg.write_text(CONFIG.replace("trials = 3", 'points = ["adam"]'))
    assert main(["ablate", str(cfg), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "tune.points: no grid point is labelled 'adam' (labels: 'kfac', 'Adam')" in \
        capsys.readouterr().err


def test_interrupted_search_continues_from_its_trials(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.replace("trials = 3", "trials = 2"))
    out = tmp_path / "out"
    assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    # keep kfac's first trial only, as if the command had been killed after it
    recs = [json.loads(line) for line in (out / TUNE_FILE).read_bytes().splitlines()]
    first = next(r for r in recs if r["label"] == "kfac")
    (out / TUNE_FILE).write_text(json.dumps(first) + "\n")
    (out / "results.jsonl").unlink()
    assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    kfac = next(s for s in load_searches(out).values() if s["label"] == "kfac")
    assert len(kfac["trials"]) == 2 and kfac["trials"][0] == first
    assert kfac["best"]["trials"] == 2


@pytest.mark.parametrize("table, message", [
    ("trials = 0\n[tune.space]\nx = [1]", "tune.trials: expected an int >= 1, got 0"),
    ('[tune.space]\n"optimizer.lr" = { low = 1.0, high = 0.1 }',
     "tune.space.optimizer.lr: expected numbers low < high"),
    ('[tune.space]\n"optimizer.lr" = { low = 0.0, high = 1.0, log = true }',
     "tune.space.optimizer.lr: a log range needs low > 0"),
    ('[tune.space]\n"train.steps" = [1, 2]', "tune.space.train.steps: not searchable"),
    ('metric = "loss"\n[tune.space]\nx = [1]', "tune.metric: expected one of"),
    ("trails = 3", "tune.trails: unknown option"),
])
def test_tune_table_errors_name_the_path(table, message):
    import tomllib

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_tune(tomllib.loads("[tune]\n" + table))


def test_a_dimension_can_be_searched_for_some_points_only(tmp_path, capsys):
    """`points` on a space entry: the damping is searched for the kfac point, whose axis
    label names it inside a two-axis grid label; a name no point has is refused."""
    two_axes = CONFIG.replace(
        '[ablate]\n', '[ablate]\n"train.dtype" = ["float64"]\n').replace(
        '"optimizer.preconditioner.damping" = [0.001, 0.01]',
        '"optimizer.preconditioner.damping" = { choices = [0.001, 0.01], points = ["kfac"] }\n'
        '"optimizer.preconditioner.ema" = { low = 0.5, high = 0.9, points = ["Adam"] }')
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(two_axes.replace("trials = 3", "trials = 2"))
    out = tmp_path / "out"
    assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    searches = {s["label"]: s for s in load_searches(out).values()}
    assert set(searches) == {"dtype=float64, kfac", "dtype=float64, Adam"}
    kfac = searches["dtype=float64, kfac"]["trials"]
    assert all(set(t["params"]) == {"optimizer.lr", "optimizer.preconditioner.damping"}
               for t in kfac)
    adam = searches["dtype=float64, Adam"]["trials"]
    assert all(set(t["params"]) == {"optimizer.lr"} for t in adam)  # ema: not Adam's option
    cfg.write_text(two_axes.replace('points = ["kfac"]', 'points = ["kfac2"]'))
    assert main(["ablate", str(cfg), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "tune.space.optimizer.preconditioner.damping.points: no grid point is labelled " \
        "'kfac2'" in capsys.readouterr().err


def test_the_configuration_as_written_is_the_first_trial(tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.replace("trials = 3", "trials = 2"))
    out = tmp_path / "out"
    assert main(["ablate", str(cfg), "--out", str(out), "--no-progress"]) == 0
    searches = {s["label"]: s for s in load_searches(out).values()}
    assert searches["Adam"]["trials"][0]["params"] == {"optimizer.lr": 0.01}
    # kfac's damping is left to its default in the config: no starting point, a TPE draw
    kfac_first = searches["kfac"]["trials"][0]["params"]
    assert set(kfac_first) == {"optimizer.lr", "optimizer.preconditioner.damping"}
