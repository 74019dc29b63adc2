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
    real = P.magnitude_bounds
    monkeypatch.setattr(P, "magnitude_bounds", lambda ts: scanned.append(len(ts)) or real(ts))
    a, b = torch.ones(3), torch.ones(2)
    ledger = FiniteLedger()
    assert ledger([a, b]) and scanned == [2]
    assert ledger([a, b]) and scanned == [2]         # same objects, unchanged: no scan
    assert ledger([a.clone(), b]) and scanned[-1] == 1  # a new tensor is scanned
    n = len(scanned)
    assert ledger([b, a]) and len(scanned) == n        # known ones in another list too
    b.mul_(float("inf"))                               # in place: the version moves
    assert not ledger([a, b])
    assert not FiniteLedger()([torch.tensor([float("nan")])])
    got = ledger.max_abs([a, torch.tensor([-4.0, 2.0])])    # a known, the other scanned
    assert 1.0 <= got[0] <= 3 ** 0.5 * 1.001 and 4.0 <= got[1] <= 20 ** 0.5 * 1.001


def test_finite_ledger_notes_bounds_and_refuses_useless_ones():
    ledger = FiniteLedger()
    t = torch.full((3,), 2.0)
    ledger.note(t, 5.0)
    assert ledger.max_abs([t]) == [5.0]                # the bound, not scanned
    t.add_(1.0)                                         # changed since: scanned
    assert ledger.max_abs([t]) == [pytest.approx(27 ** 0.5)]   # its 2-norm bounds it
    u = torch.ones(2)
    ledger.note(u, float("inf"))                        # proves nothing: not recorded
    ledger.note(u, 1e39)                                # above float32's largest value
    assert ledger.max_abs([u]) == [pytest.approx(2 ** 0.5)]
    w = torch.tensor([float("nan")])
    ledger.note(w, 1.0)                                 # a note is trusted as given
    assert ledger.max_abs([w]) == [1.0]


def test_finite_ledger_remembers_a_list_of_bounds():
    ledger = FiniteLedger()
    a, b = torch.full((2,), 3.0), torch.full((3,), -2.0)
    ledger.remember([a, b], [4.0, 5.0])
    assert ledger.max_abs([a, b]) == [4.0, 5.0]        # as a whole
    assert ledger.max_abs([b]) == [5.0]                 # and one by one
    c = torch.ones(2)
    ledger.remember([a, c], [4.0, 1e39])                # 1e39 proves nothing for float32
    assert ledger.max_abs([a, c]) == [4.0, pytest.approx(2 ** 0.5)]   # c scanned


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 1, 2, 3])
def test_ledger_finds_every_nonfinite_entry(bad, where):
    from curvkit.params import magnitude_bounds

    tensors = [torch.randn(4, 3), torch.randn(7, dtype=torch.float64), torch.randn(70000),
               torch.randn(300, 300, dtype=torch.float64)]
    tensors[where].view(-1)[-1] = bad
    assert max_abs(tensors) is None
    assert magnitude_bounds(tensors) is None
    assert FiniteLedger().max_abs(tensors) is None
    # mixed dtypes are compared exactly
    assert max_abs([torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.1])]) == \
        [0.1, float(torch.tensor(0.1))]


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


def _big_gradient_problem(second_parameter: bool = False):
    """A model whose gradient is 3e38 (float32's largest value is 3.4e38), optimized by
    identity + direct with momentum 0.9 at a tiny lr: the second step's buffer
    0.9·3e38 + 3e38 overflows from finite gradients."""
    import curvkit

    class Big(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))
            self.q = torch.nn.Parameter(torch.zeros(2)) if second_parameter else None

        def forward(self, x):
            out = 3e38 * torch.tanh(self.p + 0 * x.sum())
            return out + self.q.sum() if self.q is not None else out

    model = Big()
    opt = curvkit.build_optimizer(model, lambda out, y: out.sum(), {
        "lr": 1e-39, "preconditioner": "identity",
        "solver": {"name": "direct", "momentum": 0.9}})
    return model, opt, (torch.zeros(1), torch.zeros(1))


def test_momentum_overflow_of_finite_gradients_never_reaches_the_parameters():
    """The gradient is checked once; a momentum buffer that overflows from finite gradients
    is a new value and is checked before the update."""
    model, opt, batch = _big_gradient_problem()
    opt.step(batch)
    assert opt.counters["nonfinite"] == 0
    before = model.p.detach().clone()
    opt.step(batch)                                    # 0.9·3e38 + 2.7e38 overflows
    assert opt.counters["nonfinite"] == 1
    assert torch.equal(model.p.detach(), before)


def _momentum_problem(settings, seed=0):
    import curvkit

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = curvkit.build_optimizer(model, torch.nn.CrossEntropyLoss(), {
        "lr": 0.05, "preconditioner": "identity", "solver": {"name": "direct", **settings}})
    return model, opt, (torch.randn(16, 5), torch.randint(0, 3, (16,)))


