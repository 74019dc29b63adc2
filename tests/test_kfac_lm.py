"""Embedding K-FAC, and a padded-target language model under K-FAC and SINGD.

* Embedding: with one sample and one position its K-FAC block is the exact GGN block (the
  lookup is a Linear on one-hot inputs; its factors come with the slots swapped, since the
  stored weight (V, d) is that Linear's transpose); the padding row gets no curvature.
* A small language model (Embedding + TransformerEncoderLayer + head, (N, V, L) logits,
  targets padded with ignore_index) trains under kronecker (fisher) and lie_group (ef):
  Embedding, the attention's in_proj and out_proj, the feed-forward Linears and the head
  are Kronecker-covered; what no handler covers (LayerNorm) falls back and says so.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit.estimators.kfac import factors_to_dense

DT = torch.float64


def test_embedding_factors_are_exact_for_one_sample_and_one_position():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Tanh(), nn.Linear(3, 4)).double()
    X, y = torch.tensor([[2]]), torch.tensor([1])
    est = curvkit.create("estimator", "ggn", model=model, loss_fn=nn.CrossEntropyLoss())
    fac = est.kronecker((X, y))["0"]
    assert fac.G.shape == (5, 5) and fac.A.shape == (3, 3)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    torch.testing.assert_close(factors_to_dense(fac, shapes), est.dense((X, y))[:15, :15])


def test_embedding_padding_row_and_diagonal():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(6, 3, padding_idx=0), nn.Flatten(),
                          nn.Linear(6, 4)).double()
    X, y = torch.tensor([[0, 2], [3, 0], [2, 5]]), torch.tensor([1, 0, 3])
    for name in ("ggn", "ef"):
        est = curvkit.create("estimator", name, model=model, loss_fn=nn.CrossEntropyLoss())
        fac = est.kronecker((X, y))["0"]
        assert float(fac.G[0].abs().max()) == 0.0
        d = est.diagonal((X, y))[0]
        torch.testing.assert_close(d.reshape(-1), torch.diagonal(est.dense((X, y)))[:18])


class TinyLM(nn.Module):
    def __init__(self, V: int = 11, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.block = nn.TransformerEncoderLayer(d, 2, dim_feedforward=16, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(d, V)

    def forward(self, tokens):
        return self.head(self.block(self.emb(tokens))).transpose(1, 2)  # (N, V, L)


def lm_batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 11, (6, 7), generator=g)
    tokens[:3, 5:] = 0                             # padded inputs
    y = torch.roll(tokens, -1, 1)
    y[tokens == 0] = -100                          # padded targets are ignored
    y[:, -1] = -100
    return tokens, y


@pytest.mark.parametrize("estimator,pre", [
    ("fisher", "kronecker"), ("ef", "lie_group"),
    pytest.param("ggn", "kronecker", marks=pytest.mark.slow)])
def test_padded_language_model_trains_with_kronecker_coverage(estimator, pre):
    torch.manual_seed(2)
    model = TinyLM().double()
    loss_fn = nn.CrossEntropyLoss()
    options = {"name": pre, "fallback": "diagonal" if estimator == "ggn" else "identity"}
    if pre == "lie_group":
        options.update(update_every=1, lr_cov=0.05)
    opt = curvkit.build_optimizer(model, loss_fn, {
        "lr": 0.05 if pre == "kronecker" else 0.02, "estimator": estimator,
        "preconditioner": options, "solver": "direct"})
    batch = lm_batch(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        losses = [float(opt.step(batch)) for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    s = opt.preconditioner.structures()
    covered = {n for n, v in s.items() if v != options["fallback"]}
    assert covered == {"emb.weight", "block.self_attn.in_proj_weight",
                       "block.self_attn.in_proj_bias", "block.self_attn.out_proj.weight",
                       "block.self_attn.out_proj.bias", "block.linear1.weight",
                       "block.linear1.bias", "block.linear2.weight", "block.linear2.bias",
                       "head.weight", "head.bias"}, s
    assert {n for n in s if n not in covered} == {n for n in s if ".norm" in n}
