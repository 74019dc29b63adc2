"""``outer_product`` estimator: the shared suite against g gᵀ of the concatenated batch."""

from __future__ import annotations

import torch

import curvkit
from curvkit.testing.estimator import EstimatorSuite, flat, gradient_reference
from curvkit.testing.problems import problem


class TestOuterProduct(EstimatorSuite):
    name = "outer_product"
    psd = True

    def reference_dense(self, model, loss_fn, batches):
        g = gradient_reference(model, loss_fn, batches)
        return torch.outer(g, g)


def test_rank_one_and_diagonal_is_squared_gradient():
    prob = problem("cnn", "mse", "mean", sizes=[2, 3])
    est = curvkit.create("estimator", "outer_product", model=prob.model, loss_fn=prob.loss_fn)
    C = est.dense(prob.batches)
    assert int(torch.linalg.matrix_rank(C)) == 1
    g = gradient_reference(prob.model, prob.loss_fn, prob.batches)
    torch.testing.assert_close(flat(est.diagonal(prob.batches)), g * g)
    torch.testing.assert_close(flat(est.gradient(prob.batches)), g)
