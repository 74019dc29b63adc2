"""The common base of every registered part and the capability vocabulary.

A part is a class with a ``kind``, a ``name``, an ``Options`` dataclass, and the
capabilities it ``provides`` and ``needs``. Everything the registry, the config
validator, ``curvkit components`` and the docs know about a part is read from
these attributes; nothing is inferred from class names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from curvkit.options import NoOptions

KINDS = ("estimator", "preconditioner", "solver", "loss", "structure", "dataset", "model",
         "executor")

# Capability vocabulary. Estimators provide MATVEC and DENSE always.
MATVEC = "matvec"
DENSE = "dense"
DIAGONAL = "diagonal"
KRONECKER = "kronecker"
SUMMARY = "summary"
# Square roots of the Kronecker factors (``kronecker_roots(batch)``, KroneckerRoots): provided
# by estimators whose statistics are low-rank (ef, fisher); lie_group prefers them.
KRONECKER_ROOTS = "kronecker_roots"
# Provided by preconditioners that turn a summary into per-group rates (``partition``);
# needed by the ``cubic`` solver.
GROUP_SUMMARY = "group_summary"
# Provided by estimators whose ``summary`` fills ``Summary.D3`` (the third-order diagonal);
# needed by the ``cubic`` solver when its cubic term is on (lambda_int > 0).
SUMMARY_D3 = "summary_d3"

ESTIMATOR_CAPABILITIES = (MATVEC, DENSE, DIAGONAL, KRONECKER, SUMMARY)

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class GroupSummary:
    """The typed value of the ``group_summary`` capability: what a preconditioner that
    groups the parameters into S groups hands a solver for one step (``partition``'s
    ``group_summary(grads)``; the solver computes η from it and forms the step itself).

    g (S,), H (S, S), D3 (S,) or None: the (averaged) summary along the direction u as the
    step's η should use it (H with the provider's damping, Diag(H̄) if it drops the
    interactions), float64. ``version``: how many summaries were measured so far (a solver
    recomputes η when it changes). ``u``: the direction of this step's gradient, shaped
    like the parameters; ``ids``: per parameter, the group index of each entry
    (broadcastable to it), so that the step is Σ_s η_s u_s = ``u[i] * eta[ids[i]]``.
    ``eta_ema``: β of the running average η ← β·η_prev + (1 − β)·η_new over summaries
    (the provider's setting; 0 = none)."""

    g: Tensor
    H: Tensor
    D3: Tensor | None
    version: int
    u: list[Tensor]
    ids: list[Tensor]
    eta_ema: float = 0.0

    @property
    def groups(self) -> int:
        return int(self.g.shape[0])

    def combine(self, eta: Tensor) -> list[Tensor]:
        """Σ_s η_s u_s as a list shaped like the parameters."""
        eta = eta.to(self.u[0].device) if self.u else eta
        return [t * eta[ids].to(t.dtype) for ids, t in zip(self.ids, self.u)]

    def along_u(self, grads: list[Tensor]) -> Tensor:
        """ḡ of ``grads`` along this u: (ḡ)_s = Σ_{i∈s} u_i g_i, float64 (S,)."""
        out = self.g.new_zeros(self.groups)
        for ids, t, g in zip(self.ids, self.u, grads):
            prod = (t.double() * g.double()).to(out.device)
            ids = ids.to(out.device)
            if ids.dim():  # element-wise groups
                out.index_add_(0, ids.reshape(-1), prod.reshape(-1))
            else:
                out.index_add_(0, ids.reshape(1), prod.sum().reshape(1))
        return out


class Part:
    """Base of all parts. Subclasses set ``kind`` (via their base), ``name`` and ``Options``.

    ``self.options`` is the validated ``Options`` instance, ``self.state`` holds
    everything that must survive a checkpoint (tensors, numbers, strings, lists,
    dicts only, so checkpoints load with ``torch.load(weights_only=True)``).
    """

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    provides: ClassVar[frozenset[str]] = frozenset()
    needs: ClassVar[frozenset[str]] = frozenset()
    # Set on instances created from a config: the dotted path of their table, so
    # errors raised while running can point back at the config.
    config_path: str = ""

    def __init__(self, options: Any | None = None) -> None:
        self.options = options if options is not None else self.Options()
        self.state: dict[str, Any] = {}

    @classmethod
    def requirements(cls, options: Any) -> frozenset[str]:
        """Capabilities needed under ``options`` (default: the class' ``needs``)."""
        return cls.needs

    @classmethod
    def capabilities(cls, options: Any) -> frozenset[str]:
        """Capabilities provided under ``options`` (default: the class' ``provides``)."""
        return cls.provides

    def state_dict(self) -> dict[str, Any]:
        return copy.copy(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, options={self.options!r})"
