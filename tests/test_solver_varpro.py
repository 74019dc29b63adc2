"""``varpro``: inner solves against scipy, the reduced gradient, the implicit Jacobian, the
reduced Gauss-Newton matrix against dense references, and GNvpro against joint
Gauss-Newton. All float64; references go through the real model (functional_call) and
scipy, never through the solver's own head code."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize as so
import torch
from torch import nn
from torch.func import functional_call

import curvkit
from curvkit.errors import ConfigError, StepError
from curvkit.testing.problems import cnn, mlp

DT = torch.float64


# ----------------------------------------------------------------------------- helpers
def data(arch: str, loss: str, n: int = 12, d: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 5, 5) if arch == "cnn" else (4,)
    X = torch.randn((n, *shape), generator=g, dtype=DT)
    # every class present: with an unregularized bias an absent class has no finite optimum
    y = (torch.arange(n) % d)[torch.randperm(n, generator=g)] if loss == "ce" else \
        torch.randn((n, d), generator=g, dtype=DT)
    return X, y


def make_model(arch: str, d: int = 3, seed: int = 0) -> nn.Module:
    return cnn(out_features=d, seed=seed) if arch == "cnn" else \
        mlp(4, (5,), d, seed=seed)


def make_loss(loss: str, reduction: str = "mean") -> nn.Module:
    return nn.CrossEntropyLoss(reduction=reduction) if loss == "ce" else \
        nn.MSELoss(reduction=reduction)


def build(model, loss_fn, **solver):
    return curvkit.build_optimizer(model, loss_fn, {
        "estimator": "ggn", "preconditioner": "identity", "solver": {"name": "varpro", **solver}})


def last_names(model: nn.Module) -> tuple[str, str]:
    name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    return f"{name}.weight", f"{name}.bias"


def full_params(model, W: torch.Tensor, theta=None) -> dict[str, torch.Tensor]:
    """The model's parameters with the last layer set to W̃ = [W | b] (and θ replaced)."""
    wn, bn = last_names(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    if theta is not None:
        others = [n for n in params if n not in (wn, bn)]
        params.update(dict(zip(others, theta)))
    params[wn], params[bn] = W[:, :-1], W[:, -1]
    return params


def objective(model, loss_fn, X, y, alpha, regularize_bias=True, theta=None):
    """W̃ ↦ L(model with W̃) + alpha/2‖W̃‖² (bias included if regularize_bias)."""
    def f(W):
        out = functional_call(model, full_params(model, W, theta), (X,))
        reg = (W ** 2).sum() if regularize_bias else (W[:, :-1] ** 2).sum()
        return loss_fn(out, y) + 0.5 * alpha * reg
    return f


def scipy_minimizer(f, shape, gtol: float) -> torch.Tensor:
    """argmin f by scipy's trust-exact, with f's gradient and Hessian from autograd."""
    n = int(np.prod(shape))

    def as_W(w):
        return torch.tensor(w).reshape(shape)

    res = so.minimize(
        lambda w: f(as_W(w)).item(), np.zeros(n),
        jac=lambda w: torch.autograd.functional.jacobian(f, as_W(w)).reshape(-1).numpy(),
        hess=lambda w: torch.autograd.functional.hessian(f, as_W(w)).reshape(n, n).numpy(),
        method="trust-exact", options={"gtol": gtol})
    return torch.tensor(res.x).reshape(shape)


def theta_of(model):
    wn, bn = last_names(model)
    return [p.detach().clone() for n, p in model.named_parameters() if n not in (wn, bn)]


def features(model, X):
    with torch.no_grad():
        return model[:-1](X)


# ----------------------------------------------------------------------------- binding
def test_bind_requires_a_separable_model():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh()).to(DT)
    with pytest.raises(ConfigError,
                       match=r"optimizer\.solver: varpro needs .*module '1' is Tanh.*layer"):
        build(model, nn.MSELoss())
    with pytest.raises(ConfigError, match=r"optimizer\.solver: layer: .*no module 'head'.*'0'"):
        build(model, nn.MSELoss(), layer="head")
    model = mlp(4, (5,), 3)
    with pytest.raises(ConfigError, match=r"optimizer\.solver: alpha: .*set alpha > 0"):
        build(model, nn.CrossEntropyLoss())
    model[2].weight.requires_grad_(False)
    with pytest.raises(ConfigError, match="frozen"):
        build(model, nn.MSELoss())


