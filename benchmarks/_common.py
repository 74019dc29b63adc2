"""Pieces the benchmark scripts share: the machine description and the standard models."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn


def machine() -> str:
    """CPU model, logical CPUs, OS, Python, torch and thread count, for the docs tables."""
    cpu = platform.processor() or platform.machine() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs (shared with other jobs), "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


def sgd_step(model: nn.Module, X: Tensor, y: Tensor, lr: float = 0.05) -> Callable[[], None]:
    """One plain ``torch.optim.SGD`` step on (X, y): the reference the step benchmarks divide
    by."""
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def step() -> None:
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()

    return step


def models() -> dict[str, tuple[nn.Module, Tensor, Tensor]]:
    """The MLP and the small CNN every side-by-side comparison uses (seeded)."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                        nn.Linear(128, 10))
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Tanh(), nn.Conv2d(8, 8, 3), nn.Tanh(),
                        nn.Flatten(), nn.Linear(8 * 12 * 12, 10))
    return {
        "MLP 64-128-128-10, N=128": (mlp, torch.randn(128, 64), torch.randint(0, 10, (128,))),
        "CNN 2×conv3(8)+linear, 3×16×16, N=64": (cnn, torch.randn(64, 3, 16, 16),
                                                 torch.randint(0, 10, (64,))),
    }


def publish(text: str, out: str) -> None:
    """Print a benchmark's markdown table and write it to ``out`` ('' to skip writing)."""
    print()
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"written to {path}")
