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
from curvkit.parts import GROUP_SUMMARY, SUMMARY_D3, GroupSummary
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
    d: Tensor | None = None  # the diagonal of D used (after the floor), float64

    @property
    def failed(self) -> bool:
        return self.eta is None


def _fail(why: str, r0: float = math.nan, iters: int = 0) -> CubicSolution:
    return CubicSolution(None, math.nan, r0, iters, f"failed: {why}")


def cubic_model(eta: Tensor, H: Tensor, g: Tensor, d: Tensor, lambda_int: float) -> Tensor:
    """T(η) = −ηᵀḡ + ½ηᵀH̄η + (λ_int/6)‖Dη‖³ with D = Diag(d)."""
    return -eta @ g + 0.5 * eta @ H @ eta + lambda_int / 6.0 * torch.linalg.norm(d * eta) ** 3


# Where H̄_ss = 0 (or ḡ = 0) the invariant floor is undefined; there D is floored relative to
# its largest entry (not invariant, but such a group has no curvature along u).
FALLBACK_FLOOR = 1e-4


def third_order_scale(D3: Tensor, H: Tensor, g: Tensor, d_floor: float) -> Tensor:
    """d_s = max(|D3_s|^{1/3}, f·|H̄_ss|^{1/2}·ν^{−1/6}), ν = Σ_t ḡ_t²/|H̄_tt| (over H̄_tt ≠ 0),
    f = ``d_floor``.

    The floor scales like d_s itself. Under u_s ↦ c_s u_s (a per-group affine
    reparameterisation) ḡ_s ↦ c_s ḡ_s, H̄_st ↦ c_s c_t H̄_st, D3_s ↦ c_s³ D3_s: |D3_s|^{1/3}
    and |H̄_ss|^{1/2} scale by |c_s| and ν (the diagonal model's decrease, a loss scale) is
    unchanged. Under L ↦ kL, |D3_s|^{1/3} scales by k^{1/3}, and so does
    |H̄_ss|^{1/2}ν^{−1/6} = k^{1/2}k^{−1/6}. The step is therefore invariant with the floor
    active. At a group's own Newton step η_s = ḡ_s/H̄_ss the floored cubic term is at most
    f³λ/3 times the quadratic one, and it stays bounded as ḡ_s → 0 (f·(H̄_ss²/|ḡ_s|)^{1/3}
    has the same scaling but grows without bound there). Where H̄_ss = 0 or ν = 0 the floor
    is FALLBACK_FLOOR·max_t d_t (and d = 1 if that is 0 too)."""
    d = D3.double().abs().pow(1.0 / 3.0)
    Hd, g = torch.diagonal(H).double().abs(), g.double()
    curved = Hd > 0
    nu = float((g * g / torch.where(curved, Hd, 1.0))[curved].sum())
    defined = curved & (nu > 0.0)
    if nu > 0.0:
        d = torch.maximum(d, d_floor * Hd.sqrt() * nu ** (-1.0 / 6.0))
    top = float(d.max()) if d.numel() else 0.0
    fallback = FALLBACK_FLOOR * top if top > 0.0 else 1.0
    return torch.where(defined, d, d.clamp(min=fallback))


