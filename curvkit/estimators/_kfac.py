"""Kronecker factors (K-FAC) of Linear and Conv2d layers, shared by ``ggn``, ``fisher``, ``ef``.

Convention (see :class:`curvkit.estimators.base.KroneckerFactors`): for a layer with weight
W (d_out, d_in) — a Conv2d weight viewed as (C_out, C_in·kh·kw) — and a trainable bias b,
W̃ = [W | b], and the curvature block over vec_r(W̃) is approximated by G ⊗ A.

Per sample n the layer sees inputs ã_{n,t} (augmented by a trailing 1 when the bias is
included) at T positions t (T = 1 for a Linear on (N, d_in) inputs; the leading extra dims
of a Linear input, or the output pixels of a Conv2d, are weight-sharing positions). The
curvature is C = Σ_n Σ_k (Σ_t g_{n,t,k} ⊗ ã_{n,t})(Σ_t g_{n,t,k} ⊗ ã_{n,t})ᵀ where
g_{n,t,k} is the gradient w.r.t. the layer output at position t of the scalar ⟨f_n, s_{n,k}⟩,
and the columns s_{n,k} of the output space satisfy Σ_k s_{n,k} s_{n,k}ᵀ = c·B_n with c the
loss' reduction factor and B_n

* ``"exact"`` (KFLR): the loss Hessian ∂²ℓ_n/∂f_n² (its symmetric square root's columns),
* ``"mc"`` (KFAC): (1/M) Σ_m ∇ℓ(f_n, ŷ_m)∇ℓ(f_n, ŷ_m)ᵀ with ŷ_m ~ p(y | f_n),
* ``"empirical"``: ∇ℓ(f_n, y_n)∇ℓ(f_n, y_n)ᵀ with the true labels.

The two weight-sharing flavours of Eschenhagen et al. (2023):

* ``"expand"``: positions are extra samples,
  A = 1/(N·T) Σ_{n,t} ã_{n,t} ã_{n,t}ᵀ,   G = Σ_{n,t,k} g_{n,t,k} g_{n,t,k}ᵀ;
* ``"reduce"``: positions are summed first,
  A = 1/N Σ_n ā_n ā_nᵀ with ā_n = (1/T) Σ_t ã_{n,t},   G = Σ_{n,k} ĝ_{n,k} ĝ_{n,k}ᵀ with
  ĝ_{n,k} = Σ_t g_{n,t,k}.

Both coincide when T = 1. For a single sample and a single layer they are exact
(``expand`` when the loss treats positions separately, ``reduce`` when the positions are
summed before the loss).

Module inputs and output gradients are captured with temporary forward hooks on the
user's model, removed in ``finally``; each hook hands on a copy of the layer output, so a
later in-place operation (``ReLU(inplace=True)``) cannot corrupt the captured tensor. A
module called more than once, with several inputs, a grouped convolution or a tied
parameter raises an error naming the module. As a guard against any other silently wrong
factor, the weight gradient implied by the captured inputs and output gradients is compared
with the true weight gradient (from the same backward pass); a mismatch (the weight also
used outside the module's forward, a subclass with a different forward) raises too.

Observed passes (the ``"empirical"`` statistic only): :func:`observe_pass` installs the same
capture, plus tensor hooks for the gradients, around someone else's forward and backward pass
of the loss (the optimizer's). With one column √c·∇_f ℓ_n per sample and the pass delivering
c·∇ℓ_n at every layer output, the statistics follow by dividing those gradients by √c, with
no pass of their own (:func:`_observed_columns`, which also checks that the pass was the
loss' and otherwise leaves the batch to the ordinary path).

The same capture gives exact diagonals (:func:`layer_diagonals`, BackPACK's algorithm for
``DiagGGN*``/``SumGradSquared``), where such layers are left to the caller instead.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from curvkit.estimators.base import Batch, KroneckerFactors, as_batches
from curvkit.losses import LOSS_GRADIENT, LOSS_HESSIAN, LOSS_SAMPLING, LossPart, loss_part
from curvkit.losses.base import Terms

if TYPE_CHECKING:
    from curvkit.estimators.base import CurvatureEstimator

Statistic = Literal["exact", "mc", "empirical"]
Approx = Literal["expand", "reduce"]
GeneratorArg = torch.Generator | Callable[[int], torch.Generator] | None
_CHUNK_ELEMENTS = 1 << 22  # output-gradient entries held at once by a batched backward
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


__all__ = ["kronecker_factors", "kfac_layers", "captured_columns", "factors_to_dense",
           "output_columns", "layer_diagonals", "Observation", "observe_pass", "STATISTIC_NEEDS"]

# what each statistic needs from the loss part
STATISTIC_NEEDS = {"exact": LOSS_HESSIAN, "mc": LOSS_SAMPLING, "empirical": LOSS_GRADIENT}


# ============================================================================ columns
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


# ============================================================================ layers
@dataclass
class KFACLayer:
    """A Linear/Conv2d layer K-FAC covers: its name, the module, the parameters covered."""

    name: str
    module: nn.Module
    params: tuple[str, ...]
    bias: bool
    # False for a frozen weight with a trainable bias: the layer is the bias alone, with
    # the constant input 1 (A = [1]) and the usual G
    weight: bool = True
    # True for an Embedding: its weight (V, d) is the transpose of the Linear it equals on
    # one-hot inputs, W_lin = Wᵀ (d, V); its factors are returned with the slots swapped
    transposed: bool = False


_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[bool, tuple[tuple, list[KFACLayer]]]] = \
    weakref.WeakKeyDictionary()


def kfac_layers(model: nn.Module, strict: bool = True) -> list[KFACLayer]:
    """Every nn.Linear / nn.Conv2d whose weight is trainable, in module order.

    A configuration whose factors would be wrong — a grouped convolution, or a weight/bias
    that other modules also hold (tied) — raises a clear error naming the module, or, with
    ``strict=False``, is left out.

    The result is reused while the model's parameters (identity, trainability) are
    unchanged: it is asked for on every preconditioner update, and finding it walks the
    module tree three times. (A module swapped for another brings new parameters.)
    """
    key = tuple((id(p), p.requires_grad) for p in model.parameters())
    cached = _LAYERS.setdefault(model, {}).get(strict)
    if cached is not None and cached[0] == key:
        return list(cached[1])
    layers = _find_layers(model, strict)
    _LAYERS[model][strict] = (key, layers)
    return list(layers)


def _find_layers(model: nn.Module, strict: bool) -> list[KFACLayer]:
    holders: dict[int, set[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod.named_parameters(recurse=False):
            holders.setdefault(id(p), set()).add(f"{mod_name}.{attr}" if mod_name else attr)
    full_name = {id(p): n for n, p in model.named_parameters()}
    layers: list[KFACLayer] = []
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Embedding, *CONV)) or id(mod) in seen:
            continue
        seen.add(id(mod))
        weight = mod.weight
        use_weight = isinstance(weight, nn.Parameter) and weight.requires_grad
        label = f"{mod_name or '<model>'} ({type(mod).__name__})"
        bias = getattr(mod, "bias", None)
        use_bias = isinstance(bias, nn.Parameter) and bias.requires_grad
        if not use_weight and not use_bias:
            continue
        problem = ""
        if isinstance(mod, CONV) and mod.groups != 1:
            problem = (f"has groups={mod.groups}; K-FAC factors are implemented for groups=1 "
                       f"only")
        if isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.sparse
                                              or mod.scale_grad_by_freq):
            problem = ("has max_norm, sparse or scale_grad_by_freq set; K-FAC factors are "
                       "implemented for a plain lookup")
        for p in ((weight,) if use_weight else ()) + ((bias,) if use_bias else ()):
            where = holders.get(id(p), set())
            if len(where) > 1:
                problem = (f"holds a parameter shared by {', '.join(sorted(where))}; the "
                           f"curvature of a tied parameter is not a per-layer Kronecker product")
        if problem:
            if strict:
                raise ValueError(f"kronecker: module {label} {problem}")
            continue
        params = ((full_name[id(weight)],) if use_weight else ()) + \
            ((full_name[id(bias)],) if use_bias else ())
        layers.append(KFACLayer(mod_name, mod, params, use_bias, use_weight,
                                transposed=isinstance(mod, nn.Embedding)))
    return layers


# ============================================================================ capture
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


def _label(layer: KFACLayer) -> str:
    return f"{layer.name or '<model>'} ({type(layer.module).__name__})"


def _layer_inputs(layer: KFACLayer, x: Tensor) -> Tensor:
    """(N, T, d_in): the layer's inputs per sample and weight-sharing position (the bias'
    constant 1 is not appended: it is accounted for in closed form, saving a copy)."""
    mod = layer.module
    if isinstance(mod, CONV):
        a = _conv_patches(layer, x)
    elif isinstance(mod, nn.Embedding):
        # the lookup is a Linear on one-hot inputs; the padding row gets no gradient
        a = F.one_hot(x.reshape(x.shape[0], -1), mod.num_embeddings).to(mod.weight.dtype)
        if mod.padding_idx is not None:
            a[..., mod.padding_idx] = 0.0
    else:
        if x.ndim < 2:
            raise ValueError(f"kronecker: module {_label(layer)} got unbatched input of shape "
                             f"{tuple(x.shape)}")
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    return a if layer.weight else a[..., :0]


def _conv_patches(layer: KFACLayer, x: Tensor) -> Tensor:
    """(N, T, C_in·∏k): the input patches of a Conv1d/2d/3d at its T output positions, in
    the order of the weight's flattening (C_in, k₁, …)."""
    mod = layer.module
    nd = mod.weight.ndim - 2
    if x.ndim != nd + 2:
        raise ValueError(f"kronecker: module {_label(layer)} got input of shape "
                         f"{tuple(x.shape)}; a batched (N, C, {nd} spatial) input is required")
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str) or nd == 3:
        # the convolution pads explicitly in these cases (see nn.Conv2d._conv_forward)
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
        padding: tuple[int, ...] = (0,) * nd
    else:
        padding = tuple(mod.padding)
    k, d, st = tuple(mod.kernel_size), tuple(mod.dilation), tuple(mod.stride)
    if nd == 1:  # a Conv1d is a Conv2d over a height-1 image
        x, k, d, st, padding = x.unsqueeze(2), (1, *k), (1, *d), (1, *st), (0, *padding)
    if nd <= 2:
        cols = F.unfold(x, k, dilation=d, padding=padding, stride=st)  # (N, C_in·∏k, T)
        return cols.transpose(1, 2)
    p = x
    for i in range(3):  # windows of the dilated kernel extent, then every d-th entry
        p = p.unfold(2 + i, (k[i] - 1) * d[i] + 1, st[i])
    p = p[..., ::d[0], ::d[1], ::d[2]]                      # (N, C, D', H', W', k₁, k₂, k₃)
    N, C = p.shape[:2]
    return p.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(N, -1, C * k[0] * k[1] * k[2])


