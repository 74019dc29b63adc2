"""The reduced problem of ``varpro``: θ with the final layer eliminated, and its operators.

:class:`Split` says how a model separates: which trainable parameters are the final layer
W̃ = [W | b] (by identity, so tied or shared weights are seen) and which are θ, and maps
θ to the layer's input features φ_θ(X) through a copy of the model in which the final
layer stops the forward pass and hands back its input. The model output may be a
rearrangement of that layer's output (a sequence head's (N, L, V) logits returned as
(N, V, L)): :func:`output_permutation` recognizes it, and the head applies it. Feature
passes run through :func:`curvkit.passes.forward` (buffers copied, so BatchNorm running
statistics advance once per optimizer step, in the optimizer's own pass; the random state
of the enclosing :func:`curvkit.passes.rng_scope` replayed, so the step's dropout mask).
:class:`Point` is everything known at one θ after the inner solve;
:class:`ReducedGaussNewton` is GNvpro's reduced Gauss-Newton matrix at a point as an
operator on θ-directions, the curvature the outer trust-region loop drives.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvkit import passes
from curvkit.solvers._varpro_inner import F64, Head


class _Features(Exception):
    """Carries the final layer's input out of the feature model's forward pass."""

    def __init__(self, phi: Tensor) -> None:
        super().__init__("features")
        self.phi = phi


class Stop(nn.Module):
    """Stands in for the final layer in the feature model: ends the forward pass with its
    input φ (what the model does after the final layer is not part of the features, and
    would not even run on φ's shape)."""

    def forward(self, x: Tensor) -> Tensor:
        raise _Features(x)


def output_permutation(out: Tensor, head_out: Tensor) -> Tensor | None | bool:
    """How the model output ``out`` rearranges the final layer's output ``head_out``: None
    when it is that tensor, an index tensor ``idx`` with ``out = head_out.reshape(-1)[idx]``
    when ``out`` is a view of it holding every element once (transpose, permute, view,
    flatten, …), False otherwise."""
    if out is head_out:
        return None
    if not (isinstance(out, Tensor) and out.numel() == head_out.numel()
            and head_out.is_contiguous()
            and out.untyped_storage().data_ptr() == head_out.untyped_storage().data_ptr()):
        return False
    n = head_out.numel()
    offset = out.storage_offset() - head_out.storage_offset()
    try:
        idx = torch.arange(n, device=out.device).as_strided(out.shape, out.stride(), offset)
    except RuntimeError:
        return False
    if not torch.equal(idx.reshape(-1).sort().values, torch.arange(n, device=out.device)):
        return False
    return idx.clone()


@dataclass
class Split:
    """The separation θ | W̃ of a model's trainable parameters at its final layer."""

    model: nn.Module
    layer_name: str                 # '' = the model itself is the final layer
    w_idx: int                      # index of W among the trainable parameters
    b_idx: int | None               # index of a trainable bias, else None
    theta_idx: list[int]
    theta_names: list[str]
    d: int                          # out_features
    k_in: int                       # in_features
    offset: Tensor | None           # a frozen bias, added to the outputs
    fmodel: nn.Module | None = None
    perm: Tensor | None = None       # model output = head output.reshape(-1)[perm]

    @classmethod
    def build(cls, model: nn.Module, layer_name: str, params: Sequence[nn.Parameter],
              names: Sequence[str], perm: Tensor | None = None) -> Split:
        layer = model.get_submodule(layer_name) if layer_name else model
        index = {id(p): i for i, p in enumerate(params)}
        w_idx = index[id(layer.weight)]
        b_idx = index.get(id(layer.bias)) if layer.bias is not None else None
        theta_idx = [i for i in range(len(params)) if i not in (w_idx, b_idx)]
        offset = layer.bias.detach() if layer.bias is not None and b_idx is None else None
        return cls(model, layer_name, w_idx, b_idx, theta_idx, [names[i] for i in theta_idx],
                   layer.out_features, layer.in_features, offset,
                   _feature_model(model, layer_name), perm)

    # ------------------------------------------------------------------ parameters
    def W_of(self, params: Sequence[Tensor]) -> Tensor:
        """Current W̃ = [W | b] of the model (float64, d × k)."""
        W = params[self.w_idx].detach().to(F64)
        if self.b_idx is not None:
            W = torch.cat([W, params[self.b_idx].detach().to(F64)[:, None]], 1)
        return W

    def split_W(self, W: Tensor, like: Sequence[Tensor]) -> dict[int, Tensor]:
        out = {self.w_idx: W[:, :self.k_in].to(like[self.w_idx].dtype)}
        if self.b_idx is not None:
            out[self.b_idx] = W[:, -1].to(like[self.b_idx].dtype)
        return out

    def theta_of(self, params: Sequence[Tensor]) -> list[Tensor]:
        return [params[i].detach() for i in self.theta_idx]

    def is_current(self, W: Tensor, params: Sequence[Tensor]) -> bool:
        """Whether the model's W̃ equals ``W`` up to the rounding of writing it back
        (θ unchanged, so the optimizer's gradient is the reduced gradient)."""
        for i, t in self.split_W(W, params).items():
            p = params[i].detach()
            tol = 4 * torch.finfo(p.dtype).eps * float(p.abs().max()) if p.numel() else 0.0
            if not bool(((t - p).abs() <= tol).all()):
                return False
        return True

    # ------------------------------------------------------------------ features
    def features(self, theta: Sequence[Tensor], X: Any) -> Tensor:
        """φ_θ(X): the input of the final layer, through :func:`curvkit.passes.forward`
        (buffer copies, the enclosing scope's random state) under
        :func:`curvkit.passes.differentiable`."""
        if self.fmodel is None:
            return X
        for mine, theirs in zip(self.fmodel.modules(), self.model.modules()):
            mine.training = theirs.training  # follow model.train() / model.eval()
        try:
            # differentiable: the features' JVP (forward mode) and VJP are taken through
            # this pass (attention on the math kernel, normalizations decomposed)
            with passes.differentiable():
                passes.forward(self.fmodel, X, dict(zip(self.theta_names, theta)))
        except _Features as stop:
            return stop.phi
        raise RuntimeError(f"varpro: the final layer {self.layer_name!r} did not run in the "
                           f"forward pass")


def _feature_model(model: nn.Module, layer_name: str) -> nn.Module | None:
    """A copy of the model sharing its parameters and buffers, with the final layer replaced
    by :class:`Stop` (so a forward pass ends with the features φ). The user's model is
    untouched; hooks are not copied (they would see a different module)."""
    if not layer_name:
        return None
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    fmodel = copy.deepcopy(model, memo)
    for m in fmodel.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                      "_backward_pre_hooks"):
            d = getattr(m, hooks, None)
            if d is not None:
                d.clear()
    parent_name, _, attr = layer_name.rpartition(".")
    setattr(fmodel.get_submodule(parent_name) if parent_name else fmodel, attr, Stop())
    return fmodel


