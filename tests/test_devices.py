"""Any device: device names in configs, clear errors where unavailable, the device rule
(tensors curvkit makes follow the parameters), autocast. The CUDA runs are in test_cuda.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import curvkit
from curvkit.devices import check_device_name, resolve_device
from curvkit.errors import ConfigError
from curvkit.experiments.config import parse_run_config

ROOT = Path(__file__).resolve().parents[1]
FACTORIES = {"tensor", "zeros", "ones", "empty", "full", "eye", "arange", "randn", "rand",
             "randint", "linspace", "as_tensor"}
# torch factory calls without device= that are deliberate, with the reason
ALLOWED = {
    ("curvkit/spectral.py", "randint"): "CPU generator draws (same probes on any device), "
                                        "moved to the operator's device",
    ("curvkit/spectral.py", "randn"): "CPU generator start vector, moved to the device",
    ("curvkit/spectral.py", "tensor"): "Lanczos coefficients: the small tridiagonal on CPU",
    ("curvkit/spectral.py", "linspace"): "the density's grid: a CPU result",
    ("curvkit/estimators/hessian.py", "randint"): "CPU generator draws, moved to the params'",
    ("curvkit/partitions.py", "zeros"): "integer group ids/counts: CPU metadata",
    ("curvkit/partitions.py", "tensor"): "integer group ids: CPU metadata",
    ("curvkit/partitions.py", "arange"): "integer group ids: CPU metadata",
    ("curvkit/estimators/_autograd.py", "tensor"): "partition ids: CPU metadata",
    ("curvkit/estimators/_autograd.py", "as_tensor"): "partition ids: CPU metadata",
    ("curvkit/estimators/kfac/factors.py", "arange"): "index permutation (indexes any device)",
    ("curvkit/experiments/config.py", "zeros"): "a probe parameter to validate torch.optim "
                                                "keyword arguments",
    ("curvkit/experiments/runner.py", "arange"): "sample permutation (indexes any device)",
}


def test_device_rule_every_factory_call_names_its_device():
    found = set()
    for path in sorted((ROOT / "curvkit").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("curvkit/testing/"):
            # the shipped test suites build small CPU reference problems of their own (as
            # tests/ does); the rule is about tensors made next to a user's parameters
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in FACTORIES and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == "torch" \
                    and not any(k.arg == "device" for k in node.keywords):
                found.add((rel, node.func.attr, node.lineno))
    bad = sorted(f"{p}:{line}: torch.{f}(...) without device=" for p, f, line in found
                 if (p, f) not in ALLOWED)
    assert not bad, "tensors made inside curvkit take the parameters' device:\n" + \
        "\n".join(bad)


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:1", "mps"])
def test_config_accepts_device_names(name):
    doc = {"task": {"dataset": "digits", "model": "mlp"}, "train": {"device": name},
           "optimizer": {"lr": 0.1}}
    assert parse_run_config(doc).train.device == name
    assert check_device_name(name) == name


def test_bad_or_unavailable_devices_are_clear_errors():
    with pytest.raises(ConfigError, match=r"train: device: expected 'cpu', 'cuda', 'cuda:N' "
                                          r"or 'mps', got 'gpu'"):
        parse_run_config({"task": {"dataset": "digits", "model": "mlp"},
                          "train": {"device": "gpu"}, "optimizer": {"lr": 0.1}})
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"train.device: 'cuda:0' requested, but CUDA is "
                                              r"not available"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(ConfigError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        with pytest.raises(ConfigError, match="'mps' requested, but the MPS backend"):
            resolve_device("mps")


def test_cli_refuses_an_unavailable_device_before_training(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from curvkit.cli import main

    cfg = tmp_path / "c.toml"
    cfg.write_text('[task]\ndataset = "digits"\nmodel = "mlp"\n[train]\nsteps = 1\n'
                   'device = "cuda"\n[optimizer]\nlr = 0.1\n')
    assert main(["train", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "train.device: 'cuda' requested, but CUDA is not available" in \
        capsys.readouterr().err
    assert not (tmp_path / "o" / "results.jsonl").exists()


@pytest.mark.parametrize("style", ["batch", "backward"])
@pytest.mark.parametrize("pre", ["identity", "kronecker"])
def test_autocast_forward(style, pre):
    """Under torch.autocast (bfloat16 on CPU) the step's forward runs in low precision,
    parameters and curvature statistics stay float32, and training makes progress."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    opt = curvkit.build_optimizer(model, loss_fn, {
        "lr": 0.2, "estimator": "ef", "preconditioner": pre if pre == "identity" else
        {"name": "kronecker", "damping": 0.1}})
    first = last = None
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if style == "batch":
                loss = opt.step((X, y))
            else:
                opt.zero_grad()
                out = model(X)
                assert out.dtype == torch.bfloat16
                loss = loss_fn(out, y)
                loss.backward()
                opt.step()
        first = float(loss) if first is None else first
        last = float(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert opt.counters["nonfinite"] == 0 and last < first
    if pre == "kronecker":
        assert all(t.dtype == torch.float32 for f in opt.preconditioner.state["factors"].values()
                   for t in f.values() if isinstance(t, torch.Tensor))
