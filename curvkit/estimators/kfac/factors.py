"""The factor accumulator: output columns from the loss part, K-FAC statistics over
batches and ranks — the factors A, G or, with ``roots=True``, their square roots
(:func:`kronecker_statistics`, the one accumulator behind ``kronecker_factors`` and
``roots.kronecker_roots``) — exact layer diagonals, and factors as a dense block (see
:mod:`curvkit.estimators.kfac`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit import distributed, passes
from curvkit.estimators.base import Batch, KroneckerFactors, KroneckerRoots, as_batches
from curvkit.losses import (
    LOSS_GRADIENT,
    LOSS_HESSIAN,
    LOSS_SAMPLING,
    LossPart,
    batch_size,
    loss_part,
)
from curvkit.losses.base import Terms

if TYPE_CHECKING:
    from curvkit.estimators.base import CurvatureEstimator
from curvkit.estimators.kfac.capture import _backprop_columns, _forward_capture
from curvkit.estimators.kfac.layers import (
    _CHUNK_ELEMENTS,
    KFACLayer,
    _gram,
    _input_factor,
    _weight,
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
                   counts: dict[str, int] | None = None, roots: bool = False
                   ) -> dict[str, tuple[Tensor, Tensor]]:
    """{module: (A, G)} for one batch (A a mean, or a sum over samples if ``sum_inputs``);
    with ``roots`` {module: (A rows, G rows)} instead, A rows not yet divided by the √count
    (see ``roots``). The empirical statistics are taken from ``observation`` when it can
    provide them."""
    G: dict[str, list[Tensor]] = {}

    def consume(layer: KFACLayer, a: Tensor, g: Tensor) -> None:
        if approx == "reduce":
            g = g.sum(2)
        if roots:
            G.setdefault(layer.name, []).append(g.reshape(-1, g.shape[-1]))
        elif layer.name in G:
            G[layer.name][0].add_(_gram(g))
        else:
            G[layer.name] = [_gram(g)]

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
        if counts is not None:
            counts[layer.name] = N
        if roots:
            g_rows = G[layer.name]
            res[layer.name] = (_root_rows(a, layer.bias, approx),
                               g_rows[0] if len(g_rows) == 1 else torch.cat(g_rows))
            continue
        count = 1 if sum_inputs else N  # A: a mean over samples, or summed (divided later)
        if approx == "expand" and isinstance(layer.module, nn.Embedding) and not layer.bias:
            # one-hot rows (zero for the padding index): aᵀa is the diagonal of their sums,
            # O(N·T·V) instead of the O(N·T·V²) product
            A = torch.diag(a.sum((0, 1)).div_(count * T))
        elif approx == "expand":
            A = _input_factor(a, layer.bias, count * T)
        else:
            A = _input_factor(a.mean(1, keepdim=True), layer.bias, count)
        res[layer.name] = (A, G[layer.name][0])
    return res


def _root_rows(a: Tensor, bias: bool, approx: Approx) -> Tensor:
    """Rows R with RᵀR = N·A for the inputs a (N, T, D): [ã_{n,t}/√T] (expand) or
    [mean_t ã_{n,t}] (reduce), ã = [a, 1] if ``bias``."""
    if approx == "expand":
        r, scale = a.flatten(0, 1), 1.0 / math.sqrt(a.shape[1])
    else:
        r, scale = a.mean(1), 1.0
    if not bias:
        return r * scale
    # [r, 1]·scale written once (not a concatenated copy, then a scaled copy), in r's own
    # memory order: a convolution's patches are stored column-major (see
    # layers._conv_patches), and a row-major root would transpose them element by element
    R, D = r.shape
    root = r.new_empty(D + 1, R).T if r.stride(0) == 1 and D > 1 else r.new_empty(R, D + 1)
    torch.mul(r, scale, out=root[:, :-1])
    root[:, -1].fill_(scale)
    return root


def layer_diagonals(est: CurvatureEstimator, X: Any, columns: Callable[[Tensor], Tensor],
                    per_sample: bool = False
                    ) -> tuple[dict[str, Tensor], Tensor, Tensor] | None:
    """diag(Σ_n J_nᵀ (Σ_k s_{n,k} s_{n,k}ᵀ) J_n) for the parameters of the Linear/Conv2d layers
    that can be captured, from their inputs and output gradients (BackPACK's algorithm):
    per sample and column the weight gradient is Σ_t g_{n,t,k} ã_{n,t}ᵀ, squared and summed
    (for T = 1 without forming it: (g²)ᵀ(ã²)).

    ``columns(out)`` returns the columns (K, *out.shape). Returns ({parameter name: diagonal}
    for the covered parameters, the model output, the columns). Layers that cannot be
    captured exactly (called twice, tied, grouped, …) are left out: the caller computes their
    parameters' diagonal another way. With ``per_sample``, None (before any column is
    backpropagated) where the batch's outputs are not its per-sample outputs
    (:func:`curvkit.passes.per_sample_obstacle`, judged from this capture's own forward
    instead of a probe forward of its own): the caller then takes another path.
    """
    # a tied group's per-sample gradient sums over its layers: left to the caller
    layers = [layer for layer in kfac_layers(est.model, strict=False) if not layer.group]
    passes.replay()  # the state the capture's forward starts from
    start = torch.get_rng_state() if per_sample else None
    out, active, records, _ = _forward_capture(est.model, layers, X, strict=False)
    if start is not None and passes.per_sample_obstacle(
            est.model, X, seen=(out, not torch.equal(start, torch.get_rng_state()))):
        return None
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
            res[layer.params[0]] = w.reshape(_weight(layer).shape)
        if layer.bias:
            res[layer.params[-1]] = d[-1]
    return res, out.detach(), cols


def kronecker_factors(estimator: CurvatureEstimator, batch: Batch | Iterable[Batch],
                      statistic: Statistic, approx: Approx, mc_samples: int = 1,
                      generator: GeneratorArg = None,
                      columns: Callable[[Tensor, Tensor, int], Tensor] | None = None,
                      observed: Callable[[Any, Tensor], Observation | None] | None = None
                      ) -> dict[str, KroneckerFactors]:
    """K-FAC factors {module name: KroneckerFactors} of every covered layer
    (:func:`kronecker_statistics` without roots).

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
    res = kronecker_statistics(estimator, batch, statistic, approx, mc_samples, generator,
                               columns, observed, roots=False)
    assert res is not None  # only the roots are None (several ranks)
    return res  # type: ignore[return-value]


