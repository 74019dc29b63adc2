"""``direct``: step = −lr · P⁻¹ g, with momentum and weight decay as in torch.optim.SGD."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from curvkit.options import option
from curvkit.params import all_finite
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
        if not all_finite(direction):
            # checked before the momentum buffers absorb it
            return StepResult(list(direction), -ctx.lr, accepted=False,
                              info={"nonfinite": 1})
        bufs = self.state["momentum_buffer"]
        if o.momentum != 0 and not bufs:
            bufs.extend([None] * len(direction))
        out = []
        for i, (p, d) in enumerate(zip(ctx.params, direction)):
            if o.weight_decay != 0:
                d = d.add(p.detach(), alpha=o.weight_decay)
            if o.momentum != 0:
                buf = bufs[i]
                if buf is None:
                    buf = torch.clone(d).detach()
                    bufs[i] = buf
                else:
                    buf.mul_(o.momentum).add_(d, alpha=1 - o.dampening)
                d = d.add(buf, alpha=o.momentum) if o.nesterov else buf
            out.append(d)
        return StepResult(out, -ctx.lr)
