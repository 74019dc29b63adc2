"""``direct``: step = −lr · P⁻¹ g, with momentum and weight decay as in torch.optim.SGD."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from curvkit.options import option
from curvkit.solvers.base import Solver, StepContext, StepResult


class DirectSolver(Solver):
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

    # every option is per parameter group (param_groups[i]["momentum"], ...), so LR and
    # momentum schedulers (OneCycleLR, CyclicLR with cycle_momentum) reach the step
    group_options = ("momentum", "dampening", "weight_decay", "nesterov")
    per_group_lr = True
    needs_batch = False
    applications_per_step = 1  # one P⁻¹ g per step

    def __init__(self, options: Options | None = None) -> None:
        super().__init__(options)
        # one entry per parameter (None until its group first has momentum)
        self.state = {"momentum_buffer": []}

    def step(self, ctx: StepContext) -> StepResult:
        direction = ctx.preconditioner.apply(ctx.grads)
        if not ctx.finite(direction):
            # checked before the momentum buffers absorb it
            return StepResult(list(direction), -ctx.lr, accepted=False,
                              info={"nonfinite": 1})
        out = list(direction)
        bufs = self.state["momentum_buffer"]
        if len(bufs) != len(out):
            bufs[:] = [None] * len(out)
        members = ctx.group_members()
        alphas: list[float] = [0.0] * len(out)
        for group, idx in members:
            self._group_step(group, idx, out, ctx.params, bufs)
            for i in idx:
                alphas[i] = -group.get("lr", ctx.lr)
        if len(members) == 1:
            return StepResult(out, alphas[0] if out else -ctx.lr)
        return StepResult(out, -ctx.lr, alphas=alphas)

    def _group_step(self, group: dict, idx: list[int], out: list, params: list, bufs: list
                    ) -> None:
        """The arithmetic of torch.optim.SGD (foreach=False) on one group's directions,
        in place in ``out`` (one call over the group's tensors). Options missing from the
        group (a context built by hand) come from the solver's own options."""
        o = self.options
        momentum, dampening, weight_decay, nesterov = (
            group.get(k, getattr(o, k)) for k in self.group_options)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("param group: nesterov requires momentum > 0 and dampening = 0 "
                             f"(got momentum={momentum}, dampening={dampening})")
        d = [out[i] for i in idx]
        if weight_decay != 0:
            d = list(torch._foreach_add(d, [params[i].detach() for i in idx],
                                        alpha=weight_decay))
        if momentum != 0:
            # SGD: the first step of a buffer copies d, later steps blend into it
            old = [j for j, i in enumerate(idx) if bufs[i] is not None]
            if old:
                b = [bufs[idx[j]] for j in old]
                torch._foreach_mul_(b, momentum)
                torch._foreach_add_(b, [d[j] for j in old], alpha=1 - dampening)
            for j, i in enumerate(idx):
                if bufs[i] is None:
                    bufs[i] = torch.clone(d[j]).detach()
            b_all = [bufs[i] for i in idx]
            d = list(torch._foreach_add(d, b_all, alpha=momentum)) if nesterov else b_all
        for i, t in zip(idx, d):
            out[i] = t
