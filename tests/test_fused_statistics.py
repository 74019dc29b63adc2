"""``ef`` statistics from the optimizer's own pass (``observe``) equal the separate pass's.

On preconditioner updates the optimizer runs its forward and backward pass inside
``estimator.observe(batch)``; ``kronecker`` / ``kronecker_roots`` on that very batch then use
the recorded layer inputs and output gradients instead of a second forward and backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import curvkit
from curvkit.estimators.ef import EmpiricalFisherEstimator
from curvkit.parts import KRONECKER
from curvkit.testing.problems import make_data, make_loss, make_model

DT = torch.float64


def fcn(seed: int = 0) -> nn.Sequential:
    """Conv → ReLU(inplace) → Conv to per-pixel logits (N, 3, 3, 3): cross-entropy over
    positions (c = 1/(N·H·W) under "mean"), weight sharing in both layers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(2, 3, 3)).to(DT)


def setup(arch: str, loss: str, reduction: str, approx: str = "expand", n: int = 6, seed=0):
    if arch == "fcn":
        model = fcn(seed)
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n, 1, 5, 5, generator=g, dtype=DT)
        y = (torch.randint(0, 3, (n, 3, 3), generator=g) if loss == "ce"
             else torch.randn(n, 3, 3, 3, generator=g, dtype=DT))
    else:
        model = make_model(arch, seed=seed)
        X, y = make_data(arch, loss, n, 3, seed=seed)
    loss_fn = make_loss(loss, reduction)
    est = curvkit.create("estimator", "ef", model=model, loss_fn=loss_fn, kfac_approx=approx)
    return model, loss_fn, est, X, y


def training_pass(model, loss_fn, X, y):
    loss = loss_fn(model(X), y)
    return torch.autograd.grad(loss, list(model.parameters()))


class ForwardCounter:
    def __init__(self, model: nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, *args) -> None:
        self.calls += 1


def assert_factors_equal(ours, ref):
    assert ours.keys() == ref.keys() and ref
    for k in ref:
        assert ours[k].params == ref[k].params
        assert torch.equal(ours[k].A, ref[k].A)  # the same inputs: bitwise
        torch.testing.assert_close(ours[k].G, ref[k].G, rtol=1e-12, atol=1e-15)


def assert_roots_equal(ours, ref):
    assert ours.keys() == ref.keys() and ref
    for k in ref:
        assert torch.equal(ours[k].A_root, ref[k].A_root)
        torch.testing.assert_close(ours[k].G_root, ref[k].G_root, rtol=1e-12, atol=1e-15)


# an optimizer keeps one forward hook on the model's root while it lives: the capture of the
# caller's pass for torch.optim-style steps (curvkit.capture)
CAPTURE = 1


def hooks_left(model: nn.Module) -> int:
    n = sum(len(m._forward_hooks) for m in model.modules())
    return n + sum(len(p._backward_hooks or {}) for p in model.parameters())


