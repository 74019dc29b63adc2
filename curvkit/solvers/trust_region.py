"""``trust_region``: Newton-Krylov trust region (Steihaug-Toint truncated CG)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from curvkit.parts import MATVEC
from curvkit.solvers import _krylov as K
from curvkit.solvers.base import Solver, StepContext, StepResult


class TrustRegionSolver(Solver):
    """Newton-Krylov trust region: Steihaug-Toint CG on the estimator's curvature.

    Each step approximately solves

        min_p  m(p) = gᵀp + ½ pᵀ(C + λI)p   s.t.  ‖p‖_M ≤ Δ

    with g the gradient, C the estimator's curvature (only ``matvec`` is used, one product
    per CG iteration), λ the damping, M the preconditioner (CG is preconditioned with
    ``preconditioner.apply`` = M⁻¹ and the region is measured in ‖p‖_M = sqrt(pᵀMp)).
    CG stops on the boundary, on negative curvature (followed to the boundary), when
    ‖r‖_{M⁻¹} < tol (see ``cg_forcing``) or after ``max_iters`` products. The products go
    through one ``estimator.linearize(batch)`` operator per step, so the estimator's
    per-batch work (``hessian``: the forward pass and the gradient graph) is done once per
    step, not once per product.

    The trial point θ + lr·p is evaluated on the same batch (``ctx.loss_at``) and
    ρ = (L(θ) − L(θ + lr·p)) / (−m(lr·p)) drives Nocedal & Wright's Algorithm 4.1: accept if
    ρ > eta; shrink Δ ← shrink_factor·Δ if ρ < shrink_threshold; expand
    Δ ← min(expand_factor·Δ, max_radius) if ρ > expand_threshold and the step reached the
    boundary. With ``adapt_damping`` λ follows the Levenberg-Marquardt rule from the same ρ.
    A rejected step is returned with ``accepted=False``: the parameters stay bitwise
    unchanged. lr = 1 is the pure method; otherwise the step is lr·p (the returned direction,
    applied with alpha = 1, is exactly the update whose loss was evaluated).
    """

    name = "trust_region"
    needs = frozenset({MATVEC})

    @dataclass
    class Options(K.TrustRegionOptions):
        pass

    def __init__(self, options: Any | None = None) -> None:
        super().__init__(options)
        self.state = K.initial_state(self.options)

    def step(self, ctx: StepContext) -> StepResult:
        # C on this batch at this θ, made on the first product (none at a stationary point)
        # and shared by all attempts: θ does not move within a step (trial points go through
        # ctx.loss_at, a rejected attempt changes nothing), so the operator stays valid.
        ops: list[Any] = []

        def curvature(v: list) -> list:
            if not ops:
                ops.append(ctx.estimator.linearize(ctx.batch))
            return ops[0].matvec(v)

        info: dict[str, Any] = {}
        direction, alpha, accepted = trust_region_step(
            self.options, self.state, list(ctx.grads), curvature, ctx.preconditioner.apply,
            float(ctx.lr), float(ctx.loss), lambda d: float(ctx.loss_at(d)), info)
        return self._result(ctx, direction, alpha, accepted, info)

    def _result(self, ctx: StepContext, direction: list, alpha: float, accepted: bool,
                info: dict[str, Any]) -> StepResult:
        info["accepted"] = bool(accepted)
        return StepResult(direction, alpha, accepted, info)


def trust_region_step(o: Any, st: dict[str, Any], grads: list[Tensor],
                      curvature: Callable[[list[Tensor]], Sequence[Tensor]],
                      precond: Callable[[list[Tensor]], Sequence[Tensor]] | None, lr: float,
                      loss0: float, trial_loss: Callable[[list[Tensor]], float],
                      info: dict[str, Any]) -> tuple[list[Tensor], float, bool]:
    """One outer step of Nocedal & Wright's Algorithm 4.1 on any curvature operator.

    Solves min gᵀp + ½pᵀ(C + λI)p within ‖p‖_M ≤ Δ by Steihaug CG (``curvature`` v ↦ Cv,
    ``precond`` M⁻¹), evaluates ``trial_loss(lr·p)``, and updates Δ (and λ) in ``st`` with
    the shared rule :func:`~curvkit.solvers._krylov.update_radius`; after a rejection it
    re-solves up to ``o.retries`` times. ``trust_region`` drives it with the estimator's
    curvature, ``varpro`` with its reduced Gauss-Newton operator. Returns
    ``(direction, alpha, accepted)`` (at a stationary point a zero step with alpha 0);
    ``info`` receives the step's report.
    """
    def tol(gnorm: float) -> float:  # gnorm = ‖g‖_{M⁻¹}, from CG's first preconditioning
        return K.cg_tolerance(gnorm, o.cg_tol, o.cg_forcing)

    info.update(cg_iters=0, matvecs=0, attempts=0)
    direction: list[Tensor] = K.zeros_like(grads)
    for attempt in range(o.retries + 1):
        lam = st["damping"]
        radius = st["radius"]

        cg = K.steihaug_cg(grads, curvature, precond, radius, o.max_iters, tol, shift=lam)
        info["cg_iters"] += cg.iters
        info["matvecs"] += cg.matvecs
        info["attempts"] = attempt + 1
        st["matvecs"] += cg.matvecs
        st["cg_iters"] += cg.iters
        info.update(stop=cg.stop, radius=radius, damping=lam, step_norm=cg.norm)
        if cg.stop == "zero_gradient":
            # a stationary point: nothing to do, the (zero) step changes nothing
            info.update(rho=math.nan, predicted=0.0, actual=0.0, radius_next=radius)
            return cg.step, 0.0, True
        # the applied update is exactly the evaluated one: direction lr·p, alpha 1
        direction = K.scale(lr, cg.step)
        predicted = -cg.model(lr)
        trial = float(trial_loss(direction))
        actual = loss0 - trial
        rho = K.ratio(actual, predicted)
        accepted = K.update_radius(o, st, rho, cg.hit_boundary)
        info.update(rho=rho, predicted=predicted, actual=actual, trial_loss=trial,
                    radius_next=st["radius"], damping_next=st["damping"])
        if accepted:
            return direction, 1.0, True
    return direction, 1.0, False
