"""Capture of the own pass: forward hooks on the covered layers, then the output columns
backpropagated to the layer outputs, with the check that the captured inputs and output
gradients explain the true weight gradient (see :mod:`curvkit.estimators.kfac`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    pass
from curvkit import passes
from curvkit.estimators.kfac.layers import (
    _CHUNK_ELEMENTS,
    KFACLayer,
    _label,
    _layer_inputs,
    _layer_output_grads,
    _layer_params,
)


@dataclass
class _Record:
    calls: int = 0
    inputs: Tensor | None = None
    output: Tensor | None = None
    problem: str = ""
    differentiable: bool = False
    # observed passes only (see `observe_pass`): ∂loss/∂output and the output's layout
    grad: Tensor | None = None
    output_like: tuple[torch.Size, torch.dtype, torch.device] | None = None


def _weight_grad_mismatch(layer: KFACLayer, a: Tensor, g: Tensor, true_grads: list[Tensor]
                          ) -> str:
    """'' if Σ_{n,t} g ãᵀ equals the true gradient of W̃ (same cotangent), else a message."""
    W = layer.module.weight
    wg = torch.einsum("ntd,nte->de", g, a)
    parts = [(wg.T if layer.transposed else wg.reshape(W.shape))] if layer.weight else []
    if layer.bias:
        parts.append(g.sum((0, 1)))
    tol = min(0.05, 1e4 * torch.finfo(a.dtype).eps)
    # absolute floor: the round-off of Σ g ãᵀ is bounded by eps·‖g‖·‖ã‖, so a gradient
    # that is round-off itself (a key bias under softmax's shift invariance: ~1e-18) is
    # not compared relative to its own size
    floor = float(g.norm()) * (float(a.norm()) + math.sqrt(a.shape[0] * a.shape[1]))
    for name, mine, ref in zip(layer.params, parts, true_grads):
        err = float((mine - ref).norm())
        scale = float(ref.norm()) + float(mine.norm())
        if err > tol * (scale + floor):
            return (f"the gradient of {name} is not explained by the module's own inputs and "
                    f"output gradients (relative error {err / scale:.2e}): the parameter is "
                    f"used outside the module's forward, or the module's forward is not a "
                    f"plain {type(layer.module).__name__}")
    return ""


def _forward_capture(model: nn.Module, layers: list[KFACLayer], X: Any, strict: bool
                     ) -> tuple[Tensor, list[KFACLayer], dict[str, _Record], dict[str, str]]:
    """Forward pass with temporary hooks: (output, layers captured, records, skipped layers
    with the reason). With ``strict`` a layer that cannot be captured raises instead."""
    records = {layer.name: _Record() for layer in layers}

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            rec = records[name]
            rec.calls += 1
            if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
                rec.problem = "called with more than one input"
                return output
            rec.inputs = inputs[0].detach()
            rec.output = output
            rec.differentiable = output.requires_grad
            # downstream code gets a copy: in-place ops on it leave `output` intact
            return output.clone()

        return hook

    handles = []
    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(make_hook(layer.name)))
        with torch.enable_grad():
            out = passes.forward(model, X)
    finally:
        for h in handles:
            h.remove()
    _check_output(out)
    active, skipped = _classify(layers, records, strict)
    return out, active, records, skipped


def _check_output(out: Any) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(f"kronecker: the model returned {type(out).__name__}; a tensor output "
                        f"is required")


def _classify(layers: list[KFACLayer], records: dict[str, _Record], strict: bool
              ) -> tuple[list[KFACLayer], dict[str, str]]:
    """(layers captured, skipped layers with the reason) after a forward pass with the
    capture hooks. With ``strict`` a layer that cannot be captured raises instead."""
    active: list[KFACLayer] = []
    skipped: dict[str, str] = {}
    for layer in layers:
        rec = records[layer.name]
        if rec.calls == 0 or (not rec.problem and rec.calls == 1 and not rec.differentiable):
            skipped[layer.name] = "not called in the forward pass (or not differentiated)"
            continue
        reason = rec.problem
        if rec.calls > 1:
            reason = (f"called {rec.calls} times in one forward pass (its weight is used more "
                      f"than once)")
        if reason:
            if strict:
                raise ValueError(f"kronecker: module {_label(layer)} is {reason}; K-FAC "
                                 f"factors are defined for a layer applied once to one input")
            skipped[layer.name] = reason
            continue
        active.append(layer)
    return active, skipped


def _backprop_columns(out: Tensor, cols: Tensor, active: list[KFACLayer],
                      records: dict[str, _Record], strict: bool,
                      consume: Callable[[KFACLayer, Tensor, Tensor], None]
                      ) -> tuple[list[KFACLayer], dict[str, Tensor], dict[str, str]]:
    """Backpropagate ⟨out, s_k⟩ for every column s_k of ``cols`` (K, *out.shape) to the layer
    outputs, calling ``consume(layer, a (N, T, D), g (K', N, T, d_out))`` per chunk of columns.

    The largest column goes first, alone and together with the layers' parameters, to verify
    every layer (the weight gradient implied by a and g must be the true one); a layer that
    fails raises (``strict``) or is dropped and reported in the returned dict.
    """
    K = cols.shape[0]
    A_in = {layer.name: _layer_inputs(layer, records[layer.name].inputs) for layer in active}
    k0 = int(cols.reshape(K, -1).norm(dim=1).argmax())
    outputs = [records[layer.name].output for layer in active]
    params = [p for layer in active for p in _layer_params(layer)]
    grads = torch.autograd.grad(out, outputs + params, grad_outputs=cols[k0],
                                retain_graph=True, allow_unused=True)
    kept: list[KFACLayer] = []
    dropped: dict[str, str] = {}
    pos = len(outputs)
    for layer, g, o in zip(active, grads, outputs):
        ps = _layer_params(layer)
        true = [t if t is not None else torch.zeros_like(p)
                for t, p in zip(grads[pos:pos + len(ps)], ps)]
        pos += len(ps)
        g = _layer_output_grads(layer, (g if g is not None else torch.zeros_like(o))
                                .detach().unsqueeze(0))
        msg = _weight_grad_mismatch(layer, A_in[layer.name], g[0], true)
        if msg:
            if strict:
                raise ValueError(f"kronecker: module {_label(layer)}: {msg}. Its K-FAC factors "
                                 f"would be wrong.")
            dropped[layer.name] = msg
            continue
        kept.append(layer)
        consume(layer, A_in[layer.name], g)
    rest = [k for k in range(K) if k != k0]
    outputs = [records[layer.name].output for layer in kept]
    if not kept or not rest:
        return kept, A_in, dropped
    # columns per batched backward: bounded by the memory of the layer-output gradients
    per_column = sum(o.numel() for o in outputs) + out.numel()
    chunk = max(1, min(len(rest), _CHUNK_ELEMENTS // max(per_column, 1)))
    batched = True
    for start in range(0, len(rest), chunk):
        idx = rest[start:start + chunk]
        if batched:
            try:
                gs = torch.autograd.grad(out, outputs, grad_outputs=cols[idx], retain_graph=True,
                                         allow_unused=True, is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: one column at a time
                batched = False
        if not batched:
            per = [torch.autograd.grad(out, outputs, grad_outputs=cols[k], retain_graph=True,
                                       allow_unused=True) for k in idx]
            gs = [None if per[0][i] is None else torch.stack([p[i] for p in per])
                  for i in range(len(outputs))]
        for layer, g, o in zip(kept, gs, outputs):
            if g is None:
                g = torch.zeros((len(idx), *o.shape), dtype=o.dtype, device=o.device)
            consume(layer, A_in[layer.name], _layer_output_grads(layer, g.detach()))
    return kept, A_in, dropped
