"""Base of preconditioner structures: ``update`` from an estimator, ``apply`` to a direction.

Contract
--------
* ``update(estimator, batch, grads)`` refreshes the structure's statistics from the
  estimator's capability it ``needs`` (the optimizer calls it every ``update_every`` steps,
  read from the options when the structure has that option).
* ``apply(direction)`` returns P⁻¹ d as a new list of tensors shaped like the parameters.
  It must not modify ``direction``.
* Statistics live in ``self.state`` as tensors that are *replaced*, never modified in
  place, so a shallow copy of ``state`` is a snapshot: the optimizer rolls an update back
  if it produced a non-finite statistic. Keep statistics as means/sums that can be
  all-reduced (see :mod:`curvkit.distributed`).
* A structure whose state is large may instead guard it itself (``guards_state = True``):
  ``update`` then checks each new piece of state before it replaces the old one, keeps the
  old piece where the new one is not finite, and returns how many pieces it kept (0: the
  update is complete). The optimizer takes no snapshot of such a structure (the snapshot
  was a second copy of the whole state at the update's peak) and skips the step when the
  count is not 0.
* ``structures()`` says which parameter uses which structure (a structure that cannot
  handle a parameter falls back to a configurable one and says so here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from curvkit import distributed
from curvkit.linops import FunctionOperator, LinearOperator
from curvkit.params import trainable
from curvkit.parts import DIAGONAL, Part


class Preconditioner(Part):
    """Which structure approximates the curvature."""

    kind = "preconditioner"
    # False if ``update`` never uses the batch (then ``loss.backward(); opt.step()`` works
    # even where the optimizer cannot see the batch of the caller's pass)
    needs_batch: ClassVar[bool] = True
    # True if ``update`` keeps non-finite values out of the state itself and returns the
    # number of pieces it kept (see the module doc); the optimizer then takes no snapshot
    guards_state: ClassVar[bool] = False

    def __init__(self, model: nn.Module, options: Any | None = None) -> None:
        super().__init__(options)
        self.model = distributed.unwrap(model) if model is not None else None
        self.state = {"updates": 0}
        # fixed here, like a torch.optim.Optimizer's parameter list: the structure's state
        # is laid out over these parameters (and walking the module tree on every apply
        # cost as much as a diagonal structure's arithmetic)
        named = trainable(self.model) if self.model is not None else []
        self._named = named
        self._params = [p for _, p in named]
        # applications of P⁻¹ per step, as the solver declares it (None: not known)
        self.applications_per_step: int | None = None

    @property
    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        """The trainable ``(name, parameter)`` pairs of the model at construction."""
        return self._named

    @property
    def params(self) -> list[nn.Parameter]:
        return self._params

    @classmethod
    def requirements(cls, options: Any) -> frozenset[str]:
        """``needs``, plus the estimator's diagonal when the parameters the structure cannot
        cover fall back to a diagonal (an option ``fallback = "diagonal"``)."""
        if getattr(options, "fallback", None) == "diagonal":
            return cls.needs | {DIAGONAL}
        return cls.needs

    def should_update(self, step: int) -> bool:
        """True on the steps where the statistics are refreshed (step counts from 0)."""
        every = getattr(self.options, "update_every", 1)
        return step % max(int(every), 1) == 0

    def update(self, estimator: Any, batch: Any, grads: Sequence[Tensor]) -> int | None:
        """Refresh statistics. The default structure has none. Returns None, or with
        ``guards_state`` the number of pieces of state that kept their previous value
        because their new value was not finite."""

    def apply(self, direction: Sequence[Tensor]) -> list[Tensor]:
        """P⁻¹ d. The base is the identity and returns ``direction`` itself."""
        return list(direction)

    def expect_applications(self, per_step: int | None) -> None:
        """Told once by the optimizer: ``apply`` will run ``per_step`` times per step (the
        solver's ``applications_per_step``; None: not a fixed number). A structure may pick
        from it the cheapest form of its inverse; the result of ``apply`` does not change."""
        self.applications_per_step = per_step

    def inverse_operator(self) -> LinearOperator:
        """P⁻¹ as a :class:`~curvkit.linops.LinearOperator` (``apply`` at the current state:
        ``@``, ``shape``, ``to_scipy()``, sums and scalings)."""
        return FunctionOperator(self.params, self.apply)

    def structures(self) -> dict[str, str]:
        """Parameter name → the structure that preconditions it."""
        return {n: self.name for n, _ in self.named_params}

    def info(self) -> dict[str, Any]:
        """Numbers worth logging after an update (override to add)."""
        return {}
