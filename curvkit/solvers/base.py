"""Base of solvers: ``step(ctx) -> StepResult``; the optimizer applies the result.

The optimizer applies ``p.add_(d, alpha=result.alpha)`` for every parameter when
``result.accepted`` and the direction is finite (so identity + direct reproduces
``torch.optim.SGD`` bitwise). A solver never writes to the parameters itself: a trial
point is evaluated with :meth:`StepContext.loss_at`, which leaves them untouched.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from curvkit import distributed, passes, work
from curvkit.losses import batch_size
from curvkit.params import all_finite
from curvkit.parts import Part


@dataclass
class StepResult:
    """What a solver proposes: θ ← θ + alpha · direction, if ``accepted``."""

    direction: list[Tensor]
    alpha: float = 1.0
    accepted: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    # one alpha per parameter (parameter groups with their own learning rates), or None
    alphas: list[float] | None = None


@dataclass
class StepContext:
    """What a solver gets for one step, as typed values (never the optimizer itself):
    ``loss`` and ``grads`` at the current parameters on ``batch`` (already reduced across
    ranks), the estimator (bound to the model and loss), the preconditioner, the learning
    rate and the step number. Trial points go through :meth:`loss_at`."""

    params: list[nn.Parameter]
    batch: tuple[Any, Tensor]
    loss: Tensor
    grads: list[Tensor]
    estimator: Any
    preconditioner: Any
    lr: float
    step: int
    evaluations: int = 0
    #: the step's non-finite check (:class:`curvkit.params.FiniteLedger`): a tensor already
    #: found finite in this step and unchanged since is not scanned again
    finite: Callable[[Sequence[Tensor]], bool] = all_finite
    # all parameter groups, and the group index of each parameter in ``params`` order
    # (None: one group holding every parameter, at ``lr``)
    groups: list[dict[str, Any]] | None = None
    group_of: list[int] | None = None

    def group_members(self) -> list[tuple[dict[str, Any], list[int]]]:
        """``[(group, indices into params)]`` for every non-empty parameter group."""
        if self.groups is None or self.group_of is None:
            return [({"lr": self.lr}, list(range(len(self.params))))]
        if len(self.groups) == 1:
            return [(self.groups[0], list(range(len(self.params))))]
        members: list[list[int]] = [[] for _ in self.groups]
        for i, g in enumerate(self.group_of):
            members[g].append(i)
        return [(g, m) for g, m in zip(self.groups, members) if m]

    def loss_at(self, update: Sequence[Tensor] | None = None,
                params: Sequence[Tensor] | None = None) -> Tensor:
        """Loss on ``batch`` at θ + update (or at ``params``), without touching θ.

        Reduced across ranks like the loss itself; counts as one evaluation.
        """
        X, y = self.batch
        if params is None:
            params = self.params if update is None else \
                [p.detach() + u for p, u in zip(self.params, update)]
        est = self.estimator
        names = [n for n, _ in est.named_params]
        with torch.no_grad():
            # buffer copies (running statistics move once per step, in the step's own
            # pass) and the step's random state (the dropout mask of the gradient)
            out = passes.forward(est.model, X, dict(zip(names, params)))
            value = est.loss_fn(out, y)
        self.evaluations += 1
        work.add(1)  # one forward
        reduction = getattr(est.loss_fn, "reduction", "mean")
        return distributed.weighted_mean([value.detach()], batch_size(self.batch), reduction)[0]


class Solver(Part, abc.ABC):
    """How the step is found."""

    kind = "solver"
    # Options a parameter group may set for its parameters (read from the groups at every
    # step, so schedulers can change them); their config values are the groups' defaults.
    group_options: ClassVar[tuple[str, ...]] = ()
    # True if each group's lr scales its own parameters' step (a per-parameter step rule)
    per_group_lr: ClassVar[bool] = False
    # False if the step uses only the gradients and the preconditioner, never the batch
    # (then ``loss.backward(); opt.step()`` works even where the batch cannot be captured)
    needs_batch: ClassVar[bool] = True
    # How many times one step applies the preconditioner (P⁻¹ d); None: not a fixed number
    # (Krylov iterations, trial points). The optimizer tells the preconditioner
    # (:meth:`~curvkit.preconditioners.base.Preconditioner.expect_applications`), which
    # may store its inverse in the form cheapest for that many applications.
    applications_per_step: ClassVar[int | None] = None

    def __init__(self, options: Any | None = None) -> None:
        super().__init__(options)

    @abc.abstractmethod
    def step(self, ctx: StepContext) -> StepResult:
        """Propose an update for the parameters from the context of this step."""

    def bind(self, estimator: Any, preconditioner: Any) -> None:
        """Called once by the optimizer after all parts exist, with the estimator (bound to
        the model and loss) and the preconditioner: validate against them."""
