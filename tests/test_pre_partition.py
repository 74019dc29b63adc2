"""``partition``: Σ_s η_s u_s with η = (H̄ + δI)⁻¹ḡ from the partition summary.

References are dense: with B = Diag(u) I_{P:S} (column s = u restricted to group s),
ḡ = Bᵀ∇L and H̄ = Bᵀ C B (Wolinski, eq. 9), built here from the group labels written out
independently of :mod:`curvkit.partitions`.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable

import pytest
import torch
from torch import nn

import curvkit
from curvkit.errors import ConfigError, IncompatibleError
from curvkit.estimators.base import Summary
from curvkit.params import trainable
from curvkit.testing.preconditioner import (
    Case,
    Context,
    PreconditionerSuite,
    ema_average,
    flat,
    unflat,
)
from curvkit.testing.problems import Problem, flat_loss, flat_params, mlp, problem

# ----------------------------------------------------------------------------- references


def labels_for(kind: str, names: list[str], case_groups: Callable | None = None) -> list[str]:
    """Group label of each parameter tensor, written out per partition kind."""
    if kind == "canonical":
        return list(names)
    if kind == "trivial":
        return ["all"] * len(names)
    if kind == "weights_biases":
        return ["b" if n.endswith("bias") else "w" for n in names]
    if kind == "blocks":  # block_size 1: one group per owning module
        return [n.rsplit(".", 1)[0] for n in names]
    if kind == "patterns":
        assert case_groups is not None
        return [case_groups(n) for n in names]
    raise AssertionError(kind)


def basis(u: list[torch.Tensor], names: list[str], kind: str,
          case_groups: Callable | None = None) -> torch.Tensor:
    """B = Diag(u) I_{P:S} as a dense P×S matrix."""
    uf = flat(u)
    if kind == "discrete":
        return torch.diag(uf)
    labels = labels_for(kind, names, case_groups)
    order = list(dict.fromkeys(labels))
    cols = []
    for lab in order:
        mask = torch.cat([torch.full((t.numel(),), float(lab == lb), dtype=uf.dtype)
                          for t, lb in zip(u, labels)])
        cols.append(uf * mask)
    return torch.stack(cols, dim=1)


def grad_on(prob: Problem, batch) -> list[torch.Tensor]:
    X, y = batch
    loss = prob.loss_fn(prob.model(X), y)
    return [g.detach() for g in torch.autograd.grad(loss, prob.params)]


def first_group(name: str) -> str:
    return "first" if name.startswith("0.") else "rest"


class TestPartition(PreconditionerSuite):
    name = "partition"
    train_lr = 0.5

    def cases(self) -> list[Case]:
        return [
            Case("canonical-ggn-mlp-ce", {"damping": 1e-3}),
            Case("canonical-hessian-cnn-mse", {"damping": 1e-2}, estimator="hessian",
                 arch="cnn", loss="mse"),
            Case("weights_biases-skip-sum", {"partition": "weights_biases"}, arch="skip",
                 reduction="sum"),
            Case("trivial-hessian-mse-sum", {"partition": "trivial"}, estimator="hessian",
                 loss="mse", reduction="sum"),
            Case("discrete-ggn-mlp", {"partition": "discrete", "damping": 1e-2}),
            Case("blocks-cnn", {"partition": "blocks", "block_size": 1, "damping": 1e-3},
                 arch="cnn"),
            Case("patterns-table", {"partition": "patterns",
                                    "groups": {"first": "^0\\.", "rest": "."}}),
            Case("direction-diagonal-sqrt", {"direction": {"name": "diagonal", "power": 0.5,
                                                           "damping": 1e-2},
                                             "damping": 1e-3}, updates=2),
            Case("average-last-and-eta-ema", {"average_last": 2, "eta_ema": 0.5,
                                              "damping": 1e-3}, updates=3, loss="mse"),
            Case("diagonal-only-hessian-cnn", {"diagonal_only": True, "damping": 1e-3},
                 estimator="hessian", arch="cnn", updates=2),
            Case("diagonal-only-ggn-mlp-mse-sum", {"diagonal_only": True}, loss="mse",
                 reduction="sum"),
        ]

    def reference(self, case: Case, ctx: Context) -> list[torch.Tensor]:
        o = case.options
        prob = ctx.problem
        names = [n for n, _ in trainable(prob.model)]
        kind = o.get("partition", "canonical")
        groups = first_group if kind == "patterns" else None
        inner = o.get("direction")
        denses = ctx.each_update(lambda est, b: est.dense(b))

        def u_of(d: list[torch.Tensor], k: int) -> list[torch.Tensor]:
            if inner is None:
                return d
            s = torch.diagonal(denses[k]).abs()
            return unflat(flat(d) / (s + inner["damping"]) ** inner["power"], d)

        k_avg, etas, Hs, gs = o.get("average_last", 1), [], [], []
        for k, batch in enumerate(ctx.batches):
            B = basis(u_of(ctx.direction, k), names, kind, groups)
            Hs.append(B.T @ denses[k] @ B)
            gs.append(B.T @ flat(grad_on(prob, batch)))
            H = sum(Hs[-k_avg:]) / len(Hs[-k_avg:])
            g = sum(gs[-k_avg:]) / len(gs[-k_avg:])
            if o.get("diagonal_only"):  # App. K: the interactions between groups dropped
                H = torch.diag(torch.diagonal(H))
            etas.append(torch.linalg.solve(H + o.get("damping", 0.0) * torch.eye(len(g),
                                                                                 dtype=H.dtype),
                                           g))
        eta = ema_average(etas, o.get("eta_ema", 0.0), bias_correction=False)
        B = basis(u_of(ctx.direction, len(ctx.batches) - 1), names, kind, groups)
        return unflat(B @ eta, ctx.direction)


# ----------------------------------------------------------------------------- partitions


def build(model, **options):
    return curvkit.create("preconditioner", "partition", model=model, **options)


def test_canonical_partition_groups_weights_and_biases_of_each_layer():
    model = mlp(hidden=(5, 4))
    pre = build(model)
    assert pre.group_names() == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight",
                                 "4.bias"]
    assert [int(i) for i in pre.partition.ids] == [0, 1, 2, 3, 4, 5]
    assert all(i.dim() == 0 for i in pre.partition.ids)
    assert pre.structures()["2.bias"] == "partition:2.bias"
    sizes = pre.partition.sizes([p for p in model.parameters()])
    assert sizes == [p.numel() for p in model.parameters()]


def test_coarser_partitions():
    model = mlp(hidden=(5, 4))  # layers 0, 2, 4
    assert build(model, partition="weights_biases").group_names() == ["weights", "biases"]
    # no empty groups: without biases there is one group
    assert build(mlp(bias=False), partition="weights_biases").group_names() == ["weights"]
    blocks = build(model, partition="blocks", block_size=2)
    assert blocks.group_names() == ["0+2", "4"]
    assert [int(i) for i in blocks.partition.ids] == [0, 0, 0, 0, 1, 1]
    assert build(model, partition="trivial").partition.groups == 1
    pats = build(model, partition="patterns", groups=["bias$", ["^0\\.", "^2\\."]],
                 unmatched="rest")
    assert pats.group_names() == ["^0\\.|^2\\.", "bias$", "rest"]
    assert [int(i) for i in pats.partition.ids] == [0, 1, 0, 1, 2, 1]
    own = build(model, partition="patterns", groups={"hidden": ["^0\\.", "^2\\."]},
                unmatched="own")
    assert own.group_names() == ["hidden", "4.weight", "4.bias"]
    disc = build(model, partition="discrete")
    P = sum(p.numel() for p in model.parameters())
    assert disc.partition.groups == P
    assert torch.equal(torch.cat([i.reshape(-1) for i in disc.partition.ids]), torch.arange(P))
    assert disc.structures()["0.weight"] == "partition:element-wise"


def test_partition_errors_are_clear():
    model = mlp()
    with pytest.raises(ValueError, match=r"no pattern matches parameter\(s\) 2.weight, 2.bias"):
        build(model, partition="patterns", groups=["^0\\."])
    with pytest.raises(ValueError, match=r"group\(s\) 'nope' match no trainable parameter"):
        build(model, partition="patterns", groups={"all": ".", "nope": "^x"})
    with pytest.raises(ConfigError, match=r"invalid regular expression"):
        build(model, partition="patterns", groups=["("])
    with pytest.raises(ConfigError, match=r"groups: required"):
        build(model, partition="patterns")
    with pytest.raises(ConfigError, match=r"groups: only used with partition = 'patterns'"):
        build(model, groups=["."])
    with pytest.raises(ValueError, match=r"S = P = 43 groups, more than max_groups = 10"):
        build(model, partition="discrete", max_groups=10)
    with pytest.raises(ConfigError, match=r"eta_ema: must be < 1"):
        build(model, eta_ema=1.0)
    with pytest.raises(ConfigError, match=r"direction: cannot be another 'partition'"):
        build(model, direction="partition")
    with pytest.raises(ConfigError, match=r"^preconditioner\.partition\.direction\.powr: "
                                          r"unknown option.*'power'"):
        build(model, direction={"name": "diagonal", "powr": 0.5})
    with pytest.raises(RuntimeError, match="before the first update"):
        build(model).apply([torch.zeros_like(p) for p in model.parameters()])


def test_direction_needs_become_requirements():
    prob = problem("mlp", "ce")
    spec = curvkit.get_registry().get("preconditioner", "partition")
    opts = build(prob.model, direction={"name": "kronecker"}).options
    kron = curvkit.create("preconditioner", "kronecker", model=prob.model)
    assert spec.cls.requirements(opts) == {"summary"} | type(kron).requirements(kron.options)
    assert "kronecker" in spec.cls.requirements(opts)
    # hessian has `summary` but not `kronecker`: refused before training, naming both
    with pytest.raises(IncompatibleError, match=r"^optimizer\.preconditioner: preconditioner "
                                                r"'partition' needs capability 'kronecker'"):
        curvkit.build_optimizer(prob.model, prob.loss_fn, {
            "estimator": "hessian", "preconditioner": {"name": "partition",
                                                       "direction": {"name": "kronecker"}}})


# ----------------------------------------------------------------------------- Wolinski App. C


def dense_hessian(prob: Problem, batch) -> torch.Tensor:
    return torch.autograd.functional.hessian(flat_loss(prob.model, prob.loss_fn, *batch),
                                             flat_params(prob.model))


@pytest.mark.parametrize("arch,loss,reduction", [("mlp", "ce", "mean"), ("cnn", "mse", "sum")])
def test_trivial_partition_is_cauchy_steepest_descent(arch, loss, reduction):
    prob = problem(arch, loss, reduction, n=8)
    batch = prob.batches[0]
    g = flat(grad_on(prob, batch))
    H = dense_hessian(prob, batch)
    theta0 = flat_params(prob.model)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "lr": 1.0, "estimator": "hessian", "preconditioner": {"name": "partition",
                                                              "partition": "trivial"}})
    opt.step(batch)
    want = theta0 - (g @ g) / (g @ H @ g) * g
    torch.testing.assert_close(flat_params(prob.model), want, rtol=1e-10, atol=1e-12)
    assert opt.last_info["partition_eta"] == pytest.approx([float((g @ g) / (g @ H @ g))],
                                                            rel=1e-10)


def linear_regression(seed: int = 0) -> Problem:
    """A strictly convex problem: least squares with a linear model (P = 3·2 + 2 = 8)."""
    torch.manual_seed(seed)
    model = nn.Linear(3, 2).to(torch.float64)
    X = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randn(12, 2, dtype=torch.float64)
    return Problem(model, nn.MSELoss(), [(X, y)])


def test_discrete_partition_is_newton():
    prob = linear_regression()
    batch = prob.batches[0]
    g = flat(grad_on(prob, batch))
    H = dense_hessian(prob, batch)
    assert torch.linalg.eigvalsh(H).min() > 0 and (g.abs() > 1e-8).all()
    theta0 = flat_params(prob.model)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "lr": 1.0, "estimator": "hessian", "preconditioner": {"name": "partition",
                                                              "partition": "discrete"}})
    opt.step(batch)
    torch.testing.assert_close(flat_params(prob.model), theta0 - torch.linalg.solve(H, g),
                               rtol=1e-10, atol=1e-12)
    # a quadratic: one Newton step lands on the minimizer
    assert flat(grad_on(prob, batch)).abs().max() < 1e-12


# ----------------------------------------------------------------------------- semantics


class Scripted:
    """An estimator stub returning scripted summaries and recording the directions."""

    name = "scripted"

    def __init__(self, summaries: list[Summary]) -> None:
        self.summaries = list(summaries)
        self.directions: list[list[torch.Tensor]] = []

    def summary(self, batch, direction, partition, groups):
        self.directions.append([d.clone() for d in direction])
        return self.summaries.pop(0)


def test_average_last_and_eta_ema_and_d3_averaging():
    model = mlp()
    pre = build(model, average_last=2, eta_ema=0.25)
    S = 4
    gen = torch.Generator().manual_seed(3)
    sums = []
    for _ in range(3):
        A = torch.randn(S, S, generator=gen, dtype=torch.float64)
        sums.append(Summary(g=torch.randn(S, generator=gen, dtype=torch.float64),
                            H=A @ A.T + torch.eye(S, dtype=torch.float64),
                            D3=torch.randn(S, generator=gen, dtype=torch.float64)))
    est = Scripted(sums)
    grads = [torch.ones_like(p) for p in model.parameters()]
    etas = []
    for k in range(3):
        pre.update(est, None, grads)
        lo = max(0, k - 1)
        H = sum(s.H for s in sums[lo:k + 1]) / (k + 1 - lo)
        g = sum(s.g for s in sums[lo:k + 1]) / (k + 1 - lo)
        D3 = sum(s.D3 for s in sums[lo:k + 1]) / (k + 1 - lo)
        torch.testing.assert_close(pre.state["H"], H, rtol=1e-14, atol=0)
        torch.testing.assert_close(pre.state["D3"], D3, rtol=1e-14, atol=0)
        etas.append(torch.linalg.solve(H, g))
        torch.testing.assert_close(pre.state["eta_raw"], etas[-1])
    want = 0.25 ** 2 * etas[0] + 0.75 * 0.25 * etas[1] + 0.75 * etas[2]
    torch.testing.assert_close(pre.state["eta"], want, rtol=1e-12, atol=0)
    assert pre.eta() == pytest.approx(want.tolist())
    info = pre.info()
    json.dumps(info)
    assert info["partition_S"] == S and info["partition_eta"] == pytest.approx(want.tolist())
    assert pre.pseudo_hessian() == pre.state["H"].tolist() == info["partition_H"]
    assert info["partition_groups"] == pre.group_names()


def test_update_every_keeps_eta_and_scales_the_current_gradient():
    prob = problem("mlp", "ce", n=8, num_batches=3)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "lr": 0.5, "estimator": "ggn",
        "preconditioner": {"name": "partition", "update_every": 3, "damping": 1e-2,
                           "direction": {"name": "diagonal", "damping": 0.1}}})
    pre = opt.preconditioner
    calls = []
    original = opt.estimator.summary
    opt.estimator.summary = lambda *a, **k: calls.append(opt.counters["steps"]) or original(*a,
                                                                                            **k)
    etas = []
    for t in range(5):
        batch = prob.batches[t % 3]
        theta = flat_params(prob.model)
        g = grad_on(prob, batch)
        eta_before = pre.state.get("eta")
        opt.step(batch)
        if t % 3:
            assert torch.equal(pre.state["eta"], eta_before)
            # the stored η scales the inner direction of the *current* gradient
            u = flat(pre.inner.apply(g))
            ids = torch.cat([i.expand_as(p).reshape(-1) for i, p in
                             zip(pre.partition.ids, prob.params)])
            want = theta - 0.5 * pre.state["eta"][ids] * u
            torch.testing.assert_close(flat_params(prob.model), want, rtol=1e-12, atol=1e-14)
        etas.append(pre.state["eta"])
    assert calls == [1, 4]  # steps 0 and 3 (the counter is incremented before the update)
    assert pre.state["updates"] == 2
    assert pre.inner.state["updates"] == 5  # the inner direction keeps its own schedule
    assert not torch.equal(etas[2], etas[3])


def test_state_dict_round_trip_through_the_optimizer_with_inner_direction():
    prob = problem("mlp", "mse", n=8, num_batches=2)
    cfg = {"lr": 0.3, "estimator": "ggn",
           "preconditioner": {"name": "partition", "eta_ema": 0.5, "average_last": 2,
                              "damping": 1e-2, "update_every": 2,
                              "direction": {"name": "diagonal", "ema": 0.9, "damping": 0.1}}}
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, cfg)
    for t in range(3):
        opt.step(prob.batches[t % 2])
    buf = io.BytesIO()
    torch.save({"model": prob.model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = copy.deepcopy(prob.model)
    model2.load_state_dict(ckpt["model"])
    opt2 = curvkit.build_optimizer(model2, prob.loss_fn, cfg)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.preconditioner.state["direction"] is opt2.preconditioner.inner.state
    for t in range(3, 6):
        opt.step(prob.batches[t % 2])
        opt2.step(prob.batches[t % 2])
    for a, b in zip(prob.model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    small = build(mlp(hidden=(2,)))
    with pytest.raises(ValueError, match=r"checkpoint has S = 4 groups, the configured "
                                         r"partition has 1"):
        build(mlp(), partition="trivial").load_state_dict(small.state_dict() | {"groups": 4})


class Unused(nn.Module):
    """A parameter with zero gradient (u_s = g_s = 0): its group has ḡ_s = 0, H̄_s· = 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.unused = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.fc(x) + 0.0 * self.unused.sum()


