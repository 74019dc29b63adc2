"""K-FAC statistics are normalised by what each layer saw, and cover what they can.

* A model that folds positions into the batch (``Flatten(0, 1)`` before the loss, flattened
  targets) has the same factors as the same model unflattened, under both reductions, for
  ``kronecker`` and ``kronecker_roots`` (the count used to come from the targets: 35× off).
* A Linear with a frozen weight and a trainable bias gets G for the bias (A = [1]), which
  is the exact GGN block of the bias.
* ``ef``/``fisher`` diagonals accept mapping inputs other than ``dict`` (``UserDict``).
"""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
from torch import nn

import curvkit

DT = torch.float64


class Head(nn.Module):
    def __init__(self, fold: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.fold = fold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)                      # (N, L, 3)
        return out.flatten(0, 1) if self.fold else out.transpose(1, 2)


def _pair(reduction: str):
    torch.manual_seed(0)
    folded, plain = Head(True).double(), Head(False).double()
    plain.load_state_dict(folded.state_dict())
    X = torch.randn(6, 5, 4, dtype=DT)
    y = torch.randint(0, 3, (6, 5))
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    return (folded, (X, y.flatten())), (plain, (X, y)), loss_fn


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("estimator", ["ggn", "ef", "fisher"])
def test_folded_positions_give_the_factors_of_the_unfolded_model(reduction, estimator):
    (folded, b1), (plain, b2), loss_fn = _pair(reduction)
    e1 = curvkit.create("estimator", estimator, model=folded, loss_fn=loss_fn)
    e2 = curvkit.create("estimator", estimator, model=plain, loss_fn=loss_fn)
    f1, f2 = e1.kronecker(b1), e2.kronecker(b2)
    assert set(f1) == set(f2) == {"body.0", "body.2"}
    for name in f1:
        torch.testing.assert_close(f1[name].A, f2[name].A)
        if estimator != "fisher":  # the draw differs with the layout; its mean does not
            torch.testing.assert_close(f1[name].G, f2[name].G)
    if estimator != "ggn":
        r1 = e1.kronecker_roots(b1)
        for name in f1:
            torch.testing.assert_close(r1[name].A_root.T @ r1[name].A_root, f1[name].A)
            torch.testing.assert_close(r1[name].G_root.T @ r1[name].G_root, f1[name].G)


@pytest.mark.parametrize("estimator", ["ggn", "ef"])
def test_frozen_weight_with_trainable_bias_gets_the_exact_bias_block(estimator):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    model[2].weight.requires_grad_(False)
    X, y = torch.randn(7, 4, dtype=DT), torch.randint(0, 3, (7,))
    est = curvkit.create("estimator", estimator, model=model, loss_fn=nn.CrossEntropyLoss())
    fac = est.kronecker((X, y))
    assert fac["2"].params == ("2.bias",)
    torch.testing.assert_close(fac["2"].A, torch.ones(1, 1, dtype=DT))
    dense = est.dense((X, y))                  # parameters: 0.weight, 0.bias, 2.bias
    torch.testing.assert_close(fac["2"].G, dense[-3:, -3:])
    diag = est.diagonal((X, y))
    torch.testing.assert_close(diag[-1], torch.diagonal(dense)[-3:])
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
        "lr": 0.1, "estimator": estimator, "preconditioner": "kronecker", "solver": "direct"})
    assert opt.preconditioner.structures()["2.bias"] == "kronecker"
    opt.step((X, y))


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, batch) -> torch.Tensor:
        return self.lin(batch["x"]) * self.scale


@pytest.mark.parametrize("estimator", ["ef", "fisher"])
def test_diagonal_accepts_userdict_inputs(estimator):
    torch.manual_seed(2)
    model = DictModel().double()
    x = torch.randn(5, 3, dtype=DT)
    y = torch.randint(0, 2, (5,))
    est = curvkit.create("estimator", estimator, model=model, loss_fn=nn.CrossEntropyLoss())
    got = est.diagonal((UserDict(x=x), y))
    ref = est.diagonal(({"x": x}, y))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.cat([d.reshape(-1) for d in got]),
                               torch.diagonal(est.dense(({"x": x}, y))))
