"""K-FAC handler for ``nn.MultiheadAttention``'s projections.

MultiheadAttention calls ``F.multi_head_attention_forward`` with its parameters; inside it
the packed input projection (``in_proj_weight`` (3E, E), ``in_proj_bias``) and the output
projection (``out_proj.weight``, ``out_proj.bias``, the weights of a Linear module whose own
forward never runs) are applied with ``F.linear``, where no module hook sees them. Both are
plain Linear maps, so their K-FAC factors are the standard ones once their inputs and output
gradients are captured:

* in_proj, for self-attention (query, key and value the same tensor): one Linear use,
  P = x W_inᵀ + b_in (N, L, 3E) on the layer input x (N, L, E), positions = the L tokens;
* out_proj: one Linear use on the concatenated heads z (N, L, E), positions = the L tokens.

A forward hook replaces the module's output by the same function written with these two
uses explicit (:func:`recompute`): P = F.linear(x, W_in, b_in) and its chunks q, k, v are
passed to ``F.multi_head_attention_forward`` with identity projections (exact: x·1 + 0),
whose output z is then mapped by F.linear(z, W_o, b_o). The attention itself (masks, causal
flag, need_weights, the SDPA or explicit kernel) is torch's own code with the caller's
arguments, and the projections are applied to the same operands in the same layout as
torch applies them, so the output and every parameter gradient are bitwise those of the
module (tested) — which is why the optimizer's own pass may run through it (``observe``,
for ``ef``'s fused statistics). The module's original forward still runs first and its
output is discarded (a forward hook cannot skip it): a captured attention costs two
forwards (one backward).

Not covered, left to the fallback (one warning when the optimizer is built, from
:func:`unsupported`): separate q/k/v weights (``kdim``/``vdim`` ≠ ``embed_dim``),
``bias_k``/``bias_v``, ``add_zero_attn``, attention dropout > 0 (a second forward would draw
a second mask). At run time: in_proj for cross-attention (query, key, value not the same
tensor: the three row blocks of one weight see three inputs, not one Kronecker product; the
out_proj is still covered) and unbatched inputs (both left out, the generic warning).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def unsupported(mha: nn.MultiheadAttention) -> str:
    """'' if the projections of ``mha`` can be captured, else why not."""
    if not mha._qkv_same_embed_dim:
        return "has separate q/k/v projection weights (kdim or vdim differs from embed_dim)"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "has bias_k/bias_v or add_zero_attn"
    if mha.dropout > 0.0:
        return (f"has attention dropout {mha.dropout} (the capture would draw a second "
                f"dropout mask)")
    return ""


def recompute(mha: nn.MultiheadAttention, args: tuple, kwargs: dict,
              record: Callable[[str, Tensor, Tensor], None]) -> Any:
    """The module's output, computed with its two projections as explicit Linear uses;
    ``record(which, inputs, output)`` is called with ``which`` = "in_proj" (self-attention
    only) and "out_proj", the inputs batch-first (N, L, E), the outputs sequence-first
    (L, N, ·) (see ``layers._layer_output_grads``). Returns None (the original output
    stands, nothing recorded) where the projections cannot be captured."""
    bound = _SIGNATURE.bind(mha, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    query, key, value = a["query"], a["key"], a["value"]
    if unsupported(mha) or query.dim() != 3 or getattr(query, "is_nested", False):
        return None
    E = mha.embed_dim
    W, b = mha.in_proj_weight, mha.in_proj_bias
    eye = torch.eye(E, dtype=W.dtype, device=W.device)
    self_attention = query is key and key is value

    def seq_first(t: Tensor) -> Tensor:
        return t.transpose(0, 1) if mha.batch_first else t

    # the projections run on the sequence-first layout, exactly as torch's own code applies
    # them (same operands, same row order): outputs and gradients are bitwise those of the
    # module, so the optimizer's own pass can run through this function (``observe``)
    if self_attention:
        x = seq_first(query)                                    # (L, N, E)
        P = F.linear(x, W, b)                                   # (L, N, 3E)
        record("in_proj", x.transpose(0, 1), P)
        q, k, v = P.chunk(3, dim=-1)
    else:
        bq, bk, bv = (None,) * 3 if b is None else b.chunk(3)
        Wq, Wk, Wv = W.chunk(3)
        q, k, v = (F.linear(seq_first(t), w, bb)
                   for t, w, bb in ((query, Wq, bq), (key, Wk, bk), (value, Wv, bv)))
    zeros = eye.new_zeros(3 * E)
    z, weights = F.multi_head_attention_forward(
        q, k, v, E, mha.num_heads, torch.cat([eye, eye, eye]), zeros, None, None, False,
        0.0, eye, zeros[:E], training=mha.training, key_padding_mask=a["key_padding_mask"],
        need_weights=a["need_weights"], attn_mask=a["attn_mask"],
        average_attn_weights=a["average_attn_weights"], is_causal=a["is_causal"])
    out = F.linear(z, mha.out_proj.weight, mha.out_proj.bias)  # (L, N, E)
    record("out_proj", z.transpose(0, 1), out)
    # downstream gets a copy: an in-place op on it leaves the recorded output intact
    return (out.transpose(0, 1) if mha.batch_first else out).clone(), weights


Recorder = Callable[[str, Tensor, Tensor], None]
# one output-replacing hook per attention module, shared by every capture attached to it
# (an own capture pass while an observation of the optimizer is open): two hooks that each
# replaced the output would leave the first one's records outside the graph
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, list[Recorder]]] = \
    weakref.WeakKeyDictionary()


class _Attachment:
    """Handle of :func:`attach`; ``remove()`` detaches the recorder (and the hook with the
    last one)."""

    def __init__(self, mha: nn.Module, record: Recorder) -> None:
        self.mha, self.record = mha, record

    def remove(self) -> None:
        entry = _ATTACHED.get(self.mha)
        if entry is None:
            return
        handle, recorders = entry
        if any(r is self.record for r in recorders):
            recorders.remove(self.record)
        if not recorders:
            handle.remove()
            del _ATTACHED[self.mha]


def attach(mha: nn.MultiheadAttention, record: Recorder) -> _Attachment:
    """Capture ``mha``'s projections into ``record`` (see :func:`recompute`) on each call
    until the returned handle is removed."""
    entry = _ATTACHED.get(mha)
    if entry is None:
        recorders: list[Recorder] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not recorders:
                return None

            def every(role: str, x: Tensor, out: Tensor) -> None:
                for r in list(recorders):
                    r(role, x, out)

            return recompute(module, args, kwargs, every)  # None keeps the output

        entry = (mha.register_forward_hook(hook, with_kwargs=True), recorders)
        _ATTACHED[mha] = entry
    entry[1].append(record)
    return _Attachment(mha, record)


__all__ = ["attach", "recompute", "unsupported"]
