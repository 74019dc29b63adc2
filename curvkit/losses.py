"""Loss-function facts curvkit needs: the reduction and its scale factor."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

Reduction = Literal["mean", "sum"]


def reduction_of(loss_fn: object, where: str = "loss_fn") -> Reduction:
    """The loss' reduction, ``'mean'`` or ``'sum'``; ``'none'`` is rejected with a clear error.

    A plain callable without a ``reduction`` attribute is taken to average over the batch.
    """
    red = getattr(loss_fn, "reduction", "mean")
    if red not in ("mean", "sum"):
        raise ValueError(f"{where}: reduction={red!r} is not supported; curvature is defined "
                         f"for reduction 'mean' or 'sum'")
    return red


def reduction_factor(loss_fn: nn.Module, output: Tensor) -> float:
    """c such that loss = c · Σ_n ℓ_n with ℓ_n the per-sample loss summed over outputs.

    1 for sum, 1/N for cross-entropy mean, 1/(N·C) for MSE mean over C outputs (curvlinops'
    convention: MSE's mean averages over every output entry).
    """
    if reduction_of(loss_fn) == "sum":
        return 1.0
    n = output.shape[0]
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        # extra spatial dims of cross-entropy are averaged over too
        return 1.0 / (output.numel() // output.shape[1]) if output.ndim > 2 else 1.0 / n
    return 1.0 / output.numel() if output.numel() else 1.0 / n


def batch_size(batch: tuple) -> int:
    """Number of samples in ``(X, y)``: the leading dimension of ``y``."""
    return int(batch[1].shape[0])
