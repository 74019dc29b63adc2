"""``diagonal``: diagonal matrices (the group of invertible diagonals, an abelian Lie group)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvkit.structures.base import Structure


class DiagonalStructure(Structure):
    """M = diag(k): Π(X) = diag(X). Memory d, every operation O(d) or O(dn)."""

    name = "diagonal"

    @classmethod
    def shapes(cls, dim: int, **config: Any) -> dict[str, tuple[int, ...]]:
        return {"diag": (dim,)}

    def to_dense(self) -> Tensor:
        return torch.diag(self.data["diag"])

    @classmethod
    def _project(cls, X: Tensor, dim: int, config: dict[str, Any]) -> dict[str, Tensor]:
        return {"diag": X.diagonal().clone()}

    @staticmethod
    def _add_identity_(data: dict[str, Tensor], c: float) -> None:
        data["diag"].add_(c)

    def add_identity(self, c: float) -> DiagonalStructure:
        return self._new({"diag": self.data["diag"] + c})  # one operation, not copy + add

    def average_trace(self) -> Tensor:
        return self.data["diag"].mean()

    def mm(self, X: Tensor) -> Tensor:
        return self.data["diag"].unsqueeze(1) * X

    def tmm(self, X: Tensor) -> Tensor:
        return self.data["diag"].unsqueeze(1) * X

    def __matmul__(self, other: Structure) -> DiagonalStructure:
        self._check_same(other)
        return self._new({"diag": self.data["diag"] * other.data["diag"]})

    def right_step(self, m: Structure, c: float) -> DiagonalStructure:
        self._check_same(m)
        return self._new({"diag": torch.addcmul(self.data["diag"], self.data["diag"],
                                                m.data["diag"], value=c)})

    def inner(self, X: Tensor | None = None) -> DiagonalStructure:
        k2 = self.data["diag"].square()
        return self._new({"diag": k2 if X is None else k2 * X.square().sum(1)})

    def diagonal_entries(self) -> Tensor:
        return self.data["diag"]

    def outer(self) -> DiagonalStructure:
        return self._new({"diag": self.data["diag"].square()})

    def congruence(self, A: Tensor) -> DiagonalStructure:
        return self._new({"diag": self.data["diag"].square() * A.diagonal()})
