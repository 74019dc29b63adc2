"""``hessian`` estimator: the shared suite against torch.func.hessian, Hutchinson, curvlinops."""

from __future__ import annotations

import pytest
import torch

import curvkit
from curvkit.testing.estimator import EstimatorSuite, flat, hessian_reference, random_like_params
from curvkit.testing.problems import problem


class TestHessian(EstimatorSuite):
    name = "hessian"
    psd = False
    summary_has_d3 = True
    options = {"samples": 4000}

    def reference_dense(self, model, loss_fn, batches):
        return hessian_reference(model, loss_fn, batches)

    def check_diagonal(self, estimate, dense, prob):
        """Hutchinson: z ⊙ Hz has mean H_ii and variance Σ_{j≠i} H_ij² per probe."""
        K = self.options["samples"]
        off = dense - torch.diag(dense.diagonal())
        sd = (off.pow(2).sum(1) / K).sqrt()
        err = (estimate - dense.diagonal()).abs()
        assert bool((err <= 5 * sd + 1e-12).all()), \
            f"Hutchinson diagonal off by {float((err / (sd + 1e-30)).max()):.1f} std. devs"


def test_hutchinson_is_unbiased_and_exact_where_hessian_is_diagonal():
    """For a Hessian that is diagonal, z ⊙ Hz = diag(H) exactly for any Rademacher z."""
    lin = torch.nn.Linear(3, 1, bias=False).double()
    X = torch.eye(3, dtype=torch.float64) * torch.tensor([[1.0], [2.0], [3.0]],
                                                         dtype=torch.float64)
    y = torch.zeros(3, 1, dtype=torch.float64)
    est = curvkit.create("estimator", "hessian", model=lin,
                         loss_fn=torch.nn.MSELoss(reduction="sum"), samples=1)
    torch.testing.assert_close(flat(est.diagonal((X, y))),
                               torch.tensor([2.0, 8.0, 18.0], dtype=torch.float64))


def test_hutchinson_seed_draw_and_global_rng():
    prob = problem("mlp", "ce", "mean", n=5)
    est = curvkit.create("estimator", "hessian", model=prob.model, loss_fn=prob.loss_fn,
                         samples=3, seed=1)
    rng = torch.get_rng_state()
    a = flat(est.diagonal(prob.batch))
    b = flat(est.diagonal(prob.batch))
    assert torch.equal(a, b)  # same draw → same answer
    assert torch.equal(torch.get_rng_state(), rng)
    est.advance()
    c = flat(est.diagonal(prob.batch))
    assert not torch.equal(a, c)  # a new draw → new probes
    other = curvkit.create("estimator", "hessian", model=prob.model, loss_fn=prob.loss_fn,
                           samples=3, seed=2)
    assert not torch.equal(a, flat(other.diagonal(prob.batch)))
    # the estimate is a mean of per-probe terms: more probes shrink the error on average
    H = hessian_reference(prob.model, prob.loss_fn, prob.batches)
    many = curvkit.create("estimator", "hessian", model=prob.model, loss_fn=prob.loss_fn,
                          samples=2000, seed=1)
    err_few = (a - H.diagonal()).norm()
    err_many = (flat(many.diagonal(prob.batch)) - H.diagonal()).norm()
    assert err_many < err_few


def test_chunked_directions_give_the_same_results():
    prob = problem("cnn", "ce", "mean", n=3)
    u = random_like_params(prob.model)
    whole = curvkit.create("estimator", "hessian", model=prob.model, loss_fn=prob.loss_fn)
    chunked = curvkit.create("estimator", "hessian", model=prob.model, loss_fn=prob.loss_fn,
                             chunk_size=7)
    torch.testing.assert_close(chunked.dense(prob.batch), whole.dense(prob.batch))
    a, b = whole.summary(prob.batch, u), chunked.summary(prob.batch, u)
    torch.testing.assert_close(a.H, b.H)
    torch.testing.assert_close(a.D3, b.D3)


def test_summary_d3_of_a_cubic_is_exact():
    """L(θ) = Σ θ_i³ (a loss on a parameter-only model): D3[s] = 6 Σ_{i∈s} u_i³."""

    class Cube(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
            self.b = torch.nn.Parameter(torch.tensor([[0.3]], dtype=torch.float64))

        def forward(self, x):
            return (self.a.pow(3).sum() + self.b.pow(3).sum()) * x

    X = torch.ones(1, 1, dtype=torch.float64)
    y = torch.zeros(1, 1, dtype=torch.float64)

    def loss(out, y):  # identity loss
        return (out - y).sum()

    loss.reduction = "sum"
    est = curvkit.create("estimator", "hessian", model=Cube(), loss_fn=loss)
    u = [torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64),
         torch.tensor([[2.0]], dtype=torch.float64)]
    s = est.summary((X, y), u, [torch.tensor([0, 0, 1]), torch.tensor(1)], 2)
    torch.testing.assert_close(s.D3, torch.tensor([6 * 9.0, 6 * (-1.0 + 8.0)],
                                                  dtype=torch.float64))
    torch.testing.assert_close(s.g, torch.tensor([3 * 1 + 12 * 2, -0.75 + 0.27 * 2],
                                                 dtype=torch.float64))


@pytest.mark.parametrize("arch,loss,reduction", [("mlp", "ce", "mean"), ("cnn", "mse", "sum"),
                                                 ("skip", "ce", "sum")])
def test_matvec_matches_curvlinops(arch, loss, reduction):
    curvlinops = pytest.importorskip("curvlinops")
    prob = problem(arch, loss, reduction, sizes=[3, 4], seed=5)
    est = curvkit.create("estimator", "hessian", model=prob.model, loss_fn=prob.loss_fn)
    v = random_like_params(prob.model, seed=6)
    op = curvlinops.HessianLinearOperator(prob.model, prob.loss_fn, prob.params, prob.batches)
    theirs = op @ [t.clone() for t in v]
    ours = est.matvec(prob.batches, v)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_batchnorm_in_training_mode():
    """Samples coupled through BatchNorm batch statistics: dense/matvec/summary still equal
    the Hessian of the batch loss (reference: torch.autograd.functional.hessian — in this
    case torch.func.hessian, forward-over-reverse through batch_norm, disagrees with both),
    and the running statistics of the user's model are not updated."""
    from models import flat_loss, flat_params

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5),
                                torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    prob = problem("mlp", "ce", "mean", n=6, seed=9)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    est = curvkit.create("estimator", "hessian", model=model, loss_fn=prob.loss_fn)
    H = torch.autograd.functional.hessian(flat_loss(model, prob.loss_fn, *prob.batch),
                                          flat_params(model))
    torch.testing.assert_close(est.dense(prob.batch), H)
    v = random_like_params(model)
    torch.testing.assert_close(flat(est.matvec(prob.batch, v)), H @ flat(v))
    s = est.summary(prob.batch, v)
    U = torch.block_diag(*[t.reshape(-1, 1) for t in v])
    torch.testing.assert_close(s.H, U.T @ H @ U)
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), f"{k} changed"
