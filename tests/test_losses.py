"""Loss parts (curvkit/losses/): each against the loss module itself in float64.

Per part and setting: the reduction factor and per-sample losses reproduce the module's
value (``ignore_index`` normalisation exact), the gradient is autograd's, the output-Hessian
factorization S Sᵀ is torch.func's Hessian of each sample's loss (the Gaussian NLL: its
Fisher information, the expected Hessian), ``hessian_vector`` is S Sᵀ w, sampled gradients
have E[s sᵀ] = H (statistical tolerance, fixed seed), sampling is reproducible and leaves the
global RNG alone. Then the estimators built on them: GGN = Jᵀ H J, EF against per-term
gradients and curvlinops, MC Fisher → GGN, NLL's zero GGN refused.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev

import curvkit
from curvkit.losses import GaussianNLL, UnsupportedLossError, loss_part

DT = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def cases() -> list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """(id, loss module, output, targets) covering every part and setting."""
    g = _gen(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=DT)  # noqa: E731
    out: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    for red in ("mean", "sum"):
        out.append((f"ce-{red}", nn.CrossEntropyLoss(reduction=red), r(5, 4),
                    torch.randint(0, 4, (5,), generator=g)))
        y = torch.randint(0, 4, (3, 6), generator=g)
        y[0, 1] = y[2, 4] = y[2, 5] = -100
        out.append((f"ce-seq-ignore-smooth-{red}",
                    nn.CrossEntropyLoss(reduction=red, label_smoothing=0.1), r(3, 4, 6), y))
        y = torch.randint(0, 4, (3, 2, 3), generator=g)
        y[1, 1, 2] = 7
        out.append((f"ce-2d-ignore7-{red}", nn.CrossEntropyLoss(reduction=red, ignore_index=7),
                    r(3, 4, 2, 3), y))
        out.append((f"ce-probs-smooth-{red}",
                    nn.CrossEntropyLoss(reduction=red, label_smoothing=0.2), r(4, 3, 2),
                    torch.softmax(r(4, 3, 2), 1)))
        w = torch.rand(4, generator=g, dtype=DT) + 0.25
        y = torch.randint(0, 4, (3, 6), generator=g)
        y[0, 1] = y[2, 4] = -100
        out.append((f"ce-weights-seq-ignore-smooth-{red}", nn.CrossEntropyLoss(
            reduction=red, weight=w, label_smoothing=0.1), r(3, 4, 6), y))
        out.append((f"ce-weights-{red}", nn.CrossEntropyLoss(reduction=red, weight=w),
                    r(5, 4), torch.randint(0, 4, (5,), generator=g)))
        out.append((f"ce-weights-probs-{red}", nn.CrossEntropyLoss(reduction=red, weight=w[:3]),
                    r(4, 3, 2), torch.softmax(r(4, 3, 2), 1)))
        out.append((f"mse-{red}", nn.MSELoss(reduction=red), r(4, 5, 3), r(4, 5, 3)))
        out.append((f"bce-{red}", nn.BCEWithLogitsLoss(reduction=red), r(5, 3),
                    torch.rand(5, 3, generator=g, dtype=DT).round()))
        out.append((f"bce-weights-{red}", nn.BCEWithLogitsLoss(
            reduction=red, weight=torch.rand(3, generator=g, dtype=DT) + 0.5,
            pos_weight=torch.tensor([0.5, 2.0, 3.0], dtype=DT)), r(4, 2, 3),
            torch.rand(4, 2, 3, generator=g, dtype=DT)))
        o = r(5, 4)
        o[:, 2:] = o[:, 2:].exp()  # positive variances
        out.append((f"gauss-{red}", GaussianNLL(reduction=red, full=True), o, r(5, 2)))
        y = torch.randint(0, 4, (5,), generator=g)
        y[3] = -100
        out.append((f"nll-{red}", nn.NLLLoss(reduction=red), torch.log_softmax(r(5, 4), 1), y))
    return out


CASES = cases()
IDS = [c[0] for c in CASES]


def per_sample_hessian(part, out, y):
    """(N, E, E): ∂²ℓ_n/∂f_n² by torch.func (E entries per sample)."""
    N = out.shape[0]
    blocks = []
    for n in range(N):
        def f(o, n=n):
            full = out.clone()
            full[n] = o
            return part.per_sample(full, y)[n]
        blocks.append(hessian(f)(out[n].clone()).reshape(out[n].numel(), -1))
    return torch.stack(blocks)


def expected_hessian(part, out, y):
    """The output Hessian the part stands for: exact, or the Gaussian's Fisher information."""
    if part.name == "gaussian_nll":
        v = out.chunk(2, -1)[1].clamp(min=part.loss_fn.eps)
        d = torch.cat([1 / v, 0.5 / v ** 2], -1).reshape(out.shape[0], -1)
        return torch.diag_embed(d)
    return per_sample_hessian(part, out, y)


