"""curvkit: second-order optimization of PyTorch models from swappable parts.

Measure curvature one way (an *estimator*), approximate it with one structure (a
*preconditioner*), find the step with one *solver*; swap any of the three in a config.
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

from curvkit import spectral  # noqa: E402
from curvkit.errors import (  # noqa: E402
    ConfigError,
    CurvkitError,
    IncompatibleError,
    NonFiniteError,
    RegistryError,
    StepError,
)
from curvkit.estimators.base import CurvatureEstimator  # noqa: E402
from curvkit.hookspecs import hookimpl  # noqa: E402
from curvkit.linops import LinearOperator  # noqa: E402
from curvkit.losses import GaussianNLL, LossPart  # noqa: E402
from curvkit.optimizer import CurvkitOptimizer, build_optimizer  # noqa: E402
from curvkit.options import option  # noqa: E402
from curvkit.parts import Part  # noqa: E402
from curvkit.passes import SelectOutput  # noqa: E402
from curvkit.preconditioners.base import Preconditioner  # noqa: E402
from curvkit.registry import get_registry, reload_registry  # noqa: E402
from curvkit.solvers.base import Solver, StepContext, StepResult  # noqa: E402
from curvkit.tasks.base import DatasetPart, ModelPart  # noqa: E402


def components() -> dict[str, list[str]]:
    """Every registered part name, by kind."""
    return get_registry().components()


def create(kind: str, name: str, **kwargs: Any) -> Part:
    """Create any registered part by kind and name; keyword arguments are its context
    (e.g. ``model``, ``loss_fn``) and its options, validated like a config table."""
    return get_registry().create(kind, name, **kwargs)


__all__ = [
    "__version__", "components", "create", "build_optimizer", "CurvkitOptimizer",
    "hookimpl", "option", "Part", "CurvatureEstimator", "Preconditioner", "Solver",
    "StepContext", "StepResult", "LossPart", "GaussianNLL", "DatasetPart", "ModelPart",
    "get_registry", "reload_registry",
    "ConfigError", "CurvkitError", "IncompatibleError", "NonFiniteError", "RegistryError",
    "StepError", "LinearOperator", "spectral", "SelectOutput",
]
