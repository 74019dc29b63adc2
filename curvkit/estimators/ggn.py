"""``ggn``: the generalized Gauss-Newton matrix G = Jᵀ H_loss J."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import grad, jvp, vjp, vmap

from curvkit import passes
from curvkit.estimators._autograd import (
    check_direction_and_partition,
    grad_with_zeros,
    group_directions,
    leaves,
    require_trainable,
)
from curvkit.estimators._backpack import Backend, BackpackBackend, backend_option
from curvkit.estimators.base import Batch, CurvatureEstimator, Summary
from curvkit.losses import LOSS_HESSIAN, UnsupportedLossError, loss_part, output_hvp
from curvkit.options import option
from curvkit.parts import DENSE, DIAGONAL, KRONECKER, MATVEC, SUMMARY


class GGNEstimator(CurvatureEstimator):
    """Generalized Gauss-Newton matrix G = Jᵀ H_loss J.

    With f(θ, X) the model output (N, C, …), J = ∂f/∂θ ((N·C…) × P) and H_loss = ∂²L/∂f² the
    Hessian of the loss (under its reduction) w.r.t. the output, G = Jᵀ H_loss J; for
    "mean" this is the GGN of the mean loss, for "sum" of the summed loss.

    ``matvec``: one forward pass with forward-mode duals gives f and Jv together (the primal
    keeps its autograd graph), w = H_loss (Jv) — the loss part's output-Hessian product
    (:mod:`curvkit.losses`), ``torch.func`` on the loss for a loss no part describes —
    then one backward gives Jᵀw (timings against curvlinops' ``GGNLinearOperator``:
    docs/benchmarks.md).

    ``linearize(batch)`` (Krylov solvers: many products on one batch at one θ) keeps the
    forward graph and the graph of Jᵀw for a dummy w, and gets J v from a backward of
    ⟨Jᵀw, v⟩ w.r.t. w (see ``_linearize``): cheaper per product than ``matvec`` after
    an operator that costs about one gradient (measured ratios: docs/benchmarks.md).

    ``backend = "backpack"``: ``diagonal`` and ``kronecker`` from BackPACK's DiagGGNExact
    and KFLR on a private copy of the model (:mod:`curvkit.estimators._backpack`).

    Capabilities: matvec, dense, diagonal (exact: Σ_n Σ_k (J_nᵀ s_{n,k})² with
    Σ_k s_{n,k}s_{n,k}ᵀ the scaled per-sample loss Hessian; see ``diagonal``), kronecker
    (K-FAC/KFLR factors, see ``curvkit.estimators.kfac``), summary (ḡ and H̄ = ŪᵀGŪ; D3 is
    None: the GGN is not the Hessian of φ(η), so it has no third derivative to go with it).
    """

    name = "ggn"
    provides = frozenset({MATVEC, DENSE, DIAGONAL, KRONECKER, SUMMARY})

    @dataclass
    class Options:
        kfac_approx: Literal["expand", "reduce"] = option(
            "expand", "K-FAC flavour for weight-sharing layers (used by `kronecker`)")
        chunk_size: int = option(0, "samples (diagonal) or directions (dense/summary) "
                                    "batched at once by vmap (0 = all at once)", min=0)
        backend: Backend = backend_option()

    def __init__(self, model: nn.Module, loss_fn: Any, options: Any | None = None) -> None:
        super().__init__(model, loss_fn, options)
        require_trainable(self)
        if self.loss is not None and LOSS_HESSIAN not in self.loss.provides:
            # e.g. NLLLoss: linear in the output, a zero GGN (the message says so)
            loss_part(self.loss, f"estimator {self.name!r}", needs=[LOSS_HESSIAN])
        # BackPACK's DiagGGNExact / KFLR (curvkit.estimators._backpack); None: autograd
        self._backpack = (BackpackBackend(self, "exact")
                          if self.options.backend == "backpack" else None)

    def refusal(self, capability: str) -> str:
        if self._backpack is not None:
            why = self._backpack.refusal(capability)
            if why:
                return why
        if capability == KRONECKER and self.loss is None:
            try:  # the loss part's own refusal: unknown loss, or settings it cannot handle
                loss_part(self.loss_fn, f"estimator {self.name!r}", needs=[LOSS_HESSIAN])
            except UnsupportedLossError as err:
                return str(err)
        return ""

    # ------------------------------------------------------------- pieces
    def _chunk(self) -> int | None:
        return self.options.chunk_size or None

    def _output_hvp(self, out: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        """w ↦ H_loss w, the Hessian of the loss (under its reduction) w.r.t. the model
        output at ``out``: the loss part's c·H (:mod:`curvkit.losses`), or ``torch.func`` on
        the loss itself for a loss no part describes."""
        if self.loss is not None:
            self.loss.check(out, y, f"estimator {self.name!r}")
        return output_hvp(self.loss_fn, out, y, self.loss)

    def _forward_jvp(self, X: Any, v: Sequence[Tensor]) -> tuple[list[Tensor], Tensor, Tensor]:
        """(leaves θ, f(θ, X) with its graph, Jv) from one forward pass with duals."""
        params = leaves(self)
        f = self.forward_fn()
        with torch.enable_grad(), fwAD.dual_level():
            duals = [fwAD.make_dual(p, t.to(p.dtype)) for p, t in zip(params, v)]
            out, jv = fwAD.unpack_dual(f(duals, X))
        if jv is None:  # output independent of the parameters
            jv = torch.zeros_like(out)
        return params, out, jv.detach()

    # ------------------------------------------------------------- one batch
    def _matvec(self, X: Any, y: Tensor, v: list[Tensor]) -> list[Tensor]:
        params, out, jv = self._forward_jvp(X, v)
        w = self._output_hvp(out, y)(jv)
        with torch.enable_grad():
            res = grad_with_zeros([out], params, [w])
        return [r.detach() for r in res]

    def _linearize(self, X: Any, y: Tensor) -> Callable[[list[Tensor]], list[Tensor]]:
        """v ↦ G_b v reusing one forward graph (for ``linearize``).

        Once, here: the forward pass f(θ, X) with its graph, H_loss at f, and with a dummy
        cotangent w (zeros shaped like f, a leaf) the backward Jᵀw with ``create_graph=True``.
        Jᵀw is linear in w, so its vector-Jacobian product with v w.r.t. w is J v (the
        "double-vjp" trick: forward mode by two reverse passes). Per product: J v by that
        backward through the graph of Jᵀw, u = H_loss (J v), then Jᵀu by a backward through
        the kept forward graph — no forward pass. Measured faster per product than
        ``matvec`` on both benchmark models (``benchmarks/bench_estimators.py``; numbers in
        docs/benchmarks.md). Both graphs (activations plus the graph of Jᵀw) live as long
        as the returned callable, i.e. as long as the ``linearize()`` operator.
        """
        if next(self.model.buffers(), None) is None:
            # the model itself (no buffers to protect): cheaper than functional_call
            params = self.params
            with torch.enable_grad():
                out = passes.require_tensor_output(passes.forward(self.model, X), self.model,
                                                   f"estimator {self.name!r}")
        else:
            params = leaves(self)
            with torch.enable_grad():
                out = self.forward_fn()(params, X)
        hvp = self._output_hvp(out, y)
        w = torch.zeros_like(out.detach()).requires_grad_(True)
        with torch.enable_grad():
            jtw = grad_with_zeros([out], params, [w], create_graph=True)

        def product(v: list[Tensor]) -> list[Tensor]:
            with torch.enable_grad():
                jv = grad_with_zeros(jtw, [w], [t.to(p.dtype) for t, p in zip(v, params)],
                                     retain_graph=True)[0]
                res = grad_with_zeros([out], params, [hvp(jv.detach())], retain_graph=True)
            return [r.detach() for r in res]

        return product

    def _dense(self, X: Any, y: Tensor) -> Tensor:
        out, J = self.output_jacobian(X, chunk_size=self._chunk())
        hvp = self._output_hvp(out, y)
        P = J.shape[1]
        cols = J.T.reshape(P, *out.shape)  # column p of J, shaped like the output
        HJ = vmap(hvp, chunk_size=self._chunk())(cols).reshape(P, -1)
        return J.T @ HJ.T

    # ------------------------------------------------------------- diagonal (exact)
    def diagonal(self, batch: Batch | Iterable[Batch]) -> list[Tensor]:
        """Exact diag(G), shaped like the parameters.

        diag(G) = Σ_n Σ_k (J_nᵀ s_{n,k})² with Σ_k s_{n,k} s_{n,k}ᵀ = c·∂²ℓ_n/∂f_n² a
        square-root factorization of the (scaled) per-sample loss Hessian, c the reduction
        factor — the loss part's ``hessian_sqrt`` with one column per loss term and output
        dimension (:mod:`curvkit.losses`; e.g. cross-entropy √p_k (e_k − p) per position,
        MSE √2 e_k), so the diagonal is exact also for models that mix positions.
        J_nᵀ s_{n,k} is never formed for Linear/Conv2d parameters: their diagonal comes from
        the layer inputs a and the backpropagated columns g, Σ_{n,k} (g_{n,k}²)ᵀ(a_n²)
        (:func:`curvkit.estimators.kfac.layer_diagonals`, one forward and one batched
        backward). Every other parameter (a module called twice, bare parameters, …) uses
        per-sample vector-Jacobian products (``torch.func.vmap`` over samples, each model
        call on one sample). A loss no part describes, non-tensor inputs, and models whose
        batch outputs are not their per-sample outputs (BatchNorm in training mode, dropout:
        see :func:`curvkit.passes.per_sample_obstacle`) use diag(Jᵀ H_loss J) from the full
        Jacobian (exact, costlier).
        """
        if self._backpack is not None:
            return self._backpack.diagonal(batch)
        # first derivatives of the model only (layer captures, per-sample or full
        # Jacobians; the loss' Hessian is the loss part's): no normalization decomposition,
        # which costs a Python call per operation
        return self.accumulate(batch, self._diagonal, first_order=True)

    def _diagonal(self, X: Any, y: Tensor) -> list[Tensor]:
        from curvkit.estimators.kfac import layer_diagonals, output_columns

        if not isinstance(X, Tensor) or self.loss is None:
            return self._diagonal_from_jacobian(X, y)
        where = f"estimator {self.name!r}"

        def columns(o: Tensor) -> Tensor:
            # one column per (term, output dimension): exact for models that mix positions
            return output_columns(self.loss, o, y, "exact", where=where, terms="separate")

        found = layer_diagonals(self, X, columns, per_sample=True)
        if found is None:  # per-sample passes would compute another function
            return self._diagonal_from_jacobian(X, y)
        covered, out, cols = found
        named = self.named_params
        rest = [i for i, (n, _) in enumerate(named) if n not in covered]
        res = [covered.get(n) for n, _ in named]
        if rest:
            params = [p.detach() for p in self.params]
            for i, d in zip(rest, self._per_sample_diagonal(X, cols, params, rest)):
                res[i] = d
        return [r.detach() for r in res]

    def _per_sample_diagonal(self, X: Tensor, cols: Tensor, params: list[Tensor],
                             idx: list[int]) -> list[Tensor]:
        """Σ_{n,k} (J_nᵀ s_{n,k})² for the parameters ``idx`` (vmap over samples)."""
        f = self.forward_fn()

        def per_sample(xn: Tensor, sn: Tensor) -> list[Tensor]:
            def fn(sub: list[Tensor]) -> Tensor:
                ps = list(params)
                for j, t in zip(idx, sub):
                    ps[j] = t
                return f(ps, xn.unsqueeze(0)).reshape(-1)

            _, pull = vjp(fn, [params[j] for j in idx])
            grads = vmap(pull)(sn.reshape(sn.shape[0], -1))[0]  # J_nᵀ s_{n,k}: (K, *shape)
            return [(g ** 2).sum(0) for g in grads]

        contrib = passes.vmap_or_loop(per_sample, X, cols.transpose(0, 1),
                                      chunk_size=self._chunk())
        return [c.sum(0) for c in contrib]

    def _diagonal_from_jacobian(self, X: Any, y: Tensor) -> list[Tensor]:
        out, J = self.output_jacobian(X, chunk_size=self._chunk())
        hvp = self._output_hvp(out, y)
        P = J.shape[1]
        HJ = vmap(hvp, chunk_size=self._chunk())(J.T.reshape(P, *out.shape)).reshape(P, -1)
        diag = (J.T * HJ).sum(1)
        res, start = [], 0
        for p in self.params:
            res.append(diag[start:start + p.numel()].view_as(p))
            start += p.numel()
        return res

    # ------------------------------------------------------------- kronecker
    def kronecker(self, batch, approx=None):
        """K-FAC factors of the GGN (exact loss-Hessian factors, KFLR); see curvkit.estimators.kfac.
        ``approx`` overrides the ``kfac_approx`` option for this call."""
        from curvkit.estimators.kfac import kronecker_factors
        if self._backpack is not None:
            return self._backpack.kronecker(batch)
        return kronecker_factors(self, batch, statistic="exact",
                                 approx=approx or self.options.kfac_approx)

    # ------------------------------------------------------------- summary
    def summary(self, batch: Batch | Iterable[Batch], direction: Sequence[Tensor],
                partition: Sequence[Tensor] | None = None, groups: int | None = None
                ) -> Summary:
        """Partition summary with the GGN: g[s] = u_sᵀ∇L, H[s,t] = (J u_s)ᵀ H_loss (J u_t),
        D3 = None.

        Forward mode only: the S Jacobian-vector products J u_s are batched with
        ``vmap`` over ``jvp``; g uses ∇L = Jᵀ∇_f L, i.e. g[s] = ⟨J u_s, ∇_f L⟩.
        ``partition``/``groups`` as for ``hessian`` (default: one group per parameter tensor).
        """
        partition, S = check_direction_and_partition(self, direction, partition, groups)
        U = group_directions([d.detach() for d in direction], partition, S)

        def one(X: Any, y: Tensor) -> tuple[Tensor, Tensor]:
            return self._summary(X, y, U)

        g, H = self.accumulate(batch, one)
        return Summary(g=g, H=H, D3=None)

    def _summary(self, X: Any, y: Tensor, U: list[Tensor]) -> tuple[Tensor, Tensor]:
        f = self.forward_fn()
        params = tuple(p.detach() for p in self.params)
        S = U[0].shape[0]

        def push(*u: Tensor) -> tuple[Tensor, Tensor]:
            return jvp(lambda *ps: f(ps, X), params, u)

        # "error": a forward that draws random numbers runs one direction at a time (vmap's
        # masks differ from a plain forward's on non-contiguous tensors; see output_jacobian)
        outs, JU = passes.vmap_or_loop(push, *U, chunk_size=self._chunk(), randomness="error")
        out = outs[0]
        g_out = grad(lambda o: self.loss_fn(o, y))(out)
        HJU = vmap(self._output_hvp(out, y), chunk_size=self._chunk())(JU)
        JU = JU.reshape(S, -1)
        return JU @ g_out.reshape(-1), JU @ HJU.reshape(S, -1).T
