"""``varpro``: variable projection for separable models (VarPro / GNvpro).

The inner problem (the final layer for fixed features) is in :mod:`._varpro_inner`, the
reduced problem (the split θ | W̃, the feature map, GNvpro's reduced Gauss-Newton operator)
in :mod:`._varpro_reduced`; the outer Gauss-Newton step is the ``trust_region`` solver's loop
(:func:`curvkit.solvers.trust_region.trust_region_step`) driving that operator.

(Just over 500 lines: the head search and the build-time refusals, which need the traced
model and the options together, stay next to the solver that states them.)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvkit import passes
from curvkit.errors import StepError
from curvkit.losses import batch_size, reduction_of
from curvkit.options import option
from curvkit.solvers import _krylov as K
from curvkit.solvers._varpro_inner import F64, Head, cg_solver, least_squares, newton
from curvkit.solvers._varpro_reduced import (
    Linearized,
    Point,
    ReducedGaussNewton,
    Split,
    output_permutation,
)
from curvkit.solvers.base import Solver, StepContext, StepResult
from curvkit.solvers.trust_region import trust_region_step


class VarProSolver(Solver):
    """Variable projection: the final linear layer solved exactly, the rest by an outer step.

    For a separable model f(x) = P(W̃ [φ_θ(x); 1]) (the ``nn.Linear`` holding W and b whose
    output is the model's output, or the module named by ``layer``; P is the identity or a
    rearranging view of that output, e.g. a sequence head's (N, L, V) logits returned as
    (N, V, L), with the features then per position), with
    F(θ, W̃) = L + (alpha/2)‖W̃‖²:

    * inner: W̃(θ) = argmin_W̃ F(θ, W̃) for the features of the current θ, in float64 —
      closed form for ``nn.MSELoss`` (ridge least squares (ZᵀZ + μD)W̃ᵀ = ZᵀY with
      μ = alpha/(2c), c the loss' scale: 1/(rows·d) for mean, 1 for sum; by the SVD of
      [Z; √μ D] or a Cholesky factorization), a Newton-Krylov trust region warm started
      from the current W̃ for any other loss (``nn.CrossEntropyLoss``);
    * outer, on the reduced objective F(θ) = F(θ, W̃(θ)): ``"gradient"`` takes
      θ ← θ − lr·P⁻¹∇_θF (∇_θF = ∂_θF at W̃(θ) since ∇_W̃F = 0 there);
      ``"gauss_newton"`` (GNvpro) drives the ``trust_region`` solver's loop
      (:func:`curvkit.solvers.trust_region.trust_region_step`: Steihaug CG, the shared
      radius rule) with the reduced Gauss-Newton matrix of o(θ) = W̃(θ)[φ_θ; 1] as its
      curvature operator (:class:`~curvkit.solvers._varpro_reduced.ReducedGaussNewton`),
      Ĝ = J_redᵀ H_ℓ J_red + alpha·(dW̃/dθ)ᵀD(dW̃/dθ), with the implicit Jacobian
      dW̃/dθ = −(∇²_W̃F)⁻¹ ∂_θ∇_W̃F applied matrix-free.

    The model and loss come from the estimator (``ctx.estimator``), the preconditioner from
    the step context. The final layer is found at build where the model's code shows it
    (an ``nn.Sequential``'s last module, or a ``torch.fx`` trace of the forward pass with
    the submodules as leaves), else at the first step, as the ``nn.Linear`` whose output the
    model returns. A final layer whose weight is tied to another module, or frozen, is
    refused at build when found there; what only a forward pass shows (the layer used twice,
    a non-tensor output, a different output) is refused at the first step with what to do,
    before any parameter moves. All of varpro's passes through the model run through
    :mod:`curvkit.passes` (:func:`curvkit.passes.evaluation`): the step's random state,
    buffer copies, attention on the math kernel and decomposed normalizations for the
    forward-mode products.

    After an accepted step the model sits at (θ⁺, W̃(θ⁺)): the returned direction moves θ
    by the outer step and W̃ from its current value to the inner solution at the new θ on
    this batch, so the loss the optimizer reports next (on the same batch) is F(θ⁺). A
    rejected trust-region step leaves every parameter bitwise unchanged.
    """

    name = "varpro"

    @dataclass
    class Options(K.TrustRegionOptions):
        layer: str = option("", "module holding W (and bias); '' = the nn.Linear whose "
                                "output is the model's output (found at the first step)")
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
        self._estimator: Any = None
        self._split: Split | None = None
        self._stochastic = True  # until a pass shows that the forward draws no randomness

    # ------------------------------------------------------------------ binding
    def bind(self, estimator: Any, preconditioner: Any) -> None:
        """Check what can be checked without data: the loss, and the final layer if it is
        named (``layer``) or is the tail of an ``nn.Sequential``. Errors are
        ``ValueError("option: message")``; the optimizer prefixes the config path."""
        o = self.options
        model, loss_fn = estimator.model, estimator.loss_fn
        self._estimator = estimator
        self._mse = isinstance(loss_fn, nn.MSELoss)
        self._reduction = reduction_of(loss_fn)
        if not self._mse and o.alpha == 0.0:
            raise ValueError(f"alpha: the inner problem of loss {type(loss_fn).__name__} has "
                             f"no unique minimizer without Tikhonov regularization (e.g. "
                             f"cross-entropy on separable features); set alpha > 0")
        self._loss64 = copy.deepcopy(loss_fn).to(F64) if isinstance(loss_fn, nn.Module) \
            else loss_fn
        modules = dict(model.named_modules())
        if o.layer:
            if o.layer not in modules:
                linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
                raise ValueError(f"layer: model {type(model).__name__} has no module "
                                 f"{o.layer!r}; its nn.Linear modules are "
                                 f"{', '.join(map(repr, linears)) or 'none'}")
            self._check_layer(o.layer)
        else:
            tail = _sequential_tail(model)
            if tail is None:
                tail = _static_output_layer(model)
            if tail is not None:  # the output module is known without data
                self._check_layer(tail)
            elif not any(isinstance(m, nn.Linear) for m in modules.values()):
                raise ValueError(f"varpro needs a separable model whose output is an "
                                 f"nn.Linear's; {type(model).__name__} has no nn.Linear")

    def _check_layer(self, name: str) -> None:
        """The module ``name`` can be the final layer: an nn.Linear with a trainable weight
        that no other module shares."""
        model = self._estimator.model
        layer = model.get_submodule(name) if name else model
        where = repr(name) if name else "(the model itself)"
        if not isinstance(layer, nn.Linear):
            hint = "" if self.options.layer else \
                " (set `layer` to the module holding the final linear map)"
            raise ValueError(f"varpro needs a separable model whose last module is an "
                             f"nn.Linear; module {where} is {type(layer).__name__}{hint}")
        if not layer.weight.requires_grad:
            raise ValueError(f"the weight of the final layer {where} is frozen "
                             f"(requires_grad=False); varpro solves for it")
        mine = {id(p) for p in layer.parameters(recurse=False)}
        for other, mod in model.named_modules():
            if mod is layer:
                continue
            shared = [a for a, p in mod.named_parameters(recurse=False) if id(p) in mine]
            if shared:
                raise ValueError(
                    f"the final layer {where} shares its parameters with module {other!r} "
                    f"(tied weights: {other}.{shared[0]}), so the loss is not separable in "
                    f"them: varpro would solve for weights the features also use. Untie "
                    f"them, or use a solver without variable projection (trust_region)")

    # ------------------------------------------------------------------ the final layer
    def _resolve(self, batch: tuple[Any, Tensor]) -> Split:
        """Find the final layer on a batch (once), check that the model separates there and
        split the parameters. Raises :class:`StepError` naming the problem and the way out."""
        if self._split is not None:
            return self._split
        if self._estimator is None:
            raise StepError("varpro: bind(estimator, preconditioner) must be called first "
                            "(build_optimizer does it)")
        est, where = self._estimator, self.config_path or "solver"
        model = est.model
        name = self.options.layer
        out, calls = _trace(model, batch[0], name)
        if not isinstance(out, Tensor):
            raise StepError(f"{where}: the model returns {passes.describe_output(out)}, not "
                            f"a tensor; varpro solves for the final linear layer of a model "
                            f"with one tensor output: wrap the model, "
                            f"curvkit.SelectOutput(model, key)")
        perms = {n: output_permutation(out, o) for n, (_, o) in calls.items()
                 if isinstance(o, Tensor)}
        if not name:
            name = next((n for n, p in perms.items() if p is not False), None)
            if name is None:
                last = list(calls)[-1] if calls else None
                raise StepError(f"{where}: the model is not separable at layer {last!r} (the "
                                f"last nn.Linear to run): the model output must be that "
                                f"layer's output or a view of it holding each element once "
                                f"(transpose, permute, view; not a copy such as "
                                f".contiguous()), and is neither for any nn.Linear; return "
                                f"the final layer's output, or set `layer`")
            try:
                self._check_layer(name)
            except ValueError as err:
                raise StepError(f"{where}: {err}") from None
        elif perms.get(name, False) is False:
            raise StepError(f"{where}: the model is not separable at layer {name!r}: the model "
                            f"output must be that layer's output or a view of it holding "
                            f"each element once, and is neither (set `layer` to the module "
                            f"whose output the model returns)")
        count = calls.get(name, (0, None))[0]
        if count != 1:
            shown = repr(name) if name else "(the model itself)"
            raise StepError(f"{where}: the final layer {shown} runs {count} times in one "
                            f"forward pass; the model is separable only in a layer used once "
                            f"(its weights must not also shape the features)")
        named = est.named_params
        split = Split.build(model, name, [p for _, p in named], [n for n, _ in named],
                            perms[name])
        k = split.k_in + (1 if split.b_idx is not None else 0)
        mask = torch.ones(k, dtype=F64, device=named[0][1].device)
        if split.b_idx is not None and not self.options.regularize_bias:
            mask[-1] = 0.0
        self._mask = mask
        self._split = split
        return split

    # ------------------------------------------------------------------ pieces
    def _head(self, feats: Tensor, batch: tuple[Any, Tensor]) -> Head:
        sp = self._split
        offset = None if sp.offset is None else sp.offset.to(F64)
        return Head(feats, batch[1], self._loss64, self._reduction, batch_size(batch),
                    sp.d, sp.b_idx is not None, offset, self._mask, self.options.alpha,
                    sp.perm)

    def _check_separable(self, theta: Sequence[Tensor], batch: tuple[Any, Tensor],
                         params: Sequence[Tensor]) -> None:
        """Once, at the first step: the loss through the features and the layer must equal
        the model's loss under the same random state (one pass of each, buffers untouched).
        Also notes whether a pass draws random numbers (dropout): then the optimizer's
        gradient, taken with another mask, is not reused."""
        sp, where = self._split, self.config_path or "solver"
        shown = sp.layer_name or "(the model)"
        with torch.no_grad():
            passes.replay()
            start = torch.get_rng_state()
            out = passes.forward(sp.model, batch[0], dict(self._estimator.named_params))
            self._stochastic = not torch.equal(torch.get_rng_state(), start)
            try:
                feats = sp.features(theta, batch[0])
                head = self._head(feats, batch)
                ours = float(head.red([head.local_loss(head.outputs(sp.W_of(params)))])[0])
            except (RuntimeError, TypeError, ValueError) as err:
                # the model itself ran on this batch: what failed is the pass without the
                # final layer, so the model does not separate there
                raise StepError(f"{where}: computing the input features of layer {shown!r} "
                                f"(the model with that layer replaced by the identity) or the "
                                f"loss from them failed although the model runs: it is not "
                                f"separable at that layer ({type(err).__name__}: {err})"
                                ) from err
            theirs = float(head.red([self._loss64(out.to(F64), head.y)])[0]) \
                if out.shape == torch.Size(head.model_shape) else math.nan
        rtol = 1e-8 if head.feat_dtype == F64 else 1e-3
        if not abs(ours - theirs) <= rtol * max(abs(theirs), 1e-6):
            raise StepError(f"{where}: the model is not separable at layer {shown!r}: the loss "
                            f"through its input features is {ours:.6g}, the model's loss is "
                            f"{theirs:.6g} (the model output must be that layer's output)")
        self.state["checked"] = True

    # ------------------------------------------------------------------ points
    def _point(self, params: Sequence[Tensor], theta: Sequence[Tensor], batch: tuple,
               W0: Tensor, with_vjp: bool, counts: dict[str, int]) -> Point:
        """Features at θ (with their VJP if asked), then the inner solve."""
        o, sp = self.options, self._split
        X = batch[0]
        theta = [t.detach() for t in theta]
        lin = None
        if with_vjp and theta:
            lin = Linearized(sp, theta, X)
            feats = lin.feats
        else:
            with torch.no_grad():
                feats = sp.features(theta, X)
        counts["forward"] = counts.get("forward", 0) + 1
        head = self._head(feats.detach(), batch)
        if self._mse:
            W, solve_H = least_squares(head, o.alpha, o.inner_solver, counts,
                                       self.config_path or "solver")
            g_o, hl = head.linearize(W)
        else:
            W, radius = newton(head, W0, o.inner_tol, o.inner_max_iters,
                               float(self.state.get("inner_radius", 1.0)), counts)
            self.state["inner_radius"] = radius
            g_o, hl = head.linearize(W)
            solve_H = cg_solver(head, hl, W.numel(), o.jacobian_tol, counts)
        loss = head.loss(W)
        counts["loss_evals"] = counts.get("loss_evals", 0) + 1
        return Point(list(theta), head, W, g_o, hl, solve_H, loss,
                     float(head.grad_W(W, g_o).norm()), X, lin, counts)

    # ------------------------------------------------------------------ public helpers
    def prepare(self, batch: tuple[Any, Tensor], theta: Sequence[Tensor] | None = None,
                W0: Tensor | None = None) -> Point:
        """The inner solution at θ (default: the model's current θ) on ``batch``, with the
        feature VJP ready, for :meth:`reduced_gradient`, :meth:`jacobian_vp`,
        :meth:`gn_matvec` (tests and diagnostics). Call the operators of the point inside
        the same :func:`curvkit.passes.evaluation` (the helpers below do)."""
        sp = self._resolve(batch)
        params = self._estimator.params
        theta = sp.theta_of(params) if theta is None else [t.detach() for t in theta]
        W0 = sp.W_of(params) if W0 is None else W0
        return self._point(params, theta, batch, W0, True, {})

    def inner_solve(self, batch: tuple[Any, Tensor], theta: Sequence[Tensor] | None = None,
                    W0: Tensor | None = None) -> Tensor:
        """W̃(θ) = [W | b] (float64, d × k) on ``batch`` (Newton-Krylov losses: warm started
        from ``W0``, default the model's current W̃)."""
        with passes.evaluation(self._estimator.model, higher_order=False):
            return self.prepare(batch, theta, W0).W

    def reduced_loss(self, batch: tuple[Any, Tensor], theta: Sequence[Tensor] | None = None,
                     W0: Tensor | None = None) -> float:
        """F(θ) = L(θ, W̃(θ)) + (alpha/2)‖W̃(θ)‖² on ``batch`` (``W0`` as for
        :meth:`inner_solve`)."""
        with passes.evaluation(self._estimator.model, higher_order=False):
            return self.prepare(batch, theta, W0).loss

    def reduced_gradient(self, batch: tuple[Any, Tensor],
                         theta: Sequence[Tensor] | None = None,
                         W0: Tensor | None = None) -> list[Tensor]:
        """∇_θF at θ (θ-parameters only, model order)."""
        with passes.evaluation(self._estimator.model, higher_order=False):
            pt = self.prepare(batch, theta, W0)
            return ReducedGaussNewton(self._split, pt).gradient()

    def jacobian_vp(self, batch: tuple[Any, Tensor], v: Sequence[Tensor],
                    theta: Sequence[Tensor] | None = None,
                    W0: Tensor | None = None) -> Tensor:
        """(dW̃/dθ) v (float64, d × k), by the implicit function theorem."""
        with passes.evaluation(self._estimator.model, higher_order=False):
            pt = self.prepare(batch, theta, W0)  # resolves the split on first use
            return ReducedGaussNewton(self._split, pt).jacobian(v)[1]

    def gn_matvec(self, batch: tuple[Any, Tensor], v: Sequence[Tensor],
                  theta: Sequence[Tensor] | None = None,
                  W0: Tensor | None = None) -> list[Tensor]:
        """Ĝv, the reduced Gauss-Newton matrix of GNvpro times v."""
        with passes.evaluation(self._estimator.model, higher_order=False):
            pt = self.prepare(batch, theta, W0)
            return ReducedGaussNewton(self._split, pt).matvec(v)

    # ------------------------------------------------------------------ the step
    def step(self, ctx: StepContext) -> StepResult:
        """One outer step. Every pass through the model runs in one
        :func:`curvkit.passes.evaluation`: the random state of the step's own forward
        (the optimizer's scope; one dropout mask) and buffers untouched; the feature passes
        themselves run under :func:`curvkit.passes.differentiable` (forward-mode products
        on kernels that support them), the float64 head math outside it."""
        with passes.evaluation(self._estimator.model, higher_order=False):
            return self._step(ctx)

    def _step(self, ctx: StepContext) -> StepResult:
        o = self.options
        sp = self._resolve(ctx.batch)
        params = list(ctx.params)
        lr = float(ctx.lr)
        counts: dict[str, int] = {}
        W_cur, theta = sp.W_of(params), sp.theta_of(params)
        gn = o.outer == "gauss_newton"
        if not self.state.get("checked"):
            self._check_separable(theta, ctx.batch, params)
            counts["forward"] = 2
        pt = self._point(params, theta, ctx.batch, W_cur, gn, counts)
        op = ReducedGaussNewton(sp, pt)
        info: dict[str, Any] = {"reduced_loss": pt.loss, "inner_grad_norm": pt.inner_grad_norm,
                                "cg_iters": 0, "matvecs": 0}
        # ∇_θF: the optimizer's gradient is it when W̃ already is the inner solution (and
        # the model draws no random numbers: that gradient saw another dropout mask)
        same = sp.is_current(pt.W, params) and not self._stochastic
        g_theta = [ctx.grads[i] for i in sp.theta_idx] if same or not theta else \
            op.gradient()
        info["reused_gradient"] = bool(same)
        if not theta:
            return self._finish(params, pt.W, [], True, info, counts, "no_theta")
        precond = _theta_preconditioner(ctx.preconditioner, params, sp.theta_idx)
        if not gn:
            step = K.scale(-lr, precond(g_theta))
            trial = self._point(params, K.axpy(1.0, step, theta), ctx.batch, pt.W, False, counts)
            info.update(loss_after=trial.loss, actual=pt.loss - trial.loss)
            return self._finish(params, trial.W, step, True, info, counts, "gradient")

        trials: list[Point] = []

        def trial_loss(step: list[Tensor]) -> float:
            trials.append(self._point(params, K.axpy(1.0, step, theta), ctx.batch, pt.W,
                                      False, counts))
            return trials[-1].loss

        step, _, accepted = trust_region_step(o, self.state, g_theta, op.matvec, precond, lr,
                                              pt.loss, trial_loss, info)
        if info["stop"] == "zero_gradient":
            return self._finish(params, pt.W, K.zeros_like(theta), True, info, counts,
                                "zero_gradient")
        info["loss_after"] = info["trial_loss"]
        return self._finish(params, trials[-1].W if accepted else pt.W, step, accepted, info,
                            counts, info["stop"])

    def _finish(self, params: Sequence[Tensor], W_new: Tensor, step: Sequence[Tensor],
                accepted: bool, info: dict[str, Any], counts: dict[str, int], stop: str
                ) -> StepResult:
        sp, st = self._split, self.state
        direction: list[Tensor] = [torch.zeros_like(p) for p in params]
        if accepted:
            for i, t in zip(sp.theta_idx, step):
                direction[i] = t.to(params[i].dtype)
            for i, t in sp.split_W(W_new, params).items():
                direction[i] = t - params[i].detach()
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
        return StepResult(direction, 1.0, accepted, info)

    @property
    def _offset(self) -> Tensor | None:
        """The frozen bias of the final layer (an offset of the outputs), once resolved."""
        return None if self._split is None else self._split.offset


def _theta_preconditioner(pre: Any, params: Sequence[Tensor], idx: list[int]
                          ) -> Callable[[Sequence[Tensor]], list[Tensor]]:
    """θ ↦ (M⁻¹ [θ; 0])_θ: the preconditioner restricted to the θ block (through its
    public ``apply`` on a full-size direction)."""
    n = len(params)

    def apply(v: Sequence[Tensor]) -> list[Tensor]:
        full = [torch.zeros_like(p) for p in params]
        for i, t in zip(idx, v):
            full[i] = t
        out = pre.apply(full)
        return [out[i] for i in idx] if len(out) == n else list(out)

    return apply


def _sequential_tail(model: nn.Module) -> str | None:
    """The name of the module producing an ``nn.Sequential``'s output (following nested
    Sequentials), '' for a bare ``nn.Linear``, None when the forward decides."""
    if isinstance(model, nn.Linear):
        return ""
    name, mod = "", model
    while isinstance(mod, nn.Sequential) and len(mod):
        key = list(mod._modules)[-1]
        name, mod = f"{name}.{key}" if name else key, mod[-1]
    return name if name else None


def _static_output_layer(model: nn.Module, prefix: str = "") -> str | None:
    """The name of the ``nn.Linear`` whose output the model returns, read from a
    ``torch.fx`` trace of the forward pass with every submodule a leaf (no data needed):
    the output node, through rearranging views, must be a submodule call — an
    ``nn.Linear`` (found), an ``nn.Sequential`` (its tail) or another module (looked into
    the same way). None where the code does not show it (control flow on values, a
    functional final layer, …); the first step then finds the layer by a forward pass."""
    from torch import fx

    graph = passes.code_graph(model)
    if graph is None:
        return None
    node = next((n.args[0] for n in graph.nodes if n.op == "output"), None)
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function") \
            and getattr(node.target, "__name__", node.target) in _VIEWS and node.args:
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return None
    name = f"{prefix}{node.target}"
    mod = model.get_submodule(str(node.target))
    if isinstance(mod, nn.Linear):
        return name
    tail = _sequential_tail(mod)
    if tail:
        return f"{name}.{tail}"
    return _static_output_layer(mod, f"{name}.")


# rearranging views of the final layer's output the model may return (see
# :func:`curvkit.solvers._varpro_reduced.output_permutation`)
_VIEWS = frozenset({"transpose", "permute", "view", "reshape", "flatten", "unflatten",
                    "squeeze", "unsqueeze", "t", "movedim", "swapaxes", "contiguous"})


def _trace(model: nn.Module, X: Any, layer: str) -> tuple[Any, dict[str, tuple[int, Any]]]:
    """One forward pass through :func:`curvkit.passes.forward` (no gradients, buffer
    copies, the enclosing scope's random state) recording how often every ``nn.Linear``
    (and ``layer``) runs and its last output. The hooks are removed before returning."""
    calls: dict[str, list[Any]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or (layer and name == layer):
            def hook(_m, _inp, out, name=name):
                entry = calls.setdefault(name, [0, None])
                entry[0] += 1
                entry[1] = out
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad(), passes.rng_scope(model):
            out = passes.forward(model, X, dict(model.named_parameters()))
    finally:
        for h in handles:
            h.remove()
    return out, {n: (c, o) for n, (c, o) in calls.items()}
