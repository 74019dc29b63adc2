"""``lower_triangular``: lower-triangular matrices (a Lie group when the diagonal is ≠ 0)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvkit.structures.base import FullMatrix, Structure


class LowerTriangularStructure(FullMatrix):
    """M[i, j] = 0 for j > i. Π(X) = tril(X) + tril(Xᵀ, −1): for a symmetric X the
    strictly lower part counts twice (it stands for both halves of the pair). Stored as a
    d×d matrix (memory d², products O(d²n)); the structure is what the update preserves.
    """

    name = "lower_triangular"

    @staticmethod
    def _tri(X: Tensor, diagonal: int = 0) -> Tensor:
        return torch.tril(X, diagonal)

    @staticmethod
    def _strict(X: Tensor) -> Tensor:
        return torch.tril(X, -1)

    @classmethod
    def _project(cls, X: Tensor, dim: int, config: dict[str, Any]) -> dict[str, Tensor]:
        return {"mat": cls._tri(X) + cls._strict(X.T)}

    def __matmul__(self, other: Structure) -> LowerTriangularStructure:
        self._check_same(other)
        # exact zeros above the diagonal already; the mask only guards against inf·0
        return self._new({"mat": self._tri(self.data["mat"] @ other.data["mat"])})

    def inner(self, X: Tensor | None = None) -> LowerTriangularStructure:
        S = self.data["mat"].T if X is None else self.tmm(X)
        M = S @ S.T
        return self._new({"mat": self._tri(M) + self._strict(M.T)})