def test_named_layer_that_is_not_the_output_fails_at_the_first_step():
    model = mlp(4, (5,), 3)
    opt = build(model, nn.MSELoss(), layer="0")
    with pytest.raises(StepError, match="not separable at layer '0'.*must be that layer"):
        opt.step(data("mlp", "mse"))
    # the last module is a Linear, but the model output is not its output
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 5)
            self.fc = nn.Linear(5, 3)

        def forward(self, x):
            return 2.0 * self.fc(torch.tanh(self.body(x)))

    opt = build(Scaled().to(DT), nn.MSELoss())
    with pytest.raises(StepError, match="not separable at layer 'fc'.*must be that layer"):
        opt.step(data("mlp", "mse"))


def test_user_model_is_not_mutated():
    model = mlp(4, (5,), 3)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    opt = build(model, nn.MSELoss())
    opt.solver.inner_solve(data("mlp", "mse"))
    assert isinstance(model[2], nn.Linear) and not model[2]._forward_hooks
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n])


# ----------------------------------------------------------------------------- inner: least squares
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("inner_solver", ["svd", "cholesky"])
def test_least_squares_inner_matches_scipy(arch, reduction, inner_solver):
    model, loss_fn = make_model(arch), make_loss("mse", reduction)
    X, y = data(arch, "mse")
    Z = torch.cat([features(model, X), torch.ones(len(X), 1, dtype=DT)], 1).numpy()
    # alpha = 0: plain least squares
    W = build(model, loss_fn, inner_solver=inner_solver).solver.inner_solve((X, y))
    ref = scipy.linalg.lstsq(Z, y.numpy())[0].T
    np.testing.assert_allclose(W.numpy(), ref, rtol=1e-9, atol=1e-11)
    # alpha > 0: the minimizer of the regularized objective (scipy, exact Hessian)
    for alpha, reg_bias in [(0.3, True), (0.05, False)]:
        opt = build(model, loss_fn, alpha=alpha, regularize_bias=reg_bias,
                    inner_solver=inner_solver)
        W = opt.solver.inner_solve((X, y))
        f = objective(model, loss_fn, X, y, alpha, reg_bias)
        g = torch.autograd.functional.jacobian(f, W)
        assert g.norm() < 1e-11
        np.testing.assert_allclose(W.numpy(), scipy_minimizer(f, W.shape, 1e-12).numpy(),
                                   rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("inner_solver", ["svd", "cholesky"])
def test_rank_deficient_least_squares_gives_the_minimum_norm_solution(inner_solver):
    model = mlp(4, (9,), 2)
    X, y = data("mlp", "mse", n=6, d=2)  # 10 columns of Z, 6 rows
    opt = build(model, nn.MSELoss(), inner_solver=inner_solver)
    pt = opt.solver.prepare((X, y))
    Z = torch.cat([features(model, X), torch.ones(6, 1, dtype=DT)], 1).numpy()
    ref = scipy.linalg.lstsq(Z, y.numpy())[0].T
    np.testing.assert_allclose(pt.W.numpy(), ref, rtol=1e-8, atol=1e-10)
    assert pt.counts.get("inner_fallback", 0) == (1 if inner_solver == "cholesky" else 0)


def test_least_squares_with_extra_dims_and_frozen_bias():
    """A Linear applied to (N, T, k) features; a frozen bias is an offset, not solved for."""

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 4)
            self.out = nn.Linear(4, 2)
            self.out.bias.requires_grad_(False)

        def forward(self, x):
            return self.out(torch.tanh(self.inner(x)))

    torch.manual_seed(0)
    model = Seq().to(DT)
    X = torch.randn(5, 3, 3, dtype=DT)
    y = torch.randn(5, 3, 2, dtype=DT)
    opt = build(model, nn.MSELoss())
    W = opt.solver.inner_solve((X, y))
    assert W.shape == (2, 4)  # no bias column
    with torch.no_grad():
        Z = torch.tanh(model.inner(X)).reshape(-1, 4)
    ref = scipy.linalg.lstsq(Z.numpy(), (y.reshape(-1, 2) - model.out.bias.detach()).numpy())[0]
    np.testing.assert_allclose(W.numpy(), ref.T, rtol=1e-9, atol=1e-11)
    for _ in range(3):
        opt.step((X, y))
    assert opt.last_info["outer_accepted"]
    assert torch.equal(model.out.bias.detach(), opt.solver._offset)


