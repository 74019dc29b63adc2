"""``cnn``: a small convolutional network, 1-D or 2-D depending on the input shape."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import nn

from curvkit.options import option
from curvkit.tasks.base import Activation, ModelPart, activation

_CONV = {1: nn.Conv1d, 2: nn.Conv2d}
_POOL = {("max", 1): nn.MaxPool1d, ("max", 2): nn.MaxPool2d,
         ("avg", 1): nn.AvgPool1d, ("avg", 2): nn.AvgPool2d}


class CnnModel(ModelPart):
    """Small CNN: [Conv → act → pool] per entry of ``channels``, Flatten, Linear → act → Linear.

    The dimension follows the input: shape (C, L) builds Conv1d layers (mnist1d is (1, 40)),
    (C, H, W) builds Conv2d layers (digits is (1, 8, 8)); a shape (L,) is read as one
    channel. Convolutions keep the size ('same' padding, odd ``kernel_size``); each pooling
    halves it (skipped once a side is 1). An ``nn.Sequential`` of standard modules.
    """

    name = "cnn"

    @dataclass
    class Options:
        channels: tuple[int, ...] = option((8, 16), "output channels of each conv layer")
        kernel_size: int = option(3, "kernel size (odd: 'same' padding)", min=1)
        pool: Literal["max", "avg", "none"] = option("max", "pooling after each conv layer")
        hidden: int = option(32, "units of the dense layer before the output (0: none)",
                             min=0)
        activation: Activation = option("relu", "nonlinearity")

        def __post_init__(self) -> None:
            if self.kernel_size % 2 == 0:
                raise ValueError(f"kernel_size: must be odd for 'same' padding, got "
                                 f"{self.kernel_size}")
            if not self.channels or any(c < 1 for c in self.channels):
                raise ValueError(f"channels: need at least one layer, each >= 1, got "
                                 f"{list(self.channels)}")

    def build(self, input_shape: tuple[int, ...], num_outputs: int) -> nn.Sequential:
        o = self.options
        shape = tuple(input_shape)
        layers: list[nn.Module] = []
        if len(shape) == 1:
            layers.append(nn.Unflatten(1, (1, shape[0])))
            shape = (1, shape[0])
        dim = len(shape) - 1
        if dim not in _CONV:
            raise ValueError(f"model 'cnn': input shape {tuple(input_shape)} is neither (C, L) "
                             f"nor (C, H, W)")
        c_in, sizes = shape[0], list(shape[1:])
        for c_out in o.channels:
            layers += [_CONV[dim](c_in, c_out, o.kernel_size, padding=o.kernel_size // 2),
                       activation(o.activation)]
            if o.pool != "none" and min(sizes) >= 2:
                layers.append(_POOL[(o.pool, dim)](2))
                sizes = [s // 2 for s in sizes]
            c_in = c_out
        layers.append(nn.Flatten())
        features = c_in * math.prod(sizes)
        if o.hidden:
            layers += [nn.Linear(features, o.hidden), activation(o.activation)]
            features = o.hidden
        layers.append(nn.Linear(features, num_outputs))
        return nn.Sequential(*layers)
