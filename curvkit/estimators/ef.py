"""``ef``: the empirical Fisher c·Σ_n ∇ℓ_n ∇ℓ_nᵀ (gradients with the true labels)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from curvkit.estimators._backpack import Backend, backend_option
from curvkit.estimators._lowrank import LowRankOutputEstimator
from curvkit.estimators.base import Batch, KroneckerFactors, as_batches
from curvkit.estimators.kfac import (
    Observation,
    kfac_layers,
    kronecker_factors,
    observe_pass,
    output_columns,
)
from curvkit.options import option
from curvkit.parts import KRONECKER


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

    observe: the empirical K-FAC statistics need exactly what the training pass computes —
    the layer inputs and, from the backward pass of loss = c·Σ_n ℓ_n, the layer-output
    gradients c·∇ℓ_n (the backpropagated column is √c·∇ℓ_n, so they are divided by √c). Inside
    ``observe(batch)`` they are recorded with hooks; ``kronecker`` and ``kronecker_roots`` on
    that same batch (same ``X`` and ``y`` objects), in the same draw and with unchanged
    parameters, then use the recording instead of a second forward and backward pass.

    ``backend = "backpack"``: ``diagonal`` from BackPACK's SumGradSquared divided by c (the
    per-sample EF; per-term with several loss terms per sample is refused), ``kronecker``
    refused (no empirical K-FAC in BackPACK); see :mod:`curvkit.estimators._backpack`.
    """

    name = "ef"
    observed = frozenset({KRONECKER})

    @dataclass
    class Options:
        kfac_approx: Literal["expand", "reduce"] = option(
            "expand", "K-FAC flavour for weight-sharing layers (used by `kronecker`)")
        outer_products: Literal["per_term", "per_sample"] = option(
            "per_term", "one gradient outer product per loss term (a sequence position, …; "
                        "curvlinops' convention) or per sample (its terms' gradients summed "
                        "first)")
        backend: Backend = backend_option()

    def __init__(self, model: nn.Module, loss_fn: Any, options: Any | None = None) -> None:
        super().__init__(model, loss_fn, options)
        # (X, y, key, observation) of the last observed pass, dropped by `advance`
        self._recorded: tuple[Any, Tensor, tuple, Observation] | None = None

    def _separate_terms(self) -> bool:
        return self.options.outer_products == "per_term"

    def _columns(self, out: Tensor, y: Tensor, index: int) -> Tensor:
        return output_columns(self.loss, out, y, "empirical",
                              where=f"estimator {self.name!r}")

    def kronecker(self, batch: Batch | Iterable[Batch], approx: str | None = None
                  ) -> dict[str, KroneckerFactors]:
        """Empirical K-FAC factors (see ``curvkit.estimators.kfac``); ``approx`` overrides
        the ``kfac_approx`` option for this call."""
        if self._backpack is not None:
            return self._backpack.kronecker(batch)  # refused: BackPACK has no empirical K-FAC
        return kronecker_factors(self, batch, statistic="empirical",
                                 approx=approx or self.options.kfac_approx,
                                 observed=self._observation)

    # ------------------------------------------------------------- observed passes
    def observe(self, batch: Batch | Callable[[], Batch | None]
                ) -> contextlib.AbstractContextManager[None]:
        """Record the K-FAC statistics of the caller's forward and backward pass of
        ``loss_fn(model(X), y)`` on ``batch`` (see :meth:`CurvatureEstimator.observe`).

        ``batch`` may be a callable giving ``(X, y)`` (or None: nothing recorded) on exit,
        for a caller that learns the batch only from the pass itself (the optimizer's
        ``loss.backward(); opt.step()`` style). A pass that is not exactly that (no
        backward, another loss, several forwards) is detected afterwards and ignored: the
        statistics are then computed as without it.
        """
        if callable(batch):
            return self._observing(batch)
        batches = as_batches(batch)
        if len(batches) != 1:
            raise ValueError(f"estimator {self.name!r}: observe takes one batch (X, y), got "
                             f"{len(batches)}")
        one = batches[0]
        return self._observing(lambda: one)

    @contextlib.contextmanager
    def _observing(self, which: Callable[[], Batch | None]) -> Iterator[None]:
        self._recorded = None
        try:
            layers = kfac_layers(self.model)
        except ValueError:
            # a model K-FAC cannot cover: `kronecker` reports it where it is asked for
            layers = []
        if not layers:
            yield
            return
        with observe_pass(self.model, layers) as obs:
            yield
        # only reached when the block completed
        batch = which()
        if batch is not None:
            X, y = batch
            self._recorded = (X, y, self._key(X, y), obs)

    def _key(self, X: Any, y: Tensor) -> tuple:
        """What must not change between the observed pass and its use: the draw, the
        parameters' and the batch tensors' versions (in-place updates bump them)."""
        return (int(self.state.get("draw", 0)), tuple(p._version for p in self.params),
                getattr(X, "_version", None), y._version)

    def _observation(self, X: Any, y: Tensor) -> Observation | None:
        rec = self._recorded
        if rec is None or rec[0] is not X or rec[1] is not y or rec[2] != self._key(X, y):
            return None
        return rec[3]

    def advance(self) -> None:
        self._recorded = None
        super().advance()
