"""``fd_hessian``: Hessian-vector products by central differences of gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch

import curvkit
from curvkit.params import flatten


class FiniteDifferenceHessian(curvkit.CurvatureEstimator):
    """Hessian-vector products by central differences of two gradients (no double backward).

        H v ≈ (∇L(θ + h v) − ∇L(θ − h v)) / (2h),   h = eps · (1 + ‖θ‖) / ‖v‖

    The truncation error is O(h²) times the third derivative and the rounding error
    O(machine eps / h), balanced by eps ≈ (machine eps)^(1/3) — the default, per dtype.
    The step h is relative to the sizes of θ and v, so the result is linear in v. Two
    gradient evaluations per product; usable with models whose operations have no second
    derivative.
    """

    name = "fd_hessian"

    @dataclass
    class Options:
        eps: float | None = curvkit.option(
            None, "relative finite-difference step; default (machine eps of the dtype)^(1/3)",
            min=0.0)

        def __post_init__(self) -> None:
            if self.eps is not None and self.eps == 0.0:
                raise ValueError("eps: must be > 0")

    def _matvec(self, X, y, v):
        params = [p.detach() for p in self.params]
        v_norm = float(flatten(v).norm())
        if v_norm == 0.0:
            return [torch.zeros_like(t) for t in v]
        eps = self.options.eps
        if eps is None:
            eps = torch.finfo(params[0].dtype).eps ** (1.0 / 3.0)
        h = eps * (1.0 + float(flatten(params).norm())) / v_norm
        loss = self.loss_fn_of_params(X, y)

        def grad_at(sign: float):
            shifted = [(p + sign * h * t).requires_grad_(True) for p, t in zip(params, v)]
            with torch.enable_grad():
                return torch.autograd.grad(loss(shifted), shifted)

        plus, minus = grad_at(1.0), grad_at(-1.0)
        return [(a - b) / (2.0 * h) for a, b in zip(plus, minus)]
