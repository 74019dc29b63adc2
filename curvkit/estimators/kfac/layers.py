"""K-FAC layer handlers: which modules are covered and what each layer sees.

One handler per module family — ``nn.Linear`` (extra input dims are weight-sharing
positions), ``nn.Conv1d``/``Conv2d``/``Conv3d`` (input patches at the output positions),
``nn.Embedding`` (a Linear on one-hot inputs, stored transposed) — gives the layer inputs
(N, T, d_in) and output gradients (K, N, T, d_out) in one layout; a frozen weight with a
trainable bias is the bias alone. See :mod:`curvkit.estimators.kfac` for the convention.

MultiheadAttention: the packed in_proj (self-attention) and the out_proj are Linear uses
captured by the handler in ``attention``; an attention it cannot capture is left out with
the reason (:func:`kfac_exclusions`).

Weight sharing across calls: a module called several times in one forward, and modules of
one type and configuration that hold the same parameters (tied weight *and* bias), are one
layer whose *uses* are those calls; the positions of all uses are concatenated (see
``_find_layers``). An Embedding tied to a Linear head (the same matrix in its two
orientations) is a *group* of two layers whose factors are combined (``_tied_head``). Any
other sharing of a covered parameter (a weight tied but biases not, …) is left out with the
reason (:func:`kfac_exclusions`), reported when the optimizer is built.
"""

from __future__ import annotations

import builtins
import math
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    pass

_CHUNK_ELEMENTS = 1 << 22  # output-gradient entries held at once by a batched backward
CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


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
    # further modules holding exactly the same parameters (same type and configuration):
    # their calls are further uses of this layer
    tied: tuple[nn.Module, ...] = ()
    # a projection of this MultiheadAttention ("in_proj": the module is the attention and
    # the parameters are in_proj_weight/bias; "out_proj": the module is its out_proj),
    # captured by re-expressing the attention's forward (see ``attention``)
    attention: nn.MultiheadAttention | None = None
    role: str = ""
    # an Embedding and a Linear head tied to one weight are two layers of one *group*
    # (the Embedding's name): their factors are combined into one Kronecker product
    # (``factors._combine_group``), and the weight-gradient check sums over the group
    group: str = ""
    # the model's code shows that the parameters are used by these modules' own stock
    # forward only (:func:`_plain_uses`): the capture's weight-gradient check is skipped for
    # the layer as long as no forward hook could change the recorded output
    # (``capture._needs_check``)
    plain: bool = False

    @property
    def modules(self) -> tuple[nn.Module, ...]:
        """Every module whose calls are uses of this layer's parameters."""
        return (self.module, *self.tied)


_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[bool, tuple[tuple, list[KFACLayer],
                                                                dict[str, str]]]] = \
    weakref.WeakKeyDictionary()


def kfac_layers(model: nn.Module, strict: bool = True) -> list[KFACLayer]:
    """Every nn.Linear / Conv1d/2d/3d / Embedding whose weight or bias is trainable, in
    module order (tied modules of one type and configuration are one layer).

    A configuration whose factors would be wrong — a grouped convolution — raises a clear
    error naming the module, or, with ``strict=False``, is left out. A weight shared in a
    way K-FAC does not cover (see :func:`kfac_exclusions`) is always left out (the module's
    own untied bias stays covered): its parameter uses the preconditioner's fallback.

    The result is reused while the model's modules and parameters (identity,
    trainability) are unchanged: it is asked for on every preconditioner update, and
    finding it walks the module tree three times and traces the model's code.
    """
    return list(_cached(model, strict)[0])


def kfac_exclusions(model: nn.Module) -> dict[str, str]:
    """{module name: why} for the modules whose weight K-FAC leaves to the fallback
    because it is shared in a way not covered (an Embedding tied to a Linear head, a
    weight tied while the biases are not), with the way out in the reason."""
    return dict(_cached(model, False)[1])


