"""K-FAC factors (curvkit.estimators.kfac) against BackPACK, curvlinops and exact blocks.

Scaling conventions compared explicitly:

* curvkit: block over vec_r([W | b]) ≈ G ⊗ A, loss scale in G, A a mean over samples (and,
  for "expand", positions).
* BackPACK KFLR/KFAC (Linear): weight ≈ G ⊗ A_W with A_W = curvkit's A without the bias
  row/column, bias ≈ G. Conv2d: BackPACK sums the output gradients over positions before the
  outer product (curvkit's "reduce" G) and sums the input outer products over positions
  (T × curvkit's "expand" A).
* curvlinops KFACLinearOperator (separate_weight_and_bias=False): the same convention as
  curvkit; compared as dense matrices.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import curvkit
from curvkit.estimators.kfac import factors_to_dense, kronecker_factors
from curvkit.testing.estimator import ggn_reference
from curvkit.testing.problems import cnn, mlp, problem

DT = torch.float64


def est(name, model, loss_fn, **options):
    return curvkit.create("estimator", name, model=model, loss_fn=loss_fn, **options)


def shapes_of(model):
    return {n: p.shape for n, p in model.named_parameters()}


def block(dense, model, names):
    """The rows/columns of ``names`` (in model order) of a dense curvature matrix."""
    idx, start = [], 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            if n in names:
                idx.append(torch.arange(start, start + p.numel()))
            start += p.numel()
    idx = torch.cat(idx)
    return dense[idx][:, idx]


def no_hooks_left(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks and not getattr(m, "_backward_pre_hooks", {})


# ----------------------------------------------------------------------------- BackPACK
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("loss,reduction", [("ce", "mean"), ("ce", "sum"), ("mse", "mean"),
                                            ("mse", "sum")])
def test_kflr_matches_backpack(arch, loss, reduction):
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import KFLR

    prob = problem(arch, loss, reduction, n=5, seed=41)
    X, y = prob.batch
    ggn = est("ggn", prob.model, prob.loss_fn)
    expand = kronecker_factors(ggn, (X, y), "exact", "expand")
    reduce = kronecker_factors(ggn, (X, y), "exact", "reduce")
    model = backpack.extend(copy.deepcopy(prob.model))
    loss_fn = backpack.extend(copy.deepcopy(prob.loss_fn))
    with backpack.backpack(KFLR()):
        loss_fn(model(X), y).backward()
    assert set(expand) == {n for n, m in model.named_modules()
                           if isinstance(m, (nn.Linear, nn.Conv2d))}
    for name, f in expand.items():
        mod = model.get_submodule(name)
        Gb, Ab = mod.weight.kflr
        (Gb_bias,) = mod.bias.kflr
        assert f.params == (f"{name}.weight", f"{name}.bias")
        if isinstance(mod, nn.Conv2d):
            T = prob.model.get_submodule(name)(X).shape[-2:].numel()  # output pixels
            torch.testing.assert_close(reduce[name].G, Gb)
            torch.testing.assert_close(T * f.A[:-1, :-1], Ab)
        else:
            torch.testing.assert_close(f.G, Gb)
            torch.testing.assert_close(f.A[:-1, :-1], Ab)
            torch.testing.assert_close(reduce[name].G, f.G)  # T = 1: the flavours coincide
            torch.testing.assert_close(reduce[name].A, f.A)
        # bias block: G ⊗ A[-1, -1] with A[-1, -1] = 1 is the exact GGN of the bias
        assert float(f.A[-1, -1]) == 1.0
        torch.testing.assert_close(reduce[name].G, Gb_bias)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("loss,reduction", [("mse", "mean"), ("mse", "sum")])
def test_mc_factors_match_backpack_kfac_with_the_same_random_stream(arch, loss, reduction):
    """For MSE, BackPACK's KFAC draws its Gaussian labels from the global RNG with the same
    call curvkit makes on its private generator: seeded alike, the factors agree (to
    BackPACK's float32 σ = √½). (Cross-entropy labels come from inverse-CDF sampling, which
    keeps draws independent of the sharding over ranks, so there the comparison with
    BackPACK is statistical: see the next test.)"""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import KFAC

    prob = problem(arch, loss, reduction, n=5, seed=3)
    X, y = prob.batch
    e = est("fisher", prob.model, prob.loss_fn)
    rng = torch.get_rng_state()
    ours = kronecker_factors(e, (X, y), "mc", "reduce", mc_samples=3,
                             generator=torch.Generator().manual_seed(7))
    expand = kronecker_factors(e, (X, y), "mc", "expand", mc_samples=3,
                               generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), rng)
    model = backpack.extend(copy.deepcopy(prob.model))
    loss_fn = backpack.extend(copy.deepcopy(prob.loss_fn))
    with torch.random.fork_rng():
        torch.manual_seed(7)
        with backpack.backpack(KFAC(mc_samples=3)):
            loss_fn(model(X), y).backward()
    tol = dict(rtol=1e-9, atol=1e-12) if loss == "ce" else dict(rtol=2e-6, atol=1e-9)
    for name, f in ours.items():
        mod = model.get_submodule(name)
        Gb, Ab = mod.weight.kfac
        T = prob.model.get_submodule(name)(X).shape[-2:].numel() \
            if isinstance(mod, nn.Conv2d) else 1
        torch.testing.assert_close(f.G, Gb, **tol)  # "reduce" G (= "expand" G for T = 1)
        torch.testing.assert_close(T * expand[name].A[:-1, :-1], Ab)
        torch.testing.assert_close(f.G, mod.bias.kfac[0], **tol)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mc_factors_estimate_backpack_kflr_for_cross_entropy(arch, reduction):
    """BackPACK's KFAC is a Monte Carlo estimate of its KFLR; so is curvkit's: with many
    samples the sampled G approaches BackPACK's KFLR G (A is deterministic and equal)."""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import KFLR

    prob = problem(arch, "ce", reduction, n=5, seed=3)
    X, y = prob.batch
    e = est("fisher", prob.model, prob.loss_fn)
    ours = kronecker_factors(e, (X, y), "mc", "reduce", mc_samples=20000,
                             generator=torch.Generator().manual_seed(7))
    model = backpack.extend(copy.deepcopy(prob.model))
    loss_fn = backpack.extend(copy.deepcopy(prob.loss_fn))
    with backpack.backpack(KFLR()):
        loss_fn(model(X), y).backward()
    for name, f in ours.items():
        Gb = model.get_submodule(name).weight.kflr[0]
        err = float((f.G - Gb).norm() / Gb.norm())
        assert err < 0.03, f"{name}: relative error {err:.3g} of sampled G vs KFLR"


