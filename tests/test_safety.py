"""Safety at the edges: option bounds, the applied update, checkpoints, config dicts.

Each test here failed before its fix: NaN/inf/huge options passed the bounds, a NaN or
huge lr set through param_groups reached the parameters, a checkpoint of another
composition or model loaded silently, extra keys beside ``optimizer`` were ignored.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import curvkit
from curvkit.errors import ConfigError


def problem(width: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 3))
    X = torch.randn(32, 4)
    y = torch.randint(0, 3, (32,))
    return model, nn.CrossEntropyLoss(), (X, y)


# ----------------------------------------------------------------------------- item 6
@pytest.mark.parametrize("config, path", [
    ({"lr": math.nan}, "optimizer.lr"),
    ({"lr": math.inf}, "optimizer.lr"),
    ({"lr": 10**400}, "optimizer.lr"),
    ({"preconditioner": {"name": "kronecker", "damping": math.inf}},
     "optimizer.preconditioner.damping"),
    ({"preconditioner": {"name": "kronecker", "damping": math.nan}},
     "optimizer.preconditioner.damping"),
    ({"solver": {"name": "trust_region", "initial_radius": 0.0}},
     "optimizer.solver.initial_radius"),
    ({"estimator": {"name": "fisher", "mc_samples": 10**30}},
     "optimizer.estimator.mc_samples"),
    ({"solver": {"name": "direct", "momentum": -math.inf}}, "optimizer.solver.momentum"),
])
def test_nonfinite_zero_and_huge_options_are_refused_at_build(config, path):
    model, loss_fn, _ = problem()
    with pytest.raises(ConfigError, match=rf"^{path.replace('.', '[.]')}: "):
        curvkit.build_optimizer(model, loss_fn, config)


def test_runner_diverge_factor_nan_is_refused():
    from curvkit.experiments.config import TrainOptions
    from curvkit.options import build_options

    with pytest.raises(ConfigError, match=r"train\.diverge_factor: must be a finite number"):
        build_options(TrainOptions, {"diverge_factor": math.nan}, "train")


def test_bounds_listing_shows_an_open_lower_end():
    spec = curvkit.get_registry().get("solver", "trust_region")
    radius = next(o for o in spec.options if o.name == "initial_radius")
    assert "in (0, inf]" in radius.describe()


# ----------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("solver", ["direct", "cubic"])
@pytest.mark.parametrize("lr", [math.nan, 1e38, math.inf])
def test_nonfinite_applied_update_never_reaches_the_parameters(solver, lr):
    # a linear least-squares model with large targets: the step's entries are ~1e3, so
    # 1e38·step overflows float32 (and NaN/inf are never finite)
    torch.manual_seed(0)
    model, loss_fn = nn.Sequential(nn.Linear(4, 3)), nn.MSELoss()
    batch = (torch.randn(32, 4), 1e3 * torch.randn(32, 3))
    if solver == "cubic":
        # without cubic's own acceptance test, which would reject the trial first
        cfg = {"estimator": "hessian", "preconditioner": "partition",
               "solver": {"name": "cubic", "safeguard": False}}
    else:
        cfg = {"solver": "direct"}
    opt = curvkit.build_optimizer(model, loss_fn, cfg)
    opt.step(batch)
    before = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step(batch)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert opt.last_info["accepted"] is False
    assert "lr·direction" in opt.last_info["skipped"]
    assert opt.counters["nonfinite"] >= 1


def _half_model(weight: float, group_lrs: tuple[float, float] | None = None):
    """y = w·x + b in float16, w at ``weight``; MSE with a target far below."""
    model = nn.Linear(1, 1).half()
    with torch.no_grad():
        model.weight.fill_(weight)
        model.bias.zero_()
    groups = None
    if group_lrs is not None:
        groups = [{"params": [model.weight], "lr": group_lrs[0]},
                  {"params": [model.bias], "lr": group_lrs[1]}]
    opt = curvkit.build_optimizer(model, lambda out, y: (out.float() * y).sum(),
                                  {"solver": "direct", "preconditioner": "identity",
                                   "lr": 1.0}, param_groups=groups)
    return model, opt


@pytest.mark.parametrize("group_lrs", [None, (1.0, 0.0), (0.0, 1.0)])
def test_update_bound_is_exact_near_the_largest_half(group_lrs):
    """θ = 6.4e4 in float16 (largest 65504): a step of 2000 overflows and is refused (the
    bound reads θ once |lr·d| exceeds the headroom); a step of 1 cannot overflow and is
    taken without reading θ (θ + 1 rounds back to 6.4e4). With parameter groups each
    group's lr counts: the group with lr 0 cannot overflow, whatever its direction."""
    x = torch.ones(4, 1, dtype=torch.float16)
    for grad, refused in ((-500.0, True), (-0.25, False)):
        model, opt = _half_model(6.4e4, group_lrs)
        before = [p.detach().clone() for p in model.parameters()]
        # loss = Σ y·out: d loss/dw = Σ y·x = 4·grad, so the step on w is −lr·4·grad
        opt.step((x, torch.full((4, 1), grad)))
        moves_w = group_lrs is None or group_lrs[0] > 0
        if refused and moves_w:
            assert opt.last_info["accepted"] is False, opt.last_info
            assert "lr·direction" in opt.last_info["skipped"]
            assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
        else:
            assert opt.last_info["accepted"] is True, opt.last_info
            assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- item 8
