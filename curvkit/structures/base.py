"""Base of the structured square matrices used by the ``lie_group`` (SINGD) preconditioner.

A structure is a set 𝒮 of d×d matrices given by a sparsity and tying pattern (diagonal,
block-diagonal, triangular, Toeplitz, ...) that is closed under addition, scaling and
matrix products and contains the identity, so its invertible elements form a matrix Lie
group and 𝒮 itself is that group's Lie algebra. SINGD keeps its Kronecker factors K, C in
the group and the momenta m_K, m_C in the algebra; the update K ← K (I − β m_K) only
multiplies and adds elements of 𝒮, so it never leaves the structure and never inverts.

A subclass stores the free entries of its matrices in ``self.data`` (a dict of tensors)
and implements four things:

* ``to_dense()``: the d×d matrix;
* ``_project(X, dim, config)``: the free entries of Π(X) (see below) for a dense X;
* ``shapes(dim, **config)``: the shape of every stored tensor;
* ``_add_identity_(data, c)``: M + c·I, in place on an element's stored tensors.

Everything else (products with dense matrices and with other elements of 𝒮, the
congruence Π(Kᵀ M K), the Gram matrix Π(Kᵀ K), traces, identity and zero matrices) has a
correct default built from those, which subclasses override with structure-exploiting
versions where it pays.

The projection Π
----------------
The update needs the "structured part" of symmetric matrices such as Kᵀ A K. For a
pattern P (the set of free positions (i, j)), Π first *folds* a matrix X onto P,

    fold(X)[i, j] = X[i, j] + [ (j, i) ∉ P ] · X[j, i]      for (i, j) ∈ P, i ≠ j,
    fold(X)[i, i] = X[i, i],

(an off-diagonal entry whose mirror is not free collects both halves of the symmetric
pair, e.g. 2·X[i, j] for triangular structures and a symmetric X), then averages the
entries that a structure ties together (the diagonals of a Toeplitz matrix). This is the
Π̂ of Lin et al. (2024, SINGD), it keeps the diagonal (so traces are preserved), and for an
element S of 𝒮 it gives Π(S) = S, i.e. ``from_dense(S.to_dense()) == S``; Π is therefore
idempotent.

Elements are immutable: every operation returns a new object with new tensors (the
preconditioner's state contract: tensors are replaced, never modified in place).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from curvkit.options import build_options
from curvkit.parts import Part


class Structure(Part, abc.ABC):
    """A d×d matrix with a fixed structure; see the module docstring.

    A registered part (kind ``structure``): its parameters (e.g. ``block_size``) are the
    fields of its ``Options`` dataclass; ``config`` of an instance holds the values it was
    built with, as a dict. ``curvkit.create("structure", name, **options)`` (or a nested
    table of ``lie_group``'s ``structures``) gives the structure with its options and no
    matrix (``dim`` None); :meth:`zeros`, :meth:`eye` and :meth:`from_dense` with
    ``**config`` make elements.
    """

    kind = "structure"
    name: ClassVar[str] = ""
    # True if products with a dense (d, n) matrix cost O(d²n) (no sparsity to exploit):
    # then Π(Mᵀ A M) from a d×d A can be cheaper than ``inner`` with a tall root of A
    DENSE_PRODUCTS: ClassVar[bool] = False

    def __init__(self, dim: int | None = None, data: Mapping[str, Tensor] | None = None,
                 options: Any | None = None, **config: Any) -> None:
        if options is not None:
            config = {**dataclasses.asdict(options), **config}
        self.config = self.resolve_config(config)
        super().__init__(self.Options(**self.config))
        if dim is None and data is None:  # the part itself (a choice of structure)
            self.dim, self.data = None, {}
            return
        self.dim = int(dim)
        expected = self.shapes(self.dim, **self.config)
        data = dict(data)
        if set(data) != set(expected):
            raise ValueError(f"{self.name}: expected tensors {sorted(expected)}, "
                             f"got {sorted(data)}")
        for key, shape in expected.items():
            if tuple(data[key].shape) != tuple(shape):
                raise ValueError(f"{self.name}: tensor {key!r} of a {self.dim}×{self.dim} "
                                 f"matrix must have shape {tuple(shape)}, got "
                                 f"{tuple(data[key].shape)}")
        self.data = data

    # ------------------------------------------------------------------ configuration
    @classmethod
    def resolve_config(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """``config`` validated against ``Options`` and completed with the defaults; unknown
        keys are an error."""
        known = [f.name for f in dataclasses.fields(cls.Options)]
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"{cls.name}: unknown structure parameter(s) {unknown}; "
                             f"known: {known or 'none'}")
        return dataclasses.asdict(build_options(cls.Options, config, f"structure {cls.name}"))

    # ------------------------------------------------------------------ to implement
    @classmethod
    @abc.abstractmethod
    def shapes(cls, dim: int, **config: Any) -> dict[str, tuple[int, ...]]:
        """Shapes of the stored tensors of a dim×dim matrix."""

    @abc.abstractmethod
    def to_dense(self) -> Tensor:
        """The represented (dim, dim) matrix."""

    @classmethod
    @abc.abstractmethod
    def _project(cls, X: Tensor, dim: int, config: dict[str, Any]) -> dict[str, Tensor]:
        """Stored tensors of Π(X) for a dense (dim, dim) matrix X."""

    @staticmethod
    @abc.abstractmethod
    def _add_identity_(data: dict[str, Tensor], c: float) -> None:
        """Add c·I to the stored tensors ``data`` of an element, in place (they belong to a
        new element that the caller owns: see :meth:`add_identity`, :meth:`lincomb`)."""

    def add_identity(self, c: float) -> Structure:
        """M + c·I."""
        data = {k: t.clone() for k, t in self.data.items()}
        self._add_identity_(data, c)
        return self._new(data)

    # ------------------------------------------------------------------ construction
    def _new(self, data: Mapping[str, Tensor]) -> Structure:
        """An element of the same structure, dimension and config from new stored tensors.

        The tensors come from operations on this element's own (validated) tensors, so the
        shape checks of ``__init__`` are skipped: the update builds dozens of intermediate
        elements per layer, and re-validating each cost as much as the arithmetic for the
        sparse structures (measured on SINGD's diagonal update)."""
        return type(self).trusted(self.dim, data, self.config)

    @classmethod
    def trusted(cls, dim: int, data: Mapping[str, Tensor], config: dict[str, Any]
                ) -> Structure:
        """An element from stored tensors and a resolved config that an earlier element of
        the same structure produced (the preconditioner's own state), without re-checking
        them: the state is validated where it enters (``__init__``, ``load_state_dict``)."""
        new = object.__new__(cls)
        new.dim, new.config, new.data = int(dim), config, dict(data)
        return new

    @classmethod
    def from_dense(cls, X: Tensor, **config: Any) -> Structure:
        """Π(X): the projection of a square matrix onto the structure (module docstring)."""
        if X.ndim != 2 or X.shape[0] != X.shape[1]:
            raise ValueError(f"{cls.name}: from_dense needs a square matrix, got shape "
                             f"{tuple(X.shape)}")
        cfg = cls.resolve_config(config)
        return cls(X.shape[0], cls._project(X, X.shape[0], cfg), **cfg)

    @classmethod
    def zeros(cls, dim: int, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None, **config: Any) -> Structure:
        cfg = cls.resolve_config(config)
        data = {k: torch.zeros(s, dtype=dtype, device=device)
                for k, s in cls.shapes(dim, **cfg).items()}
        return cls(dim, data, **cfg)

    @classmethod
    def eye(cls, dim: int, dtype: torch.dtype | None = None,
            device: torch.device | str | None = None, scale: float = 1.0,
            **config: Any) -> Structure:
        """scale·I (the identity added into the fresh zeros: no second copy)."""
        element = cls.zeros(dim, dtype, device, **config)
        element._add_identity_(element.data, scale)
        return element

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.data.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.data.values())).device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def numel(self) -> int:
        """Number of stored entries (the memory of one element of the structure)."""
        return sum(t.numel() for t in self.data.values())

    def to(self, dtype: torch.dtype) -> Structure:
        return self._new({k: t.to(dtype) for k, t in self.data.items()})

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}(dim={self.dim}{', ' if cfg else ''}{cfg})"

    # ------------------------------------------------------------------ linear algebra
    def add(self, other: Structure, alpha: float = 1.0) -> Structure:
        """self + alpha·other (same structure: stored entries add)."""
        self._check_same(other)
        return self._new({k: t.add(other.data[k], alpha=alpha) for k, t in self.data.items()})

    def lincomb(self, a: float | Tensor, terms: Sequence[tuple[Structure, float]] = (),
                identity: float = 0.0, *, reuse: bool = False) -> Structure:
        """a·self + Σ_j b_j·X_j + identity·I (same structure) as one new element: one
        allocation per stored tensor, the terms accumulated into it in place. The SINGD
        update forms such combinations of d×d matrices (d the layer's input width); a chain
        of out-of-place ``scale``/``add`` allocated and swept memory once per operation,
        which cost more than the update's matrix products for the dense structure
        (measured).

        ``reuse=True`` accumulates into this element's own tensors instead (no allocation):
        only for an element that the caller has just made and that nothing else holds (nor
        ``terms``), such as an intermediate of the update; elements are otherwise immutable."""
        for X, _ in terms:
            self._check_same(X)
        rest = list(terms)
        data = {}
        for k, t in self.data.items():
            if reuse:
                data[k] = t if isinstance(a, (int, float)) and a == 1.0 else t.mul_(a)
                todo = rest
            elif rest and isinstance(a, (int, float)) and a == 1.0:
                X, b = rest[0]  # self + b·X in one pass
                data[k] = torch.add(t, X.data[k], alpha=float(b))
                todo = rest[1:]
            else:
                data[k] = t * a
                todo = rest
            for X, b in todo:
                data[k].add_(X.data[k], alpha=float(b))
        if identity != 0.0:
            self._add_identity_(data, identity)
        return self._new(data)

    def right_step(self, m: Structure, c: float) -> Structure:
        """self·(I + c·m) = self + c·self @ m (same structure): SINGD's K ← K(I − β m_K)."""
        return self.lincomb(1.0, [(self @ m, c)])

    def scale(self, c: float) -> Structure:
        """c·self."""
        return self._new({k: t * c for k, t in self.data.items()})

    def max_abs(self) -> Tensor:
        """max |M_ij|: the largest stored entry in absolute value (0 for an empty matrix)."""
        vals = [t.abs().max() for t in self.data.values() if t.numel()]
        if not vals:
            return torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.stack(vals).max()

    def average_trace(self) -> Tensor:
        """tr(M) / dim."""
        return self.to_dense().diagonal().mean()

    def mm(self, X: Tensor) -> Tensor:
        """M @ X for a dense (dim, n) matrix X."""
        return self.to_dense() @ X

    def tmm(self, X: Tensor) -> Tensor:
        """Mᵀ @ X for a dense (dim, n) matrix X."""
        return self.to_dense().T @ X

    def __matmul__(self, other: Structure) -> Structure:
        """The product of two elements (it stays in the structure: closure)."""
        self._check_same(other)
        return self._new(self._project(self.to_dense() @ other.to_dense(), self.dim,
                                       self.config))

    def inner(self, X: Tensor | None = None) -> Structure:
        """Π(Mᵀ X Xᵀ M) for a dense (dim, n) matrix X; Π(Mᵀ M) if X is None.

        With X = aᵀ/√N (a: N inputs as rows) this is Π(Mᵀ A M), A = aᵀa/N, at the cost of
        products with X instead of a dim×dim matrix.
        """
        S = self.to_dense().T if X is None else self.tmm(X)
        return self._new(self._project(S @ S.T, self.dim, self.config))

    def gram(self) -> Structure:
        """Π(Mᵀ M)."""
        return self.inner(None)

    def outer(self) -> Structure | None:
        """M Mᵀ as an element of the structure, or None if the structure is not closed
        under transposition (triangular, Toeplitz, hierarchical). The preconditioner then
        applies M Mᵀ as two products instead of one."""
        return None

    def diagonal_entries(self) -> Tensor | None:
        """The diagonal (dim,) if every element of the structure is diagonal, so products
        with it are element-wise scalings; None otherwise (the default)."""
        return None

    def congruence(self, A: Tensor) -> Structure:
        """Π(Mᵀ A M) for a dense (dim, dim) matrix A."""
        MtA_T = self.tmm(A.T)               # Mᵀ Aᵀ = (A M)ᵀ
        return self._new(self._project(self.tmm(MtA_T.T), self.dim, self.config))

    # ------------------------------------------------------------------ helpers
    def _check_same(self, other: Structure) -> None:
        if type(other) is not type(self) or other.dim != self.dim or \
                other.config != self.config:
            raise ValueError(f"cannot combine {self!r} with {other!r}: both operands must "
                             f"have the same structure and size")


