"""``fisher``: the true Fisher by Monte Carlo, labels drawn from the model's prediction."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from curvkit import distributed
from curvkit.estimators._backpack import Backend, backend_option, mc_seeds
from curvkit.estimators._lowrank import LowRankOutputEstimator
from curvkit.estimators.base import Batch, KroneckerFactors
from curvkit.estimators.kfac import kronecker_factors, output_columns
from curvkit.losses import LOSS_SAMPLING
from curvkit.options import option


class FisherEstimator(LowRankOutputEstimator):
    """Monte Carlo Fisher F = c · Σ_n J_nᵀ ((1/M) Σ_m s_{n,m} s_{n,m}ᵀ) J_n  (P × P).

    s_{n,m} = ∇_f ℓ(f_n, ŷ_{n,m}) with labels ŷ drawn from the model's predictive
    distribution: ŷ ~ Categorical(softmax(f_n)) for CrossEntropyLoss (independently per
    position for (N, C, d…) logits), ŷ ~ N(f_n, ½ I) for MSELoss (ℓ = ‖f − y‖², so the
    covariance of s = 2(f − ŷ) is 2I, the loss Hessian). Hence E[F] = GGN exactly, for both
    losses and both reductions (c as for ``ef``: 1, 1/N or 1/(N·C)).

    Samples come from a private generator seeded by (``seed``, the optimizer's draw counter,
    the batch index, the rank): every product within one step — matvec, dense, diagonal,
    kronecker — uses the same samples, repeated calls are identical, and the global RNG is
    never touched. The optimizer calls ``advance()`` once per step for fresh samples.

    matvec: one forward pass with duals and one backward. diagonal: as for ``ef`` with M
    columns per sample. kronecker: K-FAC with MC-sampled G (BackPACK's KFAC semantics).

    ``backend = "backpack"``: ``diagonal`` and ``kronecker`` from BackPACK's DiagGGNMC and
    KFAC (``mc_samples``), with BackPACK's own labels drawn from a seed of this estimator's
    (seed, draw, batch) inside a forked RNG (see :mod:`curvkit.estimators._backpack`).
    """

    name = "fisher"
    loss_needs = LOSS_SAMPLING
    statistic = "mc"

    @dataclass
    class Options:
        mc_samples: int = option(1, "labels drawn per input (Monte Carlo samples)", min=1)
        seed: int = option(0, "seed of the private sample generator", min=0)
        kfac_approx: Literal["expand", "reduce"] = option(
            "expand", "K-FAC flavour for weight-sharing layers (used by `kronecker`)")
        backend: Backend = backend_option()

    def batch_generator(self, index: int, device: torch.device | str | None = None
                        ) -> torch.Generator:
        """The generator of batch ``index`` in the current draw (fresh on every call)."""
        if device is None:
            device = self.params[0].device
        g = self.generator(self.options.seed, device=device)
        if index:
            # deterministic (Python hashes ints and tuples of ints without a salt)
            g.manual_seed(hash((g.initial_seed(), index)) % (2 ** 63))
        return g

    def _backpack_diagonal(self, batch: Batch | Iterable[Batch]) -> list[Tensor]:
        assert self._backpack is not None
        return self._backpack.diagonal(batch, mc_seeds(self.batch_generator),
                                       self.options.mc_samples)

    def _rows(self, index: int, count: int) -> tuple[int, int]:
        """Where this rank's samples of batch ``index`` sit in the global batch (cached per
        draw: CG calls matvec many times per step, the offsets do not change)."""
        if not distributed.active():
            return 0, count
        key = (int(self.state.get("draw", 0)), index, count)
        cache = self.__dict__.setdefault("_rows_cache", {})
        if key not in cache:
            cache.clear()
            cache[key] = distributed.shard_rows(count)
        return cache[key]

    def _columns(self, out: Tensor, y: Tensor, index: int) -> Tensor:
        # the generator is not seeded by rank: each sample's noise is indexed by its global
        # row, so any sharding of the batch over ranks draws the same labels
        return output_columns(self.loss, out, y, "mc", self.options.mc_samples,
                              self.batch_generator(index, out.device),
                              where=f"estimator {self.name!r}",
                              rows=self._rows(index, out.shape[0]))

    def kronecker(self, batch: Batch | Iterable[Batch], approx: str | None = None
                  ) -> dict[str, KroneckerFactors]:
        """K-FAC factors with G from sampled labels (the same samples as ``matvec``);
        ``approx`` overrides the ``kfac_approx`` option for this call."""
        if self._backpack is not None:
            return self._backpack.kronecker(batch, mc_seeds(self.batch_generator),
                                            self.options.mc_samples)
        return kronecker_factors(self, batch, statistic="mc",
                                 approx=approx or self.options.kfac_approx,
                                 mc_samples=self.options.mc_samples, columns=self._columns)
