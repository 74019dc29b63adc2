"""``resmlp``: a residual MLP, x ← x + W₂ act(W₁ norm(x)), between a stem and a head."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

from curvkit.options import option
from curvkit.tasks.base import Activation, ModelPart, activation


class ResidualBlock(nn.Module):
    """x + fc2(act(fc1(norm(x)))), with an optional pre-LayerNorm."""

    def __init__(self, width: int, hidden: int, act: str, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc1 = nn.Linear(width, hidden)
        self.act = activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResMlpModel(ModelPart):
    """Residual MLP: Flatten → Linear stem → ``blocks`` residual blocks → act → Linear head.

    Each block computes x + W₂·act(W₁·LN(x) + b₁) + b₂ (LayerNorm only with ``norm``),
    with ``width`` features on the residual stream and ``width·expansion`` inside the
    block. The skip connections make it a non-Sequential model: parts built on torch.func
    handle it; structures that cannot handle a parameter (e.g. LayerNorm weights under
    ``kronecker``) fall back as configured.
    """

    name = "resmlp"

    @dataclass
    class Options:
        width: int = option(64, "features on the residual stream", min=1)
        blocks: int = option(2, "residual blocks", min=0)
        expansion: float = option(1.0, "hidden units in a block = width · expansion", min=0.01)
        activation: Activation = option("tanh", "nonlinearity inside blocks and before the head")
        norm: bool = option(False, "LayerNorm at the start of every block")

    def build(self, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
        o = self.options
        hidden = max(1, round(o.width * o.expansion))
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), o.width),
            *[ResidualBlock(o.width, hidden, o.activation, o.norm) for _ in range(o.blocks)],
            activation(o.activation),
            nn.Linear(o.width, num_outputs),
        )
