"""How curvkit runs its own passes through the user's model (one place for all parts).

An estimator, a preconditioner update or a solver's trial point evaluates the user's model
many times per optimizer step. Three things must hold for every such pass, whatever the
model, and they are arranged here once instead of in each part:

* **Differentiable as asked.** PyTorch's own kernels are wrong or missing beyond first
  order in places: the CPU flash-attention kernel of ``F.scaled_dot_product_attention``
  has no double backward and no forward-mode derivative, and the fused normalization
  kernels (``layer_norm``, ``batch_norm``, ``group_norm``, ``instance_norm``) treat their
  saved mean and inverse standard deviation as constants from the third order on (triple
  backward, and forward mode over their backward, disagree with finite differences).
  :func:`differentiable` runs a higher-order or forward-mode pass with attention on the
  math backend and these normalizations decomposed into elementary operations (whose
  derivatives of every order autograd composes correctly), restoring the caller's
  settings on exit. First-order passes keep the fast kernels.
* **One random state per evaluation.** With dropout in training mode each forward draws
  a mask; an evaluation that runs several forwards (an output and its Jacobian; the
  gradient of a step and the curvature of the same step) must see one mask. An
  :func:`rng_scope` captures the global generators' state once; :func:`forward` replays
  it before every forward pass inside the scope, and the scope restores on exit the state
  the caller had (so curvature evaluations are repeatable and never advance the caller's
  random stream).
* **Buffers move once per step.** Running statistics (BatchNorm) advance only in the
  optimizer's own forward pass. :func:`forward` with parameters passes fresh copies of the
  buffers (``functional_call``), and :func:`kept_buffers` restores every buffer of a
  model after a pass that calls the model itself (hook-based capture passes).

:func:`evaluation` combines the three for one estimator call; :func:`vmap_or_loop` is the
single fallback for ``torch.func.vmap`` over models whose kernels do not batch (recurrent
layers, GroupNorm). What can be known about a model before any data is read from its code
by :func:`code_graph` (a ``torch.fx`` trace with the submodules as leaves): a dict or tuple
output (:func:`refuse_structured_output`, at build) and varpro's final layer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

# ----------------------------------------------------------------------------- differentiable


def _stats_shape(x: Tensor, dims: tuple[int, ...]) -> list[int]:
    return [1 if d in dims else s for d, s in enumerate(x.shape)]


def _normalize(x: Tensor, dims: tuple[int, ...], eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(x − μ)/√(σ² + ε) over ``dims`` with the biased variance, and μ, σ² (keepdim)."""
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps), mean, var


