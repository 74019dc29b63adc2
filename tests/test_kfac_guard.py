"""The capture's weight-gradient check and when the model's code makes it unnecessary.

The check (the weight gradient implied by a layer's captured inputs and output gradients
must be the true one) runs where the model's code does not prove, at build, that the
layer's parameters are used by the module's own stock forward only (``KFACLayer.plain``,
``layers._plain_uses``); it is skipped where it does, unless a forward hook could change
what the capture records. Each case it exists for is still caught.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import curvkit
from curvkit.estimators.kfac import capture, kfac_layers

DT = torch.float64


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 4)).to(DT)


def data(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, 6, 6, generator=g, dtype=DT), torch.randint(0, 4, (n,),
                                                                          generator=g)


class Block(nn.Module):
    """A module of the user's whose own code also uses fc's weight outside fc's forward:
    the build-time trace keeps it a leaf and cannot see that."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(x) + 0.5 * F.linear(x, self.fc.weight)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.block(x)))


def test_plain_layers_are_found_from_the_code():
    assert [layer.plain for layer in kfac_layers(cnn())] == [True, True]
    # a user's module is a leaf of the trace: nothing the code shows is proven then
    assert [(layer.name, layer.plain) for layer in kfac_layers(Outer())] == \
        [("block.fc", False), ("head", False)]

    class Sub(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2.0

    # a subclass with its own forward is a user's leaf too: neither it nor the rest is proven
    assert [layer.plain for layer in kfac_layers(nn.Sequential(Sub(2, 2), nn.Linear(2, 2)))] \
        == [False, False]
    # an instance whose forward was replaced is not the stock forward
    odd = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    odd[0].forward = lambda x: F.linear(x, odd[0].weight) * 2.0
    assert [layer.plain for layer in kfac_layers(odd)] == [False, True]


@pytest.mark.parametrize("name", ["ggn", "fisher", "ef"])
def test_skipping_the_check_on_plain_layers_changes_nothing(name, monkeypatch):
    model = cnn()
    X, y = data()
    e = curvkit.create("estimator", name, model=model, loss_fn=nn.CrossEntropyLoss())
    calls = []
    real = capture._weight_grad_mismatch
    monkeypatch.setattr(capture, "_weight_grad_mismatch",
                        lambda *a: calls.append(1) or real(*a))
    fast = e.kronecker((X, y))
    diag = e.diagonal((X, y))
    assert not calls  # every layer proven plain: no check, one batched backward
    for layer in kfac_layers(model):
        monkeypatch.setattr(layer, "plain", False)
    checked = e.kronecker((X, y))
    assert calls
    for n in fast:
        torch.testing.assert_close(fast[n].A, checked[n].A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(fast[n].G, checked[n].G, rtol=1e-12, atol=1e-14)
    for a, b in zip(diag, e.diagonal((X, y))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_a_use_inside_a_users_module_is_still_caught():
    model = Outer().to(DT)
    X = torch.randn(4, 3, dtype=DT)
    y = torch.randn(4, 2, dtype=DT)
    e = curvkit.create("estimator", "ggn", model=model, loss_fn=nn.MSELoss())
    with pytest.raises(ValueError, match=r"module block.fc \(Linear\): the gradient of "
                                         r"block.fc.weight is not explained"):
        e.kronecker((X, y))


def test_a_forward_hook_that_changes_the_output_is_still_caught():
    model = cnn()
    X, y = data()
    handle = model[3].register_forward_hook(lambda m, i, o: 2.0 * o)
    try:
        e = curvkit.create("estimator", "ggn", model=model, loss_fn=nn.CrossEntropyLoss())
        with pytest.raises(ValueError, match=r"module 3 \(Linear\): the gradient of 3.weight "
                                             r"is not explained"):
            e.kronecker((X, y))
    finally:
        handle.remove()


def test_a_forward_replaced_after_build_is_still_caught():
    model = cnn()
    X, y = data()
    e = curvkit.create("estimator", "ggn", model=model, loss_fn=nn.CrossEntropyLoss())
    e.kronecker((X, y))  # layers found and proven plain
    lin = model[3]
    lin.forward = lambda x: F.linear(x, lin.weight, lin.bias) + F.linear(x, lin.weight)
    with pytest.raises(ValueError, match=r"module 3 \(Linear\): the gradient of 3.weight "
                                         r"is not explained"):
        e.kronecker((X, y))
    del lin.forward
    # a module swapped for one of the user's (no parameters of its own) after build: the
    # layers are found again, and nothing is proven where a user's module is called
    model[1] = type("Act", (nn.Module,), {"forward": lambda self, x: torch.tanh(x)})()
    e.kronecker((X, y))
    assert [layer.plain for layer in kfac_layers(model)] == [False, False]
