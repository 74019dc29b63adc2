"""Work per step in network passes (curvkit.work): every composition logs it, and the
counts match the passes a small model sees (forward hooks on the model, gradient hooks on
a weight: backward passes through it)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit import work


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    seen = {"forward": 0, "backward": 0}
    model.register_forward_hook(lambda *a: seen.__setitem__("forward", seen["forward"] + 1))
    model[0].weight.register_hook(
        lambda g: seen.__setitem__("backward", seen["backward"] + 1))
    return model, (torch.randn(8, 6), torch.randint(0, 3, (8,))), seen


def _build(model, cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {"lr": 0.1, **cfg})


@pytest.mark.parametrize("estimator,columns", [
    ("ef", 1), ({"name": "fisher", "mc_samples": 3}, 3), ("ggn", 3)])
def test_kronecker_statistics_pass_one_forward_and_one_backward_per_column(estimator,
                                                                           columns):
    """K-FAC statistics outside the step's own pass: one forward, and the backward of the
    output-space columns (1 for the empirical Fisher, the sampled labels for the MC Fisher,
    the 3 outputs for the GGN), pushed back in one batched backward (to the layer outputs
    only: the layers' weight gradients are not needed, so the backward is counted at the
    hidden activation)."""
    model, batch, seen = _problem()
    est = _build(model, {"estimator": estimator, "preconditioner": "kronecker"}).estimator
    through = []
    model[1].register_forward_hook(lambda m, i, o: [o.register_hook(through.append), None][1])
    with work.counting() as total:
        est.kronecker(batch)
    assert seen["forward"] == 1 and len(through) == 1
    assert total[0] == 1 + columns


@pytest.mark.parametrize("name", ["ggn", "hessian"])
def test_linearized_products_cost_two_passes_and_the_operator_its_preparation(name):
    model, batch, seen = _problem()
    est = _build(model, {"estimator": name, "preconditioner": "identity"}).estimator
    v = [torch.randn_like(p) for p in est.params]
    with work.counting() as total:
        op = est.linearize(batch)
        prepared = total[0]
        for _ in range(3):
            op.matvec(v)
    assert seen["forward"] == 1                 # the products reuse the kept forward
    assert prepared == (2 if name == "hessian" else 1)
    assert total[0] == prepared + 3 * 2


def test_fresh_products_without_reuse_cost_a_forward_each():
    """ef has no _linearize of its own: its operator runs a fresh matvec per product."""
    model, batch, seen = _problem()
    est = _build(model, {"estimator": "ef", "preconditioner": "identity"}).estimator
    v = [torch.randn_like(p) for p in est.params]
    with work.counting() as total:
        op = est.linearize(batch)
        op.matvec(v)
        op.matvec(v)
    assert seen["forward"] == 2
    assert total[0] == 2 * 3


def test_nested_capability_calls_count_once():
    """outer_product's matvec takes the gradient through its own capability: 2 passes."""
    model, batch, seen = _problem()
    est = _build(model, {"estimator": "outer_product", "preconditioner": "identity"}).estimator
    with work.counting() as total:
        est.matvec(batch, [torch.randn_like(p) for p in est.params])
    assert seen == {"forward": 1, "backward": 1}
    assert total[0] == 2


@pytest.mark.parametrize("cfg,expected", [
    ({"preconditioner": "identity"}, lambda info: 2),
    # statistics from the step's own forward and backward: nothing more
    ({"estimator": "ef", "preconditioner": "kronecker"}, lambda info: 2),
    ({"estimator": "ef", "preconditioner": "lie_group"}, lambda info: 2),
    ({"estimator": {"name": "fisher", "mc_samples": 3}, "preconditioner": "kronecker"},
     lambda info: 2 + 1 + 3),
    ({"estimator": "ggn", "preconditioner": "diagonal"}, lambda info: 2 + 1 + 3),
    ({"estimator": "ggn", "preconditioner": "identity", "solver": "trust_region"},
     lambda info: 2 + 1 + 2 * info["matvecs"] + info["evaluations"]),
    ({"estimator": "hessian", "preconditioner": "partition", "solver": "cubic"},
     lambda info: 2 + (2 + 2 * 4) + info["evaluations"]),
])
def test_every_step_logs_its_work(cfg, expected):
    model, batch, seen = _problem()
    opt = _build(model, cfg)
    for _ in range(2):
        seen.update(forward=0, backward=0)
        opt.step(batch)
        info = opt.last_info
        assert info["work"] == expected(info), info
        # every pass the model saw is counted (the counts add JVPs and batched columns)
        assert info["work"] >= seen["forward"] + seen["backward"]


def test_torch_optim_style_counts_the_callers_pass():
    model, (X, y), seen = _problem()
    opt = _build(model, {"estimator": "ef", "preconditioner": "kronecker"})
    opt.zero_grad()
    opt.loss_fn(model(X), y).backward()
    opt.step()
    assert opt.last_info["work"] == 2
