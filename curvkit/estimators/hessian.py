"""``hessian``: the exact Hessian of the loss, by Pearlmutter Hessian-vector products."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from curvkit.estimators._autograd import (
    check_direction_and_partition,
    grad_with_zeros,
    group_pieces,
    loss_graph,
    require_trainable,
)
from curvkit.estimators.base import Batch, CurvatureEstimator, Summary
from curvkit.options import option
from curvkit.parts import DENSE, DIAGONAL, MATVEC, SUMMARY, SUMMARY_D3


# ----------------------------------------------------------------------------- the estimator
class HessianEstimator(CurvatureEstimator):
    """Exact Hessian of the loss (Pearlmutter HVP; double backward).

    C = ∇²_θ L(θ) with L the loss under its reduction (the mean loss for "mean", the summed
    loss for "sum") over the batch.

    Hessian-vector products use double backward (reverse-over-reverse: one backward with
    ``create_graph=True``, then one backward of ⟨∇L, v⟩): on CPU it was cheaper than both
    forward-over-reverse variants (torch.func.jvp of torch.func.grad, autograd.forward_ad
    duals) on the models of ``benchmarks/bench_estimators.py``, and it runs on the model
    itself (``functional_call`` on fresh leaves cost more per product); the measured ratios
    are in docs/benchmarks.md, not here, where they would go stale. ``dense`` and
    ``diagonal`` reuse one gradient graph for all their directions (``is_grads_batched``,
    chunked by ``chunk_size``), and so does ``linearize(batch)`` for the products a Krylov
    solver asks for one at a time: the forward and the backward with graph once (about one
    gradient), then only the double backward per product (flop counts per layer, in
    forward-matmul units: 6 against ``matvec``'s 3 + 6, a gradient being 3), bitwise equal.

    Capabilities: matvec, dense, diagonal (Hutchinson: E[z ⊙ Hz] with Rademacher z,
    ``samples`` probes from this estimator's generator; unbiased, not exact), summary
    (Wolinski's ḡ, H̄ and diag D³ over a partition of the parameters).
    """

    name = "hessian"
    provides = frozenset({MATVEC, DENSE, DIAGONAL, SUMMARY, SUMMARY_D3})

    @dataclass
    class Options:
        samples: int = option(64, "Hutchinson probes for `diagonal`", min=1)
        seed: int = option(0, "seed of the Hutchinson probes' private generator")
        chunk_size: int = option(0, "directions batched at once in dense/diagonal "
                                    "(0 = all at once)", min=0)

    def __init__(self, model: Any, loss_fn: Any, options: Any | None = None) -> None:
        super().__init__(model, loss_fn, options)
        require_trainable(self)

    # ------------------------------------------------------------- one batch
    def _gradient_graph(self, X: Any, y: Tensor) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """(θ, loss, ∇L with its graph) — the start of every double backward."""
        params, loss = loss_graph(self, X, y)
        with torch.enable_grad():
            grads = grad_with_zeros([loss], params, [torch.ones_like(loss)], create_graph=True)
        return params, loss, grads

    def _hvps(self, params: list[Tensor], grads: list[Tensor], V: list[Tensor],
              create_graph: bool = False) -> list[Tensor]:
        """H V for a batch of K directions V (list of (K, *shape)), chunked."""
        k = V[0].shape[0]
        step = self.options.chunk_size or k
        chunks = []
        for start in range(0, k, step):
            Vc = [v[start:start + step] for v in V]
            with torch.enable_grad():
                chunks.append(grad_with_zeros(grads, params, Vc, create_graph=create_graph,
                                              is_grads_batched=True,
                                              retain_graph=create_graph or start + step < k))
        if len(chunks) == 1:
            return chunks[0]
        return [torch.cat(parts) for parts in zip(*chunks)]

    def _matvec(self, X: Any, y: Tensor, v: list[Tensor]) -> list[Tensor]:
        params, _, grads = self._gradient_graph(X, y)
        with torch.enable_grad():
            hv = grad_with_zeros(grads, params, [t.to(g.dtype) for t, g in zip(v, grads)])
        return [t.detach() for t in hv]

    def _linearize(self, X: Any, y: Tensor) -> Callable[[list[Tensor]], list[Tensor]]:
        """v ↦ H_b v reusing one gradient graph: the forward pass and the backward with
        ``create_graph=True`` are done once, here; each product is one backward of ⟨∇L, v⟩
        through the kept graph (``retain_graph=True``). The graph (activations and the
        gradient's own graph, a few times the activations of the batch) lives as long as
        the returned callable, i.e. as long as the ``linearize()`` operator holding it."""
        params, _, grads = self._gradient_graph(X, y)

        def hvp(v: list[Tensor]) -> list[Tensor]:
            with torch.enable_grad():
                hv = grad_with_zeros(grads, params, [t.to(g.dtype) for t, g in zip(v, grads)],
                                     retain_graph=True)
            return [t.detach() for t in hv]

        return hvp

    def _dense(self, X: Any, y: Tensor) -> Tensor:
        params, _, grads = self._gradient_graph(X, y)
        P = sum(p.numel() for p in params)
        eye = torch.eye(P, dtype=params[0].dtype, device=params[0].device)
        E, start = [], 0
        for p in params:
            E.append(eye[:, start:start + p.numel()].reshape(P, *p.shape))
            start += p.numel()
        cols = self._hvps(params, grads, E)  # row i = H e_i = column i (H symmetric)
        return torch.cat([c.reshape(P, -1) for c in cols], dim=1).detach().T.contiguous()

    # ------------------------------------------------------------- diagonal (Hutchinson)
    def diagonal(self, batch: Batch | Iterable[Batch]) -> list[Tensor]:
        """Hutchinson estimate of diag(H), shaped like the parameters.

        diag(H) ≈ (1/K) Σ_k z_k ⊙ H z_k, z_k ∈ {±1}^P Rademacher, K = ``samples``; unbiased
        (E[z zᵀ] = I). The probes come from ``self.generator(seed)``: repeated calls within
        one draw give identical results and the global RNG is untouched. The same probes
        are used for every batch, so several batches give the estimate of the combined loss.
        """
        params = self.params
        K = self.options.samples
        gen = self.generator(self.options.seed)
        # drawn on the CPU generator (the same probes on any device), used on the params' one
        Z = [(torch.randint(0, 2, (K, *p.shape), generator=gen) * 2 - 1).to(
            device=p.device, dtype=p.dtype) for p in params]

        def one(X: Any, y: Tensor) -> list[Tensor]:
            leaves_, _, grads = self._gradient_graph(X, y)
            HZ = self._hvps(leaves_, grads, Z)
            return [(z * hz).mean(0).detach() for z, hz in zip(Z, HZ)]

        return self.accumulate(batch, one)

    # ------------------------------------------------------------- summary
    def summary(self, batch: Batch | Iterable[Batch], direction: Sequence[Tensor],
                partition: Sequence[Tensor] | None = None, groups: int | None = None
                ) -> Summary:
        """Wolinski's partition summary of the Hessian along ``direction``.

        With u_s = direction restricted to group s (``partition``: one integer tensor per
        trainable parameter, 0-dim for a whole tensor or shaped like it; ``groups`` = S) and
        φ(η) = L(θ + Σ_s η_s u_s):  g = ∇φ(0) (S,), H = ∇²φ(0) = ŪᵀHŪ (S, S) and
        D3[s] = ∂³φ/∂η_s³(0) (S,).

        Computation (reverse mode; measured fastest, see below): one gradient with its graph
        gives ḡ_s = ⟨∇L, u_s⟩; then per group s one double backward of ḡ_s with graph,
        restricted to the parameter tensors of groups t ≥ s, gives row s of H̄ (upper
        triangle), and one triple backward of H̄[s, s] = u_sᵀHu_s restricted to group s's
        tensors gives D3[s]: 1 + 2S backward passes, against 1 + 3S in Wolinski's
        reference (which runs the H̄ row and the D3 double backward separately).

        Third derivatives through normalization layers: PyTorch's fused ``layer_norm`` /
        ``batch_norm`` / ``group_norm`` kernels hold their saved statistics constant from
        the third order on (triple backward through LayerNorm 122.4 against 120.7 by finite
        differences, BatchNorm in training mode 6.39 against 0.677; forward mode over
        their backward is off the same way), so every estimator pass runs under
        :func:`curvkit.passes.differentiable`, where they are elementary operations; D3
        then matches finite differences (tests/test_zoo.py).

        Batching the S directions instead (``is_grads_batched`` double/triple backward, or
        ``torch.func.vmap`` over nested ``jvp``/``grad``) was slower on CPU for the
        canonical partition (the per-op overhead of batched/nested transforms exceeds the
        work they batch) and only on par for the discrete partition S = P, so the loop over
        groups is used.
        """
        partition, S = check_direction_and_partition(self, direction, partition, groups)
        pieces = group_pieces([d.detach() for d in direction], partition, S)

        def one(X: Any, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return self._summary(X, y, pieces)

        g, H, D3 = self.accumulate(batch, one)
        return Summary(g=g, H=H, D3=D3)

    def _summary(self, X: Any, y: Tensor, pieces: list[dict[int, Tensor]]
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-group double/triple backward restricted to each group's parameter tensors."""
        params, _, grads = self._gradient_graph(X, y)
        S = len(pieces)
        zero = torch.zeros((), dtype=grads[0].dtype, device=grads[0].device)

        def dot(vectors: dict[int, Tensor | None], s: int) -> Tensor:
            return sum(((vectors[i] * u).sum() for i, u in pieces[s].items()
                        if vectors.get(i) is not None), zero)

        def grad(out: Tensor, idx: list[int], create_graph: bool = False
                 ) -> dict[int, Tensor | None]:
            got = torch.autograd.grad(out, [params[i] for i in idx], retain_graph=True,
                                      create_graph=create_graph, allow_unused=True)
            return dict(zip(idx, got))

        with torch.enable_grad():
            gt = [dot(dict(enumerate(grads)), s) for s in range(S)]
        g = torch.stack([t.detach() for t in gt])
        H = torch.zeros(S, S, dtype=g.dtype, device=g.device)
        D3 = torch.zeros(S, dtype=g.dtype, device=g.device)
        for s in range(S):
            if not pieces[s] or not gt[s].requires_grad:
                continue  # empty group, or a loss linear in this group: zero row, D3 = 0
            own = sorted(pieces[s])
            later = sorted({i for t in range(s + 1, S) for i in pieces[t]} - set(own))
            with torch.enable_grad():
                # one double backward gives row s of H̄ (t ≥ s) and, with its graph, q_s
                hu = grad(gt[s], own + later, create_graph=True)
                q = dot(hu, s)  # u_sᵀ H u_s
            H[s, s] = q.detach()
            for t in range(s + 1, S):
                H[s, t] = H[t, s] = dot(hu, t).detach()
            if q.requires_grad:
                D3[s] = dot(grad(q, own), s).detach()
        return g, H, D3
