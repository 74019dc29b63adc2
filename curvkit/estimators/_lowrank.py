"""Estimators C = Σ_n J_nᵀ B_n J_n with a low-rank output-space matrix B_n = Σ_k s_{n,k} s_{n,k}ᵀ.

The empirical Fisher (``ef``: one column, √c ∇_f ℓ(f_n, y_n)) and the Monte Carlo Fisher
(``fisher``: M columns √(c/M) ∇_f ℓ(f_n, ŷ_m)) share all their products; a subclass only
supplies the columns (``_columns``) and its K-FAC statistic. J_n = ∂f_n/∂θ is the Jacobian of
sample n's output, c the loss' reduction factor (:func:`curvkit.losses.reduction_factor`).

* ``matvec``: one forward pass with forward-mode duals gives f and Jv, then
  u_n = Σ_k s_{n,k} ⟨s_{n,k}, (Jv)_n⟩ and one backward gives Jᵀu — no per-sample gradients.
* ``dense``: the Jacobian J (forward or reverse mode, whichever needs fewer passes), then
  C = Σ_{n,k} (J_nᵀ s_{n,k})(J_nᵀ s_{n,k})ᵀ.
* ``diagonal``: Linear/Conv2d parameters from the layers' inputs and output gradients
  (:func:`curvkit.estimators.kfac.layer_diagonals`); all other parameters from per-sample
  vector-Jacobian products (``torch.func.vmap`` over samples, a loop where vmap cannot
  batch the model). Models whose batch outputs are not their per-sample outputs because
  the forward draws random numbers (dropout) use diag(WᵀW) from the full Jacobian.
* ``kronecker``: :func:`curvkit.estimators.kfac.kronecker_factors`.

Several batches are combined by :meth:`CurvatureEstimator.accumulate`; each batch gets its
index, so that Monte Carlo columns are drawn per batch from a generator seeded by that index
(every product within one draw sees the same samples).
"""

from __future__ import annotations

import abc
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.utils._pytree import tree_map

from curvkit import passes
from curvkit.estimators._autograd import grad_with_zeros, leaves, require_trainable
from curvkit.estimators._backpack import BackpackBackend, Statistic
from curvkit.estimators.base import Batch, CurvatureEstimator, KroneckerFactors, as_batches
from curvkit.estimators.kfac import Observation, layer_diagonals
from curvkit.losses import LOSS_GRADIENT, loss_part
from curvkit.params import check_like, unflatten
from curvkit.parts import DENSE, DIAGONAL, KRONECKER, KRONECKER_ROOTS, MATVEC