def test_mc_labels_do_not_depend_on_sharding():
    """Rows offset:offset+n of a global draw equal the same rows of the unsharded draw."""
    from curvkit.losses import loss_part

    torch.manual_seed(0)
    for loss_fn, out in ((nn.CrossEntropyLoss(), torch.randn(10, 4, 3, dtype=torch.float64)),
                         (nn.MSELoss(), torch.randn(10, 2, dtype=torch.float64)),
                         (nn.BCEWithLogitsLoss(), torch.randn(10, 2, dtype=torch.float64))):
        part = loss_part(loss_fn)
        full = part.sample_labels(out, 3, torch.Generator().manual_seed(5))
        some = part.sample_labels(out[4:9], 3, torch.Generator().manual_seed(5), rows=(4, 10))
        assert torch.equal(some, full[:, 4:9])


def test_inverse_cdf_labels_follow_the_softmax():
    from curvkit.losses import loss_part

    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]], dtype=torch.float64)
    labels = loss_part(nn.CrossEntropyLoss()).sample_labels(logits, 200000,
                                                            torch.Generator().manual_seed(0))
    p = torch.softmax(logits, 1)[0]
    freq = torch.bincount(labels[:, 0], minlength=4).to(p.dtype) / labels.shape[0]
    torch.testing.assert_close(freq, p, atol=4e-3, rtol=0)