class Linearized:
    """φ_θ(X) at one θ with its autograd graph, for any number of products at that point:
    a VJP Jᵀξ is one backward; a JVP J v is one backward through the graph of Jᵀu
    (J v = ∂⟨Jᵀu, v⟩/∂u, u = 0, built once). Plain autograd, not torch.func: models whose
    kernels torch.func cannot transform (recurrent modules on packed sequences) work, and
    the JVPs reuse the point's forward pass instead of running one each."""

    def __init__(self, split: Split, theta: Sequence[Tensor], X: Any) -> None:
        self.theta = [t.detach().requires_grad_() for t in theta]
        with torch.enable_grad():
            self.feats = split.features(self.theta, X)
        self._dual: tuple[Tensor, list[Tensor | None]] | None = None  # (u, Jᵀu)

    def vjp(self, xi: Tensor) -> list[Tensor]:
        """Jᵀξ, one tensor per θ (zero for a θ the features do not use)."""
        if not self.feats.requires_grad:
            return [torch.zeros_like(t) for t in self.theta]
        grads = torch.autograd.grad(self.feats, self.theta, xi, retain_graph=True,
                                    allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(self.theta, grads)]

    def jvp(self, v: Sequence[Tensor]) -> Tensor:
        """J v in the features' shape."""
        if self._dual is None:
            with torch.enable_grad():
                u = torch.zeros_like(self.feats, requires_grad=True)
                g = list(torch.autograd.grad(self.feats, self.theta, u, create_graph=True,
                                             allow_unused=True)) \
                    if self.feats.requires_grad else [None] * len(self.theta)
            self._dual = (u, g)
        u, g = self._dual
        pairs = [(gi, vi.to(gi.dtype)) for gi, vi in zip(g, v)
                 if gi is not None and gi.requires_grad]
        if not pairs:
            return torch.zeros_like(self.feats)
        out = torch.autograd.grad([a for a, _ in pairs], u, [b for _, b in pairs],
                                  retain_graph=True, allow_unused=True)[0]
        return torch.zeros_like(self.feats) if out is None else out


@dataclass
class Point:
    """Everything known at one θ on one batch after the inner solve."""

    theta: list[Tensor]
    head: Head
    W: Tensor                       # W̃(θ), float64 (d × k)
    g_o: Tensor                     # ∇_o ℓ at o(W̃(θ)), this rank
    hl: Callable[[Tensor], Tensor]  # u ↦ H_ℓ u at o(W̃(θ)), this rank
    solve_H: Callable[[Tensor], Tensor]  # U ↦ (∇²_W̃ F)⁻¹ U
    loss: float                     # F(θ) = L(θ, W̃(θ)) + reg
    inner_grad_norm: float = 0.0    # ‖∇_W̃F‖ at the inner solution (0 up to the solve's accuracy)
    X: Any = None                   # the batch input (for JVPs of the features)
    lin: Linearized | None = None   # the features with their graph at θ
    counts: dict[str, int] = field(default_factory=dict)