@pytest.mark.parametrize("settings", [{"momentum": 0.9}, {"momentum": 0.5, "dampening": 0.3},
                                      {"momentum": 0.8, "nesterov": True},
                                      {"momentum": 0.9, "weight_decay": 0.1}])
def test_momentum_bounds_stay_above_the_buffers(settings):
    """The bound each buffer carries (read by the update check instead of a scan) is never
    below its largest magnitude, also when the momentum changes between steps."""
    model, opt, batch = _momentum_problem(settings)
    for step in range(12):
        if step == 6:
            for g in opt.param_groups:
                g["momentum"] = 0.99
        opt.step(batch)
        assert opt.last_info["accepted"], opt.last_info
        bufs = opt.solver.state["momentum_buffer"]
        for b, rec in zip(bufs, opt.solver._bounds):
            assert rec[0] is b and rec[1] == b._version
            assert rec[2] >= b.abs().max().item()


def test_momentum_buffer_changed_from_outside_is_scanned_again():
    model, opt, batch = _momentum_problem({"momentum": 0.9})
    opt.step(batch)
    before = [p.detach().clone() for p in model.parameters()]
    opt.solver.state["momentum_buffer"][0].fill_(float("nan"))   # not the solver's doing
    opt.step(batch)
    assert opt.last_info["accepted"] is False and opt.counters["nonfinite"] == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    opt.solver.state["momentum_buffer"][0].zero_()
    opt.step(batch)                                   # a finite buffer again: steps resume
    assert opt.last_info["accepted"] is True


def test_momentum_buffer_that_would_overflow_is_left_as_it_was():
    """The new buffer's bound reaches float32's largest value: it is computed aside and
    scanned; the step is refused and no buffer (state) holds a non-finite value."""
    _, opt, batch = _big_gradient_problem(second_parameter=True)
    opt.step(batch)
    bufs = [b.clone() for b in opt.solver.state["momentum_buffer"]]
    opt.step(batch)                                    # 0.9·3e38 + 3e38 overflows
    assert opt.counters["nonfinite"] == 1
    assert all(torch.equal(a, b) for a, b in zip(bufs, opt.solver.state["momentum_buffer"]))


def test_momentum_near_the_limit_still_steps_exactly_as_sgd():
    """The bound passes the largest value while the buffer does not (b = [3e38, 0], then
    d = [0, 3e38]: bound 0.9·3e38 + 3e38, buffer [2.7e38, 3e38]): the buffer computed
    aside is finite and the step is SGD's, bitwise."""
    import copy

    import curvkit

    class Lin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(2))

        def forward(self, x):
            return (self.p * x).sum() * 3e38

    model = Lin()
    ref = copy.deepcopy(model)
    opt = curvkit.build_optimizer(model, lambda out, y: out, {
        "lr": 1e-45, "preconditioner": "identity", "solver": {"name": "direct", "momentum": 0.9}})
    sgd = torch.optim.SGD(ref.parameters(), lr=1e-45, momentum=0.9)
    for x in (torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])):
        opt.step((x, torch.zeros(1)))
        sgd.zero_grad()
        ref(x).backward()
        sgd.step()
        assert opt.last_info["accepted"] is True, opt.last_info
        assert torch.equal(model.p, ref.p)
        assert torch.equal(opt.solver.state["momentum_buffer"][0],
                           sgd.state[ref.p]["momentum_buffer"])
    assert opt.solver.state["momentum_buffer"][0].tolist() == pytest.approx([2.7e38, 3e38])


@pytest.mark.parametrize("tensors", [
    [torch.randn(5, 3), torch.randn(3, dtype=torch.float64), torch.randn(70000)],
    [torch.full((4,), 3e38), torch.full((3,), -3e38)],        # squares overflow: exact ends
    [torch.tensor([1e-30, -3e-25]), torch.zeros(3)],            # squares underflow
    [torch.ones(3, dtype=torch.float16), torch.tensor([-2.0])],  # float16: exact ends
    [torch.zeros(0), torch.ones(2)],
    [torch.tensor([1, -7]), torch.ones(2)],
    # large CPU tensors: their sums of squares are BLAS dots (curvkit.params._BLAS_MIN)
    [torch.randn(300, 300), torch.randn(70000, dtype=torch.float64)],
    [torch.full((70000,), 3e38), torch.randn(5)],                # squares overflow in BLAS
    [torch.full((70000,), 1e-25).index_fill_(0, torch.tensor([7]), -3e-20)],  # underflow
    [torch.randn(400, 300).t(), torch.randn(70000)[::2]],       # strided: torch's norms
])
def test_magnitude_bounds_are_never_below_the_largest_entry(tensors):
    from curvkit.params import magnitude_bounds

    exact = max_abs(tensors)
    got = magnitude_bounds(tensors)
    assert all(g >= e for g, e in zip(got, exact)), (got, exact)
    assert all(g <= (t.numel() ** 0.5 + 1e-3) * e + 1e-18
               for g, e, t in zip(got, exact, tensors))
