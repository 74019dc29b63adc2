"""``direct``: step = −lr · P⁻¹ g, with momentum and weight decay as in torch.optim.SGD."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from curvkit.options import option
from curvkit.solvers.base import Solver, StepContext, StepResult


class Direct(Solver):
    """Preconditioned gradient step −lr·P⁻¹g with SGD momentum and weight decay.

    With ``d = P⁻¹ g``, exactly the recursion of ``torch.optim.SGD`` on ``d``::

        d ← d + weight_decay · θ
        b ← d (first step),  b ← momentum · b + (1 − dampening) · d
        d ← d + momentum · b (nesterov)  or  d ← b
        θ ← θ − lr · d
    """

    name = "direct"

    @dataclass
    class Options:
        momentum: float = option(0.0, "heavy-ball momentum (torch.optim.SGD semantics)",
                                 min=0.0)
        dampening: float = option(0.0, "dampening of the momentum buffer", min=0.0, max=1.0)
        weight_decay: float = option(0.0, "L2 penalty added to the preconditioned direction",
                                     min=0.0)
        nesterov: bool = option(False, "Nesterov momentum")

        def __post_init__(self) -> None:
            if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
                raise ValueError("nesterov: requires momentum > 0 and dampening = 0")

    def __init__(self, options: Options | None = None) -> None:
        super().__init__(options)
        self.state = {"momentum_buffer": []}

    def step(self, ctx: StepContext) -> StepResult:
        o = self.options
        direction = ctx.preconditioner.apply(ctx.grads)
        if not ctx.finite(direction):
            # checked before the momentum buffers absorb it
            return StepResult(list(direction), -ctx.lr, accepted=False,
                              info={"nonfinite": 1})
        # the arithmetic of torch.optim.SGD (foreach=False), one call over all tensors
        out = list(direction)
        if o.weight_decay != 0:
            out = list(torch._foreach_add(out, [p.detach() for p in ctx.params],
                                          alpha=o.weight_decay))
        if o.momentum != 0:
            bufs = self.state["momentum_buffer"]
            if not bufs:
                bufs.extend(torch.clone(d).detach() for d in out)
            else:
                torch._foreach_mul_(bufs, o.momentum)
                torch._foreach_add_(bufs, out, alpha=1 - o.dampening)
            out = list(torch._foreach_add(out, bufs, alpha=o.momentum)) if o.nesterov \
                else list(bufs)
        return StepResult(out, -ctx.lr)