def cubic_eta(H: Tensor, g: Tensor, D3: Tensor | None, lambda_int: float, *,
              d_floor: float = 0.1, rtol: float = 1e-12, max_iters: int = 100,
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

    D's entries are floored invariantly (:func:`third_order_scale`). ``lambda_int = 0``
    or D3 = 0 (a quadratic model along u): η = H̄⁻¹ḡ; an H̄ that is not positive definite raises
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
    d = third_order_scale(D3, H, g, d_floor) if D3 is not None else None

    if lambda_int == 0.0 or (D3 is not None and not bool((D3 != 0).any())):
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
        return _finite(CubicSolution(eta, r, 0.0, 0, status, d))
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
        return CubicSolution(torch.zeros_like(g), 0.0, 0.0, 0, "zero", d)
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
                return _finite(CubicSolution(xi / d, r0, r0, 0, "hard_case", d))

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
    return _finite(CubicSolution(xi / d, r0 + s, r0, iters, "root", d))


def _finite(sol: CubicSolution) -> CubicSolution:
    if sol.eta is not None and not bool(torch.isfinite(sol.eta).all()):
        return _fail("non-finite η", sol.r0, sol.iters)
    return sol


class CubicSolver(Solver):
    """Anisotropic Nesterov cubic regularization of the partition step (Wolinski, Method 1).

    η = argmin −ηᵀḡ + ½ηᵀH̄η + (λ_int/6)‖Dη‖³, D = Diag(d), d_s = |D3_s|^{1/3} floored
    invariantly (:func:`third_order_scale`), i.e. the largest-norm solution of
    η = (H̄ + (λ_int/2)‖Dη‖ D²)⁻¹ ḡ, found as a scalar root in float64 (:func:`cubic_eta`);
    the step is θ ← θ − lr · Σ_s η_s u_s. The solver reads the preconditioner's
    ``group_summary(grads)`` (typed data: ḡ, H̄, D3, its version, this step's u and the
    group ids), computes η when the summary is new (averaged over summaries with the
    provider's ``eta_ema``) and forms the step itself.

    **Safeguard** (adaptive cubic regularisation, Cartis, Gould & Toint 2011): the step's
    actual reduction on the step's batch, L(θ) − L(θ − lr Σ η_s u_s) (one forward pass), is
    compared with the reduction the model predicts for it,
    lr ηᵀḡ − ½lr² ηᵀH̄η − (λ/6) lr³‖Dη‖³ with ḡ = u_sᵀ∇L of this step's gradient. With
    ρ = actual / predicted: ρ < ``accept_ratio`` rejects the trial and multiplies λ by
    ``lambda_factor``, η is re-solved from the same summary and tried again (at most
    ``retries`` times, then the step is skipped); ρ ≥ ``very_successful`` divides λ by
    ``lambda_factor`` (not below min(lambda_min, the configured λ_int)). Every quantity in
    ρ is invariant under per-group affine reparameterisation, so is the safeguard.

    A failed root find skips the step (``accepted = False``, ``info["cubic_failed"] = 1``),
    counted in ``state["failures"]``; a step is never NaN. Reported per step: ``cubic_eta``,
    ``cubic_r`` (‖Dη‖), ``cubic_r0``, ``cubic_iters``, ``cubic_status``, ``cubic_lambda``,
    ``cubic_rho``, ``cubic_rejections`` (rejected trials of this step), ``cubic_floored``
    (groups whose d is the floor), ``cubic_failed``, ``cubic_failures``,
    ``cubic_hard_case``.
    """

    name = "cubic"
    needs = frozenset({GROUP_SUMMARY})

    @dataclass
    class Options:
        lambda_int: float = option(1.0, "λ_int, the strength of the cubic term (the initial "
                                        "value when the safeguard adapts it); 0 gives the "
                                        "plain step η = H̄⁻¹ḡ (H̄ must then be positive "
                                        "definite)", min=0.0)
        d_floor: float = option(0.1, "f in d_s ≥ f·|H̄_ss|^{1/2}·(Σ_t ḡ_t²/|H̄_tt|)^{-1/6}: "
                                     "a floor of D's entries that scales like d_s "
                                     "(invariant), so that D⁻¹ exists where D3 ≈ 0",
                                min=0.0, max=10.0)
        rtol: float = option(1e-12, "relative tolerance on r of the root finder", min=0.0,
                             min_exclusive=True)
        max_iters: int = option(100, "cap on ψ evaluations of the root finder", min=1)
        max_expansions: int = option(60, "cap on doublings of the bracket's upper end",
                                     min=0)
        safeguard: bool = option(True, "ARC acceptance test: compare the actual and the "
                                       "predicted reduction on the step's batch (one forward "
                                       "pass per trial), reject and raise λ_int or accept "
                                       "and lower it")
        accept_ratio: float = option(0.1, "accept a trial when actual/predicted ≥ this",
                                     min=0.0, max=1.0, min_exclusive=True)
        very_successful: float = option(0.9, "lower λ_int when actual/predicted ≥ this",
                                        min=0.0, max=1.0)
        lambda_factor: float = option(2.0, "λ_int ← λ_int·factor on rejection, /factor on "
                                           "a very successful step", min=1.0,
                                      min_exclusive=True)
        lambda_min: float = option(1e-3, "λ_int is not lowered below min(lambda_min, the "
                                         "configured lambda_int); a rejection raises "
                                         "λ_int = 0 to lambda_min", min=0.0, min_exclusive=True)
        retries: int = option(3, "re-solve with the raised λ_int on the same batch up to "
                                 "this many times before skipping the step", min=0)

        def __post_init__(self) -> None:
            if self.lambda_int > 0.0 and self.d_floor <= 0.0:
                raise ValueError("d_floor: must be > 0 when lambda_int > 0 (D must be "
                                 "invertible)")
            if self.very_successful < self.accept_ratio:
                raise ValueError(f"very_successful: must be >= accept_ratio "
                                 f"({self.accept_ratio}), got {self.very_successful}")

    def __init__(self, options: Options | None = None) -> None:
        super().__init__(options)
        self.state = {"failures": 0, "solves": 0, "r": math.nan, "r0": math.nan,
                      "hard_cases": 0, "lambda": float(self.options.lambda_int),
                      "version": -1, "rejections": 0, "skipped": 0}

    @classmethod
    def requirements(cls, options: Options) -> frozenset[str]:
        """``group_summary``; with ``lambda_int > 0`` also D3 from the estimator."""
        return cls.needs | ({SUMMARY_D3} if options.lambda_int > 0 else frozenset())

    def bind(self, estimator: Any, preconditioner: Any) -> None:
        pre = preconditioner
        if not callable(getattr(pre, "group_summary", None)):
            raise IncompatibleError(
                f"{self.config_path or 'solver'}: solver 'cubic' needs a preconditioner with "
                f"the group_summary capability, such as 'partition'; got "
                f"{getattr(pre, 'name', type(pre).__name__)!r}")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # a checkpoint from before the safeguard lacks its keys: start them fresh
        self.state = {**type(self)(self.options).state, **dict(state)}

    # ------------------------------------------------------------------ η
    def solve(self, summary: GroupSummary | Summary, lambda_int: float | None = None
              ) -> CubicSolution:
        """η from a summary (g, H, D3) at ``lambda_int`` (default: the current λ)."""
        o = self.options
        lam = float(self.state["lambda"]) if lambda_int is None else lambda_int
        sol = cubic_eta(summary.H, summary.g, summary.D3, lam, d_floor=o.d_floor,
                        rtol=o.rtol, max_iters=o.max_iters, max_expansions=o.max_expansions,
                        where=self.config_path or "solver")
        self.state = {**self.state, "solves": int(self.state["solves"]) + 1,
                      "failures": int(self.state["failures"]) + int(sol.failed),
                      "hard_cases": int(self.state["hard_cases"]) +
                      int(sol.status == "hard_case"), "r": sol.r, "r0": sol.r0}
        return sol

    def predicted_reduction(self, summary: GroupSummary, eta: Tensor, g_now: Tensor,
                            d: Tensor | None, lr: float, lambda_int: float) -> float:
        """m(0) − m(lr·η) = lr ηᵀḡ − ½lr² ηᵀH̄η − (λ/6) lr³‖Dη‖³ (float64)."""
        tau = lr * eta
        pred = float(tau @ g_now - 0.5 * tau @ summary.H.double() @ tau)
        if d is not None:
            pred -= lambda_int / 6.0 * float(torch.linalg.norm(d * tau)) ** 3
        return pred

    # ------------------------------------------------------------------ the step
    def step(self, ctx: StepContext) -> StepResult:
        o = self.options
        s: GroupSummary = ctx.preconditioner.group_summary(ctx.grads)
        st = dict(self.state)
        lam = float(st["lambda"])
        fresh = s.version != st["version"] or st.get("eta") is None
        # the running average's base: the average before this summary's η is folded in
        base = st.get("eta") if fresh else st.get("base")
        info: dict[str, Any] = {"cubic_iters": 0, "cubic_hard_case": 0, "cubic_rejections": 0}
        lr = float(ctx.lr)
        g_now = s.along_u(ctx.grads) if o.safeguard else None
        eta = None if fresh else st["eta"]
        d = None
        rejections = 0
        while True:
            if eta is None:
                sol = self.solve(s, lam)
                info.update(cubic_iters=info["cubic_iters"] + sol.iters,
                            cubic_status=sol.status,
                            cubic_hard_case=int(sol.status == "hard_case"))
                if sol.failed:
                    return self._skip(ctx, info, failed=True)
                # the model the solve minimised: quadratic when λ = 0 or D3 = 0
                d = None if sol.status in ("newton", "no_third_order") else sol.d
                eta = _blend(base, sol.eta, s.eta_ema)
                solved = True
            else:
                solved = False
                if d is None and s.D3 is not None and lam > 0.0 and bool(s.D3.any()):
                    d = third_order_scale(s.D3, s.H, s.g, o.d_floor)
            direction = s.combine(eta)
            if not o.safeguard or not math.isfinite(lr):
                break
            pred = self.predicted_reduction(s, eta, g_now, d, lr, lam)
            if pred == 0.0 and not bool(eta.any()):
                info["cubic_rho"] = None  # a zero step: nothing to test
                break
            actual = float(ctx.loss) - float(ctx.loss_at([-lr * t for t in direction]))
            rho = actual / pred if pred > 0.0 else -math.inf
            rho = rho if math.isfinite(rho) else -math.inf
            info["cubic_rho"] = _num(rho)
            if rho >= o.accept_ratio:
                if rho >= o.very_successful:
                    lam = max(lam / o.lambda_factor, min(o.lambda_min, o.lambda_int))
                    if lam < o.lambda_min and o.lambda_int == 0.0:
                        lam = 0.0
                break
            rejections += 1
            if s.D3 is not None:
                lam = max(lam * o.lambda_factor, o.lambda_min)
            if rejections > o.retries or s.D3 is None:
                self.state = {**self.state, "lambda": lam,
                              "rejections": int(self.state["rejections"]) + rejections}
                info.update(cubic_rejections=rejections, cubic_lambda=lam)
                return self._skip(ctx, info, failed=False)
            if not fresh and not solved:
                base = st.get("base")  # re-solve this summary: the base before its fold
            eta = None
        new_state = {**self.state, "lambda": lam,
                     "rejections": int(self.state["rejections"]) + rejections}
        if solved:
            new_state.update(eta=eta, base=base, version=s.version)
        self.state = new_state
        if d is not None and s.D3 is not None:
            info["cubic_floored"] = int((d > s.D3.double().abs().pow(1.0 / 3.0)).sum())
        info.update(cubic_rejections=rejections, cubic_lambda=lam, cubic_failed=0,
                    cubic_eta=[float(v) for v in eta], cubic_r=_num(self.state["r"]),
                    cubic_r0=_num(self.state["r0"]),
                    cubic_failures=int(self.state["failures"]))
        return StepResult(direction, -lr, info=info)

    def _skip(self, ctx: StepContext, info: dict[str, Any], failed: bool) -> StepResult:
        self.state = {**self.state, "skipped": int(self.state["skipped"]) + 1}
        info.update(cubic_failed=int(failed), cubic_r=_num(self.state["r"]),
                    cubic_r0=_num(self.state["r0"]),
                    cubic_failures=int(self.state["failures"]),
                    cubic_lambda=float(self.state["lambda"]))
        return StepResult([torch.zeros_like(g) for g in ctx.grads], -float(ctx.lr),
                          accepted=False, info=info)


def _blend(base: Tensor | None, new: Tensor, beta: float) -> Tensor:
    """β·base + (1 − β)·new; the first η is taken as is."""
    if base is None or beta == 0.0:
        return new
    return beta * base.to(new) + (1.0 - beta) * new

def _num(x: float) -> float | None:
    """JSON has no NaN: undefined numbers are reported as None."""
    return float(x) if math.isfinite(x) else None
