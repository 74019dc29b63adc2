"""``diagonal``: d / (ρ(ŝ) + δ)^p against the diagonal of the estimator's dense matrix."""

from __future__ import annotations

import pytest
import torch

import curvkit
from curvkit.errors import ConfigError
from curvkit.testing.preconditioner import Case, Context, PreconditionerSuite, ema_average
from curvkit.testing.problems import problem


class TestDiagonal(PreconditionerSuite):
    name = "diagonal"
    train_lr = 0.5

    def cases(self) -> list[Case]:
        return [
            Case("mlp-ce-newton", {"power": 1.0, "damping": 0.1}),
            Case("mlp-mse-sum-sqrt", {"power": 0.5, "damping": 1e-2}, loss="mse",
                 reduction="sum"),
            Case("cnn-ce-newton", {"power": 1.0, "damping": 1e-2}, arch="cnn"),
            Case("cnn-mse-power0.75", {"power": 0.75, "damping": 1e-3}, arch="cnn",
                 loss="mse"),
            Case("skip-ce-sqrt", {"power": 0.5, "damping": 1e-4}, arch="skip"),
            Case("ema-bias-corrected", {"ema": 0.8, "damping": 0.05}, updates=3),
            Case("ema-uncorrected", {"ema": 0.7, "bias_correction": False, "damping": 0.05},
                 updates=3, loss="mse"),
            Case("ef-cnn", {"damping": 1e-3}, estimator="ef", arch="cnn"),
            Case("outer-product-sqrt", {"power": 0.5, "damping": 1e-6},
                 estimator="outer_product", loss="mse"),
            Case("fisher-mc-ema", {"ema": 0.5, "damping": 1e-2}, estimator="fisher",
                 estimator_options={"mc_samples": 2}, updates=2),
            Case("hessian-abs", {"negative": "abs", "damping": 1e-2}, estimator="hessian"),
            Case("hessian-clip-sqrt", {"negative": "clip", "damping": 1e-2, "power": 0.5},
                 estimator="hessian", loss="mse"),
        ]

    def reference(self, case: Case, ctx: Context) -> list[torch.Tensor]:
        o = case.options
        power, damping = o.get("power", 1.0), o.get("damping", 1e-3)
        if case.estimator == "hessian":
            # the Hessian's diagonal is a Hutchinson estimate: replay its probes (same draw)
            diags = ctx.each_update(lambda est, b: torch.cat([d.reshape(-1)
                                                              for d in est.diagonal(b)]))
        else:
            diags = ctx.each_update(lambda est, b: torch.diagonal(est.dense(b)).clone())
        s = ema_average(diags, o.get("ema", 0.0), o.get("bias_correction", True))
        s = s.abs() if o.get("negative", "abs") == "abs" else s.clamp_min(0.0)
        g = torch.cat([d.reshape(-1) for d in ctx.direction])
        p = g / (s + damping) ** power
        out, start = [], 0
        for d in ctx.direction:
            out.append(p[start:start + d.numel()].reshape(d.shape))
            start += d.numel()
        return out


def test_hessian_case_has_negative_entries():
    """The Hessian cases above exercise `negative` only if the diagonal has negative entries."""
    prob = problem("mlp", "ce", n=6, num_batches=2, seed=1)
    est = curvkit.create("estimator", "hessian", model=prob.model, loss_fn=prob.loss_fn)
    assert any((d < 0).any() for d in est.diagonal(prob.batches[0]))


def test_power_zero_is_identity_and_power_switches_square_root():
    prob = problem("mlp", "mse", n=8)
    est = curvkit.create("estimator", "ggn", model=prob.model, loss_fn=prob.loss_fn)
    grads = [torch.randn_like(p) for p in prob.params]
    out = {}
    for power in (0.0, 0.5, 1.0):
        pre = curvkit.create("preconditioner", "diagonal", model=prob.model, power=power,
                             damping=0.01)
        pre.update(est, prob.batches[0], grads)
        out[power] = pre.apply(grads)
    for g, a in zip(grads, out[0.0]):
        torch.testing.assert_close(a, g, rtol=0, atol=0)
    # (s + δ)^1 = ((s + δ)^0.5)², so g / P_1 · P_0.5 = g / P_0.5 · ... ratio test:
    for g, a, b in zip(grads, out[0.5], out[1.0]):
        torch.testing.assert_close(a * a, g * b, rtol=1e-10, atol=1e-14)


def test_update_every_refreshes_only_on_due_steps():
    prob = problem("mlp", "ce", n=8)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "lr": 0.1, "estimator": "ggn",
        "preconditioner": {"name": "diagonal", "update_every": 3, "damping": 0.1}})
    calls = []
    original = opt.estimator.diagonal
    opt.estimator.diagonal = lambda b: calls.append(opt.counters["steps"]) or original(b)
    for _ in range(7):
        opt.step(prob.batches[0])
    assert calls == [1, 4, 7]  # counters["steps"] is already incremented: steps 0, 3, 6
    assert opt.preconditioner.state["updates"] == 3


def test_bfloat16_statistics_kept_in_float32():
    prob = problem("mlp", "mse", n=8, dtype=torch.bfloat16)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "lr": 0.1, "estimator": "ggn", "preconditioner": {"name": "diagonal", "damping": 0.1}})
    for _ in range(3):
        opt.step(prob.batches[0])
    assert opt.counters["nonfinite"] == 0
    assert all(s.dtype == torch.float32 for s in opt.preconditioner.state["diag"])
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in prob.params)


def test_option_errors():
    prob = problem("mlp", "ce")
    with pytest.raises(ConfigError, match=r"ema: must be < 1"):
        curvkit.create("preconditioner", "diagonal", model=prob.model, ema=1.0)
    with pytest.raises(ConfigError, match=r"power: must be >= 0"):
        curvkit.create("preconditioner", "diagonal", model=prob.model, power=-1.0)
    with pytest.raises(RuntimeError, match="before the first update"):
        curvkit.create("preconditioner", "diagonal", model=prob.model).apply(prob.params)