def _used_outside_their_module(model: nn.Module, graph: Any) -> dict[int, str]:
    """{id(parameter): name} for parameters of Linear / Embedding / convolution modules that
    the model's code reads directly (an fx ``get_attr``, e.g. a decoder computing
    ``F.linear(z, self.enc.weight.t())``) besides calling the module: K-FAC's capture of
    the module cannot explain their gradient. Read from the code at build (no data, the
    ``graph`` of :func:`curvkit.passes.code_graph`); {} where fx cannot trace the forward
    (the capture's gradient check then says so)."""
    if graph is None:
        return {}
    params = dict(model.named_parameters())
    kinds = (nn.Linear, nn.Embedding, *CONV)
    owners = {f"{m_name}.{a}" if m_name else a: mod for m_name, mod in model.named_modules()
              for a, _ in mod.named_parameters(recurse=False)}
    out = {}
    for node in graph.nodes:
        owner = owners.get(node.target)
        # the root module's own forward is traced, not called: its reads are its own use
        if node.op == "get_attr" and node.target in params and isinstance(owner, kinds) \
                and owner is not model and not _metadata_only(node):
            out[id(params[node.target])] = node.target
    return out


#: what reading a tensor's attribute or calling one of these methods tells: its metadata only
_METADATA_ATTRS = frozenset({"dtype", "device", "shape", "ndim", "layout", "is_cuda",
                             "requires_grad"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "get_device"})


def _metadata_only(node: Any) -> bool:
    """True if every use of the fx ``node`` reads only metadata (``w.dtype``, ``w.shape``,
    ``w.size()``, …, e.g. ``mask(..., dtype=self.head.weight.dtype)``): no value of the
    parameter reaches the output, so its gradient is the module's alone."""
    users = list(node.users)
    return bool(users) and all(
        (u.op == "call_function" and u.target is builtins.getattr
         and u.args[0] is node and u.args[1] in _METADATA_ATTRS)
        or (u.op == "call_method" and u.target in _METADATA_METHODS and u.args[0] is node)
        for u in users)


def _cached(model: nn.Module, strict: bool) -> tuple[list[KFACLayer], dict[str, str]]:
    # the modules and their parameters (identity, trainability): a module swapped for
    # another, even one without parameters, may change what the code proves (``plain``)
    key = tuple((id(m), *((id(p), p.requires_grad) for p in m._parameters.values()
                          if p is not None)) for m in model.modules())
    cached = _LAYERS.setdefault(model, {}).get(strict)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    excluded: dict[str, str] = {}
    layers = _find_layers(model, strict, excluded)
    _LAYERS[model][strict] = (key, layers, excluded)
    return layers, excluded


