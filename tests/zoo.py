"""The model zoo: the models researchers train, tiny, in float64 (P ≲ 250 each).

Each :class:`Case` builds a fresh model, a batch and a loss. The zoo is used by
``tests/test_zoo.py`` (every estimator capability against independent references, every
composition of docs/methods.md for 5 steps) and by ``python -m tests.zoo --write
docs/models.md``, which regenerates the support matrix from what the zoo measures.

``family`` groups cases that stress the same code path; the default test suite runs one
``fast`` case per family, ``tox -e slow`` all of them. ``smooth`` marks models whose loss
is smooth in the parameters (no ReLU/max-pool kinks), where third derivatives are checked
by finite differences. ``random`` marks models whose forward draws random numbers (dropout
in training mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DTYPE = torch.float64
N = 6  # samples per batch


@dataclass
class Case:
    name: str
    family: str
    build: Callable[[], tuple[nn.Module, tuple, nn.Module]]
    fast: bool = False
    smooth: bool = True
    random: bool = False
    note: str = ""


# ----------------------------------------------------------------------------- modules
class ResBlock(nn.Module):
    """conv–BN–tanh–conv–BN + skip, tanh, linear head (BatchNorm in training mode)."""

    def __init__(self, c: int = 2, side: int = 4, out: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c * side * side, out)

    def forward(self, x: Tensor) -> Tensor:
        z = torch.tanh(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(z))
        return self.head(torch.tanh(z + x).flatten(1))


class TinyLM(nn.Module):
    """Embedding + TransformerEncoderLayer + Linear head; logits (N, V, L)."""

    def __init__(self, vocab: int = 5, d: int = 4, heads: int = 2, ff: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        # GELU keeps the loss smooth, so third derivatives can be checked by differences
        self.layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True,
                                                activation="gelu")
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.layer(self.emb(tokens))).transpose(1, 2)


class MHA(nn.Module):
    """Self-attention with nn.MultiheadAttention, mean-pooled, linear head."""

    def __init__(self, need_weights: bool, d: int = 4, heads: int = 2, out: int = 3) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, out)
        self.need_weights = need_weights

    def forward(self, x: Tensor) -> Tensor:
        z, _ = self.attn(x, x, x, need_weights=self.need_weights)
        return self.head(torch.tanh(z).mean(1))


class KeyBiasAttention(nn.Module):
    """Hand-written single-head attention whose key projection has a bias (a parameter the
    loss is invariant to: softmax is shift-invariant along the keys)."""

    def __init__(self, d: int = 4, out: int = 3) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.head = nn.Linear(d, out)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        z = torch.softmax(scores, dim=-1) @ self.v(x)
        return self.head(z.mean(1))


class SDPAModel(nn.Module):
    """Attention through F.scaled_dot_product_attention (the flash kernel on CPU)."""

    def __init__(self, d: int = 4, out: int = 3) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, out)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        z = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        return self.head(z.squeeze(1).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], d: int = 3, hidden: int = 3, out: int = 3
                 ) -> None:
        super().__init__()
        self.rnn = cell(d, hidden, batch_first=True)
        self.head = nn.Linear(hidden, out)

    def forward(self, x: Tensor) -> Tensor:
        z, _ = self.rnn(x)
        return self.head(z[:, -1])


class LinearTwice(nn.Module):
    def __init__(self, d: int = 4, out: int = 3) -> None:
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class Tied(nn.Module):
    """Embedding tied to the output head (weight shared), mean-pooled tokens."""

    def __init__(self, vocab: int = 5, d: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab)
        self.out.weight = self.emb.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.emb(tokens).mean(1))))


class FrozenUnused(nn.Module):
    """A frozen layer, a trainable layer the forward never uses, and a used one."""

    def __init__(self, d: int = 4, out: int = 3) -> None:
        super().__init__()
        self.frozen = nn.Linear(d, d)
        self.frozen.requires_grad_(False)
        self.used = nn.Linear(d, out)
        self.unused = nn.Linear(d, out)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(torch.tanh(self.frozen(x)))


class DictOut(nn.Module):
    def __init__(self, d: int = 4, out: int = 3) -> None:
        super().__init__()
        self.body = nn.Linear(d, 5)
        self.head = nn.Linear(5, out)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = torch.tanh(self.body(x))
        return {"logits": self.head(h), "features": h}


class TupleOut(DictOut):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        h = torch.tanh(self.body(x))
        return self.head(h), h


class PreNormLM(nn.Module):
    """A pre-norm decoder block as in today's LMs: RMSNorm, causal multi-head attention on
    F.scaled_dot_product_attention, a GELU MLP, residuals, a final RMSNorm and a per-position
    head; logits (N, V, L)."""

    def __init__(self, vocab: int = 5, d: int = 4, heads: int = 2, ff: int = 6) -> None:
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.norm1 = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.RMSNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.norm_f = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.emb(tokens)
        N, L, d = x.shape
        q, k, v = (t.reshape(N, L, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(z.transpose(1, 2).reshape(N, L, d))
        x = x + self.ff(self.norm2(x))
        return self.head(self.norm_f(x)).transpose(1, 2)


class BiLSTM(nn.Module):
    """A two-layer bidirectional batch-first LSTM over zero-padded sequences of different
    lengths: the outputs at padded positions are masked out of a mean over time (packed
    sequences are not used: torch.func cannot transform the packed recurrent kernels)."""

    def __init__(self, d: int = 3, hidden: int = 2, out: int = 3) -> None:
        super().__init__()
        self.rnn = nn.LSTM(d, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, out)

    def forward(self, x: Tensor) -> Tensor:
        mask = (x.abs().sum(-1, keepdim=True) > 0).to(x.dtype)
        z, _ = self.rnn(x)
        return self.head((z * mask).sum(1) / mask.sum(1))


class DecoderLM(nn.Module):
    """A causal nn.TransformerDecoderLayer (self- and cross-attention on the embeddings)
    with the positions folded into the batch: logits (N·L, V), targets (N·L,)."""

    def __init__(self, vocab: int = 5, d: int = 4, heads: int = 2, ff: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.dec = nn.TransformerDecoderLayer(d, heads, ff, dropout=0.0, batch_first=True,
                                              activation="gelu")
        self.lm = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.emb(tokens)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], dtype=x.dtype)
        z = self.dec(x, x, tgt_mask=mask, tgt_is_causal=True)
        return self.lm(z).reshape(-1, self.lm.out_features)


class PaddedEncoder(nn.Module):
    """A pre-norm nn.TransformerEncoder over padded token sequences (token 0 = padding, a
    key padding mask), masked mean pooling, and a classifier nn.Sequential(Dropout,
    Linear). The encoder's own dropout is 0 here: with it, the finite-difference reference
    of the third derivative is unstable (−21.5, −56.5, −0.52 at h = 3e-3, 1e-3, 3e-4), so
    D3 cannot be checked; dense, diagonal and matvec agree with dropout in the encoder
    (tests/test_zoo.py, non-contiguous dropout)."""

    def __init__(self, vocab: int = 6, d: int = 4, heads: int = 2, ff: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True,
                                       norm_first=True), 1, enable_nested_tensor=False)
        self.cls = nn.Sequential(nn.Dropout(0.1), nn.Linear(d, 3))

    def forward(self, tokens: Tensor) -> Tensor:
        pad = tokens == 0
        z = self.enc(self.emb(tokens), src_key_padding_mask=pad)
        keep = (~pad).to(z.dtype)[..., None]
        return self.cls((z * keep).sum(1) / keep.sum(1))


def _padded_tokens() -> Tensor:
    t = _tokens(6, 4)
    t[t == 0] = 1
    t[0, 3:] = 0
    t[2, 2:] = 0
    return t


def _padded(length: int = 4, d: int = 3) -> Tensor:
    x = _x(length, d)
    for i, n in enumerate((4, 2, 3, 1, 4, 2)[:N]):
        x[i, n:] = 0.0
    return x


# ----------------------------------------------------------------------------- cases
def _classify(model: nn.Module, X: Tensor, classes: int = 3, seed: int = 1
              ) -> tuple[nn.Module, tuple, nn.Module]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (X.shape[0],), generator=g)
    return model.to(DTYPE), (X.to(DTYPE) if X.is_floating_point() else X, y), \
        nn.CrossEntropyLoss()


def _x(*shape: int, seed: int = 1) -> Tensor:
    return torch.randn(N, *shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def _tokens(vocab: int, length: int, seed: int = 1) -> Tensor:
    return torch.randint(0, vocab, (N, length), generator=torch.Generator().manual_seed(seed))


def _seeded(fn: Callable[[], tuple]) -> Callable[[], tuple]:
    def build() -> tuple:
        torch.manual_seed(0)
        return fn()
    return build


def _mlp(act: type[nn.Module]) -> Callable[[], tuple]:
    return _seeded(lambda: _classify(nn.Sequential(nn.Linear(4, 5), act(), nn.Linear(5, 3)),
                                     _x(4)))


def _bn(train: bool) -> Callable[[], tuple]:
    def build() -> tuple:
        m = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
        m.train(train)
        if not train:  # non-trivial running statistics
            m[1].running_mean.uniform_(-0.5, 0.5)
            m[1].running_var.uniform_(0.5, 1.5)
        return _classify(m, _x(4))
    return _seeded(build)


def _lm() -> tuple:
    model = TinyLM().to(DTYPE)
    tokens = _tokens(5, 3)
    targets = _tokens(5, 3, seed=2)
    return model, (tokens, targets), nn.CrossEntropyLoss()


def _prenorm_lm() -> tuple:
    model = PreNormLM().to(DTYPE)
    return model, (_tokens(5, 3), _tokens(5, 3, seed=2)), nn.CrossEntropyLoss()


def _decoder_lm() -> tuple:
    model = DecoderLM().to(DTYPE)
    return model, (_tokens(5, 3), _tokens(5, 3, seed=2).reshape(-1)), nn.CrossEntropyLoss()


def _tied() -> tuple:
    return _classify(Tied(), _tokens(5, 3), classes=5)


def _dropout() -> tuple:
    m = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3))
    return _classify(m, _x(4))


CASES: list[Case] = [
    Case("mlp_relu", "mlp", _mlp(nn.ReLU), smooth=False),
    Case("mlp_tanh", "mlp", _mlp(nn.Tanh), fast=True),
    Case("mlp_gelu", "mlp", _mlp(nn.GELU)),
    Case("cnn_maxpool", "conv", _seeded(lambda: _classify(nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)),
        _x(1, 6, 6))), smooth=False),
    Case("conv1d", "conv", _seeded(lambda: _classify(nn.Sequential(
        nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(9, 3)), _x(2, 5))),
        fast=True),
    Case("conv3d", "conv", _seeded(lambda: _classify(nn.Sequential(
        nn.Conv3d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)), _x(1, 3, 3, 3)))),
    Case("conv_transpose2d", "conv", _seeded(lambda: _classify(nn.Sequential(
        nn.ConvTranspose2d(1, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)),
        _x(1, 2, 2)))),
    Case("batchnorm_train", "norm", _bn(True), fast=True),
    Case("batchnorm_eval", "norm", _bn(False)),
    Case("resnet_block", "norm", _seeded(lambda: _classify(ResBlock(), _x(2, 4, 4)))),
    Case("layernorm", "norm", _seeded(lambda: _classify(nn.Sequential(
        nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)), _x(4))), fast=True),
    Case("groupnorm", "norm", _seeded(lambda: _classify(nn.Sequential(
        nn.Conv1d(2, 4, 2), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)),
        _x(2, 3)))),
    Case("dropout", "dropout", _seeded(_dropout), fast=True, random=True),
    Case("conv_groupnorm_dropout", "dropout", _seeded(lambda: _classify(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.GELU(), nn.Dropout2d(0.25),
        nn.Conv2d(4, 2, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)),
        _x(1, 5, 5))), random=True, note="GroupNorm, channel dropout (Dropout2d)"),
    Case("transformer_lm", "attention", _seeded(_lm), fast=True),
    Case("prenorm_rmsnorm_lm", "attention", _seeded(_prenorm_lm),
         note="pre-norm RMSNorm block, causal SDPA, per-position head"),
    Case("decoder_lm_flat", "attention", _seeded(_decoder_lm),
         note="causal TransformerDecoderLayer, (N·L, V) logits"),
    Case("encoder_prenorm_padded", "attention", _seeded(lambda: _classify(
        PaddedEncoder(), _padded_tokens())), random=True,
        note="pre-norm TransformerEncoder, key padding mask"),
    Case("mha_need_weights", "attention", _seeded(lambda: _classify(MHA(True), _x(3, 4)))),
    Case("mha_no_weights", "attention", _seeded(lambda: _classify(MHA(False), _x(3, 4)))),
    Case("sdpa", "attention", _seeded(lambda: _classify(SDPAModel(), _x(3, 4)))),
    Case("attention_key_bias", "attention", _seeded(lambda: _classify(KeyBiasAttention(),
                                                                      _x(3, 4)))),
    Case("lstm", "recurrent", _seeded(lambda: _classify(Recurrent(nn.LSTM), _x(3, 3)))),
    Case("gru", "recurrent", _seeded(lambda: _classify(Recurrent(nn.GRU), _x(3, 3))),
         fast=True),
    Case("bilstm_padded", "recurrent", _seeded(lambda: _classify(BiLSTM(), _padded())),
         note="2-layer bidirectional LSTM, masked padding"),
    Case("linear_twice", "sharing", _seeded(lambda: _classify(LinearTwice(), _x(4))),
         fast=True),
    Case("tied_embedding", "sharing", _seeded(_tied)),
    Case("frozen_unused", "sharing", _seeded(lambda: _classify(FrozenUnused(), _x(4)))),
    Case("dict_output", "outputs", _seeded(lambda: _classify(DictOut(), _x(4))), fast=True),
    Case("tuple_output", "outputs", _seeded(lambda: _classify(TupleOut(), _x(4)))),
]

BY_NAME = {c.name: c for c in CASES}


# ----------------------------------------------------------------------------- docs/models.md
HEADER = """# Supported models

