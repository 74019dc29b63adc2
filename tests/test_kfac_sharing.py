"""K-FAC with weight shared across calls (curvkit.estimators.kfac, module doc): a module
called several times, tied modules, an Embedding tied to the head (one Kronecker upper
bound of its two uses), and sharing K-FAC does not cover (a weight tied, biases not).

References, float64:
* curvlinops' KFACLinearOperator on the equivalent model that makes one call on the stack
  of the inputs (expand and reduce), and on the model itself (expand: A is R× ours for R
  calls, G equal; the documented difference of conventions);
* invariance: a Linear called once per position equals one call on (N, T, d);
* the exact GGN block where the identity holds (reduce, one sample, every use sees the
  same input);
* exact diagonals (per-sample gradients of all uses) against the dense EF.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit.estimators.kfac import factors_to_dense, kronecker_factors, kronecker_roots

DT = torch.float64


def est(name, model, loss_fn, **options):
    return curvkit.create("estimator", name, model=model, loss_fn=loss_fn, **options)


def shapes_of(model):
    return {n: p.shape for n, p in model.named_parameters()}


class TwoInputs(nn.Module):
    """One Linear ``shared`` called on two halves of the input (two uses per sample)."""

    def __init__(self, stacked: bool = False, d: int = 3, out: int = 4) -> None:
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, out)
        self.stacked = stacked

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        if self.stacked:  # one call on (N, 2, d): the same function
            z1, z2 = self.shared(torch.stack([x1, x2], 1)).unbind(1)
        else:
            z1, z2 = self.shared(x1), self.shared(x2)
        return self.head(torch.tanh(z1) * torch.sigmoid(z2))


class Sequential2(nn.Module):
    """The zoo's linear_twice: a Linear applied to its own output."""

    def __init__(self, d: int = 3, out: int = 4) -> None:
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def _pair(seed=0):
    torch.manual_seed(seed)
    twice = TwoInputs().double()
    stacked = TwoInputs(stacked=True).double()
    stacked.load_state_dict(twice.state_dict())
    X = torch.randn(5, 6, dtype=DT)
    return twice, stacked, X


def _curvlinops_blocks(model, loss_fn, X, y, approx, fisher_type="type-2"):
    curvlinops = pytest.importorskip("curvlinops")
    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.KFACLinearOperator(
        model, loss_fn, params, [(X, y)], check_deterministic=False,
        fisher_type=fisher_type, kfac_approx=approx, separate_weight_and_bias=False)
    op.compute_kronecker_factors()
    return op._input_covariances, op._gradient_covariances


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")])
def test_module_called_twice_equals_one_call_on_the_stack_and_curvlinops(approx, loss_fn):
    twice, stacked, X = _pair()
    y = torch.randint(0, 4, (5,)) if isinstance(loss_fn, nn.CrossEntropyLoss) else \
        torch.randn(5, 4, dtype=DT)
    ours = kronecker_factors(est("ggn", twice, loss_fn), (X, y), "exact", approx)
    one = kronecker_factors(est("ggn", stacked, loss_fn), (X, y), "exact", approx)
    assert set(ours) == {"shared", "head"}
    for n in ours:
        torch.testing.assert_close(ours[n].A, one[n].A)
        torch.testing.assert_close(ours[n].G, one[n].G)
    # curvlinops on the stacked model: the same factors
    A_c, G_c = _curvlinops_blocks(stacked, loss_fn, X, y, approx)
    for n in ours:
        torch.testing.assert_close(ours[n].A, A_c[n])
        torch.testing.assert_close(ours[n].G, G_c[n])
    # curvlinops on the model calling twice adds the calls' factors: under expand its A is
    # 2x ours (R = 2 calls of one position each) and G is the same
    if approx == "expand":
        A_t, G_t = _curvlinops_blocks(twice, loss_fn, X, y, approx)
        torch.testing.assert_close(2 * ours["shared"].A, A_t["shared"])
        torch.testing.assert_close(ours["shared"].G, G_t["shared"])


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_calls_per_position_equal_one_call_on_the_sequence(approx):
    """A Linear called once per position t (T calls on (N, d)) has the factors of one call
    on (N, T, d): sequence models, per-position loss (cross-entropy over (N, C, T))."""
    torch.manual_seed(3)

    class PerStep(nn.Module):
        def __init__(self, loop):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.loop = loop

        def forward(self, x):  # (N, T, 3) -> (N, 4, T)
            z = torch.stack([self.lin(x[:, t]) for t in range(x.shape[1])], 1) \
                if self.loop else self.lin(x)
            return torch.tanh(z).transpose(1, 2)

    a, b = PerStep(True).double(), PerStep(False).double()
    b.load_state_dict(a.state_dict())
    X = torch.randn(4, 5, 3, dtype=DT)
    y = torch.randint(0, 4, (4, 5))
    fa = kronecker_factors(est("ggn", a, nn.CrossEntropyLoss()), (X, y), "exact", approx)
    fb = kronecker_factors(est("ggn", b, nn.CrossEntropyLoss()), (X, y), "exact", approx)
    torch.testing.assert_close(fa["lin"].A, fb["lin"].A)
    torch.testing.assert_close(fa["lin"].G, fb["lin"].G)
    # and the roots of the same statistics
    ra = kronecker_roots(est("ggn", a, nn.CrossEntropyLoss()), (X, y), approx,
                         lambda out, y_, i: _exact_columns(out, y_))["lin"]
    torch.testing.assert_close(ra.A_root.T @ ra.A_root, fa["lin"].A)
    torch.testing.assert_close(ra.G_root.T @ ra.G_root, fa["lin"].G)


