"""``mse``: :class:`torch.nn.MSELoss` (a Gaussian likelihood with fixed variance ½)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from curvkit.losses._layout import diagonal_sqrt
from curvkit.losses.base import LossPart, Terms, global_noise


class MSELossPart(LossPart):
    """Squared error ℓ_n = ‖f_n − y_n‖² (summed over a sample's outputs).

    ∇_f ℓ = 2 (f − y), ∂²ℓ/∂f² = 2 I. Reduction factor 1 for ``sum``, 1/(number of output
    entries) for ``mean`` (torch averages over every entry). Terms: every dimension but the
    batch and the last indexes a term of the last dimension's entries (curvlinops'
    convention): (N, 5, 3) has 5 terms of 3 entries per sample. Sampling: ŷ ~ N(f, ½ I),
    s = 2 (f − ŷ) with covariance 2 I. Targets must have the output's shape (no broadcast).
    """

    name = "mse"
    loss_type = nn.MSELoss

    def check(self, out: Tensor, y: Tensor, where: str) -> None:
        super().check(out, y, where)
        if tuple(y.shape) != tuple(out.shape):
            raise ValueError(f"{where}: MSELoss targets have shape {tuple(y.shape)}, the "
                             f"output {tuple(out.shape)}; they must match (broadcasting "
                             f"would weight samples unequally)")

    def per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        return ((out - y.to(out.dtype)) ** 2).reshape(out.shape[0], -1).sum(1)

    def gradient(self, out: Tensor, y: Tensor) -> Tensor:
        return 2.0 * (out.detach() - y.to(out.dtype))

    def hessian_sqrt(self, out: Tensor, y: Tensor, terms: Terms = "separate") -> Tensor:
        h = torch.full_like(out.detach(), 2.0)
        return diagonal_sqrt(h, self.terms, joint=terms == "joint")

    def hessian_vector(self, out: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        return lambda w: 2.0 * w

    def sample_labels(self, out: Tensor, mc_samples: int, generator: torch.Generator,
                      rows: tuple[int, int] | None = None) -> Tensor:
        eps = global_noise(tuple(out.shape), mc_samples, rows, generator, out)
        return out.detach().unsqueeze(0) + math.sqrt(0.5) * eps

    def sampled_gradients(self, out: Tensor, y: Tensor, mc_samples: int,
                          generator: torch.Generator, rows: tuple[int, int] | None = None
                          ) -> Tensor:
        y_hat = self.sample_labels(out, mc_samples, generator, rows)
        return 2.0 * (out.detach().unsqueeze(0) - y_hat)
