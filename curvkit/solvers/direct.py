"""``direct``: step = −lr · P⁻¹ g, with momentum and weight decay as in torch.optim.SGD."""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.options import option
from curvkit.params import FiniteLedger, _version, float_limits, max_abs
from curvkit.solvers.base import Solver, StepContext, StepResult


class DirectSolver(Solver):
    """Preconditioned gradient step −lr·P⁻¹g with SGD momentum and weight decay.

    With ``d = P⁻¹ g``, exactly the recursion of ``torch.optim.SGD`` on ``d``::

        d ← d + weight_decay · θ
        b ← d (first step),  b ← momentum · b + (1 − dampening) · d
        d ← d + momentum · b (nesterov)  or  d ← b
        θ ← θ − lr · d

    Nothing non-finite enters a momentum buffer: d is checked first, and the buffer's new
    largest magnitude is bounded before it is written, from a bound B of the old one,
    ``(momentum·B + |1 − dampening|·max|d|)·(1 + 4ε)`` (ε of the buffer's dtype: the
    rounding of the scalars and of the two operations). While that stays below the
    dtype's largest value the update is made in place, as SGD makes it, and the new bound
    is the one the optimizer's update check reads (no scan of the buffer: ~1.7 % of an
    SGD step on the MLP of ``benchmarks/bench_step.py``); otherwise the new buffer is
    computed aside and scanned, and a step whose buffer would overflow changes nothing.
    B is kept beside the buffer with its version counter; a buffer this solver did not
    leave as it is (a loaded state, a change from outside) is scanned once.
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
        # per buffer: (buffer, its version when this solver last wrote it, a bound of its
        # largest magnitude); a cache beside the state, not part of it
        self._bounds: list[tuple[Tensor, int, float] | None] = []

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._bounds = []  # the loaded buffers are scanned once; the old ones are let go

    def step(self, ctx: StepContext) -> StepResult:
        direction = ctx.preconditioner.apply(ctx.grads)
        ledger = ctx.finite if isinstance(ctx.finite, FiniteLedger) else FiniteLedger()
        dmax = ledger.max_abs(direction)
        if dmax is None:
            # checked before the momentum buffers absorb it
            return _nonfinite(direction, ctx.lr)
        groups = ctx.groups
        if not groups or len(groups) == 1:
            group = groups[0] if groups else {"lr": ctx.lr}
            momentum, dampening, weight_decay, nesterov = self._settings(group)
            if not weight_decay:
                if not momentum:
                    # the direction itself, at the group's lr (what SGD then applies)
                    return StepResult(list(direction), -group.get("lr", ctx.lr))
                if not nesterov:
                    bufs = self._momentum_in_place(direction, dmax, momentum, dampening,
                                                   ledger)
                    if bufs is not None:
                        return StepResult(bufs, -group.get("lr", ctx.lr))
        members = ctx.group_members()
        settings = [self._settings(group) for group, _ in members]
        out = list(direction)
        n = len(out)
        bufs = self.state["momentum_buffer"]
        if len(bufs) != n:
            bufs[:] = [None] * n
        if len(self._bounds) != n:
            self._bounds = [None] * n
        plans = []
        for (_, idx), setting in zip(members, settings):
            plan = self._plan(setting, idx, out, ctx.params, ledger)
            if plan is None:
                return _nonfinite(direction, ctx.lr)
            plans.append(plan)
        if not self._bound_buffers(plans):
            return _nonfinite(direction, ctx.lr)
        if len(members) == 1:  # idx is every parameter, in order
            new, dbound = self._apply(plans[0])
            ledger.remember(new, dbound)  # the update check reads these bounds, no scan
            return StepResult(list(new), -members[0][0].get("lr", ctx.lr))
        alphas: list[float] = [0.0] * n
        dbound: list[float] = [0.0] * n
        for (group, idx), plan in zip(members, plans):
            for i, t, m in zip(idx, *self._apply(plan)):
                out[i], dbound[i] = t, m
            a = -group.get("lr", ctx.lr)
            for i in idx:
                alphas[i] = a
        ledger.remember(out, dbound)
        return StepResult(out, -ctx.lr, alphas=alphas)

    def _momentum_in_place(self, direction: list[Tensor], dmax: list[float],
                           momentum: float, dampening: float,
                           ledger: FiniteLedger) -> list[Tensor] | None:
        """The common case of one group in one pass: every buffer exists and is as this
        solver left it (its bound holds), and no new bound reaches its dtype's largest
        value; then ``b ← momentum·b + (1 − dampening)·d`` in place, as :meth:`_apply`
        does, and the new bounds are recorded. None (nothing changed): the general path."""
        bufs, bounds = self.state["momentum_buffer"], self._bounds
        if len(bufs) != len(direction) or len(bounds) != len(bufs):
            return None
        keep = abs(1 - dampening)
        new = []
        try:
            for b, rec, g in zip(bufs, bounds, dmax):
                if rec is None or rec[0] is not b or rec[1] != b._version:
                    return None
                bound = _next_bound(rec[2], g, momentum, keep, b.dtype)
                if not bound <= float_limits(b.dtype)[0]:
                    return None
                new.append(bound)
        except RuntimeError:  # an inference tensor has no version counter
            return None
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, list(direction), alpha=1 - dampening)
        self._bounds = [(b, b._version, m) for b, m in zip(bufs, new)]
        ledger.remember(bufs, new)  # the update check reads these bounds, no scan
        return list(bufs)

    def _settings(self, group: dict) -> tuple[float, float, float, bool]:
        """(momentum, dampening, weight_decay, nesterov) of a group; options missing from
        the group (a context built by hand) come from the solver's own options."""
        o, get = self.options, group.get
        momentum, dampening = get("momentum", o.momentum), get("dampening", o.dampening)
        if get("nesterov", o.nesterov) and (momentum <= 0 or dampening != 0):
            raise ValueError("param group: nesterov requires momentum > 0 and dampening = 0 "
                             f"(got momentum={momentum}, dampening={dampening})")
        return momentum, dampening, get("weight_decay", o.weight_decay), \
            get("nesterov", o.nesterov)

    def _plan(self, setting: tuple[float, float, float, bool], idx: list[int], out: list,
              params: list, ledger: FiniteLedger) -> dict[str, Any] | None:
        """One group's directions after weight decay and their largest magnitudes (None: a
        non-finite direction)."""
        momentum, dampening, weight_decay, nesterov = setting
        d = [out[i] for i in idx]
        if weight_decay != 0:
            d = list(torch._foreach_add(d, [params[i].detach() for i in idx],
                                        alpha=weight_decay))
        dmax = ledger.max_abs(d)  # the direction's own scan, or weight decay's result
        if dmax is None:
            return None
        return {"idx": idx, "d": d, "dmax": dmax, "momentum": momentum,
                "dampening": dampening, "nesterov": nesterov}

    def _bound_buffers(self, plans: list[dict[str, Any]]) -> bool:
        """Each existing buffer's bound after this step (``plan['bound']``), before any is
        written; a buffer whose bound reaches its dtype's largest value is computed aside
        (``plan['aside']``) and scanned. False if a buffer is or would become non-finite
        (then no buffer has changed)."""
        bufs, bounds = self.state["momentum_buffer"], self._bounds
        mine = [i for plan in plans if plan["momentum"] for i in plan["idx"]]
        try:  # the bound this solver left on each buffer, if it is unchanged since
            unknown = [i for i in mine if (b := bufs[i]) is not None
                       and not ((rec := bounds[i]) is not None and rec[0] is b
                                and rec[1] == b._version)]
        except RuntimeError:  # an inference tensor has no version counter
            unknown = [i for i in mine if bufs[i] is not None]
        if unknown:  # a buffer this solver did not leave as it is: one scan
            found = max_abs([bufs[i] for i in unknown])
            if found is None:
                return False
            for i, m in zip(unknown, found):
                bounds[i] = (bufs[i], _version(bufs[i]), m)
        for plan in plans:
            momentum = plan["momentum"]
            if not momentum:
                continue
            keep = abs(1 - plan["dampening"])
            new, aside = [], {}
            for j, (i, g) in enumerate(zip(plan["idx"], plan["dmax"])):
                b = bufs[i]
                if b is None:
                    new.append(g)
                    continue
                bound = _next_bound(bounds[i][2], g, momentum, keep, b.dtype)  # type: ignore[index]
                if not bound <= float_limits(b.dtype)[0]:
                    # might overflow in place: compute aside and look
                    with torch.no_grad():
                        cand = torch.mul(b, momentum).add_(plan["d"][j],
                                                           alpha=1 - plan["dampening"])
                    exact = max_abs([cand])
                    if exact is None:
                        return False
                    aside[j], bound = cand, exact[0]
                new.append(bound)
            plan["bound"], plan["aside"] = new, aside
        return True

    def _apply(self, plan: dict[str, Any]) -> tuple[list[Tensor], list[float]]:
        """torch.optim.SGD's arithmetic (foreach=False, bitwise) on one group: its new
        directions (the buffers, or Nesterov's d + momentum·b) and bounds of their largest
        magnitudes; the buffers are updated in place and carry their bounds."""
        idx, d, momentum = plan["idx"], plan["d"], plan["momentum"]
        if not momentum:
            return d, plan["dmax"]
        bufs, bounds = self.state["momentum_buffer"], self._bounds
        aside = plan["aside"]
        b_all = [bufs[i] for i in idx]
        # SGD: the first step of a buffer copies d, later steps blend into it
        if not aside and not any(map(operator.is_, b_all, itertools.repeat(None))):
            torch._foreach_mul_(b_all, momentum)  # every buffer in place: the common case
            torch._foreach_add_(b_all, d, alpha=1 - plan["dampening"])
        else:
            old = [j for j, b in enumerate(b_all) if b is not None and j not in aside]
            if old:
                b = [b_all[j] for j in old]
                torch._foreach_mul_(b, momentum)
                torch._foreach_add_(b, [d[j] for j in old], alpha=1 - plan["dampening"])
            for j, cand in aside.items():
                b_all[j].copy_(cand)
            for j, i in enumerate(idx):
                if bufs[i] is None:
                    bufs[i] = b_all[j] = torch.clone(d[j]).detach()
        try:
            versions = [b._version for b in b_all]
        except RuntimeError:  # an inference tensor has no version counter: rescanned
            versions = [None] * len(b_all)
        for i, b, v, bound in zip(idx, b_all, versions, plan["bound"]):
            bounds[i] = (b, v, bound)
        if not plan["nesterov"]:
            return b_all, plan["bound"]
        # d + momentum·b: the same bound as the buffer's recursion, with the weight 1 on d
        nd = list(torch._foreach_add(d, b_all, alpha=momentum))
        return nd, [_next_bound(bound, g, momentum, 1.0, t.dtype)
                    for t, g, bound in zip(nd, plan["dmax"], plan["bound"])]


def _next_bound(bound: float, dmax: float, momentum: float, keep: float,
                dtype: torch.dtype) -> float:
    """A bound of ``max |momentum·b + keep·d|`` from bounds of ``max |b|`` and ``max |d|``
    (the buffer's recursion: ``keep`` = |1 − dampening|; Nesterov's d + momentum·b:
    ``keep`` = 1), the rounding of the scalars and of the two operations included."""
    return (momentum * bound + keep * dmax) * (1 + 4 * float_limits(dtype)[1])


def _nonfinite(direction: list[Tensor], lr: float) -> StepResult:
    return StepResult(list(direction), -lr, accepted=False, info={"nonfinite": 1})