def _exact_columns(out, y):
    from curvkit.estimators.kfac import output_columns
    from curvkit.losses import loss_part
    return output_columns(loss_part(nn.CrossEntropyLoss(), "t"), out, y, "exact")


class SameInputTwice(nn.Module):
    """Two uses of ``proj`` on the same input x, combined nonlinearly."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)

    def forward(self, x):
        return torch.tanh(self.proj(x)) * torch.sigmoid(self.proj(x))


@pytest.mark.parametrize("loss_fn,y", [
    (nn.CrossEntropyLoss(), torch.tensor([2])),
    (nn.MSELoss(reduction="sum"), torch.randn(1, 3, dtype=DT, generator=torch.Generator()
                                               .manual_seed(1)))])
def test_reduce_is_exact_for_one_sample_when_every_use_sees_the_same_input(loss_fn, y):
    torch.manual_seed(5)
    model = SameInputTwice().double()
    X = torch.randn(1, 3, dtype=DT)
    ggn = est("ggn", model, loss_fn)
    exact = ggn.dense((X, y))
    f = {a: factors_to_dense(kronecker_factors(ggn, (X, y), "exact", a)["proj"],
                             shapes_of(model)) for a in ("reduce", "expand")}
    torch.testing.assert_close(f["reduce"], exact)
    assert not torch.allclose(f["expand"], exact)


@pytest.mark.parametrize("model_fn", [Sequential2, TwoInputs])
def test_diagonals_of_shared_layers_are_exact(model_fn):
    torch.manual_seed(6)
    model = model_fn().double()
    X = torch.randn(4, 6 if model_fn is TwoInputs else 3, dtype=DT)
    y = torch.randint(0, 4, (4,))
    for name in ("ef", "ggn"):
        e = est(name, model, nn.CrossEntropyLoss())
        d = torch.cat([t.reshape(-1) for t in e.diagonal((X, y))])
        torch.testing.assert_close(d, e.dense((X, y)).diagonal())


class TiedLinears(nn.Module):
    """Encoder/decoder Linears tied (same weight and bias): one layer with two uses."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.dec = nn.Linear(3, 3)
        self.dec.weight = self.enc.weight
        self.dec.bias = self.enc.bias

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def test_tied_modules_are_one_layer_like_one_module_called_twice():
    torch.manual_seed(7)
    tied = TiedLinears().double()

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(3, 3)

        def forward(self, x):
            return self.enc(torch.tanh(self.enc(x)))

    one = One().double()
    one.enc.load_state_dict(tied.enc.state_dict())
    X = torch.randn(5, 3, dtype=DT)
    y = torch.randn(5, 3, dtype=DT)
    for approx in ("expand", "reduce"):
        ft = kronecker_factors(est("ggn", tied, nn.MSELoss()), (X, y), "exact", approx)
        fo = kronecker_factors(est("ggn", one, nn.MSELoss()), (X, y), "exact", approx)
        assert list(ft) == ["enc"] and ft["enc"].params == ("enc.weight", "enc.bias")
        torch.testing.assert_close(ft["enc"].A, fo["enc"].A)
        torch.testing.assert_close(ft["enc"].G, fo["enc"].G)


