"""``cross_entropy``: :class:`torch.nn.CrossEntropyLoss` (logits, softmax likelihood)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.losses._layout import ClassDimTerms, categorical_sqrt
from curvkit.losses.base import LossPart, Terms, categorical, global_noise


class CrossEntropyLossPart(ClassDimTerms, LossPart):
    """Cross-entropy on logits (N, C, d…), class-index or probability targets.

    Label smoothing and ``ignore_index`` are supported.

    Label smoothing, ``ignore_index`` and class weights (``weight=``) are supported.

    Per term (a position d… of a sample) with p = softmax(f), class weights w (all 1
    without ``weight=``) and the effective target q — q = w ⊙ ((1 − ε) e_y + ε/C) for a class
    index y and label smoothing ε, q = 0 for an ignored target, q = w ⊙ ((1 − ε) y + ε/C) for
    probability targets (torch's definition of the weighted loss) — and m = Σ_k q_k (1
    without weights, 0 where ignored; (1 − ε) w_y + ε/C Σ_k w_k with weights):

        ℓ = −Σ_k q_k log p_k,   ∇_f ℓ = m p − q,   ∂²ℓ/∂f² = m (diag p − p pᵀ).

    Reduction factor: 1 for ``sum``; for ``mean`` 1/(what torch divides by): the number of
    targets ≠ ``ignore_index`` — with class weights Σ_t w_{y_t} over them — for class
    indices, N·∏d for probabilities. Sampling: ŷ ~ Categorical(p) per term,
    s = √m (p − e_ŷ), so E[s sᵀ] = m (diag p − p pᵀ) = ∂²ℓ/∂f²: with class weights the
    sampled statistic estimates the GGN of the weighted loss (the weight m comes from the
    true target; it is not the Fisher of a likelihood whose weight follows the drawn label).
    """

    name = "cross_entropy"
    loss_type = nn.CrossEntropyLoss

    @classmethod
    def refusal(cls, loss_fn: Any) -> str:
        w = loss_fn.weight
        if w is not None and (w.ndim != 1 or not bool(torch.isfinite(w).all())
                              or bool((w < 0).any())):
            return ("class weights (weight=...) must be a finite, non-negative (C,) vector "
                    "(a negative weight makes the output Hessian indefinite)")
        return ""

    def check(self, out: Tensor, y: Tensor, where: str) -> None:
        self.check_class_targets(out, y, where, probs_ok=True)

    # ------------------------------------------------------------------ targets
    def _eps(self) -> float:
        return float(self.loss_fn.label_smoothing)

    def _class_weights(self, out: Tensor) -> Tensor | None:
        """w (1, C, 1…) broadcastable against ``out``, or None without ``weight=``."""
        w = self.loss_fn.weight
        if w is None:
            return None
        return w.to(dtype=out.dtype, device=out.device).reshape(1, -1, *([1] * (out.ndim - 2)))

    def _soft_targets(self, out: Tensor, y: Tensor) -> Tensor:
        """q (N, C, d…) for probability targets."""
        q = y.to(out.dtype)
        eps = self._eps()
        q = q * (1.0 - eps) + eps / out.shape[1] if eps else q
        w = self._class_weights(out)
        return q if w is None else q * w

    def _index_targets(self, out: Tensor, y: Tensor) -> Tensor:
        """q (N, C, d…) for class-index targets with class weights (dense; the unweighted
        path never forms it)."""
        mask = self.counted(y)
        C, eps = out.shape[1], self._eps()
        w = self._class_weights(out)
        idx = torch.where(mask, y, torch.zeros_like(y)).unsqueeze(1)
        q = torch.zeros_like(out).scatter_(1, idx, 1.0 - eps)
        if eps:
            q = q + eps / C
        q = q * w
        return q * mask.unsqueeze(1).to(q.dtype)

    def _mass(self, out: Tensor, y: Tensor) -> Tensor | None:
        """m (N, d…) = Σ_k q_k, or None when every m is 1."""
        if y.is_floating_point():
            return self._soft_targets(out, y).sum(1)
        if self.loss_fn.weight is not None:
            return self._index_targets(out, y).sum(1)
        mask = self.counted(y)
        return None if bool(mask.all()) else mask.to(out.dtype)

    def term_weights(self, out: Tensor, y: Tensor) -> Tensor | None:
        m = self._mass(out, y)
        return None if m is None else m.reshape(out.shape[0], -1)

    def normalizer(self, out: Tensor, y: Tensor) -> float:
        if y.is_floating_point():
            return float(out.numel() // out.shape[1])
        mask = self.counted(y)
        w = self.loss_fn.weight
        if w is None:
            return float(mask.sum())
        # torch divides by the weights of the counted targets (label smoothing aside)
        w = w.to(device=y.device)
        return float(w[torch.where(mask, y, torch.zeros_like(y))][mask].sum())

    # ------------------------------------------------------------------ math
    def per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        lf = self.loss_fn
        kw: dict[str, Any] = {"label_smoothing": lf.label_smoothing, "reduction": "none",
                              "weight": lf.weight}
        if not y.is_floating_point():
            kw["ignore_index"] = lf.ignore_index
        return F.cross_entropy(out, y, **kw).reshape(out.shape[0], -1).sum(1)

    def gradient(self, out: Tensor, y: Tensor) -> Tensor:
        out = out.detach()
        p = torch.softmax(out, dim=1)
        if y.is_floating_point() or self.loss_fn.weight is not None:
            q = self._soft_targets(out, y) if y.is_floating_point() else \
                self._index_targets(out, y)
            return q.sum(1, keepdim=True) * p - q
        mask = self.counted(y)
        all_counted = bool(mask.all())
        g = p if all_counted else p * mask.unsqueeze(1).to(p.dtype)
        eps, C = self._eps(), out.shape[1]
        # m p − (1 − ε) e_y − ε/C without a one-hot tensor: −(1 − ε) added at each label
        idx = (y if all_counted else torch.where(mask, y, torch.zeros_like(y))).unsqueeze(1)
        src = -(1.0 - eps) * (mask.unsqueeze(1).to(p.dtype))
        g = g.scatter_add_(1, idx, src)
        if eps:
            g = g - (eps / C) * mask.unsqueeze(1).to(p.dtype)
        return g

    def hessian_sqrt(self, out: Tensor, y: Tensor, terms: Terms = "separate") -> Tensor:
        p = torch.softmax(out.detach(), dim=1)
        return categorical_sqrt(p, self._mass(out, y), joint=terms == "joint")

    def hessian_vector(self, out: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        p = torch.softmax(out.detach(), dim=1)
        m = self._mass(out, y)
        if m is None:
            return lambda w: p * w - p * (p * w).sum(dim=1, keepdim=True)
        pm = p * m.unsqueeze(1)
        return lambda w: pm * w - pm * (p * w).sum(dim=1, keepdim=True)

    def sample_labels(self, out: Tensor, mc_samples: int, generator: torch.Generator,
                      rows: tuple[int, int] | None = None) -> Tensor:
        p = torch.softmax(out.detach(), dim=1).movedim(1, -1)    # (N, d…, C)
        u = global_noise(tuple(p.shape[:-1]), mc_samples, rows, generator, p, "uniform")
        return categorical(p, u)                                  # (M, N, d…)

    def sampled_gradients(self, out: Tensor, y: Tensor, mc_samples: int,
                          generator: torch.Generator, rows: tuple[int, int] | None = None
                          ) -> Tensor:
        out = out.detach()
        C = out.shape[1]
        labels = self.sample_labels(out, mc_samples, generator, rows)
        p = torch.softmax(out, dim=1)
        s = p.unsqueeze(0) - F.one_hot(labels, C).to(out.dtype).movedim(-1, 2)
        m = self._mass(out, y)
        return s if m is None else s * m.sqrt().unsqueeze(1).unsqueeze(0)
