"""``ef``: the empirical Fisher c·Σ_n ∇ℓ_n ∇ℓ_nᵀ (gradients with the true labels)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from curvkit.estimators._kfac import kronecker_factors, output_columns
from curvkit.estimators._lowrank import LowRankOutputEstimator
from curvkit.estimators.base import Batch, KroneckerFactors
from curvkit.options import option


class EmpiricalFisherEstimator(LowRankOutputEstimator):
    """Empirical Fisher E = c · Σ_n ∇_θ ℓ_n ∇_θ ℓ_nᵀ  (P × P).

    ℓ_n is sample n's loss summed over its outputs, with its true label y_n, and c the
    reduction factor with loss = c·Σ_n ℓ_n: 1 for "sum", 1/N for cross-entropy "mean",
    1/(N·C) for MSE "mean" over C outputs (curvlinops' ``EFLinearOperator`` convention).
    Since ∇_θ ℓ_n = J_nᵀ ∇_f ℓ_n, E = Σ_n J_nᵀ (c ∇_f ℓ_n ∇_f ℓ_nᵀ) J_n: a GGN whose output
    matrix is the rank-one outer product of the output gradient.

    matvec: one forward pass (with forward-mode duals, for J v) and one backward pass, never
    forming per-sample gradients. dense: from the Jacobian. diagonal: c Σ_n (∇ℓ_n)², for
    Linear/Conv2d layers from their inputs and output gradients, for other parameters from
    per-sample gradients (``torch.func.vmap``). kronecker: empirical K-FAC (G from the output
    gradients of the true labels).
    """

    name = "ef"

    @dataclass
    class Options:
        kfac_approx: Literal["expand", "reduce"] = option(
            "expand", "K-FAC flavour for weight-sharing layers (used by `kronecker`)")

    def _columns(self, out: Tensor, y: Tensor, index: int) -> Tensor:
        return output_columns(self.loss_fn, out, y, "empirical",
                              where=f"estimator {self.name!r}")

    def kronecker(self, batch: Batch | Iterable[Batch]) -> dict[str, KroneckerFactors]:
        """Empirical K-FAC factors (see ``curvkit.estimators._kfac``)."""
        return kronecker_factors(self, batch, statistic="empirical",
                                 approx=self.options.kfac_approx)
