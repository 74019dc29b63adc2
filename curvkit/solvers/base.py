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
from typing import Any

import torch
from torch import Tensor, nn

from curvkit import distributed, passes
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
        reduction = getattr(est.loss_fn, "reduction", "mean")
        return distributed.weighted_mean([value.detach()], batch_size(self.batch), reduction)[0]


class Solver(Part, abc.ABC):
    """How the step is found."""

    kind = "solver"

    def __init__(self, options: Any | None = None) -> None:
        super().__init__(options)

    @abc.abstractmethod
    def step(self, ctx: StepContext) -> StepResult:
        """Propose an update for the parameters from the context of this step."""

    def bind(self, estimator: Any, preconditioner: Any) -> None:
        """Called once by the optimizer after all parts exist, with the estimator (bound to
        the model and loss) and the preconditioner: validate against them."""
