"""Square roots of the K-FAC factors (``KroneckerRoots``), for structured consumers.

Same capture and the same columns as :func:`curvkit.estimators.kfac.factors.kronecker_factors`
(module doc there), but instead of A = Σ ã ãᵀ/count and G = Σ g gᵀ it returns the rows,

    "expand":  A_root = [ã_{n,t} / √(N·T)]_{n,t},        G_root = [g_{n,t,k}]_{n,t,k}
    "reduce":  A_root = [ā_n / √N]_n  (ā_n = mean_t ã), G_root = [Σ_t g_{n,t,k}]_{n,k}

so that A_rootᵀ A_root = A and G_rootᵀ G_root = G exactly. Several batches are stacked with
the weights of the factors' combination, √(N_b/N) for A (a mean) and for G under "mean",
1 for G under "sum". Roots of different ranks cannot be all-reduced, so under an active
process group the function returns None and the caller uses ``kronecker``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from curvkit import distributed
from curvkit.estimators.base import Batch, KroneckerRoots, as_batches
from curvkit.estimators.kfac.layers import kfac_layers
from curvkit.estimators.kfac.observe import Observation, captured_columns
from curvkit.losses import batch_size

if TYPE_CHECKING:
    from curvkit.estimators.base import CurvatureEstimator

__all__ = ["kronecker_roots"]


def kronecker_roots(estimator: CurvatureEstimator, batch: Batch | Iterable[Batch],
                    approx: str, columns: Callable[[Tensor, Tensor, int], Tensor],
                    observed: Callable[[Any, Tensor], Observation | None] | None = None
                    ) -> dict[str, KroneckerRoots] | None:
    """{module: KroneckerRoots} of every trainable Linear/Conv2d layer, or None if distributed.

    ``columns(out, y, i)`` gives the output columns s_k (K, *out.shape) of batch i, loss
    scaling included (the estimator's own, as for its ``kronecker``). ``observed(X, y)``, for
    empirical columns only, returns the observed pass of that batch or None (see
    :func:`curvkit.estimators.kfac.factors.kronecker_factors`).
    """
    if approx not in ("expand", "reduce"):
        raise ValueError(f"approx must be 'expand' or 'reduce', got {approx!r}")
    if distributed.active():
        return None
    layers = kfac_layers(estimator.model)
    if not layers:
        return {}
    batches = as_batches(batch)
    total = sum(batch_size(b) for b in batches)
    mean = estimator.reduction == "mean"
    rows: dict[str, tuple[list[Tensor], list[Tensor]]] = {}
    # A is a mean over what each layer saw (samples, or positions folded into the batch):
    # the rows are scaled by 1/√(that count) once all batches are in
    seen: dict[str, int] = {}
    names: tuple[str, ...] | None = None
    for i, (X, y) in enumerate(batches):
        g_rows: dict[str, list[Tensor]] = {}

        def consume(layer: Any, a: Tensor, g: Tensor, g_rows=g_rows) -> None:
            if approx == "reduce":
                g = g.sum(2)
            g_rows.setdefault(layer.name, []).append(g.reshape(-1, g.shape[-1]))

        obs = None if observed is None else observed(X, y)
        kept, A_in = captured_columns(estimator, layers, X, y, obs,
                                      lambda out, y=y, i=i: columns(out, y, i), consume)
        found = tuple(layer.name for layer in kept)
        if names is None:
            names = found
        elif found != names:
            raise ValueError(f"kronecker: the layers used in the forward pass differ between "
                             f"batches ({names} vs {found})")
        n_b = batch_size((X, y))
        w_G = math.sqrt(n_b / total) if mean else 1.0
        for layer in kept:
            a = A_in[layer.name]                    # (N_b, T, D), without the bias' 1
            T = a.shape[1]
            seen[layer.name] = seen.get(layer.name, 0) + a.shape[0]
            if approx == "expand":
                r = a.flatten(0, 1)
                scale = 1.0 / math.sqrt(T)
            else:
                r = a.mean(1)
                scale = 1.0
            if layer.bias:
                # [r, 1]·scale written once (not a concatenated copy, then a scaled copy)
                root = r.new_empty(r.shape[0], r.shape[1] + 1)
                torch.mul(r, scale, out=root[:, :-1])
                root[:, -1].fill_(scale)
            else:
                root = r * scale
            g = torch.cat(g_rows[layer.name]) if len(g_rows[layer.name]) > 1 else \
                g_rows[layer.name][0]
            A_list, G_list = rows.setdefault(layer.name, ([], []))
            A_list.append(root)
            G_list.append(g * w_G if w_G != 1.0 else g)
    by_name = {layer.name: layer for layer in layers}
    for n, (A, _) in rows.items():
        s = 1.0 / math.sqrt(seen[n])
        A[:] = [r.mul_(s) for r in A]
    res = {}
    for n, (A, G) in rows.items():
        a_root = A[0] if len(A) == 1 else torch.cat(A)
        g_root = G[0] if len(G) == 1 else torch.cat(G)
        if by_name[n].transposed:  # Embedding: the stored weight is W_linᵀ
            a_root, g_root = g_root, a_root
        res[n] = KroneckerRoots(module=n, params=by_name[n].params, A_root=a_root,
                                G_root=g_root)
    return res
