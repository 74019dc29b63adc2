"""Tiny shared test models, losses and data for curvature tests (float64 by default).

Shipped in the package (``from curvkit.testing.problems import problem``) so that the
suites of :mod:`curvkit.testing`, curvkit's own tests and a plugin's tests share them.

Every model is deliberately tiny (P ≤ ~300) so that dense P×P references are cheap:

- ``mlp``: ``nn.Sequential`` Linear–Tanh–…–Linear.
- ``cnn``: ``nn.Sequential`` Conv2d–Tanh–Flatten–Linear on 1×5×5 images.
- ``skipnet``: a non-Sequential module with a custom forward (a skip connection, a
  parameter used twice, a frozen parameter and a buffer), to check that code works for
  any ``nn.Module`` and respects the trainable-parameter order.

``problem(arch, loss, reduction, ...)`` bundles a model, a loss and a list of batches;
``flat_loss(...)`` is an independent loss-of-the-flat-parameter-vector for references.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

DTYPE = torch.float64

ARCHS = ("mlp", "cnn", "skip")
LOSSES = ("ce", "mse")
REDUCTIONS = ("mean", "sum")


# ----------------------------------------------------------------------------- models
def mlp(in_features: int = 4, hidden: Sequence[int] = (5,), out_features: int = 3,
        act: type[nn.Module] = nn.Tanh, seed: int = 0, dtype: torch.dtype = DTYPE,
        bias: bool = True) -> nn.Sequential:
    """Linear → act → … → Linear. Default P = 4·5+5 + 5·3+3 = 43."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    sizes = [in_features, *hidden, out_features]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def cnn(in_channels: int = 1, size: int = 5, channels: int = 2, kernel: int = 3,
        out_features: int = 3, seed: int = 0, dtype: torch.dtype = DTYPE) -> nn.Sequential:
    """Conv2d → Tanh → Flatten → Linear on (in_channels, size, size) inputs.

    Default: conv 1→2 channels 3×3 (20 params), 2·3·3 = 18 features, Linear 18→3 (57);
    P = 77.
    """
    torch.manual_seed(seed)
    side = size - kernel + 1
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, kernel),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(channels * side * side, out_features),
    ).to(dtype)


class SkipNet(nn.Module):
    """A non-Sequential model: out = W2·tanh(W1 x + b1) + S x + W2·tanh(c) + scale·x̄.

    - ``fc2`` is applied twice (a parameter used twice: gradients add up),
    - ``skip`` is a skip connection without bias,
    - ``frozen`` has ``requires_grad=False`` (must not appear among trainable params),
    - ``scale`` is a bare ``nn.Parameter`` registered after the submodules,
    - ``offset`` is a buffer.
    """

    def __init__(self, in_features: int = 4, hidden: int = 4, out_features: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.frozen = nn.Parameter(torch.randn(hidden) * 0.1, requires_grad=False)
        self.fc2 = nn.Linear(hidden, out_features)
        self.skip = nn.Linear(in_features, out_features, bias=False)
        self.scale = nn.Parameter(torch.randn(out_features) * 0.5)
        self.register_buffer("offset", torch.linspace(-0.5, 0.5, hidden))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc1(x) + self.frozen)
        out = self.fc2(h) + self.skip(x)
        out = out + self.fc2(torch.tanh(self.offset)).unsqueeze(0) * 0.5
        return out + self.scale * x.mean(dim=1, keepdim=True)


def skipnet(in_features: int = 4, hidden: int = 4, out_features: int = 3, seed: int = 0,
            dtype: torch.dtype = DTYPE) -> SkipNet:
    """A :class:`SkipNet`; default P = 20 + 15 + 12 + 3 = 50 trainable (+4 frozen)."""
    torch.manual_seed(seed)
    return SkipNet(in_features, hidden, out_features).to(dtype)


def make_model(arch: str, out_features: int = 3, seed: int = 0,
               dtype: torch.dtype = DTYPE) -> nn.Module:
    """One of :data:`ARCHS` with ``out_features`` outputs."""
    if arch == "mlp":
        return mlp(out_features=out_features, seed=seed, dtype=dtype)
    if arch == "cnn":
        return cnn(out_features=out_features, seed=seed, dtype=dtype)
    if arch == "skip":
        return skipnet(out_features=out_features, seed=seed, dtype=dtype)
    raise ValueError(f"unknown test architecture {arch!r}; expected one of {ARCHS}")