def outer_of(S):
    """(N, E, E) = Σ_k S_k[n] S_k[n]ᵀ for columns (K, N, …)."""
    K, N = S.shape[0], S.shape[1]
    s = S.reshape(K, N, -1)
    return torch.einsum("kne,knf->nef", s, s)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reduction_factor_and_per_sample_losses_give_the_loss(case):
    _, loss_fn, out, y = case
    part = loss_part(loss_fn)
    c = part.reduction_factor(out, y)
    torch.testing.assert_close(c * part.per_sample(out, y).sum(), loss_fn(out, y))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_is_autograd_of_the_loss(case):
    _, loss_fn, out, y = case
    part = loss_part(loss_fn)
    z = out.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(loss_fn(z, y), z)
    torch.testing.assert_close(part.reduction_factor(out, y) * part.gradient(out, y), ref)


@pytest.mark.parametrize("case", [c for c in CASES if not c[0].startswith("nll")],
                         ids=[i for i in IDS if not i.startswith("nll")])
def test_hessian_factorization_and_product(case):
    _, loss_fn, out, y = case
    part = loss_part(loss_fn)
    H = expected_hessian(part, out, y)
    torch.testing.assert_close(outer_of(part.hessian_sqrt(out, y, "separate")), H)
    w = torch.randn(out.shape, generator=_gen(3), dtype=DT)
    Hw = torch.einsum("nef,nf->ne", H, w.reshape(out.shape[0], -1)).reshape(out.shape)
    torch.testing.assert_close(part.hessian_vector(out, y)(w), Hw)
    # joint columns (K-FAC's): the same blocks on each term, cross-term blocks aside
    J = part.hessian_sqrt(out, y, "joint")
    assert J.shape[0] == part.terms(out).shape[-1]
    st = part.terms(J, lead=1)                      # (K, N, T, D)
    blocks = torch.einsum("kntd,knte->ntde", st, st)
    ref = part.terms(part.hessian_sqrt(out, y, "separate"), lead=1)
    torch.testing.assert_close(blocks, torch.einsum("kntd,knte->ntde", ref, ref))


@pytest.mark.parametrize("case", [c for c in CASES if c[0].endswith("-sum")],
                         ids=[i for i in IDS if i.endswith("-sum")])
def test_sampled_gradients_estimate_the_hessian_and_are_reproducible(case):
    name, loss_fn, out, y = case
    part = loss_part(loss_fn)
    state = torch.random.get_rng_state()
    M = 40000
    S = part.sampled_gradients(out, y, M, _gen(7))
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG was touched"
    assert torch.equal(part.sampled_gradients(out, y, 5, _gen(8)),
                       part.sampled_gradients(out, y, 5, _gen(8)))
    # per term: E[s sᵀ] = H's term block (the NLL: the Fisher of the softmax, diag p − …)
    est = part.terms(S, lead=1)                     # (M, N, T, D)
    got = torch.einsum("mntd,mnte->ntde", est, est) / M
    if name.startswith("nll"):
        p = out.exp().reshape(out.shape[0], out.shape[1], -1).transpose(1, 2)
        w = part.term_weights(out, y)
        ref = torch.diag_embed(p) * (1.0 if w is None else w[..., None, None])
    else:
        sq = part.terms(part.hessian_sqrt(out, y, "separate"), lead=1)
        ref = torch.einsum("kntd,knte->ntde", sq, sq)
    scale = ref.abs().amax()
    assert float((got - ref).abs().max() / scale) < 0.06, name


def test_ignore_index_normalisation_is_exact():
    loss_fn = nn.CrossEntropyLoss()
    out = torch.randn(2, 3, 4, dtype=DT)
    y = torch.tensor([[0, -100, 2, -100], [1, 1, -100, 0]])
    part = loss_part(loss_fn)
    assert part.reduction_factor(out, y) == 1 / 5
    g = part.gradient(out, y)
    assert torch.equal(g[0, :, 1], torch.zeros(3, dtype=DT))
    assert float(part.hessian_sqrt(out, y)[:, 0, :, 1].abs().max()) == 0.0