def test_empirical_factors_match_backpack_batch_grad():
    """Empirical G of a Linear layer = Σ_n g_n g_nᵀ with g_n = √c ∇_s ℓ_n; BackPACK's per-sample
    bias gradients are c ∇_s ℓ_n, so G = Σ_n b_n b_nᵀ / c."""
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import BatchGrad

    for loss, reduction, c in (("ce", "mean", 1 / 6), ("mse", "mean", 1 / 18), ("mse", "sum", 1)):
        prob = problem("mlp", loss, reduction, n=6, seed=42)
        X, y = prob.batch
        ours = est("ef", prob.model, prob.loss_fn).kronecker((X, y))
        model = backpack.extend(copy.deepcopy(prob.model))
        loss_fn = backpack.extend(copy.deepcopy(prob.loss_fn))
        with backpack.backpack(BatchGrad()):
            loss_fn(model(X), y).backward()
        exact = est("ggn", prob.model, prob.loss_fn).kronecker((X, y))
        for name in ("0", "2"):
            b = model.get_submodule(name).bias.grad_batch
            torch.testing.assert_close(ours[name].G, b.T @ b / c)
            torch.testing.assert_close(ours[name].A, exact[name].A)


# ----------------------------------------------------------------------------- curvlinops
@pytest.mark.parametrize("arch,loss,reduction,approx",
                         [("mlp", "ce", "mean", "expand"), ("mlp", "mse", "sum", "reduce"),
                          ("cnn", "ce", "sum", "expand"), ("cnn", "mse", "mean", "reduce"),
                          ("cnn", "ce", "mean", "reduce")])
@pytest.mark.parametrize("statistic", ["exact", "empirical"])
def test_matches_curvlinops_kfac(arch, loss, reduction, approx, statistic):
    curvlinops = pytest.importorskip("curvlinops")
    prob = problem(arch, loss, reduction, sizes=[3, 4], seed=43)
    e = est("ggn", prob.model, prob.loss_fn)
    ours = kronecker_factors(e, prob.batches, statistic, approx)
    op = curvlinops.KFACLinearOperator(
        prob.model, prob.loss_fn, prob.params, prob.batches, check_deterministic=False,
        fisher_type={"exact": "type-2", "empirical": "empirical"}[statistic],
        kfac_approx=approx, separate_weight_and_bias=False)
    P = prob.num_params
    theirs = op @ torch.eye(P, dtype=DT)
    blocks = torch.block_diag(*[factors_to_dense(f, shapes_of(prob.model))
                                for f in ours.values()])
    torch.testing.assert_close(blocks, theirs)


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("loss_fn,y", [(nn.CrossEntropyLoss(), torch.tensor([1])),
                                       (nn.CrossEntropyLoss(reduction="sum"), torch.tensor([2])),
                                       (nn.MSELoss(), torch.randn(1, 3, dtype=DT)),
                                       (nn.MSELoss(reduction="sum"), torch.randn(1, 3, dtype=DT))])
def test_single_linear_layer_one_sample_is_exact(loss_fn, y):
    torch.manual_seed(44)
    lin = nn.Linear(4, 3).double()
    X = torch.randn(1, 4, dtype=DT)
    for name in ("ggn", "ef"):
        e = est(name, lin, loss_fn)
        for approx in ("expand", "reduce"):
            f = kronecker_factors(e, (X, y), {"ggn": "exact", "ef": "empirical"}[name],
                                  approx)[""]
            torch.testing.assert_close(factors_to_dense(f, shapes_of(lin)), e.dense((X, y)))