# ----------------------------------------------------------------------------- inner: cross-entropy
@pytest.mark.parametrize("arch,reduction,reg_bias", [("mlp", "mean", True), ("cnn", "sum", False),
                                                     ("mlp", "sum", False)])
def test_cross_entropy_inner_matches_scipy(arch, reduction, reg_bias):
    model, loss_fn = make_model(arch), make_loss("ce", reduction)
    X, y = data(arch, "ce")
    alpha = 0.05
    opt = build(model, loss_fn, alpha=alpha, regularize_bias=reg_bias)
    W = opt.solver.inner_solve((X, y))
    f = objective(model, loss_fn, X, y, alpha, reg_bias)
    assert torch.autograd.functional.jacobian(f, W).norm() < 1e-9
    # without bias regularization the logits' shift invariance leaves a flat direction
    # (all biases + t): compare the logits and the regularized weights instead
    Wr = scipy_minimizer(f, W.shape, 1e-11)
    Z = torch.cat([features(model, X), torch.ones(len(X), 1, dtype=DT)], 1)
    np.testing.assert_allclose((Z @ W.T).log_softmax(1).numpy(),
                               (Z @ Wr.T).log_softmax(1).numpy(), atol=1e-7)
    np.testing.assert_allclose(W[:, :-1].numpy(), Wr[:, :-1].numpy(), atol=1e-7)
    if reg_bias:
        np.testing.assert_allclose(W.numpy(), Wr.numpy(), atol=1e-7)


