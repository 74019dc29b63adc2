"""Structured matrices of the ``lie_group`` preconditioner (curvkit.structures).

Every structure runs :class:`curvkit.testing.StructureSuite`: each test class only states
which positions of a d×d matrix are free and which are tied together (``key``); the suite
checks every operation the SINGD update uses against dense float64 linear algebra. Here
also: structures as registered parts (listed, nested tables with their own options, a new
structure from a plugin in one file).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit import structures
from curvkit.structures import (
    STRUCTURES,
    BlockDiagonalStructure,
    DenseStructure,
    DiagonalStructure,
    HierarchicalStructure,
    LowerTriangularStructure,
    TriangularToeplitzStructure,
    UpperTriangularStructure,
)
from curvkit.structures.base import diagonal_sums
from curvkit.testing import StructureSuite


# ----------------------------------------------------------------------------- structures
class TestDense(StructureSuite):
    cls = DenseStructure
    outer_closed = True

    @staticmethod
    def key(i, j, d):
        return (i, j)


class TestDiagonal(StructureSuite):
    cls = DiagonalStructure
    outer_closed = True

    @staticmethod
    def key(i, j, d):
        return (i, i) if i == j else None


class TestBlockDiagonal(StructureSuite):
    cls = BlockDiagonalStructure
    outer_closed = True
    config = {"block_size": 3}

    @staticmethod
    def key(i, j, d):
        return (i, j) if i // 3 == j // 3 else None


class TestBlockDiagonalDefault(StructureSuite):
    """singd's block30diagonal: every test dimension is inside the rest block."""

    cls = BlockDiagonalStructure
    outer_closed = True

    @staticmethod
    def key(i, j, d):
        return (i, j) if i // 30 == j // 30 else None


class TestHierarchical(StructureSuite):
    cls = HierarchicalStructure
    config = {"k1": 2, "k2": 3}

    @staticmethod
    def key(i, j, d):
        k1, k2 = 2, 3
        if d <= k1:
            top, mid_end = d, d
        elif d <= k1 + k2:
            top, mid_end = k1, k1
        else:
            top, mid_end = k1, d - k2
        if i < top:
            return (i, j)                      # dense top rows: A and B
        if i < mid_end:
            return (i, j) if i == j else None  # diagonal middle
        return (i, j) if j >= top else None    # bottom rows: D and E


class TestLowerToeplitz(StructureSuite):
    cls = TriangularToeplitzStructure

    @staticmethod
    def key(i, j, d):
        return i - j if i >= j else None


class TestUpperToeplitz(StructureSuite):
    cls = TriangularToeplitzStructure
    config = {"lower": False}

    @staticmethod
    def key(i, j, d):
        return j - i if j >= i else None


class TestLowerTriangular(StructureSuite):
    cls = LowerTriangularStructure

    @staticmethod
    def key(i, j, d):
        return (i, j) if i >= j else None


class TestUpperTriangular(StructureSuite):
    cls = UpperTriangularStructure

    @staticmethod
    def key(i, j, d):
        return (i, j) if j >= i else None


# ----------------------------------------------------------------------------- table, helpers
def test_every_structure_is_tested_and_named():
    tested = {c.cls for c in StructureSuite.__subclasses__()}
    assert set(STRUCTURES.values()) <= tested
    assert set(STRUCTURES) == {"dense", "diagonal", "block_diagonal", "hierarchical",
                               "triangular_toeplitz", "lower_triangular", "upper_triangular"}
    for name, cls in STRUCTURES.items():
        assert cls.name == name
        # one class name per concept: DiagonalStructure, not a second 'Diagonal' beside the
        # diagonal preconditioner
        assert cls.__name__.endswith("Structure"), cls.__name__


def test_lookup_error_names_close_match():
    assert structures.get("diagonal") is DiagonalStructure
    with pytest.raises(ValueError, match="did you mean 'diagonal'"):
        structures.get("diagonl", where="optimizer.preconditioner.structures[0]")


def test_diagonal_sums():
    X = torch.randn(6, 6, dtype=torch.float64)
    ref = torch.stack([X.diagonal().sum()] + [X.diagonal(k).sum() + X.diagonal(-k).sum()
                                              for k in range(1, 6)])
    torch.testing.assert_close(diagonal_sums(X), ref)


