"""``CurvatureEstimator.linearize(batch)``: many curvature products on one batch at one θ.

Every registered estimator (built-ins and plugins such as ``fd_hessian``, none skipped) is
checked: ``linearize(batch).matvec(v)`` equals ``matvec(batch, v)`` for single and several
batches, both reductions, an MLP, a small CNN and a non-Sequential model with a buffer,
for several directions from one operator. Then the reuse itself (no forward pass per
product for ``hessian``/``ggn``), the staleness guard, the shared combination routine and
the trust-region trajectory against plain ``matvec`` products. float64, tiny models.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.estimators.base import CurvatureEstimator, Linearized, combine
from curvkit.testing.estimator import flat, random_like_params
from curvkit.testing.problems import problem

ESTIMATORS = curvkit.components()["estimator"]
BUILTIN = {"hessian", "ggn", "ef", "fisher", "outer_product"}
# the ones that do per-batch work once in linearize (the others use the base default)
REUSING = ("hessian", "ggn")


def make(name: str, prob):
    return curvkit.create("estimator", name, model=prob.model, loss_fn=prob.loss_fn)


def plain_linearize(self, batch):
    """The operator without reuse: every product is a fresh ``matvec`` (the reference)."""
    batches = [tuple(b) for b in batch] if isinstance(batch, list) else batch
    return Linearized(self, lambda v: list(self.matvec(batches, v)))


def test_every_builtin_estimator_is_registered():
    assert BUILTIN <= set(ESTIMATORS), f"missing: {BUILTIN - set(ESTIMATORS)}"


@pytest.mark.parametrize("name", ESTIMATORS)
@pytest.mark.parametrize("arch,loss", [("mlp", "ce"), ("cnn", "mse"), ("cnn", "ce"),
                                       ("skip", "mse")])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sizes", [[5], [3, 4, 2]], ids=["one-batch", "three-batches"])
def test_linearize_equals_matvec(name, arch, loss, reduction, sizes):
    prob = problem(arch, loss, reduction, sizes=sizes, seed=1)
    est = make(name, prob)
    op = est.linearize(prob.data())
    assert isinstance(op, Linearized)
    vs = [random_like_params(prob.model, seed=s) for s in (2, 3, 4)]
    first = None
    for v in vs + vs[:1]:  # several directions in a row, then the first again
        Cv = op.matvec(v)
        assert [t.shape for t in Cv] == [p.shape for p in prob.params]
        assert all(t.dtype == p.dtype for t, p in zip(Cv, prob.params))
        torch.testing.assert_close(flat(Cv), flat(est.matvec(prob.data(), v)),
                                   rtol=1e-10, atol=1e-13, msg=lambda m: f"{name}: {m}")
        first = Cv if first is None else first
    # a repeated direction gives bitwise the same product (nothing accumulates in the op)
    assert all(torch.equal(a, b) for a, b in zip(op.matvec(vs[0]), first))


# ggn's cached product is a different algorithm (double-vjp), equal to 1e-10 only: checked
# in test_linearize_equals_matvec
@pytest.mark.parametrize("name", [n for n in ESTIMATORS if n not in REUSING or n == "hessian"])
def test_single_batch_base_default_is_bitwise_matvec(name):
    """Without an override of ``_linearize`` the operator computes exactly what ``matvec``
    does (a single batch is not reweighted); ``hessian`` runs the same autograd ops on the
    kept graph and is bitwise equal too."""
    prob = problem("mlp", "ce", "mean", n=6, seed=5)
    est = make(name, prob)
    v = random_like_params(prob.model, seed=6)
    got = est.linearize(prob.data()).matvec(v)
    assert all(torch.equal(a, b) for a, b in zip(got, est.matvec(prob.data(), v)))


@pytest.mark.parametrize("name", REUSING)
def test_products_reuse_the_forward_pass(name):
    prob = problem("mlp", "ce", "mean", n=6, seed=7)
    est = make(name, prob)
    calls = []
    handle = prob.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        op = est.linearize(prob.data())
        made = len(calls)
        for s in range(4):
            op.matvec(random_like_params(prob.model, seed=s))
        assert made == 1 and len(calls) == 1, f"{name}: {len(calls) - made} forward passes " \
                                              f"in 4 products"
        est.matvec(prob.data(), random_like_params(prob.model))
        assert len(calls) == 2  # a plain matvec does its own forward pass
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ESTIMATORS)
def test_under_no_grad_and_from_an_iterator(name):
    prob = problem("cnn", "ce", "sum", sizes=[2, 3], seed=8)
    est = make(name, prob)
    v = random_like_params(prob.model, seed=9)
    ref = flat(est.matvec(prob.batches, v))
    with torch.no_grad():  # optimizers call solvers inside no_grad
        op = est.linearize(iter(prob.batches))  # an iterator is read once, kept as a list
        a, b = flat(op.matvec(v)), flat(op.matvec(v))
    torch.testing.assert_close(a, ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(b, ref, rtol=1e-10, atol=1e-13)


def test_model_and_grads_untouched():
    prob = problem("skip", "ce", "mean", n=4, seed=10)
    before = {k: t.clone() for k, t in prob.model.state_dict().items()}
    for p in prob.params:
        p.grad = torch.full_like(p, 0.5)
    rng = torch.get_rng_state()
    for name in ESTIMATORS:
        op = make(name, prob).linearize(prob.data())
        op.matvec(random_like_params(prob.model, seed=11))
    assert torch.equal(torch.get_rng_state(), rng)
    for k, t in prob.model.state_dict().items():
        assert torch.equal(t, before[k]), k
    for p in prob.params:
        assert torch.equal(p.grad, torch.full_like(p, 0.5))


# ----------------------------------------------------------------------------- staleness
@pytest.mark.parametrize("name", ESTIMATORS)
def test_stale_after_in_place_parameter_update(name):
    prob = problem("mlp", "mse", "mean", n=5, seed=12)
    est = make(name, prob)
    op = est.linearize(prob.data())
    v = random_like_params(prob.model, seed=13)
    op.matvec(v)
    with torch.no_grad():
        dict(prob.model.named_parameters())["2.weight"].mul_(0.9)  # like an optimizer step
    with pytest.raises(RuntimeError) as err:
        op.matvec(v)
    msg = str(err.value)
    assert "parameters changed since linearize()" in msg
    assert "2.weight" in msg and "modified in place" in msg
    assert "call linearize() again" in msg and repr(name) in msg


def test_stale_after_the_trainable_set_changes():
    prob = problem("mlp", "ce", "mean", n=5, seed=14)
    est = make("hessian", prob)
    op = est.linearize(prob.data())
    prob.params[-1].requires_grad_(False)
    with pytest.raises(RuntimeError, match="set of trainable parameters changed"):
        op.matvec(random_like_params(prob.model))


def test_stale_after_a_new_monte_carlo_draw():
    prob = problem("mlp", "ce", "mean", n=5, seed=15)
    est = make("fisher", prob)
    op = est.linearize(prob.data())
    v = random_like_params(prob.model, seed=16)
    before = flat(op.matvec(v))
    est.advance()  # the optimizer does this once per step: new labels
    with pytest.raises(RuntimeError, match=r"Monte Carlo draw changed since linearize\(\)"):
        op.matvec(v)
    # the new draw's operator gives the new draw's products (different samples)
    after = flat(est.linearize(prob.data()).matvec(v))
    torch.testing.assert_close(after, flat(est.matvec(prob.data(), v)), rtol=1e-12, atol=0)
    assert not torch.equal(after, before)


def test_wrong_vector_shapes_are_rejected():
    prob = problem("mlp", "ce", "mean", n=3)
    op = make("hessian", prob).linearize(prob.data())
    v = random_like_params(prob.model)
    with pytest.raises(ValueError, match="tensors"):
        op.matvec(v[:-1])
    bad = list(v)
    bad[1] = torch.zeros(7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"v\[1\] has shape \(7,\)"):
        op.matvec(bad)


# ----------------------------------------------------------------------------- combination
def test_combine_weights_like_accumulate():
    b1 = (torch.zeros(2, 1), torch.zeros(2))
    b2 = (torch.zeros(6, 1), torch.zeros(6))
    vals = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])]

    def fn(i, X, y):
        return {"a": vals[i], "b": [vals[i] * 2]}

    mean = combine([b1, b2], fn, "mean")
    torch.testing.assert_close(mean["a"], (2 * vals[0] + 6 * vals[1]) / 8)
    torch.testing.assert_close(mean["b"][0], 2 * (2 * vals[0] + 6 * vals[1]) / 8)
    total = combine([b1, b2], fn, "sum")
    torch.testing.assert_close(total["a"], vals[0] + vals[1])
    single = combine([b1], fn, "mean")
    assert single["a"] is vals[0]  # one batch, no process group: returned as is


# ----------------------------------------------------------------------------- trust_region
def _run(estimator: str, linearized: bool, monkeypatch, steps: int = 6):
    prob = problem("mlp", "ce", "mean", sizes=[16] * steps, seed=17)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "lr": 4.0, "estimator": estimator, "preconditioner": "identity",
        "solver": {"name": "trust_region", "initial_radius": 20.0, "retries": 2,
                   "max_iters": 8, "damping": 1e-3}})
    est = opt.estimator
    plain = []
    orig = type(est).matvec

    def counting(self, batch, v):
        plain.append(1)
        return orig(self, batch, v)

    with monkeypatch.context() as m:
        m.setattr(type(est), "matvec", counting)
        if not linearized:
            m.setattr(CurvatureEstimator, "linearize", plain_linearize)
        losses, infos = [], []
        for batch in prob.batches:
            losses.append(float(opt.step(batch)))
            infos.append(dict(opt.last_info))
    params = [p.detach().clone() for p in prob.params]
    return losses, params, infos, len(plain)


@pytest.mark.parametrize("estimator", ["hessian", "ggn"])
def test_trust_region_trajectory_unchanged(estimator, monkeypatch):
    """The solver's products through one ``linearize`` operator per step give the same
    steps as fresh ``matvec`` products — across rejected attempts (θ does not move within
    a step, so the operator stays valid, else it would raise) and rejected steps — and no
    product goes through ``matvec``. lr = 4 makes the model over-predict: rejections."""
    l_op, p_op, i_op, plain_op = _run(estimator, True, monkeypatch)
    l_mv, p_mv, i_mv, plain_mv = _run(estimator, False, monkeypatch)
    products = sum(i["matvecs"] for i in i_mv)
    assert products > 0 and plain_mv == products and plain_op == 0
    assert any(i["attempts"] > 1 for i in i_op), "the case should exercise rejected attempts"
    assert not all(i["accepted"] for i in i_op), "the case should exercise a rejected step"
    assert [i["accepted"] for i in i_op] == [i["accepted"] for i in i_mv]
    assert [i["matvecs"] for i in i_op] == [i["matvecs"] for i in i_mv]
    # work: the kept forward (hessian: and its gradient graph) once, then 2 per product
    # (the fresh-product run is this test's patch, which the work count does not know)
    prep = 2 if estimator == "hessian" else 1
    assert [i["work"] for i in i_op] == [2 + prep + 2 * i["matvecs"] + i["evaluations"]
                                        for i in i_op]
    if estimator == "hessian":  # the same autograd ops on the kept graph: bitwise
        assert l_op == l_mv
        assert all(torch.equal(a, b) for a, b in zip(p_op, p_mv))
    else:
        torch.testing.assert_close(torch.tensor(l_op), torch.tensor(l_mv), rtol=1e-10,
                                   atol=0)
        torch.testing.assert_close(flat(p_op), flat(p_mv), rtol=1e-9, atol=1e-12)


def test_trust_region_makes_no_operator_at_a_stationary_point(monkeypatch):
    """A zero gradient ends CG before any product: no forward/backward for nothing."""
    model = nn.Sequential(nn.Linear(2, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.zero_()
    X, y = torch.randn(4, 2, dtype=torch.float64), torch.zeros(4, 1, dtype=torch.float64)
    opt = curvkit.build_optimizer(model, nn.MSELoss(), {
        "lr": 1.0, "estimator": "hessian", "preconditioner": "identity",
        "solver": "trust_region"})
    made = []
    orig = CurvatureEstimator.linearize
    monkeypatch.setattr(CurvatureEstimator, "linearize",
                        lambda self, batch: made.append(1) or orig(self, batch))
    opt.step((X, y))
    assert opt.last_info["stop"] == "zero_gradient" and not made
