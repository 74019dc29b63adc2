"""The README's main job end to end (slow: run with `tox -e slow` or `pytest -m slow`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curvkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_ablation_and_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CURVKIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "quickstart"
    config = str(ROOT / "experiments" / "quickstart.toml")
    assert main(["ablate", config, "--out", str(out), "--no-progress"]) == 0
    assert main(["report", str(out)]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    ends = [r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())
            if r["type"] == "end"]
    assert len(ends) == 24 and all(r["status"] == "finished" for r in ends)
    report = (out / "report.md").read_text()
    # no configuration diverged or failed: the report says so and leaves those columns out
    assert "diverged or failed (those columns are left out)" in report
    assert "## Diverged and failed runs" not in report
    assert (out / "figures" / "loss_vs_step.png").stat().st_size > 10_000
    # the same command on a finished directory adds nothing
    lines = (out / "results.jsonl").read_text().count("\n")
    assert main(["ablate", config, "--out", str(out), "--no-progress"]) == 0
    assert (out / "results.jsonl").read_text().count("\n") == lines