def test_singular_pseudo_hessian_skips_the_step_and_damping_fixes_it():
    torch.manual_seed(0)
    model = Unused().to(torch.float64)
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    before = [p.detach().clone() for p in model.parameters()]
    opt = curvkit.build_optimizer(model, loss_fn, {"estimator": "ggn",
                                                   "preconditioner": "partition"})
    opt.step((X, y))
    assert opt.counters["nonfinite"] == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    opt = curvkit.build_optimizer(model, loss_fn, {
        "estimator": "ggn", "preconditioner": {"name": "partition", "damping": 1e-6}})
    opt.step((X, y))
    assert opt.counters["nonfinite"] == 0
    assert not torch.equal(model.fc.weight, before[1])
    assert [n for n, _ in model.named_parameters()] == ["unused", "fc.weight", "fc.bias"]
    assert torch.equal(model.unused, before[0])


# ----------------------------------------------------------------------------- diagonal H̄


@pytest.mark.parametrize("arch,loss,reduction", [("mlp", "ce", "mean"), ("cnn", "mse", "sum")])
def test_diagonal_only_is_the_dense_formula_with_the_diagonal_of_h_bar(arch, loss, reduction):
    """η_s = ḡ_s / (H̄_ss + δ) with H̄ = Bᵀ H B from the dense Hessian; the step is
    θ − lr·B η, and the full H̄ is still what the preconditioner reports."""
    prob = problem(arch, loss, reduction, n=8)
    batch = prob.batches[0]
    names = [n for n, _ in trainable(prob.model)]
    g = grad_on(prob, batch)
    B = basis(g, names, "canonical")
    H_bar = B.T @ dense_hessian(prob, batch) @ B
    g_bar = B.T @ flat(g)
    damping = 1e-3
    eta = g_bar / (torch.diagonal(H_bar) + damping)
    # the interactions are not negligible here, so the test tells the two variants apart
    assert not torch.allclose(eta, torch.linalg.solve(H_bar + damping * torch.eye(len(g_bar),
                                                      dtype=H_bar.dtype), g_bar), rtol=1e-3)
    theta0 = flat_params(prob.model)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "lr": 0.5, "estimator": "hessian",
        "preconditioner": {"name": "partition", "diagonal_only": True, "damping": damping}})
    opt.step(batch)
    torch.testing.assert_close(flat_params(prob.model), theta0 - 0.5 * (B @ eta),
                               rtol=1e-9, atol=1e-12)
    assert opt.last_info["partition_eta"] == pytest.approx(eta.tolist(), rel=1e-9)
    torch.testing.assert_close(torch.tensor(opt.last_info["partition_H"], dtype=H_bar.dtype),
                               H_bar, rtol=1e-9, atol=1e-12)
    summary = opt.preconditioner.group_summary()
    torch.testing.assert_close(summary.H, torch.diag(torch.diagonal(H_bar)) +
                               damping * torch.eye(len(g_bar), dtype=H_bar.dtype),
                               rtol=1e-9, atol=1e-12)


