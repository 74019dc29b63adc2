"""Work per step in network passes, for every composition through one counter.

The unit is one pass of the network over the batch: a forward, a backward (VJP) or a JVP.
A gradient is 2 (forward + backward), a curvature product through a kept linearization 2
(JVP + VJP for the GGN, Fisher and empirical Fisher; the two backward passes of a Hessian
product), a loss evaluation 1. The optimizer opens :func:`counting` around each step and
sets ``info["work"]`` to the total; the counts come from

- the optimizer: the step's gradient (2, also when it is the caller's own pass in torch.optim
  style, and again when a data-parallel step recomputes it from the captured batch);
- :meth:`curvkit.solvers.base.StepContext.loss_at`: 1 per trial loss;
- the estimator's capability calls, wrapped by :func:`instrument` with the costs of
  :func:`capability_passes` per batch: the forward of the statistics pass plus one backward
  per output-space column it pushes back (1 for the empirical Fisher, ``mc_samples``
  sampled labels for the Monte Carlo Fisher, the C output dimensions for the exact GGN
  square root); 0 for K-FAC statistics taken from the step's own forward and backward
  (``observe``);
- a solver that runs passes outside the estimator (``varpro``'s feature forwards, JVPs and
  VJPs) reports its own complete count as ``info["work"]``, which is then kept.

Passes batched by ``vmap`` (over samples, columns or directions) count as the passes they
replace: one per column or direction. Not counted: arithmetic outside the network (Krylov
vector operations, factor inversions), which the step time shows.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

_ACTIVE: ContextVar[list[float] | None] = ContextVar("curvkit_work", default=None)


class counting:  # noqa: N801 - used as a function: ``with work.counting() as total``
    """Count the passes made inside the block; the total is ``[0]`` of the yielded list.
    Nested blocks count into the innermost only. (A class, not a generator: it opens
    every step, and a generator-based context manager cost ~1 µs more per use.)"""

    __slots__ = ("_token", "total")

    def __enter__(self) -> list[float]:
        self.total = [0.0]
        self._token = _ACTIVE.set(self.total)
        return self.total

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self._token)


def total() -> float | None:
    """The passes counted so far in the innermost :func:`counting` block (None outside)."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def add(passes: float) -> None:
    """Record ``passes`` network passes (no-op outside :func:`counting`)."""
    total = _ACTIVE.get()
    if total is not None:
        total[0] += passes


def _batches(batch: Any) -> list[tuple[Any, Tensor]]:
    from curvkit.estimators.base import as_batches
    return as_batches(batch)


def _outputs(estimator: Any, X: Any) -> int:
    """C: the output dimension per sample (the exact GGN's columns), as recorded by a
    forward hook that lives for the duration of a counted capability call (its own
    forward); without one yet, from one forward of its own (no graph; cached)."""
    cached = estimator.__dict__.get("_work_outputs")
    if cached is None:
        from curvkit import passes
        with torch.no_grad(), passes.evaluation(estimator.model, higher_order=False):
            out = estimator.forward_fn()(estimator.params, X)
        cached = _per_sample(out)
        estimator.__dict__["_work_outputs"] = cached
    return cached


def _per_sample(out: Any) -> int:
    return int(out[0].numel()) if isinstance(out, Tensor) and out.dim() > 1 else 1


def columns(estimator: Any, X: Any) -> int:
    """Output-space columns the estimator's statistics push back per sample."""
    name = getattr(estimator, "name", "")
    if name == "ef":
        return 1
    if name == "fisher":
        return int(estimator.options.mc_samples)
    return _outputs(estimator, X)  # ggn (exact square root of the output Hessian), others


def capability_passes(estimator: Any, capability: str, X: Any, y: Tensor,
                      args: tuple, kwargs: dict[str, Any]) -> float:
    """Passes of one capability call on one batch ``(X, y)`` (see the module docstring)."""
    name = getattr(estimator, "name", "")
    if capability == "gradient":
        return 2
    if capability == "matvec":  # fresh product: forward + the product's two passes
        return 1 + 2 if name != "outer_product" else 2
    if capability == "linearize":  # the kept forward (Hessian: and its gradient graph)
        return 2 if name in ("hessian", "outer_product") else 1
    if capability == "dense":  # P products (Hessian: through one gradient graph)
        if name == "outer_product":
            return 2
        return (2 if name == "hessian" else 1) + 2 * sum(p.numel() for p in estimator.params)
    if capability == "diagonal":
        if name == "hessian":  # gradient with graph + one product per Hutchinson probe
            return 2 + 2 * int(estimator.options.samples)
        if name == "outer_product":
            return 2
        return 1 + columns(estimator, X)
    if capability in ("kronecker", "kronecker_roots"):
        observed = getattr(estimator, "_observation", None)
        if callable(observed) and observed(X, y) is not None:
            return 0  # the step's own forward and backward (already counted)
        return 1 + columns(estimator, X)
    if capability == "summary":
        direction = args[0] if args else kwargs.get("direction")
        groups = (args[2] if len(args) > 2 else kwargs.get("groups")) or len(direction)
        if name == "hessian":  # gradient with graph, a double backward per group, D3
            return 2 + 2 * groups
        return 1 + groups  # ggn: the forward and one JVP per group
    return 0


