"""``curvkit spectrum``: measurements along a run, against dense references, and its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import curvkit
from curvkit.errors import ConfigError
from curvkit.experiments.spectrum import run_spectrum

CONFIG = """
[task]
dataset = "digits"
model = { name = "mlp", width = 6, depth = 1 }
batch_size = 32

[train]
steps = 2
eval_every = 1
dtype = "float64"

[optimizer]
lr = 0.5
estimator = "ggn"
preconditioner = { name = "kronecker", damping = 0.1 }
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(CONFIG)
    return path


def test_first_measurement_matches_the_dense_spectrum(config, tmp_path):
    from curvkit.experiments.config import parse_run_config
    from curvkit.experiments.runner import build_model, load_task

    out = run_spectrum(config, tmp_path / "out", estimators=["ef", "ggn"], k=2,
                       samples=24, trace_samples=12, probes=2, lanczos_steps=10,
                       progress=False, log=lambda m: None)
    recs = [json.loads(line) for line in (out / "spectrum.jsonl").read_text().splitlines()]
    assert [(r["step"], r["estimator"]) for r in recs] == [
        (s, e) for s in (0, 1, 2) for e in ("ef", "ggn")]
    # step 0 is the seeded initial model: rebuild it and compare with dense references
    cfg = parse_run_config(curvkit.config.load_toml(config))
    data = load_task(cfg)
    model = build_model(cfg, data, cfg.train.seeds[0])
    batch = (data.train[0][:24], data.train[1][:24])
    for rec in recs[:2]:
        est = curvkit.create("estimator", rec["estimator"], model=model,
                             loss_fn=data.loss_fn("mean"))
        evals = torch.linalg.eigvalsh(est.dense(batch))
        assert rec["eigenvalues"] == pytest.approx(evals.flip(0)[:2].tolist(), rel=1e-3)
        # Hutch++ with 12 products on a ~460-dim operator: an estimate, within 30%
        assert rec["trace"] == pytest.approx(float(evals.sum()), rel=0.3)
        dx = rec["density"]["grid"][1] - rec["density"]["grid"][0]
        assert sum(rec["density"]["values"]) * dx == pytest.approx(1.0, abs=0.05)
    for name in ("eigenvalues.png", "density.png", "spectrum.md"):
        assert (out / name).stat().st_size > 0
    assert "| 2 | ggn |" in (out / "spectrum.md").read_text()
    with pytest.raises(ConfigError, match="unknown estimator 'hesian'"):
        run_spectrum(config, tmp_path / "bad", estimators=["hesian"], progress=False)


def test_command_line(config, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "curvkit", "spectrum", str(config), "--out",
                           str(tmp_path / "cli"), "--samples", "16", "--k", "1",
                           "--trace-samples", "6", "--probes", "1", "--lanczos-steps", "5"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "spectrum: 3 measurement(s) of ggn" in proc.stdout
    assert "spectrum" in proc.stderr  # the progress bar
    assert len((tmp_path / "cli" / "spectrum.jsonl").read_text().splitlines()) == 3
    bad = subprocess.run([sys.executable, "-m", "curvkit", "spectrum", str(config), "--out",
                          str(tmp_path / "bad"), "--k", "0"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "--k: must be >= 1" in bad.stderr
