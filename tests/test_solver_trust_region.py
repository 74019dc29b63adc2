"""``trust_region``: Steihaug-Toint Newton-Krylov trust region against scipy.optimize.

Functions are written as tiny models whose only parameter is x and whose "output" is f(x)
(the loss returns it), so the ``hessian`` estimator's matvec is the exact ∇²f and every
iterate can be compared with scipy's trust-ncg, which implements the same algorithm
(Steihaug CG with the tolerance min(0.5, √‖g‖)‖g‖, N&W Alg. 4.1 radius rule).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize as so
import torch
from torch import nn

import curvkit
from curvkit.errors import ConfigError
from curvkit.preconditioners.base import Preconditioner
from curvkit.solvers import _krylov as K

DT = torch.float64
BATCH = (torch.zeros(1, 1, dtype=DT), torch.zeros(1, dtype=DT))


class FnModel(nn.Module):
    """A "model" whose parameter is x and whose output is f(x)."""

    def __init__(self, fn, x0) -> None:
        super().__init__()
        self.fn = fn
        self.x = nn.Parameter(torch.as_tensor(np.asarray(x0, dtype=float), dtype=DT).clone())

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.fn(self.x).reshape(1)


class Value(nn.Module):
    """The loss is the model output itself (summed)."""

    reduction = "sum"

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out.sum()


def rosen_t(x: torch.Tensor) -> torch.Tensor:
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


def quad_problem(n: int = 6, seed: int = 0, indefinite: bool = False):
    """f(x) = ½xᵀAx + bᵀx as (torch fn, numpy fun, jac, hessp)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    ev = np.linspace(0.5, 20.0, n)
    if indefinite:
        ev[: n // 2] = -np.linspace(0.5, 3.0, n // 2)
    A = Q @ np.diag(ev) @ Q.T
    b = rng.standard_normal(n)
    At, bt = torch.tensor(A, dtype=DT), torch.tensor(b, dtype=DT)

    def fn(x):
        return 0.5 * x @ (At @ x) + bt @ x

    return fn, (lambda x: 0.5 * x @ A @ x + b @ x), (lambda x: A @ x + b), \
        (lambda x, p: A @ p), A, b


def make_opt(fn, x0, lr=1.0, **solver):
    model = FnModel(fn, x0)
    opt = curvkit.build_optimizer(model, Value(), {
        "lr": lr, "estimator": "hessian", "preconditioner": "identity",
        "solver": {"name": "trust_region", **solver}})
    return model, opt


def run(opt, model, steps):
    xs = []
    for _ in range(steps):
        opt.step(BATCH)
        xs.append(model.x.detach().numpy().copy())
    return np.array(xs)


def scipy_iterates(fun, jac, hessp, x0, method="trust-ncg", **options):
    xs: list[np.ndarray] = []
    res = so.minimize(fun, np.asarray(x0, dtype=float), jac=jac, hessp=hessp, method=method,
                      callback=lambda xk: xs.append(np.array(xk, copy=True)),
                      options={"gtol": 1e-12, **options})
    return np.array(xs), res


# ----------------------------------------------------------------------------- against scipy
def test_rosenbrock_iterates_match_scipy_trust_ncg():
    x0 = [-1.2, 1.0]
    ref, res = scipy_iterates(so.rosen, so.rosen_der, so.rosen_hess_prod, x0)
    model, opt = make_opt(rosen_t, x0, max_iters=100)
    # scipy's callback sees every iteration, rejected ones included: one optimizer step each
    n = len(ref) - 2  # the last iterations are at the level of rounding
    ours = run(opt, model, n)
    np.testing.assert_allclose(ours, ref[:n], rtol=1e-9, atol=1e-10)
    assert opt.counters["rejected"] > 0  # the path includes rejected steps
    run(opt, model, 10)
    np.testing.assert_allclose(model.x.detach().numpy(), [1.0, 1.0], atol=1e-10)


def test_rosenbrock_4d_final_point_matches_trust_krylov():
    x0 = [-1.2, 1.0, -0.5, 0.8]
    _, res = scipy_iterates(so.rosen, so.rosen_der, so.rosen_hess_prod, x0,
                            method="trust-krylov")
    model, opt = make_opt(rosen_t, x0, max_iters=100)
    run(opt, model, 80)
    np.testing.assert_allclose(model.x.detach().numpy(), res.x, atol=1e-7)


@pytest.mark.parametrize("radius", [0.3, 5.0])
def test_convex_quadratic_iterates_match_scipy(radius):
    fn, fun, jac, hessp, A, b = quad_problem(6, seed=1)
    x0 = np.zeros(6)
    ref, _ = scipy_iterates(fun, jac, hessp, x0, initial_trust_radius=radius)
    model, opt = make_opt(fn, x0, initial_radius=radius, max_iters=100)
    n = min(len(ref), 12)
    ours = run(opt, model, n)
    np.testing.assert_allclose(ours, ref[:n], rtol=1e-9, atol=1e-11)
    run(opt, model, 20)
    np.testing.assert_allclose(model.x.detach().numpy(), np.linalg.solve(A, -b), atol=1e-9)


def test_negative_curvature_followed_to_the_boundary():
    fn, fun, jac, hessp, A, b = quad_problem(6, seed=2, indefinite=True)
    x0 = np.zeros(6)
    model, opt = make_opt(fn, x0, initial_radius=0.7, max_iters=100)
    opt.step(BATCH)
    info = opt.last_info
    assert info["stop"] == "negative_curvature"
    p = model.x.detach().numpy() - x0
    assert np.linalg.norm(p) == pytest.approx(0.7, rel=1e-12)
    assert info["predicted"] > 0
    # the model value equals the one reported, and the step matches scipy's
    m = b @ p + 0.5 * p @ A @ p
    assert -m == pytest.approx(info["predicted"], rel=1e-10)
    ref, _ = scipy_iterates(fun, jac, hessp, x0, initial_trust_radius=0.7, maxiter=3)
    np.testing.assert_allclose(model.x.detach().numpy(), ref[0], rtol=1e-10, atol=1e-12)


def test_negative_curvature_found_after_positive_iterations():
    # d₀ = −g has positive curvature; CG meets the negative direction only later
    A = np.diag([4.0, 3.0, 2.0, -0.05])
    b = np.array([1.0, 1.0, 1.0, 0.01])
    At, bt = torch.tensor(A), torch.tensor(b)
    radius = 3.0
    model, opt = make_opt(lambda x: 0.5 * x @ (At @ x) + bt @ x, np.zeros(4),
                          initial_radius=radius, max_iters=10, cg_forcing="fixed", cg_tol=1e-12)
    opt.step(BATCH)
    info = opt.last_info
    assert info["stop"] == "negative_curvature" and info["cg_iters"] > 1
    p = model.x.detach().numpy()
    assert np.linalg.norm(p) == pytest.approx(radius, rel=1e-12)
    m = b @ p + 0.5 * p @ A @ p
    assert -m == pytest.approx(info["predicted"], rel=1e-10)
    # better than the minimizer on the positive-curvature subspace and the Cauchy point
    p_pos = np.concatenate([-b[:3] / np.diag(A)[:3], [0.0]])
    assert m < b @ p_pos + 0.5 * p_pos @ A @ p_pos
    p_c = -radius * b / np.linalg.norm(b)
    assert m < b @ p_c + 0.5 * p_c @ A @ p_c


# ----------------------------------------------------------------------------- rejection
def test_rejected_step_leaves_parameters_bitwise_and_shrinks_radius():
    model, opt = make_opt(rosen_t, [-1.2, 1.0], initial_radius=1.0)
    for _ in range(20):
        before = model.x.detach().clone()
        radius = opt.solver.state["radius"]
        opt.step(BATCH)
        if not opt.last_info["accepted"]:
            break
    else:
        pytest.fail("no rejected step on the Rosenbrock path")
    info = opt.last_info
    assert info["rho"] < opt.solver.options.eta
    assert torch.equal(model.x.detach(), before)
    assert info["radius"] == radius
    assert opt.solver.state["radius"] == 0.25 * radius
    assert opt.counters["rejected"] == 1 and opt.solver.state["rejected"] == 1


def test_nonfinite_trial_loss_is_rejected():
    def fn(x):
        f = ((x - 1.0) ** 2).sum() - 3.0 * x[0]
        return torch.where(x[0] < 1.5, f, torch.full_like(f, math.nan))

    model, opt = make_opt(fn, [0.0, 0.0], initial_radius=10.0)
    opt.step(BATCH)
    assert opt.last_info["accepted"] is False and opt.last_info["rho"] == -math.inf
    assert torch.equal(model.x.detach(), torch.zeros(2, dtype=DT))
    assert opt.solver.state["radius"] == 2.5


def test_retries_resolve_on_the_same_batch():
    model, opt = make_opt(rosen_t, [-1.2, 1.0], initial_radius=1.0, retries=5)
    retried = []
    for _ in range(20):
        radius = opt.solver.state["radius"]
        opt.step(BATCH)
        info = opt.last_info
        assert info["accepted"]  # every rejection was re-solved within the step
        if info["attempts"] > 1:
            retried.append(info)
            assert info["radius"] == radius * 0.25 ** (info["attempts"] - 1)
    assert retried and opt.counters["rejected"] == 0
    assert opt.solver.state["rejected"] == sum(i["attempts"] - 1 for i in retried)


# ----------------------------------------------------------------------------- preconditioning
class FixedDiagonal(Preconditioner):
    """M⁻¹ = diag(m_inv), fixed."""

    name = "fixed_diagonal_test"

    def __init__(self, model, m_inv) -> None:
        super().__init__(model)
        self.m_inv = m_inv

    def apply(self, direction):
        return [self.m_inv * d for d in direction]


def test_preconditioner_norm_bounds_the_step_and_matches_the_transformed_problem():
    """Preconditioned TR on f equals plain TR on f̂(x̂) = f(M^{-1/2} x̂), x = M^{-1/2}x̂."""
    fn, fun, jac, hessp, A, b = quad_problem(5, seed=3)
    m_inv = np.array([0.2, 1.0, 3.0, 0.5, 2.0])
    s = np.sqrt(m_inv)  # M^{-1/2}
    model, opt = make_opt(fn, np.zeros(5), initial_radius=0.4)
    opt.preconditioner = FixedDiagonal(model, torch.tensor(m_inv))
    xs = []
    for _ in range(8):
        before = model.x.detach().numpy().copy()
        opt.step(BATCH)
        info = opt.last_info
        p = model.x.detach().numpy() - before
        if info["accepted"]:
            norm_M = math.sqrt(p @ (p / m_inv))
            assert norm_M <= info["radius"] * (1 + 1e-12)
            assert norm_M == pytest.approx(info["step_norm"], rel=1e-10)
        xs.append(model.x.detach().numpy().copy())
    ref, _ = scipy_iterates(lambda z: fun(s * z), lambda z: s * jac(s * z),
                            lambda z, p: s * hessp(s * z, s * p), np.zeros(5),
                            initial_trust_radius=0.4)
    np.testing.assert_allclose(np.array(xs), s * ref[:8], rtol=1e-9, atol=1e-11)
    # with a plain Euclidean norm the first step would differ
    model2, opt2 = make_opt(fn, np.zeros(5), initial_radius=0.4)
    opt2.step(BATCH)
    assert not np.allclose(model2.x.detach().numpy(), xs[0])


# ----------------------------------------------------------------------------- damping, lr, state
def test_lm_damping_adapts_from_rho():
    model, opt = make_opt(rosen_t, [-1.2, 1.0], damping=1.0, adapt_damping=True,
                          initial_radius=1e3, max_radius=1e3)
    lams, rhos = [], []
    for _ in range(12):
        lam = opt.solver.state["damping"]
        opt.step(BATCH)
        lams.append((lam, opt.solver.state["damping"]))
        rhos.append(opt.last_info["rho"])
        assert opt.last_info["damping"] == lam
    for (before, after), rho in zip(lams, rhos):
        if rho < 0.25:
            assert after == pytest.approx(before * 1.5)
        elif rho > 0.75:
            assert after == pytest.approx(max(before / 1.5, 1e-8))
        else:
            assert after == before
    assert any(r < 0.25 for r in rhos) and any(r > 0.75 for r in rhos)


def test_damping_enters_the_model():
    # a large λ and radius: CG solves (A + λI)p = −g, p ≈ −g/λ
    fn, fun, jac, hessp, A, b = quad_problem(4, seed=4)
    lam = 50.0
    model, opt = make_opt(fn, np.zeros(4), damping=lam, initial_radius=100.0,
                          cg_forcing="fixed", cg_tol=1e-12)
    opt.step(BATCH)
    np.testing.assert_allclose(model.x.detach().numpy(),
                               np.linalg.solve(A + lam * np.eye(4), -b), rtol=1e-10)


def test_lr_scales_the_step():
    fn, fun, jac, hessp, A, b = quad_problem(4, seed=5)
    model, opt = make_opt(fn, np.zeros(4), lr=0.5, initial_radius=100.0, cg_forcing="fixed",
                          cg_tol=1e-12)
    opt.step(BATCH)
    assert opt.last_info["accepted"]
    np.testing.assert_allclose(model.x.detach().numpy(), 0.5 * np.linalg.solve(A, -b),
                               rtol=1e-10)
    # ρ compares with the model at the scaled step: exact for a quadratic
    assert opt.last_info["rho"] == pytest.approx(1.0, rel=1e-8)
    # the applied point is exactly the evaluated trial point
    with torch.no_grad():
        assert float(Value()(model(BATCH[0]), BATCH[1])) == opt.last_info["trial_loss"]


def test_state_roundtrip_continues_identically():
    model, opt = make_opt(rosen_t, [-1.2, 1.0])
    run(opt, model, 5)
    sd = opt.state_dict()
    model2, opt2 = make_opt(rosen_t, model.x.detach().numpy())
    opt2.load_state_dict(sd)
    assert opt2.solver.state["radius"] == opt.solver.state["radius"]
    np.testing.assert_array_equal(run(opt, model, 6), run(opt2, model2, 6))


def test_zero_gradient_is_a_no_op():
    model, opt = make_opt(rosen_t, [1.0, 1.0])
    opt.step(BATCH)
    assert opt.last_info["stop"] == "zero_gradient"
    assert torch.equal(model.x.detach(), torch.ones(2, dtype=DT))
    assert opt.counters["rejected"] == 0


def test_reports_per_step():
    model, opt = make_opt(rosen_t, [-1.2, 1.0])
    opt.step(BATCH)
    info = opt.last_info
    for key in ("cg_iters", "rho", "radius", "radius_next", "accepted", "stop", "matvecs",
                "predicted", "actual", "work"):
        assert key in info
    assert info["stop"] in K.STOP_REASONS
    # gradient, the Hessian's kept forward and gradient graph, 2 per product, 1 per loss
    assert info["work"] == 2 + 2 + 2 * info["matvecs"] + info["evaluations"]


def test_max_iters_truncates_cg():
    fn, *_ = quad_problem(8, seed=6)
    model, opt = make_opt(fn, np.zeros(8), max_iters=2, initial_radius=1e3,
                          cg_forcing="fixed", cg_tol=1e-14)
    opt.step(BATCH)
    assert opt.last_info["stop"] == "max_iters" and opt.last_info["cg_iters"] == 2
    assert opt.last_info["matvecs"] == 2


def test_options_are_validated():
    model = FnModel(rosen_t, [0.0, 0.0])
    with pytest.raises(ConfigError, match="eta"):
        curvkit.build_optimizer(model, Value(), {"estimator": "hessian", "solver": {
            "name": "trust_region", "eta": 0.2, "shrink_threshold": 0.1}})
    with pytest.raises(ConfigError, match="initial_radius"):
        curvkit.build_optimizer(model, Value(), {"estimator": "hessian", "solver": {
            "name": "trust_region", "initial_radius": 10.0, "max_radius": 1.0}})


def test_steihaug_cg_unit_boundary_and_model_value():
    """The CG result's bookkeeping (gᵀp, pᵀBp, ‖p‖_M, residual) matches direct evaluation."""
    rng = np.random.default_rng(7)
    A = rng.standard_normal((6, 6))
    A = A @ A.T + np.eye(6)
    g = rng.standard_normal(6)
    m_inv = rng.uniform(0.3, 3.0, 6)
    At, gt, mt = torch.tensor(A), torch.tensor(g), torch.tensor(m_inv)
    for radius in (0.05, 0.5, 50.0):
        res = K.steihaug_cg([gt], lambda v: [At @ v[0]], lambda v: [mt * v[0]], radius, 20,
                            1e-12)
        p = res.step[0].numpy()
        assert res.gp == pytest.approx(g @ p, rel=1e-10)
        assert res.pBp == pytest.approx(p @ A @ p, rel=1e-9)
        assert res.norm == pytest.approx(math.sqrt(p @ (p / m_inv)), rel=1e-10)
        np.testing.assert_allclose(res.residual[0].numpy(), g + A @ p, atol=1e-10)
        assert res.norm <= radius * (1 + 1e-12)
        if res.stop == "converged":
            np.testing.assert_allclose(p, np.linalg.solve(A, -g), atol=1e-9)
        else:
            assert res.stop == "boundary" and res.norm == pytest.approx(radius, rel=1e-12)
