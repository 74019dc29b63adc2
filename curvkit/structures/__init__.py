"""Structured square matrices for the ``lie_group`` (SINGD) preconditioner.

Each structure is a registered part of kind ``structure`` (one file per structure, named as
registered, with its own ``Options``); a plugin adds one through the ``curvkit_parts`` hook
like any other part, and ``lie_group`` names them in nested tables. ``STRUCTURES`` maps the
built-in names to their classes; :func:`get` looks a name up among every registered
structure (plugins included) with a clear error.
"""

from __future__ import annotations

import difflib

from curvkit.structures.base import Structure
from curvkit.structures.block_diagonal import BlockDiagonalStructure
from curvkit.structures.dense import DenseStructure
from curvkit.structures.diagonal import DiagonalStructure
from curvkit.structures.hierarchical import HierarchicalStructure
from curvkit.structures.lower_triangular import LowerTriangularStructure
from curvkit.structures.triangular_toeplitz import TriangularToeplitzStructure
from curvkit.structures.upper_triangular import UpperTriangularStructure

STRUCTURES: dict[str, type[Structure]] = {
    cls.name: cls for cls in (DenseStructure, DiagonalStructure, BlockDiagonalStructure,
                              HierarchicalStructure, TriangularToeplitzStructure,
                              LowerTriangularStructure, UpperTriangularStructure)
}


def get(name: str, where: str = "structure") -> type[Structure]:
    """The structure class registered as ``name`` (built-in or from a plugin)."""
    from curvkit.registry import get_registry

    registry = get_registry()
    known = registry.names("structure")
    if name in known:
        return registry.get("structure", name).cls
    close = difflib.get_close_matches(name, known, n=2)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"{where}: unknown structure {name!r}{hint} (known: "
                     f"{', '.join(known)})")


__all__ = ["STRUCTURES", "Structure", "get", "DenseStructure", "DiagonalStructure",
           "BlockDiagonalStructure", "HierarchicalStructure", "TriangularToeplitzStructure",
           "LowerTriangularStructure", "UpperTriangularStructure"]
