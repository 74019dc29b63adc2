"""``block_diagonal``: dense diagonal blocks of size b (the last block holds the d mod b rest)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.options import option
from curvkit.structures.base import Structure


class BlockDiagonalStructure(Structure):
    """M = blockdiag(M_1, …, M_n, R) with n = ⌊d/b⌋ dense b×b blocks and a dense r×r rest
    (r = d − n·b < b). Π(X) keeps the diagonal blocks of X. Memory n·b² + r² ≤ d·b,
    products O(d·b·n_cols), the congruence Π(Mᵀ A M) O(d·b²).
    """

    name = "block_diagonal"

    @dataclass
    class Options:
        block_size: int = option(30, "size b of the dense diagonal blocks", min=1)

    @classmethod
    def shapes(cls, dim: int, **config: Any) -> dict[str, tuple[int, ...]]:
        b = int(config.get("block_size", cls.Options.block_size))
        if b < 1:
            raise ValueError(f"{cls.name}: block_size must be >= 1, got {b}")
        n, r = divmod(dim, b)
        return {"blocks": (n, b, b), "rest": (r, r)}

    @property
    def _split(self) -> tuple[int, int, int]:
        n, b, _ = self.data["blocks"].shape
        return n, b, self.data["rest"].shape[0]

    def to_dense(self) -> Tensor:
        blocks, rest = self.data["blocks"], self.data["rest"]
        return torch.block_diag(*blocks.unbind(0), rest)

    @classmethod
    def _project(cls, X: Tensor, dim: int, config: dict[str, Any]) -> dict[str, Tensor]:
        b = int(config["block_size"])
        n, r = divmod(dim, b)
        m = n * b
        grid = X[:m, :m].reshape(n, b, n, b)
        blocks = torch.diagonal(grid, dim1=0, dim2=2).permute(2, 0, 1).contiguous()
        return {"blocks": blocks, "rest": X[m:, m:].clone()}

    @staticmethod
    def _add_identity_(data: dict[str, Tensor], c: float) -> None:
        data["blocks"].diagonal(dim1=1, dim2=2).add_(c)
        data["rest"].diagonal().add_(c)

    def average_trace(self) -> Tensor:
        total = self.data["blocks"].diagonal(dim1=1, dim2=2).sum() + \
            self.data["rest"].diagonal().sum()
        return total / self.dim

    def _apply(self, X: Tensor, transpose: bool) -> Tensor:
        n, b, r = self._split
        blocks, rest = self.data["blocks"], self.data["rest"]
        if transpose:
            blocks, rest = blocks.transpose(1, 2), rest.T
        cols = X.shape[1]
        top = torch.bmm(blocks, X[: n * b].reshape(n, b, cols)).reshape(n * b, cols)
        return torch.cat([top, rest @ X[n * b:]], dim=0)

    def mm(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=False)

    def tmm(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=True)

    def __matmul__(self, other: Structure) -> BlockDiagonalStructure:
        self._check_same(other)
        return self._new({"blocks": torch.bmm(self.data["blocks"], other.data["blocks"]),
                          "rest": self.data["rest"] @ other.data["rest"]})

    def right_step(self, m: Structure, c: float) -> BlockDiagonalStructure:
        self._check_same(m)
        blocks, rest = self.data["blocks"], self.data["rest"]
        return self._new({"blocks": torch.baddbmm(blocks, blocks, m.data["blocks"], alpha=c),
                          "rest": torch.addmm(rest, rest, m.data["rest"], alpha=c)})

    def inner(self, X: Tensor | None = None) -> BlockDiagonalStructure:
        blocks, rest = self.data["blocks"], self.data["rest"]
        if X is None:
            return self._new({"blocks": torch.bmm(blocks.transpose(1, 2), blocks),
                              "rest": rest.T @ rest})
        n, b, r = self._split
        S = self.tmm(X)
        Sb = S[: n * b].reshape(n, b, S.shape[1])
        Sr = S[n * b:]
        return self._new({"blocks": torch.bmm(Sb, Sb.transpose(1, 2)), "rest": Sr @ Sr.T})

    def outer(self) -> BlockDiagonalStructure:
        blocks, rest = self.data["blocks"], self.data["rest"]
        return self._new({"blocks": torch.bmm(blocks, blocks.transpose(1, 2)),
                          "rest": rest @ rest.T})

    def congruence(self, A: Tensor) -> BlockDiagonalStructure:
        n, b, r = self._split
        Ad = self._project(A, self.dim, self.config)
        blocks, rest = self.data["blocks"], self.data["rest"]
        return self._new({
            "blocks": torch.bmm(blocks.transpose(1, 2), torch.bmm(Ad["blocks"], blocks)),
            "rest": rest.T @ (Ad["rest"] @ rest)})
