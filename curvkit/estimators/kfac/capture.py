"""Capture of the own pass: forward hooks on the covered layers, then the output columns
backpropagated to the layer outputs, with the check that the captured inputs and output
gradients explain the true weight gradient (see :mod:`curvkit.estimators.kfac`).

A layer used several times (a module called more than once, tied modules) has one record
per layer with one entry per call; its inputs (N, T_u, D) and output gradients
(K, N, T_u, d_out) of the calls u are concatenated along the positions
(:func:`_uses_inputs`, :func:`_uses_grads`), so that every use is a weight-sharing
position and the weight gradient Σ_u Σ_t g ãᵀ is the true one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module

if TYPE_CHECKING:
    pass
from curvkit import passes
from curvkit.estimators.kfac.attention import attach
from curvkit.estimators.kfac.layers import (
    _CHUNK_ELEMENTS,
    _STOCK_FORWARD,
    KFACLayer,
    _label,
    _layer_inputs,
    _layer_output_grads,
    _layer_params,
    _weight,
)


@dataclass
class _Record:
    """What the hooks saw of one layer, one list entry per call (use)."""

    calls: int = 0
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    problem: str = ""
    differentiable: bool = False
    # observed passes only (see `observe_pass`): ∂loss/∂output per call (None until the
    # backward delivers it) and the outputs' layouts
    grads: list[Tensor | None] = field(default_factory=list)
    output_like: list[tuple[torch.Size, torch.dtype, torch.device]] = \
        field(default_factory=list)


def _uses_inputs(layer: KFACLayer, rec: _Record) -> Tensor:
    """(N, Σ_u T_u, D): the inputs of every call of the layer, positions concatenated; a
    batch size that differs between calls raises (the uses are not per-sample)."""
    parts = [_layer_inputs(layer, x) for x in rec.inputs]
    if len(parts) == 1:
        return parts[0]
    sizes = {int(a.shape[0]) for a in parts}
    if len(sizes) != 1:
        raise ValueError(f"kronecker: module {_label(layer)} is called {len(parts)} times "
                         f"with batch sizes {sorted(sizes)}; the calls of a shared layer "
                         f"must see the same samples")
    return torch.cat(parts, 1)


def _uses_grads(layer: KFACLayer, grads: list[Tensor]) -> Tensor:
    """(K, N, Σ_u T_u, d_out) from each call's output gradients (K, *output shape)."""
    parts = [_layer_output_grads(layer, g) for g in grads]
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