# ----------------------------------------------------------------------------- reduced problem
@pytest.mark.parametrize("loss,arch", [("mse", "mlp"), ("ce", "cnn")])
def test_reduced_gradient_is_the_full_gradient_at_the_inner_solution(loss, arch):
    model, loss_fn = make_model(arch), make_loss(loss)
    X, y = data(arch, loss)
    alpha = 0.05
    solver = build(model, loss_fn, alpha=alpha).solver
    theta = theta_of(model)
    g = solver.reduced_gradient((X, y))
    # full gradient of L(θ, W) at W = W(θ), through the real model
    W = solver.inner_solve((X, y))
    wn, bn = last_names(model)
    names = [n for n, _ in model.named_parameters() if n not in (wn, bn)]

    def full(*th):
        p = full_params(model, W, th)
        return loss_fn(functional_call(model, p, (X,)), y)

    g_full = torch.autograd.grad(full(*[t.requires_grad_() for t in theta]), theta)
    assert len(g) == len(names)
    for a, b in zip(g, g_full):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # and the derivative of the reduced objective F(θ) = L(θ, W(θ)) + reg
    theta = [t.detach() for t in theta]
    v = [torch.randn_like(t) for t in theta]
    eps = 1e-5
    Fp = solver.reduced_loss((X, y), [t + eps * u for t, u in zip(theta, v)])
    Fm = solver.reduced_loss((X, y), [t - eps * u for t, u in zip(theta, v)])
    dd = sum((a * u).sum() for a, u in zip(g, v)).item()
    assert (Fp - Fm) / (2 * eps) == pytest.approx(dd, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("loss,arch,reduction", [("mse", "mlp", "mean"), ("mse", "cnn", "sum"),
                                                  ("ce", "mlp", "sum"), ("ce", "cnn", "mean")])
def test_implicit_jacobian_matches_finite_differences(loss, arch, reduction):
    model, loss_fn = make_model(arch), make_loss(loss, reduction)
    X, y = data(arch, loss)
    solver = build(model, loss_fn, alpha=0.1).solver
    theta = theta_of(model)
    torch.manual_seed(1)
    v = [torch.randn_like(t) for t in theta]
    jv = solver.jacobian_vp((X, y), v)
    # central differences: the error falls as eps² (checked: 1e-3 → 1e-4 gains 100×)
    errors = []
    for eps in (1e-4, 1e-6):
        Wp = solver.inner_solve((X, y), [t + eps * u for t, u in zip(theta, v)])
        Wm = solver.inner_solve((X, y), [t - eps * u for t, u in zip(theta, v)])
        errors.append(float(((Wp - Wm) / (2 * eps) - jv).norm() / jv.norm()))
    assert errors[1] < 1e-7 and errors[0] < 1e-4


def closed_form_W(model, X, y, alpha, theta):
    """W̃(θ) for mean MSE, differentiable (an independent formula through torch autograd)."""
    wn, bn = last_names(model)
    names = [n for n, _ in model.named_parameters() if n not in (wn, bn)]
    sub = model[:-1]
    phi = functional_call(sub, {n: t for n, t in zip(names, theta)}, (X,))
    Z = torch.cat([phi, torch.ones(len(X), 1, dtype=DT)], 1)
    N, d = y.shape
    A = Z.T @ Z + alpha * N * d / 2 * torch.eye(Z.shape[1], dtype=DT)
    return torch.linalg.solve(A, Z.T @ y).T


def test_reduced_gauss_newton_matches_dense_reference_mse():
    model, loss_fn = make_model("mlp"), nn.MSELoss()
    X, y = data("mlp", "mse")
    alpha = 0.2
    solver = build(model, loss_fn, alpha=alpha).solver
    theta = theta_of(model)
    shapes = [t.shape for t in theta]
    sizes = [t.numel() for t in theta]

    def split(flat):
        return [c.reshape(s) for c, s in zip(flat.split(sizes), shapes)]

    flat = torch.cat([t.reshape(-1) for t in theta])

    def out_red(fl):
        th = split(fl)
        W = closed_form_W(model, X, y, alpha, th)
        return functional_call(model, full_params(model, W, th), (X,))

    def W_of(fl):
        return closed_form_W(model, X, y, alpha, split(fl))

    J = torch.autograd.functional.jacobian(out_red, flat).reshape(-1, flat.numel())
    JW = torch.autograd.functional.jacobian(W_of, flat).reshape(-1, flat.numel())
    H_out = 2.0 / y.numel()  # mean MSE: ∂²L/∂o² = 2/(N·d) I
    G = H_out * J.T @ J + alpha * JW.T @ JW
    torch.manual_seed(2)
    for _ in range(2):
        v = torch.randn(flat.numel(), dtype=DT)
        Gv = torch.cat([t.reshape(-1) for t in solver.gn_matvec((X, y), split(v))])
        torch.testing.assert_close(Gv, G @ v, rtol=1e-9, atol=1e-12)
        jv = solver.jacobian_vp((X, y), split(v))
        torch.testing.assert_close(jv.reshape(-1), JW @ v, rtol=1e-9, atol=1e-12)


def test_reduced_gauss_newton_matches_reference_cross_entropy():
    """Ĝ = J_redᵀ H_ℓ J_red + alpha (dW/dθ)ᵀ(dW/dθ) with dW/dθ from finite differences."""
    model, loss_fn = make_model("mlp", d=3), nn.CrossEntropyLoss()
    X, y = data("mlp", "ce")
    alpha = 0.1
    solver = build(model, loss_fn, alpha=alpha).solver
    theta = theta_of(model)
    W = solver.inner_solve((X, y))
    shapes = [t.shape for t in theta]
    sizes = [t.numel() for t in theta]
    P = sum(sizes)

    def split(flat):
        return [c.reshape(s) for c, s in zip(flat.split(sizes), shapes)]

    flat = torch.cat([t.reshape(-1) for t in theta])
    eps = 1e-5
    cols = []
    for i in range(P):
        e = torch.zeros(P, dtype=DT)
        e[i] = eps
        cols.append(((solver.inner_solve((X, y), split(flat + e))
                      - solver.inner_solve((X, y), split(flat - e))) / (2 * eps)).reshape(-1))
    JW = torch.stack(cols, 1)

    def out(fl, Wf):
        return functional_call(model, full_params(model, Wf.reshape(W.shape), split(fl)), (X,))

    Jt, Jw = torch.autograd.functional.jacobian(out, (flat, W.reshape(-1)))
    Jt, Jw = Jt.reshape(-1, P), Jw.reshape(-1, W.numel())
    J = Jt + Jw @ JW
    o = out(flat, W.reshape(-1))
    H = torch.autograd.functional.hessian(lambda z: loss_fn(z.reshape(o.shape), y),
                                          o.reshape(-1))
    G = J.T @ H @ J + alpha * JW.T @ JW
    torch.manual_seed(3)
    v = torch.randn(P, dtype=DT)
    Gv = torch.cat([t.reshape(-1) for t in solver.gn_matvec((X, y), split(v))])
    torch.testing.assert_close(Gv, G @ v, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- steps
def regression_problem():
    g = torch.Generator().manual_seed(1)
    X = torch.rand(48, 2, generator=g, dtype=DT) * 4 - 2
    Y = torch.stack([torch.sin(2 * X[:, 0]) * X[:, 1], torch.cos(X[:, 0] + X[:, 1]),
                     X[:, 0] * X[:, 1]], 1)
    return X, Y


def regression_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3)).to(DT)