def _augmented_outer(a: Tensor, bias: bool, count: float) -> Tensor:
    """Σ_r ã_r ã_rᵀ / count for the rows a (R, D), ã = [a, 1] if ``bias``."""
    if not bias:
        return (a.T @ a).div_(count)
    D = a.shape[1]
    A = a.new_empty(D + 1, D + 1)
    A[:D, :D] = a.T @ a
    s = a.sum(0)
    A[:D, D] = s
    A[D, :D] = s
    A[D, D] = float(a.shape[0])
    return A.div_(count)


def _layer_output_grads(layer: KFACLayer, g: Tensor) -> Tensor:
    """(K, N, T, d_out) from gradients (K, *output shape) w.r.t. the layer output."""
    if isinstance(layer.module, CONV):
        return g.flatten(3).transpose(2, 3)
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def _layer_params(layer: KFACLayer) -> list[Tensor]:
    mod = layer.module
    return ([mod.weight] if layer.weight else []) + ([mod.bias] if layer.bias else [])


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
            out = model(X)
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


# ============================================================================ observed passes
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

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            rec = obs.records[name]
            rec.calls += 1
            if len(inputs) != 1 or not isinstance(inputs[0], Tensor):
                rec.problem = "called with more than one input"
                return
            rec.inputs = inputs[0].detach()
            rec.differentiable = isinstance(output, Tensor) and output.requires_grad
            if rec.differentiable:
                rec.output_like = (output.shape, output.dtype, output.device)
                obs.handles.append(output.register_hook(keep(rec, "grad")))

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

    handles = obs.handles
    try:
        for layer in layers:
            handles.append(layer.module.register_forward_hook(make_hook(layer.name)))
            for j, p in enumerate(_layer_params(layer)):
                handles.append(p.register_hook(make_param_hook(layer.name, j)))
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


