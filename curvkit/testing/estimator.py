"""The shared test suite every curvature estimator inherits.

A new estimator gets the whole suite by declaring its ground truth::

    from curvkit.testing import EstimatorSuite, hessian_reference

    class TestHessian(EstimatorSuite):
        name = "hessian"
        psd = False
        def reference_dense(self, model, loss_fn, batches):
            return hessian_reference(model, loss_fn, batches)

``reference_dense(model, loss_fn, batches)`` must be the P×P curvature of the loss over *all*
samples of ``batches`` (a list of ``(X, y)``), computed independently of curvkit (the
helpers below use only ``torch.func`` / ``torch.autograd.functional`` on the flat parameter
vector, on the concatenated batch).

Hooks a subclass may set or override:

- ``options``: dict of options passed to ``curvkit.create`` (e.g. many MC samples);
- ``psd``: whether the curvature is positive semi-definite (checked if True);
- ``check(actual, expected, what)``: the comparison (default: tight float64 tolerances);
  Monte Carlo estimators override it (or the ``rtol``/``atol`` class attributes) for a
  statistical tolerance;
- ``check_diagonal(estimate, dense_reference, problem)``: the diagonal comparison
  (default: ``check`` against diag(reference)); Hutchinson/MC estimators override it;
- ``deterministic_multi_batch``: if False, "several batches == concatenated batch" is
  checked with ``check`` (which may be statistical) instead of exactly;
- ``summary_has_d3``: whether ``summary`` returns D3 (then checked against an independent
  third derivative).

Everything runs in float64 on the tiny models of :mod:`curvkit.testing.problems`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jacfwd, jacrev

import curvkit
from curvkit.testing.problems import (
    ARCHS,
    Problem,
    flat_forward,
    flat_loss,
    flat_params,
    make_loss,
    mlp,
    param_offsets,
    problem,
)

DTYPE = torch.float64


# ----------------------------------------------------------------------------- references
def concat(batches: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def hessian_reference(model: nn.Module, loss_fn: nn.Module,
                      batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """∇²_θ L on the concatenated batch (torch.func.hessian of the flat-parameter loss).

    Forward-over-reverse, independent of curvkit's double backward. Not valid for models
    with BatchNorm in training mode (torch.func.hessian disagrees with autograd there); use
    ``torch.autograd.functional.hessian`` for those.
    """
    X, y = concat(batches)
    return hessian(flat_loss(model, loss_fn, X, y))(flat_params(model)).detach()


def gradient_reference(model: nn.Module, loss_fn: nn.Module,
                       batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    X, y = concat(batches)
    return grad(flat_loss(model, loss_fn, X, y))(flat_params(model)).detach()


def ggn_reference(model: nn.Module, loss_fn: nn.Module,
                  batches: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
    """Jᵀ H_out J on the concatenated batch: J by jacrev on the flat parameters, H_out by
    torch.autograd.functional.hessian of the loss w.r.t. the whole output."""
    X, y = concat(batches)
    f = flat_forward(model)
    theta = flat_params(model)
    out = f(theta, X).detach()
    M = out.numel()
    J = jacrev(lambda t: f(t, X))(theta).reshape(M, -1)
    H_out = torch.autograd.functional.hessian(lambda o: loss_fn(o, y), out).reshape(M, M)
    return (J.T @ H_out @ J).detach()


def third_directional_derivative(model: nn.Module, loss_fn: nn.Module,
                                 batches: Sequence[tuple[Tensor, Tensor]], u: Tensor) -> Tensor:
    """d³/dt³ L(θ + t u) at t = 0 (nested jacfwd on a 1-D function), u flat."""
    X, y = concat(batches)
    L = flat_loss(model, loss_fn, X, y)
    theta = flat_params(model)

    def phi(t: Tensor) -> Tensor:
        return L(theta + t * u)

    return jacfwd(jacfwd(jacfwd(phi)))(torch.zeros((), dtype=theta.dtype, device=theta.device))


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def random_like_params(model: nn.Module, seed: int = 1) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same v on every device
    return [torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
            for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- the suite
COMBOS = [(a, lo, r) for a in ARCHS for lo in ("ce", "mse") for r in ("mean", "sum")]
# (loss, batch size, outputs): several batch and output sizes on the MLP
SIZES = [("ce", 1, 2), ("ce", 7, 5), ("mse", 1, 1), ("mse", 5, 4)]


class EstimatorSuite:
    """Inherit and set ``name`` + implement ``reference_dense`` (see module docstring)."""

    name: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    psd: ClassVar[bool] = False
    deterministic_multi_batch: ClassVar[bool] = True
    summary_has_d3: ClassVar[bool] = False
    rtol: ClassVar[float] = 1e-8
    atol: ClassVar[float] = 1e-10

    # ------------------------------------------------------------- hooks
    def reference_dense(self, model: nn.Module, loss_fn: nn.Module,
                        batches: list[tuple[Tensor, Tensor]]) -> Tensor:
        raise AssertionError(f"{type(self).__name__} must define reference_dense")

    def make(self, prob: Problem, **options: Any) -> Any:
        opts = {**self.options, **options}
        return curvkit.create("estimator", self.name, model=prob.model, loss_fn=prob.loss_fn,
                              **opts)

    def check(self, actual: Tensor, expected: Tensor, what: str) -> None:
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(actual, expected, rtol=self.rtol,
                                   atol=self.atol * max(1.0, scale), msg=lambda m: f"{what}: {m}")

    def check_diagonal(self, estimate: Tensor, dense: Tensor, prob: Problem) -> None:
        self.check(estimate, dense.diagonal(), "diagonal")

    def reference(self, prob: Problem) -> Tensor:
        return self.reference_dense(prob.model, prob.loss_fn, prob.batches)

    @property
    def capabilities(self) -> frozenset[str]:
        return curvkit.get_registry().get("estimator", self.name).provides

    def need(self, capability: str) -> None:
        if capability not in self.capabilities:
            pytest.skip(f"{self.name} does not provide {capability}")

    # ------------------------------------------------------------- matvec / dense
    @pytest.mark.parametrize("arch,loss,reduction", COMBOS)
    def test_matvec_dense_against_reference(self, arch: str, loss: str, reduction: str) -> None:
        prob = problem(arch, loss, reduction, n=5)
        est = self.make(prob)
        ref = self.reference(prob)
        P = prob.num_params
        assert ref.shape == (P, P)
        v = random_like_params(prob.model)
        Cv = est.matvec(prob.data(), v)
        assert [t.shape for t in Cv] == [p.shape for p in prob.params]
        self.check(flat(Cv), ref @ flat(v), "matvec")
        C = est.dense(prob.data())
        assert C.shape == (P, P) and C.dtype == DTYPE
        self.check(C, ref, "dense")
        # symmetry of the estimate itself
        self.check(C, C.T, "dense symmetry")
        if self.psd:
            evals = torch.linalg.eigvalsh((C + C.T) / 2)
            assert float(evals.min()) >= -1e-9 * max(1.0, float(evals.abs().max())), \
                f"{self.name} should be PSD, smallest eigenvalue {float(evals.min())}"

    @pytest.mark.parametrize("loss,n,out", SIZES)
    @pytest.mark.parametrize("reduction", ["mean", "sum"])
    def test_batch_and_output_sizes(self, loss: str, n: int, out: int, reduction: str) -> None:
        prob = problem("mlp", loss, reduction, n=n, out_features=out, seed=3)
        est = self.make(prob)
        ref = self.reference(prob)
        v = random_like_params(prob.model, seed=4)
        self.check(flat(est.matvec(prob.data(), v)), ref @ flat(v), "matvec")
        self.check(est.dense(prob.data()), ref, "dense")

    @pytest.mark.parametrize("arch,loss,reduction",
                             [("mlp", "ce", "mean"), ("cnn", "mse", "mean"),
                              ("skip", "ce", "sum"), ("mlp", "mse", "sum")])
    def test_several_batches_equal_concatenated_batch(self, arch: str, loss: str,
                                                      reduction: str) -> None:
        prob = problem(arch, loss, reduction, sizes=[3, 5, 2], seed=5)
        est = self.make(prob)
        ref = self.reference(prob)
        v = random_like_params(prob.model, seed=6)
        Cv = flat(est.matvec(prob.batches, v))
        C = est.dense(prob.batches)
        whole = est.dense(prob.batch)
        self.check(Cv, ref @ flat(v), "matvec over several batches")
        self.check(C, ref, "dense over several batches")
        if self.deterministic_multi_batch:
            self.check(C, whole, "several batches vs concatenated batch")
        # an iterator (e.g. a generator / data loader) works like a list
        self.check(est.dense(iter(prob.batches)), C, "dense from an iterator")

    # ------------------------------------------------------------- linearize
    @pytest.mark.parametrize("arch", ["mlp", "cnn"])
    @pytest.mark.parametrize("reduction", ["mean", "sum"])
    @pytest.mark.parametrize("sizes", [[5], [3, 5, 2]], ids=["one-batch", "three-batches"])
    def test_linearize_equals_matvec(self, arch: str, reduction: str, sizes: list[int]
                                     ) -> None:
        """``linearize(batch).matvec(v)`` is ``matvec(batch, v)`` (same scaling over
        batches), for several directions in a row from one operator (graph reuse)."""
        loss = "ce" if arch == "mlp" else "mse"
        prob = problem(arch, loss, reduction, sizes=sizes, seed=16)
        est = self.make(prob)
        op = est.linearize(prob.data())
        ref = self.reference(prob)
        for seed in (17, 18, 17):
            v = random_like_params(prob.model, seed=seed)
            Cv = op.matvec(v)
            assert [t.shape for t in Cv] == [p.shape for p in prob.params]
            torch.testing.assert_close(flat(Cv), flat(est.matvec(prob.data(), v)),
                                       rtol=1e-10, atol=1e-12)
            self.check(flat(Cv), ref @ flat(v), "linearize().matvec")

    def test_linearize_is_stale_after_a_parameter_update(self) -> None:
        prob = problem("skip", "ce", "mean", n=4, seed=19)
        est = self.make(prob)
        op = est.linearize(prob.data())
        v = random_like_params(prob.model, seed=20)
        op.matvec(v)
        with torch.no_grad():
            prob.params[0].add_(0.1)
        with pytest.raises(RuntimeError, match=r"parameters changed since linearize\(\)"):
            op.matvec(v)
        fresh = est.linearize(prob.data())  # a new operator at the new θ is valid again
        torch.testing.assert_close(flat(fresh.matvec(v)), flat(est.matvec(prob.data(), v)),
                                   rtol=1e-10, atol=1e-12)

    # ------------------------------------------------------------- diagonal
    @pytest.mark.parametrize("arch,loss,reduction", COMBOS)
    def test_diagonal(self, arch: str, loss: str, reduction: str) -> None:
        self.need("diagonal")
        prob = problem(arch, loss, reduction, n=5, seed=7)
        est = self.make(prob)
        d = est.diagonal(prob.data())
        assert [t.shape for t in d] == [p.shape for p in prob.params]
        self.check_diagonal(flat(d), self.reference(prob), prob)

    def test_diagonal_several_batches(self) -> None:
        self.need("diagonal")
        prob = problem("cnn", "ce", "mean", sizes=[2, 4], seed=8)
        est = self.make(prob)
        d = flat(est.diagonal(prob.batches))
        self.check_diagonal(d, self.reference(prob), prob)
        if self.deterministic_multi_batch:
            self.check(d, flat(est.diagonal(prob.batch)), "diagonal: batches vs concatenated")

    # ------------------------------------------------------------- kronecker
    @pytest.mark.parametrize("loss,reduction", [("ce", "mean"), ("ce", "sum"), ("mse", "mean"),
                                                ("mse", "sum")])
    def test_kronecker_is_exact_on_one_sample(self, loss: str, reduction: str) -> None:
        """On one sample, a Linear layer's block of the curvature over vec_r([W | b]) is
        exactly G ⊗ A (A the augmented input's outer product): checked against the dense
        reference for every layer of an MLP, under both reductions and both losses."""
        self.need("kronecker")
        prob = problem("mlp", loss, reduction, n=1, seed=21)
        est = self.make(prob)
        factors = est.kronecker(prob.data())
        ref = self.reference(prob)
        offsets, _ = param_offsets(prob.model)
        params = dict(prob.model.named_parameters())
        linears = [n for n, m in prob.model.named_modules() if isinstance(m, nn.Linear)]
        assert sorted(factors) == sorted(linears)
        for mod, kf in factors.items():
            d_out, d_in = params[kf.params[0]].shape
            cols = d_in + (1 if len(kf.params) > 1 else 0)
            assert kf.A.shape == (cols, cols) and kf.G.shape == (d_out, d_out)
            idx = [offsets[kf.params[0]] + o * d_in + i if i < d_in else
                   offsets[kf.params[1]] + o for o in range(d_out) for i in range(cols)]
            self.check(torch.kron(kf.G, kf.A), ref[idx][:, idx], f"kronecker {mod}")

    # ------------------------------------------------------------- stateless, untouched model
    def test_repeated_calls_identical_and_model_untouched(self) -> None:
        prob = problem("skip", "ce", "mean", n=4, seed=9)
        before = copy.deepcopy(prob.model.state_dict())
        for p in prob.params:
            p.grad = torch.full_like(p, 0.5)
        rng = torch.get_rng_state()
        est = self.make(prob)
        v = random_like_params(prob.model, seed=10)
        a = est.matvec(prob.data(), v)
        b = est.matvec(prob.data(), v)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        if "diagonal" in self.capabilities:
            assert torch.equal(flat(est.diagonal(prob.data())), flat(est.diagonal(prob.data())))
        with torch.no_grad():  # callers inside no_grad (e.g. optimizers) still get curvature
            c = est.matvec(prob.data(), v)
        self.check(flat(c), flat(a), "matvec under torch.no_grad")
        assert torch.equal(torch.get_rng_state(), rng), "global RNG state was changed"
        for k, t in prob.model.state_dict().items():
            assert torch.equal(t, before[k]), f"model state {k} changed"
        for p in prob.params:
            assert torch.equal(p.grad, torch.full_like(p, 0.5)), ".grad of the model changed"
            assert p.requires_grad
        assert not prob.model.frozen.requires_grad

    def test_frozen_parameters_are_excluded(self) -> None:
        prob = problem("skip", "mse", "mean", n=4, seed=11)
        est = self.make(prob)
        P = prob.num_params
        assert P == sum(p.numel() for n, p in prob.model.named_parameters() if n != "frozen")
        assert est.dense(prob.data()).shape == (P, P)

    # ------------------------------------------------------------- errors
    def test_reduction_none_is_rejected(self) -> None:
        model = mlp()
        with pytest.raises(ValueError, match="reduction='none'"):
            curvkit.create("estimator", self.name, model=model,
                           loss_fn=nn.MSELoss(reduction="none"), **self.options)

    def test_model_without_trainable_parameters_is_rejected(self) -> None:
        model = mlp()
        model.requires_grad_(False)
        with pytest.raises(ValueError, match="no trainable parameters"):
            curvkit.create("estimator", self.name, model=model, loss_fn=make_loss("ce"),
                           **self.options)

    def test_wrong_vector_shapes_are_rejected(self) -> None:
        prob = problem("mlp", "ce", "mean", n=3)
        est = self.make(prob)
        v = random_like_params(prob.model)
        with pytest.raises(ValueError, match="tensors"):
            est.matvec(prob.data(), v[:-1])
        bad = list(v)
        bad[1] = torch.zeros(7, dtype=DTYPE, device=v[1].device)
        with pytest.raises(ValueError, match=r"v\[1\] has shape \(7,\)"):
            est.matvec(prob.data(), bad)

    # ------------------------------------------------------------- summary
    def _summary_case(self, arch: str, loss: str, reduction: str, seed: int = 12
                      ) -> tuple[Problem, Any, Tensor, list[Tensor]]:
        self.need("summary")
        prob = problem(arch, loss, reduction, n=4, seed=seed)
        est = self.make(prob)
        u = random_like_params(prob.model, seed=seed + 1)
        return prob, est, self.reference(prob), u

    @staticmethod
    def _U(u: list[Tensor], partition: list[Tensor], groups: int) -> Tensor:
        """Ū (P×S): column s is u restricted to group s."""
        cols = []
        for s in range(groups):
            cols.append(flat([ui * (torch.as_tensor(ids).expand_as(ui) == s)
                              for ui, ids in zip(u, partition)]))
        return torch.stack(cols, dim=1)

    def _check_summary(self, prob: Problem, est: Any, C: Tensor, u: list[Tensor],
                       partition: list[Tensor], groups: int) -> Any:
        s = est.summary(prob.data(), u, partition, groups)
        U = self._U(u, partition, groups)
        g = gradient_reference(prob.model, prob.loss_fn, prob.batches)
        assert s.g.shape == (groups,) and s.H.shape == (groups, groups)
        self.check(s.g, U.T @ g, "summary g")
        self.check(s.H, U.T @ C @ U, "summary H")
        if self.summary_has_d3:
            assert s.D3 is not None and s.D3.shape == (groups,)
            d3 = torch.stack([third_directional_derivative(prob.model, prob.loss_fn,
                                                           prob.batches, U[:, k])
                              for k in range(groups)])
            self.check(s.D3, d3, "summary D3")
        else:
            assert s.D3 is None
        return s

    @pytest.mark.parametrize("arch,loss,reduction",
                             [("mlp", "ce", "mean"), ("cnn", "mse", "sum"),
                              ("skip", "mse", "mean"), ("cnn", "ce", "sum")])
    def test_summary_canonical_partition(self, arch: str, loss: str, reduction: str) -> None:
        prob, est, C, u = self._summary_case(arch, loss, reduction)
        partition = [torch.tensor(i, device=u[0].device) for i in range(len(u))]
        s = self._check_summary(prob, est, C, u, partition, len(u))
        # default partition = one group per parameter tensor
        d = est.summary(prob.data(), u)
        self.check(d.H, s.H, "summary with the default partition")

    def test_summary_trivial_partition(self) -> None:
        prob, est, C, u = self._summary_case("mlp", "mse", "mean")
        s = self._check_summary(prob, est, C, u, [torch.tensor(0)] * len(u), 1)
        self.check(s.H[0, 0], flat(u) @ C @ flat(u), "S=1: H = uᵀ C u")

    def test_summary_discrete_partition(self) -> None:
        prob, est, C, u = self._summary_case("mlp", "ce", "sum")
        P = prob.num_params
        ids = torch.arange(P).split([p.numel() for p in prob.params])
        partition = [i.reshape(p.shape) for i, p in zip(ids, prob.params)]
        s = est.summary(prob.data(), u, partition, P)
        uf = flat(u)
        self.check(s.H, torch.diag(uf) @ C @ torch.diag(uf), "S=P: H = diag(u) C diag(u)")

    def test_summary_mixed_partition_several_batches(self) -> None:
        self.need("summary")
        prob = problem("cnn", "ce", "mean", sizes=[2, 3], seed=13)
        est = self.make(prob)
        u = random_like_params(prob.model, seed=14)
        g = torch.Generator().manual_seed(15)
        # element-wise ids for two tensors, whole-tensor ids for the others
        partition = [torch.randint(0, 3, p.shape, generator=g) if i % 2 == 0
                     else torch.tensor(i % 3) for i, p in enumerate(prob.params)]
        self._check_summary(prob, est, self.reference(prob), u, partition, 3)

    def test_summary_empty_group_and_no_grad(self) -> None:
        """A group without parameters has a zero row/column (and D3 entry); callers inside
        ``torch.no_grad`` (optimizers) get the same summary."""
        prob, est, C, u = self._summary_case("skip", "ce", "mean")
        n = len(u)
        partition = [torch.tensor(i if i < 2 else i + 1) for i in range(n)]  # group 2 empty
        s = self._check_summary(prob, est, C, u, partition, n + 1)
        assert float(s.H[2].abs().max()) == 0.0 and float(s.H[:, 2].abs().max()) == 0.0
        with torch.no_grad():
            t = est.summary(prob.data(), u, partition, n + 1)
        self.check(t.H, s.H, "summary under torch.no_grad")
        self.check(t.g, s.g, "summary g under torch.no_grad")

    def test_summary_argument_errors(self) -> None:
        prob, est, _, u = self._summary_case("mlp", "ce", "mean")
        n = len(u)
        with pytest.raises(ValueError, match="partition has"):
            est.summary(prob.data(), u, [torch.tensor(0)] * (n - 1), 1)
        with pytest.raises(ValueError, match=r"ids must lie in \[0, groups=2\)"):
            est.summary(prob.data(), u, [torch.tensor(2)] * n, 2)
        with pytest.raises(ValueError, match="integer group ids"):
            est.summary(prob.data(), u, [torch.tensor(0.0)] * n, 1)
        with pytest.raises(ValueError, match=r"partition\[0\]"):
            est.summary(prob.data(), u, [torch.zeros(2, dtype=torch.long)] * n, 1)
        with pytest.raises(ValueError, match="direction"):
            est.summary(prob.data(), u[:-1], None, None)