This page is generated from the test zoo (`tests/zoo.py`) by

    python tests/zoo.py --write docs/models.md

and is never edited by hand. Every cell is what the zoo measured on a tiny float64
instance of the model: **exact** — equal to an independent reference (finite differences
of first-order quantities, relative error ≤ 1e-6; third derivatives ≤ 1e-4); **estimate** —
a documented stochastic estimator within its statistical tolerance (Hutchinson);
**runs** — Monte Carlo quantities whose products agree with each other, or a composition
that took 5 steps with finite losses and BatchNorm statistics advanced exactly once per
step; **refused** — refused before the first step with a message naming the module and the
way out (quoted below); **diverges** — 5 steps with finite losses, but the last is more
than 10 times the first (the method's documented settings do not train this model; losses
below); **n/a** — the estimator does not offer the capability. Dict and
tuple outputs run through `curvkit.SelectOutput(model, key)`; without it the optimizer
refuses them with that advice at build (where the model's code shows them; else at the
first step, before any parameter moves), and every estimator at its first call.
Recurrent modules run on a `PackedSequence` (not in the zoo) train under passes that use
plain autograd (hessian; ggn/ef matvec, e.g. Hessian-free; SINGD; diagonal Fisher; varpro);
passes that need torch.func (ggn/ef/fisher dense, diagonal and summary, K-FAC) cannot
differentiate the packed kernels and say so at their first call, naming the module and
advising padded, masked sequences (as `bilstm_padded` does).

