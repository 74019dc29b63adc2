"""identity + direct is torch.optim.SGD, bitwise; state_dict round trips continue bitwise."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import curvkit


def make_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8), nn.ReLU(),
                          nn.Linear(8, 3))
    X = torch.randn(64, 6)
    y = torch.randint(0, 3, (64,))
    return model, nn.CrossEntropyLoss(), X, y


def batches(X, y, steps, bs=16):
    for t in range(steps):
        i = (t * bs) % X.shape[0]
        yield X[i:i + bs], y[i:i + bs]


SGD_SETTINGS = [
    {},
    {"momentum": 0.9},
    {"weight_decay": 1e-2},
    {"momentum": 0.9, "weight_decay": 5e-3},
    {"momentum": 0.9, "dampening": 0.1},
    {"momentum": 0.8, "nesterov": True, "weight_decay": 1e-3},
]


@pytest.mark.parametrize("settings", SGD_SETTINGS)
@pytest.mark.parametrize("scheduler", [False, True])
def test_identity_direct_is_sgd_bitwise(settings, scheduler):
    model, loss_fn, X, y = make_problem()
    ref = copy.deepcopy(model)
    opt = curvkit.build_optimizer(model, loss_fn, {
        "lr": 0.1, "preconditioner": "identity", "solver": {"name": "direct", **settings}})
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, **settings)
    sched = sched_ref = None
    if scheduler:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        sched_ref = torch.optim.lr_scheduler.StepLR(sgd, step_size=5, gamma=0.5)
    for xb, yb in batches(X, y, 20):
        loss = opt.step((xb, yb))
        sgd.zero_grad()
        loss_ref = loss_fn(ref(xb), yb)
        loss_ref.backward()
        sgd.step()
        assert torch.equal(loss, loss_ref.detach())
        if scheduler:
            sched.step()
            sched_ref.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    if scheduler:
        assert opt.param_groups[0]["lr"] == sgd.param_groups[0]["lr"] == 0.1 * 0.5 ** 4


def test_state_dict_round_trip_bitwise_weights_only():
    model, loss_fn, X, y = make_problem(1)
    config = {"lr": 0.05, "solver": {"name": "direct", "momentum": 0.9, "weight_decay": 1e-3}}
    opt = curvkit.build_optimizer(model, loss_fn, config)
    data = list(batches(X, y, 12))
    for b in data[:6]:
        opt.step(b)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for b in data[6:]:
        opt.step(b)
    expected = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, _, _, _ = make_problem(99)
    model2.load_state_dict(ckpt["model"])
    opt2 = curvkit.build_optimizer(model2, loss_fn, config)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.counters["steps"] == 6
    for b in data[6:]:
        opt2.step(b)
    for p, q in zip(model2.parameters(), expected):
        assert torch.equal(p, q)


def test_frozen_parameters_are_left_alone():
    model, loss_fn, X, y = make_problem(2)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = curvkit.build_optimizer(model, loss_fn, {"lr": 0.1})
    opt.step((X, y))
    assert torch.equal(model[0].weight, frozen)
    assert len(opt.param_groups[0]["params"]) == 5


def test_nonfinite_loss_never_reaches_parameters():
    model, loss_fn, X, y = make_problem(3)
    opt = curvkit.build_optimizer(model, loss_fn, {"lr": 0.1})
    before = [p.detach().clone() for p in model.parameters()]
    X_bad = X.clone()
    X_bad[0, 0] = float("nan")
    loss = opt.step((X_bad, y))
    assert not torch.isfinite(loss)
    assert opt.counters["nonfinite"] == 1
    assert opt.last_info["accepted"] is False
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    opt.step((X, y))  # and the next finite step proceeds
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_step_rejects_what_is_not_a_batch():
    model, loss_fn, X, y = make_problem()
    opt = curvkit.build_optimizer(model, loss_fn, {"lr": 0.1})
    with pytest.raises(TypeError, match="batch"):
        opt.step(X)


def test_parameter_unused_in_forward_gets_zero_gradient():
    net, loss_fn, X, y = make_problem(4)

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = net, nn.Linear(2, 2)

        def forward(self, x):
            return self.net(x)

    model = WithUnused()
    before = model.unused.weight.detach().clone()
    opt = curvkit.build_optimizer(model, loss_fn, {"lr": 0.1})
    opt.step((X, y))
    assert torch.equal(model.unused.weight, before)


@pytest.mark.parametrize("settings", [{"momentum": 0.9}, {"momentum": 0.5, "dampening": 0.3}])
def test_momentum_buffer_changed_from_outside_is_rescanned(settings):
    """A buffer changed between steps by someone else (scaled up near float32's largest
    value) is not trusted to its recorded bound: the step scans it and stays SGD's, bitwise
    (a NaN put into a buffer: tests/test_params.py)."""
    model, loss_fn, X, y = make_problem()
    ref = copy.deepcopy(model)
    opt = curvkit.build_optimizer(model, loss_fn, {
        "lr": 0.1, "preconditioner": "identity", "solver": {"name": "direct", **settings}})
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, **settings)

    def both(xb, yb):
        opt.step((xb, yb))
        sgd.zero_grad()
        loss_fn(ref(xb), yb).backward()
        sgd.step()

    data = list(batches(X, y, 6))
    both(*data[0])
    both(*data[1])
    ours = opt.solver.state["momentum_buffer"][0]
    theirs = sgd.state[ref[0].weight]["momentum_buffer"]
    with torch.no_grad():  # entries near the limit: the recorded bound no longer holds
        ours.mul_(1e36)
        theirs.mul_(1e36)
    for xb, yb in data[2:4]:
        both(xb, yb)
        assert opt.last_info["accepted"] is True
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