class PerPosition(nn.Module):
    """Linear on (N, T, d): "expand" setting when the loss sees every position, "reduce"
    setting when the positions are summed before the loss."""

    def __init__(self, reduce: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.reduce = reduce

    def forward(self, x):
        out = self.lin(x)
        return out.sum(1) if self.reduce else out


def test_weight_sharing_flavours_are_exact_in_their_setting():
    """Eschenhagen et al. (2023): one sample, one linear layer — expand is exact when the loss
    treats positions separately, reduce when positions are summed first; each is not exact
    in the other setting."""
    torch.manual_seed(45)
    X = torch.randn(1, 4, 3, dtype=DT)
    for reduce_setting in (False, True):
        model = PerPosition(reduce_setting).double()
        y = torch.randn(1, 2, dtype=DT) if reduce_setting else torch.randn(1, 4, 2, dtype=DT)
        loss_fn = nn.MSELoss(reduction="sum")
        ggn = est("ggn", model, loss_fn)
        exact = ggn.dense((X, y))
        flavours = {a: factors_to_dense(kronecker_factors(ggn, (X, y), "exact", a)["lin"],
                                        shapes_of(model)) for a in ("expand", "reduce")}
        good, bad = ("reduce", "expand") if reduce_setting else ("expand", "reduce")
        torch.testing.assert_close(flavours[good], exact)
        assert not torch.allclose(flavours[bad], exact)


@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, padding=1, stride=2),
    dict(kernel_size=2, dilation=2, bias=False),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=(2, 1), padding_mode="replicate", stride=(1, 2)),
    dict(kernel_size=2, padding="same", padding_mode="circular"),
    dict(kernel_size=(2, 3), padding="same"),
])
def test_conv_unfolding_is_exact_for_reduce(conv):
    """One sample, Conv2d then a sum over pixels: "reduce" is exact — this checks the
    unfolding (padding modes, stride, dilation, 'same') against the exact GGN block."""
    torch.manual_seed(46)
    model = nn.Sequential(nn.Conv2d(2, 3, **conv), nn.Flatten(2)).double()
    summed = nn.Sequential(model, SumLast()).double()
    X = torch.randn(1, 2, 5, 6, dtype=DT)
    y = torch.randn(1, 3, dtype=DT)
    e = est("ggn", summed, nn.MSELoss())
    f = kronecker_factors(e, (X, y), "exact", "reduce")["0.0"]
    torch.testing.assert_close(factors_to_dense(f, shapes_of(summed)), e.dense((X, y)))


class SumLast(nn.Module):
    def forward(self, x):
        return x.sum(-1)


def test_reduce_bias_block_is_the_exact_ggn_bias_block():
    """Σ_t g_t is the gradient w.r.t. the bias, so with "reduce" (A[-1, -1] = 1) the bias block
    G · A[-1, -1] is the exact GGN bias block for any batch (independent dense GGN)."""
    for model, shape in ((mlp(seed=47), (4,)), (cnn(seed=47), (1, 5, 5))):
        g = torch.Generator().manual_seed(47)
        X = torch.randn((4, *shape), generator=g, dtype=DT)
        y = torch.randint(0, 3, (4,), generator=g)
        loss_fn = nn.CrossEntropyLoss()
        ref = ggn_reference(model, loss_fn, [(X, y)])
        facs = kronecker_factors(est("ggn", model, loss_fn), (X, y), "exact", "reduce")
        assert len(facs) == 2
        for name, f in facs.items():
            torch.testing.assert_close(f.A[-1, -1], torch.tensor(1.0, dtype=DT))
            torch.testing.assert_close(f.G * f.A[-1, -1], block(ref, model, {f"{name}.bias"}))


# ----------------------------------------------------------------------------- batches
@pytest.mark.parametrize("name,loss,reduction", [("ggn", "ce", "mean"), ("ef", "mse", "sum"),
                                                 ("ggn", "mse", "sum"), ("ef", "ce", "mean")])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_several_batches_equal_concatenated_batch(name, loss, reduction, approx):
    prob = problem("cnn", loss, reduction, sizes=[3, 5, 2], seed=48)
    e = est(name, prob.model, prob.loss_fn, kfac_approx=approx)
    split = e.kronecker(prob.batches)
    whole = e.kronecker(prob.batch)
    assert list(split) == list(whole) == ["0", "3"]
    for n in split:
        torch.testing.assert_close(split[n].A, whole[n].A)
        torch.testing.assert_close(split[n].G, whole[n].G)


def test_mc_factors_approach_kflr_and_use_only_the_given_generator():
    prob = problem("cnn", "mse", "mean", n=5, seed=49)
    X, y = prob.batch
    e = est("fisher", prob.model, prob.loss_fn)
    rng = torch.get_rng_state()
    mc = kronecker_factors(e, (X, y), "mc", "expand", mc_samples=3000,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), rng)
    kflr = kronecker_factors(e, (X, y), "exact", "expand")
    for n in kflr:
        torch.testing.assert_close(mc[n].A, kflr[n].A)
        assert float((mc[n].G - kflr[n].G).norm() / kflr[n].G.norm()) < 0.08
    with pytest.raises(ValueError, match="needs a generator"):
        kronecker_factors(e, (X, y), "mc", "expand")