def test_diagonal_only_with_the_cubic_solver_uses_the_diagonal_summary():
    """The cubic rule receives Diag(H̄): η is cubic_eta(Diag(H̄), ḡ, D3)."""
    from curvkit.solvers.cubic import cubic_eta

    model = mlp()
    S = 4
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(S, S, generator=gen, dtype=torch.float64)
    summary = Summary(g=torch.randn(S, generator=gen, dtype=torch.float64),
                      H=A @ A.T - 0.5 * torch.eye(S, dtype=torch.float64),
                      D3=torch.randn(S, generator=gen, dtype=torch.float64))
    solver = curvkit.create("solver", "cubic", lambda_int=1.0)
    pre = build(model, diagonal_only=True)
    grads = [torch.ones_like(p) for p in model.parameters()]
    pre.update(Scripted([summary]), None, grads)
    # the typed value handed to the solver carries Diag(H̄), the direction and the group ids
    given = pre.group_summary(grads)
    torch.testing.assert_close(given.H, torch.diag(torch.diagonal(summary.H)), rtol=0, atol=0)
    assert given.version == 1 and given.groups == S and len(given.u) == len(grads)
    want = cubic_eta(torch.diag(torch.diagonal(summary.H)), summary.g, summary.D3, 1.0)
    full = cubic_eta(summary.H, summary.g, summary.D3, 1.0)
    torch.testing.assert_close(solver.solve(given).eta, want.eta, rtol=1e-12, atol=0)
    assert not torch.allclose(want.eta, full.eta, rtol=1e-3)
    torch.testing.assert_close(pre.state["H"], summary.H, rtol=0, atol=0)