def diagonal_sums(X: Tensor) -> Tensor:
    """s[k] = Σ_i X[i+k, i] + Σ_i X[i, i+k] for k ≥ 1 and s[0] = tr X, for a (d, d) matrix.

    Shifts row i of X by i positions (pad + reshape), so column k of the result collects
    the k-th super-diagonal; no index tensors, works in every dtype.
    """
    d = X.shape[0]
    if d == 0:
        return X.new_zeros(0)

    def upper(M: Tensor) -> Tensor:
        # rows of width 2d re-read with width 2d + 1 shift row i left by i, so M[i, i + k]
        # lands in column k (entries with i + k ≥ d read the zero padding)
        flat = torch.nn.functional.pad(M, (0, d)).reshape(-1)
        flat = torch.nn.functional.pad(flat, (0, d))
        return flat.reshape(d, 2 * d + 1)[:, :d].sum(0)

    s = upper(X) + upper(X.T)
    s[0] = s[0] * 0.5
    return s


class FullMatrix(Structure):
    """Storage shared by structures kept as one d×d matrix ``mat`` (dense, triangular):
    the matrix is its own dense form, and products and traces read it directly."""

    DENSE_PRODUCTS = True

    @classmethod
    def shapes(cls, dim: int, **config: Any) -> dict[str, tuple[int, ...]]:
        return {"mat": (dim, dim)}

    def to_dense(self) -> Tensor:
        return self.data["mat"]

    @staticmethod
    def _add_identity_(data: dict[str, Tensor], c: float) -> None:
        data["mat"].diagonal().add_(c)

    def average_trace(self) -> Tensor:
        return self.data["mat"].diagonal().mean()

    def mm(self, X: Tensor) -> Tensor:
        return self.data["mat"] @ X

    def tmm(self, X: Tensor) -> Tensor:
        return self.data["mat"].T @ X
