"""``trust_region``: Newton-Krylov trust region (Steihaug-Toint truncated CG)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from curvkit.parts import MATVEC
from curvkit.solvers import _krylov as K
from curvkit.solvers.base import Solver, StepContext, StepResult


class TrustRegion(Solver):
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
        o = self.options
        st = self.state
        lr = float(ctx.lr)
        grads = list(ctx.grads)
        precond = ctx.preconditioner.apply

        def tol(gnorm: float) -> float:  # gnorm = ‖g‖_{M⁻¹}, from CG's first preconditioning
            return K.cg_tolerance(gnorm, o.cg_tol, o.cg_forcing)

        loss0 = float(ctx.loss)
        info: dict[str, Any] = {"cg_iters": 0, "matvecs": 0, "attempts": 0}
        # C on this batch at this θ, made on the first product (none at a stationary point)
        # and shared by all attempts: θ does not move within a step (trial points go through
        # ctx.loss_at, a rejected attempt changes nothing), so the operator stays valid.
        ops: list[Any] = []

        def curvature(v: list) -> list:
            if not ops:
                ops.append(ctx.estimator.linearize(ctx.batch))
            return ops[0].matvec(v)

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
                return self._result(ctx, cg.step, 0.0, True, info)
            # the applied update is exactly the evaluated one: direction lr·p, alpha 1
            direction = K.scale(lr, cg.step)
            predicted = -cg.model(lr)
            trial = float(ctx.loss_at(direction))
            actual = loss0 - trial
            rho = K.ratio(actual, predicted)
            accepted = K.update_radius(o, st, rho, cg.hit_boundary)
            info.update(rho=rho, predicted=predicted, actual=actual, trial_loss=trial,
                        radius_next=st["radius"], damping_next=st["damping"])
            if accepted:
                return self._result(ctx, direction, 1.0, True, info)
        return self._result(ctx, direction, 1.0, False, info)

    def _result(self, ctx: StepContext, direction: list, alpha: float, accepted: bool,
                info: dict[str, Any]) -> StepResult:
        info["accepted"] = bool(accepted)
        # work in network passes: gradient (forward + backward), 2 per curvature product,
        # 1 per loss evaluation
        info["work"] = 2 + 2 * info["matvecs"] + ctx.evaluations
        return StepResult(direction, alpha, accepted, info)
