"""all_finite decides by sums but never misjudges: overflow falls back to the exact scan."""

from __future__ import annotations

import pytest
import torch

from curvkit.params import FiniteLedger, all_finite


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


def test_finite_ledger_rescans_only_what_changed(monkeypatch):
    import curvkit.params as P

    scanned = []
    real = P.all_finite
    monkeypatch.setattr(P, "all_finite", lambda ts: scanned.append(len(ts)) or real(ts))
    a, b = torch.ones(3), torch.ones(2)
    ledger = FiniteLedger()
    assert ledger([a, b]) and scanned == [2]
    assert ledger([a, b]) and scanned == [2, 0]      # same objects, unchanged: no scan
    assert ledger([a.clone(), b]) and scanned[-1] == 1  # a new tensor is scanned
    b.mul_(float("inf"))                               # in place: the version moves
    assert not ledger([a, b])
    assert not FiniteLedger()([torch.tensor([float("nan")])])


def test_momentum_overflow_of_finite_gradients_never_reaches_the_parameters():
    """The gradient is checked once; a momentum buffer that overflows from finite gradients
    is a new value and is checked before the update."""
    import curvkit

    class Big(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return 3e38 * torch.tanh(self.p + 0 * x.sum())

    model = Big()
    opt = curvkit.build_optimizer(model, lambda out, y: out.sum(), {
        "lr": 1e-39, "preconditioner": "identity",
        "solver": {"name": "direct", "momentum": 0.9}})
    batch = (torch.zeros(1), torch.zeros(1))
    opt.step(batch)
    assert opt.counters["nonfinite"] == 0
    before = model.p.detach().clone()
    opt.step(batch)                                    # 0.9·3e38 + 2.7e38 overflows
    assert opt.counters["nonfinite"] == 1
    assert torch.equal(model.p.detach(), before)
