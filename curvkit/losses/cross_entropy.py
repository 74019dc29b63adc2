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

    Per term (a position d… of a sample) with p = softmax(f) and the effective target q —
    q = (1 − ε) e_y + ε/C for a class index y and label smoothing ε, q = 0 for an ignored
    target, q = (1 − ε) y + ε/C for probability targets — and m = Σ_k q_k (1, or 0 where
    ignored):

        ℓ = −Σ_k q_k log p_k,   ∇_f ℓ = m p − q,   ∂²ℓ/∂f² = m (diag p − p pᵀ).

    Reduction factor: 1 for ``sum``; for ``mean`` 1/(number of terms that count): the
    targets ≠ ``ignore_index`` (class indices), N·∏d (probabilities). Sampling: ŷ ~
    Categorical(p) per term, s = √m (p − e_ŷ), so E[s sᵀ] = m (diag p − p pᵀ).
    Class weights (``weight=``) are refused: the sampled Fisher of a weighted likelihood is
    not its Hessian.
    """

    name = "cross_entropy"
    loss_type = nn.CrossEntropyLoss

    @classmethod
    def refusal(cls, loss_fn: Any) -> str:
        if loss_fn.weight is not None:
            return ("class weights (weight=...) are not supported: the weighted loss is not "
                    "a likelihood whose Fisher is its Hessian; drop the weights or weight the "
                    "samples in the data")
        return ""

    def check(self, out: Tensor, y: Tensor, where: str) -> None:
        self.check_class_targets(out, y, where, probs_ok=True)

    # ------------------------------------------------------------------ targets
    def _eps(self) -> float:
        return float(self.loss_fn.label_smoothing)

    def _soft_targets(self, out: Tensor, y: Tensor) -> Tensor:
        """q (N, C, d…) for probability targets."""
        q = y.to(out.dtype)
        eps = self._eps()
        return q * (1.0 - eps) + eps / out.shape[1] if eps else q

    def _mass(self, out: Tensor, y: Tensor) -> Tensor | None:
        """m (N, d…) = Σ_k q_k, or None when every m is 1."""
        if y.is_floating_point():
            return self._soft_targets(out, y).sum(1)
        mask = self.counted(y)
        return None if bool(mask.all()) else mask.to(out.dtype)

    def term_weights(self, out: Tensor, y: Tensor) -> Tensor | None:
        m = self._mass(out, y)
        return None if m is None else m.reshape(out.shape[0], -1)

    def normalizer(self, out: Tensor, y: Tensor) -> float:
        if y.is_floating_point():
            return float(out.numel() // out.shape[1])
        return float(self.counted(y).sum())

    # ------------------------------------------------------------------ math
    def per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        lf = self.loss_fn
        kw: dict[str, Any] = {"label_smoothing": lf.label_smoothing, "reduction": "none"}
        if not y.is_floating_point():
            kw["ignore_index"] = lf.ignore_index
        return F.cross_entropy(out, y, **kw).reshape(out.shape[0], -1).sum(1)

    def gradient(self, out: Tensor, y: Tensor) -> Tensor:
        out = out.detach()
        p = torch.softmax(out, dim=1)
        if y.is_floating_point():
            q = self._soft_targets(out, y)
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
