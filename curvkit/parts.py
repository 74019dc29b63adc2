"""The common base of every registered part and the capability vocabulary.

A part is a class with a ``kind``, a ``name``, an ``Options`` dataclass, and the
capabilities it ``provides`` and ``needs``. Everything the registry, the config
validator, ``curvkit components`` and the docs know about a part is read from
these attributes; nothing is inferred from class names.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

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
