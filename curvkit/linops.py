"""Square linear operators over the trainable parameters: ``op @ v``, sums, scalings, scipy.

A :class:`LinearOperator` A acts on parameter space, P = Σ numel of the trainable
parameters. ``A @ v`` takes

* a list of tensors shaped like the parameters → a list of the same shapes,
* a flat tensor (P,) → (P,), parameters flattened in ``model.parameters()`` order,
* a matrix (P, k) → (P, k), column by column,

in the operator's ``dtype`` and on its ``device`` (inputs are moved and cast; a flat result
comes back on the input's device and in its dtype). ``shape`` is (P, P). ``A + B``,
``A - B``, ``c * A``, ``A + c`` (= A + c·I, a shift), ``-A`` build new operators without
evaluating anything.
``to_scipy()`` is a :class:`scipy.sparse.linalg.LinearOperator` on float64 numpy arrays
(for ``eigsh``, ``cg``, …), ``to_dense()`` the P×P matrix (P products; small models).

Made by ``estimator.linearize(batch)`` (the curvature C) and
``preconditioner.inverse_operator()`` (P⁻¹ d, the preconditioner's ``apply``).
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from curvkit.params import check_like, flatten, unflatten


class LinearOperator(abc.ABC):
    """A P×P operator on the parameter space described by ``like`` (tensors whose shapes,
    dtype and device it takes). Subclasses implement :meth:`matvec` on lists of tensors."""

    symmetric: bool = True

    def __init__(self, like: Sequence[Tensor]) -> None:
        if not like:
            raise ValueError("a linear operator needs at least one parameter")
        # shapes, dtype and device only: the operator never keeps the values of `like`
        self._shapes = [t.shape for t in like]
        self._numels = [t.numel() for t in like]
        self._dtype = like[0].dtype
        self._device = like[0].device

    # ------------------------------------------------------------ description
    @property
    def shape(self) -> tuple[int, int]:
        n = sum(self._numels)
        return (n, n)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def _like(self) -> list[Tensor]:
        """Zero-stride placeholders with the parameter shapes (for shape checks/splits)."""
        z = torch.zeros((), dtype=self._dtype, device=self._device)
        return [z.expand(s) for s in self._shapes]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, "
                f"device={self.device})")

    # ------------------------------------------------------------ products
    @abc.abstractmethod
    def matvec(self, v: Sequence[Tensor]) -> list[Tensor]:
        """A v for v a list of tensors shaped like the parameters."""

    def _matvec_checked(self, v: Sequence[Tensor]) -> list[Tensor]:
        check_like(v, self._like())
        return self.matvec([t.to(device=self._device, dtype=self._dtype) for t in v])

    def _flat(self, x: Tensor) -> Tensor:
        return flatten(self._matvec_checked(unflatten(
            x.to(device=self._device, dtype=self._dtype), self._like())))

    def __matmul__(self, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return self._matvec_checked(list(v))
        if not isinstance(v, Tensor):
            return NotImplemented
        n = self.shape[1]
        if v.dim() == 1:
            if v.numel() != n:
                raise ValueError(f"operator of shape {self.shape} @ vector of length "
                                 f"{v.numel()}")
            return self._flat(v).to(device=v.device, dtype=v.dtype)
        if v.dim() == 2:
            if v.shape[0] != n:
                raise ValueError(f"operator of shape {self.shape} @ matrix of shape "
                                 f"{tuple(v.shape)}")
            cols = [self._flat(v[:, j]) for j in range(v.shape[1])]
            if not cols:
                return v.new_zeros(n, 0)
            return torch.stack(cols, dim=1).to(device=v.device, dtype=v.dtype)
        raise ValueError(f"operator @ a tensor of {v.dim()} dimensions; give a vector (P,), "
                         f"a matrix (P, k) or a list of parameter-shaped tensors")

    # ------------------------------------------------------------ algebra
    def __add__(self, other: Any) -> LinearOperator:
        if isinstance(other, LinearOperator):
            return SumOperator([self, other], [1.0, 1.0])
        if isinstance(other, numbers.Real):
            return ShiftedOperator(self, float(other))
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other: Any) -> LinearOperator:
        if isinstance(other, LinearOperator):
            return SumOperator([self, other], [1.0, -1.0])
        if isinstance(other, numbers.Real):
            return ShiftedOperator(self, -float(other))
        return NotImplemented

    def __rsub__(self, other: Any) -> LinearOperator:
        return (-self) + other

    def __mul__(self, c: Any) -> LinearOperator:
        if isinstance(c, numbers.Real):
            return SumOperator([self], [float(c)])
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> LinearOperator:
        if isinstance(c, numbers.Real):
            return SumOperator([self], [1.0 / float(c)])
        return NotImplemented

    def __neg__(self) -> LinearOperator:
        return SumOperator([self], [-1.0])

    # ------------------------------------------------------------ exports
    def to_dense(self) -> Tensor:
        """The P×P matrix (P products: for small models and tests)."""
        n = self.shape[0]
        return self @ torch.eye(n, dtype=self._dtype, device=self._device)

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` on float64 numpy vectors and matrices
        (products computed in the operator's dtype and device, converted back)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        def mv(x: Any) -> Any:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
            return self._flat(t).detach().to("cpu", torch.float64).numpy()

        def mm(X: Any) -> Any:
            t = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float64))
            return (self @ t).detach().to("cpu", torch.float64).numpy()

        return ScipyOperator(self.shape, matvec=mv, rmatvec=mv if self.symmetric else None,
                             matmat=mm, dtype=np.float64)


class FunctionOperator(LinearOperator):
    """An operator from a function on lists of tensors (``apply(v) -> A v``)."""

    def __init__(self, like: Sequence[Tensor], apply: Callable[[list[Tensor]], list[Tensor]],
                 symmetric: bool = True) -> None:
        super().__init__(like)
        self._apply = apply
        self.symmetric = symmetric

    def matvec(self, v: Sequence[Tensor]) -> list[Tensor]:
        return list(self._apply(list(v)))


class SumOperator(LinearOperator):
    """Σ_i c_i A_i over operators on the same parameter space."""

    def __init__(self, ops: Sequence[LinearOperator], coefs: Sequence[float]) -> None:
        first = ops[0]
        for op in ops[1:]:
            if op.shape != first.shape or op._shapes != first._shapes:
                raise ValueError(f"operators act on different parameter spaces: {first} and "
                                 f"{op}")
        self._shapes, self._numels = list(first._shapes), list(first._numels)
        self._dtype = torch.promote_types(first.dtype, ops[-1].dtype)
        self._device = first.device
        self.ops, self.coefs = list(ops), [float(c) for c in coefs]
        self.symmetric = all(op.symmetric for op in ops)

    def matvec(self, v: Sequence[Tensor]) -> list[Tensor]:
        total: list[Tensor] | None = None
        for op, c in zip(self.ops, self.coefs):
            part = op._matvec_checked(v)
            part = [t * c for t in part] if c != 1.0 else part
            total = part if total is None else [a + b for a, b in zip(total, part)]
        assert total is not None
        return total


class ShiftedOperator(LinearOperator):
    """A + c·I (damping, spectral shifts)."""

    def __init__(self, op: LinearOperator, shift: float) -> None:
        self._shapes, self._numels = list(op._shapes), list(op._numels)
        self._dtype, self._device = op.dtype, op.device
        self.op, self.shift = op, float(shift)
        self.symmetric = op.symmetric

    def matvec(self, v: Sequence[Tensor]) -> list[Tensor]:
        return [a + self.shift * b for a, b in zip(self.op._matvec_checked(v), v)]
