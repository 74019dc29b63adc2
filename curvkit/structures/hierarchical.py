"""``hierarchical``: dense top rows and bottom-right corner, diagonal in the middle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.options import option
from curvkit.structures.base import Structure


class HierarchicalStructure(Structure):
    """Block rows of sizes (k₁, m, k₂), m = d − k₁ − k₂::

        M = [ A   B_m   B_e ]      A: k₁×k₁, B = [B_m | B_e]: k₁×(m + k₂) dense
            [ 0   diag(c) 0 ]      c: m
            [ 0   D     E   ]      D: k₂×m, E: k₂×k₂ dense

    If d ≤ k₁ only A exists; if k₁ < d ≤ k₁ + k₂ there is no middle block (m = 0).
    Π(X) keeps A = X₁₁, c = diag(X₂₂), E = X₃₃ and folds the off-diagonal blocks,
    B = X[top, rest] + X[rest, top]ᵀ, D = X₃₂ + X₂₃ᵀ. Memory ≈ (k₁ + k₂)·d, products
    O((k₁ + k₂)·d·n). Defaults k₁ = k₂ = 15 (singd's ``hierarchical15_15``).
    """

    name = "hierarchical"

    @dataclass
    class Options:
        k1: int = option(15, "size k₁ of the dense top block rows", min=0)
        k2: int = option(15, "size k₂ of the dense bottom-right block", min=0)

    @classmethod
    def sizes(cls, dim: int, k1: int, k2: int) -> tuple[int, int, int]:
        """(k₁, m, k₂) actually used for a dim×dim matrix."""
        if k1 < 0 or k2 < 0:
            raise ValueError(f"{cls.name}: k1 and k2 must be >= 0, got {k1}, {k2}")
        if dim <= k1:
            return dim, 0, 0
        if dim <= k1 + k2:
            return k1, 0, dim - k1
        return k1, dim - k1 - k2, k2

    @classmethod
    def shapes(cls, dim: int, **config: Any) -> dict[str, tuple[int, ...]]:
        cfg = cls.resolve_config(config)
        a, m, e = cls.sizes(dim, int(cfg["k1"]), int(cfg["k2"]))
        return {"A": (a, a), "B": (a, m + e), "c": (m,), "D": (e, m), "E": (e, e)}

    @property
    def _sizes(self) -> tuple[int, int, int]:
        return self.data["A"].shape[0], self.data["c"].shape[0], self.data["E"].shape[0]

    def to_dense(self) -> Tensor:
        a, m, e = self._sizes
        d = self.data
        out = d["A"].new_zeros(self.dim, self.dim)
        out[:a, :a] = d["A"]
        out[:a, a:] = d["B"]
        out[a:a + m, a:a + m] = torch.diag(d["c"])
        out[a + m:, a:a + m] = d["D"]
        out[a + m:, a + m:] = d["E"]
        return out

    @classmethod
    def _project(cls, X: Tensor, dim: int, config: dict[str, Any]) -> dict[str, Tensor]:
        a, m, e = cls.sizes(dim, int(config["k1"]), int(config["k2"]))
        s = a + m
        return {"A": X[:a, :a].clone(),
                "B": X[:a, a:] + X[a:, :a].T,
                "c": X.diagonal()[a:s].clone(),
                "D": X[s:, a:s] + X[a:s, s:].T,
                "E": X[s:, s:].clone()}

    @staticmethod
    def _add_identity_(data: dict[str, Tensor], c: float) -> None:
        data["A"].diagonal().add_(c)
        data["c"].add_(c)
        data["E"].diagonal().add_(c)

    def average_trace(self) -> Tensor:
        d = self.data
        return (d["A"].diagonal().sum() + d["c"].sum() + d["E"].diagonal().sum()) / self.dim

    # The products write each block row into one preallocated output and accumulate with
    # addmm_: the middle block row (m ≈ d rows) is then swept once per term instead of once
    # per temporary, sum and concatenation (the step's cost for this structure).
    def mm(self, X: Tensor) -> Tensor:
        a, m, e = self._sizes
        d = self.data
        X1, X2, X3 = X[:a], X[a:a + m], X[a + m:]
        out = X.new_empty(X.shape, dtype=torch.result_type(d["A"], X))
        torch.mm(d["A"], X1, out=out[:a]).addmm_(d["B"], X[a:])
        torch.mul(d["c"].unsqueeze(1), X2, out=out[a:a + m])
        torch.mm(d["E"], X3, out=out[a + m:]).addmm_(d["D"], X2)
        return out

    def tmm(self, X: Tensor) -> Tensor:
        a, m, e = self._sizes
        d = self.data
        X1, X2, X3 = X[:a], X[a:a + m], X[a + m:]
        Bm, Be = d["B"][:, :m], d["B"][:, m:]
        out = X.new_empty(X.shape, dtype=torch.result_type(d["A"], X))
        torch.mm(d["A"].T, X1, out=out[:a])
        torch.mul(d["c"].unsqueeze(1), X2, out=out[a:a + m]).addmm_(Bm.T, X1) \
            .addmm_(d["D"].T, X3)
        torch.mm(d["E"].T, X3, out=out[a + m:]).addmm_(Be.T, X1)
        return out

    def __matmul__(self, other: Structure) -> HierarchicalStructure:
        self._check_same(other)
        a, m, e = self._sizes
        p, q = self.data, other.data
        pBm, pBe = p["B"][:, :m], p["B"][:, m:]
        qBm, qBe = q["B"][:, :m], q["B"][:, m:]
        B = torch.cat([p["A"] @ qBm + pBm * q["c"] + pBe @ q["D"],
                       p["A"] @ qBe + pBe @ q["E"]], dim=1)
        return self._new({"A": p["A"] @ q["A"], "B": B, "c": p["c"] * q["c"],
                          "D": p["D"] * q["c"] + p["E"] @ q["D"], "E": p["E"] @ q["E"]})

    def inner(self, X: Tensor | None = None) -> HierarchicalStructure:
        a, m, e = self._sizes
        d = self.data
        if X is None:
            # Π(Mᵀ M) from the blocks of Mᵀ M, without forming it
            Bm, Be = d["B"][:, :m], d["B"][:, m:]
            return self._new({
                "A": d["A"].T @ d["A"],
                "B": 2 * (d["A"].T @ d["B"]),
                "c": d["c"].square() + Bm.square().sum(0) + d["D"].square().sum(0),
                "D": 2 * (Be.T @ Bm + d["E"].T @ d["D"]),
                "E": Be.T @ Be + d["E"].T @ d["E"]})
        S = self.tmm(X)
        S1, S2, S3 = S[:a], S[a:a + m], S[a + m:]
        return self._new({"A": S1 @ S1.T,
                          "B": 2 * (S1 @ S[a:].T),
                          "c": S2.square().sum(1),
                          "D": 2 * (S3 @ S2.T),
                          "E": S3 @ S3.T})