def test_refusals_name_the_loss_and_the_registered_parts():
    with pytest.raises(UnsupportedLossError, match=r"loss HuberLoss is not supported.*"
                                                   r"registered: bce_with_logits.*cross_entropy"):
        loss_part(nn.HuberLoss())
    with pytest.raises(UnsupportedLossError, match="class weights"):
        loss_part(nn.CrossEntropyLoss(weight=torch.tensor([1.0, -1.0, 2.0])))
    model = nn.Sequential(nn.Linear(3, 4), nn.LogSoftmax(-1)).double()
    with pytest.raises(UnsupportedLossError, match="GGN are zero.*CrossEntropyLoss"):
        curvkit.create("estimator", "ggn", model=model, loss_fn=nn.NLLLoss())
    # the NLL's gradient and sampling are fine: ef and fisher run
    curvkit.create("estimator", "ef", model=model, loss_fn=nn.NLLLoss())
    curvkit.create("estimator", "fisher", model=model, loss_fn=nn.NLLLoss())


def test_components_list_the_loss_parts():
    assert {"cross_entropy", "mse", "bce_with_logits", "gaussian_nll", "nll"} <= \
        set(curvkit.components()["loss"])


# ----------------------------------------------------------------------------- estimators
class SeqModel(nn.Module):
    """(N, L, d) → per-position Linear, then a Linear across positions (mixes them)."""

    def __init__(self, d: int, out: int, L: int, layout: str) -> None:
        super().__init__()
        self.lin = nn.Linear(d, out)
        self.mix = nn.Linear(L, L, bias=False)
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.lin(x).transpose(1, 2))  # (N, out, L)
        return h if self.layout == "ncl" else h.transpose(1, 2)


def seq_problem(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    N, L, d = 4, 3, 5
    X = torch.randn(N, L, d, dtype=DT)
    if kind == "ce":
        y = torch.randint(0, 4, (N, L))
        y[1, 2] = -100
        return SeqModel(d, 4, L, "ncl").double(), nn.CrossEntropyLoss(label_smoothing=0.1), X, y
    if kind == "ce-weights":
        y = torch.randint(0, 4, (N, L))
        y[1, 2] = -100
        w = torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT)
        return (SeqModel(d, 4, L, "ncl").double(),
                nn.CrossEntropyLoss(weight=w, label_smoothing=0.1), X, y)
    if kind == "mse":
        return SeqModel(d, 2, L, "nlc").double(), nn.MSELoss(), X, torch.randn(N, L, 2,
                                                                            dtype=DT)
    if kind == "bce":
        return (SeqModel(d, 2, L, "nlc").double(),
                nn.BCEWithLogitsLoss(reduction="sum", pos_weight=torch.tensor([2.0, 0.5],
                                                                              dtype=DT)),
                X, torch.rand(N, L, 2, dtype=DT))
    m = SeqModel(d, 4, L, "nlc").double()
    with torch.no_grad():
        m.lin.bias[2:] += 3.0  # positive variances at the start
    return m, GaussianNLL(), X, torch.randn(N, L, 2, dtype=DT)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def forward_of(model):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(theta, X):
        ps, i = {}, 0
        for n, s in zip(names, shapes):
            k = s.numel()
            ps[n] = theta[i:i + k].reshape(s)
            i += k
        return torch.func.functional_call(model, ps, (X,))

    return f


@pytest.mark.parametrize("kind", ["ce", "ce-weights", "mse", "bce", "gauss"])
def test_ggn_is_jt_h_j(kind):
    model, loss_fn, X, y = seq_problem(kind)
    f, theta = forward_of(model), flat(model)
    out = f(theta, X).detach()
    J = jacrev(lambda t: f(t, X))(theta).reshape(out.numel(), -1)
    part = loss_part(loss_fn)
    H = torch.block_diag(*expected_hessian(part, out, y)) * part.reduction_factor(out, y)
    est = curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn)
    torch.testing.assert_close(est.dense((X, y)), J.T @ H @ J)
    ref_diag = torch.diagonal(J.T @ H @ J)
    torch.testing.assert_close(torch.cat([d.reshape(-1) for d in est.diagonal((X, y))]),
                               ref_diag)