def _find_layers(model: nn.Module, strict: bool, excluded: dict[str, str]
                 ) -> list[KFACLayer]:
    holders: dict[int, set[str]] = {}
    owners: dict[int, list[tuple[str, nn.Module]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod.named_parameters(recurse=False):
            holders.setdefault(id(p), set()).add(f"{mod_name}.{attr}" if mod_name else attr)
            if not any(m is mod for _, m in owners.get(id(p), [])):
                owners.setdefault(id(p), []).append((mod_name, mod))
    full_name = {id(p): n for n, p in model.named_parameters()}
    from curvkit import passes

    graph = passes.code_graph(model)
    outside = _used_outside_their_module(model, graph)
    layers: list[KFACLayer] = []
    seen: set[int] = set()
    attention_of: dict[int, nn.MultiheadAttention] = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention):
            found = _attention_layer(mod_name, mod, full_name, attention_of, seen, excluded)
            layers += [found] if found is not None else []
            continue
        if not isinstance(mod, (nn.Linear, nn.Embedding, *CONV)) or id(mod) in seen:
            continue
        pair = _tied_head(mod_name, mod, owners, holders, full_name)
        if pair:
            layers += pair
            seen.update(id(layer.module) for layer in pair)
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
        covered = ((weight,) if use_weight else ()) + ((bias,) if use_bias else ())
        tied: list[nn.Module] = []
        for p in covered:
            for other_name, other in owners.get(id(p), []):
                if other is mod or any(other is t for t in tied):
                    continue
                if _same_use(mod, other):
                    tied.append(other)
                    continue
                where = ", ".join(sorted(holders[id(p)]))
                excluded[mod_name] = (
                    f"module {label} holds a parameter shared by {where}, and module "
                    f"{other_name!r} ({type(other).__name__}) uses it in another way "
                    f"(another orientation, type or configuration, or other tied/untied "
                    f"parameters); K-FAC covers sharing between calls of one module and "
                    f"between modules of one type and configuration holding the same "
                    f"weight and bias. To precondition it with Kronecker factors, untie it "
                    f"(e.g. `{other_name}.weight = nn.Parameter({other_name}.weight"
                    f".detach().clone())`)")
        loose = [p for p in covered if id(p) in outside]
        if loose:
            names = ", ".join(outside[id(p)] for p in loose)
            excluded[mod_name] = (
                f"module {label}: the model's code uses {names} outside the module's own "
                f"forward (e.g. a decoder reusing it as F.linear(z, weight.t())), so the "
                f"module's inputs and output gradients do not explain its gradient. To "
                f"precondition it with Kronecker factors, call the module for every use, "
                f"or untie the other use (its own nn.Parameter)")
            tied = []
            use_weight &= id(weight) not in outside
            use_bias &= not isinstance(bias, nn.Parameter) or id(bias) not in outside
            if not use_weight and not use_bias:
                continue
        elif mod_name in excluded:  # the shared parameters fall back, an untied bias stays
            tied = []
            shared = {id(p) for p in ((weight,) if use_weight else ())
                      + ((bias,) if use_bias else ()) if len(holders.get(id(p), ())) > 1}
            use_weight &= id(weight) not in shared
            use_bias &= not isinstance(bias, nn.Parameter) or id(bias) not in shared
            if not use_weight and not use_bias:
                continue
        seen.update(id(t) for t in tied)
        if problem:
            if strict:
                raise ValueError(f"kronecker: module {label} {problem}")
            continue
        params = ((full_name[id(weight)],) if use_weight else ()) + \
            ((full_name[id(bias)],) if use_bias else ())
        mha = attention_of.get(id(mod))
        layers.append(KFACLayer(mod_name, mod, params, use_bias, use_weight,
                                transposed=isinstance(mod, nn.Embedding), tied=tuple(tied),
                                attention=mha, role="out_proj" if mha is not None else ""))
    plain = _plain_uses(model, graph, owners)
    for layer in layers:
        layer.plain = bool(plain) and layer.attention is None and not layer.group \
            and all(id(m) in plain for m in layer.modules)
    return layers


# the forward of each stock layer type: a subclass (or an instance) with another forward
# is not proven plain
_STOCK_FORWARD = {nn.Linear: nn.Linear.forward, nn.Conv1d: nn.Conv1d.forward,
                  nn.Conv2d: nn.Conv2d.forward, nn.Conv3d: nn.Conv3d.forward,
                  nn.Embedding: nn.Embedding.forward}


def _plain_uses(model: nn.Module, graph: Any,
                owners: dict[int, list[tuple[str, nn.Module]]]) -> set[int]:
    """{id(module)} of the stock Linear / Conv / Embedding modules whose parameters the
    model's code (the fx ``graph`` of :func:`curvkit.passes.code_graph`, every submodule a
    leaf) provably uses only by calling the module: the module is called from the traced
    code (a ``call_module`` node), no module that contains it is called (a leaf's code is
    not read), its parameters are read nowhere (no ``get_attr``) and held by no other
    module, its type is exactly the stock class with its own forward, and every other leaf
    the code calls is one of torch.nn's own modules (which use only their own parameters)
    and every function it calls one of torch's or Python's. Then the captured inputs and
    output gradients explain the parameters' gradient by construction, and the capture's
    runtime check of that (:func:`capture._weight_grad_mismatch`) can be skipped. Empty
    where fx cannot trace the forward or anything above does not hold for the code as a
    whole: the runtime check stays."""
    if graph is None:
        return set()
    mods = dict(model.named_modules(remove_duplicate=False))
    called: set[str] = set()
    for node in graph.nodes:
        if node.op == "call_module":
            leaf = mods.get(node.target)
            if leaf is None or not type(leaf).__module__.startswith("torch.nn."):
                return set()  # a module of the user's whose code fx did not read
            called.add(node.target)
        elif node.op == "call_function":
            where = getattr(node.target, "__module__", None) or ""
            if not where.startswith(("torch", "_operator", "operator", "builtins", "math")):
                return set()  # a wrapped function of the user's
    read = {node.target for node in graph.nodes
            if node.op == "get_attr" and not _metadata_only(node)}
    out: set[int] = set()
    for path, mod in mods.items():
        if type(mod) not in _STOCK_FORWARD or "forward" in vars(mod) or not path:
            continue
        paths = [p for p, m in mods.items() if m is mod]
        if not any(p in called for p in paths):
            continue
        # a called module that contains it (through any of its paths): a leaf, unread
        if any(c != p and p.startswith(c + ".") for c in called for p in paths):
            continue
        names = [f"{p}.{a}" for p in paths for a, _ in mod.named_parameters(recurse=False)]
        if any(n in read for n in names):
            continue
        if any(len(owners.get(id(t), ())) > 1 for _, t in mod.named_parameters(recurse=False)):
            continue
        out.add(id(mod))
    return out


def _attention_layer(name: str, mha: nn.MultiheadAttention, full_name: dict[int, str],
                     attention_of: dict[int, nn.MultiheadAttention], seen: set[int],
                     excluded: dict[str, str]) -> KFACLayer | None:
    """The in_proj layer of ``mha`` (None if not trainable or not capturable); marks its
    out_proj for the attention handler, or, if the attention cannot be captured, leaves
    both projections out with the reason in ``excluded``."""
    from curvkit.estimators.kfac.attention import unsupported
    why = unsupported(mha)
    if why:
        seen.add(id(mha.out_proj))
        excluded[name] = (f"module {name or '<model>'} (MultiheadAttention) {why}; K-FAC "
                          f"covers its projections only without these, so they use the "
                          f"fallback")
        return None
    attention_of[id(mha.out_proj)] = mha
    W, b = mha.in_proj_weight, mha.in_proj_bias
    use_w = isinstance(W, nn.Parameter) and W.requires_grad
    use_b = isinstance(b, nn.Parameter) and b.requires_grad
    if not use_w and not use_b:
        return None
    params = ((full_name[id(W)],) if use_w else ()) + ((full_name[id(b)],) if use_b else ())
    return KFACLayer(name, mha, params, use_b, use_w, attention=mha, role="in_proj")


def _weight(layer: KFACLayer) -> Tensor:
    """The layer's weight tensor (in_proj_weight for an attention's input projection)."""
    return layer.module.in_proj_weight if layer.role == "in_proj" else layer.module.weight


def _bias(layer: KFACLayer) -> Tensor:
    return layer.module.in_proj_bias if layer.role == "in_proj" else layer.module.bias


def _tied_head(name: str, mod: nn.Module, owners: dict[int, list[tuple[str, nn.Module]]],
               holders: dict[int, set[str]], full_name: dict[int, str]) -> list[KFACLayer]:
    """The two layers of an Embedding tied to a Linear head (the same trainable weight, held
    by these two modules only; a plain lookup; the Linear's bias its own), in module order,
    of one group named after the Embedding; [] for anything else."""
    W = mod.weight
    if not (isinstance(W, nn.Parameter) and W.requires_grad):
        return []
    users = owners.get(id(W), [])
    if len(users) != 2 or len(holders[id(W)]) != 2:
        return []
    emb = next(((n, m) for n, m in users if type(m) is nn.Embedding), None)
    lin = next(((n, m) for n, m in users if type(m) is nn.Linear), None)
    if emb is None or lin is None or lin[1].weight is not W:
        return []
    e = emb[1]
    if e.max_norm is not None or e.sparse or e.scale_grad_by_freq:
        return []
    b = lin[1].bias
    use_b = isinstance(b, nn.Parameter) and b.requires_grad
    if use_b and len(holders.get(id(b), ())) > 1:
        return []
    w = full_name[id(W)]
    out = {emb[0]: KFACLayer(emb[0], e, (w,), False, True, transposed=True, group=emb[0]),
           lin[0]: KFACLayer(lin[0], lin[1], (w, full_name[id(b)]) if use_b else (w,), use_b,
                             True, group=emb[0])}
    first = name if name in out else emb[0]
    return [out[first], *(v for k, v in out.items() if k != first)]


def _same_use(mod: nn.Module, other: nn.Module) -> bool:
    """True if ``other`` is a further use of ``mod``'s parameters: the same type and
    configuration (``extra_repr``), holding exactly the same weight and bias."""
    if type(mod) is not type(other) or mod.extra_repr() != other.extra_repr():
        return False
    return all(getattr(mod, a, None) is getattr(other, a, None) for a in ("weight", "bias"))


def _label(layer: KFACLayer) -> str:
    return f"{layer.name or '<model>'} ({type(layer.module).__name__})"


def _layer_inputs(layer: KFACLayer, x: Tensor) -> Tensor:
    """(N, T, d_in): the layer's inputs per sample and weight-sharing position (the bias'
    constant 1 is not appended: it is accounted for in closed form, saving a copy)."""
    mod = layer.module
    if layer.attention is not None:  # recorded batch-first (N, L, E) by the handler
        a = x
    elif isinstance(mod, CONV):
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
    the order of the weight's flattening (C_in, k₁, …).

    Read through strided views of the (padded) input — windows of the dilated kernel
    extent at the stride, then every d-th entry — and copied once into a buffer laid out
    (C_in·∏k, N, T), returned as its (N, T, D) view: rows ã_{n,t} then merge into the
    (N·T, D) view that the factor's product reads in place (no second copy), and the copy
    costs a quarter of ``F.unfold``'s (im2col) on small images."""
    mod = layer.module
    nd = mod.weight.ndim - 2
    if x.ndim != nd + 2:
        raise ValueError(f"kronecker: module {_label(layer)} got input of shape "
                         f"{tuple(x.shape)}; a batched (N, C, {nd} spatial) input is required")
    pad = mod._reversed_padding_repeated_twice
    if any(pad):
        mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
        x = F.pad(x, pad, mode=mode)
    k, d, st = tuple(mod.kernel_size), tuple(mod.dilation), tuple(mod.stride)
    p = x
    for i in range(nd):  # windows of the dilated kernel extent, then every d-th entry
        p = p.unfold(2 + i, (k[i] - 1) * d[i] + 1, st[i])
    if any(di != 1 for di in d):
        p = p[(..., *(slice(None, None, di) for di in d))]  # (N, C, out₁…, k₁…)
    N, C = p.shape[:2]
    # (C, k₁…, N, out₁…): one strided copy
    buf = p.permute(1, *range(2 + nd, 2 + 2 * nd), 0, *range(2, 2 + nd)).contiguous()
    D = C * math.prod(k)
    return buf.view(D, N, -1).permute(1, 2, 0)


def _input_factor(a: Tensor, bias: bool, count: float) -> Tensor:
    """Σ_{n,t} ã_{n,t} ã_{n,t}ᵀ / count for the inputs a (N, T, D), ã = [a, 1] if ``bias``.

    One product over the rows (N·T, D), read in place where a's layout allows (a Linear's
    inputs; a convolution's patches, stored (D, N, T) by :func:`_conv_patches`), with the
    bias row and column from their sums and 1/count inside the product."""
    N, T, D = a.shape
    r = a.reshape(N * T, D)
    if not bias:
        return (r.T @ r).div_(count)
    A = a.new_empty(D + 1, D + 1)
    top = A[:D, :D]
    torch.addmm(top, r.T, r, beta=0, alpha=1.0 / count, out=top)
    s = r.sum(0).div_(count)
    A[:D, D] = s
    A[D, :D] = s
    A[D, D] = N * T / count
    return A


def _gram(x: Tensor) -> Tensor:
    """Σ_r x_r x_rᵀ over all leading dims of x (…, D), in the layout x is stored in: where
    the next-to-last dim is innermost in memory (a convolution's output gradients, positions
    contiguous), x is copied once to (D, R) keeping those runs contiguous."""
    D = x.shape[-1]
    if x.ndim > 2 and x.shape[-2] > 1 and D > 1 and x.stride(-2) == 1:
        m = x.movedim(-1, 0).reshape(D, -1)
        return m @ m.T
    m = x.reshape(-1, D)
    return m.T @ m


def _layer_output_grads(layer: KFACLayer, g: Tensor) -> Tensor:
    """(K, N, T, d_out) from gradients (K, *output shape) w.r.t. the layer output."""
    if layer.attention is not None:  # recorded sequence-first (K, L, N, d_out)
        return g.transpose(1, 2)
    if isinstance(layer.module, CONV):
        return g.flatten(3).transpose(2, 3)
    return g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1])


def _layer_params(layer: KFACLayer) -> list[Tensor]:
    return ([_weight(layer)] if layer.weight else []) + ([_bias(layer)] if layer.bias else [])
