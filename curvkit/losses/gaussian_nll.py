"""``gaussian_nll``: Gaussian negative log-likelihood with a predicted variance.

:class:`torch.nn.GaussianNLLLoss` takes three arguments (mean, target, variance); curvkit
calls ``loss_fn(model(X), y)``. :class:`GaussianNLL` is that loss for a model that returns
mean and variance side by side along the last dimension, ``out = [μ | σ²]`` (…, 2D), with
targets (…, D) — all of ``GaussianNLLLoss``' settings (``full``, ``eps``, ``reduction``)
apply.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from curvkit.losses._layout import DiagonalHessian
from curvkit.losses.base import LossPart, global_noise


class GaussianNLL(nn.GaussianNLLLoss):
    """``nn.GaussianNLLLoss`` on an output [μ | σ²] (…, 2D) (split along the last dim)."""

    def forward(self, out: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        mean, var = out.chunk(2, dim=-1)
        return super().forward(mean, target, var)


class GaussianNLLLossPart(DiagonalHessian, LossPart):
    """Gaussian NLL with predicted variance: output [μ | σ²] along the last dim.

    Per feature with v = max(σ², eps) (torch clamps without a gradient) and residual
    r = y − μ: ℓ = ½ (log v + r²/v) (+ ½ log 2π with ``full``),
    ∇_μ ℓ = −r/v, ∇_v ℓ = ½ (1/v − r²/v²). The exact output Hessian is indefinite when
    r² > v/2, so the output Hessian this part gives (``hessian_sqrt``, ``hessian_vector``,
    hence the GGN) is the expected one, the Gaussian's Fisher information
    diag(1/v, 1/(2v²)) over (μ, v) — the form in which a GGN of this loss is PSD.
    Reduction factor 1 for ``sum``, 1/(number of target entries) for ``mean``. Sampling:
    ŷ ~ N(μ, v), s = ∇ℓ at ŷ, whose covariance is exactly diag(1/v, 1/(2v²)).
    Use the loss module :class:`GaussianNLL` (this file).
    """

    name = "gaussian_nll"
    loss_type = GaussianNLL

    @classmethod
    def refusal(cls, loss_fn: Any) -> str:
        return ""

    def check(self, out: Tensor, y: Tensor, where: str) -> None:
        super().check(out, y, where)
        if out.shape[-1] % 2 or tuple(y.shape) != (*out.shape[:-1], out.shape[-1] // 2):
            raise ValueError(f"{where}: GaussianNLL needs an output [μ | σ²] (…, 2D) and "
                             f"targets (…, D); got output {tuple(out.shape)}, targets "
                             f"{tuple(y.shape)}")

    def normalizer(self, out: Tensor, y: Tensor) -> float:
        return float(max(out.numel() // 2, 1))

    def _split(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mu, var = out.chunk(2, dim=-1)
        v = var.detach().clamp(min=self.loss_fn.eps)
        return mu, v, y.to(out.dtype)

    def per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        mu, var = out.chunk(2, dim=-1)
        # the clamp without a gradient, as torch's gaussian_nll_loss does
        v = var + (var.detach().clamp(min=self.loss_fn.eps) - var.detach())
        val = 0.5 * (torch.log(v) + (y.to(out.dtype) - mu) ** 2 / v)
        if self.loss_fn.full:
            val = val + 0.5 * math.log(2 * math.pi)
        return val.reshape(out.shape[0], -1).sum(1)

    @staticmethod
    def _grad(mu: Tensor, v: Tensor, y: Tensor) -> Tensor:
        r = y - mu
        return torch.cat([-r / v, 0.5 * (1.0 / v - r * r / (v * v))], dim=-1)

    def gradient(self, out: Tensor, y: Tensor) -> Tensor:
        mu, v, y = self._split(out.detach(), y)
        return self._grad(mu, v, y)

    def _hdiag(self, out: Tensor, y: Tensor) -> Tensor:
        _, v, _ = self._split(out.detach(), y)
        return torch.cat([1.0 / v, 0.5 / (v * v)], dim=-1)

    def sample_labels(self, out: Tensor, mc_samples: int, generator: torch.Generator,
                      rows: tuple[int, int] | None = None) -> Tensor:
        mu, var = out.detach().chunk(2, dim=-1)
        v = var.clamp(min=self.loss_fn.eps)
        eps = global_noise(tuple(mu.shape), mc_samples, rows, generator, out)
        return mu.unsqueeze(0) + v.sqrt().unsqueeze(0) * eps

    def sampled_gradients(self, out: Tensor, y: Tensor, mc_samples: int,
                          generator: torch.Generator, rows: tuple[int, int] | None = None
                          ) -> Tensor:
        y_hat = self.sample_labels(out, mc_samples, generator, rows)
        mu, v, _ = self._split(out.detach(), y)
        return self._grad(mu.unsqueeze(0), v.unsqueeze(0), y_hat)
