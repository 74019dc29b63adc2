"""``cubic``: Wolinski's anisotropic Nesterov cubic regularization of the partition step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.errors import IncompatibleError, StepError
from curvkit.estimators.base import Summary
from curvkit.options import option
from curvkit.parts import GROUP_SUMMARY, SUMMARY_D3
from curvkit.solvers.base import Solver, StepContext, StepResult

# β components on the null space of A + M r₀ I below this fraction of ‖β‖ are treated as
# zero (the "hard case"); the root find would otherwise chase s* ~ |β_null| / M → 0.
HARD_CASE_TOL = 1e-14


@dataclass
class CubicSolution:
    """η (float64, or None on failure), r = ‖Dη‖, the lower end r₀ of the search, the
    number of ψ evaluations, and how the solution was found: ``"newton"`` (λ_int = 0),
    ``"root"``, ``"hard_case"``, ``"zero"`` (ḡ = 0), ``"no_third_order"`` (D3 = 0, so the
    model is quadratic) or ``"failed: <why>"``."""

    eta: Tensor | None
    r: float
    r0: float
    iters: int
    status: str

    @property
    def failed(self) -> bool:
        return self.eta is None


def _fail(why: str, r0: float = math.nan, iters: int = 0) -> CubicSolution:
    return CubicSolution(None, math.nan, r0, iters, f"failed: {why}")


def cubic_model(eta: Tensor, H: Tensor, g: Tensor, d: Tensor, lambda_int: float) -> Tensor:
    """T(η) = −ηᵀḡ + ½ηᵀH̄η + (λ_int/6)‖Dη‖³ with D = Diag(d)."""
    return -eta @ g + 0.5 * eta @ H @ eta + lambda_int / 6.0 * torch.linalg.norm(d * eta) ** 3


def third_order_scale(D3: Tensor, d_floor: float) -> Tensor:
    """d_i = max(|D3_i|^{1/3}, d_floor · max_j |D3_j|^{1/3})."""
    d = D3.double().abs().pow(1.0 / 3.0)
    return d.clamp(min=d_floor * float(d.max()))


def cubic_eta(H: Tensor, g: Tensor, D3: Tensor | None, lambda_int: float, *,
              d_floor: float = 1e-4, rtol: float = 1e-12, max_iters: int = 100,
              max_expansions: int = 60, where: str = "optimizer.solver") -> CubicSolution:
    """The global minimizer of T(η) = −ηᵀḡ + ½ηᵀH̄η + (λ_int/6)‖Dη‖³, D = Diag(|D3|^{1/3}).

    Stationary points solve η = (H̄ + (λ_int/2) r D²)⁻¹ ḡ with r = ‖Dη‖ (Wolinski, eq. 10).
    With ξ = Dη, A = D⁻¹H̄D⁻¹ = QΛQᵀ, b = D⁻¹ḡ, β = Qᵀb and M = λ_int/2 this is the
    isotropic problem (A + M r I) ξ = b. The global minimizer is the solution with
    A + M r I ⪰ 0 (Nesterov & Polyak 2006), i.e. r ≥ r₀ = max(0, −Λ_min/M), which is the
    largest-norm solution. Writing r = r₀ + s, c_i = Λ_i + M r₀ ≥ 0 (c_min = 0 exactly),

        ‖ξ(s)‖² = Σ_i β_i² / (c_i + M s)²,     ψ(s) = 1/‖ξ(s)‖ − 1/(r₀ + s) = 0,

    ψ is increasing and concave on s > 0, so Newton's method from the left of the root
    converges monotonically; it is bracketed by [0, min(√(‖b‖/M), ‖ξ(0)‖ − r₀)] (at the
    root r₀ + s = ‖ξ(s)‖ ≤ ‖b‖/(M s) and ≤ ‖ξ(0)‖), with bisection as a safeguard. When β
    has no component on the null space of A + M r₀ I and ‖ξ(0)‖ ≤ r₀ (the hard case),
    ξ = ξ(0) + τ v with v in that null space and ‖ξ‖ = r₀. Everything runs in float64.

    ``lambda_int = 0``: η = H̄⁻¹ḡ; an H̄ that is not positive definite raises
    :class:`StepError` naming ``where``.lambda_int. Other failures (non-finite input,
    no convergence, D3 = 0 with an indefinite H̄) return ``eta=None`` and never NaN.
    """
    H = H.detach().double()
    g = g.detach().double()
    if D3 is not None:
        D3 = D3.detach().double()
    if not (torch.isfinite(H).all() and torch.isfinite(g).all()) or \
            (D3 is not None and not torch.isfinite(D3).all()):
        return _fail("non-finite summary")
    H = 0.5 * (H + H.T)
    d = third_order_scale(D3, d_floor) if D3 is not None else None

    if lambda_int == 0.0 or (d is not None and float(d.max()) == 0.0):
        evals = torch.linalg.eigvalsh(H)
        lo, hi = float(evals[0]), float(evals[-1])
        if lo <= 0.0:
            if lambda_int == 0.0:
                raise StepError(
                    f"{where}.lambda_int: lambda_int = 0 needs a positive definite H̄ (the "
                    f"step is η = H̄⁻¹ḡ), but H̄ has eigenvalues in [{lo:.3g}, {hi:.3g}]; set "
                    f"lambda_int > 0 (cubic regularization) or a damping on the partition "
                    f"preconditioner")
            return _fail("D3 = 0 (no cubic term) and H̄ is not positive definite")
        try:
            eta = torch.linalg.solve(H, g)
        except RuntimeError:  # singular to working precision despite λ_min > 0
            return _fail("H̄ is numerically singular")
        r = float(torch.linalg.norm(d * eta)) if d is not None else 0.0
        status = "newton" if lambda_int == 0.0 else "no_third_order"
        return _finite(CubicSolution(eta, r, 0.0, 0, status))
    if d is None:
        raise StepError(f"{where}.lambda_int: lambda_int = {lambda_int:g} needs the third-order "
                        f"diagonal D3 of the summary, which the estimator does not provide "
                        f"(use estimator 'hessian', or lambda_int = 0)")

    M = 0.5 * lambda_int
    A = H / torch.outer(d, d)
    A = 0.5 * (A + A.T)
    b = g / d
    Lam, Q = torch.linalg.eigh(A)
    beta = Q.T @ b
    nb = float(torch.linalg.norm(beta))
    if nb == 0.0:
        return CubicSolution(torch.zeros_like(g), 0.0, 0.0, 0, "zero")
    lam_min = float(Lam[0])
    r0 = max(0.0, -lam_min / M)
    c = Lam - lam_min if lam_min < 0.0 else Lam.clone()
    scale = float(Lam.abs().max())
    null = c <= 8 * torch.finfo(torch.float64).eps * scale
    c = torch.where(null, torch.zeros_like(c), c)
    if bool(null.any()) and float(torch.linalg.norm(beta[null])) <= HARD_CASE_TOL * nb:
        sign = 1.0 if float(beta[null][0]) >= 0.0 else -1.0
        beta = torch.where(null, torch.zeros_like(beta), beta)
        if r0 > 0.0:
            xi_perp = torch.where(null, torch.zeros_like(beta), beta / torch.where(
                null, torch.ones_like(c), c))
            n_perp = float(torch.linalg.norm(xi_perp))
            if n_perp <= r0:
                # hard case: A + M r₀ I is singular and the solution sits on its null space
                v = Q[:, int(torch.nonzero(null)[0])]
                tau = math.sqrt(max(r0 * r0 - n_perp * n_perp, 0.0))
                xi = Q @ xi_perp + sign * tau * v
                return _finite(CubicSolution(xi / d, r0, r0, 0, "hard_case"))

    beta2 = beta * beta

    def psi(s: float) -> tuple[float, float]:
        den = c + M * s
        w2 = beta2 / (den * den)
        n = math.sqrt(float(w2.sum()))
        f = 1.0 / n - 1.0 / (r0 + s)
        df = M * float((w2 / den).sum()) / n ** 3 + 1.0 / (r0 + s) ** 2
        return f, df

    hi = math.sqrt(nb / M)
    if not bool((c == 0).any()):  # r₀ + s = ‖ξ(s)‖ ≤ ‖ξ(0)‖ at the root
        hi = min(hi, float(torch.linalg.norm(beta / c)) - r0)
    hi = hi * (1.0 + 1e-12) + math.ulp(0.0)
    f, df = psi(hi)
    iters, expansions = 1, 0
    while not f >= 0.0:  # rounding only: √(‖b‖/M) bounds the root analytically
        if not math.isfinite(f) or expansions >= max_expansions:
            return _fail(f"no bracket for r after {expansions} expansions", r0, iters)
        hi *= 2.0
        f, df = psi(hi)
        iters += 1
        expansions += 1
    lo, s = 0.0, hi
    converged = False
    while True:
        if not (math.isfinite(f) and math.isfinite(df)):
            return _fail("non-finite secular function", r0, iters)
        if f == 0.0:
            converged = True
            break
        if f > 0.0:
            hi = s
        else:
            lo = s
        step = f / df
        s_new = s - step
        if not lo < s_new < hi:
            s_new = hi / 16.0 if lo == 0.0 else 0.5 * (lo + hi)
        if abs(s_new - s) <= rtol * s_new or hi - lo <= rtol * hi:
            s = s_new
            converged = True
            break
        if iters >= max_iters:
            break
        s = s_new
        f, df = psi(s)
        iters += 1
    if not converged:
        return _fail(f"root finder did not converge in {max_iters} iterations", r0, iters)
    xi = Q @ (beta / (c + M * s))
    return _finite(CubicSolution(xi / d, r0 + s, r0, iters, "root"))


def _finite(sol: CubicSolution) -> CubicSolution:
    if sol.eta is not None and not bool(torch.isfinite(sol.eta).all()):
        return _fail("non-finite η", sol.r0, sol.iters)
    return sol


class Cubic(Solver):
    """Anisotropic Nesterov cubic regularization of the partition step (Wolinski, Method 1).

    η = argmin −ηᵀḡ + ½ηᵀH̄η + (λ_int/6)‖Dη‖³, D = Diag(|D3_ii|^{1/3}), i.e. the
    largest-norm solution of η = (H̄ + (λ_int/2)‖Dη‖ D²)⁻¹ ḡ, found as a scalar root in
    float64 (:func:`cubic_eta`); the step is θ ← θ − lr · Σ_s η_s u_s. η is computed when
    the ``partition`` preconditioner refreshes its summary (it runs this solver's root find
    through ``set_eta_rule``), so the preconditioner's ``eta_ema`` averages the cubic η.

    A failed root find skips the step (``accepted = False``, ``info["cubic_failed"] = 1``)
    until the next successful computation, and is counted in ``state["failures"]``; a step
    is never NaN. Reported per step: ``cubic_eta``, ``cubic_r`` (‖Dη‖), ``cubic_r0``,
    ``cubic_iters`` (ψ evaluations of this step's root find, 0 on steps that reuse η),
    ``cubic_failed``, ``cubic_failures`` (total), ``cubic_hard_case``.
    """

    name = "cubic"
    needs = frozenset({GROUP_SUMMARY})

    @dataclass
    class Options:
        lambda_int: float = option(1.0, "λ_int, the strength of the cubic term; 0 gives the "
                                        "plain step η = H̄⁻¹ḡ (H̄ must then be positive "
                                        "definite)", min=0.0)
        # D3 carries rounding noise of order eps·max|D3| (e.g. a group in which the loss is
        # exactly quadratic); the cube root lifts it to eps^(1/3) ≈ 5e-6 relative, so the
        # floor must lie well above that for the step not to depend on the noise.
        d_floor: float = option(1e-4, "floor of D's entries relative to the largest one, so "
                                      "that D⁻¹ exists (a group with D3 ≈ 0); D3 entries below "
                                      "d_floor³·max|D3| count as rounding noise", min=0.0,
                                max=1.0)
        rtol: float = option(1e-12, "relative tolerance on r of the root finder", min=0.0)
        max_iters: int = option(100, "cap on ψ evaluations of the root finder", min=1)
        max_expansions: int = option(60, "cap on doublings of the bracket's upper end",
                                     min=0)

        def __post_init__(self) -> None:
            if self.rtol <= 0.0:
                raise ValueError("rtol: must be > 0")
            if self.lambda_int > 0.0 and self.d_floor <= 0.0:
                raise ValueError("d_floor: must be > 0 when lambda_int > 0 (D must be "
                                 "invertible)")

    def __init__(self, options: Options | None = None) -> None:
        super().__init__(options)
        self.state = {"failures": 0, "solves": 0, "r": math.nan, "r0": math.nan,
                      "hard_cases": 0}
        self._fresh: dict[str, Any] | None = None

    @classmethod
    def requirements(cls, options: Options) -> frozenset[str]:
        """``group_summary``; with ``lambda_int > 0`` also D3 from the estimator."""
        return cls.needs | ({SUMMARY_D3} if options.lambda_int > 0 else frozenset())

    def bind(self, estimator: Any, preconditioner: Any) -> None:
        pre = preconditioner
        if not callable(getattr(pre, "set_eta_rule", None)):
            raise IncompatibleError(
                f"{self.config_path or 'solver'}: solver 'cubic' needs a preconditioner that "
                f"computes η from a partition summary (set_eta_rule), such as 'partition'; "
                f"got {getattr(pre, 'name', type(pre).__name__)!r}")
        pre.set_eta_rule(self.solve)

    def solve(self, summary: Summary) -> tuple[Tensor | None, dict[str, Any]]:
        """The η rule run by the ``partition`` preconditioner on a fresh summary."""
        o = self.options
        sol = cubic_eta(summary.H, summary.g, summary.D3, o.lambda_int, d_floor=o.d_floor,
                        rtol=o.rtol, max_iters=o.max_iters, max_expansions=o.max_expansions,
                        where=self.config_path or "solver")
        hard = int(sol.status == "hard_case")
        self.state = {**self.state, "solves": int(self.state["solves"]) + 1,
                      "failures": int(self.state["failures"]) + int(sol.failed),
                      "hard_cases": int(self.state["hard_cases"]) + hard,
                      "r": sol.r, "r0": sol.r0}
        self._fresh = {"cubic_iters": sol.iters, "cubic_hard_case": hard,
                       "cubic_status": sol.status}
        return sol.eta, {"cubic_r": _num(sol.r), "cubic_r0": _num(sol.r0),
                         "cubic_iters": sol.iters, "cubic_failed": int(sol.failed)}

    def step(self, ctx: StepContext) -> StepResult:
        pre = ctx.preconditioner
        fresh, self._fresh = self._fresh, None
        info: dict[str, Any] = {"cubic_iters": 0, "cubic_hard_case": 0}
        if fresh is not None:
            info.update(fresh)
        info.update(cubic_r=_num(self.state["r"]), cubic_r0=_num(self.state["r0"]),
                    cubic_failures=int(self.state["failures"]))
        if not pre.eta_valid:
            info["cubic_failed"] = 1
            return StepResult([torch.zeros_like(g) for g in ctx.grads], -ctx.lr,
                              accepted=False, info=info)
        info["cubic_failed"] = 0
        info["cubic_eta"] = pre.eta()
        return StepResult(pre.apply(ctx.grads), -ctx.lr, info=info)


def _num(x: float) -> float | None:
    """JSON has no NaN: undefined numbers are reported as None."""
    return float(x) if math.isfinite(x) else None