class TiedHead(nn.Module):
    def __init__(self, vocab: int = 5, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)
        self.out.weight = self.emb.weight

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.emb(tokens).mean(1))))


def _untied(model: TiedHead) -> TiedHead:
    """The same function with the head's weight a separate copy: its Embedding and head
    factors are the two uses' terms of the tied model."""
    other = TiedHead().double()
    other.load_state_dict(model.state_dict())
    other.out.weight = nn.Parameter(model.emb.weight.detach().clone())
    return other


def _term_sum(untied, batch, approx):
    """Σ_i X_i ⊗ Y_i over vec_r([W | b]) (V, d+1) from the untied model's factors."""
    f = kronecker_factors(est("ggn", untied, nn.CrossEntropyLoss()), batch, "exact", approx)
    head = torch.kron(f["out"].G, f["out"].A)                  # over (V, d+1)
    Ge, Ae = f["emb"].G, f["emb"].A                             # slots swapped: G (V×V)
    d = Ae.shape[0]
    Y = torch.zeros(d + 1, d + 1, dtype=DT)
    Y[:d, :d] = Ae
    return head + torch.kron(Ge, Y)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_tied_embedding_head_is_one_kronecker_upper_bound_of_its_two_uses(approx):
    torch.manual_seed(8)
    model = TiedHead().double()
    X = torch.randint(0, 5, (6, 3))
    y = torch.randint(0, 5, (6,))
    f = kronecker_factors(est("ggn", model, nn.CrossEntropyLoss()), (X, y), "exact", approx)
    assert list(f) == ["emb", "mix"] and f["emb"].params == ("emb.weight", "out.bias")
    K = torch.kron(f["emb"].G, f["emb"].A)
    S = _term_sum(_untied(model), (X, y), approx)
    gap = torch.linalg.eigvalsh(K - S)
    assert float(gap.min()) > -1e-10 * float(S.norm()), float(gap.min())
    # the bound is not loose by more than the cross terms' minimal trace
    assert float((K - S).trace()) <= float(S.trace())
    # roots of the same group square to these factors
    r = kronecker_roots(est("ef", model, nn.CrossEntropyLoss()), (X, y), approx,
                        lambda out, y_, i: _exact_columns_ce(out, y_))["emb"]
    fe = kronecker_factors(est("ef", model, nn.CrossEntropyLoss()), (X, y), "exact",
                           approx)["emb"]
    torch.testing.assert_close(r.A_root.T @ r.A_root, fe.A)
    torch.testing.assert_close(r.G_root.T @ r.G_root, fe.G)


def _exact_columns_ce(out, y):
    from curvkit.estimators.kfac import output_columns
    from curvkit.losses import loss_part
    return output_columns(loss_part(nn.CrossEntropyLoss(), "t"), out, y, "exact")


def test_tied_head_alone_when_the_embedding_use_has_no_curvature():
    """With the embedding's output scaled by 0 its term vanishes: the group's factors are
    the head's own."""

    class Muted(TiedHead):
        def forward(self, tokens):
            h = self.emb(tokens).mean(1) * 0.0 + 1.0
            return self.out(torch.tanh(self.mix(h)))

    torch.manual_seed(9)
    model = Muted().double()
    X = torch.randint(0, 5, (6, 3))
    y = torch.randint(0, 5, (6,))
    f = kronecker_factors(est("ggn", model, nn.CrossEntropyLoss()), (X, y), "exact",
                          "expand")["emb"]
    other = Muted().double()
    other.load_state_dict(model.state_dict())
    other.out.weight = nn.Parameter(model.emb.weight.detach().clone())
    g = kronecker_factors(est("ggn", other, nn.CrossEntropyLoss()), (X, y), "exact",
                          "expand")["out"]
    torch.testing.assert_close(torch.kron(f.G, f.A), torch.kron(g.G, g.A))


@pytest.mark.parametrize("pre", ["kronecker", "lie_group"])
def test_tied_embedding_head_is_kronecker_covered_and_trains(pre):
    torch.manual_seed(8)
    model = TiedHead().double()
    X = torch.randint(0, 5, (6, 3))
    y = torch.randint(0, 5, (6,))
    cfg = {"optimizer": {"lr": 0.05, "estimator": "ef", "preconditioner": {"name": pre},
                         "solver": "direct"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), cfg)
        losses = [float(opt.step((X, y))) for _ in range(3)]
    assert not [w for w in caught if "shared by" in str(w.message)]
    fallback = opt.preconditioner.options.fallback
    assert all(v != fallback for v in opt.preconditioner.structures().values())
    assert all(torch.isfinite(torch.tensor(losses)))