@pytest.mark.parametrize("kind", ["ce", "ce-weights", "mse", "bce", "gauss"])
def test_ef_is_one_outer_product_per_loss_term(kind):
    """EF = c Σ_{n,t} ∇θ ℓ_{n,t} ∇θ ℓ_{n,t}ᵀ (per-term default) and c Σ_n ∇ℓ_n ∇ℓ_nᵀ
    (``outer_products = "per_sample"``), from the per-term gradients by jacrev."""
    model, loss_fn, X, y = seq_problem(kind)
    part = loss_part(loss_fn)
    f, theta = forward_of(model), flat(model)
    out = f(theta, X).detach()
    c = part.reduction_factor(out, y)

    def term_losses(t):
        o = f(t, X)
        g = part.gradient(o, y).detach()  # ℓ_{n,t}'s gradient is linear: use ⟨g_t, o_t⟩
        return (part.terms(g) * part.terms(o)).sum(-1).reshape(-1)  # (N·T,)

    G = jacrev(term_losses)(theta)
    est = curvkit.create("estimator", "ef", model=model, loss_fn=loss_fn)
    E = est.dense((X, y))
    torch.testing.assert_close(E, c * G.T @ G)
    v = [torch.randn_like(p) for p in model.parameters()]
    Ev = torch.cat([t.reshape(-1) for t in est.matvec((X, y), v)])
    torch.testing.assert_close(Ev, E @ torch.cat([t.reshape(-1) for t in v]))
    torch.testing.assert_close(torch.cat([d.reshape(-1) for d in est.diagonal((X, y))]),
                               torch.diagonal(E))
    per_sample = curvkit.create("estimator", "ef", model=model, loss_fn=loss_fn,
                                outer_products="per_sample")
    Gs = G.reshape(X.shape[0], -1, G.shape[-1]).sum(1)
    torch.testing.assert_close(per_sample.dense((X, y)), c * Gs.T @ Gs)


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_ef_matches_curvlinops_on_sequence_outputs(kind):
    curvlinops = pytest.importorskip("curvlinops")
    model, loss_fn, X, y = seq_problem(kind)
    if kind == "ce":
        y = y.clamp_min(0)
        loss_fn = nn.CrossEntropyLoss()
    params = list(model.parameters())
    op = curvlinops.EFLinearOperator(model, loss_fn, params, [(X, y)])
    est = curvkit.create("estimator", "ef", model=model, loss_fn=loss_fn)
    v = [torch.randn_like(p) for p in params]
    for a, b in zip(est.matvec((X, y), v), op @ [t.clone() for t in v]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["ce", "ce-weights", "bce", "gauss"])
def test_mc_fisher_approaches_the_ggn(kind):
    model, loss_fn, X, y = seq_problem(kind)
    ggn = curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn).dense((X, y))
    fisher = curvkit.create("estimator", "fisher", model=model, loss_fn=loss_fn,
                            mc_samples=20000, seed=3).dense((X, y))
    err = float((fisher - ggn).norm() / ggn.norm())
    assert err < 0.05, err


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_class_weighted_cross_entropy_kfac_is_the_exact_ggn_for_one_sample(reduction):
    """K-FAC carries class weights: for one Linear and one sample KFLR is the exact GGN
    block; the weighted mean divides by the target's weight (so it cancels), the sum keeps
    it (w_y = 3)."""
    from curvkit.estimators.kfac import factors_to_dense, kronecker_factors
    torch.manual_seed(9)
    lin = nn.Linear(3, 4).double()
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0, 3.0], dtype=DT),
                                  reduction=reduction)
    X, y = torch.randn(1, 3, dtype=DT), torch.tensor([3])
    ggn = curvkit.create("estimator", "ggn", model=lin, loss_fn=loss_fn)
    f = kronecker_factors(ggn, (X, y), "exact", "expand")[""]
    dense = factors_to_dense(f, {n: p.shape for n, p in lin.named_parameters()})
    torch.testing.assert_close(dense, ggn.dense((X, y)))
    if reduction == "mean":  # the weight cancels: the unweighted GGN
        plain = curvkit.create("estimator", "ggn", model=lin, loss_fn=nn.CrossEntropyLoss())
        torch.testing.assert_close(dense, plain.dense((X, y)))
    else:
        plain = curvkit.create("estimator", "ggn", model=lin,
                               loss_fn=nn.CrossEntropyLoss(reduction="sum"))
        torch.testing.assert_close(dense, 3.0 * plain.dense((X, y)))
