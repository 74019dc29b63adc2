"""Running averages, working dtypes and eigenvalue rectification shared by the
``diagonal``, ``block`` and ``kronecker`` preconditioners.

Running average (option ``ema`` = β, ``bias_correction``). With ``new_t`` the statistic
measured at the t-th update (t = 1, 2, …) the stored statistic is

    ŝ_t = (1 − w_t) ŝ_{t−1} + w_t new_t,

    w_t = (1 − β) / (1 − βᵗ)   with bias correction: ŝ_t = s_t / (1 − βᵗ) for Adam's
                               s_t = β s_{t−1} + (1 − β) new_t, s_0 = 0,
    w_t = 1 − β  (t ≥ 2), w_1 = 1   without: the first measurement initialises the average.

Both give ŝ_1 = new_1 and β = 0 gives ŝ_t = new_t (no averaging). The stored ŝ is already
corrected, so what is in the state is what the structure uses.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOW_PRECISION = (torch.bfloat16, torch.float16)


def ema_weight(count: int, ema: float, bias_correction: bool) -> float:
    """Weight w_t of the new measurement at the ``count``-th update (count from 1)."""
    if count <= 1 or ema == 0.0:
        return 1.0
    if bias_correction:
        return (1.0 - ema) / (1.0 - ema ** count)
    return 1.0 - ema


def blend(old: Tensor | None, new: Tensor, weight: float) -> Tensor:
    """(1 − w)·old + w·new as a new tensor (``old`` is never modified)."""
    if old is None or weight == 1.0:
        return new
    return torch.lerp(old, new.to(old.dtype), weight)


def working_dtype(dtype: torch.dtype, choice: str = "auto") -> torch.dtype:
    """The dtype statistics are kept and factorised in.

    ``"auto"``: float32 for bfloat16/float16 parameters (linear algebra in half precision is
    unreliable and mostly unsupported on CPU), the parameter dtype otherwise.
    """
    if choice == "float32":
        return torch.float32
    if choice == "float64":
        return torch.float64
    if choice != "auto":
        raise ValueError(f"unknown dtype choice {choice!r}; expected 'auto', 'float32' or "
                         f"'float64'")
    return torch.float32 if dtype in LOW_PRECISION else dtype


def rectify(values: Tensor, mode: str) -> Tensor:
    """Make curvature values non-negative: ``"abs"`` → |λ|, ``"clip"`` → max(λ, 0)."""
    if mode == "abs":
        return values.abs()
    if mode == "clip":
        return values.clamp_min(0.0)
    raise ValueError(f"unknown rectification {mode!r}; expected 'abs' or 'clip'")


def nan_like(t: Tensor) -> Tensor:
    """A tensor shaped like ``t`` filled with NaN: what a structure stores in place of an
    inverse it could not compute from non-finite statistics, so that the failure shows up
    (the optimizer rolls the update back) instead of passing silently."""
    return torch.full_like(t, float("nan"))


def psd_inverse(matrix: Tensor, damping: float, method: str, negative: str,
                check_finite: bool = True) -> tuple[Tensor, bool]:
    """(M + δI)⁻¹ of a symmetric matrix; returns ``(inverse, used_eigh)``.

    ``method="cholesky"``: Cholesky of M + δI; if M + δI is not positive definite, the
    eigendecomposition below is used instead (``used_eigh`` is then True).
    ``method="eigh"``: M = U diag(λ) Uᵀ, inverse U diag(1 / (ρ(λ) + δ)) Uᵀ with ρ from
    ``negative`` (|λ| or max(λ, 0)). A non-finite M gives a NaN inverse (pass
    ``check_finite=False`` only when the caller has checked M already).
    """
    if check_finite and not bool(torch.isfinite(matrix).all()):
        return nan_like(matrix), False
    if method == "cholesky":
        L, info = torch.linalg.cholesky_ex(damped_copy(matrix, damping))
        if int(info) == 0:
            return torch.cholesky_inverse(L), False
    elif method != "eigh":
        raise ValueError(f"unknown inverse method {method!r}; expected 'cholesky' or 'eigh'")
    evals, evecs = torch.linalg.eigh(matrix)
    scale = 1.0 / (rectify(evals, negative) + damping)
    return (evecs * scale) @ evecs.T, True


def damped_copy(matrix: Tensor, damping: float) -> Tensor:
    """M + δI as a new matrix, δ added on the diagonal of a copy (no n × n identity)."""
    out = matrix.clone()
    out.diagonal().add_(damping)
    return out
