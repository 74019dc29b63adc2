"""``outer_product``: the mini-batch gradient outer product g gᵀ."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.estimators._autograd import grad_with_zeros, loss_graph, require_trainable
from curvkit.estimators.base import Batch, CurvatureEstimator
from curvkit.params import check_like, flatten
from curvkit.parts import DENSE, DIAGONAL, MATVEC


class OuterProductEstimator(CurvatureEstimator):
    """Gradient outer product C = g gᵀ of the mini-batch gradient g = ∇_θ L.

    L is the loss under its reduction (mean or sum) over all samples handed in: over
    several batches (and ranks) g is the gradient of the combined loss — the batch
    gradients are combined first (count-weighted for "mean"), then the outer product is
    taken, so the result equals g gᵀ of the concatenated batch (g gᵀ is not linear in
    the loss, so it is not the weighted mean of per-batch outer products).

    Rank one, positive semi-definite. matvec: g (gᵀv) — one gradient, O(P);
    dense: g gᵀ (P×P); diagonal: g ⊙ g. This is the statistic behind "diagonal Fisher"
    style preconditioners built from the mini-batch gradient (unlike ``ef``, which sums
    per-sample gradient outer products).
    """

    name = "outer_product"
    provides = frozenset({MATVEC, DENSE, DIAGONAL})

    def __init__(self, model: nn.Module, loss_fn: Any, options: Any | None = None) -> None:
        super().__init__(model, loss_fn, options)
        require_trainable(self)

    # ------------------------------------------------------------- gradient
    def _gradient(self, X: Any, y: Tensor) -> list[Tensor]:
        params, loss = loss_graph(self, X, y)
        with torch.enable_grad():
            g = grad_with_zeros([loss], params, [torch.ones_like(loss)])
        return [t.detach() for t in g]

    def gradient(self, batch: Batch | Iterable[Batch]) -> list[Tensor]:
        """g = ∇_θ L over all samples of ``batch`` (list of tensors shaped like the params)."""
        return self.accumulate(batch, self._gradient)

    # ------------------------------------------------------------- public API
    def matvec(self, batch: Batch | Iterable[Batch], v: Sequence[Tensor]) -> list[Tensor]:
        """g (gᵀ v)."""
        check_like(v, self.params)
        g = self.gradient(batch)
        return self._outer_matvec(g, list(v))

    def dense(self, batch: Batch | Iterable[Batch]) -> Tensor:
        """g gᵀ (P×P), parameters flattened in ``model.parameters()`` order."""
        g = flatten(self.gradient(batch))
        return torch.outer(g, g)

    def diagonal(self, batch: Batch | Iterable[Batch]) -> list[Tensor]:
        """g ⊙ g, shaped like the parameters."""
        return [t * t for t in self.gradient(batch)]

    # ------------------------------------------------------------- one batch
    @staticmethod
    def _outer_matvec(g: list[Tensor], v: list[Tensor]) -> list[Tensor]:
        coef = sum((a * b.to(a.dtype)).sum() for a, b in zip(g, v))
        return [a * coef for a in g]

    def _matvec(self, X: Any, y: Tensor, v: list[Tensor]) -> list[Tensor]:
        return self._outer_matvec(self._gradient(X, y), v)

    def _dense(self, X: Any, y: Tensor) -> Tensor:
        g = flatten(self._gradient(X, y))
        return torch.outer(g, g)
