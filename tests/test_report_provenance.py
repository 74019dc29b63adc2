"""Issue 16 item 5: a report records the commit and a hash of the config that produced it."""

from __future__ import annotations

import hashlib

from curvkit.experiments.report import provenance_line


def test_provenance_names_the_commit_and_the_config_hash(tmp_path):
    (tmp_path / "config.toml").write_text('title = "x"\n')
    line = provenance_line(tmp_path)
    digest = hashlib.sha256(b'title = "x"\n').hexdigest()[:16]
    assert f"config.toml sha256 `{digest}`" in line
    commit = line.split("commit `")[1].split("`")[0]
    # a git checkout gives the hash (+dirty), an installed copy outside git says so
    assert commit == "unknown" or len(commit.removesuffix("+dirty")) == 12
    assert "sha256 `none`" in provenance_line(tmp_path / "missing")


def test_the_runs_commit_is_recorded_and_shown(tmp_path, monkeypatch):
    """A report names the commit its runs ran at (from their start records), not only the
    commit that rendered it: re-rendering old results later must not restamp them."""
    from curvkit.experiments.report import build_report
    from curvkit.experiments.store import RESULTS, ResultsWriter

    out = tmp_path / "r"
    out.mkdir()
    with ResultsWriter(out / RESULTS) as w:
        for rid, commit in (("a", "aaaaaaaaaaaa"), ("b", "bbbbbbbbbbbb")):
            w.append({"type": "start", "run": rid, "attempt": 1, "config_id": "A",
                      "label": "x", "seed": 0 if rid == "a" else 1, "index": 0,
                      "config": {}, "versions": {"commit": commit}})
            w.append({"type": "end", "run": rid, "attempt": 1, "status": "finished",
                      "steps": 0})
    text = build_report(out, log=lambda _: None).read_text()
    assert "runs at curvkit commit `aaaaaaaaaaaa`, `bbbbbbbbbbbb`" in text
    assert "report rendered at `" in text


def test_a_run_records_its_commit(tmp_path, monkeypatch):
    from curvkit.experiments.report import code_commit
    from curvkit.experiments.runner import RunSpec, execute

    monkeypatch.setenv("CURVKIT_CACHE_DIR", str(tmp_path / "cache"))
    doc = {"task": {"dataset": {"name": "teacher", "n_train": 16, "n_val": 4, "n_test": 4,
                                "in_dim": 3, "out_dim": 2},
                    "model": {"name": "mlp", "width": 4, "depth": 1}, "batch_size": 8},
           "train": {"steps": 1, "seeds": [0], "eval_every": 1, "dtype": "float64"},
           "optimizer": {"lr": 0.1}}
    records = []
    execute(RunSpec(doc=doc, seed=0, run_id="r", config_id="c", label="l", index=0, steps=1),
            records.append)
    start = next(r for r in records if r["type"] == "start")
    assert start["versions"]["commit"] == code_commit()