_SKETCHES: dict[tuple[int, int, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}


def _sketch(D: int, d_out: int, dtype: torch.dtype, device: torch.device
            ) -> tuple[Tensor, Tensor]:
    """Gaussian probes P̃ = [P | p_b] (2, D + 1) of a layer shape, as P (2, D) and p_b (2, 1),
    drawn once from a fixed private seed (a generator per call cost more than the check's
    products on small layers)."""
    key = (D, d_out, dtype, device)
    probes = _SKETCHES.get(key)
    if probes is None:
        gen = torch.Generator(device=device).manual_seed(1_000_003 * D + d_out)
        P = torch.randn(_PROBES, D + 1, generator=gen, dtype=dtype, device=device)
        probes = _SKETCHES[key] = (P[:, :D].contiguous(), P[:, D:].contiguous())
    return probes


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
    :func:`_backprop_columns`, at every layer (the weight gradient implied by the inputs and
    output gradients must be the observed one, checked on random projections:
    :func:`_sketched_grad_pairs`); any other pass (no backward, a scaled or
    regularised loss, several forwards) returns None and the caller recomputes the
    statistics, with the usual errors for a model they are not defined for.
    """
    if obs.calls != 1 or set(obs.records) != {layer.name for layer in layers}:
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
    A_in = {layer.name: _layer_inputs(layer, obs.records[layer.name].inputs)
            for layer in active}
    checked, pairs = [], [(obs.out_grad, expected)]
    for layer in active:
        rec = obs.records[layer.name]
        g = rec.grad
        if g is None:  # the output does not reach the loss
            shape, dtype, device = rec.output_like
            g = torch.zeros(shape, dtype=dtype, device=device)
        g = _layer_output_grads(layer, g.unsqueeze(0))
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


# ============================================================================ public
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

    acc = estimator.accumulate(batches, one, reduction=estimator.reduction)
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
    idx = torch.arange(d_out * d_aug).reshape(d_out, d_aug)
    order = [idx[:, :d_in].reshape(-1)]
    if len(factors.params) > 1:
        order.append(idx[:, d_in])
    perm = torch.cat(order)
    return K[perm][:, perm]
