"""``teacher``: regression against a fixed random teacher network."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curvkit.options import option
from curvkit.tasks.base import Activation, DatasetPart

_ACT = {
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "gelu": lambda z: 0.5 * z * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (z + 0.044715 * z**3))),
    "elu": lambda z: np.where(z > 0, z, np.expm1(np.minimum(z, 0.0))),
    "silu": lambda z: z / (1.0 + np.exp(-z)),
    "softplus": lambda z: np.logaddexp(0.0, z),
}


class TeacherDataset(DatasetPart):
    """Regression on y = teacher(x) + noise, with a random MLP teacher and x ~ N(0, I).

    The teacher has ``depth`` hidden layers of ``width`` units, weights
    W ~ N(0, 1/fan_in), biases N(0, 0.1²), and ``activation``; targets get i.i.d.
    Gaussian noise of standard deviation ``noise``. Everything is drawn from
    ``numpy.random.default_rng(seed)``, so the data do not depend on torch's RNG or version.
    Inputs (``in_dim``,), targets (``out_dim``,), loss MSE.
    """

    name = "teacher"
    loss = "mse"

    @dataclass
    class Options:
        in_dim: int = option(16, "input dimension", min=1)
        out_dim: int = option(4, "output dimension", min=1)
        width: int = option(32, "hidden units per teacher layer", min=1)
        depth: int = option(2, "hidden layers of the teacher", min=0)
        activation: Activation = option("tanh", "teacher nonlinearity")
        noise: float = option(0.05, "standard deviation of the target noise", min=0.0)
        n_train: int = option(1024, "training samples", min=1)
        n_val: int = option(256, "validation samples", min=0)
        n_test: int = option(256, "test samples", min=1)
        seed: int = option(0, "seed of the teacher and the samples")

    def generate(self) -> dict[str, np.ndarray]:
        o = self.options
        rng = np.random.default_rng(o.seed)
        sizes = [o.in_dim] + [o.width] * o.depth + [o.out_dim]
        layers = [(rng.standard_normal((a, b)) / np.sqrt(a), 0.1 * rng.standard_normal(b))
                  for a, b in zip(sizes[:-1], sizes[1:])]
        act = _ACT[o.activation]

        def teacher(x: np.ndarray) -> np.ndarray:
            for i, (w, b) in enumerate(layers):
                x = x @ w + b
                if i < len(layers) - 1:
                    x = act(x)
            return x

        out = {}
        for split, n in (("train", o.n_train), ("val", o.n_val), ("test", o.n_test)):
            x = rng.standard_normal((n, o.in_dim))
            out[f"x_{split}"] = x
            out[f"y_{split}"] = teacher(x) + o.noise * rng.standard_normal((n, o.out_dim))
        return out
