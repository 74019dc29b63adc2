"""Capture of an observed pass (the optimizer's own forward and backward), and
:func:`captured_columns`: the statistics of one batch from an observed pass when it can
provide them, else from a pass of our own (:mod:`curvkit.estimators.kfac.capture`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from curvkit.estimators.base import CurvatureEstimator
from curvkit.estimators.kfac.capture import (
    _backprop_columns,
    _check_output,
    _classify,
    _forward_capture,
    _needs_check,
    _Record,
    _uses_grads,
    _uses_inputs,
    layer_hooks,
)
from curvkit.estimators.kfac.layers import (
    KFACLayer,
    _layer_params,
)


@dataclass
class Observation:
    """What :func:`observe_pass` recorded during someone else's forward and backward pass
    (the optimizer's) of loss = c·Σ_n ℓ_n: per layer its inputs and ∂loss/∂output, the
    gradients of its parameters, and the model output with ∂loss/∂output."""

    records: dict[str, _Record]
    param_grads: dict[str, list[Tensor | None]]
    calls: int = 0
    out: Any = None
    out_grad: Tensor | None = None
    # handles of the tensor hooks installed during the pass (removed on exit)
    handles: list[Any] = field(default_factory=list, repr=False)


@contextlib.contextmanager
def observe_pass(model: nn.Module, layers: list[KFACLayer]) -> Iterator[Observation]:
    """Capture hooks on ``layers`` (and the model output) for the forward and backward pass
    run inside the block; every hook is removed on exit, also when the block raises.

    The layers' outputs are not copied: a tensor hook registered before an in-place
    operation still receives the gradient w.r.t. the value before it (PyTorch's contract).
    """
    obs = Observation(records={layer.name: _Record() for layer in layers},
                      param_grads={layer.name: [None] * len(_layer_params(layer))
                                   for layer in layers})

    def keep(target: Any, attr: str) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            setattr(target, attr, grad.detach())
        return hook

    def keep_at(target: list, i: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            target[i] = grad.detach()
        return hook

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            rec = obs.records[name]
            rec.calls += 1
            if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
                rec.problem = "called with more than one input"
                return
            if not isinstance(output, Tensor):
                rec.problem = f"returning {type(output).__name__}, not a tensor"
                return
            rec.inputs.append(inputs[0].detach())
            rec.grads.append(None)
            rec.output_like.append((output.shape, output.dtype, output.device))
            if isinstance(output, Tensor) and output.requires_grad:
                rec.differentiable = True
                obs.handles.append(output.register_hook(keep_at(rec.grads,
                                                                len(rec.grads) - 1)))

        return hook

    def make_param_hook(name: str, j: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            obs.param_grads[name][j] = grad.detach()
        return hook

    def root_hook(module: nn.Module, inputs: tuple, output: Any) -> None:
        obs.calls += 1
        obs.out = output.detach() if isinstance(output, Tensor) else output
        if isinstance(output, Tensor) and output.requires_grad:
            obs.handles.append(output.register_hook(keep(obs, "out_grad")))

    def attention_recorder(roles: dict[str, str]) -> Callable:
        def record(role: str, x: Tensor, out: Tensor) -> None:
            if role not in roles:
                return
            rec = obs.records[roles[role]]
            rec.calls += 1
            rec.inputs.append(x.detach())
            rec.grads.append(None)
            rec.output_like.append((out.shape, out.dtype, out.device))
            if out.requires_grad:
                rec.differentiable = True
                obs.handles.append(out.register_hook(keep_at(rec.grads, len(rec.grads) - 1)))

        return record

    handles = obs.handles
    try:
        for layer in layers:
            for j, p in enumerate(_layer_params(layer)):
                handles.append(p.register_hook(make_param_hook(layer.name, j)))
        layer_hooks(layers, make_hook, attention_recorder, handles)
        handles.append(model.register_forward_hook(root_hook))
        yield obs
    finally:
        for h in handles:
            h.remove()
        handles.clear()


_PROBES = 2  # random directions of the sketched weight-gradient check


def _mismatches(*pairs: tuple[Tensor, Tensor]) -> bool:
    """True if any pair (mine, ref) differs beyond round-off, relative to their norms (a NaN
    counts as a difference); all norms come back in one host transfer."""
    if not pairs:
        return False
    norms = torch.stack(torch._foreach_norm(
        [t for mine, ref in pairs for t in (mine - ref, mine, ref)])).tolist()
    for i, (_, ref) in enumerate(pairs):
        err, a, b = norms[3 * i:3 * i + 3]
        if not err <= min(0.05, 1e4 * torch.finfo(ref.dtype).eps) * (a + b):
            return True
    return False


# Bounded (least recently used): one entry per (layer shape, dtype, device) seen, so a
# long-lived process that meets many shapes or devices does not keep probes forever.
_SKETCH_CACHE_SIZE = 64


@functools.lru_cache(maxsize=_SKETCH_CACHE_SIZE)
def _sketch(D: int, d_out: int, dtype: torch.dtype, device: torch.device
            ) -> tuple[Tensor, Tensor]:
    """Gaussian probes P̃ = [P | p_b] (2, D + 1) of a layer shape, as P (2, D) and p_b (2, 1),
    drawn once from a fixed private seed (a generator per call cost more than the check's
    products on small layers)."""
    gen = torch.Generator(device=device).manual_seed(1_000_003 * D + d_out)
    P = torch.randn(_PROBES, D + 1, generator=gen, dtype=dtype, device=device)
    return P[:, :D].contiguous(), P[:, D:].contiguous()


def _sketched_grad_pairs(layer: KFACLayer, a: Tensor, g: Tensor, true_grads: list[Tensor]
                         ) -> list[tuple[Tensor, Tensor]]:
    """:func:`_weight_grad_mismatch` on random projections: P̃ (Σ_{n,t} ã gᵀ) against
    P̃ ∇W̃ᵀ for W̃ = [W | b] and P̃ = [P | p_b] (2, d_in + 1) Gaussian from a fixed private
    seed (the global RNG is not touched), at O(N·T·(d_in + d_out)) instead of the
    O(N·T·d_in·d_out) of the gradient itself. For a mismatch E, E‖P̃ Eᵀ‖² = 2‖E‖²: a
    mismatch beyond round-off is missed with negligible probability, and a false alarm only
    sends the batch to the ordinary (exactly checked) path. Returns the (implied, observed)
    pair for :func:`_mismatches`, weight and bias in one (P̃ ã = P a + p_b)."""
    d_out, D = g.shape[-1], a.shape[-1]
    gf = g.reshape(-1, d_out)
    if not layer.weight:  # the bias alone: its gradient is Σ g, compared directly
        return [(gf.sum(0), true_grads[0])]
    P, p_b = _sketch(D, d_out, a.dtype, a.device)
    aT = a.reshape(-1, D).T
    WT = true_grads[0] if layer.transposed else true_grads[0].reshape(d_out, D).T
    # (2, D) times the (D, ·) transposes: the fast layout for a thin product on CPU
    if not layer.bias:
        return [((P @ aT) @ gf, P @ WT)]
    return [(torch.addmm(p_b, P, aT) @ gf, torch.addr(P @ WT, p_b[:, 0], true_grads[1]))]


def _observed_columns(est: CurvatureEstimator, layers: list[KFACLayer], obs: Observation,
                      y: Tensor, consume: Callable[[KFACLayer, Tensor, Tensor], None]
                      ) -> tuple[list[KFACLayer], dict[str, Tensor]] | None:
    """The empirical statistics of one batch from an observed pass: like
    :func:`_backprop_columns` for the single column √c ∇_f ℓ_n, calling ``consume`` once per
    layer, or None (nothing consumed) if the pass is not the one they can be taken from.

    The backward pass of loss = c·Σ_n ℓ_n delivers c·∇ℓ_n at every layer output, the
    backpropagated column is √c·∇ℓ_n: the layer-output gradients are divided by √c. The pass
    must be a single forward of the model followed by a backward of exactly that loss, which
    is verified at the model output (its observed gradient must be c·∇_f ℓ_n) and, as in
    :func:`_backprop_columns`, at every layer whose plain use the model's code does not
    prove (:func:`capture._needs_check`; the weight gradient implied by the inputs and
    output gradients must be the observed one, checked on random projections:
    :func:`_sketched_grad_pairs`); any other pass (no backward, a scaled loss, several
    forwards, a weight used outside its module, and where the check runs a regulariser on
    the parameters) returns None and the caller recomputes the statistics, with the usual
    errors for a model they are not defined for. (A regulariser on the parameters leaves
    the output gradients, hence the statistics, as they are: where the check is skipped
    the observation is used.)
    """
    if obs.calls != 1 or set(obs.records) != {layer.name for layer in layers}:
        return None
    if any(layer.group for layer in layers):
        # a tied group's check sums over its layers: a pass of our own
        return None
    _check_output(obs.out)
    out: Tensor = obs.out
    active, _ = _classify(layers, obs.records, strict=True)
    if not active:
        return [], {}
    if obs.out_grad is None:
        return None
    loss = est.loss
    loss.check(out, y, f"estimator {est.name!r}")
    c = loss.reduction_factor(out, y)
    expected = loss.gradient(out, y) * c
    if obs.out_grad.shape != expected.shape:
        return None
    A_in = {layer.name: _uses_inputs(layer, obs.records[layer.name]) for layer in active}
    checked, pairs = [], [(obs.out_grad, expected)]
    for layer in active:
        rec = obs.records[layer.name]
        # an output that does not reach the loss has no gradient: zeros
        g = _uses_grads(layer, [(t if t is not None else torch.zeros(
            shape, dtype=dtype, device=device)).unsqueeze(0)
            for t, (shape, dtype, device) in zip(rec.grads, rec.output_like)])
        if _needs_check(layer):  # not where the model's code proves the plain use
            true = [t if t is not None else torch.zeros_like(p)
                    for t, p in zip(obs.param_grads[layer.name], _layer_params(layer))]
            pairs += _sketched_grad_pairs(layer, A_in[layer.name], g[0], true)
        checked.append((layer, g))
    if _mismatches(*pairs):
        # a weight used outside its module, or a loss with more terms than c·Σ_n ℓ_n
        # (a regulariser): the caller's own pass reports the former as usual
        return None
    for layer, g in checked:
        consume(layer, A_in[layer.name], g if c == 1.0 else g / math.sqrt(c))
    return [layer for layer, _ in checked], A_in


def captured_columns(est: CurvatureEstimator, layers: list[KFACLayer], X: Any, y: Tensor,
                     observation: Observation | None, columns: Callable[[Tensor], Tensor],
                     consume: Callable[[KFACLayer, Tensor, Tensor], None]
                     ) -> tuple[list[KFACLayer], dict[str, Tensor]]:
    """(layers kept, their inputs (N, T, D)) of one batch, with ``consume`` called on every
    kept layer's backpropagated columns: from ``observation`` when it can provide them
    (:func:`_observed_columns`), otherwise from a forward and backward pass of our own with
    the columns ``columns(out)`` (K, *out.shape) of the detached model output."""
    found = None if observation is None else _observed_columns(est, layers, observation, y,
                                                                consume)
    if found is not None:
        return found
    out, active, records, _ = _forward_capture(est.model, layers, X, strict=True)
    if not active:
        return [], {}
    kept, A_in, _ = _backprop_columns(out, columns(out.detach()), active, records,
                                      strict=True, consume=consume)
    return kept, A_in
