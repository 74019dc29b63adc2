"""``mlp``: a configurable multilayer perceptron (Flatten → [Linear → act]* → Linear)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from curvkit.options import option
from curvkit.tasks.base import Activation, ModelPart, activation


class MlpModel(ModelPart):
    """Multilayer perceptron: Flatten, ``depth`` hidden Linear+activation layers, Linear.

    Hidden widths are ``widths`` when given, else ``depth`` layers of ``width`` units (so a
    20-layer MLP is ``depth = 20``). An ``nn.Sequential`` of standard modules, so every
    estimator backend (torch.func and BackPACK) handles it. PyTorch's default
    initialisation (``nn.Linear``'s Kaiming-uniform); the output layer is not followed by an
    activation.
    """

    name = "mlp"

    @dataclass
    class Options:
        width: int = option(64, "units per hidden layer (when widths is not given)", min=1)
        depth: int = option(2, "hidden layers (when widths is not given)", min=0)
        widths: tuple[int, ...] | None = option(None, "explicit hidden widths, e.g. [128, 64]")
        activation: Activation = option("tanh", "hidden nonlinearity")
        bias: bool = option(True, "biases in every Linear layer")

        def __post_init__(self) -> None:
            if self.widths is not None and any(w < 1 for w in self.widths):
                raise ValueError(f"widths: every width must be >= 1, got {list(self.widths)}")

    def hidden(self) -> list[int]:
        o = self.options
        return list(o.widths) if o.widths is not None else [o.width] * o.depth

    def build(self, input_shape: tuple[int, ...], num_outputs: int) -> nn.Sequential:
        sizes = [math.prod(input_shape), *self.hidden(), num_outputs]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b, bias=self.options.bias))
            if i < len(sizes) - 2:
                layers.append(activation(self.options.activation))
        return nn.Sequential(*layers)
