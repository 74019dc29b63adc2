"""The inner problem of ``varpro``: the final layer W̃ = [W | b] for fixed features, in float64.

:class:`Head` is the final layer as a function of W̃; :func:`least_squares` solves the ridge
least-squares problem in closed form (``nn.MSELoss``), :func:`newton` any other loss by a
Newton-Krylov trust region whose radius follows the shared rule
(:func:`curvkit.solvers._krylov.update_radius` with :data:`INNER`), and :func:`cg_solver`
applies (∇²_W̃F)⁻¹ for the implicit Jacobian. Nothing here touches model parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad, vjp

from curvkit import distributed
from curvkit.errors import StepError
from curvkit.solvers import _krylov as K

F64 = torch.float64

# The inner trust region: N&W Alg. 4.1 with the shared defaults (eta, thresholds, factors)
# and an effectively unbounded radius (the inner problem is small and well scaled).
INNER = K.TrustRegionOptions(initial_radius=1.0, max_radius=1e10)


class Head:
    """The final layer as a function of W̃ for fixed features, in float64.

    Z = [φ | 1] (R × k: R = rows = samples × any extra leading dims, k = in_features + 1 if
    the bias is trainable, else in_features), W̃ = [W | b] (d × k), outputs o = Z W̃ᵀ (+ a
    frozen bias) in the final layer's output shape (*feats.shape[:-1], d). The model output
    is o, or P(o) = o.reshape(-1)[perm] when the model returns a rearranged view of the
    layer's output (e.g. (N, L, V) logits returned as (N, V, L)). The objective of the
    inner problem is

        F(W̃) = L(P(o(W̃)), y) + (alpha/2) ‖mask ⊙ W̃‖²

    with L the loss under its reduction over all ranks (per-rank values are combined with
    the count-weighted mean) and mask the regularized columns.
    """

    def __init__(self, feats: Tensor, y: Tensor, loss64: Callable, reduction: str,
                 count: int, d: int, bias_col: bool, offset: Tensor | None, mask: Tensor,
                 alpha: float, perm: Tensor | None = None) -> None:
        self.feat_shape = feats.shape
        self.feat_dtype = feats.dtype
        k_in = feats.shape[-1]
        Z = feats.detach().to(F64).reshape(-1, k_in)
        if bias_col:
            Z = torch.cat([Z, torch.ones(Z.shape[0], 1, dtype=F64, device=Z.device)], 1)
        self.Z = Z
        self.k_in = k_in
        self.d = d
        self.out_shape = (*feats.shape[:-1], d)
        self.perm = perm
        self.model_shape = self.out_shape if perm is None else tuple(perm.shape)
        self.y = y.to(F64) if y.is_floating_point() else y
        self.loss64 = loss64
        self.reduction = reduction
        self.count = count
        self.offset = offset
        self.mask = mask
        self.alpha = alpha
        self.hvps = 0

    def red(self, values: Sequence[Tensor]) -> list[Tensor]:
        return distributed.weighted_mean(list(values), self.count, self.reduction)

    def rows(self, t: Tensor) -> Tensor:
        return t.reshape(-1, self.d)

    def lin(self, V: Tensor) -> Tensor:
        """Z Vᵀ in the output's shape (the linear part of o, no bias offset)."""
        return (self.Z @ V.T).reshape(self.out_shape)

    def outputs(self, W: Tensor) -> Tensor:
        o = self.Z @ W.T
        if self.offset is not None:
            o = o + self.offset
        return o.reshape(self.out_shape)

    def to_model(self, o: Tensor) -> Tensor:
        """P(o): the final layer's output as the model returns it."""
        return o if self.perm is None else o.reshape(-1)[self.perm]

    def targets(self) -> Tensor:
        """The targets in the final layer's output layout (y = P(y_layer)), for losses that
        pair outputs and targets elementwise."""
        if self.perm is None:
            return self.y
        inverse = torch.empty_like(self.perm.reshape(-1))
        inverse[self.perm.reshape(-1)] = torch.arange(inverse.numel(), device=inverse.device)
        return self.y.reshape(-1)[inverse].reshape(self.out_shape)

    def local_loss(self, o: Tensor) -> Tensor:
        return self.loss64(self.to_model(o), self.y)

    def reg(self, W: Tensor) -> float:
        return 0.5 * self.alpha * float(((self.mask * W) ** 2).sum()) if self.alpha else 0.0

    def loss(self, W: Tensor) -> float:
        """F(W̃) (reduced over ranks, regularizer included)."""
        with torch.no_grad():
            value = self.red([self.local_loss(self.outputs(W)).detach()])[0]
        return float(value) + self.reg(W)

    def linearize(self, W: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """(∇_o ℓ, u ↦ H_ℓ u) at o(W̃), both for this rank's loss (reverse-over-reverse:
        forward-over-reverse fails on MSELoss' backward)."""
        g_o, pull = vjp(grad(self.local_loss), self.outputs(W))
        return g_o.detach(), lambda u: pull(u.to(F64))[0].detach()

    def grad_W(self, W: Tensor, g_o: Tensor) -> Tensor:
        """∇_W̃ F = red(∇_o ℓᵀ Z) + alpha·mask⊙W̃   (d × k)."""
        return self.red([self.rows(g_o).T @ self.Z])[0] + self.alpha * self.mask * W

    def hvp_W(self, hl: Callable[[Tensor], Tensor], V: Tensor) -> Tensor:
        """∇²_W̃ F [V] = red((H_ℓ [Z Vᵀ])ᵀ Z) + alpha·mask⊙V (exact: o is linear in W̃)."""
        self.hvps += 1
        return self.red([self.rows(hl(self.lin(V))).T @ self.Z])[0] + self.alpha * self.mask * V


class SymPinv:
    """A⁺ for a symmetric positive semi-definite k × k matrix A, applied as B ↦ A⁺B.

    From a Cholesky factor, or from an eigendecomposition / the SVD of a factor F with
    A = FᵀF (small singular values cut off at k·eps·σ_max, numpy's pinv rule).
    """

    def __init__(self, chol: Tensor | None = None, V: Tensor | None = None,
                 inv_sq: Tensor | None = None) -> None:
        self.chol, self.V, self.inv_sq = chol, V, inv_sq

    def __call__(self, B: Tensor) -> Tensor:
        if self.chol is not None:
            return torch.cholesky_solve(B, self.chol)
        return self.V @ (self.inv_sq[:, None] * (self.V.T @ B))

    @staticmethod
    def eigh(A: Tensor) -> SymPinv:
        lam, V = torch.linalg.eigh(A)
        cut = lam.abs().max() * A.shape[0] * torch.finfo(F64).eps
        inv = torch.where(lam > cut, 1.0 / lam.clamp_min(torch.finfo(F64).tiny),
                          torch.zeros_like(lam))
        return SymPinv(V=V, inv_sq=inv)


def least_squares(head: Head, alpha: float, inner_solver: str, counts: dict[str, int],
                  where: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """Ridge least squares in closed form: L = c‖ZW̃ᵀ − Y‖², so
    ∇_W̃F = 2c(W̃ZᵀZ − YᵀZ) + alpha·W̃D = 0 ⇔ (ZᵀZ + μD)W̃ᵀ = ZᵀY, μ = alpha/(2c), and
    ∇²_W̃F[V] = 2c·V(ZᵀZ + μD). Returns (W̃, U ↦ (∇²_W̃F)⁻¹U)."""
    Z = head.Z
    if head.y.shape != torch.Size(head.model_shape):
        raise StepError(f"{where}: MSELoss targets have shape "
                        f"{tuple(head.y.shape)}, the model output {tuple(head.model_shape)}")
    Y = head.rows(head.targets())
    if head.offset is not None:
        Y = Y - head.offset
    rows = distributed.count_tensor(float(Z.shape[0]), Z)
    distributed.all_reduce_sum_([rows])
    c = 1.0 / (float(rows) * head.d) if head.reduction == "mean" else 1.0
    mu = alpha / (2.0 * c)
    D = torch.diag(head.mask)
    counts["inner_iters"] = counts.get("inner_iters", 0) + 1
    if inner_solver == "svd" and not distributed.active():
        reg_rows = head.mask > 0
        F = torch.cat([Z, math.sqrt(mu) * D[reg_rows]]) if mu > 0 else Z
        B = torch.cat([Y, Y.new_zeros(int(reg_rows.sum()), Y.shape[1])]) if mu > 0 else Y
        U, S, Vh = torch.linalg.svd(F, full_matrices=False)
        cut = S.max() * max(F.shape) * torch.finfo(F64).eps if S.numel() else 0.0
        keep = S > cut
        inv = torch.where(keep, 1.0 / S.clamp_min(torch.finfo(F64).tiny),
                          torch.zeros_like(S))
        Wt = Vh.T @ (inv[:, None] * (U.T @ B))
        pinv = SymPinv(V=Vh.T, inv_sq=inv * inv)
    else:
        G = Z.T @ Z
        Q = Z.T @ Y
        distributed.all_reduce_sum_([G, Q])
        A = G + mu * D
        pinv = None
        if inner_solver == "cholesky":
            L, info = torch.linalg.cholesky_ex(A)
            if int(info) == 0:
                pinv = SymPinv(chol=L)
            else:
                counts["inner_fallback"] = counts.get("inner_fallback", 0) + 1
        if pinv is None:
            pinv = SymPinv.eigh(A)
        Wt = pinv(Q)
    return Wt.T.contiguous(), lambda U: pinv(U.T).T / (2.0 * c)


def newton(head: Head, W0: Tensor, inner_tol: float, max_iters: int, radius: float,
           counts: dict[str, int]) -> tuple[Tensor, float]:
    """Newton-Krylov trust region on F(W̃) (N&W Alg. 4.1 with Steihaug CG, the radius rule
    of :data:`INNER`), warm started from ``W0`` with trust radius ``radius``; stops when
    ‖∇F‖ ≤ inner_tol, when ‖∇F‖ stops halving once the model's predicted decrease is below
    the resolution of F (the rounding floor), or after ``max_iters`` iterations. Returns
    (W̃, the radius to warm start the next solve with)."""
    W = W0.clone()
    f = head.loss(W)
    g_o, hl = head.linearize(W)
    g = head.grad_W(W, g_o)
    st = {**K.initial_state(INNER), "radius": float(radius)}
    iters = 0
    eps = torch.finfo(F64).eps
    for _ in range(max_iters):
        gnorm = float(g.norm())
        if gnorm <= inner_tol or not math.isfinite(gnorm):
            break
        iters += 1
        cg = K.steihaug_cg([g], lambda v, hl=hl: [head.hvp_W(hl, v[0])], None, st["radius"],
                           W.numel(), K.cg_tolerance(gnorm, INNER.cg_tol, INNER.cg_forcing))
        predicted = -cg.model()
        if not predicted > 0.0:
            break
        W_new = W + cg.step[0]
        f_new = head.loss(W_new)
        if predicted <= 100 * eps * max(abs(f), 1.0):
            # below the resolution of F, ρ is rounding noise: progress is measured by the
            # gradient instead; once it stops halving, the rounding floor is reached
            g_o_new, hl_new = head.linearize(W_new)
            g_new = head.grad_W(W_new, g_o_new)
            gnorm_new = float(g_new.norm())
            if not gnorm_new <= 0.5 * gnorm:
                break  # keeps W bitwise when the warm start already is the solution
            W, f, g_o, hl, g = W_new, f_new, g_o_new, hl_new, g_new
            continue
        if K.update_radius(INNER, st, K.ratio(f - f_new, predicted), cg.hit_boundary):
            W, f = W_new, f_new
            g_o, hl = head.linearize(W)
            g = head.grad_W(W, g_o)
        if st["radius"] < 1e-14 * (1.0 + float(W.norm())):
            break
    counts["inner_iters"] = counts.get("inner_iters", 0) + iters
    # the next solve starts from this radius, not from one too small to move
    return W, max(st["radius"], 1e-6)


def cg_solver(head: Head, hl: Callable[[Tensor], Tensor], n: int, rtol: float,
              counts: dict[str, int]) -> Callable[[Tensor], Tensor]:
    """U ↦ (∇²_W̃ F)⁻¹U by CG on Hessian-vector products (losses without a closed form)."""

    def solve(U: Tensor) -> Tensor:
        x, products = K.conjugate_gradient(lambda v: [head.hvp_W(hl, v[0])], [U], rtol,
                                           2 * n + 10)
        counts["inner_matvecs"] = counts.get("inner_matvecs", 0) + products
        return x[0]

    return solve
