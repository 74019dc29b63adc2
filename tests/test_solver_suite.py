"""The built-in solvers through :class:`curvkit.testing.SolverSuite`: quadratics with known
minimisers, a least-squares layer, the brute-force minimiser of a nonconvex basin, and
(trust_region) scipy's trust-ncg iterates."""

from __future__ import annotations

from curvkit.testing import SolverSuite


class TestTrustRegion(SolverSuite):
    name = "trust_region"
    options = {"max_iters": 100}
    matches_trust_ncg = True


class TestDirectNewton(SolverSuite):
    """direct on the exact Hessian's dense block: Newton's method (one step on a quadratic)."""

    name = "direct"
    preconditioner = {"name": "block", "damping": 0.0}
    steps = 25
    monotone = False  # a plain Newton step is not safeguarded


class TestCubicDiscretePartition(SolverSuite):
    """cubic on the partition summary with one group per entry (S = P: the full Hessian)."""

    name = "cubic"
    preconditioner = {"name": "partition", "partition": "discrete"}
    options = {"lambda_int": 1.0}


class _Stalled(SolverSuite):
    """direct with a learning rate that cannot reach the minimiser in its steps."""

    name = "direct"
    lr = 1e-6
    steps = 2


def test_the_suite_fails_a_solver_that_does_not_reach_the_minimiser():
    import pytest

    with pytest.raises(AssertionError, match="on a quadratic"):
        _Stalled().test_convex_quadratic_reaches_the_minimiser(5, 10.0)
