"""Square roots of the K-FAC factors (``KroneckerRoots``), for structured consumers.

The same accumulator as :func:`curvkit.estimators.kfac.factors.kronecker_factors`
(:func:`~curvkit.estimators.kfac.factors.kronecker_statistics` with ``roots=True``: the same
capture, columns and expand/reduce treatment), but instead of A = Σ ã ãᵀ/count and
G = Σ g gᵀ it returns the rows,

    "expand":  A_root = [ã_{n,t} / √(N·T)]_{n,t},        G_root = [g_{n,t,k}]_{n,t,k}
    "reduce":  A_root = [ā_n / √N]_n  (ā_n = mean_t ã), G_root = [Σ_t g_{n,t,k}]_{n,k}

so that A_rootᵀ A_root = A and G_rootᵀ G_root = G exactly. Several batches are stacked with
the weights of the factors' combination, √(N_b/N) for A (a mean) and for G under "mean",
1 for G under "sum". Roots of different ranks cannot be all-reduced, so under an active
process group the function returns None and the caller uses ``kronecker``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from torch import Tensor

from curvkit.estimators.base import Batch, KroneckerRoots
from curvkit.estimators.kfac.factors import kronecker_statistics
from curvkit.estimators.kfac.observe import Observation

if TYPE_CHECKING:
    from curvkit.estimators.base import CurvatureEstimator

__all__ = ["kronecker_roots"]


def kronecker_roots(estimator: CurvatureEstimator, batch: Batch | Iterable[Batch],
                    approx: str, columns: Callable[[Tensor, Tensor, int], Tensor],
                    observed: Callable[[Any, Tensor], Observation | None] | None = None
                    ) -> dict[str, KroneckerRoots] | None:
    """{module: KroneckerRoots} of every covered layer, or None if distributed.

    ``columns(out, y, i)`` gives the output columns s_k (K, *out.shape) of batch i, loss
    scaling included (the estimator's own, as for its ``kronecker``). ``observed(X, y)``, for
    empirical columns only, returns the observed pass of that batch or None (see
    :func:`curvkit.estimators.kfac.factors.kronecker_factors`).
    """
    # the statistic only selects what the loss part must provide: the columns are given,
    # and an observed pass carries the empirical one
    statistic = "empirical" if observed is not None else "exact"
    return kronecker_statistics(estimator, batch, statistic, approx,  # type: ignore[arg-type]
                                columns=columns, observed=observed, roots=True)
