"""The suite every structure of ``lie_group`` inherits (kind ``structure``).

A structure's test class only states which positions of a d×d matrix are free and which
are tied together (``key``), written as plain Python loops independently of the
implementation; the suite derives the dense reference of the projection Π from that and
checks every operation the SINGD update uses against dense float64 linear algebra, plus
float32 and bfloat16 runs, the registration (kind, name, options) and a few SINGD steps
through ``lie_group`` with the structure on both factors::

    from curvkit.testing import StructureSuite

    class TestBanded(StructureSuite):
        cls = Banded
        config = {"width": 1}          # the structure's options under test

        @staticmethod
        def key(i, j, d):              # tie-group of the free position (i, j), or None
            return (i, j) if abs(i - j) <= 1 else None

Set ``outer_closed = True`` if ``M Mᵀ`` stays in the structure (``outer()`` must then
return it).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import curvkit
from curvkit.structures.base import Structure

DIMS = (1, 2, 4, 7, 9)


def reference_projection(X: torch.Tensor, key) -> torch.Tensor:
    """Π(X) as a dense matrix from the pattern alone: fold, then average tied entries."""
    d = X.shape[0]
    groups: dict = {}
    for i in range(d):
        for j in range(d):
            k = key(i, j, d)
            if k is None:
                continue
            value = float(X[i, j])
            if i != j and key(j, i, d) is None:
                value += float(X[j, i])
            groups.setdefault(k, []).append(((i, j), value))
    out = torch.zeros(d, d, dtype=torch.float64)
    for members in groups.values():
        mean = sum(v for _, v in members) / len(members)
        for (i, j), _ in members:
            out[i, j] = mean
    return out


class StructureSuite:
    """The tests every structure must pass. Subclasses set ``cls``, ``config`` and ``key``
    (and ``outer_closed`` if M Mᵀ stays in the structure)."""

    cls: type[Structure]
    config: dict[str, Any] = {}
    outer_closed: bool = False

    @staticmethod
    def key(i: int, j: int, d: int):
        """A hashable tie-group of the free position (i, j), or None if M[i, j] ≡ 0."""
        raise AssertionError("test class must define key")

    # ----------------------------------------------------------------- helpers
    def random_dense(self, d, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed + 17 * d)
        return torch.randn(d, d, generator=g, dtype=torch.float64).to(dtype)

    def element(self, d, seed=0, dtype=torch.float64, shift=0.0):
        """A random element (Π is onto), optionally + shift·I."""
        X = self.random_dense(d, seed)
        M = self.cls.from_dense(X, **self.config).add_identity(shift)
        return M.to(dtype)

    def ref(self, X):
        return reference_projection(X.double(), self.key)

    # ----------------------------------------------------------------- projection
    @pytest.mark.parametrize("d", DIMS)
    def test_projection_matches_pattern_reference(self, d):
        X = self.random_dense(d, seed=1)
        P = self.cls.from_dense(X, **self.config)
        torch.testing.assert_close(P.to_dense(), self.ref(X), rtol=1e-12, atol=1e-12)
        S = X + X.T  # on symmetric matrices: the Π̂ of SINGD
        torch.testing.assert_close(self.cls.from_dense(S, **self.config).to_dense(),
                                   self.ref(S), rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("d", DIMS)
    def test_projection_idempotent_and_roundtrip(self, d):
        P = self.element(d, seed=2)
        dense = P.to_dense()
        # to_dense of an element has zeros outside the pattern
        for i in range(d):
            for j in range(d):
                if self.key(i, j, d) is None:
                    assert dense[i, j] == 0
        Q = self.cls.from_dense(dense, **self.config)
        # exact up to the rounding of averaging tied (Toeplitz) entries
        for k in P.data:
            torch.testing.assert_close(Q.data[k], P.data[k], rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(Q.to_dense(), dense, rtol=1e-14, atol=1e-15)
        R = self.cls.from_dense(Q.to_dense(), **self.config)
        torch.testing.assert_close(R.to_dense(), Q.to_dense(), rtol=1e-14, atol=1e-15)

    @pytest.mark.parametrize("d", DIMS)
    def test_identity_zeros_and_state(self, d):
        eye = self.cls.eye(d, dtype=torch.float64, **self.config)
        assert torch.equal(eye.to_dense(), torch.eye(d, dtype=torch.float64))
        assert torch.equal(self.cls.eye(d, dtype=torch.float64, scale=2.5, **self.config)
                           .to_dense(), 2.5 * torch.eye(d, dtype=torch.float64))
        zero = self.cls.zeros(d, dtype=torch.float64, **self.config)
        assert torch.equal(zero.to_dense(), torch.zeros(d, d, dtype=torch.float64))
        P = self.element(d, seed=3)
        rebuilt = self.cls(d, {k: t.clone() for k, t in P.data.items()}, **P.config)
        assert torch.equal(rebuilt.to_dense(), P.to_dense())
        assert P.numel() == sum(t.numel() for t in P.data.values())
        assert P.numel() <= d * d

    def test_bad_shapes_and_config(self):
        P = self.element(4)
        bad = {k: torch.zeros(*(s + 1 for s in t.shape)) for k, t in P.data.items()}
        with pytest.raises(ValueError, match=self.cls.name):
            self.cls(4, bad, **self.config)
        with pytest.raises(ValueError, match="unknown structure parameter"):
            self.cls.zeros(4, no_such_parameter=1)
        with pytest.raises(ValueError, match="square"):
            self.cls.from_dense(torch.zeros(2, 3), **self.config)

    # ----------------------------------------------------------------- closure
    @pytest.mark.parametrize("d", DIMS)
    def test_closure_of_update_operations(self, d):
        P, Q = self.element(d, seed=4, shift=2.0), self.element(d, seed=5)
        Pd, Qd = P.to_dense(), Q.to_dense()
        # the exact dense results lie in the structure: reading them back changes nothing
        for result, dense in [(P @ Q, Pd @ Qd), (P.add(Q, alpha=-0.3), Pd - 0.3 * Qd),
                              (P.scale(1.7), 1.7 * Pd), (P.add_identity(-1.0),
                                                         Pd - torch.eye(d, dtype=Pd.dtype))]:
            assert type(result) is self.cls
            torch.testing.assert_close(result.to_dense(), dense, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(self.ref(dense), dense, rtol=1e-12, atol=1e-12)
        # the SINGD step K(I − β m) stays in the group, composed or fused
        eye = torch.eye(d, dtype=Pd.dtype)
        expected = Pd @ (eye - 0.1 * Qd)
        for step in (P @ Q.scale(-0.1).add_identity(1.0), P.right_step(Q, -0.1)):
            assert type(step) is self.cls
            torch.testing.assert_close(step.to_dense(), expected, rtol=1e-12, atol=1e-12)
        # the momentum's combination, identity included, as one new element
        before = {k: t.clone() for k, t in {**P.data, **{"Q" + k: t for k, t in
                                                          Q.data.items()}}.items()}
        for a, terms, c in [(0.7, [(Q, -0.3), (P, 0.2)], -0.5), (1.0, [(Q, 2.0)], 0.0),
                            (-2.0, [], 1.5)]:
            comb = P.lincomb(a, terms, identity=c)
            dense = a * Pd + sum((b * X.to_dense() for X, b in terms),
                                 torch.zeros_like(Pd)) + c * eye
            assert type(comb) is self.cls
            torch.testing.assert_close(comb.to_dense(), dense, rtol=1e-12, atol=1e-12)
            # the same, accumulated into a fresh element's own storage
            fresh = P.scale(1.0)
            reused = fresh.lincomb(a, terms, identity=c, reuse=True)
            torch.testing.assert_close(reused.to_dense(), dense, rtol=1e-12, atol=1e-12)
            assert all(reused.data[k].data_ptr() == t.data_ptr() for k, t in fresh.data.items())
        # elements are immutable: none of the operations above changed an operand
        after = {**P.data, **{"Q" + k: t for k, t in Q.data.items()}}
        for k, t in before.items():
            assert torch.equal(after[k], t), k
        with pytest.raises(ValueError, match="same structure"):
            P @ self.cls.eye(d + 1, dtype=torch.float64, **self.config)

    @pytest.mark.parametrize("d", DIMS)
    def test_products_with_dense(self, d):
        P = self.element(d, seed=6, shift=1.0)
        Pd = P.to_dense()
        X = torch.randn(d, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
        torch.testing.assert_close(P.mm(X), Pd @ X, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(P.tmm(X), Pd.T @ X, rtol=1e-12, atol=1e-12)
        outer = P.outer()
        if self.outer_closed:
            assert type(outer) is self.cls
        if outer is not None:  # None: not closed under transposition, M Mᵀ leaves it
            torch.testing.assert_close(outer.to_dense(), Pd @ Pd.T, rtol=1e-12, atol=1e-12)

    @pytest.mark.parametrize("d", DIMS)
    def test_inner_gram_congruence(self, d):
        P = self.element(d, seed=7, shift=1.0)
        Pd = P.to_dense()
        g = torch.Generator().manual_seed(100 + d)
        X = torch.randn(d, 6, dtype=torch.float64, generator=g)
        A = X @ X.T / 6
        torch.testing.assert_close(P.inner(X).to_dense(), self.ref(Pd.T @ X @ X.T @ Pd),
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(P.gram().to_dense(), self.ref(Pd.T @ Pd),
                                   rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(P.congruence(A).to_dense(), self.ref(Pd.T @ A @ Pd),
                                   rtol=1e-10, atol=1e-10)
        # Π keeps the diagonal, so traces of projected matrices are exact
        torch.testing.assert_close(P.inner(X).average_trace(),
                                   torch.trace(Pd.T @ X @ X.T @ Pd) / d)
        torch.testing.assert_close(P.average_trace(), torch.trace(Pd) / d)
        torch.testing.assert_close(P.max_abs(), Pd.abs().max())

    # ----------------------------------------------------------------- low precision
    @pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
    def test_low_precision(self, dtype, tol):
        d = 9
        P64, Q64 = self.element(d, seed=8, shift=1.5), self.element(d, seed=9)
        P, Q = P64.to(dtype), Q64.to(dtype)
        X64 = torch.randn(d, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        X = X64.to(dtype)
        A64 = X64 @ X64.T
        for name, low, high in [
            ("matmul", P @ Q, P64 @ Q64),
            ("inner", P.inner(X), P64.inner(X64)),
            ("gram", P.gram(), P64.gram()),
            ("congruence", P.congruence(A64.to(dtype)), P64.congruence(A64)),
            ("step", P.add(P @ Q, alpha=-0.1), P64.add(P64 @ Q64, alpha=-0.1)),
            ("eye", self.cls.eye(d, dtype=dtype, **self.config),
             self.cls.eye(d, dtype=torch.float64, **self.config)),
        ]:
            assert all(t.dtype == dtype for t in low.data.values()), name
            ref = high.to_dense()
            scale = max(1.0, float(ref.abs().max()))
            err = float((low.to_dense().double() - ref).abs().max()) / scale
            assert err < tol, (name, err)
        for name, low, high in [("mm", P.mm(X), P64.mm(X64)), ("tmm", P.tmm(X), P64.tmm(X64))]:
            assert low.dtype == dtype
            err = float((low.double() - high).abs().max()) / max(1.0, float(high.abs().max()))
            assert err < tol, (name, err)
        assert torch.isfinite(P.average_trace()) and P.average_trace().dtype == dtype


    # ----------------------------------------------------------------- as a registered part
    def test_registered_with_its_options(self):
        spec = curvkit.get_registry().get("structure", self.cls.name)
        assert spec.cls is self.cls and spec.kind == "structure"
        assert {o.name for o in spec.options} >= set(self.config)
        part = curvkit.create("structure", self.cls.name, **self.config)
        assert isinstance(part, self.cls) and part.dim is None
        for k, v in self.config.items():
            assert part.config[k] == v
        with pytest.raises(curvkit.ConfigError, match="no_such_option"):
            curvkit.create("structure", self.cls.name, no_such_option=1)

    def test_trains_in_lie_group(self):
        """A few SINGD steps with the structure on both Kronecker factors (as a nested
        table, as a config names it): finite, and the loss goes down."""
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        X = torch.randn(32, 6, dtype=torch.float64)
        y = torch.randint(0, 3, (32,))
        table = {"name": self.cls.name, **self.config}
        opt = curvkit.build_optimizer(copy.deepcopy(model), nn.CrossEntropyLoss(), {
            "lr": 0.1, "estimator": "ef",
            "preconditioner": {"name": "lie_group", "structures": [table, table],
                               "lr_cov": 0.05, "update_every": 1, "damping": 1e-2},
            "solver": "direct"})
        losses = [float(opt.step((X, y))) for _ in range(8)]
        assert opt.counters["nonfinite"] == 0, losses
        assert losses[-1] < losses[0], losses
        labels = set(opt.preconditioner.structures().values())
        assert any(self.cls.name in label for label in labels), labels