class LowRankOutputEstimator(CurvatureEstimator):
    """C = Σ_n J_nᵀ (Σ_k s_{n,k} s_{n,k}ᵀ) J_n; subclasses define the columns s."""

    provides = frozenset({MATVEC, DENSE, DIAGONAL, KRONECKER, KRONECKER_ROOTS})

    #: what the columns need from the loss part (curvkit.losses)
    loss_needs: ClassVar[str] = LOSS_GRADIENT
    #: the K-FAC statistic of the columns (the BackPACK backend picks its extension by it)
    statistic: ClassVar[Statistic] = "empirical"

    def __init__(self, model: nn.Module, loss_fn: Any, options: Any | None = None) -> None:
        super().__init__(model, loss_fn, options)
        require_trainable(self)
        self.loss = loss_part(loss_fn, f"estimator {self.name!r}", needs=[self.loss_needs])
        # the BackPACK backend (curvkit.estimators._backpack) when the option asks for it
        self._backpack = (BackpackBackend(self, self.statistic)
                          if getattr(self.options, "backend", "autograd") == "backpack"
                          else None)

    def _separate_terms(self) -> bool:
        """Whether B_n = Σ_k Σ_t (s_{n,k} on term t)(…)ᵀ, one outer product per loss term
        (the loss part's terms: positions of a sequence, …), instead of Σ_k s_{n,k}s_{n,k}ᵀ
        over the whole sample. Default: per sample."""
        return False

    def _term_columns(self, cols: Tensor, shape: torch.Size) -> Tensor:
        """(K·T, *shape): each column restricted to each of the T loss terms, so that
        Σ over them of the outer products is the per-term B_n (unchanged when T = 1)."""
        ct = self.loss.terms(cols, lead=1)                  # (K, N, T, D)
        K, N, T, D = ct.shape
        if T == 1:
            return cols
        eye = torch.eye(T, dtype=cols.dtype, device=cols.device)
        ex = ct.unsqueeze(1) * eye[None, :, None, :, None]  # (K, T, N, T, D)
        return self.loss.untermed(ex.reshape(K * T, N, T, D), shape, lead=1)

    # ------------------------------------------------------------- for subclasses
    @abc.abstractmethod
    def _columns(self, out: Tensor, y: Tensor, index: int) -> Tensor:
        """(K, *out.shape): the columns s_k of batch ``index`` (loss scaling included)."""

    @abc.abstractmethod
    def kronecker(self, batch: Batch | Iterable[Batch], approx: str | None = None
                  ) -> dict[str, KroneckerFactors]:
        """K-FAC factors per Linear/Conv2d layer (``approx`` overrides ``kfac_approx``)."""

    def kronecker_roots(self, batch: Batch | Iterable[Batch], approx: str | None = None
                        ) -> dict[str, Any] | None:
        """Square roots of ``kronecker``'s factors, A = A_rootᵀA_root, G = G_rootᵀG_root
        (:class:`~curvkit.estimators.base.KroneckerRoots`; None under several ranks). Same
        columns as ``kronecker``; see :mod:`curvkit.estimators.kfac`."""
        from curvkit.estimators.kfac import kronecker_roots
        if self._backpack is not None:
            return None  # BackPACK gives the factors, not their roots: use `kronecker`
        with passes.evaluation(self.model, higher_order=False):
            return kronecker_roots(self, batch, approx or self.options.kfac_approx,
                                   self._columns, observed=self._observation)

    def _observation(self, X: Any, y: Tensor) -> Observation | None:
        """The recorded pass on exactly this batch (see ``observe``); the base has none."""
        return None

    # ------------------------------------------------------------- batches
    def _per_batch(self, batch: Batch | Iterable[Batch],
                   fn: Callable[[Any, Tensor, int], Any], first_order: bool = False) -> Any:
        counter = itertools.count()
        return self.accumulate(as_batches(batch), lambda X, y: fn(X, y, next(counter)),
                               first_order=first_order)

    def matvec(self, batch: Batch | Iterable[Batch], v: Iterable[Tensor]) -> list[Tensor]:
        v = list(v)
        check_like(v, self.params)
        return self._per_batch(batch, lambda X, y, i: self._matvec_at(X, y, v, i))

    def dense(self, batch: Batch | Iterable[Batch]) -> Tensor:
        return self._per_batch(batch, self._dense_at)

    def diagonal(self, batch: Batch | Iterable[Batch]) -> list[Tensor]:
        """diag(C), shaped like the parameters."""
        if self._backpack is not None:
            return self._backpack_diagonal(batch)
        # first derivatives only (layer captures, per-sample gradients, Jacobian rows): no
        # normalization decomposition, which costs a Python call per operation
        return self._per_batch(batch, self._diagonal_at, first_order=True)

    def _backpack_diagonal(self, batch: Batch | Iterable[Batch]) -> list[Tensor]:
        """diag(C) from BackPACK (``backend = "backpack"``); subclasses add their seeds."""
        assert self._backpack is not None
        return self._backpack.diagonal(batch, per_term=self._separate_terms())

    def _matvec(self, X: Any, y: Tensor, v: list[Tensor]) -> list[Tensor]:
        return self._matvec_at(X, y, v, 0)

    def _dense(self, X: Any, y: Tensor) -> Tensor:
        return self._dense_at(X, y, 0)

    # ------------------------------------------------------------- one batch
    def _matvec_at(self, X: Any, y: Tensor, v: list[Tensor], index: int) -> list[Tensor]:
        params = leaves(self)
        f = self.forward_fn()
        with torch.enable_grad(), fwAD.dual_level():
            duals = [fwAD.make_dual(p, t.to(p.dtype)) for p, t in zip(params, v)]
            out, jv = fwAD.unpack_dual(f(duals, X))
        jv = torch.zeros_like(out) if jv is None else jv.detach()
        cols = self._columns(out.detach(), y, index)
        K, N = cols.shape[0], out.shape[0]
        if self._separate_terms():
            ct = self.loss.terms(cols, lead=1)                     # (K, N, T, D)
            coef = (ct * self.loss.terms(jv).unsqueeze(0)).sum(-1)  # ⟨s_{n,t,k}, (Jv)_{n,t}⟩
            u = self.loss.untermed((coef.unsqueeze(-1) * ct).sum(0), out.shape)
        else:
            coef = (cols.reshape(K, N, -1) * jv.reshape(1, N, -1)).sum(2)  # ⟨s_{n,k}, (Jv)_n⟩
            u = (coef.reshape(K, N, *([1] * (out.ndim - 1))) * cols).sum(0)
        with torch.enable_grad():
            res = grad_with_zeros([out], params, [u])
        return [r.detach() for r in res]

    def _weighted_jacobian(self, X: Any, y: Tensor, index: int) -> Tensor:
        """W (K·N, P) with rows J_nᵀ s_{n,k}, so that C = WᵀW (from the full Jacobian)."""
        out, J = self.output_jacobian(X)
        N, M, P = out.shape[0], out.numel(), J.shape[1]
        J = J.reshape(N, M // N, P)
        cols = self._columns(out, y, index)
        if self._separate_terms():
            Jt = self.loss.terms(J.reshape(M, P).T.reshape(P, *out.shape), lead=1)
            W = torch.einsum("kntd,pntd->kntp", self.loss.terms(cols, lead=1), Jt)
            W = W.reshape(-1, P)
        else:
            W = torch.einsum("kno,nop->knp", cols.reshape(cols.shape[0], N, -1),
                             J).reshape(-1, P)
        return W

    def _dense_at(self, X: Any, y: Tensor, index: int) -> Tensor:
        W = self._weighted_jacobian(X, y, index)
        return W.T @ W

    def refusal(self, capability: str) -> str:
        if self._backpack is not None:
            why = self._backpack.refusal(capability)
            if why:
                return why
        if capability == DIAGONAL:
            for mod_name, mod in self.model.named_modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
                    return (f"the diagonal needs per-sample quantities, but module "
                            f"{mod_name or '<model>'} ({type(mod).__name__}) is in training "
                            f"mode and couples the samples of a batch")
        return ""

    def _diagonal_at(self, X: Any, y: Tensor, index: int) -> list[Tensor]:
        why = self.refusal(DIAGONAL)
        if why:
            raise ValueError(f"estimator {self.name!r}: {why}; call model.eval() first, or "
                             f"use estimator 'ggn'")

        def columns(o: Tensor) -> Tensor:
            cols = self._columns(o, y, index)
            return self._term_columns(cols, o.shape) if self._separate_terms() else cols

        found = layer_diagonals(self, X, columns, per_sample=True)
        if found is None:
            # per-sample passes would compute another function: diag(WᵀW), exact, costlier
            diag = (self._weighted_jacobian(X, y, index) ** 2).sum(0)
            return [t.detach() for t in unflatten(diag, self.params)]
        covered, out, cols = found
        named = self.named_params
        rest = [i for i, (n, _) in enumerate(named) if n not in covered]
        other = self._per_sample_diagonal(X, cols, rest) if rest else []
        res = [covered[n] if n in covered else None for n, _ in named]
        for i, d in zip(rest, other):
            res[i] = d
        return [r.detach() for r in res]

    def _per_sample_diagonal(self, X: Any, cols: Tensor, idx: list[int]) -> list[Tensor]:
        """Σ_{n,k} (J_nᵀ s_{n,k})² for the parameters ``idx``, one sample at a time (vmap)."""
        f = self.forward_fn()
        params = [p.detach() for p in self.params]

        # vmap maps over tensors, tuples, lists and dicts: another mapping (UserDict, a
        # BatchEncoding) goes in as a dict and is rebuilt for the model
        rebuild = None
        if isinstance(X, Mapping) and type(X) is not dict:
            rebuild, X = type(X), dict(X)

        def per_sample(xn: Any, sn: Tensor) -> list[Tensor]:
            x1 = tree_map(lambda t: t.unsqueeze(0), xn)
            if rebuild is not None:
                x1 = rebuild(x1)

            def fn(sub: list[Tensor]) -> Tensor:
                ps = list(params)
                for j, t in zip(idx, sub):
                    ps[j] = t
                return f(ps, x1).reshape(-1)

            _, pull = vjp(fn, [params[j] for j in idx])
            grads = vmap(pull)(sn.reshape(sn.shape[0], -1))[0]
            return [(g ** 2).sum(0) for g in grads]

        contrib = passes.vmap_or_loop(per_sample, X, cols.transpose(0, 1),
                                      randomness="different")
        return [c.sum(0) for c in contrib]