class TiedWeightOwnBiases(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 3)
        self.dec = nn.Linear(3, 3)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


@pytest.mark.parametrize("pre", ["kronecker", "lie_group"])
def test_other_sharing_falls_back_with_one_warning_at_build(pre):
    """A weight tied while the biases are not: the weight falls back (one warning, at
    build, naming the modules and the way out), the biases stay Kronecker-covered."""
    torch.manual_seed(10)
    model = TiedWeightOwnBiases().double()
    X, y = torch.randn(6, 3, dtype=DT), torch.randn(6, 3, dtype=DT)
    cfg = {"optimizer": {"lr": 0.05, "estimator": "ef", "preconditioner": {"name": pre},
                         "solver": "direct"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = curvkit.build_optimizer(model, nn.MSELoss(), cfg)
    msgs = [str(w.message) for w in caught if "shared by dec.weight, enc.weight" in
            str(w.message)]
    assert len(msgs) == 1 and "untie" in msgs[0], [str(w.message) for w in caught]
    label = opt.preconditioner.structures()
    fallback = opt.preconditioner.options.fallback
    assert label["enc.weight"] == fallback
    assert label["enc.bias"] != fallback and label["dec.bias"] != fallback
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [float(opt.step((X, y))) for _ in range(3)]
    assert not [w for w in caught if "shared by" in str(w.message)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert opt.preconditioner.structures() == label


@pytest.mark.parametrize("reduction,approx", [("mean", "expand"), ("sum", "reduce")])
def test_one_accumulator_roots_square_to_the_factors_over_batches(reduction, approx):
    """kronecker_roots and kronecker_factors are one accumulator (roots as a flag): over
    two batches of different sizes, on a model with a shared layer and an Embedding."""

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 3)
            self.shared = nn.Linear(3, 3)
            self.head = nn.Linear(3, 4)

        def forward(self, tokens):
            z = self.shared(torch.tanh(self.shared(self.emb(tokens))))
            return self.head(z).transpose(1, 2)

    torch.manual_seed(11)
    model = Seq().double()
    batches = [(torch.randint(0, 6, (n, 5)), torch.randint(0, 4, (n, 5))) for n in (3, 5)]
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    for name in ("ef", "fisher"):  # the estimators with the kronecker_roots capability
        e = est(name, model, loss_fn, kfac_approx=approx)
        f = e.kronecker(batches)
        r = e.kronecker_roots(batches)
        assert set(f) == set(r) == {"emb", "shared", "head"}
        for n in f:
            torch.testing.assert_close(r[n].A_root.T @ r[n].A_root, f[n].A)
            torch.testing.assert_close(r[n].G_root.T @ r[n].G_root, f[n].G)


class _TiedAutoencoder(nn.Module):
    """The decoder reuses the encoder's weight transposed, outside the encoder's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 3)
        self.dec_bias = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.tanh(self.enc(x)), self.enc.weight.t(),
                                          self.dec_bias)


@pytest.mark.parametrize("estimator,preconditioner", [("fisher", "kronecker"),
                                                      ("ef", "lie_group")])
def test_a_weight_used_outside_its_module_falls_back_at_build(estimator, preconditioner):
    """Read from the code at build (fx): enc.weight is also used transposed by the decoder,
    so K-FAC leaves it to the fallback with one warning naming the way out, keeps the
    untouched bias covered, and trains (it failed at step 0 before)."""
    torch.manual_seed(0)
    model = _TiedAutoencoder().double()
    X = torch.randn(8, 6, dtype=torch.float64)
    with pytest.warns(UserWarning, match="uses enc.weight outside the module's own forward"):
        opt = curvkit.build_optimizer(model, nn.MSELoss(), {
            "lr": 0.1, "estimator": estimator, "preconditioner": preconditioner,
            "solver": "direct"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = [float(opt.step((X, X))) for _ in range(3)]
    assert losses[-1] < losses[0]
    structures = opt.structures()
    assert structures["enc.bias"].startswith(preconditioner)
    assert not structures["enc.weight"].startswith(preconditioner)
