"""``cubic``: the anisotropic Nesterov cubic step (Wolinski, Method 1, eq. 10)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import curvkit
from curvkit.errors import IncompatibleError, StepError
from curvkit.solvers.cubic import cubic_eta, cubic_model, third_order_scale
from curvkit.testing.problems import Problem, flat_loss, flat_params, mlp, problem

F64 = torch.float64


def t64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=F64)


def brute_force_min(H, g, d, lam, rng, starts=12) -> float:
    """Smallest T found by BFGS from random starts of several scales (independent of the
    root find)."""
    Hn, gn, dn = H.numpy(), g.numpy(), d.numpy()

    def T(x):
        return -x @ gn + 0.5 * x @ Hn @ x + lam / 6 * np.linalg.norm(dn * x) ** 3

    def dT(x):
        r = np.linalg.norm(dn * x)
        return -gn + Hn @ x + lam / 2 * r * dn * dn * x

    best = math.inf
    for k in range(starts):
        x0 = rng.normal(size=len(gn)) * 10.0 ** (k % 4 - 1)
        best = min(best, scipy.optimize.minimize(T, x0, jac=dT, method="BFGS",
                                                 options={"gtol": 1e-12}).fun)
    return best


@st.composite
def instances(draw):
    S = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 1))
    definite = draw(st.booleans())
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(S, S))
    H = A @ A.T / S + 0.05 * np.eye(S) if definite else (A + A.T) / 2
    g = rng.normal(size=S) * 10.0 ** rng.uniform(-2, 1)
    D3 = rng.normal(size=S) * 10.0 ** rng.uniform(-2, 2, size=S)
    lam = 10.0 ** draw(st.floats(-2, 1))
    return t64(H), t64(g), t64(D3), lam, seed, definite


@settings(max_examples=40, deadline=None)
@given(instances())
def test_eta_is_stationary_and_the_global_minimizer(inst):
    H, g, D3, lam, seed, _ = inst
    sol = cubic_eta(H, g, D3, lam)
    assert not sol.failed, sol.status
    eta, d = sol.eta, sol.d
    torch.testing.assert_close(d, third_order_scale(D3, H, g, 0.1), rtol=0, atol=0)
    r = torch.linalg.norm(d * eta)
    assert float(r) == pytest.approx(sol.r, rel=1e-9, abs=1e-12)
    # stationarity of T: −ḡ + H̄η + (λ/2)‖Dη‖D²η = 0, i.e. eq. (10)
    residual = -g + H @ eta + lam / 2 * r * d * d * eta
    scale = g.norm() + (H @ eta).norm() + lam / 2 * r * (d * d * eta).norm()
    assert float(residual.norm()) <= 1e-10 * float(scale)
    # second-order certificate of the global minimizer: H̄ + (λ/2) r D² ⪰ 0
    M = H + lam / 2 * r * torch.diag(d * d)
    assert float(torch.linalg.eigvalsh(M)[0]) >= -1e-9 * float(M.abs().max())
    if float(torch.linalg.eigvalsh(H)[0]) < 0:  # search starts where H̄ + (λ/2) r D² ⪰ 0
        assert sol.r >= sol.r0 > 0.0
    else:
        assert sol.r0 == 0.0
    T = float(cubic_model(eta, H, g, d, lam))
    best = brute_force_min(H, g, d, lam, np.random.default_rng(seed))
    assert T <= best + 1e-9 * max(1.0, abs(best))


def test_hard_case_is_solved_not_skipped():
    # A = D⁻¹H̄D⁻¹ = diag(−1, 2), ḡ ⊥ the negative eigenvector: no root with r > r₀ = 2
    H, g, D3 = t64([[-1.0, 0.0], [0.0, 2.0]]), t64([0.0, 1.0]), t64([1.0, 1.0])
    sol = cubic_eta(H, g, D3, 1.0)
    assert sol.status == "hard_case"
    assert sol.r == pytest.approx(2.0)
    torch.testing.assert_close(sol.eta, t64([math.sqrt(4 - 1 / 9), 1 / 3]))
    d = torch.ones(2, dtype=F64)
    best = brute_force_min(H, g, d, 1.0, np.random.default_rng(0))
    assert float(cubic_model(sol.eta, H, g, d, 1.0)) <= best + 1e-10
    # nearly hard: a tiny component along the negative eigenvector; the root find (steep ψ
    # near r₀) converges to solutions that tend to the hard-case one
    for eps in (1e-3, 1e-8, 1e-12):
        near = cubic_eta(H, t64([eps, 1.0]), D3, 1.0)
        assert near.status == "root" and near.r > 2.0
        torch.testing.assert_close(near.eta, sol.eta, rtol=0, atol=10 * eps)
    # the hard case in a rotated basis with a repeated negative eigenvalue
    Q = torch.linalg.qr(torch.randn(4, 4, dtype=F64, generator=torch.Generator().manual_seed(0)))[0]
    H4 = Q @ torch.diag(t64([-2.0, -2.0, 1.0, 3.0])) @ Q.T
    g4 = Q @ t64([0.0, 0.0, 1.0, 1.0])
    sol4 = cubic_eta(H4, g4, torch.ones(4, dtype=F64), 1.0)
    assert sol4.status == "hard_case" and sol4.r == pytest.approx(4.0)
    best = brute_force_min(H4, g4, torch.ones(4, dtype=F64), 1.0, np.random.default_rng(1))
    assert float(cubic_model(sol4.eta, H4, g4, torch.ones(4, dtype=F64), 1.0)) <= best + 1e-9


def test_zero_gradient_gives_zero_step():
    sol = cubic_eta(t64([[1.0, 2.0], [2.0, -3.0]]), t64([0.0, 0.0]), t64([1.0, 2.0]), 1.0)
    assert sol.status == "zero" and torch.equal(sol.eta, torch.zeros(2, dtype=F64))


def test_failures_return_none_never_nan():
    H, g, D3 = t64([[1.0, 2.0], [2.0, -3.0]]), t64([1.0, -1.0]), t64([0.5, 2.0])
    for sol in [cubic_eta(H, g, D3, 1.0, max_iters=1),
                cubic_eta(H * math.nan, g, D3, 1.0),
                cubic_eta(H, g, torch.zeros(2, dtype=F64), 1.0)]:  # no cubic term, indefinite
        assert sol.failed and sol.eta is None and sol.status.startswith("failed")
    assert "did not converge in 1 iterations" in cubic_eta(H, g, D3, 1.0, max_iters=1).status
    # a zero D3 with a definite H̄ is the quadratic model's minimizer
    sol = cubic_eta(t64([[2.0, 0.0], [0.0, 4.0]]), g, torch.zeros(2, dtype=F64), 1.0)
    assert sol.status == "no_third_order"
    torch.testing.assert_close(sol.eta, t64([0.5, -0.25]))


def test_lambda_zero_indefinite_is_a_step_error_naming_the_option():
    H, g = t64([[1.0, 0.0], [0.0, -1.0]]), t64([1.0, 1.0])
    with pytest.raises(StepError, match=r"^optimizer\.solver\.lambda_int: lambda_int = 0 "
                                        r"needs a positive definite H̄"):
        cubic_eta(H, g, None, 0.0, where="optimizer.solver")


# ----------------------------------------------------------------------------- optimizer level


def config(lam: float, **pre) -> dict:
    return {"lr": 1.0, "estimator": "hessian",
            "preconditioner": {"name": "partition", **pre},
            "solver": {"name": "cubic", "lambda_int": lam}}


def dense_grad_hessian(prob: Problem, batch):
    f = flat_loss(prob.model, prob.loss_fn, *batch)
    theta = flat_params(prob.model)
    return torch.func.grad(f)(theta), torch.autograd.functional.hessian(f, theta)


def test_lambda_zero_recovers_cauchy_and_newton():
    prob = problem("cnn", "ce", n=8)
    batch = prob.batches[0]
    g, H = dense_grad_hessian(prob, batch)
    theta0 = flat_params(prob.model)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, config(0.0, partition="trivial"))
    opt.step(batch)
    assert g @ H @ g > 0  # S = 1: H̄ = gᵀHg must be positive for λ_int = 0
    torch.testing.assert_close(flat_params(prob.model), theta0 - (g @ g) / (g @ H @ g) * g,
                               rtol=1e-10, atol=1e-12)

    torch.manual_seed(1)
    lin = nn.Linear(3, 2).to(F64)  # least squares: strictly convex
    X, y = torch.randn(10, 3, dtype=F64), torch.randn(10, 2, dtype=F64)
    prob = Problem(lin, nn.MSELoss(reduction="sum"), [(X, y)])
    g, H = dense_grad_hessian(prob, (X, y))
    theta0 = flat_params(lin)
    opt = curvkit.build_optimizer(lin, prob.loss_fn, config(0.0, partition="discrete"))
    opt.step((X, y))
    torch.testing.assert_close(flat_params(lin), theta0 - torch.linalg.solve(H, g),
                               rtol=1e-10, atol=1e-12)
    assert opt.last_info["cubic_status"] == "newton"


def test_lambda_zero_with_indefinite_summary_fails_at_the_step():
    prob = problem("mlp", "mse", n=8)
    batch = prob.batches[0]
    _, H = dense_grad_hessian(prob, batch)
    assert torch.linalg.eigvalsh(H)[0] < 0  # discrete H̄ = GHG has H's inertia
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, config(0.0, partition="discrete"))
    before = flat_params(prob.model)
    with pytest.raises(StepError, match=r"^optimizer\.solver\.lambda_int: lambda_int = 0"):
        opt.step(batch)
    assert torch.equal(flat_params(prob.model), before)


def test_ggn_has_no_third_order_so_cubic_is_refused_before_training():
    prob = problem("mlp", "ce")
    cfg = config(1.0)
    with pytest.raises(IncompatibleError, match=r"^optimizer\.solver: solver 'cubic' needs "
                                                r"capability 'summary_d3', which estimator "
                                                r"'ggn'.*provided by estimators hessian"):
        curvkit.build_optimizer(prob.model, prob.loss_fn, {**cfg, "estimator": "ggn"})
    # without the cubic term ggn is fine (the GGN summary is positive semi-definite)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {**config(0.0), "estimator": "ggn",
                                                             "lr": 0.5})
    opt.step(prob.batches[0])
    assert opt.counters == {"steps": 1, "nonfinite": 0, "rejected": 0}
    with pytest.raises(IncompatibleError, match=r"needs capability 'group_summary'.*provided "
                                                r"by preconditioners partition"):
        curvkit.build_optimizer(prob.model, prob.loss_fn, {**cfg, "preconditioner": "identity"})


def test_failed_root_find_skips_the_step_and_is_counted():
    prob = problem("mlp", "ce", n=8)
    batch = prob.batches[0]
    cfg = config(1.0)
    cfg["solver"]["max_iters"] = 1
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, cfg)
    before = flat_params(prob.model)
    for _ in range(2):
        opt.step(batch)
        assert opt.last_info["cubic_failed"] == 1 and opt.last_info["accepted"] is False
    assert torch.equal(flat_params(prob.model), before)
    assert opt.solver.state["failures"] == 2 and opt.counters["rejected"] == 2
    json.dumps(opt.last_info)  # failures report None, not NaN
    opt.solver.options.max_iters = 100
    opt.step(batch)
    assert opt.last_info["cubic_failed"] == 0 and opt.last_info["cubic_failures"] == 2
    assert torch.isfinite(flat_params(prob.model)).all()
    assert not torch.equal(flat_params(prob.model), before)


def test_reports_and_eta_ema_average_the_cubic_eta():
    prob = problem("mlp", "ce", n=8, num_batches=2)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn,
                                  {**config(1.0, eta_ema=0.5), "lr": 0.5})
    raws = []
    for t in range(3):
        lam = opt.solver.state["lambda"]
        opt.step(prob.batches[t % 2])
        info = opt.last_info
        json.dumps(info)
        assert info["cubic_status"] in ("root", "hard_case") and info["cubic_iters"] >= 1
        assert info["cubic_r"] >= info["cubic_r0"] >= 0.0
        assert info["cubic_rejections"] == 0
        summary = opt.preconditioner.group_summary()
        raws.append(cubic_eta(summary.H, summary.g, summary.D3, lam).eta)
        assert info["cubic_eta"] == opt.solver.state["eta"].tolist()
    want = 0.25 * raws[0] + 0.25 * raws[1] + 0.5 * raws[2]
    torch.testing.assert_close(opt.solver.state["eta"], want, rtol=1e-13, atol=0)
    assert opt.solver.state["solves"] == 3


# ----------------------------------------------------------------------------- invariance


class Rescaled(nn.Module):
    """The MLP ``base`` with parameters θ̃_s = α_s θ_s: forward uses θ̃_s / α_s."""

    def __init__(self, base: nn.Sequential, alphas: list[float]) -> None:
        super().__init__()
        self.alphas = alphas
        self.theta = nn.ParameterList([nn.Parameter(p.detach() * a)
                                       for p, a in zip(base.parameters(), alphas)])

    def forward(self, x):
        w1, b1, w2, b2 = (p / a for p, a in zip(self.theta, self.alphas))
        return F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)


def run(model, prob, cfg, steps=5):
    opt = curvkit.build_optimizer(model, prob.loss_fn, cfg)
    out = []
    for t in range(steps):
        opt.step(prob.batches[t % len(prob.batches)])
        assert opt.last_info["accepted"], opt.last_info
        out.append([p.detach().clone() for p in model.parameters()])
    return out


def test_trajectory_is_invariant_under_per_group_rescaling():
    """Seed §5.2: with θ̃_s = α_s θ_s the step is the same if ũ_s = c_s α_s u_s for scalars
    c_s (then ḡ_s ↦ c_s ḡ_s, H̄_st ↦ c_s c_t H̄_st, D_s ↦ |c_s| D_s, η_s ↦ η_s / c_s). The
    gradient satisfies it (c_s = 1/α_s²). So does the EMA of η. A Hutchinson diagonal
    direction would not: its cross terms z_i H_ij z_j scale with α_i α_j."""
    prob = problem("mlp", "ce", n=10, num_batches=2, seed=3)
    base = prob.model
    alphas = [3.0, 0.25, 0.5, 7.0]
    scaled = Rescaled(mlp(seed=99), alphas).to(F64)
    with torch.no_grad():
        for q, p, a in zip(scaled.theta, base.parameters(), alphas):
            q.copy_(p * a)
    cfg = {**config(1.0, eta_ema=0.3), "lr": 0.8}
    ref = run(base, prob, cfg)
    got = run(scaled, prob, cfg)
    for step, (a_params, b_params) in enumerate(zip(ref, got)):
        for p, q, a in zip(a_params, b_params, alphas):
            torch.testing.assert_close(q / a, p, rtol=1e-9, atol=1e-12,
                                       msg=lambda m, s=step: f"step {s}: {m}")
    moved = max(float((p - q).abs().max()) for p, q in zip(ref[-1], ref[0]))
    assert moved > 1e-2


def test_damping_breaks_the_invariance():
    """The same comparison with H̄ + λI fails: the invariance test can fail."""
    prob = problem("mlp", "ce", n=10, num_batches=2, seed=3)
    alphas = [3.0, 0.25, 0.5, 7.0]
    scaled = Rescaled(prob.model, alphas).to(F64)
    cfg = {**config(1.0, damping=0.1), "lr": 0.8}
    ref = run(prob.model, prob, cfg, steps=2)
    got = run(scaled, prob, cfg, steps=2)
    assert not torch.allclose(got[-1][0] / alphas[0], ref[-1][0], rtol=1e-6)


ALPHAS = [3.0, 0.2, 7.0, 0.5]


def rescaled_pair(seed: int = 3):
    prob = problem("mlp", "ce", n=10, num_batches=2, seed=seed)
    scaled = Rescaled(mlp(seed=99), ALPHAS).to(F64)
    with torch.no_grad():
        for q, p, a in zip(scaled.theta, prob.model.parameters(), ALPHAS):
            q.copy_(p * a)
    return prob, scaled


def run_infos(model, prob, cfg, steps=5):
    opt = curvkit.build_optimizer(model, prob.loss_fn, cfg)
    out, infos = [], []
    for t in range(steps):
        opt.step(prob.batches[t % len(prob.batches)])
        infos.append(dict(opt.last_info))
        out.append([p.detach().clone() for p in model.parameters()])
    return out, infos


@pytest.mark.parametrize("d_floor, lam", [(3.0, 1.0), (0.1, 1.0)])
def test_invariance_with_the_floor_forced_on_and_the_safeguard_active(d_floor, lam):
    """Issue 16 item 1: the floor scales like each group's own d, so the trajectory stays
    invariant under θ̃_s = α_s θ_s with the floor active on most groups (d_floor = 3) and
    with the safeguard rejecting trials; the old floor, relative to max_s d_s, was not."""
    prob, scaled = rescaled_pair()
    cfg = {**config(lam), "lr": 0.8}
    cfg["solver"]["d_floor"] = d_floor
    ref, infos = run_infos(prob.model, prob, cfg)
    got, infos2 = run_infos(scaled, prob, cfg)
    if d_floor == 3.0:
        assert all(i["cubic_floored"] >= 3 for i in infos)  # the floor is on
    else:
        assert sum(i["cubic_rejections"] for i in infos) >= 1  # the safeguard acted
    assert [i["cubic_rejections"] for i in infos] == [i["cubic_rejections"] for i in infos2]
    for step, (a_params, b_params) in enumerate(zip(ref, got)):
        for p, q, a in zip(a_params, b_params, ALPHAS):
            torch.testing.assert_close(q / a, p, rtol=1e-10, atol=1e-13,
                                       msg=lambda m, s=step: f"step {s}: {m}")


def test_floor_scales_like_d_under_group_and_loss_scaling():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=gen, dtype=F64)
    H, g = A + A.T, torch.randn(4, generator=gen, dtype=F64)
    D3 = torch.tensor([1e-9, 2.0, 0.0, -3e-6], dtype=F64)
    c, k = t64([3.0, -0.2, 7.0, 0.5]), 5.0
    d = third_order_scale(D3, H, g, 0.5)
    d2 = third_order_scale(k * c**3 * D3, k * torch.outer(c, c) * H, k * c * g, 0.5)
    torch.testing.assert_close(d2, k ** (1 / 3) * c.abs() * d, rtol=1e-12, atol=0)
    assert bool((d > D3.abs().pow(1 / 3)).any())  # the floor is active here
    # H̄_ss = 0: the relative fallback keeps D invertible
    H0 = H.clone()
    H0[2, 2] = 0.0
    assert float(third_order_scale(D3, H0, g, 0.5)[2]) > 0.0


def single_sample_run(seed: int, safeguard: bool, steps: int = 12):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(F64)
    X, y = torch.randn(1, 4, dtype=F64), torch.randn(1, 2, dtype=F64)
    loss_fn = nn.MSELoss()
    opt = curvkit.build_optimizer(model, loss_fn, {
        "lr": 1.0, "estimator": "hessian", "preconditioner": "partition",
        "solver": {"name": "cubic", "lambda_int": 1.0, "safeguard": safeguard}})
    losses = []
    for _ in range(steps):
        losses.append(float(opt.step((X, y))))
    return losses, opt


def test_safeguard_stops_the_single_sample_blow_up():
    """Issue 16 item 2: NewtonSummary with MSE on one sample. Without the acceptance test the
    loss climbs by three orders of magnitude before it recovers; with it the loss never
    rises, and rejections are counted and raise λ_int."""
    unsafe, _ = single_sample_run(2, safeguard=False)
    assert max(unsafe) > 1e3 * unsafe[0]
    safe, opt = single_sample_run(2, safeguard=True)
    assert all(b <= a for a, b in zip(safe, safe[1:]))
    assert safe[-1] < 1e-3 * safe[0]
    assert opt.solver.state["rejections"] >= 1 and opt.counters["steps"] == 12


def test_rejection_raises_and_success_lowers_lambda():
    prob, _ = rescaled_pair()
    cfg = {**config(1.0), "lr": 0.8}
    cfg["solver"].update(retries=0)
    _, infos = run_infos(prob.model, prob, cfg)
    lam = 1.0
    for info in infos:
        if info["cubic_rejections"]:
            assert info["accepted"] is False and info["cubic_lambda"] == lam * 2.0
        elif info["cubic_rho"] >= 0.9:
            assert info["cubic_lambda"] == max(lam / 2.0, 1e-3)
        else:
            assert info["cubic_lambda"] == lam and info["cubic_rho"] >= 0.1
        lam = info["cubic_lambda"]
    assert any(i["cubic_rejections"] for i in infos)
    assert all(i["evaluations"] >= 1 for i in infos)  # one forward pass per trial


def test_invariance_with_a_momentum_direction_and_independent_batches():
    """Method 1 with u = a momentum of gradients and the summary on the previous batch
    (issue 16 item 3): still invariant under θ̃_s = α_s θ_s (footnote 5)."""
    prob, scaled = rescaled_pair()
    prob.batches.append(prob.batches[0])
    cfg = {**config(1.0, direction_momentum=0.9, summary_batch="previous"), "lr": 0.5}
    ref, infos = run_infos(prob.model, prob, cfg, steps=4)
    got, _ = run_infos(scaled, prob, cfg, steps=4)
    assert sum(i["accepted"] for i in infos) >= 2
    for step, (a_params, b_params) in enumerate(zip(ref, got)):
        for p, q, a in zip(a_params, b_params, ALPHAS):
            torch.testing.assert_close(q / a, p, rtol=1e-10, atol=1e-13,
                                       msg=lambda m, s=step: f"step {s}: {m}")
