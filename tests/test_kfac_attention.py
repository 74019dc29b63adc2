"""K-FAC for nn.MultiheadAttention's projections (curvkit/estimators/kfac/attention.py).

References, float64: the same attention written with explicit nn.Linear modules for the
packed in_proj and the out_proj (whose K-FAC handler is tested against BackPACK and
curvlinops), expand and reduce, batch_first and sequence-first, masks; curvlinops'
KFACLinearOperator on that explicit model; the exact GGN block for one sample and one
token; exact diagonals. Plus the fallbacks: cross-attention's in_proj at run time, dropout
at build (one warning, structures() truthful).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
from curvkit.estimators.kfac import factors_to_dense, kronecker_factors

DT = torch.float64
E, H = 4, 2


def est(name, model, loss_fn, **options):
    return curvkit.create("estimator", name, model=model, loss_fn=loss_fn, **options)


class WithMHA(nn.Module):
    def __init__(self, batch_first=True, causal=False, cross=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.head = nn.Linear(E, 3)
        self.batch_first, self.causal, self.cross = batch_first, causal, cross

    def forward(self, x):  # x (N, L, E)
        xx = x if self.batch_first else x.transpose(0, 1)
        mask = None
        if self.causal:
            L = x.shape[1]
            mask = torch.triu(torch.full((L, L), float("-inf"), dtype=x.dtype), 1)
        kv = torch.tanh(xx) if self.cross else xx
        z, _ = self.attn(xx, kv, kv, attn_mask=mask, need_weights=False)
        z = z if self.batch_first else z.transpose(0, 1)
        return self.head(torch.tanh(z)).transpose(1, 2)  # (N, 3, L): a token per position


class Explicit(nn.Module):
    """The same function with in_proj and out_proj as nn.Linear modules."""

    def __init__(self, ref: WithMHA):
        super().__init__()
        self.in_proj = nn.Linear(E, 3 * E)
        self.out_proj = nn.Linear(E, E)
        self.head = nn.Linear(E, 3)
        with torch.no_grad():
            self.in_proj.weight.copy_(ref.attn.in_proj_weight)
            self.in_proj.bias.copy_(ref.attn.in_proj_bias)
            self.out_proj.load_state_dict(ref.attn.out_proj.state_dict())
            self.head.load_state_dict(ref.head.state_dict())
        self.causal = ref.causal

    def forward(self, x):
        N, L, _ = x.shape
        q, k, v = (t.reshape(N, L, H, E // H).transpose(1, 2)
                   for t in self.in_proj(x).chunk(3, -1))
        z = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        z = self.out_proj(z.transpose(1, 2).reshape(N, L, E))
        return self.head(torch.tanh(z)).transpose(1, 2)


def _problem(seed=0, **kw):
    torch.manual_seed(seed)
    model = WithMHA(**kw).double()
    X = torch.randn(3, 5, E, dtype=DT)
    y = torch.randint(0, 3, (3, 5))
    return model, X, y


@pytest.mark.parametrize("kw", [dict(), dict(batch_first=False, causal=True)])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_projections_have_the_factors_of_explicit_linear_modules(kw, approx):
    model, X, y = _problem(**kw)
    explicit = Explicit(model).double()
    loss_fn = nn.CrossEntropyLoss()
    torch.testing.assert_close(model(X), explicit(X))
    for name, stat in (("ggn", "exact"), ("ef", "empirical")):
        ours = kronecker_factors(est(name, model, loss_fn), (X, y), stat, approx)
        ref = kronecker_factors(est(name, explicit, loss_fn), (X, y), stat, approx)
        assert set(ours) == {"attn", "attn.out_proj", "head"}
        assert ours["attn"].params == ("attn.in_proj_weight", "attn.in_proj_bias")
        for mine, theirs in (("attn", "in_proj"), ("attn.out_proj", "out_proj"),
                             ("head", "head")):
            torch.testing.assert_close(ours[mine].A, ref[theirs].A)
            torch.testing.assert_close(ours[mine].G, ref[theirs].G)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_projections_match_curvlinops_on_the_explicit_model(approx):
    curvlinops = pytest.importorskip("curvlinops")
    model, X, y = _problem(seed=1)
    explicit = Explicit(model).double()
    loss_fn = nn.CrossEntropyLoss()
    ours = kronecker_factors(est("ggn", model, loss_fn), (X, y), "exact", approx)
    op = curvlinops.KFACLinearOperator(
        explicit, loss_fn, list(explicit.parameters()), [(X, y)], check_deterministic=False,
        fisher_type="type-2", kfac_approx=approx, separate_weight_and_bias=False)
    op.compute_kronecker_factors()
    for mine, theirs in (("attn", "in_proj"), ("attn.out_proj", "out_proj")):
        torch.testing.assert_close(ours[mine].A, op._input_covariances[theirs])
        torch.testing.assert_close(ours[mine].G, op._gradient_covariances[theirs])


def test_one_sample_one_token_is_the_exact_ggn_block():
    torch.manual_seed(2)
    model = WithMHA().double()
    X = torch.randn(1, 1, E, dtype=DT)
    y = torch.randint(0, 3, (1, 1))
    ggn = est("ggn", model, nn.CrossEntropyLoss())
    dense = ggn.dense((X, y))
    f = kronecker_factors(ggn, (X, y), "exact", "expand")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    sizes = [p.numel() for p in model.parameters()]
    # in_proj (weight, bias) then out_proj (weight, bias): the first four parameters
    i = sum(sizes[:2])
    j = sum(sizes[:4])
    torch.testing.assert_close(factors_to_dense(f["attn"], shapes), dense[:i, :i])
    torch.testing.assert_close(factors_to_dense(f["attn.out_proj"], shapes),
                               dense[i:j, i:j])


def test_diagonals_of_the_projections_are_exact():
    model, X, y = _problem(seed=3, causal=True)
    for name in ("ef", "ggn"):
        e = est(name, model, nn.CrossEntropyLoss())
        d = torch.cat([t.reshape(-1) for t in e.diagonal((X, y))])
        torch.testing.assert_close(d, e.dense((X, y)).diagonal())


def _build(model, pre="kronecker"):
    cfg = {"optimizer": {"lr": 0.05, "estimator": "ef", "preconditioner": {"name": pre},
                         "solver": "direct"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), cfg)
    return opt, [str(w.message) for w in caught]


def test_cross_attention_covers_out_proj_and_falls_back_for_in_proj():
    model, X, y = _problem(seed=4, cross=True)
    f = kronecker_factors(est("ggn", model, nn.CrossEntropyLoss()), (X, y), "exact",
                          "expand")
    assert set(f) == {"attn.out_proj", "head"}
    opt, _ = _build(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step((X, y))
    assert any("'attn'" in str(w.message) for w in caught)
    s = opt.preconditioner.structures()
    assert s["attn.in_proj_weight"] == "diagonal" and s["attn.out_proj.weight"] == "kronecker"


@pytest.mark.parametrize("pre", ["kronecker", "lie_group"])
def test_attention_dropout_falls_back_with_one_warning_at_build(pre):
    model, X, y = _problem(seed=5)
    model.attn.dropout = 0.1
    opt, msgs = _build(model, pre)
    about = [m for m in msgs if "attention dropout" in m]
    assert len(about) == 1 and "attn" in about[0], msgs
    s = opt.preconditioner.structures()
    fallback = opt.preconditioner.options.fallback
    assert all(s[n] == fallback for n in s if n.startswith("attn."))
    assert s["head.weight"] != fallback
    for _ in range(2):
        assert torch.isfinite(opt.step((X, y)))


@pytest.mark.parametrize("kw", [dict(), dict(batch_first=False, causal=True)])
def test_the_optimizers_own_pass_through_the_capture_is_bitwise_the_modules(kw):
    """ef's fused statistics run the optimizer's forward and backward through the attention
    handler (observe_pass): the loss and every parameter gradient are bitwise the module's,
    and the statistics taken from that pass equal those of a pass of curvkit's own."""
    from curvkit.estimators.kfac import kfac_layers, observe_pass
    model, X, y = _problem(seed=6, **kw)
    loss_fn = nn.CrossEntropyLoss()
    loss = loss_fn(model(X), y)
    ref = torch.autograd.grad(loss, list(model.parameters()))
    with observe_pass(model, kfac_layers(model)) as obs:
        loss2 = loss_fn(model(X), y)
        loss2.backward()
    assert torch.equal(loss, loss2)
    for p, r in zip(model.parameters(), ref):
        assert torch.equal(p.grad, r)
    e = est("ef", model, loss_fn)
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        fused = kronecker_factors(e, (X, y), "empirical", "expand",
                                  observed=lambda X_, y_: obs)
        assert not calls, "the statistics were not taken from the observed pass"
    finally:
        handle.remove()
    own = kronecker_factors(e, (X, y), "empirical", "expand")
    assert set(fused) == set(own) == {"attn", "attn.out_proj", "head"}
    for n in own:
        torch.testing.assert_close(fused[n].A, own[n].A)
        torch.testing.assert_close(fused[n].G, own[n].G)


def test_an_own_capture_inside_an_open_observation_shares_the_attention_hook():
    """The optimizer keeps an observation open during the caller's pass; an own capture
    pass inside it must still see its records in the graph (one shared output hook)."""
    from curvkit.estimators.kfac import kfac_layers, observe_pass
    model, X, y = _problem(seed=7)
    e = est("ggn", model, nn.CrossEntropyLoss())
    ref = kronecker_factors(e, (X, y), "exact", "expand")
    with observe_pass(model, kfac_layers(model)):
        inside = kronecker_factors(e, (X, y), "exact", "expand")
    assert not model.attn._forward_hooks
    for n in ref:
        torch.testing.assert_close(inside[n].A, ref[n].A)
        torch.testing.assert_close(inside[n].G, ref[n].G)