def input_shape(arch: str) -> tuple[int, ...]:
    """Shape of one input sample of :func:`make_model` ``(arch)`` (default sizes)."""
    return (1, 5, 5) if arch == "cnn" else (4,)


# ----------------------------------------------------------------------------- losses, data
def make_loss(loss: str, reduction: str = "mean") -> nn.Module:
    """``"ce"`` → CrossEntropyLoss, ``"mse"`` → MSELoss, with the given reduction."""
    if loss == "ce":
        return nn.CrossEntropyLoss(reduction=reduction)
    if loss == "mse":
        return nn.MSELoss(reduction=reduction)
    raise ValueError(f"unknown test loss {loss!r}; expected one of {LOSSES}")


def make_data(arch: str, loss: str, n: int, out_features: int, seed: int = 0,
              dtype: torch.dtype = DTYPE) -> tuple[Tensor, Tensor]:
    """A batch ``(X, y)``: class labels (long, shape (n,)) for "ce", targets (n, C) for "mse"."""
    g = torch.Generator().manual_seed(10_000 + seed)
    X = torch.randn((n, *input_shape(arch)), generator=g, dtype=dtype)
    if loss == "ce":
        y = torch.randint(0, out_features, (n,), generator=g)
    else:
        y = torch.randn((n, out_features), generator=g, dtype=dtype)
    return X, y


@dataclass
class Problem:
    """A model, a loss and a list of batches (the unit every curvature test works on)."""

    model: nn.Module
    loss_fn: nn.Module
    batches: list[tuple[Tensor, Tensor]]

    @property
    def batch(self) -> tuple[Tensor, Tensor]:
        """All batches concatenated into one."""
        return (torch.cat([b[0] for b in self.batches]), torch.cat([b[1] for b in self.batches]))

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def data(self) -> tuple[Tensor, Tensor] | list[tuple[Tensor, Tensor]]:
        """What to hand to an estimator: a single ``(X, y)`` or the list of batches."""
        return self.batches[0] if len(self.batches) == 1 else list(self.batches)


def problem(arch: str = "mlp", loss: str = "ce", reduction: str = "mean", n: int = 6,
            out_features: int = 3, num_batches: int = 1, seed: int = 0,
            dtype: torch.dtype = DTYPE, sizes: Sequence[int] | None = None) -> Problem:
    """A :class:`Problem`. ``sizes`` (batch sizes, one per batch) overrides ``n``/``num_batches``
    (unequal sizes exercise count weighting)."""
    sizes = list(sizes) if sizes is not None else [n] * num_batches
    model = make_model(arch, out_features, seed=seed, dtype=dtype)
    batches = [make_data(arch, loss, m, out_features, seed=seed * 100 + i, dtype=dtype)
               for i, m in enumerate(sizes)]
    return Problem(model, make_loss(loss, reduction), batches)


# ----------------------------------------------------------------------------- references
def param_offsets(model: nn.Module) -> tuple[dict[str, int], int]:
    """({trainable parameter name: its first index in the flat vector}, P)."""
    offset, start = {}, 0
    for n, p in model.named_parameters():
        if p.requires_grad:
            offset[n] = start
            start += p.numel()
    return offset, start


def param_shapes(model: nn.Module) -> tuple[list[str], list[torch.Size]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p.shape for _, p in named]


def flat_params(model: nn.Module) -> Tensor:
    """The trainable parameters flattened into one detached vector (model order)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def split_flat(theta: Tensor, shapes: Sequence[torch.Size]) -> list[Tensor]:
    out, start = [], 0
    for s in shapes:
        k = int(torch.Size(s).numel())
        out.append(theta[start:start + k].reshape(s))
        start += k
    return out


def flat_forward(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``f(theta, X)``: the model output as a function of the flat trainable parameters.

    Written independently of curvkit (``torch.func.functional_call`` only); the model's
    buffers are not modified.
    """
    names, shapes = param_shapes(model)
    buffers = dict(model.named_buffers())

    def f(theta: Tensor, X: Tensor) -> Tensor:
        state = dict(zip(names, split_flat(theta, shapes)))
        # fresh buffer copies: BatchNorm in training mode updates them in place
        state.update({n: b.clone() for n, b in buffers.items()})
        return functional_call(model, state, (X,))

    return f


def flat_loss(model: nn.Module, loss_fn: Callable, X: Tensor, y: Tensor
              ) -> Callable[[Tensor], Tensor]:
    """``L(theta)`` on ``(X, y)`` for flat trainable parameters ``theta``."""
    f = flat_forward(model)
    return lambda theta: loss_fn(f(theta, X), y)
