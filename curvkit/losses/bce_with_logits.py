"""``bce_with_logits``: :class:`torch.nn.BCEWithLogitsLoss` (independent Bernoulli outputs)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.losses._layout import DiagonalHessian
from curvkit.losses.base import LossPart, global_noise


class BCEWithLogitsLossPart(DiagonalHessian, LossPart):
    """Binary cross-entropy on logits (multi-label), with ``weight`` and ``pos_weight``.

    Per output entry with σ = sigmoid(f), target y ∈ [0, 1], element weight w (``weight``,
    broadcast; 1 if unset) and positive weight π (``pos_weight``, broadcast along the last
    dimension; 1 if unset), and h = w (π y + 1 − y):

        ℓ = −w [π y log σ + (1 − y) log(1 − σ)],
        ∇_f ℓ = w (σ (π y + 1 − y) − π y),   ∂²ℓ/∂f² = h σ (1 − σ)  (diagonal).

    Reduction factor 1 for ``sum``, 1/(number of entries) for ``mean``. Terms as for MSE.
    Sampling: ŷ ~ Bernoulli(σ), s = √h (σ − ŷ), so E[s sᵀ] = h σ(1 − σ) = the Hessian
    (without weights, s is the gradient of the loss at the sampled label).
    """

    name = "bce_with_logits"
    loss_type = nn.BCEWithLogitsLoss

    def check(self, out: Tensor, y: Tensor, where: str) -> None:
        super().check(out, y, where)
        if tuple(y.shape) != tuple(out.shape) or not y.is_floating_point():
            raise ValueError(f"{where}: BCEWithLogitsLoss needs floating-point targets shaped "
                             f"like the output {tuple(out.shape)}, got {y.dtype} "
                             f"{tuple(y.shape)}")

    def _h(self, out: Tensor, y: Tensor) -> Tensor:
        """h = w (π y + 1 − y), shaped like the output."""
        y = y.to(out.dtype)
        pw = self.loss_fn.pos_weight
        h = torch.ones_like(out) if pw is None else pw.to(out.dtype) * y + 1.0 - y
        w = self.loss_fn.weight
        return h if w is None else h * w.to(out.dtype)

    def per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        lf = self.loss_fn
        val = F.binary_cross_entropy_with_logits(out, y.to(out.dtype), weight=lf.weight,
                                                 pos_weight=lf.pos_weight, reduction="none")
        return val.reshape(out.shape[0], -1).sum(1)

    def gradient(self, out: Tensor, y: Tensor) -> Tensor:
        out = out.detach()
        s, y = torch.sigmoid(out), y.to(out.dtype)
        pw, w = self.loss_fn.pos_weight, self.loss_fn.weight
        if pw is None:
            g = s - y
        else:
            pw = pw.to(out.dtype)
            g = s * (pw * y + 1.0 - y) - pw * y
        return g if w is None else g * w.to(out.dtype)

    def _hdiag(self, out: Tensor, y: Tensor) -> Tensor:
        s = torch.sigmoid(out.detach())
        return self._h(out.detach(), y) * s * (1.0 - s)

    def sample_labels(self, out: Tensor, mc_samples: int, generator: torch.Generator,
                      rows: tuple[int, int] | None = None) -> Tensor:
        u = global_noise(tuple(out.shape), mc_samples, rows, generator, out, "uniform")
        return (u < torch.sigmoid(out.detach()).unsqueeze(0)).to(out.dtype)

    def sampled_gradients(self, out: Tensor, y: Tensor, mc_samples: int,
                          generator: torch.Generator, rows: tuple[int, int] | None = None
                          ) -> Tensor:
        y_hat = self.sample_labels(out, mc_samples, generator, rows)
        s = torch.sigmoid(out.detach()).unsqueeze(0) - y_hat
        if self.loss_fn.pos_weight is None and self.loss_fn.weight is None:
            return s
        return s * self._h(out.detach(), y).sqrt().unsqueeze(0)
