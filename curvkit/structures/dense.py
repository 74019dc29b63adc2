"""``dense``: an unstructured d×d matrix (the group GL(d) and its full Lie algebra)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from curvkit.structures.base import FullMatrix, Structure


class DenseStructure(FullMatrix):
    """Every entry free: Π(X) = X. Memory d², products O(d²n)."""

    name = "dense"

    @classmethod
    def _project(cls, X: Tensor, dim: int, config: dict[str, Any]) -> dict[str, Tensor]:
        return {"mat": X}

    def __matmul__(self, other: Structure) -> DenseStructure:
        self._check_same(other)
        return self._new({"mat": self.data["mat"] @ other.data["mat"]})

    def inner(self, X: Tensor | None = None) -> DenseStructure:
        S = self.data["mat"] if X is None else self.tmm(X).T
        # S here holds (Mᵀ X)ᵀ, so Sᵀ S = Mᵀ X Xᵀ M
        return self._new({"mat": S.T @ S})

    def right_step(self, m: Structure, c: float) -> DenseStructure:
        self._check_same(m)
        # one fused BLAS call: no d×d temporary for the product, no extra pass to add it
        return self._new({"mat": torch.addmm(self.data["mat"], self.data["mat"],
                                             m.data["mat"], alpha=c)})

    def outer(self) -> DenseStructure:
        M = self.data["mat"]
        return self._new({"mat": M @ M.T})

    def congruence(self, A: Tensor) -> DenseStructure:
        M = self.data["mat"]
        return self._new({"mat": M.T @ (A @ M)})
