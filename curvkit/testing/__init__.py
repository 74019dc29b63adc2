"""Test suites a part inherits: write the ground truth, get every contract test.

``import curvkit.testing`` needs pytest (``pip install "curvkit[testing]"``). A plugin's
test module subclasses a suite and states what only it can know (a dense reference, the
options to test)::

    from curvkit.testing import EstimatorSuite, hessian_reference

    class TestMyHessian(EstimatorSuite):
        name = "my_hessian"
        def reference_dense(self, model, loss_fn, batches):
            return hessian_reference(model, loss_fn, batches)

Suites: :class:`EstimatorSuite` (matvec, dense, diagonal, kronecker, summary, linearize
against dense float64 references), :class:`PreconditionerSuite`, :class:`StructureSuite`
(the structured matrices of ``lie_group``), :class:`SolverSuite` (quadratics with known
minimisers; scipy's trust-ncg and brute force as references) and :class:`LossSuite`.
The tiny models and data they run on are in :mod:`curvkit.testing.problems`.
"""

from __future__ import annotations

from curvkit._optional import require

pytest = require("pytest", "curvkit.testing")
# the suites' plain ``assert`` statements get pytest's detailed failure messages
pytest.register_assert_rewrite("curvkit.testing.estimator", "curvkit.testing.preconditioner",
                               "curvkit.testing.structure", "curvkit.testing.solver",
                               "curvkit.testing.loss")

from curvkit.testing.estimator import (  # noqa: E402
    EstimatorSuite,
    concat,
    flat,
    ggn_reference,
    gradient_reference,
    hessian_reference,
    random_like_params,
    third_directional_derivative,
)
from curvkit.testing.loss import LossCase, LossSuite  # noqa: E402
from curvkit.testing.preconditioner import (  # noqa: E402
    Case,
    Context,
    PreconditionerSuite,
    ema_average,
    poisoned,
    unflat,
)
from curvkit.testing.problems import Problem, problem  # noqa: E402
from curvkit.testing.solver import SolverSuite, brute_force_minimiser  # noqa: E402
from curvkit.testing.structure import StructureSuite, reference_projection  # noqa: E402

__all__ = [
    "EstimatorSuite", "PreconditionerSuite", "StructureSuite", "SolverSuite", "LossSuite",
    "LossCase",
    "reference_projection", "brute_force_minimiser",
    "Case", "Context", "Problem", "problem",
    "concat", "flat", "unflat", "ema_average", "poisoned", "ggn_reference",
    "gradient_reference", "hessian_reference", "random_like_params",
    "third_directional_derivative",
]