def _channel_affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    shape = [1, -1] + [1] * (y.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _layer_norm(input: Tensor, normalized_shape: Any, weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    k = len(tuple(normalized_shape))
    y, _, _ = _normalize(input, tuple(range(input.ndim - k, input.ndim)), eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _rms_norm(input: Tensor, normalized_shape: Any, weight: Tensor | None = None,
              eps: float | None = None) -> Tensor:
    k = len(tuple(normalized_shape))
    dims = tuple(range(input.ndim - k, input.ndim))
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    y = input * torch.rsqrt((input ** 2).mean(dim=dims, keepdim=True) + eps)
    return y if weight is None else y * weight


def _batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None = None, bias: Tensor | None = None,
                training: bool = False, momentum: float | None = 0.1, eps: float = 1e-5
                ) -> Tensor:
    dims = (0, *range(2, input.ndim))
    if training or running_mean is None:
        y, mean, var = _normalize(input, dims, eps)
        if training and running_mean is not None and running_var is not None:
            # the running statistics move as F.batch_norm moves them (unbiased variance)
            n = input.numel() // input.shape[1]
            with torch.no_grad():
                m = 0.1 if momentum is None else momentum
                running_mean.mul_(1 - m).add_(mean.detach().reshape(-1), alpha=m)
                running_var.mul_(1 - m).add_(var.detach().reshape(-1) * (n / max(n - 1, 1)),
                                             alpha=m)
    else:
        shape = _stats_shape(input, dims)
        y = (input - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _channel_affine(y, weight, bias)


def _instance_norm(input: Tensor, running_mean: Tensor | None = None,
                   running_var: Tensor | None = None, weight: Tensor | None = None,
                   bias: Tensor | None = None, use_input_stats: bool = True,
                   momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    if not use_input_stats:
        return _batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    y, mean, var = _normalize(input, tuple(range(2, input.ndim)), eps)
    if running_mean is not None and running_var is not None:
        n = input[0, 0].numel()
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach().mean(0).reshape(-1),
                                                 alpha=momentum)
            running_var.mul_(1 - momentum).add_(
                var.detach().mean(0).reshape(-1) * (n / max(n - 1, 1)), alpha=momentum)
    return _channel_affine(y, weight, bias)


def _group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None,
                bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    N = input.shape[0]
    grouped = input.reshape(N, num_groups, -1)
    y, _, _ = _normalize(grouped, (2,), eps)
    return _channel_affine(y.reshape(input.shape), weight, bias)


_DECOMPOSED: dict[Callable, Callable] = {
    F.layer_norm: _layer_norm,
    F.batch_norm: _batch_norm,
    F.group_norm: _group_norm,
    F.instance_norm: _instance_norm,
}
if hasattr(F, "rms_norm"):
    _DECOMPOSED[F.rms_norm] = _rms_norm


class _Decomposed(TorchFunctionMode):
    """Normalization functions as elementary operations (see the module docstring)."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        return _DECOMPOSED.get(func, func)(*args, **(kwargs or {}))


@contextlib.contextmanager
def differentiable() -> Iterator[None]:
    """Run the enclosed passes so that autograd differentiates them correctly to any order
    and in forward mode: attention on the math backend, normalizations decomposed. The
    caller's attention backends are restored on exit."""
    with sdpa_kernel([SDPBackend.MATH]), _Decomposed():
        yield


# ----------------------------------------------------------------------------- random state
_local = threading.local()


def _devices(model: nn.Module | None) -> list[torch.device]:
    # is_initialized, not is_available: cheap, and a generator nothing has used is not
    # initialized yet (parameters on a CUDA device initialize it)
    if model is None or not torch.cuda.is_initialized():
        return []
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"},
                  key=str)


def _get_state(devices: list[torch.device]) -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_state(state: tuple[Tensor, list[Tensor]], devices: list[torch.device]) -> None:
    torch.set_rng_state(state[0])
    for d, s in zip(devices, state[1]):
        torch.cuda.set_rng_state(s, d)


class RandomState:
    """The global generators' state at one moment (CPU and the model's CUDA devices)."""

    def __init__(self, model: nn.Module | None = None) -> None:
        self.devices = _devices(model)
        self.state = _get_state(self.devices)

    def restore(self) -> None:
        _set_state(self.state, self.devices)


@contextlib.contextmanager
def rng_scope(model: nn.Module | None = None, state: RandomState | None = None
              ) -> Iterator[RandomState]:
    """Within the block every :func:`forward` starts from one random state: ``state``, or
    the state at entry. An enclosing scope wins (one state for the whole evaluation). On
    exit the generators are set back to what they were at entry."""
    outer = getattr(_local, "scope", None)
    entry = RandomState(model)
    if outer is None:
        _local.scope = state or entry
    try:
        yield _local.scope
    finally:
        if outer is None:
            _local.scope = None
        entry.restore()


def replay() -> None:
    """Set the generators to the enclosing scope's state (no-op outside a scope)."""
    scope = getattr(_local, "scope", None)
    if scope is not None:
        scope.restore()


def _probe(model: nn.Module, X: Any) -> tuple[Any, bool]:
    """One forward of ``model`` on ``X`` without gradients (the enclosing scope's random
    state, buffers and the generators left as they were): its output, and whether it drew
    from the global generator (dropout in training mode, in a module or a functional call)."""
    entry = RandomState(model)
    try:
        replay()
        start = torch.get_rng_state()
        with torch.no_grad(), kept_buffers(model):
            out = model(X)
        return out, not torch.equal(start, torch.get_rng_state())
    finally:
        entry.restore()


def draws_random(model: nn.Module, X: Any) -> bool:
    """Whether a forward of ``model`` on ``X`` draws from the global generator (dropout in
    training mode, in a module or in a functional call): one forward without gradients,
    the generators left as they were."""
    return _probe(model, X)[1]


def per_sample_obstacle(model: nn.Module, X: Any, seen: tuple[Any, bool] | None = None
                        ) -> str | None:
    """Why the model's outputs on a batch are not its outputs on each sample alone (then
    per-sample passes, e.g. ``vmap`` over samples, would compute another function), or None:
    a module that couples the samples (BatchNorm in training mode), a forward that draws
    random numbers (one dropout mask for the batch, not per sample), or an output whose
    rows are not the samples (positions folded into the first dimension, ``(N·L, V)``).
    ``seen``: (output, whether it drew from the global generator) of a forward on ``X`` the
    caller already ran (no probe forward of its own then)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return (f"module {name or '<model>'} ({type(m).__name__}) is in training mode "
                    f"and couples the samples of a batch")
    out, random = _probe(model, X) if seen is None else seen
    if random:
        return "the forward draws random numbers (dropout in training mode)"
    leaves = [t for t in torch.utils._pytree.tree_leaves(X) if isinstance(t, Tensor)]
    if isinstance(out, Tensor) and leaves and leaves[0].ndim and out.ndim \
            and out.shape[0] != leaves[0].shape[0]:
        return (f"the model output's first dimension ({out.shape[0]}) is not the batch's "
                f"({leaves[0].shape[0]}): its rows are not the samples")
    return None


# ----------------------------------------------------------------------------- buffers
def buffer_copies(model: nn.Module) -> dict[str, Tensor]:
    """Fresh copies of all buffers: a forward that updates them in place (BatchNorm in
    training mode) changes the copies, not the model, and trips no ``torch.func`` check."""
    return {n: b.clone() for n, b in model.named_buffers()}


def _memory_order_dropout(input: Tensor, p: float = 0.5, training: bool = True,
                          inplace: bool = False) -> Tensor:
    """``F.dropout`` whose mask is laid out as a plain forward lays it out. A plain call
    draws the mask of a non-contiguous input (a transposed attention output) in memory
    order; under torch.func's transforms the same call draws it in logical order — another
    mask. Dropout is applied to the input permuted into memory order (a contiguous view,
    where both orders agree) and permuted back."""
    base = input
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(base):
        base = functorch.get_unwrapped(base)
    if not training or p == 0.0 or base.dim() != input.dim() or base.is_contiguous():
        return F.dropout(input, p, training, inplace)
    order = sorted(range(base.dim()), key=lambda d: (-base.stride(d), d))
    inverse = [order.index(d) for d in range(len(order))]
    return F.dropout(input.permute(order), p, training, inplace).permute(inverse)


class _PlainRandomness(TorchFunctionMode):
    """curvkit's forwards draw the dropout masks a plain forward draws (see
    :func:`_memory_order_dropout`), with or without torch.func transforms."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        if func is F.dropout:
            return _memory_order_dropout(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def forward(model: nn.Module, X: Any, params: Mapping[str, Tensor] | None = None) -> Any:
    """The model's output on ``X`` for a pass of curvkit's own: the random state of the
    enclosing :func:`rng_scope` is replayed first, and dropout masks are laid out as in a
    plain forward (also under torch.func transforms); with ``params`` (name → tensor) the
    model runs through ``functional_call`` on them and on copies of its buffers."""
    replay()
    # the mode costs a Python call per operation: only where dropout modules draw masks
    # (a functional F.dropout in a custom forward is not seen)
    drops = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
                for m in model.modules())
    try:
        with _PlainRandomness() if drops else contextlib.nullcontext():
            return _call(model, X, params)
    except RuntimeError as err:
        advice = _packed_sequence_error(model, err)
        if advice is None:
            raise
        raise advice from err


def _call(model: nn.Module, X: Any, params: Mapping[str, Tensor] | None) -> Any:
    if params is None:
        return model(X)
    state = dict(params)
    state.update(buffer_copies(model))
    return functional_call(model, state, (X,))


def _packed_sequence_error(model: nn.Module, err: RuntimeError) -> TypeError | None:
    """What to do when a recurrent module ran on a ``PackedSequence`` inside a torch.func
    transform: its packed kernels read their inputs through data pointers that
    torch.func's wrapped tensors do not have (torch's message: "Cannot access data pointer
    of Tensor that doesn't have storage"). None for any other error."""
    if "doesn't have storage" not in str(err):
        return None
    rnn = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.RNNBase)), None)
    if rnn is None:
        return None
    return TypeError(
        f"module {rnn[0] or '<model>'} ({type(rnn[1]).__name__}) runs on a PackedSequence, "
        f"which torch.func (this pass' vmap/jvp/vjp) cannot differentiate. Give the module "
        f"the padded batch (batch_first) and mask the padded steps instead of packing, or "
        f"use passes that need plain autograd only (estimator 'hessian'; 'ggn'/'ef' "
        f"matvec, e.g. Hessian-free; solver 'varpro')")


