"""Shared pieces of the built-in loss parts (not parts themselves).

* :class:`ClassDimTerms`: the term layout of losses over class scores along dim 1
  (cross-entropy, NLL): output (N, C, d₁, …), one loss term per position (d₁, …), each over
  the C classes, class-index targets (N, d₁, …) with an ``ignore_index``.
* :func:`diagonal_sqrt`: columns of a diagonal output Hessian (MSE, BCE, Gaussian NLL).
"""

from __future__ import annotations

import torch
from torch import Tensor


class ClassDimTerms:
    """Terms of a loss whose class dimension is dim 1 (mixin of a ``LossPart``)."""

    loss_fn: object

    def terms(self, t: Tensor, lead: int = 0) -> Tensor:
        # (*lead, N, C, d…) -> (*lead, N, d…, C) -> (*lead, N, T, C)
        moved = t.movedim(lead + 1, -1)
        return moved.reshape(*t.shape[:lead], t.shape[lead], -1, t.shape[lead + 1])

    def untermed(self, t: Tensor, shape: torch.Size, lead: int = 0) -> Tensor:
        spatial = tuple(shape[2:])
        moved = t.reshape(*t.shape[:lead], shape[0], *spatial, shape[1])
        return moved.movedim(-1, lead + 1)

    def check_class_targets(self, out: Tensor, y: Tensor, where: str, probs_ok: bool) -> None:
        name = type(self.loss_fn).__name__
        if out.ndim < 2:
            raise ValueError(f"{where}: {name} needs batched scores (N, C, …), got shape "
                             f"{tuple(out.shape)}")
        if y.is_floating_point():
            if not probs_ok or y.shape != out.shape:
                raise ValueError(f"{where}: {name} got floating-point targets of shape "
                                 f"{tuple(y.shape)} for output {tuple(out.shape)}; "
                                 + ("probability targets must be shaped like the output"
                                    if probs_ok else "class-index (integer) targets needed"))
            return
        want = (out.shape[0], *out.shape[2:])
        if tuple(y.shape) != want:
            raise ValueError(f"{where}: {name} got class-index targets of shape "
                             f"{tuple(y.shape)} for output {tuple(out.shape)}; expected {want}")

    def counted(self, y: Tensor) -> Tensor:
        """(N, d…) bool: the class-index targets that count (not ``ignore_index``)."""
        return y != getattr(self.loss_fn, "ignore_index", -100)

    def onehot_counted(self, y: Tensor, C: int, dtype: torch.dtype) -> Tensor:
        """(N, C, d…): one-hot of the targets that count, zero columns where ignored."""
        mask = self.counted(y)
        idx = torch.where(mask, y, torch.zeros_like(y)).unsqueeze(1)
        oh = torch.zeros((y.shape[0], C, *y.shape[1:]), dtype=dtype, device=y.device)
        return oh.scatter_(1, idx, mask.unsqueeze(1).to(dtype))


def categorical_sqrt(p: Tensor, mass: Tensor | None, joint: bool) -> Tensor:
    """Columns (K, N, C, d…) of the per-term Hessian mass·(diag p − p pᵀ) over dim 1 of
    ``p`` (N, C, d…): √(mass·p_k) (e_k − p) for each class k (Σ_k p_k (e_k − p)(e_k − p)ᵀ =
    diag p − ppᵀ). ``joint``: K = C, each column on every position at once; otherwise
    K = C·R (R positions), each column on one position only."""
    N, C = p.shape[0], p.shape[1]
    spatial = p.shape[2:]
    pr = p.reshape(N, C, -1)                                  # (N, C, R)
    R = pr.shape[2]
    w = pr if mass is None else pr * mass.reshape(N, 1, R)
    eye = torch.eye(C, dtype=p.dtype, device=p.device)
    cols = w.sqrt().permute(1, 0, 2).unsqueeze(2) * (eye[:, None, :, None] - pr.unsqueeze(0))
    if joint or R == 1:
        return cols.reshape(C, N, C, *spatial)
    pos = torch.eye(R, dtype=p.dtype, device=p.device)       # column (k, r) lives at r only
    full = cols.unsqueeze(1) * pos[None, :, None, None, :]   # (C, R, N, C, R)
    return full.reshape(C * R, N, C, *spatial)


def diagonal_sqrt(h: Tensor, terms_of, joint: bool) -> Tensor:
    """Columns (K, *h.shape) of a diagonal per-sample Hessian with diagonal ``h`` (shaped
    like the output): √h_i e_i. ``joint``: K = D (the term dimension), column d holding
    √h at entry d of every term (``terms_of`` maps a tensor to (N, T, D)); otherwise one
    column per output entry of a sample."""
    N = h.shape[0]
    r = h.clamp_min(0).sqrt()
    if joint:
        rt = terms_of(r)                                      # (N, T, D)
        D = rt.shape[-1]
        eye = torch.eye(D, dtype=h.dtype, device=h.device)
        cols = rt.unsqueeze(0) * eye[:, None, None, :]        # (D, N, T, D)
        return cols.reshape(D, *h.shape)
    E = h[0].numel()
    eye = torch.eye(E, dtype=h.dtype, device=h.device)
    cols = eye[:, None, :] * r.reshape(1, N, E)               # (E, N, E)
    return cols.reshape(E, *h.shape)


class DiagonalHessian:
    """For losses whose per-term output Hessian is diagonal: ``hessian_sqrt`` and
    ``hessian_vector`` from ``_hdiag(out, y)`` (the diagonal, shaped like ``out``)."""

    def hessian_sqrt(self, out: Tensor, y: Tensor, terms: str = "separate") -> Tensor:
        return diagonal_sqrt(self._hdiag(out, y), self.terms, joint=terms == "joint")

    def hessian_vector(self, out: Tensor, y: Tensor):
        h = self._hdiag(out, y)
        return lambda w: h * w
