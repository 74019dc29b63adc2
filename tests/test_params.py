"""all_finite decides by sums but never misjudges: overflow falls back to the exact scan."""

from __future__ import annotations

import pytest
import torch

from curvkit.params import FiniteLedger, all_finite, max_abs


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
    real = P.max_abs
    monkeypatch.setattr(P, "max_abs", lambda ts: scanned.append(len(ts)) or real(ts))
    a, b = torch.ones(3), torch.ones(2)
    ledger = FiniteLedger()
    assert ledger([a, b]) and scanned == [2]
    assert ledger([a, b]) and scanned == [2]         # same objects, unchanged: no scan
    assert ledger([a.clone(), b]) and scanned[-1] == 1  # a new tensor is scanned
    b.mul_(float("inf"))                               # in place: the version moves
    assert not ledger([a, b])
    assert not FiniteLedger()([torch.tensor([float("nan")])])
    assert ledger.max_abs([a, torch.tensor([-4.0, 2.0])]) == [1.0, 4.0]


@pytest.mark.parametrize("tensors,expected", [
    ([torch.tensor([1.0, -3.0]), torch.tensor([2.0])], [3.0, 2.0]),
    ([torch.full((3,), 3e38), torch.zeros(0)], [3e38, 0.0]),    # exact: no sum to overflow
    ([torch.tensor([-6e4, 1.0], dtype=torch.float16), torch.ones(2)], [6e4, 1.0]),
    ([torch.tensor([1, -7])], [0.0]),                           # integers are finite
    ([torch.randn(70000).index_fill_(0, torch.tensor([5]), -float("inf"))], None),
    ([torch.randn(70000).index_fill_(0, torch.tensor([5]), float("nan"))], None),
    ([torch.tensor([float("inf")])], None),
    ([torch.tensor([float("nan"), 1.0])], None),
])
def test_max_abs(tensors, expected):
    got = max_abs(tensors)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-3)


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
