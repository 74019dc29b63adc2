"""Structured square matrices for the ``lie_group`` (SINGD) preconditioner.

``STRUCTURES`` maps each structure name (what a config's ``structures`` option names) to
its class; :func:`get` looks a name up with a clear error.
"""

from __future__ import annotations

import difflib

from curvkit.structures.base import Structure
from curvkit.structures.block_diagonal import BlockDiagonal
from curvkit.structures.dense import Dense
from curvkit.structures.diagonal import Diagonal
from curvkit.structures.hierarchical import Hierarchical
from curvkit.structures.lower_triangular import LowerTriangular
from curvkit.structures.triangular_toeplitz import TriangularToeplitz
from curvkit.structures.upper_triangular import UpperTriangular

STRUCTURES: dict[str, type[Structure]] = {
    cls.name: cls for cls in (Dense, Diagonal, BlockDiagonal, Hierarchical,
                              TriangularToeplitz, LowerTriangular, UpperTriangular)
}


def get(name: str, where: str = "structure") -> type[Structure]:
    """The structure class registered as ``name``."""
    try:
        return STRUCTURES[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(STRUCTURES), n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"{where}: unknown structure {name!r}{hint} (known: "
                         f"{', '.join(STRUCTURES)})") from None


__all__ = ["STRUCTURES", "Structure", "get", "Dense", "Diagonal", "BlockDiagonal",
           "Hierarchical", "TriangularToeplitz", "LowerTriangular", "UpperTriangular"]
