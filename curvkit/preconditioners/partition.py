"""``partition``: per-group learning rates from Wolinski's partition summary."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvkit import partitions
from curvkit.errors import StepError
from curvkit.estimators.base import Summary
from curvkit.options import option
from curvkit.params import check_like
from curvkit.parts import GROUP_SUMMARY, SUMMARY, GroupSummary
from curvkit.preconditioners._running import blend, ema_weight
from curvkit.preconditioners.base import Preconditioner

# info() carries the S×S pseudo-Hessian and the group names only up to this S, so that a
# per-step log of a discrete partition does not grow with P².
INFO_MAX_GROUPS = 64


def plain_eta(summary: Summary) -> Tensor | None:
    """η = H̄⁻¹ ḡ in float64 (H̄ already damped); None if H̄ is exactly singular."""
    H, g = summary.H.double(), summary.g.double()
    try:
        return torch.linalg.solve(H, g)
    except RuntimeError:  # exactly singular: LinAlgError
        return None


class PartitionPreconditioner(Preconditioner):
    """Per-group learning rates η from the S×S partition summary (Wolinski).

    For a partition of the parameters into S groups and a direction u (the gradient, or
    another preconditioner's output P⁻¹g), with u_s = u restricted to group s, the
    estimator's ``summary`` gives ḡ_s = u_sᵀ∇L, H̄_st = u_sᵀ C u_t and D3_s = ∇³L[u_s,u_s,u_s].
    The second-order model of φ(η) = L(θ − Σ_s η_s u_s) is −ηᵀḡ + ½ηᵀH̄η, minimized by

        η = (H̄ + damping·I)⁻¹ ḡ,     apply(d) = Σ_s η_s u_s(d),

    so ``direct``'s step −lr·apply(g) is Wolinski's eq. (8) step (damping = 0). The trivial
    partition (S = 1) gives Cauchy's steepest descent, the discrete one (S = P) Newton's.
    ``group_summary(grads)`` hands the summary, this step's u and the group ids to a solver
    as a typed :class:`~curvkit.parts.GroupSummary`; the ``cubic`` solver computes its
    anisotropic cubic-regularized η from it and forms the step itself.

    η is recomputed every ``update_every`` steps (the summary is then measured along the
    current u); between recomputations the stored η scales the current direction.

    ``diagonal_only``: η is computed from Diag(H̄) in place of H̄ (by the plain solve, then
    η_s = ḡ_s / (H̄_ss + damping), or by the cubic solver through group_summary), i.e. the
    interactions between groups are dropped — the diagonal variant of Wolinski's Appendix
    K. The state and ``info()`` keep the full measured H̄.
    """

    name = "partition"
    needs = frozenset({SUMMARY})
    provides = frozenset({GROUP_SUMMARY})

    @dataclass
    class Options:
        partition: Literal["canonical", "weights_biases", "blocks", "patterns", "trivial",
                           "discrete"] = option(
            "canonical", "how parameters are grouped: one group per tensor (canonical), all "
                         "weights / all biases, consecutive blocks of layers, regex groups "
                         "(patterns), one group (trivial), one group per scalar (discrete)")
        groups: list[str | list[str]] | dict[str, str | list[str]] | None = option(
            None, "partition = 'patterns': a list of groups (a regex or a list of regexes, "
                  "re.search on parameter names, first match wins) or a table name → regexes")
        unmatched: Literal["error", "rest", "own"] = option(
            "error", "partition = 'patterns': parameters no pattern matches raise an error, "
                     "form one group 'rest', or get a group each")
        block_size: int = option(1, "partition = 'blocks': layers per group", min=1)
        max_groups: int = option(4096, "refuse partitions with more groups (the summary "
                                       "costs O(S) Hessian-vector products, H̄ is S×S)", min=1)
        direction: str | dict = option(
            "gradient", "u: 'gradient', or another preconditioner's output P⁻¹g given as a "
                        "name or a table, e.g. {name='diagonal', power=0.5, ema=0.999}",
            part="preconditioner", keep=("gradient",))
        damping: float = option(0.0, "λ in η = (H̄ + λI)⁻¹ḡ (the plain rule; the cubic solver "
                                     "adds it too). λ > 0 breaks the invariance under "
                                     "per-group rescaling", min=0.0)
        update_every: int = option(1, "recompute the summary and η every T steps", min=1)
        eta_ema: float = option(0.0, "running average of η over recomputations, "
                                     "η ← β·η_prev + (1−β)·η_new (the first η is taken as is)",
                                min=0.0, max=1.0)
        average_last: int = option(1, "H̄, ḡ, D3 are the mean of the last k summaries", min=1)
        diagonal_only: bool = option(
            False, "η from Diag(H̄) instead of H̄: drop the interactions between groups "
                   "(Wolinski's App. K ablation); H̄ is still measured and reported in full")
        direction_momentum: float = option(
            0.0, "Method 1's u_t = u(m_t), m_t = β·m_{t−1} + g_t: a momentum of gradients "
                 "(Wolinski's footnote 5: the trajectory stays invariant); the step is then "
                 "taken from group_summary (solver 'cubic'), apply() is refused",
            min=0.0, max=1.0)
        summary_batch: Literal["step", "previous"] = option(
            "step", "batch the summary ḡ, H̄, D3 is measured on: the step's own, or the "
                    "previous step's (Algorithm 1's independent mini-batches for the "
                    "gradient and the summary; the first step uses its own)")

        def __post_init__(self) -> None:
            if self.direction_momentum >= 1.0:
                raise ValueError("direction_momentum: must be < 1")
            if self.eta_ema >= 1.0:
                raise ValueError("eta_ema: must be < 1 (eta_ema = 1 would never take in a "
                                 "new η)")
            if self.partition == "patterns" and not self.groups:
                raise ValueError("groups: required (and non-empty) with partition = "
                                 "'patterns'")
            if self.partition != "patterns" and self.groups is not None:
                raise ValueError(f"groups: only used with partition = 'patterns', not "
                                 f"{self.partition!r}")
            if self.groups:
                # regexes are checked here, so a typo is a config error before any model
                partitions.compile_groups(self.groups)
            d = self.direction
            if isinstance(d, dict) or (isinstance(d, str) and d != "gradient"):
                # the config layer resolves a nested part (curvkit.build_optimizer,
                # curvkit.create); a raw table here was never validated
                raise ValueError("direction: a preconditioner name or table must be "
                                 "resolved by the config layer (build the part with "
                                 "curvkit.build_optimizer or curvkit.create)")
            if getattr(d, "name", None) == "partition":
                raise ValueError("direction: cannot be another 'partition' preconditioner")

    def __init__(self, model: nn.Module, options: Options | None = None) -> None:
        super().__init__(model, options)
        o = self.options
        try:
            self.partition = partitions.build(
                o.partition, self.model, self.named_params, groups=o.groups,
                unmatched=o.unmatched, block_size=o.block_size, max_groups=o.max_groups)
        except ValueError as err:
            raise ValueError(f"preconditioner 'partition': {err}") from err
        self.inner: Preconditioner | None = None
        choice = _inner(o.direction)
        if choice is not None:  # a PartChoice the config layer validated
            self.inner = choice.spec.cls(model=model, options=choice.options)
            self.inner.config_path = choice.path
            self.state["direction"] = self.inner.state
        self.state["groups"] = self.partition.groups
        self._rule_info: dict[str, Any] = {}
        self._step: int | None = None
        self._ids: list[Tensor] | None = None
        # summary_batch = "previous": the last step's batch (not checkpointed: after a
        # resume the first summary is measured on the step's own batch)
        self._previous: Any = None

    # ------------------------------------------------------------------ config
    @classmethod
    def requirements(cls, options: Options) -> frozenset[str]:
        """``summary``, plus whatever the direction's preconditioner needs."""
        choice = _inner(options.direction)
        return cls.needs | (choice.needs if choice is not None else frozenset())

    # ------------------------------------------------------------------ update
    def should_update(self, step: int) -> bool:
        own = step % self.options.update_every == 0
        due = own or (self.inner is not None and self.inner.should_update(step)) or \
            self._every_step
        # update() needs the step to tell whose refresh is due
        self._step = step if due else None
        return due

    @property
    def _every_step(self) -> bool:
        """The momentum and the previous batch are taken in at every step."""
        o = self.options
        return o.direction_momentum > 0.0 or o.summary_batch == "previous"

    def _u(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """This step's u: of the momentum m_t (already holding g_t) or of the gradient."""
        if self.options.direction_momentum > 0.0 and "momentum" in self.state:
            return self.direction_of(self.state["momentum"])
        return self.direction_of(grads)

    def direction_of(self, grads: Sequence[Tensor]) -> list[Tensor]:
        """u: the gradient, or the inner preconditioner's P⁻¹g."""
        return list(grads) if self.inner is None else self.inner.apply(grads)

    def update(self, estimator: Any, batch: Any, grads: Sequence[Tensor]) -> None:
        """Refresh the inner direction (on its schedule) and, every ``update_every`` steps,
        the summary along u and η. Called without :meth:`should_update` it does both."""
        step, self._step = self._step, None
        o = self.options
        if o.direction_momentum > 0.0:
            prev = self.state.get("momentum")
            self.state["momentum"] = [g.detach().clone() for g in grads] if prev is None else \
                [torch.add(g.detach(), m, alpha=o.direction_momentum)
                 for m, g in zip(prev, grads)]
        measure_on = batch
        if o.summary_batch == "previous":
            # Algorithm 1's Z̃_t: a batch drawn independently of the gradient's Z_t
            measure_on = self._previous if self._previous is not None else batch
            self._previous = batch
        if self.inner is not None and (step is None or self.inner.should_update(step)):
            self.inner.update(estimator, batch, grads)
            self.state["direction"] = self.inner.state
        if step is not None and step % o.update_every != 0:
            return
        u = [t.detach() for t in self._u(grads)]
        new = estimator.summary(measure_on, u, self.partition.ids, self.partition.groups)
        S = self.partition.groups
        if tuple(new.g.shape) != (S,) or tuple(new.H.shape) != (S, S) or \
                (new.D3 is not None and tuple(new.D3.shape) != (S,)):
            raise ValueError(f"estimator {getattr(estimator, 'name', '?')!r}: summary shapes "
                             f"g {tuple(new.g.shape)}, H {tuple(new.H.shape)} do not match "
                             f"the partition's S = {S}")
        k = self.options.average_last
        hist = {key: list(self.state.get(f"hist_{key}", []))[-(k - 1):] if k > 1 else []
                for key in ("g", "H", "D3")}
        hist["g"].append(new.g.detach().double())
        hist["H"].append(new.H.detach().double())
        if new.D3 is not None:
            hist["D3"].append(new.D3.detach().double())
        else:
            hist["D3"] = []
        g = torch.stack(hist["g"]).mean(0)
        H = torch.stack(hist["H"]).mean(0)
        H = 0.5 * (H + H.T)  # the mean of symmetric matrices, kept exactly symmetric
        D3 = torch.stack(hist["D3"]).mean(0) if hist["D3"] else None

        count = int(self.state.get("updates", 0)) + 1
        eye = torch.eye(S, dtype=H.dtype, device=H.device)
        used = torch.diag(torch.diagonal(H)) if self.options.diagonal_only else H
        damped = Summary(g=g, H=used + self.options.damping * eye, D3=D3)
        # the plain rule's η (what apply() scales the direction by; a solver that computes
        # its own η from group_summary(), such as cubic, does not use it)
        eta_new = plain_eta(damped)
        rule_info = {}
        if eta_new is None or not bool(torch.isfinite(eta_new).all()):
            eta_new, rule_info = None, {"partition_singular": 1}
        state = dict(self.state)
        state.update(g=g, H=H, updates=count, groups=S)
        if D3 is None:
            state.pop("D3", None)
        else:
            state["D3"] = D3
        if k > 1:
            state.update(hist_g=hist["g"], hist_H=hist["H"], hist_D3=hist["D3"])
        if eta_new is not None:
            eta_new = eta_new.detach().double()
            solved = int(state.get("solved", 0)) + 1
            old = state.get("eta")
            w = ema_weight(solved, self.options.eta_ema, bias_correction=False)
            state["eta"] = blend(old, eta_new, w)
            state["eta_raw"] = eta_new
            state["solved"] = solved
            state["eta_valid"] = 1
        else:
            # keep the previous η for the running average; apply() gives a non-finite
            # direction (the optimizer skips and counts the step) until the next success
            state["eta_valid"] = 0
        self.state = state
        self._rule_info = dict(rule_info)

    # ------------------------------------------------------------------ the step
    @property
    def eta_valid(self) -> bool:
        """Whether the last computation produced an η (False after a singular H̄)."""
        return bool(self.state.get("eta_valid", 0)) and "eta" in self.state

    def group_summary(self, grads: Sequence[Tensor] | None = None,
                      damped: bool = True) -> GroupSummary:
        """The ``group_summary`` capability: the current (averaged) summary as η uses it
        (Diag(H̄) with ``diagonal_only``; ``damped``: plus damping·I; float64) with the
        direction u of ``grads`` (empty without) and the group ids, as typed data."""
        if "H" not in self.state:
            raise RuntimeError("preconditioner 'partition': no summary before the first "
                               "update()")
        H = self.state["H"]
        if self.options.diagonal_only:
            H = torch.diag(torch.diagonal(H))
        if damped:
            H = H + self.options.damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        u = [] if grads is None else [t.detach() for t in self._u(grads)]
        return GroupSummary(g=self.state["g"], H=H, D3=self.state.get("D3"),
                            version=int(self.state.get("updates", 0)), u=u,
                            ids=self._ids_like(u) if u else list(self.partition.ids),
                            eta_ema=float(self.options.eta_ema))

    def _ids_like(self, u: Sequence[Tensor]) -> list[Tensor]:
        if self._ids is None or self._ids[0].device != u[0].device:
            self._ids = [ids.to(t.device) for ids, t in zip(self.partition.ids, u)]
        return self._ids

    def combine(self, eta: Tensor, u: Sequence[Tensor]) -> list[Tensor]:
        """Σ_s η_s u_s, as a list shaped like the parameters."""
        eta = eta.to(device=u[0].device)
        return [t * eta[ids].to(t.dtype) for ids, t in zip(self._ids_like(u), u)]

    def apply(self, direction: Sequence[Tensor]) -> list[Tensor]:
        """Σ_s η_s u_s(d) with the current η; u(d) = d or the inner preconditioner's P⁻¹d.
        After a singular H̄ (no valid η) the result is NaN, which the optimizer skips."""
        if "eta" not in self.state and "H" not in self.state:
            raise RuntimeError("preconditioner 'partition': apply() before the first update()")
        check_like(direction, self.params, "direction")
        if self.options.direction_momentum > 0.0:
            raise StepError(f"{self.config_path or 'preconditioner'}.direction_momentum: the "
                            f"direction is a momentum of gradients, not a linear map of d, so "
                            f"apply(d) is undefined; use solver 'cubic', which takes the step "
                            f"Σ η_s u_s from group_summary")
        if not self.eta_valid:
            return [torch.full_like(d, math.nan) for d in direction]
        return self.combine(self.state["eta"], self.direction_of(direction))

    # ------------------------------------------------------------------ reporting
    def group_names(self) -> list[str]:
        return list(self.partition.names)

    def eta(self) -> list[float]:
        """Current per-group learning rates η (after the running average)."""
        eta = self.state.get("eta")
        return [] if eta is None else [float(v) for v in eta]

    def pseudo_hessian(self) -> list[list[float]]:
        """H̄ (averaged, undamped) as a list of lists."""
        H = self.state.get("H")
        return [] if H is None else [[float(v) for v in row] for row in H]

    def pseudo_gradient(self) -> list[float]:
        g = self.state.get("g")
        return [] if g is None else [float(v) for v in g]

    def third_order(self) -> list[float] | None:
        """diag D³ (averaged), or None when the estimator does not provide it."""
        D3 = self.state.get("D3")
        return None if D3 is None else [float(v) for v in D3]

    def info(self) -> dict[str, Any]:
        """η per group, ḡ, D3, and (for S ≤ 64) H̄ and the group names; JSON-able."""
        if "H" not in self.state:
            return {}
        S = self.partition.groups
        out: dict[str, Any] = {"partition_S": S, "partition_eta": self.eta(),
                               "partition_eta_valid": int(self.eta_valid),
                               "partition_g": self.pseudo_gradient()}
        if "D3" in self.state:
            out["partition_D3"] = self.third_order()
        if S <= INFO_MAX_GROUPS:
            out["partition_H"] = self.pseudo_hessian()
            out["partition_groups"] = self.group_names()
        out.update(self._rule_info)
        if self.inner is not None:
            out.update(self.inner.info())
        return out

    def structures(self) -> dict[str, str]:
        inner = self.inner.structures() if self.inner is not None else {}
        out = {}
        for (n, _), where in zip(self.named_params, self.partition.param_groups):
            label = f"partition:{where}"
            if n in inner:
                label += f" of {inner[n]}"
            out[n] = label
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        sd = dict(self.state)
        if self.inner is not None:
            sd["direction"] = self.inner.state_dict()
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        groups = state.get("groups", self.partition.groups)
        if int(groups) != self.partition.groups:
            raise ValueError(f"preconditioner 'partition': checkpoint has S = {groups} "
                             f"groups, the configured partition has {self.partition.groups}")
        if self.inner is not None:
            if "direction" not in state:
                raise ValueError("preconditioner 'partition': checkpoint has no state for "
                                 "the direction's preconditioner")
            self.inner.load_state_dict(state["direction"])
            state["direction"] = self.inner.state
        self.state = state
        self._rule_info = {}


def _inner(direction: Any) -> Any:
    """The inner preconditioner's :class:`~curvkit.config.PartChoice` (resolved by the config
    layer), or None for the gradient."""
    return None if isinstance(direction, str) else direction
