"""``ef`` estimator: the shared suite against per-sample Jacobians, plus curvlinops and BackPACK."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev

import curvkit
from curvkit.testing.estimator import EstimatorSuite, concat, flat, random_like_params
from curvkit.testing.problems import flat_forward, flat_params, mlp, problem


def per_sample_losses(loss_fn: nn.Module, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓ_n (N,): each sample's loss summed over its outputs (written from the definitions)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return F.cross_entropy(out, y, reduction="none")
    return ((out - y) ** 2).reshape(out.shape[0], -1).sum(1)


def scale_of(loss_fn: nn.Module, out: torch.Tensor) -> float:
    """c: 1 for sum, 1/N for cross-entropy mean, 1/(N·C) for MSE mean."""
    if loss_fn.reduction == "sum":
        return 1.0
    N = out.shape[0]
    return 1.0 / N if isinstance(loss_fn, nn.CrossEntropyLoss) else 1.0 / out.numel()


def ef_reference(model, loss_fn, batches):
    """c · Gᵀ G with G (N, P) the per-sample gradients (jacrev of the vector of ℓ_n)."""
    X, y = concat(batches)
    f = flat_forward(model)
    theta = flat_params(model)
    out = f(theta, X).detach()
    G = jacrev(lambda t: per_sample_losses(loss_fn, f(t, X), y))(theta)
    return scale_of(loss_fn, out) * G.T @ G


class TestEF(EstimatorSuite):
    name = "ef"
    psd = True

    def reference_dense(self, model, loss_fn, batches):
        return ef_reference(model, loss_fn, batches)


@pytest.mark.parametrize("arch,loss,reduction", [("mlp", "ce", "mean"), ("cnn", "mse", "mean"),
                                                 ("skip", "mse", "sum"), ("cnn", "ce", "sum")])
def test_matches_curvlinops_ef(arch, loss, reduction):
    curvlinops = pytest.importorskip("curvlinops")
    prob = problem(arch, loss, reduction, sizes=[3, 4], seed=21)
    est = curvkit.create("estimator", "ef", model=prob.model, loss_fn=prob.loss_fn)
    op = curvlinops.EFLinearOperator(prob.model, prob.loss_fn, prob.params, prob.batches)
    v = random_like_params(prob.model, seed=22)
    theirs = op @ [t.clone() for t in v]
    for a, b in zip(est.matvec(prob.batches, v), theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("loss,reduction", [("ce", "mean"), ("ce", "sum"), ("mse", "mean"),
                                            ("mse", "sum")])
def test_diagonal_matches_backpack_sum_grad_squared(arch, loss, reduction):
    """BackPACK's SumGradSquared is Σ_n (∇(c ℓ_n))² = c² Σ_n (∇ℓ_n)²: divide by c."""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import SumGradSquared

    prob = problem(arch, loss, reduction, n=5, seed=23)
    X, y = prob.batch
    est = curvkit.create("estimator", "ef", model=prob.model, loss_fn=prob.loss_fn)
    ours = est.diagonal((X, y))
    model = backpack.extend(copy.deepcopy(prob.model))
    loss_fn = backpack.extend(copy.deepcopy(prob.loss_fn))
    out = model(X)
    c = scale_of(prob.loss_fn, out)
    with backpack.backpack(SumGradSquared()):
        loss_fn(out, y).backward()
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.sum_grad_squared / c)


def test_matvec_equals_per_sample_gradient_formula_with_soft_and_smoothed_labels():
    """The output-gradient route equals c Σ_n ∇ℓ_n (∇ℓ_nᵀ v) for any CE targets (label
    smoothing changes ∇ℓ_n, not the method)."""
    prob = problem("mlp", "ce", "mean", n=6, seed=24)
    X, y = prob.batch
    for loss_fn in (nn.CrossEntropyLoss(label_smoothing=0.2),
                    nn.CrossEntropyLoss(reduction="sum")):
        est = curvkit.create("estimator", "ef", model=prob.model, loss_fn=loss_fn)
        f = flat_forward(prob.model)
        theta = flat_params(prob.model)
        smoothing = loss_fn.label_smoothing

        def losses(t, f=f, smoothing=smoothing):
            return F.cross_entropy(f(t, X), y, reduction="none", label_smoothing=smoothing)

        Gs = jacrev(losses)(theta)
        c = 1.0 / 6 if loss_fn.reduction == "mean" else 1.0
        v = random_like_params(prob.model, seed=25)
        torch.testing.assert_close(flat(est.matvec((X, y), v)), c * Gs.T @ (Gs @ flat(v)))
        torch.testing.assert_close(est.dense((X, y)), c * Gs.T @ Gs)


def test_diagonal_of_model_with_reused_module_and_bare_parameter():
    """SkipNet calls fc2 twice and has a bare parameter: those fall back to per-sample
    vector-Jacobian products; the diagonal is still exact."""
    prob = problem("skip", "ce", "sum", n=5, seed=26)
    est = curvkit.create("estimator", "ef", model=prob.model, loss_fn=prob.loss_fn)
    ref = ef_reference(prob.model, prob.loss_fn, prob.batches)
    torch.testing.assert_close(flat(est.diagonal(prob.batch)), ref.diagonal())


def test_batchnorm_in_training_mode_is_rejected_by_diagonal():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    X = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    est = curvkit.create("estimator", "ef", model=model, loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"module 1 \(BatchNorm1d\) is in training mode"):
        est.diagonal((X, y))
    model.eval()
    d = flat(est.diagonal((X, y)))
    torch.testing.assert_close(d, ef_reference(model, nn.CrossEntropyLoss(), [(X, y)]).diagonal())


def test_unsupported_losses_are_rejected():
    with pytest.raises(TypeError, match="loss L1Loss is not supported"):
        curvkit.create("estimator", "ef", model=mlp(), loss_fn=nn.L1Loss())
    with pytest.raises(ValueError, match="class weights"):  # negative: not a valid weight
        curvkit.create("estimator", "ef", model=mlp(), loss_fn=nn.CrossEntropyLoss(
            weight=torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)))