@contextlib.contextmanager
def kept_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``model`` (values, in place) when the block ends: for passes
    that call the model itself, e.g. a capture forward with hooks."""
    saved = [(b, b.detach().clone()) for _, b in model.named_buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                if b.data_ptr() != v.data_ptr():
                    b.copy_(v)


@contextlib.contextmanager
def evaluation(model: nn.Module, higher_order: bool = True) -> Iterator[None]:
    """One curvature evaluation on ``model``: one random state for all its forward passes,
    buffers untouched, and (``higher_order``) :func:`differentiable` passes."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(rng_scope(model))
        stack.enter_context(kept_buffers(model))
        if higher_order:
            stack.enter_context(differentiable())
        yield


# ----------------------------------------------------------------------------- vmap
def vmap_or_loop(fn: Callable[..., Any], *args: Any, chunk_size: int | None = None,
                 randomness: str = "error") -> Any:
    """``torch.func.vmap(fn)(*args)`` over dim 0 of every argument; where vmap cannot batch
    the model's kernels (recurrent layers, GroupNorm, …: a ``RuntimeError`` from inside
    torch), the same result from a loop over the batch, stacked."""
    try:
        return vmap(fn, chunk_size=chunk_size, randomness=randomness)(*args)
    except RuntimeError:
        pass
    n = len(torch.utils._pytree.tree_leaves(args)[0])
    results = [fn(*tree_map(lambda t, i=i: t[i], args)) for i in range(n)]
    return tree_map(lambda *xs: torch.stack(xs), *results) if len(results) > 1 else \
        tree_map(lambda x: x.unsqueeze(0), results[0])


