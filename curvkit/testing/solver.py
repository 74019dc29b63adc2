"""The suite every solver inherits: problems whose minimiser is known, and two references.

A solver's test class names the solver and the composition it runs in (estimator,
preconditioner, lr, step budget)::

    from curvkit.testing import SolverSuite

    class TestTrustRegion(SolverSuite):
        name = "trust_region"
        matches_trust_ncg = True     # same algorithm as scipy's trust-ncg: same iterates

Problems (float64; the "model" holds x as its one parameter and outputs f(x), the loss is
that output): convex quadratics ½xᵀAx + bᵀx of several sizes and condition numbers with
minimiser x* = −A⁻¹b; a least-squares model ‖Mx − c‖² through ``nn.Linear`` and
``nn.MSELoss(reduction="sum")`` with x* from ``numpy.linalg.lstsq``; a nonconvex double
well whose minimiser in the starting basin is found by brute force (a dense grid, then
polished by scipy); Rosenbrock, whose iterates a ``matches_trust_ncg`` solver reproduces
against ``scipy.optimize.minimize(method="trust-ncg")``. Also: a zero gradient leaves the
parameters bitwise unchanged, a rejected step never moves them, and the solver's state
goes through ``torch.save``/``torch.load(weights_only=True)`` and continues bitwise.

Hooks: ``config(**solver_options)`` (the optimizer config; default: ``estimator``,
``preconditioner``, ``lr`` and ``options`` class attributes), ``steps``, ``tol``,
``monotone`` (accepted steps never increase the loss), ``matches_trust_ncg``.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import curvkit

DT = torch.float64
BATCH = (torch.zeros(1, 1, dtype=DT), torch.zeros(1, dtype=DT))


class FnModel(nn.Module):
    """A "model" whose parameter is x and whose output is f(x)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], x0: Any) -> None:
        super().__init__()
        self.fn = fn
        self.x = nn.Parameter(torch.as_tensor(np.asarray(x0, dtype=float), dtype=DT).clone())

    def forward(self, X: Tensor) -> Tensor:
        return self.fn(self.x).reshape(1)


class Value(nn.Module):
    """The loss is the model output itself (summed)."""

    reduction = "sum"

    def forward(self, out: Tensor, y: Tensor) -> Tensor:
        return out.sum()


