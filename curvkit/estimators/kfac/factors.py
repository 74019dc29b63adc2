"""The factor accumulator: output columns from the loss part, K-FAC factors over batches
and ranks, exact layer diagonals, and factors as a dense block (see
:mod:`curvkit.estimators.kfac`; the roots of the same statistics are in ``roots``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from curvkit.estimators.base import Batch, KroneckerFactors, as_batches
from curvkit.losses import LOSS_GRADIENT, LOSS_HESSIAN, LOSS_SAMPLING, LossPart, loss_part
from curvkit.losses.base import Terms

if TYPE_CHECKING:
    from curvkit.estimators.base import CurvatureEstimator
from curvkit.estimators.kfac.capture import _backprop_columns, _forward_capture
from curvkit.estimators.kfac.layers import (
    _CHUNK_ELEMENTS,
    KFACLayer,
    _augmented_outer,
    kfac_layers,
)
from curvkit.estimators.kfac.observe import Observation, captured_columns

Statistic = Literal["exact", "mc", "empirical"]
Approx = Literal["expand", "reduce"]
GeneratorArg = torch.Generator | Callable[[int], torch.Generator] | None
# what each statistic needs from the loss part
STATISTIC_NEEDS = {"exact": LOSS_HESSIAN, "mc": LOSS_SAMPLING, "empirical": LOSS_GRADIENT}


def output_columns(loss: LossPart, out: Tensor, y: Tensor, statistic: Statistic,
                   mc_samples: int = 1, generator: torch.Generator | None = None,
                   where: str = "loss", rows: tuple[int, int] | None = None,
                   terms: Terms = "joint") -> Tensor:
    """Columns s_k (K, *out.shape) with Σ_k s_k[n] s_k[n]ᵀ = c·B_n (see the module doc),
    from the loss part (:mod:`curvkit.losses`; the loss math lives there): its output-Hessian
    factorization (``"exact"``, ``terms`` as for :meth:`LossPart.hessian_sqrt`), its sampled
    gradients (``"mc"``) or its gradient at the true labels (``"empirical"``), times √c."""
    loss.check(out, y, where)
    c = loss.reduction_factor(out, y)
    if statistic == "exact":
        return loss.hessian_sqrt(out, y, terms) * math.sqrt(c)
    if statistic == "mc":
        if generator is None:
            raise ValueError(f"{where}: statistic 'mc' needs a generator (curvkit never draws "
                             f"from the global RNG)")
        S = loss.sampled_gradients(out, y, mc_samples, generator, rows)
        return S * math.sqrt(c / mc_samples)
    if statistic == "empirical":
        return loss.gradient(out, y).unsqueeze(0) * math.sqrt(c)
    raise ValueError(f"{where}: statistic must be 'exact', 'mc' or 'empirical', got "
                     f"{statistic!r}")


def _batch_factors(est: CurvatureEstimator, layers: list[KFACLayer], X: Any, y: Tensor,
                   statistic: Statistic, approx: Approx, mc_samples: int,
                   generator: torch.Generator | None, sum_inputs: bool,
                   columns: Callable[[Tensor, Tensor], Tensor] | None = None,
                   observation: Observation | None = None,
                   counts: dict[str, int] | None = None
                   ) -> dict[str, tuple[Tensor, Tensor]]:
    """{module: (A, G)} for one batch (A a mean, or a sum over samples if ``sum_inputs``);
    the empirical statistics are taken from ``observation`` when it can provide them."""
    G: dict[str, Tensor] = {}

    def consume(layer: KFACLayer, a: Tensor, g: Tensor) -> None:
        if approx == "reduce":
            g = g.sum(2)
        g = g.reshape(-1, g.shape[-1])
        G[layer.name] = g.T @ g + G[layer.name] if layer.name in G else g.T @ g

    def cols(out: Tensor) -> Tensor:
        if columns is not None:
            return columns(out, y)
        return output_columns(est.loss, out, y, statistic, mc_samples, generator,
                              f"estimator {est.name!r}")

    kept, A_in = captured_columns(est, layers, X, y, observation, cols, consume)
    res: dict[str, tuple[Tensor, Tensor]] = {}
    for layer in kept:
        a = A_in[layer.name]
        N, T = a.shape[0], a.shape[1]
        if approx == "expand":
            A = _augmented_outer(a.flatten(0, 1), layer.bias, T)
        else:
            A = _augmented_outer(a.mean(1), layer.bias, 1.0)
        res[layer.name] = (A if sum_inputs else A / N, G[layer.name])
        if counts is not None:
            counts[layer.name] = N
    return res


def layer_diagonals(est: CurvatureEstimator, X: Any, columns: Callable[[Tensor], Tensor]
                    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """diag(Σ_n J_nᵀ (Σ_k s_{n,k} s_{n,k}ᵀ) J_n) for the parameters of the Linear/Conv2d layers
    that can be captured, from their inputs and output gradients (BackPACK's algorithm):
    per sample and column the weight gradient is Σ_t g_{n,t,k} ã_{n,t}ᵀ, squared and summed
    (for T = 1 without forming it: (g²)ᵀ(ã²)).

    ``columns(out)`` returns the columns (K, *out.shape). Returns ({parameter name: diagonal}
    for the covered parameters, the model output, the columns). Layers that cannot be
    captured exactly (called twice, tied, grouped, …) are left out: the caller computes their
    parameters' diagonal another way.
    """
    layers = kfac_layers(est.model, strict=False)
    out, active, records, _ = _forward_capture(est.model, layers, X, strict=False)
    cols = columns(out.detach())
    if not active:
        return {}, out.detach(), cols
    D: dict[str, list[Tensor]] = {}

    def consume(layer: KFACLayer, a: Tensor, g: Tensor) -> None:
        if a.shape[1] == 1:
            g2 = g[:, :, 0] ** 2
            d = [torch.einsum("knd,ne->de", g2, a[:, 0] ** 2)] if layer.weight else []
            if layer.bias:
                d.append(g2.sum((0, 1)))
        else:
            # per-sample gradients Σ_t g ãᵀ, a few columns at a time (bounded memory)
            step = max(1, _CHUNK_ELEMENTS // max(a.shape[0] * g.shape[-1] * a.shape[-1], 1))
            d = [sum((torch.einsum("kntd,nte->knde", g[i:i + step], a) ** 2).sum((0, 1))
                     for i in range(0, g.shape[0], step))] if layer.weight else []
            if layer.bias:
                d.append((g.sum(2) ** 2).sum((0, 1)))
        old = D.get(layer.name)
        D[layer.name] = d if old is None else [x + y for x, y in zip(old, d)]

    kept, _, _ = _backprop_columns(out, cols, active, records, strict=False, consume=consume)
    res: dict[str, Tensor] = {}
    for layer in kept:
        d = D[layer.name]
        if layer.weight:
            w = d[0].T if layer.transposed else d[0]
            res[layer.params[0]] = w.reshape(layer.module.weight.shape)
        if layer.bias:
            res[layer.params[-1]] = d[-1]
    return res, out.detach(), cols


def kronecker_factors(estimator: CurvatureEstimator, batch: Batch | Iterable[Batch],
                      statistic: Statistic, approx: Approx, mc_samples: int = 1,
                      generator: GeneratorArg = None,
                      columns: Callable[[Tensor, Tensor, int], Tensor] | None = None,
                      observed: Callable[[Any, Tensor], Observation | None] | None = None
                      ) -> dict[str, KroneckerFactors]:
    """K-FAC factors {module name: KroneckerFactors} of every trainable Linear/Conv2d layer.

    ``statistic``: ``"exact"`` (KFLR, G from the loss-Hessian square root), ``"mc"`` (KFAC,
    ``mc_samples`` labels drawn per input from ``generator``), ``"empirical"`` (true labels).
    ``approx``: ``"expand"`` or ``"reduce"`` (weight sharing, see the module doc).
    ``generator``: a ``torch.Generator`` (drawn from batch after batch), or a callable
    ``i ↦ Generator`` giving the generator of batch i. ``columns(out, y, i)``, if given,
    supplies batch i's output columns instead (an estimator's own draw, so its factors use
    exactly the samples of its products). ``observed(X, y)``, if given (``"empirical"``
    only), returns the :class:`Observation` of the optimizer's own pass on that batch, or
    None: an observed batch's statistics come from it instead of another pass.

    Over several batches (and ranks) A is the count-weighted mean of the batches' A and G
    combines like the loss: Σ_b (N_b/N) G_b for "mean", Σ_b G_b for "sum".
    Modules that are not called in the forward pass are left out (their parameters fall
    back to another structure); unsupported configurations raise an error naming the module.
    """
    if statistic not in ("exact", "mc", "empirical"):
        raise ValueError(f"statistic must be 'exact', 'mc' or 'empirical', got {statistic!r}")
    if approx not in ("expand", "reduce"):
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    if int(mc_samples) < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    if observed is not None and statistic != "empirical":
        raise ValueError(f"an observed pass gives the 'empirical' statistic only, not "
                         f"{statistic!r}")
    if statistic == "mc" and generator is None and columns is None:
        raise ValueError("statistic 'mc' needs a generator (curvkit never draws from the "
                         "global RNG)")
    if columns is None or observed is not None:
        loss_part(estimator.loss or estimator.loss_fn, f"estimator {estimator.name!r}",
                  needs=[STATISTIC_NEEDS[statistic]])
    layers = kfac_layers(estimator.model)
    if not layers:
        return {}
    batches = as_batches(batch)
    sum_red = estimator.reduction == "sum"
    state = {"i": 0, "names": None}

    def one(X: Any, y: Tensor) -> dict[str, Any]:
        i = state["i"]
        state["i"] += 1
        gen = generator(i) if callable(generator) and not isinstance(
            generator, torch.Generator) else generator
        cols = None if columns is None else (lambda out, y_: columns(out, y_, i))
        counts: dict[str, int] = {}
        fac = _batch_factors(estimator, layers, X, y, statistic, approx, int(mc_samples),
                             gen, sum_inputs=sum_red, columns=cols,
                             observation=None if observed is None else observed(X, y),
                             counts=counts)
        names = tuple(fac)
        if state["names"] is None:
            state["names"] = names
        elif names != state["names"]:
            raise ValueError(f"kronecker: the layers used in the forward pass differ between "
                             f"batches ({state['names']} vs {names})")
        out: dict[str, Any] = {"A": {n: a for n, (a, _) in fac.items()},
                               "G": {n: g for n, (_, g) in fac.items()}}
        if sum_red:
            # A is a mean over what each layer saw (its samples, or the positions a model
            # folds into the batch), not over the targets: summed here, divided below
            out["count"] = {n: torch.tensor(float(c), dtype=fac[n][0].dtype,
                                            device=fac[n][0].device)
                            for n, c in counts.items()}
        return out

    acc = estimator.accumulate(batches, one, reduction=estimator.reduction, first_order=True)
    if sum_red:
        acc["A"] = {n: a / acc["count"][n] for n, a in acc["A"].items()}
    by_name = {layer.name: layer for layer in layers}
    res = {}
    for n in acc["A"]:
        A, G = acc["A"][n], acc["G"][n]
        if by_name[n].transposed:  # rows of the stored weight are the inputs (Embedding)
            A, G = G, A
        res[n] = KroneckerFactors(module=n, params=by_name[n].params, A=A, G=G)
    return res


def factors_to_dense(factors: KroneckerFactors, shapes: dict[str, torch.Size]) -> Tensor:
    """G ⊗ A rearranged to the flattening of the parameters themselves (weight flattened,
    then bias): the block that a dense curvature matrix has for ``factors.params``.
    ``shapes`` maps parameter names to shapes."""
    K = torch.kron(factors.G, factors.A)  # over vec_r([W | b])
    d_out = factors.G.shape[0]
    d_aug = factors.A.shape[0]
    w_name = factors.params[0]
    d_in = int(torch.Size(shapes[w_name]).numel()) // d_out
    idx = torch.arange(d_out * d_aug, device=K.device).reshape(d_out, d_aug)
    order = [idx[:, :d_in].reshape(-1)]
    if len(factors.params) > 1:
        order.append(idx[:, d_in])
    perm = torch.cat(order)
    return K[perm][:, perm]