def test_gnvpro_beats_joint_gauss_newton_on_separable_least_squares():
    X, Y = regression_problem()
    loss_fn = nn.MSELoss()
    steps = 10
    results = {}
    for name, solver in [("joint", {"name": "trust_region", "max_iters": 20}),
                         ("gnvpro", {"name": "varpro", "max_iters": 20})]:
        model = regression_model()
        opt = curvkit.build_optimizer(model, loss_fn, {
            "estimator": "ggn", "preconditioner": "identity", "solver": solver})
        losses = [float(opt.step((X, Y))) for _ in range(steps)]
        with torch.no_grad():
            final = float(loss_fn(model(X), Y))
        results[name] = (losses, final)
    joint, gnvpro = results["joint"][1], results["gnvpro"][1]
    assert gnvpro < 0.5 * joint, results
    # GNvpro's losses never increase (rejected steps keep the point; accepted ones decrease)
    losses = results["gnvpro"][0] + [gnvpro]
    assert all(b <= a + 1e-12 for a, b in zip(losses[1:], losses[2:]))


def test_accepted_step_lands_on_the_inner_solution_and_rejected_step_changes_nothing():
    X, Y = regression_problem()
    model = regression_model()
    opt = build(model, nn.MSELoss(), alpha=1e-3)
    opt.step((X, Y))
    assert opt.last_info["outer_accepted"]
    after = opt.last_info["loss_after"]
    W = opt.solver.inner_solve((X, Y))
    torch.testing.assert_close(torch.cat([model[4].weight, model[4].bias[:, None]], 1).detach(),
                               W, rtol=1e-12, atol=1e-13)
    # the next step starts from F(θ⁺) and reuses the optimizer's gradient
    loss = float(opt.step((X, Y)))
    assert loss == pytest.approx(after - 0.5e-3 * float((W ** 2).sum()), rel=1e-12)
    assert opt.last_info["reused_gradient"]
    # a step far too long (lr = 1e3) is rejected: parameters bitwise unchanged
    before = [p.detach().clone() for p in model.parameters()]
    radius = opt.solver.state["radius"]
    opt.param_groups[0]["lr"] = 1e3
    opt.step((X, Y))
    assert not opt.last_info["accepted"] and opt.last_info["rho"] < 0.15
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.solver.state["radius"] == 0.25 * radius


