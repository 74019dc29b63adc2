"""all_finite decides by sums but never misjudges: overflow falls back to the exact scan."""

from __future__ import annotations

import pytest
import torch

from curvkit.params import all_finite


@pytest.mark.parametrize("tensors,expected", [
    ([torch.randn(5, 3), torch.randn(3)], True),
    ([torch.full((4,), 3e38)], True),                          # the float32 sum overflows
    ([torch.full((4,), 6e4, dtype=torch.float16)], True),      # so does the float16 one
    ([torch.full((2,), 1e300, dtype=torch.float64)], True),    # and float64's
    ([torch.ones(3, dtype=torch.bfloat16)], True),
    ([torch.tensor([1, 2, 3])], True),
    ([torch.randn(3), torch.tensor([1.0, float("nan")])], False),
    ([torch.tensor([float("inf"), -float("inf")])], False),    # sums to nan
    ([torch.tensor([-float("inf")])], False),
    ([], True),
])
def test_all_finite(tensors, expected):
    assert all_finite(tensors) is expected