def kronecker_statistics(estimator: CurvatureEstimator, batch: Batch | Iterable[Batch],
                         statistic: Statistic, approx: Approx, mc_samples: int = 1,
                         generator: GeneratorArg = None,
                         columns: Callable[[Tensor, Tensor, int], Tensor] | None = None,
                         observed: Callable[[Any, Tensor], Observation | None] | None = None,
                         roots: bool = False
                         ) -> dict[str, KroneckerFactors] | dict[str, KroneckerRoots] | None:
    """The one K-FAC accumulator: per covered layer the factors (``roots=False``,
    :class:`KroneckerFactors`, arguments as for :func:`kronecker_factors`) or their square
    roots (``roots=True``, :class:`KroneckerRoots` with A_rootᵀA_root = A and
    G_rootᵀG_root = G exactly; None under an active process group, where roots of different
    ranks cannot be all-reduced). Both come from the same capture, columns and
    expand/reduce treatment of every batch (:func:`_batch_factors`).

    Several batches: the factors are combined by :meth:`CurvatureEstimator.accumulate`
    (over ranks too); the roots are stacked with the weights of that combination, √(N_b/N)
    for G under "mean" and 1 under "sum", and A's rows divided by √(what the layer saw)
    once all batches are in.
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
    if roots and distributed.active():
        return None
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
                             gen, sum_inputs=sum_red or roots, columns=cols,
                             observation=None if observed is None else observed(X, y),
                             counts=counts, roots=roots)
        names = tuple(fac)
        if state["names"] is None:
            state["names"] = names
        elif names != state["names"]:
            raise ValueError(f"kronecker: the layers used in the forward pass differ between "
                             f"batches ({state['names']} vs {names})")
        out: dict[str, Any] = {"A": {n: a for n, (a, _) in fac.items()},
                               "G": {n: g for n, (_, g) in fac.items()}}
        if sum_red or roots:
            # A is a mean over what each layer saw (its samples, or the positions a model
            # folds into the batch), not over the targets: summed here, divided below
            out["count"] = {n: torch.tensor(float(c), dtype=fac[n][0].dtype,
                                            device=fac[n][0].device)
                            for n, c in counts.items()}
        return out

    by_name = {layer.name: layer for layer in layers}
    if roots:
        acc = _stack_roots(estimator, batches, one)
    else:
        acc = estimator.accumulate(batches, one, reduction=estimator.reduction,
                                   first_order=True)
    if sum_red or roots:
        # in place: every A here is this call's own (fresh rows or a fresh sum)
        acc["A"] = {n: a.div_(acc["count"][n].sqrt() if roots else acc["count"][n])
                    for n, a in acc["A"].items()}
    res: dict[str, Any] = {}
    for n in acc["A"]:
        layer = by_name[n]
        if layer.group:
            if layer.group not in res:  # at its first layer's place in module order
                members = [by_name[m] for m in acc["A"] if by_name[m].group == layer.group]
                res[layer.group] = _combine_group(
                    layer.group, members, {m.name: (acc["A"][m.name], acc["G"][m.name])
                                           for m in members}, roots)
            continue
        A, G = acc["A"][n], acc["G"][n]
        if layer.transposed:  # rows of the stored weight are the inputs (Embedding)
            A, G = G, A
        res[n] = KroneckerRoots(module=n, params=layer.params, A_root=A, G_root=G) \
            if roots else KroneckerFactors(module=n, params=layer.params, A=A, G=G)
    return res


def _combine_group(name: str, members: list[KFACLayer], stats: dict[str, tuple[Tensor, Tensor]],
                   roots: bool) -> KroneckerFactors | KroneckerRoots:
    """One Kronecker product for a tied Embedding/Linear-head group, bounding the sum of its
    layers' Kronecker products from above.

    In the stored weight's layout (V, d), W̃ = [W | b] with the head's bias: the head
    contributes X_h ⊗ Y_h = G_h ⊗ A_h (V×V, (d+1)²), the Embedding X_e ⊗ Y_e = A_e ⊗ G_e
    (its one-hot statistic, V×V, and its output-gradient statistic, d×d, padded with a zero
    bias row/column). The sum Σ_i X_i ⊗ Y_i is not a Kronecker product; for any c_i > 0

        Σ_i X_i ⊗ Y_i  ⪯  (Σ_i c_i X_i) ⊗ (Σ_i Y_i / c_i)

    (the cross terms (c_i/c_j) X_i ⊗ Y_j are PSD), the bound Martens & Grosse (2015, §6.3)
    use for the damping term of factored Tikhonov damping. c_i = √(tr Y_i / tr X_i) makes
    the trace of the cross terms smallest (for two terms exactly; the common scale of the
    c_i is free and is set so that tr Y = tr A_h, the head's A). Being an upper bound, the
    product never underestimates the curvature of either use (the Frobenius-nearest
    Kronecker product can, and then oversteps). A term with a zero factor is zero and is
    left out. With roots: X_root, Y_root are the members' roots stacked with weights
    √c_i and 1/√c_i.
    """
    head = next((m for m in members if not m.transposed), None)
    cols = (stats[head.name][0].shape[1] if roots else stats[head.name][0].shape[0]) \
        if head is not None else None
    trace = (lambda t: float(t.square().sum())) if roots else (lambda t: float(t.trace()))
    terms = []
    for m in members:
        A, G = stats[m.name]
        x, y = (A, G) if m.transposed else (G, A)
        if cols is not None and y.shape[-1] < cols:  # the Embedding has no bias column
            y = F.pad(y, (0, cols - y.shape[-1]) if roots else
                      (0, cols - y.shape[-1], 0, cols - y.shape[-1]))
        terms.append((m, x, y, trace(x), trace(y)))
    live = [t for t in terms if t[3] > 0 and t[4] > 0] or terms[:1]
    c = [math.sqrt(ty / tx) if tx > 0 and ty > 0 else 1.0 for _, _, _, tx, ty in live]
    ty_sum = sum(t[4] / ci for t, ci in zip(live, c))
    t_head = next((t[4] for t in terms if t[0] is head), 0.0)
    s = t_head / ty_sum if ty_sum > 0 and t_head > 0 else 1.0
    c = [ci / s for ci in c]                     # X = Σ c_i X_i, Y = Σ Y_i / c_i
    params = head.params if head is not None else members[0].params
    if roots:
        G_root = torch.cat([x * math.sqrt(ci) for (_, x, _, _, _), ci in zip(live, c)])
        A_root = torch.cat([y / math.sqrt(ci) for (_, _, y, _, _), ci in zip(live, c)])
        return KroneckerRoots(module=name, params=params, A_root=A_root, G_root=G_root)
    G = sum(ci * x for (_, x, _, _, _), ci in zip(live, c))
    A = sum(y / ci for (_, _, y, _, _), ci in zip(live, c))
    return KroneckerFactors(module=name, params=params, A=A, G=G)
def _stack_roots(estimator: CurvatureEstimator, batches: list[Batch],
                 one: Callable[[Any, Tensor], dict[str, Any]]) -> dict[str, Any]:
    """The roots of several batches, stacked (one process; see :func:`kronecker_statistics`):
    A rows as they are, G rows times √(N_b/N) under "mean", counts summed."""
    total = sum(batch_size(b) for b in batches)
    mean = estimator.reduction == "mean"
    parts: list[tuple[float, dict[str, Any]]] = []
    with passes.evaluation(estimator.model, higher_order=False):
        for X, y in batches:
            w = math.sqrt(batch_size((X, y)) / total) if mean else 1.0
            parts.append((w, one(X, y)))
    if len(parts) == 1:
        w, only = parts[0]
        return {"A": only["A"], "G": {n: g * w if w != 1.0 else g
                                      for n, g in only["G"].items()},
                "count": only["count"]}
    names = list(parts[0][1]["A"])
    return {"A": {n: torch.cat([p["A"][n] for _, p in parts]) for n in names},
            "G": {n: torch.cat([p["G"][n] * w if w != 1.0 else p["G"][n] for w, p in parts])
                  for n in names},
            "count": {n: sum(p["count"][n] for _, p in parts) for n in names}}


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
