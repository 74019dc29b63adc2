"""``nll``: :class:`torch.nn.NLLLoss` on log-probabilities (after ``log_softmax``)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.losses._layout import ClassDimTerms
from curvkit.losses.base import LOSS_GRADIENT, LOSS_SAMPLING, LossPart, categorical, global_noise


class NLLLossPart(ClassDimTerms, LossPart):
    """Negative log-likelihood on log-probabilities o (N, C, d…): ℓ = −o_y per term.

    ℓ is linear in the output, so its output Hessian — and with it the GGN and every
    Kronecker factor built from the loss Hessian — is zero: this part provides the gradient
    (−e_y, for ``ef``) and sampling (ŷ ~ Categorical(exp o), s = −e_ŷ, for ``fisher``: with
    J through the log-softmax, E[J ᵀ s sᵀ J] is the Fisher of the softmax), but no Hessian.
    For the GGN put ``CrossEntropyLoss`` on the logits (drop the final ``log_softmax``).
    Reduction factor as for cross-entropy (ignored targets do not count).
    """

    name = "nll"
    loss_type = nn.NLLLoss
    provides = frozenset({LOSS_GRADIENT, LOSS_SAMPLING})
    missing_reason = ("NLLLoss is linear in the model output (log-probabilities), so its "
                      "output Hessian and hence its GGN are zero: a preconditioner built on "
                      "it would precondition with nothing. Use nn.CrossEntropyLoss on the "
                      "logits (drop the final log_softmax), or the 'fisher' or 'ef' estimator")

    @classmethod
    def refusal(cls, loss_fn: Any) -> str:
        if loss_fn.weight is not None:
            return "class weights (weight=...) are not supported"
        return ""

    def check(self, out: Tensor, y: Tensor, where: str) -> None:
        self.check_class_targets(out, y, where, probs_ok=False)

    def term_weights(self, out: Tensor, y: Tensor) -> Tensor | None:
        mask = self.counted(y)
        return None if bool(mask.all()) else mask.reshape(out.shape[0], -1).to(out.dtype)

    def normalizer(self, out: Tensor, y: Tensor) -> float:
        return float(self.counted(y).sum())

    def per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        return F.nll_loss(out, y, ignore_index=self.loss_fn.ignore_index,
                          reduction="none").reshape(out.shape[0], -1).sum(1)

    def gradient(self, out: Tensor, y: Tensor) -> Tensor:
        return -self.onehot_counted(y, out.shape[1], out.dtype)

    def sample_labels(self, out: Tensor, mc_samples: int, generator: torch.Generator,
                      rows: tuple[int, int] | None = None) -> Tensor:
        # softmax(o) = exp(o) for log-probabilities; normalising guards round-off
        p = torch.softmax(out.detach(), dim=1).movedim(1, -1)
        u = global_noise(tuple(p.shape[:-1]), mc_samples, rows, generator, p, "uniform")
        return categorical(p, u)

    def sampled_gradients(self, out: Tensor, y: Tensor, mc_samples: int,
                          generator: torch.Generator, rows: tuple[int, int] | None = None
                          ) -> Tensor:
        labels = self.sample_labels(out, mc_samples, generator, rows)
        s = -F.one_hot(labels, out.shape[1]).to(out.dtype).movedim(-1, 2)
        mask = self.counted(y)
        return s if bool(mask.all()) else s * mask.unsqueeze(1).unsqueeze(0).to(out.dtype)