CAPABILITIES = ("gradient", "matvec", "linearize", "dense", "diagonal", "kronecker",
                "kronecker_roots", "summary")


def instrument(estimator: Any) -> None:
    """Wrap the estimator's capability methods (on this instance) so each call adds its
    passes to the active counter; ``linearize``'s operator adds 2 per product. The
    wrappers hold the estimator weakly (no reference cycle through its own ``__dict__``)."""
    ref = weakref.ref(estimator)

    for capability in CAPABILITIES:
        func = getattr(type(estimator), capability, None)
        if callable(func) and not getattr(estimator.__dict__.get(capability), "_counts_work",
                                          False):
            estimator.__dict__[capability] = _counted(ref, capability, func)


def _recorder(ref: Any) -> Callable[..., None]:
    def record(module: Any, args: Any, out: Any) -> None:
        est = ref()
        if est is not None and "_work_outputs" not in est.__dict__ \
                and isinstance(out, Tensor) and not torch._C._are_functorch_transforms_active():
            est.__dict__["_work_outputs"] = _per_sample(out)

    return record


def _method(obj: Any, name: str) -> Callable[..., Any]:
    """The class's function, looked up at each call (a class patched later is honoured)."""
    return getattr(type(obj), name)


def _counted(ref: weakref.ref, capability: str, func: Callable[..., Any]
             ) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(batch: Any, *args: Any, **kwargs: Any) -> Any:
        estimator = ref()
        func = _method(estimator, capability)
        if _ACTIVE.get() is None or _INSIDE.get():
            # not counting, or called by another capability (outer_product's matvec takes
            # the gradient): the outer call's cost covers it
            return func(estimator, batch, *args, **kwargs)
        batches = _batches(batch)
        reuse = _reuses(estimator)
        token = _INSIDE.set(True)
        # the call's own forward records the output size C; the hook lives only as long
        # as the call (the user's model keeps no hook of ours, even if the call raises)
        handle = estimator.model.register_forward_hook(_recorder(ref)) \
            if "_work_outputs" not in estimator.__dict__ else None
        try:
            out = func(estimator, batch, *args, **kwargs)
        finally:
            _INSIDE.reset(token)
            if handle is not None:
                handle.remove()
        if not (capability == "linearize" and not reuse):  # else: a matvec per product
            add(sum(capability_passes(estimator, capability, X, y, args, kwargs)
                    for X, y in batches))
        if capability == "linearize" and out is not None:
            per = 2 * len(batches) if reuse else sum(
                capability_passes(estimator, "matvec", X, y, (), {}) for X, y in batches)
            _count_products(out, per)
        return out

    wrapper._counts_work = True  # type: ignore[attr-defined]
    return wrapper


_INSIDE: ContextVar[bool] = ContextVar("curvkit_work_inside", default=False)


def _reuses(estimator: Any) -> bool:
    """Whether ``linearize`` keeps per-batch work (its own ``_linearize``), or its
    operator calls a fresh ``matvec`` per product (see ``CurvatureEstimator.linearize``)."""
    from curvkit.estimators.base import CurvatureEstimator
    cls = type(estimator)
    return not (getattr(cls, "matvec", None) is not CurvatureEstimator.matvec
                and getattr(cls, "_linearize", None) is CurvatureEstimator._linearize)


def _count_products(op: Any, per_product: float) -> None:
    """Make ``op.matvec`` (and ``op @ v``, which calls it) add ``per_product`` per call.
    The wrapper holds the operator weakly: a strong reference from its own ``__dict__``
    would be a cycle keeping its autograd graphs alive until the cycle collector ran."""
    ref = weakref.ref(op)

    @functools.wraps(type(op).matvec)
    def counted(v: Any) -> Any:
        target = ref()
        func = _method(target, "matvec")
        if _ACTIVE.get() is None or _INSIDE.get():
            return func(target, v)
        add(per_product)
        token = _INSIDE.set(True)
        try:
            return func(target, v)
        finally:
            _INSIDE.reset(token)

    try:
        op.matvec = counted
    except AttributeError:  # a slotted or frozen operator: its products go uncounted
        pass
