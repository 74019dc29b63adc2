"""``ggn`` estimator: the shared suite against Jᵀ H_out J, plus BackPACK and curvlinops."""

from __future__ import annotations

import copy

import pytest
import torch

import curvkit
from curvkit.testing.estimator import EstimatorSuite, flat, ggn_reference, random_like_params
from curvkit.testing.problems import problem


class TestGGN(EstimatorSuite):
    name = "ggn"
    psd = True

    def reference_dense(self, model, loss_fn, batches):
        return ggn_reference(model, loss_fn, batches)


def test_ggn_equals_hessian_for_linear_model_with_mse():
    """For a linear model and MSE the loss is quadratic in θ: GGN == Hessian exactly."""
    prob = problem("mlp", "mse", "mean", n=6)
    lin = torch.nn.Linear(4, 3).double()
    ggn = curvkit.create("estimator", "ggn", model=lin, loss_fn=prob.loss_fn)
    hes = curvkit.create("estimator", "hessian", model=lin, loss_fn=prob.loss_fn)
    torch.testing.assert_close(ggn.dense(prob.batch), hes.dense(prob.batch))


def test_diagonal_generic_path_matches_closed_form():
    """Losses without a closed-form square root use diag(Jᵀ H J) from the Jacobian."""
    prob = problem("cnn", "ce", "sum", n=4, seed=2)
    est = curvkit.create("estimator", "ggn", model=prob.model, loss_fn=prob.loss_fn)
    closed = flat(est.diagonal(prob.batch))
    generic = flat(est._diagonal_from_jacobian(*prob.batch))
    torch.testing.assert_close(closed, generic)


class LogCosh(torch.nn.Module):
    """A smooth loss without a closed-form output Hessian in curvkit (generic path)."""

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, out, y):
        val = torch.log(torch.cosh(out - y))
        return val.mean() if self.reduction == "mean" else val.sum()


@pytest.mark.parametrize("loss_fn,loss", [
    (LogCosh("mean"), "mse"), (LogCosh("sum"), "mse"),
    (torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)), "ce"),
    (torch.nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64),
                               reduction="sum"), "ce"),
    (torch.nn.CrossEntropyLoss(label_smoothing=0.2), "ce"),
])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_generic_output_hessian_path(loss_fn, loss, arch):
    """Losses outside the closed forms go through torch.func on the loss; all capabilities
    still match the independent reference (class weights change the scaling of "mean")."""
    prob = problem(arch, loss, "mean", sizes=[3, 2], seed=7)
    est = curvkit.create("estimator", "ggn", model=prob.model, loss_fn=loss_fn)
    ref = ggn_reference(prob.model, loss_fn, prob.batches)
    v = random_like_params(prob.model, seed=8)
    torch.testing.assert_close(flat(est.matvec(prob.batches[0], v)),
                               ggn_reference(prob.model, loss_fn, prob.batches[:1]) @ flat(v))
    torch.testing.assert_close(est.dense(prob.batches[0]),
                               ggn_reference(prob.model, loss_fn, prob.batches[:1]))
    torch.testing.assert_close(flat(est.diagonal(prob.batches[0])),
                               ggn_reference(prob.model, loss_fn, prob.batches[:1]).diagonal())
    if getattr(loss_fn, "weight", None) is None:  # weighted mean: batches are not count-weighted
        torch.testing.assert_close(est.dense(prob.batches), ref)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("loss,reduction", [("ce", "mean"), ("ce", "sum"), ("mse", "mean"),
                                            ("mse", "sum")])
def test_diagonal_matches_backpack_diag_ggn_exact(arch, loss, reduction):
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import DiagGGNExact

    prob = problem(arch, loss, reduction, n=5, seed=4)
    est = curvkit.create("estimator", "ggn", model=prob.model, loss_fn=prob.loss_fn)
    ours = est.diagonal(prob.batch)
    # BackPACK installs hooks: extend copies that share nothing with the user's model
    model = backpack.extend(copy.deepcopy(prob.model))
    loss_fn = backpack.extend(copy.deepcopy(prob.loss_fn))
    X, y = prob.batch
    with backpack.backpack(DiagGGNExact()):
        loss_fn(model(X), y).backward()
    theirs = [p.diag_ggn_exact for p in model.parameters()]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch,loss,reduction", [("mlp", "ce", "mean"), ("cnn", "mse", "sum"),
                                                 ("skip", "mse", "mean")])
def test_matvec_matches_curvlinops(arch, loss, reduction):
    curvlinops = pytest.importorskip("curvlinops")
    prob = problem(arch, loss, reduction, sizes=[3, 4], seed=5)
    est = curvkit.create("estimator", "ggn", model=prob.model, loss_fn=prob.loss_fn)
    v = random_like_params(prob.model, seed=6)
    op = curvlinops.GGNLinearOperator(prob.model, prob.loss_fn, prob.params, prob.batches)
    theirs = op @ [t.clone() for t in v]
    ours = est.matvec(prob.batches, v)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_diagonal_with_sample_coupling_uses_the_full_jacobian():
    """BatchNorm in training mode couples the samples: per-sample factorizations do not
    apply, the diagonal still equals diag(Jᵀ H J) of the whole batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5),
                                torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    prob = problem("mlp", "ce", "mean", n=6, seed=9)
    est = curvkit.create("estimator", "ggn", model=model, loss_fn=prob.loss_fn)
    ref = ggn_reference(model, prob.loss_fn, prob.batches)
    torch.testing.assert_close(flat(est.diagonal(prob.batch)), ref.diagonal())
    torch.testing.assert_close(est.dense(prob.batch), ref)


def test_batchnorm_running_statistics_are_not_updated():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5),
                                torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    prob = problem("mlp", "ce", "sum", n=6, seed=9)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    v = random_like_params(model)
    for name in ("ggn", "hessian", "outer_product"):
        est = curvkit.create("estimator", name, model=model, loss_fn=prob.loss_fn)
        est.matvec(prob.batch, v)
        est.dense(prob.batch)
        est.diagonal(prob.batch)
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), f"{k} changed"
