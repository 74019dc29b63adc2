"""``diagonal``: P = (ρ(ŝ) + δ)^p elementwise, ŝ a running average of the curvature diagonal."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

from curvkit.options import option
from curvkit.params import check_like
from curvkit.parts import DIAGONAL
from curvkit.preconditioners._running import blend, ema_weight, rectify, working_dtype
from curvkit.preconditioners.base import Preconditioner


class DiagonalPreconditioner(Preconditioner):
    """Elementwise scaling by the curvature diagonal: d ↦ d / (ρ(ŝ) + damping)^power.

    ``ŝ`` (shaped like each parameter) is the running average of ``estimator.diagonal``
    (see :mod:`curvkit.preconditioners._running` for ``ema`` and ``bias_correction``),
    ρ makes it non-negative (``negative``: |ŝ| or max(ŝ, 0); GGN, Fisher and
    empirical-Fisher diagonals are non-negative already, a Hessian diagonal need not be).
    The damping is added *inside* the power: with ``power = 0.5`` the denominator is
    √(ŝ + δ), Adam's √ŝ + ε corresponds to δ ≈ ε². ``power = 1`` is a diagonal Newton /
    natural-gradient step, ``power = 0.5`` the Adam-like square root, ``power = 0`` the
    identity.

    Statistics are kept in the parameter dtype, promoted to float32 for bfloat16/float16.
    """

    name = "diagonal"
    needs = frozenset({DIAGONAL})

    @dataclass
    class Options:
        power: float = option(1.0, "exponent p in d / (ρ(ŝ) + damping)^p: 1 Newton-like, "
                                   "0.5 Adam-like square root", min=0.0)
        damping: float = option(1e-3, "δ added to the (rectified) diagonal before the power",
                                min=0.0)
        ema: float = option(0.0, "running average s ← ema·s + (1−ema)·new; 0 = no averaging",
                            min=0.0, max=1.0)
        bias_correction: bool = option(True, "divide the average by 1 − emaᵗ as Adam does "
                                             "(False: the first statistic initialises it)")
        negative: Literal["abs", "clip"] = option(
            "abs", "how negative diagonal entries are treated: |s| or max(s, 0)")
        update_every: int = option(1, "refresh the statistic every T steps", min=1)

        def __post_init__(self) -> None:
            if self.ema >= 1.0:
                raise ValueError("ema: must be < 1 (ema = 1 would never take in a statistic)")

    def update(self, estimator: Any, batch: Any, grads: Sequence[Tensor]) -> None:
        new = estimator.diagonal(batch)
        params = self.params
        check_like(new, params, what=f"{type(estimator).__name__}.diagonal(batch)")
        o = self.options
        count = int(self.state.get("updates", 0)) + 1
        w = ema_weight(count, o.ema, o.bias_correction)
        old = self.state.get("diag")
        stats = [blend(None if old is None else old[i],
                       n.detach().to(working_dtype(p.dtype)), w)
                 for i, (n, p) in enumerate(zip(new, params))]
        self.state["diag"] = stats
        self.state["updates"] = count

    def apply(self, direction: Sequence[Tensor]) -> list[Tensor]:
        stats = self.state.get("diag")
        if stats is None:
            raise RuntimeError("preconditioner 'diagonal': apply() before the first update()")
        check_like(direction, stats, what="direction")
        o = self.options
        out = []
        for d, s in zip(direction, stats):
            denom = rectify(s, o.negative) + o.damping
            if o.power != 1.0:
                denom = denom.pow(o.power)
            out.append((d.to(s.dtype) / denom).to(d.dtype))
        return out

    def info(self) -> dict[str, Any]:
        stats = self.state.get("diag")
        if not stats:
            return {}
        return {"diagonal_min": min(float(s.min()) for s in stats),
                "diagonal_max": max(float(s.max()) for s in stats)}