# ----------------------------------------------------------------------------- as parts
SCALAR_PLUGIN = '''
"""``scalar``: multiples of the identity, c·I (a one-dimensional abelian Lie group)."""
from __future__ import annotations

from typing import Any

import torch

from curvkit.hookspecs import hookimpl
from curvkit.structures.base import Structure


class Scalar(Structure):
    """M = c·I: Π(X) = (tr X / d)·I. Memory 1."""

    name = "scalar"

    @classmethod
    def shapes(cls, dim: int, **config: Any) -> dict[str, tuple[int, ...]]:
        return {"c": (1,)}

    def to_dense(self) -> torch.Tensor:
        return self.data["c"] * torch.eye(self.dim, dtype=self.dtype, device=self.device)

    @classmethod
    def _project(cls, X, dim, config):
        return {"c": (X.diagonal().sum() / max(dim, 1)).reshape(1)}

    @staticmethod
    def _add_identity_(data, c):
        data["c"].add_(c)


@hookimpl
def curvkit_parts():
    return [Scalar]
'''


@pytest.fixture
def scalar_structure(tmp_path, monkeypatch):
    """A structure from a plugin, written as one file, in a registry of its own."""
    import importlib
    import sys

    from curvkit import builtins, registry

    (tmp_path / "scalar_structure.py").write_text(SCALAR_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("scalar_structure")
    reg = registry.Registry()
    reg.add_plugin(builtins, "curvkit", "curvkit")
    reg.add_plugin(module, "scalar", "scalar-structure 0.1")
    reg._collect()
    monkeypatch.setattr(registry, "_REGISTRY", reg)
    yield module.Scalar
    sys.modules.pop("scalar_structure", None)


def test_a_plugin_structure_is_one_file_and_passes_the_suite(scalar_structure):
    class TestScalar(StructureSuite):
        cls = scalar_structure
        outer_closed = False

        @staticmethod
        def key(i, j, d):
            return "c" if i == j else None

    t = TestScalar()
    for d in (1, 4, 7):
        t.test_projection_matches_pattern_reference(d)
        t.test_closure_of_update_operations(d)
        t.test_inner_gram_congruence(d)
    t.test_registered_with_its_options()
    t.test_trains_in_lie_group()
    assert "scalar" in curvkit.components()["structure"]
    assert structures.get("scalar") is scalar_structure


def test_components_lists_structures_with_their_options(capsys):
    from curvkit.cli import main

    assert set(curvkit.components()["structure"]) == set(STRUCTURES)
    assert main(["components", "--kind", "structure"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("  block_diagonal — "):out.index("  dense — ")]
    assert "block_size: int (default 30, in [1, inf])" in block, block
    assert "k1: int" in out and "lower: bool" in out


def test_lie_group_structures_are_nested_tables_checked_up_front():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    base = {"lr": 0.1, "estimator": "ef", "solver": "direct"}

    def build(structures):
        return curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
            **base, "preconditioner": {"name": "lie_group", "structures": structures}})

    opt = build([{"name": "block_diagonal", "block_size": 2}, "hierarchical"])
    # the config layer completes each table with the structure's defaults
    k, c = opt.config.preconditioner.options.structures
    assert k == {"name": "block_diagonal", "block_size": 2}
    assert c == {"name": "hierarchical", "k1": 15, "k2": 15}
    labels = set(opt.preconditioner.structures().values())
    assert "lie_group[block_diagonal(block_size=2), hierarchical]" in labels
    K = opt.preconditioner.state["factors"]["0"]["K"]
    assert K["blocks"].shape == (2, 2, 2) and K["rest"].shape == (1, 1)  # d_K = 4 + 1
    with pytest.raises(curvkit.ConfigError,
                       match=r"optimizer\.preconditioner\.structures\[0\]\.block_sze: "
                             r"unknown option; did you mean 'block_size'"):
        build([{"name": "block_diagonal", "block_sze": 2}, "dense"])
    with pytest.raises(curvkit.ConfigError,
                       match=r"optimizer\.preconditioner\.structures\[1\]: unknown structure "
                             r"'dens'; did you mean 'dense'"):
        build(["dense", "dens"])
    with pytest.raises(curvkit.ConfigError,
                       match=r"structures\[0\]\.block_size: must be >= 1, got 0"):
        build([{"name": "block_diagonal", "block_size": 0}, "dense"])
    with pytest.raises(curvkit.ConfigError, match=r"structures\[1\]\.name: missing"):
        build(["dense", {"block_size": 2}])
    # a checkpoint's config holds plain tables (loadable with weights_only=True)
    import io

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)