# ----------------------------------------------------------------------------- outputs
class SelectOutput(nn.Module):
    """``model`` with its output reduced to the one tensor the loss and the curvature are
    defined on: ``out[key]`` of a dict, tuple or list output (a ``ModelOutput`` of a
    transformers model is a dict). The parameters are the model's own (shared, not copied),
    so the optimizer built on the wrapper trains the model::

        opt = curvkit.build_optimizer(curvkit.SelectOutput(model, "logits"), loss_fn, cfg)
    """

    def __init__(self, model: nn.Module, key: str | int) -> None:
        super().__init__()
        self.model = model
        self.key = key

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        out = self.model(*args, **kwargs)
        try:
            return out[self.key]
        except (KeyError, IndexError, TypeError) as err:
            raise TypeError(f"SelectOutput: the model's output ({describe_output(out)}) has "
                            f"no entry {self.key!r}") from err


def describe_output(out: Any) -> str:
    """A short description of a model output for error messages."""
    if isinstance(out, Mapping):
        return f"a {type(out).__name__} with keys {', '.join(map(repr, out))}"
    if isinstance(out, (tuple, list)):
        kinds = ", ".join(type(o).__name__ for o in out)
        return f"a {type(out).__name__} of {len(out)} ({kinds})"
    return f"a {type(out).__name__}"


def _no_tensor_output(model: nn.Module, where: str, described: str, key: Any) -> TypeError:
    return TypeError(f"{where}: model {type(model).__name__} returns {described}; "
                     f"curvature is defined on one output tensor, the one the loss takes. "
                     f"Wrap the model: curvkit.SelectOutput(model, {key!r}) (the key or index "
                     f"of that tensor) and pass the wrapper to build_optimizer / the estimator")


def require_tensor_output(out: Any, model: nn.Module, where: str) -> Tensor:
    """``out`` if it is a tensor; otherwise a ``TypeError`` naming the way out
    (:class:`SelectOutput`)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping):
        key = next((k for k in out if isinstance(out[k], Tensor)), "logits")
    else:
        key = 0
    raise _no_tensor_output(model, where, describe_output(out), key)


# ----------------------------------------------------------------------------- the code
def code_graph(model: nn.Module) -> Any:
    """The model's forward pass as a ``torch.fx`` graph with every submodule a leaf (read
    from the code, no data, the model untouched), or None where fx cannot trace it (control
    flow on values, unsupported calls, …). For decisions that can be made before training."""
    from torch import fx

    class Leaves(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return True

    try:
        return Leaves().trace(model)
    except Exception:  # noqa: BLE001 - fx cannot trace every forward; data decides then
        return None


def refuse_structured_output(model: nn.Module, where: str) -> None:
    """At build: where the model's code returns a dict, tuple or list literal, the
    ``TypeError`` :func:`require_tensor_output` would raise at the first step."""
    graph = code_graph(model)
    out = next((n.args[0] for n in graph.nodes if n.op == "output"), None) \
        if graph is not None else None
    if isinstance(out, Mapping) and out:
        keys = list(out)
        raise _no_tensor_output(model, where, f"a dict with keys {', '.join(map(repr, keys))}",
                                "logits" if "logits" in keys else keys[0])
    if isinstance(out, (tuple, list)) and out:
        raise _no_tensor_output(model, where, f"a {type(out).__name__} of {len(out)}", 0)