def test_gradient_outer_step():
    X, Y = regression_problem()
    model = regression_model()
    lr = 0.3
    opt = build(model, nn.MSELoss(), outer="gradient")
    opt.param_groups[0]["lr"] = lr
    theta = theta_of(model)
    g = opt.solver.reduced_gradient((X, Y))
    opt.step((X, Y))
    assert opt.last_info["accepted"]
    for t, gi, p in zip(theta, g, theta_of(model)):
        torch.testing.assert_close(p, t - lr * gi, rtol=1e-12, atol=1e-14)
    W = opt.solver.inner_solve((X, Y))
    torch.testing.assert_close(model[4].weight.detach(), W[:, :-1], rtol=1e-12, atol=1e-13)
    losses = [float(opt.step((X, Y))) for _ in range(5)]
    assert opt.last_info["reused_gradient"]
    assert losses[-1] < losses[0]


def test_linear_model_is_solved_in_one_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(DT)
    X, y = data("mlp", "mse", n=20, d=2)
    opt = build(model, nn.MSELoss())
    opt.step((X, y))
    Z = torch.cat([X, torch.ones(20, 1, dtype=DT)], 1).numpy()
    ref = scipy.linalg.lstsq(Z, y.numpy())[0].T
    np.testing.assert_allclose(torch.cat([model.weight, model.bias[:, None]], 1).detach().numpy(),
                               ref, rtol=1e-10, atol=1e-12)
    assert opt.last_info["stop"] == "no_theta"


def test_cross_entropy_training_and_work_counts():
    model, loss_fn = make_model("mlp"), nn.CrossEntropyLoss()
    X, y = data("mlp", "ce", n=24)
    opt = build(model, loss_fn, alpha=1e-2)
    losses = []
    for _ in range(4):
        losses.append(float(opt.step((X, y))))
        info = opt.last_info
        assert info["work"] == 2 + info["forward_passes"] + info["jvps"] + info["vjps"]
        assert info["jvps"] == info["matvecs"] and info["inner_iters"] >= 0
    assert losses[-1] < losses[0]
    sd = opt.state_dict()
    opt2 = build(make_model("mlp"), loss_fn, alpha=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.solver.state["radius"] == opt.solver.state["radius"]


# ------------------------------------------------------------------ real models (issue 12)
class TiedLM(nn.Module):
    """An embedding tied to the output layer (out.weight is emb.weight)."""

    def __init__(self, vocab: int = 6, dim: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(x))).mean(1))


class BranchyTiedLM(TiedLM):
    """TiedLM with control flow on values: torch.fx cannot read the forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.emb(x))).mean(1)
        return self.out(h if float(h.detach().sum()) > -1e9 else -h)


def test_tied_embedding_and_head_is_refused_at_build_with_the_way_out():
    """Where the forward's code shows the final layer (torch.fx), the tie is refused at
    build; where only a forward pass shows it, at the first step, before anything moves."""
    torch.manual_seed(0)
    match = (r"optimizer\.solver: the final layer 'out' shares its parameters with module "
             r"'emb' \(tied weights.*Untie them.*trust_region")
    for layer in ("", "out"):
        with pytest.raises(ConfigError, match=match):
            build(TiedLM().to(DT), nn.CrossEntropyLoss(), alpha=1e-2, layer=layer)
    model = BranchyTiedLM().to(DT)
    X, y = torch.randint(0, 6, (8, 3)), torch.randint(0, 6, (8,))
    before = [p.detach().clone() for p in model.parameters()]
    opt = build(model, nn.CrossEntropyLoss(), alpha=1e-2)
    with pytest.raises(StepError, match=match):
        opt.step((X, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class UnusedLast(nn.Module):
    """The output layer is 'head'; an unused nn.Linear is registered after it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)
        self.unused = nn.Linear(3, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def test_the_final_layer_is_the_one_whose_output_the_model_returns():
    torch.manual_seed(0)
    model = UnusedLast().to(DT)
    X, y = data("mlp", "mse")
    opt = build(model, nn.MSELoss())
    losses = [float(opt.step((X, y))) for _ in range(4)]
    assert opt.solver._split.layer_name == "head"
    assert losses[-1] < losses[0]
    with torch.no_grad():  # the head holds the inner solution, not the unused layer
        Z = torch.cat([torch.tanh(model.body(X)), torch.ones(len(X), 1, dtype=DT)], 1)
    ref = torch.linalg.lstsq(Z, y).solution.T
    torch.testing.assert_close(torch.cat([model.head.weight, model.head.bias[:, None]], 1)
                               .detach(), ref, rtol=1e-8, atol=1e-10)


def test_a_linear_used_twice_is_not_taken_for_separable():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 3)
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(self.body(x))))

    opt = build(Twice().to(DT), nn.MSELoss())
    with pytest.raises(StepError, match=r"final layer 'fc' runs 2 times"):
        opt.step(data("mlp", "mse"))


