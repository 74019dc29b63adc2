"""The problem shared by the single-process reference and the distributed workers."""

from __future__ import annotations

import torch
from torch import nn

import curvkit


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def make_problem(case: dict):
    torch.manual_seed(case.get("seed", 0))
    dtype = torch.float64
    if case.get("model", "mlp") == "cnn":
        model = TinyCNN().to(dtype)
        Xs = [torch.randn(12, 1, 6, 6, dtype=dtype) for _ in range(case["steps"])]
    else:
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
        Xs = [torch.randn(12, 4, dtype=dtype) for _ in range(case["steps"])]
    if case.get("loss", "ce") == "mse":
        loss_fn = nn.MSELoss(reduction=case.get("reduction", "mean"))
        ys = [torch.randn(X.shape[0], 3, dtype=dtype) for X in Xs]
    else:
        loss_fn = nn.CrossEntropyLoss(reduction=case.get("reduction", "mean"))
        ys = [torch.randint(0, 3, (X.shape[0],)) for X in Xs]
    if case.get("functional_loss"):
        # a loss that is not a module: step() after backward cannot capture the batch
        module = loss_fn
        loss_fn = lambda out, y: module(out, y)  # noqa: E731
    return model, loss_fn, list(zip(Xs, ys))


def run_steps(model, loss_fn, batches, case, on_step=None):
    opt = curvkit.build_optimizer(model, loss_fn, case["optimizer"])
    losses, infos = [], []
    for step, batch in enumerate(batches):
        if on_step is not None:
            on_step(step)
        if case.get("style") == "backward":  # torch.optim style: the caller's own pass
            opt.zero_grad()
            loss = loss_fn(model(batch[0]), batch[1])
            loss.backward()
            opt.step()
            losses.append(float(loss))  # this rank's loss
        else:
            losses.append(float(opt.step(batch)))
        infos.append({k: v for k, v in opt.last_info.items()
                      if isinstance(v, (int, float, bool, str))})
    return losses, [p.detach().clone() for p in model.parameters()], infos