How curvkit's own passes run on these models (attention on the math kernel and
normalizations decomposed for higher-order passes, one dropout mask per evaluation,
buffers untouched outside the optimizer's own forward) is described in
`curvkit/passes.py`.
"""


def write_matrix(path: str | None) -> str:
    """Run the whole zoo and return (and write to ``path``) the support matrix."""
    from test_methods_table import SNIPPETS
    from zoo_refs import CAPABILITIES, ESTIMATORS, Problem, check_estimator, composition

    torch.set_num_threads(1)
    notes: list[str] = []

    def cell(c, where: str) -> str:
        if c.status in ("refused", "FAIL", "diverges"):
            notes.append(f"- {where}: {' '.join(c.detail.split())}")
            return f"{c.status} [{len(notes)}]"
        return c.status

    lines = [HEADER, "## Models", "", "| model | family | parameters | notes |",
             "|---|---|---|---|"]
    problems = {}
    for case in CASES:
        problems[case.name] = Problem(case)
        notes_ = [case.note, "dropout (train)" if case.random else "",
                  "" if case.smooth else "kinks: D3 not checked"]
        lines.append(f"| `{case.name}` | {case.family} | {problems[case.name].P} | "
                     f"{'; '.join(n for n in notes_ if n)} |")
    for est in ESTIMATORS:
        lines += ["", f"## Estimator `{est}`", "",
                  "| model | " + " | ".join(CAPABILITIES) + " |",
                  "|---|" + "---|" * len(CAPABILITIES)]
        for case in CASES:
            cells = check_estimator(problems[case.name], est)
            lines.append(f"| `{case.name}` | " + " | ".join(
                cell(cells[c], f"`{case.name}` × `{est}.{c}`") for c in CAPABILITIES) + " |")
    lines += ["", "## Compositions of [methods](methods.md) (5 steps)", "",
              "| model | " + " | ".join(n for n, _ in SNIPPETS) + " |",
              "|---|" + "---|" * len(SNIPPETS)]
    for case in CASES:
        row = []
        for name, config in SNIPPETS:
            c = composition(case, name, config)
            row.append(cell(c, f"`{case.name}` × {name}"))
        lines.append(f"| `{case.name}` | " + " | ".join(row) + " |")
    lines += ["", "## Notes", ""] + [f"{i + 1}. {n[2:]}" for i, n in enumerate(notes)]
    text = "\n".join(lines) + "\n"
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
    return text


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="regenerate the support matrix")
    parser.add_argument("--write", metavar="PATH", help="write the page here (else stdout)")
    args = parser.parse_args()
    out = write_matrix(args.write)
    if not args.write:
        print(out)