def test_dict_output_gets_its_own_message_not_a_separability_hint():
    class DictOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 5)
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return {"y": self.head(torch.tanh(self.body(x)))}

    class DictMSE(nn.MSELoss):
        def forward(self, out, y):
            return super().forward(out["y"], y)

    opt = build(DictOut().to(DT), DictMSE())
    with pytest.raises(StepError,
                       match=r"returns a dict with keys 'y', not a tensor.*SelectOutput") as err:
        opt.step(data("mlp", "mse"))
    assert "separable" not in str(err.value)


def test_batchnorm_and_dropout_train_with_one_mask_and_one_statistics_update_per_step():
    """Train-mode BatchNorm and Dropout: no false 'not separable', running statistics
    advance once per optimizer step (varpro's own passes leave them alone), and varpro's
    passes draw no random numbers of the caller's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2),
                          nn.Linear(8, 3)).to(DT)
    X, y = data("mlp", "mse", n=16)
    opt = build(model, nn.MSELoss(), alpha=1e-3)
    twin = copy.deepcopy(model)
    losses = []
    for _ in range(3):
        rng = torch.get_rng_state()
        losses.append(float(opt.step((X, y))))
        after = torch.get_rng_state()
        torch.set_rng_state(rng)
        twin(X)  # what the optimizer's own forward pass draws and updates
        assert torch.equal(after, torch.get_rng_state()), "varpro drew random numbers"
    assert int(model[1].num_batches_tracked) == 3
    assert all(np.isfinite(losses)) and opt.last_info["reused_gradient"] is False


# ----------------------------------------------------------------------------- zoo models
class PackedGRU(nn.Module):
    """A GRU on packed variable-length sequences (torch.func cannot transform its kernels;
    varpro's feature passes are plain autograd)."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 3, batch_first=True)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        lengths = (x.abs().sum(-1) > 0).sum(-1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)
        return self.head(torch.tanh(self.rnn(packed)[1][0]))


def _zoo(name):
    if name == "packed_gru":
        torch.manual_seed(0)
        X = torch.randn(6, 4, 3, dtype=DT)
        for i, n in enumerate((4, 2, 3, 1, 4, 2)):
            X[i, n:] = 0.0
        return PackedGRU().to(DT), (X, torch.randint(0, 3, (6,))), nn.CrossEntropyLoss()
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from zoo import BY_NAME
    return BY_NAME[name].build()


@pytest.mark.parametrize("case", [
    "transformer_lm",  # sequence head: (N, L, V) logits returned as (N, V, L); attention
    pytest.param("sdpa", marks=pytest.mark.slow),  # forward mode through the flash kernel
    pytest.param("batchnorm_train", marks=pytest.mark.slow),  # batch statistics
    pytest.param("dropout", marks=pytest.mark.slow),  # one mask per evaluation
    pytest.param("resnet_block", marks=pytest.mark.slow),
    pytest.param("prenorm_rmsnorm_lm", marks=pytest.mark.slow),  # causal SDPA, RMSNorm
    pytest.param("packed_gru", marks=pytest.mark.slow),  # PackedSequence: no torch.func
])
def test_reduced_gradient_and_implicit_jacobian_on_zoo_models(case):
    """On the zoo's models (float64), independently of varpro's head code: ∇_θF is the
    real model's gradient in θ at the inner solution W̃(θ) and the derivative of F by
    central differences; (dW̃/dθ)v (forward mode through the features) matches central
    differences of the inner solve. Buffers and the caller's random state are untouched."""
    model, batch, loss_fn = _zoo(case)
    alpha = 0.05
    solver = build(model, loss_fn, alpha=alpha).solver
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    buffers = [b.clone() for b in model.buffers()]
    torch.manual_seed(5)
    state = torch.get_rng_state()
    W = solver.inner_solve(batch)
    g = solver.reduced_gradient(batch, W0=W)  # (W: one cold inner solve, the head is random)
    sp = solver._split
    head = sp.layer_name
    theta = [p.detach() for n, p in named if not n.startswith(f"{head}.")]
    names = [n for n, p in named if not n.startswith(f"{head}.")]
    assert names == sp.theta_names and torch.equal(torch.get_rng_state(), state)

    def full(*th):
        params = {n: p.detach() for n, p in model.named_parameters()}
        params.update(zip(names, th))
        params[f"{head}.weight"], params[f"{head}.bias"] = W[:, :-1], W[:, -1]
        bufs = {n: b.clone() for n, b in model.named_buffers()}
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(state)  # the mask the evaluation saw
            return loss_fn(functional_call(model, {**params, **bufs}, (batch[0],)), batch[1])

    g_full = torch.autograd.grad(full(*[t.clone().requires_grad_() for t in theta]),
                                 [], allow_unused=True) if not theta else \
        torch.autograd.grad(full(*(ts := [t.clone().requires_grad_() for t in theta])), ts)
    for a, b in zip(g, g_full):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)
    gen = torch.Generator().manual_seed(6)
    v = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in theta]
    eps = 1e-5
    Fp = solver.reduced_loss(batch, [t + eps * u for t, u in zip(theta, v)], W)
    Fm = solver.reduced_loss(batch, [t - eps * u for t, u in zip(theta, v)], W)
    dd = sum((a * u).sum() for a, u in zip(g, v)).item()
    assert (Fp - Fm) / (2 * eps) == pytest.approx(dd, rel=1e-6, abs=1e-9)
    jv = solver.jacobian_vp(batch, v, W0=W)
    eps = 1e-6
    Wp = solver.inner_solve(batch, [t + eps * u for t, u in zip(theta, v)], W)
    Wm = solver.inner_solve(batch, [t - eps * u for t, u in zip(theta, v)], W)
    assert float(((Wp - Wm) / (2 * eps) - jv).norm() / jv.norm()) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    assert torch.equal(torch.get_rng_state(), state)


