"""``varpro``: variable projection for separable models (VarPro / GNvpro)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

from curvkit import distributed
from curvkit.errors import StepError
from curvkit.losses import batch_size, reduction_of
from curvkit.options import option
from curvkit.solvers import _krylov as K
from curvkit.solvers.base import Solver, StepContext, StepResult

F64 = torch.float64


class _Features(nn.Module):
    """Stands in for the final layer in the feature model: returns its input φ."""

    def forward(self, x: Tensor) -> Tensor:
        return x


# ----------------------------------------------------------------------------- the head
class _Head:
    """The final layer as a function of W̃ for fixed features, in float64.

    Z = [φ | 1] (R × k: R = rows = samples × any extra leading dims, k = in_features + 1 if
    the bias is trainable, else in_features), W̃ = [W | b] (d × k), outputs o = Z W̃ᵀ (+ a
    frozen bias) reshaped like the model output. The objective of the inner problem is

        F(W̃) = L(o(W̃), y) + (alpha/2) ‖mask ⊙ W̃‖²

    with L the loss under its reduction over all ranks (per-rank values are combined with
    the count-weighted mean) and mask the regularized columns.
    """

    def __init__(self, feats: Tensor, y: Tensor, loss64: Callable, reduction: str,
                 count: int, d: int, bias_col: bool, offset: Tensor | None, mask: Tensor,
                 alpha: float) -> None:
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

    def local_loss(self, o: Tensor) -> Tensor:
        return self.loss64(o, self.y)

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


class _SymPinv:
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
    def eigh(A: Tensor) -> _SymPinv:
        lam, V = torch.linalg.eigh(A)
        cut = lam.abs().max() * A.shape[0] * torch.finfo(F64).eps
        inv = torch.where(lam > cut, 1.0 / lam.clamp_min(torch.finfo(F64).tiny),
                          torch.zeros_like(lam))
        return _SymPinv(V=V, inv_sq=inv)


@dataclass
class _Point:
    """Everything known at one θ on one batch after the inner solve."""

    theta: list[Tensor]
    head: _Head
    W: Tensor                       # W̃(θ), float64 (d × k)
    g_o: Tensor                     # ∇_o ℓ at o(W̃(θ)), this rank
    hl: Callable[[Tensor], Tensor]  # u ↦ H_ℓ u at o(W̃(θ)), this rank
    solve_H: Callable[[Tensor], Tensor]  # U ↦ (∇²_W̃ F)⁻¹ U
    loss: float                     # F(θ) = L(θ, W̃(θ)) + reg
    inner_grad_norm: float = 0.0    # ‖∇_W̃F‖ at the inner solution (0 up to the solve's accuracy)
    X: Any = None                   # the batch input (for JVPs of the features)
    vjp_fn: Callable | None = None
    counts: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the solver
class VarPro(Solver):
    """Variable projection: the final linear layer solved exactly, the rest by an outer step.

    For a separable model f(x) = W̃ [φ_θ(x); 1] (the last module an ``nn.Linear`` holding
    W and b, or the module named by ``layer``), with F(θ, W̃) = L + (alpha/2)‖W̃‖²:

    * inner: W̃(θ) = argmin_W̃ F(θ, W̃) for the features of the current θ, in float64 —
      closed form for ``nn.MSELoss`` (ridge least squares (ZᵀZ + μD)W̃ᵀ = ZᵀY with
      μ = alpha/(2c), c the loss' scale: 1/(rows·d) for mean, 1 for sum; by the SVD of
      [Z; √μ D] or a Cholesky factorization), a Newton-Krylov trust region warm started
      from the current W̃ for any other loss (``nn.CrossEntropyLoss``);
    * outer, on the reduced objective F(θ) = F(θ, W̃(θ)): ``"gradient"`` takes
      θ ← θ − lr·P⁻¹∇_θF (∇_θF = ∂_θF at W̃(θ) since ∇_W̃F = 0 there);
      ``"gauss_newton"`` (GNvpro) runs a Steihaug-CG trust region on θ with the
      Gauss-Newton matrix of the reduced model o(θ) = W̃(θ)[φ_θ; 1],
      Ĝ = J_redᵀ H_ℓ J_red + alpha·(dW̃/dθ)ᵀD(dW̃/dθ), J_red = ∂_θo + ∂_W̃o · dW̃/dθ, with
      the implicit Jacobian dW̃/dθ = −(∇²_W̃F)⁻¹ ∂_θ∇_W̃F applied matrix-free (one JVP and
      one VJP through the feature extractor per product, two solves with ∇²_W̃F).

    After an accepted step the model sits at (θ⁺, W̃(θ⁺)): the returned direction moves θ
    by the outer step and W̃ from its current value to the inner solution at the new θ on
    this batch, so the loss the optimizer reports next (on the same batch) is F(θ⁺). A
    rejected trust-region step leaves every parameter bitwise unchanged.
    """

    name = "varpro"

    @dataclass
    class Options(K.TrustRegionOptions):
        layer: str = option("", "module holding W (and bias); '' = the model's last "
                                "module, which must be an nn.Linear")
        outer: Literal["gauss_newton", "gradient"] = option(
            "gauss_newton", "outer step on θ: Gauss-Newton-Krylov trust region with the "
                            "implicit Jacobian (GNvpro), or a preconditioned gradient step")
        alpha: float = option(0.0, "Tikhonov (alpha/2)‖W‖² on the final layer (> 0 needed "
                                   "for cross-entropy)", min=0.0)
        regularize_bias: bool = option(True, "include the bias in the Tikhonov term")
        inner_solver: Literal["svd", "cholesky"] = option(
            "svd", "least squares (MSELoss): SVD of [Z; √μD] (minimum-norm if "
                   "rank-deficient) or Cholesky of ZᵀZ + μD")
        inner_tol: float = option(0.0, "Newton-Krylov inner solve (other losses): stop when "
                                        "‖∇_W F‖ ≤ inner_tol (0 = at the rounding floor)",
                                  min=0.0)
        inner_max_iters: int = option(100, "Newton-Krylov inner solve: maximum trust-"
                                           "region iterations", min=1)
        jacobian_tol: float = option(1e-12, "relative CG tolerance of the solves with "
                                            "∇²_W F in the implicit Jacobian (other losses)",
                                     min=0.0)

    def __init__(self, options: Any | None = None) -> None:
        super().__init__(options)
        self.state = K.initial_state(self.options)
        self.state.update(inner_radius=1.0, inner_iters=0, inner_matvecs=0, checked=False)
        self._bound = False

    # ------------------------------------------------------------------ binding
    def bind(self, optimizer: Any) -> None:
        """Find the final layer, split the parameters into θ and W̃, build the feature map.

        Errors are ``ValueError("option: message")``; the optimizer prefixes the config path.
        """
        o = self.options
        model = optimizer.model
        modules = dict(model.named_modules())
        if o.layer:
            if o.layer not in modules:
                linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
                raise ValueError(f"layer: model {type(model).__name__} has no module "
                                 f"{o.layer!r}; its nn.Linear modules are "
                                 f"{', '.join(map(repr, linears)) or 'none'}")
            layer_name = o.layer
        else:
            leaves = [n for n, m in modules.items() if not list(m.children())]
            layer_name = leaves[-1]
        layer = modules[layer_name]
        where = repr(layer_name) if layer_name else "(the model itself)"
        if not isinstance(layer, nn.Linear):
            hint = "" if o.layer else " (set `layer` to the module holding the final linear map)"
            raise ValueError(f"varpro needs a separable model whose last module is an "
                             f"nn.Linear; module {where} is {type(layer).__name__}{hint}")
        if not layer.weight.requires_grad:
            raise ValueError(f"the weight of the final layer {where} is frozen "
                             f"(requires_grad=False); varpro solves for it")
        prefix = f"{layer_name}." if layer_name else ""
        names = list(optimizer.names)
        self._w_idx = names.index(prefix + "weight")
        has_bias = layer.bias is not None
        self._b_idx = names.index(prefix + "bias") if has_bias and layer.bias.requires_grad \
            else None
        self._offset = layer.bias.detach() if has_bias and self._b_idx is None else None
        self._theta_idx = [i for i in range(len(names)) if i not in (self._w_idx, self._b_idx)]
        self._theta_names = [names[i] for i in self._theta_idx]
        self._layer_name = layer_name
        self._d, self._k_in = layer.out_features, layer.in_features
        self._model = model
        self._loss_fn = optimizer.loss_fn
        self._reduction = reduction_of(optimizer.loss_fn)
        self._mse = isinstance(optimizer.loss_fn, nn.MSELoss)
        self._preconditioner = optimizer.preconditioner
        if not self._mse and o.alpha == 0.0:
            raise ValueError(f"alpha: the inner problem of loss "
                             f"{type(optimizer.loss_fn).__name__} has no unique minimizer "
                             f"without Tikhonov regularization (e.g. cross-entropy on "
                             f"separable features); set alpha > 0")
        loss64 = optimizer.loss_fn
        if isinstance(loss64, nn.Module):
            loss64 = copy.deepcopy(loss64).to(F64)
        self._loss64 = loss64
        k = self._k_in + (1 if self._b_idx is not None else 0)
        mask = torch.ones(k, dtype=F64, device=layer.weight.device)
        if self._b_idx is not None and not o.regularize_bias:
            mask[-1] = 0.0
        self._mask = mask
        self._fmodel = self._feature_model(model, layer_name)
        self._bound = True

    @staticmethod
    def _feature_model(model: nn.Module, layer_name: str) -> nn.Module | None:
        """A copy of the model sharing its parameters and buffers, with the final layer
        replaced by the identity (so its output is the features φ). The user's model is
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
        setattr(fmodel.get_submodule(parent_name) if parent_name else fmodel, attr, _Features())
        return fmodel

    # ------------------------------------------------------------------ pieces
    def _features(self, theta: Sequence[Tensor], X: Any) -> Tensor:
        """φ_θ(X): the input of the final layer."""
        if self._fmodel is None:
            return X
        return functional_call(self._fmodel, dict(zip(self._theta_names, theta)), (X,))

    def _W_of(self, params: Sequence[Tensor]) -> Tensor:
        """Current W̃ = [W | b] of the model (float64, d × k)."""
        W = params[self._w_idx].detach().to(F64)
        if self._b_idx is not None:
            W = torch.cat([W, params[self._b_idx].detach().to(F64)[:, None]], 1)
        return W

    def _split_W(self, W: Tensor, like: Sequence[Tensor]) -> dict[int, Tensor]:
        out = {self._w_idx: W[:, :self._k_in].to(like[self._w_idx].dtype)}
        if self._b_idx is not None:
            out[self._b_idx] = W[:, -1].to(like[self._b_idx].dtype)
        return out

    def _is_current(self, W: Tensor, params: Sequence[Tensor]) -> bool:
        """Whether the model's W̃ equals ``W`` up to the rounding of writing it back
        (θ unchanged, so the optimizer's gradient is the reduced gradient)."""
        for i, t in self._split_W(W, params).items():
            p = params[i].detach()
            tol = 4 * torch.finfo(p.dtype).eps * float(p.abs().max()) if p.numel() else 0.0
            if not bool(((t - p).abs() <= tol).all()):
                return False
        return True

    def _head(self, feats: Tensor, batch: tuple[Any, Tensor]) -> _Head:
        offset = None if self._offset is None else self._offset.to(F64)
        return _Head(feats, batch[1], self._loss64, self._reduction, batch_size(batch),
                     self._d, self._b_idx is not None, offset, self._mask, self.options.alpha)

    def _check_separable(self, theta: Sequence[Tensor], batch: tuple[Any, Tensor],
                         params: Sequence[Tensor], loss: float) -> None:
        """Once, at the first step: the loss through the features and the layer must equal
        the model's loss (one extra forward pass)."""
        try:
            with torch.no_grad():
                feats = self._features(theta, batch[0])
                head = self._head(feats, batch)
                out = head.outputs(self._W_of(params))
                ours = float(head.red([head.local_loss(out)])[0])
        except (RuntimeError, TypeError, AttributeError, ValueError) as err:
            raise StepError(f"{self.config_path or 'solver'}: computing the input features "
                            f"of layer {self._layer_name or '(the model)'!r} (the model with "
                            f"that layer replaced by the identity) or the loss from them "
                            f"failed — is the model not separable at that layer? "
                            f"{type(err).__name__}: {err}") from err
        rtol = 1e-8 if head.feat_dtype == F64 else 1e-3
        if not abs(ours - loss) <= rtol * max(abs(loss), 1e-6):
            raise StepError(f"{self.config_path or 'solver'}: the model is not separable at "
                            f"layer {self._layer_name or '(the model)'!r}: the loss through its "
                            f"input features is {ours:.6g}, the model's loss is {loss:.6g} (the "
                            f"model output must be that layer's output)")
        self.state["checked"] = True

    # ------------------------------------------------------------------ inner solves
    def _cg_solver(self, head: _Head, hl: Callable[[Tensor], Tensor], n: int,
                   counts: dict[str, int]) -> Callable[[Tensor], Tensor]:
        """U ↦ (∇²_W̃ F)⁻¹U by CG on Hessian-vector products (losses without a closed form)."""
        o = self.options

        def solve(U: Tensor) -> Tensor:
            x, products = K.conjugate_gradient(lambda v: [head.hvp_W(hl, v[0])], [U],
                                               o.jacobian_tol, 2 * n + 10)
            counts["inner_matvecs"] = counts.get("inner_matvecs", 0) + products
            return x[0]

        return solve

    def _least_squares(self, head: _Head, counts: dict[str, int]
                       ) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """Ridge least squares in closed form: L = c‖ZW̃ᵀ − Y‖², so
        ∇_W̃F = 2c(W̃ZᵀZ − YᵀZ) + alpha·W̃D = 0 ⇔ (ZᵀZ + μD)W̃ᵀ = ZᵀY, μ = alpha/(2c), and
        ∇²_W̃F[V] = 2c·V(ZᵀZ + μD)."""
        Z = head.Z
        if head.y.shape != torch.Size(head.out_shape):
            raise StepError(f"{self.config_path or 'solver'}: MSELoss targets have shape "
                            f"{tuple(head.y.shape)}, the model output {tuple(head.out_shape)}")
        Y = head.rows(head.y)
        if head.offset is not None:
            Y = Y - head.offset
        rows = distributed.count_tensor(float(Z.shape[0]), Z)
        distributed.all_reduce_sum_([rows])
        c = 1.0 / (float(rows) * head.d) if head.reduction == "mean" else 1.0
        mu = self.options.alpha / (2.0 * c)
        D = torch.diag(head.mask)
        counts["inner_iters"] = counts.get("inner_iters", 0) + 1
        if self.options.inner_solver == "svd" and not distributed.active():
            reg_rows = head.mask > 0
            F = torch.cat([Z, math.sqrt(mu) * D[reg_rows]]) if mu > 0 else Z
            B = torch.cat([Y, Y.new_zeros(int(reg_rows.sum()), Y.shape[1])]) if mu > 0 else Y
            U, S, Vh = torch.linalg.svd(F, full_matrices=False)
            cut = S.max() * max(F.shape) * torch.finfo(F64).eps if S.numel() else 0.0
            keep = S > cut
            inv = torch.where(keep, 1.0 / S.clamp_min(torch.finfo(F64).tiny),
                              torch.zeros_like(S))
            Wt = Vh.T @ (inv[:, None] * (U.T @ B))
            pinv = _SymPinv(V=Vh.T, inv_sq=inv * inv)
        else:
            G = Z.T @ Z
            Q = Z.T @ Y
            distributed.all_reduce_sum_([G, Q])
            A = G + mu * D
            pinv = None
            if self.options.inner_solver == "cholesky":
                L, info = torch.linalg.cholesky_ex(A)
                if int(info) == 0:
                    pinv = _SymPinv(chol=L)
                else:
                    counts["inner_fallback"] = counts.get("inner_fallback", 0) + 1
            if pinv is None:
                pinv = _SymPinv.eigh(A)
            Wt = pinv(Q)
        return Wt.T.contiguous(), lambda U: pinv(U.T).T / (2.0 * c)

    def _newton(self, head: _Head, W0: Tensor, counts: dict[str, int]) -> Tensor:
        """Newton-Krylov trust region on F(W̃) (N&W Alg. 4.1 with Steihaug CG), warm started
        from ``W0``; stops when ‖∇F‖ ≤ inner_tol, when ‖∇F‖ stops halving once the model's
        predicted decrease is below the resolution of F (the rounding floor), or after
        inner_max_iters iterations."""
        o = self.options
        W = W0.clone()
        f = head.loss(W)
        g_o, hl = head.linearize(W)
        g = head.grad_W(W, g_o)
        radius = float(self.state.get("inner_radius", 1.0))
        iters = 0
        eps = torch.finfo(F64).eps
        for _ in range(o.inner_max_iters):
            gnorm = float(g.norm())
            if gnorm <= o.inner_tol or not math.isfinite(gnorm):
                break
            iters += 1
            cg = K.steihaug_cg([g], lambda v, hl=hl: [head.hvp_W(hl, v[0])], None, radius,
                               W.numel(), K.cg_tolerance(gnorm, 0.5, "superlinear"))
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
            rho = K.ratio(f - f_new, predicted)
            if rho < 0.25:
                radius *= 0.25
            elif rho > 0.75 and cg.hit_boundary:
                radius = min(2.0 * radius, 1e10)
            if rho > 0.15:
                W, f = W_new, f_new
                g_o, hl = head.linearize(W)
                g = head.grad_W(W, g_o)
            if radius < 1e-14 * (1.0 + float(W.norm())):
                break
        self.state["inner_radius"] = max(radius, 1e-6)
        counts["inner_iters"] = counts.get("inner_iters", 0) + iters
        return W

    # ------------------------------------------------------------------ points
    def _point(self, params: Sequence[Tensor], theta: Sequence[Tensor], batch: tuple,
               W0: Tensor, with_vjp: bool, counts: dict[str, int]) -> _Point:
        """Features at θ (with their VJP if asked), then the inner solve."""
        X = batch[0]
        theta = [t.detach() for t in theta]
        vjp_fn = None
        try:
            if with_vjp and theta:
                feats, vjp_fn = vjp(lambda *th: self._features(th, X), *theta)
            else:
                with torch.no_grad():
                    feats = self._features(theta, X)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise StepError(f"{self.config_path or 'solver'}: computing the input features "
                            f"of layer {self._layer_name or '(the model)'!r} (the model with "
                            f"that layer replaced by the identity) failed — is the model not "
                            f"separable at that layer? {type(err).__name__}: {err}") from err
        counts["forward"] = counts.get("forward", 0) + 1
        head = self._head(feats.detach(), batch)
        if self._mse:
            W, solve_H = self._least_squares(head, counts)
            g_o, hl = head.linearize(W)
        else:
            W = self._newton(head, W0, counts)
            g_o, hl = head.linearize(W)
            solve_H = self._cg_solver(head, hl, W.numel(), counts)
        loss = head.loss(W)
        counts["loss_evals"] = counts.get("loss_evals", 0) + 1
        return _Point(list(theta), head, W, g_o, hl, solve_H, loss,
                      float(head.grad_W(W, g_o).norm()), X, vjp_fn, counts)

    def _attach_vjp(self, pt: _Point) -> None:
        """Recompute the features at pt.theta with their VJP (one more forward pass)."""
        _, pt.vjp_fn = vjp(lambda *th: self._features(th, pt.X), *pt.theta)
        pt.counts["forward"] = pt.counts.get("forward", 0) + 1

    def _theta_of(self, params: Sequence[Tensor]) -> list[Tensor]:
        return [params[i].detach() for i in self._theta_idx]

    def _pullback(self, pt: _Point, xi: Tensor) -> list[Tensor]:
        """red(J_φᵀ Ξ) for a feature cotangent Ξ (R × k, float64; bias column dropped)."""
        xi = xi[:, :self._k_in].reshape(pt.head.feat_shape).to(pt.head.feat_dtype)
        if pt.vjp_fn is None:
            self._attach_vjp(pt)
        out = pt.vjp_fn(xi)
        pt.counts["vjp"] = pt.counts.get("vjp", 0) + 1
        return pt.head.red([t.detach() for t in out])

    def _gradient(self, pt: _Point) -> list[Tensor]:
        """∇_θF(θ) = J_φᵀ(∇_o ℓ · W̃) at W̃(θ) — the reduced gradient."""
        return self._pullback(pt, pt.head.rows(pt.g_o) @ pt.W)

    def _mixed(self, pt: _Point, dZ: Tensor) -> Tensor:
        """∂_θ∇_W̃F · v given dZ = dφ·v (R × k): red((H_ℓ[dZ W̃ᵀ])ᵀ Z + ∇_oℓᵀ dZ)."""
        h = pt.head
        Hdo = h.rows(pt.hl((dZ @ pt.W.T).reshape(h.out_shape)))
        return h.red([Hdo.T @ h.Z + h.rows(pt.g_o).T @ dZ])[0]

    def _tangent(self, pt: _Point, v: Sequence[Tensor]) -> Tensor:
        """dZ = (∂φ/∂θ) v as R × k (zero bias column), float64."""
        _, dfeat = jvp(lambda *th: self._features(th, pt.X), tuple(pt.theta),
                       tuple(t.to(p.dtype) for t, p in zip(v, pt.theta)))
        pt.counts["jvp"] = pt.counts.get("jvp", 0) + 1
        h = pt.head
        dZ = dfeat.detach().to(F64).reshape(-1, self._k_in)
        if h.Z.shape[1] > self._k_in:
            dZ = torch.cat([dZ, dZ.new_zeros(dZ.shape[0], 1)], 1)
        return dZ

    def _jacobian(self, pt: _Point, v: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """(dZ, dW̃) with dW̃ = (dW̃/dθ) v = −(∇²_W̃F)⁻¹ ∂_θ∇_W̃F v."""
        dZ = self._tangent(pt, v)
        return dZ, -pt.solve_H(self._mixed(pt, dZ))

    def _gn_matvec(self, pt: _Point, v: Sequence[Tensor]) -> list[Tensor]:
        """Ĝv = J_redᵀ H_ℓ J_red v + alpha (dW̃/dθ)ᵀ D (dW̃/dθ) v, matrix-free.

        J_red v = dZ W̃ᵀ + Z dW̃ᵀ; with u = H_ℓ J_red v and s = (∇²_W̃F)⁻¹(red(uᵀZ) + alpha D dW̃),
        Ĝv = J_φᵀ[u W̃ − (H_ℓ[Z sᵀ] W̃ + ∇_oℓ s)] (the second term is −(∂_θ∇_W̃F)ᵀ s).
        """
        h = pt.head
        dZ, dW = self._jacobian(pt, v)
        u = h.rows(pt.hl(((dZ @ pt.W.T) + (h.Z @ dW.T)).reshape(h.out_shape)))
        w = h.red([u.T @ h.Z])[0] + h.alpha * h.mask * dW
        s = pt.solve_H(w)
        Hs = h.rows(pt.hl(h.lin(s)))
        xi = u @ pt.W - (Hs @ pt.W + h.rows(pt.g_o) @ s)
        return self._pullback(pt, xi)

    # ------------------------------------------------------------------ public helpers
    def _require_bound(self) -> None:
        if not self._bound:
            raise StepError("varpro: bind(optimizer) must be called first (build_optimizer "
                            "does it)")

    def prepare(self, batch: tuple[Any, Tensor], theta: Sequence[Tensor] | None = None,
                W0: Tensor | None = None) -> _Point:
        """The inner solution at θ (default: the model's current θ) on ``batch``, with the
        feature VJP ready, for :meth:`reduced_gradient`, :meth:`jacobian_vp`,
        :meth:`gn_matvec` (tests and diagnostics)."""
        self._require_bound()
        params = [p for p in self._model.parameters() if p.requires_grad]
        theta = self._theta_of(params) if theta is None else [t.detach() for t in theta]
        W0 = self._W_of(params) if W0 is None else W0
        return self._point(params, theta, batch, W0, True, {})

    def inner_solve(self, batch: tuple[Any, Tensor], theta: Sequence[Tensor] | None = None
                    ) -> Tensor:
        """W̃(θ) = [W | b] (float64, d × k) on ``batch``."""
        return self.prepare(batch, theta).W

    def reduced_loss(self, batch: tuple[Any, Tensor], theta: Sequence[Tensor] | None = None
                     ) -> float:
        """F(θ) = L(θ, W̃(θ)) + (alpha/2)‖W̃(θ)‖² on ``batch``."""
        return self.prepare(batch, theta).loss

    def reduced_gradient(self, batch: tuple[Any, Tensor],
                         theta: Sequence[Tensor] | None = None) -> list[Tensor]:
        """∇_θF at θ (θ-parameters only, model order)."""
        return self._gradient(self.prepare(batch, theta))

    def jacobian_vp(self, batch: tuple[Any, Tensor], v: Sequence[Tensor],
                    theta: Sequence[Tensor] | None = None) -> Tensor:
        """(dW̃/dθ) v (float64, d × k), by the implicit function theorem."""
        return self._jacobian(self.prepare(batch, theta), v)[1]

    def gn_matvec(self, batch: tuple[Any, Tensor], v: Sequence[Tensor],
                  theta: Sequence[Tensor] | None = None) -> list[Tensor]:
        """Ĝv, the reduced Gauss-Newton matrix of GNvpro times v."""
        return self._gn_matvec(self.prepare(batch, theta), v)

    # ------------------------------------------------------------------ the step
    def step(self, ctx: StepContext) -> StepResult:
        o = self.options
        st = self.state
        params = list(ctx.params)
        lr = float(ctx.lr)
        counts: dict[str, int] = {}
        W_cur = self._W_of(params)
        theta = self._theta_of(params)
        gn = o.outer == "gauss_newton"
        if not st.get("checked"):
            self._check_separable(theta, ctx.batch, params, float(ctx.loss))
            counts["forward"] = 1
        pt = self._point(params, theta, ctx.batch, W_cur, gn, counts)
        info: dict[str, Any] = {"reduced_loss": pt.loss, "inner_grad_norm": pt.inner_grad_norm,
                                "cg_iters": 0, "matvecs": 0}
        # ∇_θF: the optimizer's gradient is it when W̃ already is the inner solution
        same = self._is_current(pt.W, params)
        if same or not theta:
            g_theta = [ctx.grads[i] for i in self._theta_idx]
        else:
            if pt.vjp_fn is None:
                self._attach_vjp(pt)
            g_theta = self._gradient(pt)
        info["reused_gradient"] = bool(same)

        if not theta:
            return self._finish(ctx, params, pt.W, [], 1.0, True, info, counts, "no_theta")
        precond = self._theta_preconditioner(params)
        if not gn:
            step = K.scale(-lr, precond(g_theta))
            trial = self._point(params, K.axpy(1.0, step, theta), ctx.batch, pt.W, False, counts)
            info.update(loss_after=trial.loss, actual=pt.loss - trial.loss)
            return self._finish(ctx, params, trial.W, step, 1.0, True, info, counts, "gradient")

        def tol(gnorm: float) -> float:  # gnorm = ‖g‖_{M⁻¹}, from CG's first preconditioning
            return K.cg_tolerance(gnorm, o.cg_tol, o.cg_forcing)

        result_W, step, accepted = pt.W, K.zeros_like(theta), False
        for attempt in range(o.retries + 1):
            lam, radius = st["damping"], st["radius"]

            cg = K.steihaug_cg(g_theta, lambda v: self._gn_matvec(pt, v), precond, radius,
                               o.max_iters, tol, shift=lam)
            info["cg_iters"] += cg.iters
            info["matvecs"] += cg.matvecs
            st["matvecs"] += cg.matvecs
            st["cg_iters"] += cg.iters
            info.update(stop=cg.stop, radius=radius, damping=lam, step_norm=cg.norm,
                        attempts=attempt + 1)
            if cg.stop == "zero_gradient":
                info.update(rho=math.nan, radius_next=radius)
                return self._finish(ctx, params, pt.W, K.zeros_like(theta), 1.0, True, info,
                                    counts, cg.stop)
            predicted = -cg.model(lr)
            step = K.scale(lr, cg.step)
            trial = self._point(params, K.axpy(1.0, step, theta), ctx.batch, pt.W, False,
                                counts)
            actual = pt.loss - trial.loss
            rho = K.ratio(actual, predicted)
            accepted = K.update_radius(o, st, rho, cg.hit_boundary)
            info.update(rho=rho, predicted=predicted, actual=actual, loss_after=trial.loss,
                        radius_next=st["radius"], damping_next=st["damping"])
            if accepted:
                result_W = trial.W
                break
        return self._finish(ctx, params, result_W, step, 1.0, accepted, info, counts,
                            info["stop"])

    def _theta_preconditioner(self, params: Sequence[Tensor]
                              ) -> Callable[[Sequence[Tensor]], list[Tensor]]:
        """θ ↦ (M⁻¹ [θ; 0])_θ: the preconditioner restricted to the θ block."""
        pre = self._preconditioner
        n = len(params)
        idx = self._theta_idx

        def apply(v: Sequence[Tensor]) -> list[Tensor]:
            full = [torch.zeros_like(p) for p in params]
            for i, t in zip(idx, v):
                full[i] = t
            out = pre.apply(full)
            return [out[i] for i in idx] if len(out) == n else list(out)

        return apply

    def _finish(self, ctx: StepContext, params: Sequence[Tensor], W_new: Tensor,
                step: Sequence[Tensor], alpha: float, accepted: bool, info: dict[str, Any],
                counts: dict[str, int], stop: str) -> StepResult:
        direction: list[Tensor] = [torch.zeros_like(p) for p in params]
        if accepted:
            for i, t in zip(self._theta_idx, step):
                direction[i] = t.to(params[i].dtype)
            for i, t in self._split_W(W_new, params).items():
                direction[i] = t - params[i].detach()
        st = self.state
        st["inner_iters"] += counts.get("inner_iters", 0)
        st["inner_matvecs"] += counts.get("inner_matvecs", 0)
        forward, jv, vj = counts.get("forward", 0), counts.get("jvp", 0), counts.get("vjp", 0)
        info.update(stop=stop, outer_accepted=bool(accepted), accepted=bool(accepted),
                    inner_iters=counts.get("inner_iters", 0),
                    inner_matvecs=counts.get("inner_matvecs", 0),
                    inner_fallback=counts.get("inner_fallback", 0),
                    loss_evals=counts.get("loss_evals", 0), forward_passes=forward,
                    jvps=jv, vjps=vj,
                    # network passes: the optimizer's gradient (2) + every feature forward,
                    # JVP and VJP this solver made (the float64 head is not counted)
                    work=2 + forward + jv + vj, radius_state=st["radius"])
        return StepResult(direction, alpha, accepted, info)
