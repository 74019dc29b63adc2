"""``block``: per-block (C_bb + δI)⁻¹ d against blocks sliced from the estimator's dense matrix."""

from __future__ import annotations

import pytest
import torch

import curvkit
from curvkit.errors import ConfigError
from curvkit.params import owners
from curvkit.testing.preconditioner import Case, Context, PreconditionerSuite, ema_average
from curvkit.testing.problems import problem


def block_index(model: torch.nn.Module, blocks: str) -> list[torch.Tensor]:
    """Flat coordinates of each block, from the parameter order (written independently)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    starts, start = {}, 0
    for n, p in named:
        starts[n] = torch.arange(start, start + p.numel())
        start += p.numel()
    if blocks == "parameter":
        return [starts[n] for n, _ in named]
    own = owners(model)
    groups: dict[str, list[torch.Tensor]] = {}
    for n, _ in named:
        groups.setdefault(own[n][0], []).append(starts[n])
    return [torch.cat(v) for v in groups.values()]


class TestBlock(PreconditionerSuite):
    name = "block"
    train_lr = 0.5

    def cases(self) -> list[Case]:
        return [
            Case("mlp-ce-parameter", {"damping": 1e-3}),
            Case("mlp-mse-sum-layer", {"blocks": "layer", "damping": 1e-2}, loss="mse",
                 reduction="sum"),
            Case("cnn-ce-parameter", {"damping": 1e-3}, arch="cnn"),
            Case("cnn-mse-layer-dense", {"blocks": "layer", "source": "dense", "damping": 1e-3},
                 arch="cnn", loss="mse"),
            Case("skip-layer", {"blocks": "layer", "damping": 1e-2}, arch="skip"),
            Case("ema", {"ema": 0.9, "damping": 1e-2}, updates=3, loss="mse"),
            Case("ema-uncorrected-eigh", {"ema": 0.5, "bias_correction": False,
                                          "inverse": "eigh", "damping": 1e-2}, updates=2),
            Case("fisher-ema", {"ema": 0.5, "damping": 1e-2}, estimator="fisher", updates=2),
            Case("ef-cnn-layer", {"blocks": "layer", "damping": 1e-2}, estimator="ef",
                 arch="cnn"),
            Case("hessian-eigh-abs", {"inverse": "eigh", "negative": "abs", "damping": 1e-3},
                 estimator="hessian"),
            Case("hessian-eigh-clip-layer", {"inverse": "eigh", "negative": "clip",
                                             "blocks": "layer", "damping": 1e-2},
                 estimator="hessian", loss="mse"),
            Case("hessian-cholesky-fallback", {"damping": 1e-6}, estimator="hessian"),
        ]

    def train_case(self) -> Case:
        return Case("train", {"damping": 0.1, "blocks": "layer"}, n=16)

    def reference(self, case: Case, ctx: Context) -> list[torch.Tensor]:
        o = case.options
        damping = o.get("damping", 1e-3)
        dense = ctx.each_update(lambda est, b: est.dense(b))
        C = ema_average([0.5 * (D + D.T) for D in dense], o.get("ema", 0.0),
                        o.get("bias_correction", True))
        g = torch.cat([d.reshape(-1) for d in ctx.direction])
        out = torch.zeros_like(g)
        for idx in block_index(ctx.problem.model, o.get("blocks", "parameter")):
            B = C[idx][:, idx]
            lam, U = torch.linalg.eigh(B)
            pd = bool((lam + damping > 0).all())
            if o.get("inverse", "cholesky") == "cholesky" and pd:
                out[idx] = torch.linalg.solve(B + damping * torch.eye(len(idx),
                                                                       dtype=B.dtype), g[idx])
            else:
                lam = lam.abs() if o.get("negative", "abs") == "abs" else lam.clamp_min(0)
                out[idx] = U @ ((U.T @ g[idx]) / (lam + damping))
        res, start = [], 0
        for d in ctx.direction:
            res.append(out[start:start + d.numel()].reshape(d.shape))
            start += d.numel()
        return res


def test_indefinite_block_falls_back_to_eigh():
    prob = problem("mlp", "ce", n=6, num_batches=2, seed=1)
    est = curvkit.create("estimator", "hessian", model=prob.model, loss_fn=prob.loss_fn)
    pre = curvkit.create("preconditioner", "block", model=prob.model, damping=1e-6)
    pre.update(est, prob.batches[0], [])
    assert pre.info()["block_eigh_fallbacks"] >= 1
    ggn = curvkit.create("estimator", "ggn", model=prob.model, loss_fn=prob.loss_fn)
    pre.update(ggn, prob.batches[0], [])
    assert pre.info()["block_eigh_fallbacks"] == 0


def test_max_block_size_refused_before_training():
    prob = problem("mlp", "ce")  # 0.weight has 20 entries, layer "0" has 25
    with pytest.raises(ConfigError) as err:
        curvkit.build_optimizer(prob.model, prob.loss_fn, {
            "preconditioner": {"name": "block", "max_block_size": 19}})
    msg = str(err.value)
    assert "max_block_size" in msg and "parameter '0.weight' has 20 entries" in msg, msg
    with pytest.raises(ConfigError, match=r"module '0' has 25 entries.*max_block_size = 24"):
        curvkit.build_optimizer(prob.model, prob.loss_fn, {
            "preconditioner": {"name": "block", "blocks": "layer", "max_block_size": 24}})
    curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "preconditioner": {"name": "block", "blocks": "layer", "max_block_size": 25}})


def test_structures_and_requirements():
    prob = problem("skip", "ce")
    pre = curvkit.create("preconditioner", "block", model=prob.model, blocks="layer")
    assert pre.block_names == ["(root)", "fc1", "fc2", "skip"]  # model.parameters() order
    assert set(pre.structures().values()) == {"block"}
    spec = curvkit.get_registry().get("preconditioner", "block")
    assert spec.cls.requirements(pre.options) == {"matvec"}
    dense = curvkit.create("preconditioner", "block", model=prob.model, source="dense")
    assert spec.cls.requirements(dense.options) == {"dense"}


def test_bfloat16_blocks_kept_in_float32():
    prob = problem("mlp", "mse", n=8, dtype=torch.bfloat16)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "lr": 0.1, "estimator": "ggn", "preconditioner": {"name": "block", "damping": 0.1}})
    for _ in range(2):
        opt.step(prob.batches[0])
    assert opt.counters["nonfinite"] == 0
    assert all(b.dtype == torch.float32 for b in opt.preconditioner.state["inverses"])
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in prob.params)