def quadratic(n: int, cond: float, seed: int = 0) -> tuple[Callable[[Tensor], Tensor],
                                                           np.ndarray, np.ndarray]:
    """f(x) = ½xᵀAx + bᵀx with eigenvalues of A spread over [1, cond]; returns (f, A, b)."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = Q @ np.diag(np.geomspace(1.0, cond, n)) @ Q.T
    A = (A + A.T) / 2
    b = rng.standard_normal(n)
    At, bt = torch.tensor(A, dtype=DT), torch.tensor(b, dtype=DT)
    return (lambda x: 0.5 * x @ (At @ x) + bt @ x), A, b


def double_well(x: Tensor) -> Tensor:
    """(x₀² − 1)² + 0.3·x₀ + (x₁ − 0.5·x₀)² + 0.2·x₁⁴: two basins in x₀, one minimiser each."""
    return (x[0] ** 2 - 1) ** 2 + 0.3 * x[0] + (x[1] - 0.5 * x[0]) ** 2 + 0.2 * x[1] ** 4


def brute_force_minimiser(fn: Callable[[Tensor], Tensor], lo: tuple[float, float],
                          hi: tuple[float, float], points: int = 401) -> np.ndarray:
    """argmin of a 2-D ``fn`` over the box [lo, hi]: a dense grid, then scipy's BFGS from the
    best grid point (independent of any curvkit code)."""
    import scipy.optimize as so

    g0 = torch.linspace(lo[0], hi[0], points, dtype=DT)
    g1 = torch.linspace(lo[1], hi[1], points, dtype=DT)
    X0, X1 = torch.meshgrid(g0, g1, indexing="ij")
    values = torch.vmap(fn)(torch.stack([X0.reshape(-1), X1.reshape(-1)], dim=1))
    best = int(values.argmin())
    start = np.array([float(X0.reshape(-1)[best]), float(X1.reshape(-1)[best])])

    def f(z: np.ndarray) -> float:
        return float(fn(torch.tensor(z, dtype=DT)))

    def df(z: np.ndarray) -> np.ndarray:
        t = torch.tensor(z, dtype=DT, requires_grad=True)
        return torch.autograd.grad(fn(t), t)[0].numpy()

    return so.minimize(f, start, jac=df, method="BFGS", options={"gtol": 1e-13}).x


class SolverSuite:
    """Inherit and set ``name`` (see the module docstring)."""

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    estimator: ClassVar[str | dict[str, Any]] = "hessian"
    preconditioner: ClassVar[str | dict[str, Any]] = "identity"
    lr: ClassVar[float] = 1.0
    steps: ClassVar[int] = 60
    tol: ClassVar[float] = 1e-7
    monotone: ClassVar[bool] = True
    matches_trust_ncg: ClassVar[bool] = False

    # ------------------------------------------------------------------ hooks
    def config(self, **solver_options: Any) -> dict[str, Any]:
        return {"lr": self.lr, "estimator": self.estimator,
                "preconditioner": self.preconditioner,
                "solver": {"name": self.name, **self.options, **solver_options}}

    def build(self, model: nn.Module, loss_fn: Any, **solver_options: Any) -> Any:
        return curvkit.build_optimizer(model, loss_fn, self.config(**solver_options))

    def run(self, opt: Any, batch: Any, steps: int, loss_of: Callable[[], float]
            ) -> list[float]:
        """Take ``steps`` steps; the loss after each. Checks monotone decrease if declared."""
        losses = [loss_of()]
        for _ in range(steps):
            opt.step(batch)
            losses.append(loss_of())
            assert np.isfinite(losses[-1]), losses
            if self.monotone:
                assert losses[-1] <= losses[-2] + 1e-12 * max(1.0, abs(losses[-2])), \
                    f"{self.name}: the loss went up: {losses[-2]!r} → {losses[-1]!r}"
        return losses

    # ------------------------------------------------------------------ known minimisers
    @pytest.mark.parametrize("n,cond", [(1, 1.0), (5, 10.0), (12, 1e3)])
    def test_convex_quadratic_reaches_the_minimiser(self, n: int, cond: float) -> None:
        fn, A, b = quadratic(n, cond, seed=n)
        x_star = np.linalg.solve(A, -b)
        model = FnModel(fn, np.zeros(n))
        opt = self.build(model, Value())
        self.run(opt, BATCH, self.steps, lambda: float(fn(model.x.detach())))
        np.testing.assert_allclose(model.x.detach().numpy(), x_star,
                                   atol=self.tol * max(1.0, np.abs(x_star).max()),
                                   err_msg=f"{self.name} on a quadratic, n={n}, cond={cond}")

    def test_least_squares_model_reaches_lstsq(self) -> None:
        """min ‖Mx − c‖² through a real layer and loss (nn.Linear, MSELoss sum)."""
        g = torch.Generator().manual_seed(7)
        M = torch.randn(20, 4, generator=g, dtype=DT)
        c = torch.randn(20, 1, generator=g, dtype=DT)
        model = nn.Linear(4, 1, bias=False).to(DT)
        with torch.no_grad():
            model.weight.zero_()
        loss_fn = nn.MSELoss(reduction="sum")
        opt = self.build(model, loss_fn)
        self.run(opt, (M, c), self.steps,
                 lambda: float(loss_fn(model(M), c).detach()))
        x_star = np.linalg.lstsq(M.numpy(), c.numpy()[:, 0], rcond=None)[0]
        np.testing.assert_allclose(model.weight.detach().numpy()[0], x_star,
                                   atol=self.tol * max(1.0, np.abs(x_star).max()))

    def test_nonconvex_reaches_the_brute_force_minimiser_of_its_basin(self) -> None:
        # started in the right-hand basin (x₀ > 0); the left one holds the global minimiser
        ref = brute_force_minimiser(double_well, (0.2, -2.0), (2.0, 2.0))
        model = FnModel(double_well, [1.6, -1.0])
        opt = self.build(model, Value())
        self.run(opt, BATCH, self.steps, lambda: float(double_well(model.x.detach())))
        np.testing.assert_allclose(model.x.detach().numpy(), ref, atol=1e-6,
                                   err_msg=f"{self.name}: not the minimiser of the basin")

    def test_rosenbrock_iterates_match_scipy_trust_ncg(self) -> None:
        if not self.matches_trust_ncg:
            pytest.skip(f"{self.name} is not scipy's trust-ncg algorithm")
        import scipy.optimize as so

        x0 = [-1.2, 1.0]
        ref: list[np.ndarray] = []
        so.minimize(so.rosen, np.array(x0), jac=so.rosen_der, hessp=so.rosen_hess_prod,
                    method="trust-ncg", callback=lambda xk: ref.append(np.array(xk, copy=True)),
                    options={"gtol": 1e-12})

        def rosen(x: Tensor) -> Tensor:
            return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()

        model = FnModel(rosen, x0)
        opt = self.build(model, Value(), max_iters=100)
        n = len(ref) - 2  # the last iterations are at the level of rounding
        ours = []
        for _ in range(n):  # scipy's callback sees rejected iterations too: one step each
            opt.step(BATCH)
            ours.append(model.x.detach().numpy().copy())
        np.testing.assert_allclose(np.array(ours), np.array(ref[:n]), rtol=1e-9, atol=1e-10)

    # ------------------------------------------------------------------ contracts
    def test_zero_gradient_leaves_parameters_bitwise(self) -> None:
        fn, A, b = quadratic(4, 10.0, seed=3)
        x_star = torch.tensor(np.linalg.solve(A, -b), dtype=DT)
        At = torch.tensor(A, dtype=DT)

        def centred(x: Tensor) -> Tensor:  # minimiser at x*, gradient exactly 0 there
            d = x - x_star
            return 0.5 * d @ (At @ d)

        model = FnModel(centred, x_star.numpy())
        opt = self.build(model, Value())
        before = model.x.detach().clone()
        opt.step(BATCH)
        assert torch.equal(model.x.detach(), before)
        assert opt.counters["nonfinite"] == 0

    def test_rejected_step_leaves_parameters_bitwise(self) -> None:
        """Whatever the solver proposes, the optimizer applies only accepted steps."""
        model = FnModel(double_well, [1.6, -1.0])
        opt = self.build(model, Value())
        for _ in range(5):
            before = model.x.detach().clone()
            opt.step(BATCH)
            if not opt.last_info.get("accepted", True):
                assert torch.equal(model.x.detach(), before)

    def test_state_dict_round_trip_continues_bitwise(self) -> None:
        model = FnModel(double_well, [1.6, -1.0])
        opt = self.build(model, Value())
        for _ in range(2):
            opt.step(BATCH)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        twin = copy.deepcopy(model)
        buf.seek(0)
        saved = torch.load(buf, weights_only=True)
        twin.load_state_dict(saved["model"])
        opt2 = self.build(twin, Value())
        opt2.load_state_dict(saved["opt"])
        for _ in range(3):
            opt.step(BATCH)
            opt2.step(BATCH)
        assert torch.equal(model.x.detach(), twin.x.detach())
