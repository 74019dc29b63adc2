"""Base of curvature estimators: bound to ``(model, loss_fn)``, evaluated on batches.

A subclass implements the curvature of *one* batch, as if that batch were the whole data
set (``_matvec``, and optionally ``_dense`` and the capability methods); the base turns
that into the curvature of the loss over all samples of several batches and of all ranks:

    C = Σ_b (N_b / N) C_b   for reduction "mean",      C = Σ_b C_b   for "sum",

exactly what curvlinops does for a data loader, and what a data-parallel run needs.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import jacfwd, jacrev
from torch.utils._pytree import tree_flatten, tree_unflatten

from curvkit import distributed, passes
from curvkit.linops import LinearOperator
from curvkit.losses import batch_size, reduction_of, try_loss_part
from curvkit.params import check_like, flatten, trainable, unflatten
from curvkit.parts import DENSE, MATVEC, Part

Batch = tuple[Any, Tensor]


@dataclass
class KroneckerFactors:
    """Kronecker factors of one Linear/Conv2d layer (the ``kronecker`` capability).

    The layer's weight W is viewed as a matrix (d_out, d_in) — Conv2d's weight as
    (out_channels, in_channels·kh·kw) — and, if the layer has a bias b that is trainable,
    augmented to W̃ = [W | b] (d_out, d_in + 1): the bias is the last column. With vec_r
    the row-major flattening (torch's ``reshape(-1)``), the layer's curvature block is

        C[vec_r(W̃), vec_r(W̃)] ≈ G ⊗ A,   A: (d_in [+1], d_in [+1]),  G: (d_out, d_out),

    so that (G ⊗ A)⁻¹ vec_r(∇W̃) = vec_r(G⁻¹ ∇W̃ A⁻¹). The scale of the loss (its reduction)
    is carried by G; A is the mean over samples (and, for "expand", over positions) of the
    augmented inputs' outer product. ``params`` are the full names of the parameters
    covered (weight first, then bias if present).
    """

    module: str
    params: tuple[str, ...]
    A: Tensor
    G: Tensor


@dataclass
class KroneckerRoots:
    """Square roots of one layer's Kronecker factors (optional ``kronecker_roots`` method).

    A = A_rootᵀ A_root and G = G_rootᵀ G_root for the :class:`KroneckerFactors` of the same
    layer and batch, with A_root (m_A, d_in [+1]) the scaled augmented inputs (one row per
    sample and, for "expand", position) and G_root (m_G, d_out) the scaled output gradients.
    A consumer that only needs a structured part of Kᵀ A K (``lie_group``) forms it from
    S = A_root K at the cost of products with A_root, without the d_in² · m_A of A itself.
    Estimators that declare the capability ``kronecker_roots`` (``parts.KRONECKER_ROOTS``)
    offer ``kronecker_roots(batch)`` returning ``{module: KroneckerRoots}``,
    or ``None`` where roots cannot be combined (several ranks): callers then use
    ``kronecker``.
    """

    module: str
    params: tuple[str, ...]
    A_root: Tensor
    G_root: Tensor


def layer_matrix(tensors: Sequence[Tensor]) -> Tensor:
    """A layer's [weight, bias] tensors → W̃ = [W | b], (d_out, d_in [+1]): the matrix the
    Kronecker factors act on (G ⊗ A over vec_r(W̃), see :class:`KroneckerFactors`)."""
    d_out = tensors[0].shape[0]
    return torch.cat([t.reshape(d_out, -1) for t in tensors], dim=1)


def split_layer_matrix(R: Tensor, like: Sequence[Tensor], same_dtype: bool = True
                       ) -> list[Tensor]:
    """Inverse of :func:`layer_matrix`: columns of R back to tensors shaped like ``like``
    (and typed like it, unless ``same_dtype`` is False: then R's dtype is kept)."""
    out, start = [], 0
    for t in like:
        k = t.numel() // t.shape[0]
        r = R[:, start:start + k].reshape(t.shape)
        out.append(r.to(t.dtype) if same_dtype and r.dtype != t.dtype else r)
        start += k
    return out


@dataclass
class Summary:
    """Partition summary (the ``summary`` capability), Wolinski's D^(1), D^(2), diag D^(3).

    For a direction u and a partition of the parameters into S groups (u_s = u restricted
    to group s), the derivatives at η = 0 of φ(η) = L(θ + Σ_s η_s u_s):

        g[s]    = ∂φ/∂η_s           = u_sᵀ ∇L                 (S,)
        H[s,t]  = ∂²φ/∂η_s∂η_t      = u_sᵀ C u_t               (S, S)  (C = H or the GGN)
        D3[s]   = ∂³φ/∂η_s³         = ∇³L[u_s, u_s, u_s]       (S,)    or None

    The step of Wolinski's method is θ ← θ − Σ_s η_s u_s with η = H⁻¹ g (or the cubic step).
    """

    g: Tensor
    H: Tensor
    D3: Tensor | None = None


def partition_masks(partition: Sequence[Tensor], like: Sequence[Tensor], groups: int
                    ) -> list[list[Tensor]]:
    """Group ids (one integer tensor per parameter, shaped like it, or a scalar for the whole
    tensor) → ``masks[s][i]``: the 0/1 mask of group s in parameter i, in the params' dtype."""
    masks = []
    for s in range(groups):
        masks.append([(torch.as_tensor(ids, device=p.device).expand_as(p) == s).to(p.dtype)
                      for ids, p in zip(partition, like)])
    return masks


def as_batches(batch: Batch | Iterable[Batch]) -> list[Batch]:
    """``(X, y)`` → ``[(X, y)]``; an iterable of such pairs → a list of them."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[1], Tensor) \
            and not isinstance(batch[0], (tuple, list)):
        return [tuple(batch)]
    batches = [tuple(b) for b in batch]
    if not batches:
        raise ValueError("empty batch iterable: curvature needs at least one (X, y) batch")
    for i, b in enumerate(batches):
        if len(b) != 2:
            raise ValueError(f"batch {i} has {len(b)} entries; expected (X, y)")
    return batches


class CurvatureEstimator(Part, abc.ABC):
    """How curvature is measured. Subclasses implement ``_matvec`` for one batch."""

    kind = "estimator"
    provides = frozenset({MATVEC, DENSE})
    # Capabilities whose statistics can be taken from the caller's own forward and backward
    # pass on a batch instead of another pass (see ``observe``); empty: none.
    observed: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                 options: Any | None = None) -> None:
        super().__init__(options)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = distributed.unwrap(model)
        if not trainable(self.model):  # here, so a plugin's estimator refuses it too
            raise ValueError(f"{self.name or type(self).__name__}: model "
                             f"{type(self.model).__name__} has no trainable parameters (all "
                             f"have requires_grad=False or there are none)")
        self.loss_fn = loss_fn
        self.reduction = reduction_of(loss_fn)
        # the registered loss part describing loss_fn (None: no part does; estimators that
        # need one refuse such a loss in their constructor, see curvkit.losses.loss_part)
        self.loss = try_loss_part(loss_fn)
        # Monte Carlo parts seed their generator from (seed, draw); the optimizer advances
        # `draw` once per step, so all products within a step see one and the same operator.
        self.state = {"draw": 0}

    # ------------------------------------------------------------- parameters
    @property
    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        return trainable(self.model)

    @property
    def params(self) -> list[nn.Parameter]:
        return [p for _, p in trainable(self.model)]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.params)

    def forward_fn(self, tensor_output: bool = True) -> Callable[[Sequence[Tensor], Any], Tensor]:
        """``f(params, X)``: the model output with the trainable parameters replaced.

        Runs through :func:`curvkit.passes.forward`: buffers are passed as fresh copies (a
        forward that updates them in place, BatchNorm in training mode, neither changes the
        user's model nor trips ``torch.func`` transforms over a mutated captured tensor), and
        inside an evaluation every call replays the evaluation's random state (one dropout
        mask for all passes of it). With ``tensor_output`` an output that is not a tensor
        (a dict or tuple) is refused with the way out (:class:`curvkit.SelectOutput`).
        """
        names = [n for n, _ in self.named_params]
        model = self.model
        where = f"estimator {self.name!r}"

        def f(params: Sequence[Tensor], X: Any) -> Tensor:
            out = passes.forward(model, X, dict(zip(names, params)))
            return passes.require_tensor_output(out, model, where) if tensor_output else out

        return f

    def loss_fn_of_params(self, X: Any, y: Tensor) -> Callable[[Sequence[Tensor]], Tensor]:
        """``L(params)`` on the batch ``(X, y)``."""
        f = self.forward_fn()
        return lambda params: self.loss_fn(f(params, X), y)

    def output_jacobian(self, X: Any, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
        """(f(θ, X), J): the output and its (M, P) Jacobian, M = f.numel(), by forward or
        reverse mode, whichever needs fewer passes (for ``dense`` on small models)."""
        f = self.forward_fn()
        params = tuple(p.detach() for p in self.params)
        out = f(params, X).detach()
        P = sum(p.numel() for p in params)
        M = out.numel()

        def fn(*ps: Tensor) -> Tensor:
            return f(ps, X)

        argnums = tuple(range(len(params)))
        jac = None
        if P <= M:
            # a forward that draws random numbers (dropout) is not batched: vmap draws a
            # mask in the logical order of a non-contiguous input, a plain forward in memory
            # order, so "same" would see another mask than ``out``; reverse mode runs one
            # plain forward (random state replayed) and batches only the backward
            try:
                jac = jacfwd(fn, argnums=argnums, randomness="error")(*params)
            except RuntimeError:
                jac = None
        if jac is None:
            jac = jacrev(fn, argnums=argnums, chunk_size=chunk_size)(*params)
        return out, torch.cat([j.reshape(M, -1) for j in jac], dim=1)

    # ------------------------------------------------------------- public API
    def matvec(self, batch: Batch | Iterable[Batch], v: Sequence[Tensor]) -> list[Tensor]:
        """C v for v shaped like the trainable parameters (a list of tensors)."""
        params = self.params
        check_like(v, params)
        return self.accumulate(batch, lambda X, y: list(self._matvec(X, y, list(v))))

    def linearize(self, batch: Batch | Iterable[Batch]) -> Linearized:
        """C on ``batch`` at the current parameters as an operator: ``op.matvec(v)`` equals
        ``self.matvec(batch, v)``, with the per-batch work that does not depend on v done
        once, here (see :class:`Linearized` for the contract).

        For Krylov solvers that multiply by C many times on one batch at one θ. Each batch
        is prepared by ``_linearize``; the products are combined over batches and ranks like
        ``accumulate`` does. An estimator that overrides the public ``matvec`` (its own
        combination over batches, e.g. g gᵀ of the combined gradient, or Monte Carlo
        samples seeded per batch) and not ``_linearize`` gets an operator that calls that
        ``matvec``: equal by construction, without reuse.
        """
        batches = as_batches(batch)  # an iterator is read once; the operator keeps the list
        cls = type(self)
        if cls.matvec is not CurvatureEstimator.matvec \
                and cls._linearize is CurvatureEstimator._linearize:
            return Linearized(self, lambda v: list(self.matvec(batches, v)))
        with passes.evaluation(self.model):
            prepared = [self._linearize(X, y) for X, y in batches]
        return Linearized(self, lambda v: combine(
            batches, lambda i, X, y: list(prepared[i](v)), self.reduction))

    def dense(self, batch: Batch | Iterable[Batch]) -> Tensor:
        """The P×P matrix C, parameters flattened in ``model.parameters()`` order."""
        return self.accumulate(batch, lambda X, y: self._dense(X, y))

    def observe(self, batch: Batch) -> contextlib.AbstractContextManager[None]:
        """Context manager around the caller's forward and backward pass of
        ``loss_fn(model(X), y)`` on ``batch = (X, y)``, for the capabilities in ``observed``.

        Inside the block the estimator records what those capabilities need with hooks
        (removed on exit); afterwards, within the same draw and with unchanged parameters,
        their methods called with this very batch (the same ``X`` and ``y`` objects) reuse
        the recording instead of another forward and backward pass. The optimizer enters it
        on preconditioner updates when ``observed`` meets the preconditioner's needs. The
        base records nothing.
        """
        return contextlib.nullcontext()

    def refusal(self, capability: str) -> str:
        """'' if this estimator can give ``capability`` on its model and loss, else a
        sentence saying why not (asked when an optimizer is built, so that an impossible
        combination is refused before training). Default: every declared capability."""
        return ""

    def advance(self) -> None:
        """Start a new Monte Carlo draw (called by the optimizer once per step)."""
        self.state["draw"] = int(self.state.get("draw", 0)) + 1

    def generator(self, seed: int, device: torch.device | str = "cpu") -> torch.Generator:
        """A private generator for the current draw; never touches the global RNG."""
        g = torch.Generator(device=device)
        g.manual_seed(int(seed) * 1_000_003 + int(self.state.get("draw", 0)))
        return g

    # ------------------------------------------------------------- for subclasses
    @abc.abstractmethod
    def _matvec(self, X: Any, y: Tensor, v: list[Tensor]) -> list[Tensor]:
        """C_b v for the batch ``(X, y)``, with the loss' own reduction over that batch."""

    def _linearize(self, X: Any, y: Tensor) -> Callable[[list[Tensor]], list[Tensor]]:
        """v ↦ C_b v for the batch ``(X, y)`` at the current parameters, to be called many
        times (by :class:`Linearized`). Override to do the v-independent work (forward pass,
        gradient graph) once, here. Default: ``_matvec`` on every call (no reuse)."""
        return lambda v: self._matvec(X, y, v)

    def _dense(self, X: Any, y: Tensor) -> Tensor:
        """Default: P matrix-vector products with the unit vectors."""
        params = self.params
        P = sum(p.numel() for p in params)
        ref = params[0]
        cols = []
        for i in range(P):
            e = torch.zeros(P, dtype=ref.dtype, device=ref.device)
            e[i] = 1.0
            cols.append(flatten(self._matvec(X, y, unflatten(e, params))))
        return torch.stack(cols, dim=1)

    def accumulate(self, batch: Batch | Iterable[Batch], fn: Callable[[Any, Tensor], Any],
                   reduction: str | None = None, first_order: bool = False) -> Any:
        """Combine ``fn(X, y)`` (a pytree of tensors, linear in the loss) over batches and ranks.

        Each ``fn`` result is the quantity of that batch's loss under the loss' reduction;
        the combination is :func:`combine`. The whole call is one
        :func:`curvkit.passes.evaluation`: one random state for all its forward passes,
        the model's buffers untouched, and — unless ``first_order`` (a pass that takes only
        first derivatives, e.g. a K-FAC capture) — attention and normalization kernels that
        autograd differentiates correctly to any order.
        """
        with passes.evaluation(self.model, higher_order=not first_order):
            return combine(as_batches(batch), lambda i, X, y: fn(X, y),
                           reduction or self.reduction)


def combine(batches: Sequence[Batch], fn: Callable[[int, Any, Tensor], Any],
            reduction: str) -> Any:
    """Σ_b w_b · fn(b, X_b, y_b) over the batches of this rank, then over all ranks.

    ``fn(b, X, y)`` is a pytree of tensors: a quantity linear in the loss, of batch b's loss
    under its reduction. Weights: w_b = N_b / N (N all samples of all ranks) for "mean",
    w_b = 1 for "sum"; the sums over ranks use :func:`curvkit.distributed.all_reduce_sum_`.
    A single batch without an active process group is returned as ``fn`` gives it (no
    reweighting: keeps single-batch results exact). The batches are evaluated one at a time,
    so only one result besides the running total is alive. Shared by
    :meth:`CurvatureEstimator.accumulate` and :class:`Linearized`.
    """
    if len(batches) == 1 and not distributed.active():
        return fn(0, *batches[0])
    total: list[Tensor] | None = None
    spec = None
    count = 0
    for i, (X, y) in enumerate(batches):
        n = batch_size((X, y))
        leaves, spec = tree_flatten(fn(i, X, y))
        w = float(n) if reduction == "mean" else 1.0
        if total is None:
            total = [leaf * w for leaf in leaves]
        else:
            total = [t + leaf * w for t, leaf in zip(total, leaves)]
        count += n
    assert total is not None and spec is not None
    if reduction == "mean":
        count_t = distributed.count_tensor(float(count), total[0] if total else None)
        distributed.all_reduce_sum_(total + [count_t])
        total = [t / float(count_t.item()) for t in total]
    else:
        distributed.all_reduce_sum_(total)
    return tree_unflatten(total, spec)


class Linearized(LinearOperator):
    """The curvature C of an estimator on fixed batches at fixed parameters θ, as an operator.

    Made by :meth:`CurvatureEstimator.linearize` (``op = est.linearize(batch)``); a
    :class:`~curvkit.linops.LinearOperator`: ``op @ v`` (flat, matrix or list), ``shape``,
    ``dtype``, ``device``, sums and scalings, ``to_scipy()``. Contract:

    * ``op.matvec(v)`` equals ``est.matvec(batch, v)`` — the same C, with the same scaling
      over batches (count-weighted for "mean", summed for "sum") and ranks (all-reduced on
      every call, so all ranks must call it together, as for ``matvec``); v is a list of
      tensors shaped like the trainable parameters, checked like ``matvec`` checks it.
    * The work that does not depend on v (forward pass, gradient graph, …) is done once, at
      creation; each product does only the rest. Products are independent: any number of
      them, in any order, give what fresh ``matvec`` calls would.
    * Valid only at the θ and Monte Carlo draw of creation: the identity, version counter
      (bumped by every in-place update, e.g. an optimizer step) and storage of each
      trainable parameter and the estimator's ``state["draw"]`` are recorded, and
      ``matvec`` raises ``RuntimeError`` once any of them changed — create a new operator
      with ``linearize()``. (A write through ``p.data`` bypasses the version counter and is
      not detected.)
    * Memory: whatever the estimator prepared (for ``hessian`` and ``ggn`` autograd graphs
      of the batch, a few times the activations) lives as long as the operator; drop it
      when the parameters move on.
    """

    def __init__(self, estimator: CurvatureEstimator,
                 apply: Callable[[list[Tensor]], list[Tensor]]) -> None:
        super().__init__(estimator.params)
        self.estimator = estimator
        self._apply = apply
        self._stamp = self._current()

    def _current(self) -> tuple[list[tuple[int, int, int]], int]:
        est = self.estimator
        return ([(id(p), p._version, p.data_ptr()) for p in est.params],
                int(est.state.get("draw", 0)))

    def check(self) -> None:
        """Raise ``RuntimeError`` if the parameters or the draw changed since creation."""
        params, draw = self._current()
        old_params, old_draw = self._stamp
        name = getattr(self.estimator, "name", "") or type(self.estimator).__name__
        if params != old_params:
            names = [n for n, _ in self.estimator.named_params]
            if len(params) != len(old_params) or \
                    any(a[0] != b[0] for a, b in zip(params, old_params)):
                what = "the set of trainable parameters changed"
            else:
                changed = [n for n, a, b in zip(names, params, old_params) if a != b]
                what = (f"{', '.join(changed[:3])}{' …' if len(changed) > 3 else ''} "
                        f"modified in place (e.g. by an optimizer step)")
            raise RuntimeError(f"estimator {name!r}: the parameters changed since "
                               f"linearize() ({what}); the operator is stale — call "
                               f"linearize() again at the new parameters")
        if draw != old_draw:
            raise RuntimeError(f"estimator {name!r}: the Monte Carlo draw changed since "
                               f"linearize() (state['draw'] {old_draw} → {draw}, advance() "
                               f"was called); the operator is stale — call linearize() again")

    def matvec(self, v: Sequence[Tensor]) -> list[Tensor]:
        """C v for v shaped like the trainable parameters (a list of tensors)."""
        self.check()
        check_like(v, self.estimator.params)
        return self._apply(list(v))