def test_sequence_head_returned_transposed_with_mse_solves_in_the_heads_layout():
    """A per-position head whose (N, L, d) output the model returns as (N, d, L): the
    inner least-squares solution is lstsq of the per-position features against the targets
    read back in the head's layout (an independent formula), and GNvpro trains."""

    class SeqRegressor(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):  # x (N, L, 3) → (N, 2, L)
            return self.head(torch.tanh(self.body(x))).transpose(1, 2)

    torch.manual_seed(0)
    model = SeqRegressor().to(DT)
    X = torch.randn(5, 7, 3, dtype=DT)
    Y = torch.randn(5, 2, 7, dtype=DT)
    opt = build(model, nn.MSELoss())
    W = opt.solver.inner_solve((X, Y))
    assert opt.solver._split.layer_name == "head"
    with torch.no_grad():
        phi = torch.tanh(model.body(X)).reshape(-1, 4)
    Z = torch.cat([phi, torch.ones(len(phi), 1, dtype=DT)], 1)
    ref = torch.linalg.lstsq(Z, Y.transpose(1, 2).reshape(-1, 2)).solution.T
    torch.testing.assert_close(W, ref, rtol=1e-9, atol=1e-11)
    losses = [float(opt.step((X, Y))) for _ in range(4)]
    assert losses[-1] < losses[0] and all(np.isfinite(losses))
