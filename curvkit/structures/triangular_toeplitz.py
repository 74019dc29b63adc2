"""``triangular_toeplitz``: triangular Toeplitz matrices (polynomials in the shift matrix)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.options import option
from curvkit.structures.base import Structure, diagonal_sums


class TriangularToeplitzStructure(Structure):
    """M[i, j] = t[i − j] for i ≥ j (``lower=True``) or t[j − i] for j ≥ i (upper), else 0.

    These matrices are the polynomials in the (lower or upper) shift matrix, so products
    stay in the set and commute: the product's coefficients are the causal convolution
    t ∗ s truncated to d terms. Π(X) folds and then averages each diagonal,

        t[0] = tr(X)/d,   t[k] = (Σ_i X[i+k, i] + Σ_i X[i, i+k]) / (d − k),

    the same for both sides. Memory d; products with a dense (d, n) matrix O(d²n) (through
    the dense matrix, which BLAS multiplies fastest at the sizes of layer factors).
    ``lower=True`` is singd's ``triltoeplitz``, ``lower=False`` its ``triutoeplitz``.
    """

    name = "triangular_toeplitz"
    DENSE_PRODUCTS = True

    @dataclass
    class Options:
        lower: bool = option(True, "lower-triangular Toeplitz (singd's triltoeplitz); false: "
                                   "upper (triutoeplitz)")

    @classmethod
    def shapes(cls, dim: int, **config: Any) -> dict[str, tuple[int, ...]]:
        return {"coeffs": (dim,)}

    def to_dense(self) -> Tensor:
        t = self.data["coeffs"]
        idx = torch.arange(self.dim, device=t.device)
        offset = idx.unsqueeze(1) - idx.unsqueeze(0)          # i − j
        if not self.config["lower"]:
            offset = -offset
        inside = offset >= 0
        return torch.where(inside, t[offset.clamp(min=0)], t.new_zeros(()))

    @classmethod
    def _project(cls, X: Tensor, dim: int, config: dict[str, Any]) -> dict[str, Tensor]:
        counts = torch.arange(dim, 0, -1, device=X.device).to(X.dtype)
        return {"coeffs": diagonal_sums(X) / counts}

    @staticmethod
    def _add_identity_(data: dict[str, Tensor], c: float) -> None:
        data["coeffs"][:1] += c

    def average_trace(self) -> Tensor:
        return self.data["coeffs"][0]

    def __matmul__(self, other: Structure) -> TriangularToeplitzStructure:
        self._check_same(other)
        # first column of the lower product: L(t) s, the truncated convolution t ∗ s
        t, s = self.data["coeffs"], other.data["coeffs"]
        lower = TriangularToeplitzStructure(self.dim, {"coeffs": t}, lower=True).to_dense()
        return self._new({"coeffs": lower @ s})