def saved(opt) -> dict:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


KFAC = {"preconditioner": "kronecker", "lr": 0.1}
SINGD = {"preconditioner": "lie_group", "lr": 0.1}


def test_checkpoint_of_another_composition_is_refused_clearly():
    model, loss_fn, batch = problem()
    kfac = curvkit.build_optimizer(model, loss_fn, KFAC)
    kfac.step(batch)
    singd = curvkit.build_optimizer(model, loss_fn, SINGD)
    before = singd.state_dict()
    with pytest.raises(ValueError, match=r"preconditioner 'kronecker'.*'lie_group'"):
        singd.load_state_dict(saved(kfac))
    assert singd.counters == before["curvkit"]["counters"]
    singd.step(batch)  # still usable


def test_checkpoint_of_another_width_is_refused():
    model, loss_fn, batch = problem(width=8)
    a = curvkit.build_optimizer(model, loss_fn, KFAC)
    a.step(batch)
    wide, _, _ = problem(width=9)
    b = curvkit.build_optimizer(wide, loss_fn, KFAC)
    with pytest.raises(ValueError, match=r"parameter '0.weight' is float32 \[8, 4\] in the "
                                         r"checkpoint but float32 \[9, 4\]"):
        b.load_state_dict(saved(a))


def test_checkpoint_with_other_parameter_names_or_dtype_is_refused():
    model, loss_fn, batch = problem()
    a = curvkit.build_optimizer(model, loss_fn, {"lr": 0.1})
    a.step(batch)
    other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Identity(), nn.Linear(8, 3))
    b = curvkit.build_optimizer(other, loss_fn, {"lr": 0.1})
    with pytest.raises(ValueError, match="parameter names differ"):
        b.load_state_dict(saved(a))
    m64, _, _ = problem()
    c = curvkit.build_optimizer(m64.double(), loss_fn, {"lr": 0.1})
    with pytest.raises(ValueError, match="float32 .* in the checkpoint but float64"):
        c.load_state_dict(saved(a))


def test_checkpoint_with_nonfinite_state_is_refused():
    model, loss_fn, batch = problem()
    opt = curvkit.build_optimizer(model, loss_fn, KFAC)
    opt.step(batch)
    sd = saved(opt)
    tensors = [v for v in _walk(sd["curvkit"]["preconditioner"]) if v.is_floating_point()]
    assert tensors
    tensors[0].fill_(math.nan)
    fresh = curvkit.build_optimizer(model, loss_fn, KFAC)
    with pytest.raises(ValueError, match="non-finite"):
        fresh.load_state_dict(sd)


def test_matching_checkpoint_still_loads():
    model, loss_fn, batch = problem()
    a = curvkit.build_optimizer(model, loss_fn, KFAC)
    a.step(batch)
    b = curvkit.build_optimizer(model, loss_fn, KFAC)
    b.load_state_dict(saved(a))
    assert b.counters["steps"] == 1


def _walk(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _walk(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _walk(v)


# ----------------------------------------------------------------------------- item 10
def test_extra_keys_beside_optimizer_are_an_error():
    model, loss_fn, _ = problem()
    with pytest.raises(ConfigError, match=r"^lr: unexpected key beside 'optimizer'"):
        curvkit.build_optimizer(model, loss_fn, {"optimizer": {"lr": 0.1}, "lr": 0.5})
    opt = curvkit.build_optimizer(model, loss_fn, {"optimizer": {"lr": 0.1}})
    assert opt.param_groups[0]["lr"] == 0.1