# ----------------------------------------------------------------------------- Method 1 as written


class ScriptedBatches(Scripted):
    def __init__(self, summaries):
        super().__init__(summaries)
        self.batches = []

    def summary(self, batch, direction, partition, groups):
        self.batches.append(batch)
        return super().summary(batch, direction, partition, groups)


def scripted_summaries(n: int, S: int = 4) -> list[Summary]:
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        A = torch.randn(S, S, generator=gen, dtype=torch.float64)
        out.append(Summary(g=torch.randn(S, generator=gen, dtype=torch.float64),
                           H=A @ A.T + torch.eye(S, dtype=torch.float64),
                           D3=torch.randn(S, generator=gen, dtype=torch.float64)))
    return out


def test_direction_momentum_measures_the_summary_along_the_momentum():
    """u_t = m_t = β m_{t−1} + g_t (Method 1 with a momentum direction, footnote 5); the
    typed group_summary hands the same u to the solver."""
    model = mlp()
    pre = build(model, direction_momentum=0.5)
    est = Scripted(scripted_summaries(3))
    gen = torch.Generator().manual_seed(0)
    m = None
    for t in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
        m = grads if m is None else [g + 0.5 * a for a, g in zip(m, grads)]
        assert pre.should_update(t)
        pre.update(est, None, grads)
        for got, want in zip(est.directions[-1], m):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        for got, want in zip(pre.group_summary(grads).u, m):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    with pytest.raises(curvkit.StepError, match=r"direction_momentum: the direction is a "
                                                r"momentum.*solver 'cubic'"):
        pre.apply(grads)


def test_summary_batch_previous_measures_on_the_previous_steps_batch():
    """Algorithm 1 draws the summary's mini-batch independently of the gradient's: the
    summary at step t is measured on batch t − 1 (on its own batch at the first step),
    also on steps between refreshes the batch is remembered."""
    model = mlp()
    pre = build(model, summary_batch="previous", update_every=2)
    est = ScriptedBatches(scripted_summaries(3))
    grads = [torch.ones_like(p) for p in model.parameters()]
    for t in range(5):
        assert pre.should_update(t)
        pre.update(est, f"batch{t}", grads)
    assert est.batches == ["batch0", "batch1", "batch3"]
    pre2 = build(model)
    est2 = ScriptedBatches(scripted_summaries(2))
    for t in range(2):
        pre2.should_update(t)
        pre2.update(est2, f"batch{t}", grads)
    assert est2.batches == ["batch0", "batch1"]