# ----------------------------------------------------------------------------- the user's model
class InplaceNet(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.act = nn.ReLU(inplace=inplace)
        self.fc2 = nn.Linear(5, 3)
        self.norm = nn.LayerNorm(3)
        self.unused = nn.Linear(3, 3)  # never called: not in the dict

    def forward(self, x):
        return self.norm(self.fc2(self.act(self.fc1(x))))


def test_hooks_removed_torch_func_works_inplace_ops_and_uncovered_modules():
    torch.manual_seed(50)
    model = InplaceNet(inplace=True).double()
    X, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    facs = est("ggn", model, loss_fn).kronecker((X, y))
    assert set(facs) == {"fc1", "fc2"}  # LayerNorm is not covered: not in the dict
    no_hooks_left(model)
    # torch.func transforms still work on the user's model
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda ps: functional_call(model, ps, (X,)))(params)
    assert jac["fc1.weight"].shape == (6, 3, 5, 4)
    # an in-place activation after a Linear does not corrupt the captured output
    plain = InplaceNet(inplace=False).double()
    plain.load_state_dict(model.state_dict())
    ref = est("ggn", plain, loss_fn).kronecker((X, y))
    for n in facs:
        torch.testing.assert_close(facs[n].G, ref[n].G)
        torch.testing.assert_close(facs[n].A, ref[n].A)


def test_frozen_weight_keeps_its_bias_factors_and_frozen_bias_is_not_augmented():
    torch.manual_seed(51)
    model = mlp(seed=51)
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    X, y = torch.randn(4, 4, dtype=DT), torch.randint(0, 3, (4,))
    e = est("ggn", model, nn.CrossEntropyLoss())
    facs = e.kronecker((X, y))
    assert set(facs) == {"0", "2"}
    assert facs["2"].params == ("2.weight",) and facs["2"].A.shape == (5, 5)
    # the frozen weight's trainable bias: A = [1] (curvlinops returns G for it too)
    assert facs["0"].params == ("0.bias",) and facs["0"].A.shape == (1, 1)


class Functional(nn.Module):
    """fc's weight is also used outside fc's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) + F.linear(x, self.fc.weight) * 0.5


class FunctionalUntraceable(Functional):
    """The same, with control flow on values: fx cannot read it at build, so the capture's
    gradient check is what catches the outside use."""

    def forward(self, x):
        if float(x.sum()) > -1e30:
            return super().forward(x)
        return x


def test_a_weight_used_outside_its_module_is_left_out_where_the_code_shows_it():
    model = Functional().double()
    X = torch.randn(3, 3, dtype=DT)
    y = torch.randn_like(model(X))
    from curvkit.estimators.kfac import kfac_exclusions
    assert "fc.weight outside the module's own forward" in kfac_exclusions(model)["fc"]
    facs = est("ggn", model, nn.MSELoss()).kronecker((X, y))
    assert [f.params for f in facs.values()] == [("fc.bias",)]


@pytest.mark.parametrize("model,match", [
    (FunctionalUntraceable(),
     r"module fc \(Linear\): the gradient of fc.weight is not explained"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten()),
     r"module 0 \(Conv2d\) has groups=2"),
])
def test_unsupported_configurations_raise_naming_the_module(model, match):
    model = model.double()
    X = torch.randn(3, 2, 4, 4, dtype=DT) if isinstance(model, nn.Sequential) \
        else torch.randn(3, 3, dtype=DT)
    out = model(X)
    y = torch.randn_like(out)
    e = est("ggn", model, nn.MSELoss())
    with pytest.raises(ValueError, match=match):
        e.kronecker((X, y))
    no_hooks_left(model)
    # the diagonal of ef/fisher falls back to per-sample products for such layers: still exact
    ef = est("ef", model, nn.MSELoss())
    dense = ef.dense((X, y))
    d = torch.cat([t.reshape(-1) for t in ef.diagonal((X, y))])
    torch.testing.assert_close(d, dense.diagonal())
    no_hooks_left(model)