class ReducedGaussNewton:
    """GNvpro's reduced Gauss-Newton matrix at a :class:`Point`, as an operator on θ.

    For the reduced model o(θ) = W̃(θ)[φ_θ; 1] with the implicit Jacobian
    dW̃/dθ = −(∇²_W̃F)⁻¹ ∂_θ∇_W̃F,

        Ĝ = J_redᵀ H_ℓ J_red + alpha·(dW̃/dθ)ᵀ D (dW̃/dθ),   J_red = ∂_θo + ∂_W̃o · dW̃/dθ,

    applied matrix-free: one JVP and one VJP through the feature extractor (both on the
    point's one graph, :class:`Linearized`) and two solves with ∇²_W̃F per product
    (:meth:`matvec`). Also the reduced gradient and dW̃/dθ · v.
    """

    def __init__(self, split: Split, pt: Point) -> None:
        self.split = split
        self.pt = pt

    def _linearized(self) -> Linearized:
        """The features at θ with their graph (one more forward pass if not kept)."""
        pt = self.pt
        if pt.lin is None:
            pt.lin = Linearized(self.split, pt.theta, pt.X)
            pt.counts["forward"] = pt.counts.get("forward", 0) + 1
        return pt.lin

    def pullback(self, xi: Tensor) -> list[Tensor]:
        """red(J_φᵀ Ξ) for a feature cotangent Ξ (R × k, float64; bias column dropped)."""
        pt = self.pt
        xi = xi[:, :self.split.k_in].reshape(pt.head.feat_shape).to(pt.head.feat_dtype)
        out = self._linearized().vjp(xi)
        pt.counts["vjp"] = pt.counts.get("vjp", 0) + 1
        return pt.head.red([t.detach() for t in out])

    def gradient(self) -> list[Tensor]:
        """∇_θF(θ) = J_φᵀ(∇_o ℓ · W̃) at W̃(θ) — the reduced gradient."""
        return self.pullback(self.pt.head.rows(self.pt.g_o) @ self.pt.W)

    def _mixed(self, dZ: Tensor) -> Tensor:
        """∂_θ∇_W̃F · v given dZ = dφ·v (R × k): red((H_ℓ[dZ W̃ᵀ])ᵀ Z + ∇_oℓᵀ dZ)."""
        pt, h = self.pt, self.pt.head
        Hdo = h.rows(pt.hl((dZ @ pt.W.T).reshape(h.out_shape)))
        return h.red([Hdo.T @ h.Z + h.rows(pt.g_o).T @ dZ])[0]

    def _tangent(self, v: Sequence[Tensor]) -> Tensor:
        """dZ = (∂φ/∂θ) v as R × k (zero bias column), float64."""
        pt, h = self.pt, self.pt.head
        lin = self._linearized()
        if lin._dual is None:  # the graph of Jᵀu is built by one more backward pass
            pt.counts["vjp"] = pt.counts.get("vjp", 0) + 1
        dfeat = lin.jvp(v)
        pt.counts["jvp"] = pt.counts.get("jvp", 0) + 1
        dZ = dfeat.detach().to(F64).reshape(-1, self.split.k_in)
        if h.Z.shape[1] > self.split.k_in:
            dZ = torch.cat([dZ, dZ.new_zeros(dZ.shape[0], 1)], 1)
        return dZ

    def jacobian(self, v: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(dZ, dW̃) with dW̃ = (dW̃/dθ) v = −(∇²_W̃F)⁻¹ ∂_θ∇_W̃F v."""
        dZ = self._tangent(v)
        return dZ, -self.pt.solve_H(self._mixed(dZ))

    def matvec(self, v: Sequence[Tensor]) -> list[Tensor]:
        """Ĝv, matrix-free. J_red v = dZ W̃ᵀ + Z dW̃ᵀ; with u = H_ℓ J_red v and
        s = (∇²_W̃F)⁻¹(red(uᵀZ) + alpha D dW̃), Ĝv = J_φᵀ[u W̃ − (H_ℓ[Z sᵀ] W̃ + ∇_oℓ s)]
        (the second term is −(∂_θ∇_W̃F)ᵀ s)."""
        pt, h = self.pt, self.pt.head
        dZ, dW = self.jacobian(v)
        u = h.rows(pt.hl(((dZ @ pt.W.T) + (h.Z @ dW.T)).reshape(h.out_shape)))
        w = h.red([u.T @ h.Z])[0] + h.alpha * h.mask * dW
        s = pt.solve_H(w)
        Hs = h.rows(pt.hl(h.lin(s)))
        xi = u @ pt.W - (Hs @ pt.W + h.rows(pt.g_o) @ s)
        return self.pullback(xi)
