"""``upper_triangular``: upper-triangular matrices (a Lie group when the diagonal is ≠ 0)."""

from __future__ import annotations

import torch
from torch import Tensor

from curvkit.structures.lower_triangular import LowerTriangularStructure


class UpperTriangularStructure(LowerTriangularStructure):
    """M[i, j] = 0 for j < i. Π(X) = triu(X) + triu(Xᵀ, 1); otherwise as
    :class:`~curvkit.structures.lower_triangular.LowerTriangularStructure` (memory d², O(d²n))."""

    name = "upper_triangular"

    @staticmethod
    def _tri(X: Tensor, diagonal: int = 0) -> Tensor:
        return torch.triu(X, diagonal)

    @staticmethod
    def _strict(X: Tensor) -> Tensor:
        return torch.triu(X, 1)
