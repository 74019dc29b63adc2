"""Curvature as linear operators (``linearize``) and their spectra (``curvkit.spectral``).

References are dense matrices in float64: ``est.dense(batch)`` (computed another way, see
the estimator tests) and ``torch.linalg.eigh`` of it; the estimators are the Hessian, GGN,
empirical Fisher and Fisher (Monte Carlo: the operator and the dense matrix share a draw)
on two architectures and both reductions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models import problem

import curvkit
from curvkit import spectral
from curvkit.linops import FunctionOperator, LinearOperator

ESTIMATORS = ["hessian", "ggn", "ef", "fisher"]
CASES = [("mlp", "ce", "mean"), ("cnn", "mse", "sum")]


_CACHE: dict = {}


def setup(name, arch, loss, reduction, n=6):
    """(problem, estimator, operator, dense C), made once per module for each case (the
    operator stays valid: no test changes the parameters of a cached problem)."""
    key = (name, arch, loss, reduction, n)
    if key not in _CACHE:
        prob = problem(arch, loss, reduction, n=n, seed=3)
        est = curvkit.create("estimator", name, model=prob.model, loss_fn=prob.loss_fn)
        batch = prob.data()
        _CACHE[key] = prob, est, est.linearize(batch), est.dense(batch)
    return _CACHE[key]


def dense_operator(A: torch.Tensor) -> LinearOperator:
    like = [torch.zeros(A.shape[0], dtype=A.dtype)]
    return FunctionOperator(like, lambda v: [A @ v[0]])


# ----------------------------------------------------------------------------- operators
@pytest.mark.parametrize("name", ESTIMATORS)
def test_operator_api_matches_the_dense_matrix(name):
    prob, est, op, C = setup(name, "mlp", "ce", "mean")
    P = prob.num_params
    assert isinstance(op, LinearOperator)
    assert op.shape == (P, P) and op.dtype == torch.float64 and op.device == C.device
    torch.testing.assert_close(op.to_dense(), C, rtol=1e-9, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(P, generator=g, dtype=torch.float64)
    X = torch.randn(P, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(op @ x, C @ x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(op @ X, C @ X, rtol=1e-9, atol=1e-12)
    as_list = op @ [t.reshape(p.shape) for t, p in
                    zip(torch.split(x, [p.numel() for p in prob.params]), prob.params)]
    assert [t.shape for t in as_list] == [p.shape for p in prob.params]
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in as_list]), C @ x)
    # float32 input: computed in the operator's dtype, returned in the input's
    assert (op @ x.float()).dtype == torch.float32
    # algebra: sums, scalings, shifts
    combo = 2.0 * op - op / 4 + 0.5
    torch.testing.assert_close(combo @ x, 1.75 * (C @ x) + 0.5 * x, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((op + op) @ x, 2 * (C @ x), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((-op) @ x, -(C @ x))
    # scipy: float64 numpy in and out
    sp = op.to_scipy()
    assert sp.shape == (P, P) and sp.dtype == np.float64
    np.testing.assert_allclose(sp.matvec(x.numpy()), (C @ x).numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sp.matmat(X.numpy()), (C @ X).numpy(), rtol=1e-9, atol=1e-12)


def test_operator_errors_and_staleness():
    prob = problem("mlp", "ce", "mean", n=6, seed=3)
    est = curvkit.create("estimator", "ggn", model=prob.model, loss_fn=prob.loss_fn)
    op = est.linearize(prob.data())
    with pytest.raises(ValueError, match="length 3"):
        op @ torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="3 dimensions"):
        op @ torch.zeros(2, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="different parameter spaces"):
        op + dense_operator(torch.eye(3, dtype=torch.float64))
    with torch.no_grad():
        prob.params[0].add_(1.0)
    with pytest.raises(RuntimeError, match="stale"):
        op @ torch.zeros(prob.num_params, dtype=torch.float64)


def test_scipy_eigsh_on_the_exported_operator():
    from scipy.sparse.linalg import eigsh

    _, _, op, C = setup("hessian", "mlp", "ce", "sum")
    vals = eigsh(op.to_scipy(), k=2, which="LA", tol=1e-10, return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), torch.linalg.eigvalsh(C)[-2:].numpy(),
                               rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("pre,options", [("diagonal", {"damping": 0.1}),
                                         ("kronecker", {"damping": 0.1, "ema": 0.0})])
def test_preconditioner_inverse_as_an_operator(pre, options):
    prob = problem("mlp", "ce", "mean", n=8, seed=4)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "lr": 0.1, "estimator": "ef", "preconditioner": {"name": pre, **options}})
    opt.step(prob.batches[0])
    inv = opt.preconditioner.inverse_operator()
    M = inv.to_dense()
    P = prob.num_params
    g = torch.randn(P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    applied = opt.preconditioner.apply(
        [t.reshape(p.shape) for t, p in
         zip(torch.split(g, [p.numel() for p in prob.params]), prob.params)])
    torch.testing.assert_close(M @ g, torch.cat([t.reshape(-1) for t in applied]))
    torch.testing.assert_close(M, M.T, rtol=1e-9, atol=1e-12)  # P⁻¹ is symmetric
    assert bool((torch.linalg.eigvalsh(M) > 0).all())
    if pre == "diagonal":
        s = torch.cat([t.reshape(-1) for t in opt.preconditioner.state["diag"]])
        torch.testing.assert_close(M, torch.diag(1.0 / (s.abs() + 0.1)))


# ----------------------------------------------------------------------------- spectra
# the dense CNN Hessian takes ~10 s: in the slow suite
@pytest.mark.parametrize("name,arch,loss,reduction", [
    pytest.param(name, *case, marks=[pytest.mark.slow] if (name, case[0]) == ("hessian", "cnn")
                 else []) for case in CASES for name in ESTIMATORS])
def test_top_eigenvalues_match_dense(name, arch, loss, reduction):
    _, _, op, C = setup(name, arch, loss, reduction)
    evals, evecs = torch.linalg.eigh(C)
    k = 3
    vals, vecs = spectral.top_eigenvalues(op, k, tol=1e-10)
    torch.testing.assert_close(vals, evals.flip(0)[:k], rtol=1e-8, atol=1e-10 * evals.abs().max())
    assert vecs.shape == (C.shape[0], k)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=torch.float64),
                               rtol=0, atol=1e-8)
    # each pair is an eigenpair of the dense matrix
    resid = (C @ vecs - vecs * vals).norm(dim=0)
    assert bool((resid <= 1e-6 * evals.abs().max()).all()), resid
    # the other end: the smallest eigenvalue (GGN, EF, Fisher: 0, a repeated one, found once)
    lo, _ = spectral.top_eigenvalues(op, 1, which="SA", tol=1e-10)
    torch.testing.assert_close(lo, evals[:1], rtol=1e-7, atol=1e-8 * evals.abs().max())
    if name == "hessian":  # indefinite: the largest magnitude may be a negative value
        mag, _ = spectral.top_eigenvalues(op, 1, which="LM", tol=1e-10)
        torch.testing.assert_close(mag.abs(), evals.abs().max().reshape(1), rtol=1e-8, atol=0)


def test_top_eigenvalues_tolerance_and_errors():
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))
    lam = torch.linspace(1, 10, 60, dtype=torch.float64)
    A = Q @ torch.diag(lam) @ Q.T
    op = dense_operator(A)
    for tol in (1e-3, 1e-8):
        vals, vecs = spectral.top_eigenvalues(op, 1, tol=tol)
        val, vec = vals[0], vecs[:, 0]
        # the stopping rule bounds the residual relative to the value, as in eigsh
        assert float((A @ vec - val * vec).norm()) <= tol * float(val) * 1.0001
    with pytest.raises(ValueError, match="k: must be in"):
        spectral.top_eigenvalues(op, 61)
    with pytest.raises(ValueError, match="which"):
        spectral.top_eigenvalues(op, 1, which="BE")


@pytest.mark.parametrize("name", ESTIMATORS)
def test_trace_is_exact_once_the_sketch_spans_the_space(name):
    _, _, op, C = setup(name, "mlp", "ce", "mean")
    P = C.shape[0]
    exact = float(torch.trace(C))
    assert spectral.trace(op, samples=3 * P + 2, seed=1) == pytest.approx(exact, rel=1e-9)


def test_trace_of_a_low_rank_operator_from_few_samples():
    """ef on 4 samples × 3 classes has rank ≤ 4·... ≤ 12: Hutch++ with m/3 ≥ rank is exact."""
    _, est, op, C = setup("ef", "mlp", "ce", "mean", n=4)
    assert int(torch.linalg.matrix_rank(C)) <= 4
    assert spectral.trace(op, samples=15, seed=0) == pytest.approx(float(torch.trace(C)),
                                                                   rel=1e-9)


def test_trace_hutchpp_is_unbiased_within_its_spread():
    g = torch.Generator().manual_seed(2)
    B = torch.randn(80, 80, generator=g, dtype=torch.float64)
    A = B @ B.T / 80 + torch.diag(torch.linspace(0, 5, 80, dtype=torch.float64))
    op = dense_operator(A)
    ests = torch.tensor([spectral.trace(op, samples=12, seed=s) for s in range(40)])
    exact = float(torch.trace(A))
    # the mean of 40 independent estimates is within 5 standard errors
    assert abs(float(ests.mean()) - exact) <= 5 * float(ests.std()) / 40 ** 0.5
    assert float(ests.std()) < 0.1 * exact  # and single estimates are informative
    with pytest.raises(ValueError, match="at least 3"):
        spectral.trace(op, samples=2)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_density_nodes_are_eigenvalues_with_full_lanczos(name):
    _, _, op, C = setup(name, "mlp", "ce", "mean")
    P = C.shape[0]
    evals = torch.linalg.eigvalsh(C)
    dens = spectral.density(op, probes=2, steps=P, points=64)
    scale = float(evals.abs().max())
    for nodes, weights in zip(dens.nodes, dens.weights):
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-10)
        gaps = (nodes[:, None] - evals[None, :]).abs().min(dim=1).values
        # nodes with weight are eigenvalues (Ritz values of an invariant Krylov space)
        assert bool((gaps[weights > 1e-8] <= 1e-6 * scale).all()), gaps
    dx = float(dens.grid[1] - dens.grid[0])
    assert float(dens.values.sum()) * dx == pytest.approx(1.0, abs=0.02)


def test_density_moments_estimate_normalised_traces():
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.zeros(40, dtype=torch.float64),
                     torch.linspace(1, 4, 10, dtype=torch.float64)])
    A = Q @ torch.diag(lam) @ Q.T
    dens = spectral.density(dense_operator(A), probes=100, steps=12, points=512, seed=4)
    n = 50
    for p in (1, 2):
        Ap = torch.linalg.matrix_power(A, p)
        exact = float(torch.trace(Ap)) / n
        # Var(vᵀ M v) for ‖v‖ = 1 random signs: 2 (‖M‖_F² − Σ M_ii²) / n²
        var = 2 * (float((Ap ** 2).sum()) - float((Ap.diagonal() ** 2).sum())) / n ** 2
        assert dens.moment(p) == pytest.approx(exact, abs=5 * (var / 100) ** 0.5)
    # the mass sits where the spectrum is: ~80% near 0, ~20% in [1, 4]
    dx = float(dens.grid[1] - dens.grid[0])
    near0 = float(dens.values[dens.grid.abs() < 0.5].sum()) * dx
    assert near0 == pytest.approx(0.8, abs=0.08)
