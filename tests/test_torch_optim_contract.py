"""The torch.optim contract: step styles, parameter groups, schedulers, torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
from curvkit.errors import ConfigError


def make_model(seed: int = 0, norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8), nn.Tanh()]
    if norm:
        layers.append(nn.LayerNorm(8))
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers).double()


def make_data(n: int = 32, bs: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(X[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def run(style: str, config: dict, data, norm: bool = False) -> torch.Tensor:
    model, loss_fn = make_model(norm=norm), nn.CrossEntropyLoss()
    opt = curvkit.build_optimizer(model, loss_fn, config)
    for xb, yb in data:
        if style == "batch":
            loss = opt.step((xb, yb))
        elif style == "backward":
            opt.zero_grad()
            ref = loss_fn(model(xb), yb)
            ref.backward()
            loss = opt.step()
            assert torch.equal(loss, ref.detach())
        else:
            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                value = loss_fn(model(xb), yb)
                value.backward()
                return value
            # positional (LBFGS users) or by keyword (as Lightning calls it)
            loss = opt.step(closure) if style == "closure" else opt.step(closure=closure)
        assert torch.isfinite(loss)
    assert opt.counters["nonfinite"] == 0
    return flat(model)


# (outer_product has no Kronecker factors: kronecker and lie_group need ef, fisher or ggn)
COMPOSITIONS = [
    ("ef", "identity", "direct"),
    ("ef", "diagonal", "direct"),
    ("ef", "kronecker", "direct"),
    ("ef", "lie_group", "direct"),
    ("outer_product", "identity", "direct"),
    ("outer_product", "diagonal", "direct"),
    ("fisher", "kronecker", "direct"),
    ("ggn", "identity", "trust_region"),
]


@pytest.mark.parametrize("est,pre,sol", COMPOSITIONS)
def test_three_step_styles_give_the_same_trajectory(est, pre, sol):
    config = {"lr": 0.1, "estimator": est, "preconditioner": pre, "solver": sol}
    data = make_data()
    ref = run("batch", config, data)
    for style in ("backward", "closure", "closure_keyword"):
        assert torch.equal(run(style, config, data), ref), style


def test_observed_pass_is_reused_in_torch_optim_style():
    """ef + kronecker: after loss.backward(), the step needs no forward pass of its own."""
    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    opt = curvkit.build_optimizer(model, loss_fn, {"lr": 0.1, "estimator": "ef",
                                                   "preconditioner": "kronecker"})
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    for xb, yb in make_data():
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()
    assert len(calls) == 4


def test_a_composition_needing_the_batch_says_to_pass_it():
    model = make_model()
    (xb, yb), = make_data(8)
    opt = curvkit.build_optimizer(model, F.cross_entropy, {
        "lr": 0.1, "estimator": "outer_product", "preconditioner": "diagonal"})
    F.cross_entropy(model(xb), yb).backward()
    with pytest.raises(TypeError, match=r"needs the batch.*not an nn.Module.*step\(\(X, y\)\)"):
        opt.step()
    loss_fn = nn.CrossEntropyLoss()
    opt = curvkit.build_optimizer(model, loss_fn, {
        "lr": 0.1, "estimator": "ef", "preconditioner": "kronecker"})
    loss_fn(2.0 * model(xb), yb).backward()
    with pytest.raises(TypeError, match=r"not called on the model's output"):
        opt.step()
    # gradient accumulation: two passes, one step
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
        "lr": 0.1, "estimator": "ef", "preconditioner": "diagonal"})
    for _ in range(2):
        nn.CrossEntropyLoss()(model(xb), yb).backward()
    with pytest.raises(TypeError, match="2 forward passes"):
        opt.step()
    with pytest.raises(TypeError, match="no forward pass"):
        opt.step()


def test_gradient_only_composition_works_without_the_batch():
    """identity + direct needs only p.grad: torch.optim.SGD, with any loss callable."""
    model = make_model()
    ref = copy.deepcopy(model)
    opt = curvkit.build_optimizer(model, F.cross_entropy, {
        "lr": 0.1, "estimator": "outer_product", "solver": {"name": "direct", "momentum": 0.9}})
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for xb, yb in make_data():
        for o, m in ((opt, model), (sgd, ref)):
            o.zero_grad()
            F.cross_entropy(m(xb), yb).backward()
            o.step()
    assert torch.equal(flat(model), flat(ref))


# ---------------------------------------------------------------- parameter groups
def sgd_reference(groups_of, options: list[dict], data, **defaults) -> torch.Tensor:
    model = make_model(norm=True)
    groups = [{"params": ps, **o} for ps, o in zip(groups_of(model), options)]
    sgd = torch.optim.SGD(groups, **defaults)
    for xb, yb in data:
        sgd.zero_grad()
        nn.CrossEntropyLoss()(model(xb), yb).backward()
        sgd.step()
    return flat(model)


def split_bias(model):
    return ([p for n, p in model.named_parameters() if not n.endswith("bias")],
            [p for n, p in model.named_parameters() if n.endswith("bias")])


@pytest.mark.parametrize("option,values", [
    ("lr", (0.1, 0.02)),
    ("weight_decay", (0.1, 0.0)),
    ("momentum", (0.0, 0.9)),
    ("dampening", (0.0, 0.5)),
    ("nesterov", (False, True)),
])
def test_every_group_option_reaches_its_parameters(option, values):
    data = make_data()
    defaults = {"lr": 0.1, "momentum": 0.8}
    options = [{option: v} for v in values]
    expected = sgd_reference(split_bias, options, data, **defaults)
    model = make_model(norm=True)
    groups = [{"params": ps, **o} for ps, o in zip(split_bias(model), options)]
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
        "lr": 0.1, "preconditioner": "identity", "solver": {"name": "direct",
                                                             "momentum": 0.8}},
        param_groups=groups)
    assert [g[option] for g in opt.param_groups] == list(values)
    for b in data:
        opt.step(b)
    assert torch.equal(flat(model), expected)
    # and the uniform setting differs: the option really acted per group
    same = sgd_reference(split_bias, [{option: values[0]}] * 2, data, **defaults)
    assert not torch.equal(flat(model), same)


def test_config_patterns_no_weight_decay_on_biases_and_norms():
    data = make_data()

    def no_decay(model):
        decay = [p for n, p in model.named_parameters()
                 if not n.endswith("bias") and n != "2.weight"]
        rest = [p for n, p in model.named_parameters() if n.endswith("bias") or n == "2.weight"]
        return decay, rest

    expected = sgd_reference(no_decay, [{}, {"weight_decay": 0.0}], data, lr=0.1,
                             weight_decay=0.05)
    model = make_model(norm=True)
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
        "lr": 0.1, "solver": {"name": "direct", "weight_decay": 0.05},
        "param_groups": [{"names": ["*.bias"], "modules": ["LayerNorm"],
                          "weight_decay": 0.0}]})
    assert [len(g["params"]) for g in opt.param_groups] == [2, 4]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for b in data:
        opt.step(b)
    assert torch.equal(flat(model), expected)
    # the rules travel with the config in the state dict
    assert opt.state_dict()["curvkit"]["config"]["param_groups"][0]["modules"] == ["LayerNorm"]


def test_groups_with_a_preconditioner_and_torch_optim_style():
    """Groups act after the preconditioner: kronecker + per-group lr, three step styles."""
    data = make_data()
    results = []
    for style in ("batch", "backward"):
        model, loss_fn = make_model(), nn.CrossEntropyLoss()
        w, b = split_bias(model)
        opt = curvkit.build_optimizer(model, loss_fn, {
            "lr": 0.1, "estimator": "ef", "preconditioner": "kronecker"},
            param_groups=[{"params": w}, {"params": b, "lr": 0.0}])
        bias0 = [p.detach().clone() for p in b]
        for xb, yb in data:
            if style == "batch":
                opt.step((xb, yb))
            else:
                opt.zero_grad()
                loss_fn(model(xb), yb).backward()
                opt.step()
        assert all(torch.equal(p, q) for p, q in zip(b, bias0))  # lr 0: untouched
        results.append(flat(model))
    assert torch.equal(*results)


def test_group_errors_are_clear():
    model = make_model()
    w, b = split_bias(model)
    cfg = {"lr": 0.1}
    loss_fn = nn.CrossEntropyLoss()
    with pytest.raises(ConfigError, match=r"in no group: 0.bias"):
        curvkit.build_optimizer(model, loss_fn, cfg, param_groups=[{"params": w}])
    with pytest.raises(ConfigError, match=r"param_groups\[1\].params: parameter '0.weight'"):
        curvkit.build_optimizer(model, loss_fn, cfg, param_groups=[
            {"params": w + b}, {"params": w[:1]}])
    with pytest.raises(ConfigError, match=r"param_groups\[0\].betas: not an option"):
        curvkit.build_optimizer(model, loss_fn, cfg, param_groups=[
            {"params": w + b, "betas": (0.9, 0.99)}])
    with pytest.raises(ConfigError, match=r"param_groups\[1\].momentum: must be >= 0"):
        curvkit.build_optimizer(model, loss_fn, cfg, param_groups=[
            {"params": w}, {"params": b, "momentum": -1.0}])
    with pytest.raises(ConfigError, match=r"param_groups\[1\].lr = 0.01 differs.*trust_region"):
        curvkit.build_optimizer(model, loss_fn, {"lr": 0.1, "solver": "trust_region"},
                                param_groups=[{"params": w}, {"params": b, "lr": 0.01}])
    with pytest.raises(ConfigError, match=r"optimizer.param_groups\[0\]: matches no"):
        curvkit.build_optimizer(model, loss_fn, {"lr": 0.1, "param_groups": [
            {"names": ["*.gamma"], "weight_decay": 0.0}]})
    with pytest.raises(ConfigError, match=r"optimizer.param_groups\[0\].weight_decay: not an"):
        curvkit.build_optimizer(model, loss_fn, {"lr": 0.1, "solver": "trust_region",
                                                 "param_groups": [{"names": ["*.bias"],
                                                                   "weight_decay": 0.0}]})
    opt = curvkit.build_optimizer(model, loss_fn, cfg)
    with pytest.raises(ValueError, match="build a new optimizer"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


# ---------------------------------------------------------------- schedulers
@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=8),
    lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.2, step_size_up=2,
                                                cycle_momentum=True),
], ids=["OneCycleLR", "CyclicLR"])
def test_momentum_schedulers_drive_the_step_like_sgd(make_scheduler):
    data = make_data(64)
    model, ref = make_model(), make_model()
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
        "lr": 0.1, "solver": {"name": "direct", "momentum": 0.9}})
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    sched, sched_ref = make_scheduler(opt), make_scheduler(sgd)
    momenta = []
    for xb, yb in data:
        opt.step((xb, yb))
        sgd.zero_grad()
        nn.CrossEntropyLoss()(ref(xb), yb).backward()
        sgd.step()
        sched.step()
        sched_ref.step()
        momenta.append(opt.param_groups[0]["momentum"])
        assert opt.param_groups[0]["momentum"] == sgd.param_groups[0]["momentum"]
    assert len(set(momenta)) > 1
    assert torch.equal(flat(model), flat(ref))


def test_solver_without_momentum_has_none_in_param_groups():
    opt = curvkit.build_optimizer(make_model(), nn.CrossEntropyLoss(),
                                  {"lr": 0.1, "solver": "trust_region"})
    assert set(opt.param_groups[0]) == {"params", "lr"} | {
        k for k in opt.param_groups[0] if k in ("differentiable", "foreach")}


# ---------------------------------------------------------------- torch.compile
def _compiled_run(backend: str) -> None:
    data = make_data(16)
    config = {"lr": 0.1, "estimator": "ef", "preconditioner": "kronecker"}
    model, ref = make_model(), make_model()
    compiled = torch.compile(model, backend=backend)
    loss_fn = nn.CrossEntropyLoss()
    opt = curvkit.build_optimizer(compiled, loss_fn, config)
    opt_ref = curvkit.build_optimizer(ref, nn.CrossEntropyLoss(), config)
    assert opt.structures() == opt_ref.structures()
    assert set(opt.structures().values()) == {"kronecker"}
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    for xb, yb in data:
        opt.zero_grad()
        loss_fn(compiled(xb), yb).backward()
        opt.step()
        opt_ref.step((xb, yb))
    assert len(calls) == len(data)  # hooks reach the compiled module's layers; no extra pass
    assert opt.preconditioner.state.get("layers")
    assert torch.allclose(flat(model), flat(ref), rtol=1e-10, atol=1e-12)


def test_torch_compile_keeps_structures_eager_backend():
    _compiled_run("eager")


@pytest.mark.slow
def test_torch_compile_keeps_structures_inductor():
    _compiled_run("inductor")


def test_own_pass_sets_the_capture_hooks_aside_and_keeps_the_users():
    """step((X, y)) runs the model without curvkit's capture hooks where they are the only
    hooks (torch's hook-free call path), puts them back after, and runs a user's hooks;
    torch.optim style still sees the caller's pass afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    loss_fn = nn.CrossEntropyLoss()
    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    opt = curvkit.build_optimizer(model, loss_fn, {"lr": 0.1})
    hooks = (dict(model._forward_pre_hooks), dict(model._forward_hooks),
             dict(loss_fn._forward_pre_hooks), dict(loss_fn._forward_hooks))
    seen = []
    model.register_forward_hook(lambda m, a, out: seen.append(len(m._forward_pre_hooks)))
    loss_fn.register_forward_pre_hook(lambda m, a: seen.append(-len(m._forward_hooks)))
    opt.step((X, y))
    # the model's own pre hook was alone (set aside); its forward hook had the user's
    # beside it (kept); the loss' pre hook had the user's (kept), its forward hook alone
    assert seen == [0, 0]
    assert [list(h) for h in hooks] == [list(model._forward_pre_hooks),
                                        list(model._forward_hooks)[:1],
                                        list(loss_fn._forward_pre_hooks)[:1],
                                        list(loss_fn._forward_hooks)]
    loss = loss_fn(model(X), y)      # torch.optim style after a batch step: captured
    opt.zero_grad()
    loss.backward()
    assert torch.equal(opt.step(), loss.detach())
    assert opt.last_info["loss"] == loss.item()


@pytest.mark.parametrize("style", ["batch", "backward", "closure"])
def test_step_hooks_and_profiler_label_as_torch_optim(style):
    """The step skips torch.optim's wrapper only where nothing observes it: step pre/post
    hooks (the optimizer's and the global ones) still run, with torch's arguments (a pre
    hook may replace them), and a profiler still sees the step's label."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    opt = curvkit.build_optimizer(model, loss_fn, {"lr": 0.1})
    (xb, yb), (xb2, yb2) = make_data()[:2]
    calls = []

    def closure():
        opt.zero_grad()
        value = loss_fn(model(xb), yb)
        value.backward()
        return value

    def call():
        if style == "batch":
            return opt.step((xb, yb))
        if style == "backward":
            closure()
            return opt.step()
        return opt.step(closure=closure)

    handles = [opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o, a, k))),
               opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o))),
               register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("gpre", o))),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append(("gpost", o)))]
    try:
        call()
    finally:
        for h in handles:
            h.remove()
    assert [c[0] for c in calls] == ["gpre", "pre", "post", "gpost"]
    assert all(c[1] is opt for c in calls)
    assert calls[1][2][0] is opt  # torch's hooks see (optimizer, *args) as args
    assert opt.counters["steps"] == 1

    # a pre hook may replace the arguments, as with torch.optim
    if style == "batch":
        with torch.no_grad():
            expected, other = loss_fn(model(xb2), yb2), loss_fn(model(xb), yb)
        assert not torch.equal(expected, other)
        h = opt.register_step_pre_hook(lambda o, a, k: ((o, (xb2, yb2)), k))
        try:
            loss = opt.step((xb, yb))  # the step is taken on the hook's batch
        finally:
            h.remove()
        assert torch.equal(loss, expected)

    # without hooks the step runs as well, and counts the same
    call()
    assert opt.counters["steps"] == 2 + (style == "batch")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    names = {e.key for e in prof.key_averages()}
    assert "Optimizer.step#CurvkitOptimizer.step" in names


def test_a_subclass_step_is_the_same_with_and_without_hooks():
    """A subclass overriding ``_step`` gets it called on both paths (with a step hook, where
    torch.optim's wrapper is taken, and without)."""
    from curvkit.optimizer import CurvkitOptimizer

    calls = []

    class Counting(CurvkitOptimizer):
        def _step(self, *args, **kwargs):
            calls.append(len(args))
            return super()._step(*args, **kwargs)

    model, loss_fn = make_model(), nn.CrossEntropyLoss()
    ref = curvkit.build_optimizer(model, loss_fn, {"lr": 0.1})
    opt = Counting(model, loss_fn, ref.config)
    batch = make_data()[0]
    opt.step(batch)
    h = opt.register_step_post_hook(lambda o, a, k: None)
    opt.step(batch)
    h.remove()
    assert calls == [1, 1] and opt.counters["steps"] == 2