# ----------------------------------------------------------------------------- equality
@pytest.mark.parametrize("arch", ["mlp", "cnn", "fcn"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_observed_statistics_equal_the_separate_pass(arch, loss, reduction, approx):
    model, loss_fn, est, X, y = setup(arch, loss, reduction, approx)
    ref, ref_roots = est.kronecker((X, y)), est.kronecker_roots((X, y))
    with est.observe((X, y)):
        training_pass(model, loss_fn, X, y)
    counter = ForwardCounter(model)
    ours, roots = est.kronecker((X, y)), est.kronecker_roots((X, y))
    assert counter.calls == 0  # both from the recording
    assert_factors_equal(ours, ref)
    assert_roots_equal(roots, ref_roots)
    assert hooks_left(model) == 1  # only the counter


def test_capability_is_declared_as_data():
    assert EmpiricalFisherEstimator.observed == {KRONECKER}
    model, loss_fn, est, X, y = setup("mlp", "ce", "mean")
    for name in ("ggn", "fisher", "hessian", "outer_product"):
        other = curvkit.create("estimator", name, model=model, loss_fn=loss_fn)
        assert other.observed == frozenset(), name
    fisher = curvkit.create("estimator", "fisher", model=model, loss_fn=loss_fn)
    with fisher.observe((X, y)):  # the base records nothing and installs no hook
        assert hooks_left(model) == 0
        training_pass(model, loss_fn, X, y)


# ----------------------------------------------------------------------------- optimizer
def build(model, loss_fn, preconditioner, fused=True):
    opt = curvkit.build_optimizer(model, loss_fn, {
        "lr": 0.1, "estimator": "ef", "preconditioner": preconditioner,
        "solver": {"name": "direct", "momentum": 0.5}})
    if not fused:
        opt._observes = False  # the separate statistics pass of earlier versions
    return opt


@pytest.mark.parametrize("arch,loss,reduction", [("mlp", "ce", "mean"), ("cnn", "mse", "sum"),
                                                 ("fcn", "ce", "mean")])
@pytest.mark.parametrize("preconditioner", [
    {"name": "lie_group", "update_every": 1, "lr_cov": 0.05},
    {"name": "kronecker", "damping": 1e-2, "update_every": 2}])
def test_fused_step_saves_the_pass_and_matches(arch, loss, reduction, preconditioner):
    model, loss_fn, _, X, y = setup(arch, loss, reduction)
    twin = copy.deepcopy(model)
    fused = build(model, loss_fn, preconditioner)
    plain = build(twin, loss_fn, preconditioner, fused=False)
    assert fused._observes
    c_fused, c_plain = ForwardCounter(model), ForwardCounter(twin)
    every = preconditioner["update_every"]
    for t in range(4):
        sl = slice(t % 2, t % 2 + 4)
        batch = (X[sl], y[sl])  # new tensor objects every step
        before = (c_fused.calls, c_plain.calls)
        fused.step(batch)
        plain.step(batch)
        update = t % every == 0
        assert c_fused.calls - before[0] == 1
        assert c_plain.calls - before[1] == (2 if update else 1)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert fused.estimator._recorded is None  # dropped at the end of every step
    assert hooks_left(model) == 1 + CAPTURE


def test_no_observation_when_the_preconditioner_does_not_use_it():
    model, loss_fn, _, X, y = setup("mlp", "ce", "mean")
    opt = build(model, loss_fn, {"name": "diagonal"})
    assert not opt._observes
    opt = curvkit.build_optimizer(model, loss_fn, {"estimator": "fisher",
                                                   "preconditioner": "kronecker"})
    assert not opt._observes


# ----------------------------------------------------------------------------- failures
class Boom(nn.Module):
    """Raises in the forward or (through a tensor hook) in the backward pass when armed."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = ""

    def forward(self, x):
        if self.armed == "forward":
            raise RuntimeError("boom in forward")
        if self.armed == "backward":
            x = x * 1.0

            def hook(g):
                raise RuntimeError("boom in backward")

            x.register_hook(hook)
        return x


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_hooks_are_removed_when_the_step_raises(where):
    torch.manual_seed(0)
    boom = Boom()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), boom).to(DT)
    loss_fn = nn.CrossEntropyLoss()
    X, y = make_data("mlp", "ce", 6, 3)
    opt = build(model, loss_fn, {"name": "lie_group", "update_every": 1})
    boom.armed = where
    with pytest.raises(RuntimeError, match=f"boom in {where}"):
        opt.step((X, y))
    assert hooks_left(model) == CAPTURE
    assert opt.estimator._recorded is None
    # after the failure: no stale recording, and the next step is fused and correct
    boom.armed = ""
    twin = copy.deepcopy(model)
    plain = build(twin, loss_fn, {"name": "lie_group", "update_every": 1}, fused=False)
    plain.counters["steps"] = opt.counters["steps"]
    plain.estimator.state["draw"] = opt.estimator.state["draw"]
    opt.step((X, y))
    plain.step((X, y))
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert hooks_left(model) == CAPTURE


def test_errors_are_those_of_the_separate_pass():
    """A weight used outside its module where the code cannot be read at build (else it is
    left to the fallback there): the observed pass is not used, the ordinary path raises
    its usual error."""

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            if float(x.sum()) < -1e30:  # control flow on values: fx cannot read it at build
                return x[:, :3]
            return self.fc(x) + x[:, :3] @ self.fc.weight[:, :3].T

    torch.manual_seed(0)
    model = Shared().to(DT)
    loss_fn = nn.MSELoss()
    X, y = make_data("mlp", "mse", 6, 3)
    est = curvkit.create("estimator", "ef", model=model, loss_fn=loss_fn)
    with est.observe((X, y)):
        training_pass(model, loss_fn, X, y)
    with pytest.raises(ValueError, match="not explained by the module's own inputs"):
        est.kronecker((X, y))
    assert hooks_left(model) == 0


# ----------------------------------------------------------------------------- staleness
def test_other_batches_get_fresh_statistics():
    model, loss_fn, est, X, y = setup("cnn", "ce", "mean")
    X2, y2 = make_data("cnn", "ce", 5, 3, seed=7)
    ref_a, ref_b = est.kronecker((X, y)), est.kronecker((X2, y2))
    ref_ab = est.kronecker([(X, y), (X2, y2)])
    with est.observe((X, y)):
        training_pass(model, loss_fn, X, y)
    counter = ForwardCounter(model)

    def passes(fn):
        before = counter.calls
        res = fn()
        return res, counter.calls - before

    res, n = passes(lambda: est.kronecker((X2, y2)))
    assert n == 1
    assert_factors_equal(res, ref_b)
    # equal values but other objects: not taken for the observed batch
    res, n = passes(lambda: est.kronecker((X.clone(), y)))
    assert n == 1
    res, n = passes(lambda: est.kronecker((X, y.clone())))
    assert n == 1
    # several batches: only the observed one comes from the recording
    res, n = passes(lambda: est.kronecker([(X, y), (X2, y2)]))
    assert n == 1
    assert_factors_equal(res, ref_ab)
    res, n = passes(lambda: est.kronecker((X, y)))
    assert n == 0
    assert_factors_equal(res, ref_a)
    # the parameters changed in place since the pass: recomputed at the new parameters
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    res, n = passes(lambda: est.kronecker((X, y)))
    assert n == 1
    assert not torch.allclose(res["0"].G, ref_a["0"].G)
    # a new draw: recomputed
    with est.observe((X, y)):
        training_pass(model, loss_fn, X, y)
    assert passes(lambda: est.kronecker((X, y)))[1] == 0
    est.advance()
    assert passes(lambda: est.kronecker((X, y)))[1] == 1
    # the batch modified in place after the pass: recomputed
    with est.observe((X, y)):
        training_pass(model, loss_fn, X, y)
    X.add_(1.0)
    assert passes(lambda: est.kronecker((X, y)))[1] == 1


@pytest.mark.parametrize("case", ["scaled", "regularised", "no_backward", "two_forwards"])
def test_a_pass_that_is_not_the_loss_is_ignored(case):
    model, loss_fn, est, X, y = setup("mlp", "ce", "mean")
    ref, ref_roots = est.kronecker((X, y)), est.kronecker_roots((X, y))
    params = list(model.parameters())
    with est.observe((X, y)):
        loss = loss_fn(model(X), y)
        if case == "scaled":
            torch.autograd.grad(2.0 * loss, params)
        elif case == "regularised":
            torch.autograd.grad(loss + sum((p ** 2).sum() for p in params), params)
        elif case == "two_forwards":
            torch.autograd.grad(loss + loss_fn(model(X), y), params)
    counter = ForwardCounter(model)
    assert_factors_equal(est.kronecker((X, y)), ref)
    assert_roots_equal(est.kronecker_roots((X, y)), ref_roots)
    # both recomputed, except with a regulariser on the parameters: it leaves the output
    # gradients (the statistics) as they are, and on this model, whose code proves every
    # layer's plain use, nothing compares the parameters' gradients: the pass is used
    assert counter.calls == (0 if case == "regularised" else 2)


def test_observe_takes_one_batch():
    _, _, est, X, y = setup("mlp", "ce", "mean")
    with pytest.raises(ValueError, match="one batch"):
        est.observe([(X, y), (X, y)])