@functools.lru_cache(maxsize=64)
def _probes(D: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A Gaussian (D, 4) sketch from a fixed private seed, drawn once per layer width (the
    global RNG is not touched; a generator per call would cost more than small layers'
    check)."""
    gen = torch.Generator(device=device).manual_seed(1_000_003 * D + 7)
    return torch.randn(D, 4, generator=gen, dtype=dtype, device=device)


def _weight_grad_mismatch(layer: KFACLayer, a: Tensor, g: Tensor, true_grads: list[Tensor]
                          ) -> str:
    """'' if Σ_{n,t} g ãᵀ equals the true gradient of W̃ (same cotangent), else a message.

    The weight gradient is compared through a fixed random sketch R (d_in × 4): Σ g (ã R)
    against ∇W R, which costs products with 4 columns instead of forming Σ g ãᵀ (a second
    weight gradient, as much as the capture's own backward). A mismatch E survives the
    sketch with probability 1 (E[‖E R‖²] = 4‖E‖², R from a private seeded generator)."""
    W = _weight(layer)
    parts: list[tuple[Tensor, Tensor]] = []
    if layer.weight:
        R = _probes(a.shape[-1], a.dtype, a.device)
        aR = a @ R                                                # (N, T, 4)
        mine = torch.einsum("ntd,ntr->dr", g, aR)                 # (d_out, 4)
        ref = true_grads[0]
        ref = ref.T if layer.transposed else ref.reshape(W.shape[0], -1)
        parts.append((mine, ref @ R))
        a_norm = float(aR.norm())
    else:
        a_norm = 0.0
    if layer.bias:
        parts.append((g.sum((0, 1)), true_grads[-1]))
    tol = min(0.05, 1e4 * torch.finfo(a.dtype).eps)
    # absolute floor: the round-off of Σ g (ã R) is bounded by eps·‖g‖·‖ã R‖, so a gradient
    # that is round-off itself (a key bias under softmax's shift invariance: ~1e-18) is
    # not compared relative to its own size
    floor = float(g.norm()) * (a_norm + math.sqrt(a.shape[0] * a.shape[1]))
    for name, (mine, ref) in zip(layer.params, parts):
        err = float((mine - ref).norm())
        scale = float(ref.norm()) + float(mine.norm())
        if err > tol * (scale + floor):
            return (f"the gradient of {name} is not explained by the module's own inputs and "
                    f"output gradients (relative error {err / scale:.2e}): the parameter is "
                    f"used outside the module's forward, or the module's forward is not a "
                    f"plain {type(layer.module).__name__}")
    return ""


def _implied_weight_grad(layer: KFACLayer, a: Tensor, g: Tensor) -> Tensor:
    """Σ_{n,t} g ãᵀ for the weight, in the stored weight's shape (g (N, T, d_out))."""
    wg = torch.einsum("ntd,nte->de", g, a)
    return wg.T if layer.transposed else wg.reshape(_weight(layer).shape)


def _group_of(layers: list[KFACLayer], name: str) -> str:
    return next(layer.group for layer in layers if layer.name == name)


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
            rec.inputs.append(inputs[0].detach())
            rec.outputs.append(output)
            rec.differentiable |= output.requires_grad
            # downstream code gets a copy: in-place ops on it leave `output` intact
            return output.clone()

        return hook

    def attention_recorder(roles: dict[str, str]) -> Callable:
        def record(role: str, x: Tensor, out: Tensor) -> None:
            if role in roles:
                rec = records[roles[role]]
                rec.calls += 1
                rec.inputs.append(x.detach())
                rec.outputs.append(out)
                rec.differentiable |= out.requires_grad

        return record

    handles: list[Any] = []
    try:
        layer_hooks(layers, make_hook, attention_recorder, handles)
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
        if rec.calls == 0 or (not rec.problem and not rec.differentiable):
            skipped[layer.name] = "not called in the forward pass (or not differentiated)"
            continue
        reason = rec.problem
        if reason:
            if strict:
                raise ValueError(f"kronecker: module {_label(layer)} is {reason}; K-FAC "
                                 f"factors are defined for a layer applied to one input")
            skipped[layer.name] = reason
            continue
        active.append(layer)
    return active, skipped


def _needs_check(layer: KFACLayer) -> bool:
    """Whether the layer's captured inputs and output gradients must be checked against its
    weight gradient at run time: unless the model's code proved the plain use at build
    (``KFACLayer.plain``) and no forward hook — the module's own or a global one — can have
    changed the output the capture recorded, nor has the module's forward been replaced
    since (checked on every pass: hooks come and go)."""
    return not layer.plain or bool(_module._global_forward_hooks) \
        or any(m._forward_hooks or "forward" in vars(m)
               or type(m).forward is not _STOCK_FORWARD.get(type(m)) for m in layer.modules)


def _backprop_columns(out: Tensor, cols: Tensor, active: list[KFACLayer],
                      records: dict[str, _Record], strict: bool,
                      consume: Callable[[KFACLayer, Tensor, Tensor], None]
                      ) -> tuple[list[KFACLayer], dict[str, Tensor], dict[str, str]]:
    """Backpropagate ⟨out, s_k⟩ for every column s_k of ``cols`` (K, *out.shape) to the layer
    outputs, calling ``consume(layer, a (N, T, D), g (K', N, T, d_out))`` per chunk of columns.

    Layers whose plain use the model's code does not prove (:func:`_needs_check`) are
    verified on the largest column, which then goes first, alone and together with those
    layers' parameters: the weight gradient implied by a and g must be the true one; a layer
    that fails raises (``strict``) or is dropped and reported in the returned dict. Without
    such layers every column goes through the batched backward of the layer outputs only.
    """
    K = cols.shape[0]
    A_in: dict[str, Tensor] = {}
    dropped: dict[str, str] = {}
    for layer in list(active):
        try:
            A_in[layer.name] = _uses_inputs(layer, records[layer.name])
        except ValueError as err:
            if strict:
                raise
            dropped[layer.name] = str(err)
    active = [layer for layer in active if layer.name in A_in]
    check = [layer for layer in active if _needs_check(layer)]
    rest = list(range(K))
    kept = active
    if check:
        k0 = int(cols.reshape(K, -1).norm(dim=1).argmax())
        rest.remove(k0)
        kept = _checked_first_column(out, cols[k0], active, check, records, A_in, strict,
                                     consume, dropped)
    outputs = [o for layer in kept for o in records[layer.name].outputs]
    if not kept or not rest:
        return kept, A_in, dropped
    # columns per batched backward: bounded by the memory of the layer-output gradients
    per_column = sum(o.numel() for o in outputs) + out.numel()
    chunk = max(1, min(len(rest), _CHUNK_ELEMENTS // max(per_column, 1)))
    batched = True
    for start in range(0, len(rest), chunk):
        idx = rest[start:start + chunk]
        gs: Any = None
        if len(idx) == 1:  # one column: a plain backward (no batching machinery)
            gs = [None if g is None else g.unsqueeze(0) for g in torch.autograd.grad(
                out, outputs, grad_outputs=cols[idx[0]], retain_graph=True,
                allow_unused=True)]
        elif batched:
            try:
                gs = torch.autograd.grad(out, outputs, grad_outputs=cols[idx], retain_graph=True,
                                         allow_unused=True, is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule: one column at a time
                batched = False
        if gs is None:
            per = [torch.autograd.grad(out, outputs, grad_outputs=cols[k], retain_graph=True,
                                       allow_unused=True) for k in idx]
            gs = [None if per[0][i] is None else torch.stack([p[i] for p in per])
                  for i in range(len(outputs))]
        at = 0
        for layer in kept:
            n = len(records[layer.name].outputs)
            per_call = [g.detach() if g is not None else
                        torch.zeros((len(idx), *o.shape), dtype=o.dtype, device=o.device)
                        for g, o in zip(gs[at:at + n], outputs[at:at + n])]
            at += n
            consume(layer, A_in[layer.name], _uses_grads(layer, per_call))
    return kept, A_in, dropped


def _checked_first_column(out: Tensor, col: Tensor, active: list[KFACLayer],
                          check: list[KFACLayer], records: dict[str, _Record],
                          A_in: dict[str, Tensor], strict: bool,
                          consume: Callable[[KFACLayer, Tensor, Tensor], None],
                          dropped: dict[str, str]) -> list[KFACLayer]:
    """Backpropagate the column ``col`` to every active layer's outputs and to the parameters
    of the layers in ``check``, verify those (the weight gradient implied by a and g must be
    the true one), consume the column for every layer kept; returns the layers kept."""
    outputs = [o for layer in active for o in records[layer.name].outputs]
    params = [p for layer in check for p in _layer_params(layer)]
    grads = torch.autograd.grad(out, outputs + params, grad_outputs=col,
                                retain_graph=True, allow_unused=True)
    pos, at = len(outputs), 0
    first: list[tuple[KFACLayer, Tensor, list[Tensor] | None]] = []
    checked = {layer.name for layer in check}
    for layer in active:
        outs = records[layer.name].outputs
        true = None
        if layer.name in checked:
            ps = _layer_params(layer)
            true = [t if t is not None else torch.zeros_like(p)
                    for t, p in zip(grads[pos:pos + len(ps)], ps)]
            pos += len(ps)
        g = _uses_grads(layer, [(g if g is not None else torch.zeros_like(o))
                                .detach().unsqueeze(0)
                                for g, o in zip(grads[at:at + len(outs)], outs)])
        at += len(outs)
        first.append((layer, g, true))
    # a tied group's weight gradient is the sum over its layers: each layer must explain
    # the true gradient less what the other layers of its group explain (groups are never
    # proven plain, so all their layers are checked)
    implied = {layer.name: _implied_weight_grad(layer, A_in[layer.name], g[0])
               for layer, g, _ in first if layer.group}
    kept: list[KFACLayer] = []
    for layer, g, true in first:
        if true is not None:
            if layer.group:
                true = [true[0] - sum(w for n, w in implied.items() if n != layer.name and
                                      _group_of(active, n) == layer.group), *true[1:]]
            msg = _weight_grad_mismatch(layer, A_in[layer.name], g[0], true)
            if msg:
                if strict:
                    raise ValueError(f"kronecker: module {_label(layer)}: {msg}. Its K-FAC "
                                     f"factors would be wrong.")
                dropped[layer.name] = msg
                continue
        kept.append(layer)
        consume(layer, A_in[layer.name], g)
    return kept


def layer_hooks(layers: list[KFACLayer], make_hook: Callable[[str], Callable],
                attention_recorder: Callable[[dict[str, str]], Callable],
                handles: list[Any]) -> None:
    """Install the recording hooks of ``layers`` (appended to ``handles``, which the caller
    removes): a forward hook per module call of a plain layer, and one output hook per
    MultiheadAttention for the projections its handler re-expresses (roles → layer
    names). Shared by the own capture pass and the observed pass."""
    attention: dict[int, tuple[nn.Module, dict[str, str]]] = {}
    for layer in layers:
        if layer.attention is not None:  # captured by the attention handler
            attention.setdefault(id(layer.attention), (layer.attention, {}))[1][
                layer.role] = layer.name
            continue
        for mod in layer.modules:
            handles.append(mod.register_forward_hook(make_hook(layer.name)))
    for mha, roles in attention.values():
        handles.append(attach(mha, attention_recorder(roles)))
