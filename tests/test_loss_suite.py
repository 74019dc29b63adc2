"""Built-in loss parts through :class:`curvkit.testing.LossSuite` (every reference is
autograd on the loss module itself)."""

from __future__ import annotations

import torch
from torch import nn

from curvkit.testing import LossCase, LossSuite

DT = torch.float64


def _out(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


class TestMSE(LossSuite):
    name = "mse"

    def cases(self) -> list[LossCase]:
        out = _out(4, 3)
        y = _out(4, 3, seed=1)
        seq = _out(3, 2, 2, seed=2)
        return [LossCase("mean", nn.MSELoss(), out, y),
                LossCase("sum", nn.MSELoss(reduction="sum"), out, y),
                LossCase("terms", nn.MSELoss(), seq, _out(3, 2, 2, seed=3))]


class TestCrossEntropy(LossSuite):
    name = "cross_entropy"

    def cases(self) -> list[LossCase]:
        out = _out(5, 4)
        y = torch.tensor([0, 3, 1, 1, 2])
        return [LossCase("mean", nn.CrossEntropyLoss(), out, y),
                LossCase("sum", nn.CrossEntropyLoss(reduction="sum"), out, y)]


class _WrongGradient(TestMSE):
    """The mse part with its output gradient doubled: the suite must catch it."""

    def part(self, case):
        part = super().part(case)
        gradient = part.gradient
        part.gradient = lambda out, y: 2 * gradient(out, y)
        return part


def test_the_suite_fails_a_loss_part_with_a_wrong_gradient():
    import pytest

    with pytest.raises(AssertionError, match="∇L"):
        _WrongGradient().test_gradient_is_the_output_gradient()
