"""The plugin's tests: curvkit's estimator suite, inherited, with the exact Hessian as truth.

``curvkit.testing.EstimatorSuite`` checks matvec and dense against the reference on an MLP,
a CNN and a non-Sequential model, under both reductions and both losses, several batch
and output sizes, several batches at once, linearize(), statelessness, frozen parameters
and bad input; capabilities the estimator does not declare (diagonal, kronecker, summary)
are skipped.
"""

from __future__ import annotations

import pytest

from curvkit.testing import EstimatorSuite, hessian_reference

# dense matrices by central differences cost 2·P gradients each: the whole suite takes
# minutes, so it runs with the slow tests (tox -e slow); tests/test_plugin_example.py keeps
# quick checks of the plugin in the default suite
pytestmark = pytest.mark.slow


class TestFiniteDifferenceHessian(EstimatorSuite):
    name = "fd_hessian"
    # central differences: O(h²) truncation, O(eps/h) rounding with h ≈ eps^(1/3)
    rtol = 1e-6
    atol = 1e-8

    def reference_dense(self, model, loss_fn, batches):
        return hessian_reference(model, loss_fn, batches)
