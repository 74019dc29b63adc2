"""Coverage of the layer-wise Kronecker preconditioners on the layers real models use.

* Conv1d and Conv3d have K-FAC factors: with one sample and one output position they are
  the exact GGN block; Conv1d equals the same convolution written as a height-1 Conv2d.
* Attention with a key bias (whose gradient is round-off: softmax is shift invariant) does
  not trip the factors' consistency check.
* ``structures()`` is the truth: SINGD and K-FAC report the fallback, and warn once, for
  a layer whose factors never arrive (a cross-attention's in_proj, an unused Linear) and
  for modules no handler covers (LayerNorm); the attention's out_proj is covered.
* BatchNorm in training mode with ``ef`` and the diagonal fallback is refused when the
  optimizer is built, and the advice (``fallback = "identity"``) trains.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit.errors import ConfigError
from curvkit.estimators.kfac import factors_to_dense

DT = torch.float64


def _one_position_block(model, X, y, loss_fn, module):
    est = curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn)
    fac = est.kronecker((X, y))[module]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    idx, start = {}, 0
    for n in names:
        idx[n] = (start, start + shapes[n].numel())
        start += shapes[n].numel()
    sel = torch.cat([torch.arange(*idx[p]) for p in fac.params])
    dense = est.dense((X, y))
    return factors_to_dense(fac, shapes), dense[sel][:, sel]


@pytest.mark.parametrize("conv", ["1d", "3d"])
def test_conv_factors_are_exact_for_one_sample_and_one_position(conv):
    torch.manual_seed(0)
    if conv == "1d":
        layer, X = nn.Conv1d(2, 3, 3), torch.randn(1, 2, 3, dtype=DT)
    else:
        layer, X = nn.Conv3d(2, 3, (2, 1, 2)), torch.randn(1, 2, 2, 1, 2, dtype=DT)
    model = nn.Sequential(layer, nn.Flatten(), nn.Tanh(), nn.Linear(3, 4)).double()
    y = torch.randint(0, 4, (1,))
    kfac, block = _one_position_block(model, X, y, nn.CrossEntropyLoss(), "0")
    torch.testing.assert_close(kfac, block)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv3d_with_stride_dilation_padding_passes_the_gradient_check(padding_mode,
                                                                        monkeypatch):
    """The capture verifies Σ_t g ãᵀ against the true weight gradient (it raises on a
    mismatch), so the patch layout of a strided, dilated, padded Conv3d is checked. (This
    model's code proves every layer's plain use, which skips the check: it is forced.)"""
    from curvkit.estimators.kfac import kfac_layers

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv3d(2, 3, 3, stride=(1, 2, 1), dilation=(2, 1, 1),
                                    padding=(1, 1, 0), padding_mode=padding_mode),
                          nn.Flatten(), nn.LazyLinear(4))
    X = torch.randn(3, 2, 6, 5, 4, dtype=DT)
    model(X.float())  # materialise the lazy layer
    model = model.double()
    for layer in kfac_layers(model):
        monkeypatch.setattr(layer, "plain", False)
    for est in ("ggn", "ef"):
        e = curvkit.create("estimator", est, model=model, loss_fn=nn.CrossEntropyLoss())
        fac = e.kronecker((X, torch.randint(0, 4, (3,))))
        assert fac["0"].A.shape == (2 * 27 + 1, 2 * 27 + 1)


def test_conv1d_equals_the_height_one_conv2d():
    torch.manual_seed(2)
    c1 = nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1).double()
    c2 = nn.Conv2d(2, 3, (1, 3), stride=(1, 2), padding=(0, 1)).double()
    with torch.no_grad():
        c2.weight.copy_(c1.weight.unsqueeze(2))
        c2.bias.copy_(c1.bias)
    m1 = nn.Sequential(c1, nn.Flatten(), nn.Linear(12, 3)).double()
    m2 = nn.Sequential(c2, nn.Flatten(), nn.Linear(12, 3)).double()
    m2[2].load_state_dict(m1[2].state_dict())
    X = torch.randn(5, 2, 8, dtype=DT)
    y = torch.randint(0, 3, (5,))
    f1 = curvkit.create("estimator", "ggn", model=m1, loss_fn=nn.CrossEntropyLoss()).kronecker(
        (X, y))
    f2 = curvkit.create("estimator", "ggn", model=m2, loss_fn=nn.CrossEntropyLoss()).kronecker(
        (X.unsqueeze(2), y))
    for n in ("0", "2"):
        torch.testing.assert_close(f1[n].A, f2[n].A)
        torch.testing.assert_close(f1[n].G, f2[n].G)


class KeyBiasAttention(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d)           # its bias shifts every score of a row equally
        self.v = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        att = torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1)
        return self.head((att @ self.v(x)).mean(1))


def test_attention_key_bias_is_not_a_false_alarm():
    torch.manual_seed(3)
    model = KeyBiasAttention().double()
    X, y = torch.randn(5, 6, 4, dtype=DT), torch.randint(0, 3, (5,))
    for est in ("ggn", "ef", "fisher"):
        e = curvkit.create("estimator", est, model=model, loss_fn=nn.CrossEntropyLoss())
        assert set(e.kronecker((X, y))) == {"q", "k", "v", "head"}


class WithMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.unused = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.emb(x)
        kv = torch.tanh(h)  # cross-attention: the in_proj has no factors, the out_proj has
        h = self.norm(h + self.mha(h, kv, kv, need_weights=False)[0])
        return self.head(h.mean(1))


@pytest.mark.parametrize("pre", ["kronecker", "lie_group"])
def test_structures_report_the_fallback_for_layers_without_factors(pre):
    torch.manual_seed(4)
    model = WithMHA().double()
    X, y = torch.randn(6, 5, 3, dtype=DT), torch.randint(0, 3, (6,))
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
        "lr": 0.05, "estimator": "ef",
        "preconditioner": {"name": pre, "fallback": "identity"}, "solver": "direct"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert torch.isfinite(opt.step((X, y)))
    msgs = [str(w.message) for w in caught]
    s = opt.preconditioner.structures()
    kron = "kronecker" if pre == "kronecker" else "lie_group[dense, dense]"
    assert s["emb.weight"] == s["head.weight"] == s["mha.out_proj.weight"] == kron
    for n in ("unused.weight", "norm.weight", "mha.in_proj_weight", "mha.in_proj_bias"):
        assert s[n] == "identity", (n, s[n])
    assert sum("'mha'" in m and "self-attention only" in m for m in msgs) == 1, msgs
    assert sum("'unused'" in m for m in msgs) == 1, msgs
    assert sum("no Kronecker handler covers" in m and "LayerNorm" in m for m in msgs) == 1
    if pre == "lie_group":
        assert "mha" not in opt.preconditioner.state["layers"]


def test_batchnorm_in_training_mode_is_decided_at_build_time():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(),
                          nn.Linear(6, 3)).double()
    X, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 3, (8,))
    cfg = {"lr": 0.1, "estimator": "ef", "preconditioner": "kronecker", "solver": "direct"}
    with pytest.raises(ConfigError, match=r"optimizer.preconditioner: .*BatchNorm1d.*"
                                          r"training mode.*fallback = 'identity'"):
        curvkit.build_optimizer(model, nn.CrossEntropyLoss(), cfg)
    cfg["preconditioner"] = {"name": "kronecker", "fallback": "identity"}
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), cfg)
    losses = [float(opt.step((X, y))) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert opt.counters["nonfinite"] == 0


def test_kronecker_with_a_loss_no_part_describes_is_refused_at_build():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    with pytest.raises(ConfigError, match="HuberLoss is not supported.*registered"):
        curvkit.build_optimizer(model, nn.HuberLoss(), {
            "lr": 0.1, "estimator": "ggn", "preconditioner": "kronecker", "solver": "direct"})
