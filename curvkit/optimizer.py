"""The optimizer: one estimator, one preconditioner, one solver, as a torch.optim.Optimizer.

Over 500 lines because the step's guarantees live in one place: the non-finite checks of
the loss, gradient, direction and applied update, the rollback of every part's state, the
work count and the torch.optim call styles (and hooks) all wrap the same step; the pieces
that stand alone (parameter groups, capture, the finite checks in :mod:`curvkit.params`,
work) are their own modules.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import operator
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor, nn

from curvkit import distributed, passes, work
from curvkit.capture import PassCapture
from curvkit.config import OptimizerConfig, PartChoice, parse_optimizer
from curvkit.errors import ConfigError
from curvkit.losses import batch_size
from curvkit.param_groups import (
    check_shared_lr,
    group_defaults,
    groups_from_rules,
    groups_from_user,
)
from curvkit.params import FiniteLedger, state_finite, trainable, update_finite
from curvkit.preconditioners.base import Preconditioner
from curvkit.solvers.base import StepContext


class CurvkitOptimizer(torch.optim.Optimizer):
    """A second-order optimizer composed of three registered parts.

    ``step((X, y))`` does the forward and backward pass it needs, refreshes the
    preconditioner when due, asks the solver for a step and applies it, and returns the
    loss before the step. A non-finite loss, gradient, statistic or step never reaches the
    parameters: the step is skipped and counted in ``counters["nonfinite"]``.

    torch.optim style works too: ``loss.backward(); opt.step()`` and ``opt.step(closure)``
    take the step ``step((X, y))`` would take, with the batch, loss and gradients of the
    caller's own pass (see :mod:`curvkit.capture`); a composition that needs the batch and
    cannot see it raises, saying to pass it.

    Parameter groups hold ``lr`` and the solver's group options (``direct``: momentum,
    dampening, weight_decay, nesterov), read at every step (LR and momentum schedulers
    work); see :mod:`curvkit.param_groups`. The state of all three parts travels in
    ``state_dict()``.
    """

    def __init__(self, model: nn.Module, loss_fn: Any, config: OptimizerConfig,
                 param_groups: list[dict[str, Any]] | None = None) -> None:
        called = model  # what the caller calls (a torch.compile or DDP wrapper): captured
        # DDP averages p.grad over ranks in the caller's backward (see _rank_average)
        ddp = nn.parallel.DistributedDataParallel
        self._ddp = isinstance(model, ddp) or isinstance(getattr(model, "_orig_mod", None),
                                                           ddp)
        model = distributed.unwrap(model)
        named = trainable(model)
        if not named:
            raise ValueError("model has no trainable parameters")
        groups = _initial_groups(model, named, config, param_groups)
        super().__init__(groups, group_defaults(config.lr, config.solver))
        self._built = True
        self.model = model
        self.loss_fn = loss_fn
        self.config = config
        self.names = [n for n, _ in named]
        # parameters in model order (the order of estimator, preconditioner and solver) and
        # the group of each
        self._params = [p for _, p in named]
        where = {id(p): g for g, group in enumerate(self.param_groups) for p in group["params"]}
        self._group_of = [where[id(p)] for p in self._params]
        est, pre, sol = config.estimator, config.preconditioner, config.solver
        if type(loss_fn).__module__.startswith("torch."):
            # a torch loss takes one tensor: a dict/tuple output the code shows is refused
            # now, with the way out (else at the first step, before anything moves)
            try:
                passes.refuse_structured_output(model, "optimizer")
            except TypeError as err:
                raise ConfigError(str(err)) from err
        self.estimator = _construct(est, model=model, loss_fn=loss_fn)
        self.preconditioner = _construct(pre, model=model)
        self.solver = _construct(sol)
        # every capability call adds its network passes to the step's work counter
        work.instrument(self.estimator)
        # a structure that can tell before training whether the estimator serves it on this
        # model and loss (layer-wise Kronecker: factors for the loss, the fallback diagonal)
        check = getattr(self.preconditioner, "check_estimator", None)
        if callable(check):
            try:
                check(self.estimator)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"{pre.path}: {err}") from err
        try:
            self.solver.bind(self.estimator, self.preconditioner)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{sol.path}: {err}") from err
        # how often a step applies P⁻¹ (direct: once), for the form the inverse is kept in
        expect = getattr(self.preconditioner, "expect_applications", None)
        if callable(expect):
            expect(getattr(self.solver, "applications_per_step", None))
        self.counters = {"steps": 0, "nonfinite": 0, "rejected": 0}
        self.traffic = distributed.Traffic()
        self.last_info: dict[str, Any] = {}
        # the estimator can take the statistics the preconditioner needs from the step's own
        # forward and backward pass (estimator.observe) instead of another pass
        self._observes = bool(getattr(self.estimator, "observed", frozenset()) & pre.needs)
        # a structure without statistics (identity) skips the update machinery: snapshot,
        # finite check of its state, info — Python work that was a few % of an SGD step
        self._has_statistics = type(self.preconditioner).update is not Preconditioner.update
        # the caller's own pass, for step() without a batch (torch.optim style)
        self._needs_batch = bool(getattr(self.preconditioner, "needs_batch", True)
                                 or getattr(self.solver, "needs_batch", True))
        self._observation: Any = None
        self._pass_rng: passes.RandomState | None = None
        self._keep = False
        self._capture = PassCapture(called, loss_fn, on_forward=self._open_observation)
        self._torch_loss = type(loss_fn).__module__.startswith("torch.")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction: the estimator's and preconditioner's state is laid out
        over the trainable parameters the optimizer was built with."""
        if not getattr(self, "_built", False):
            super().add_param_group(param_group)
            return
        raise ValueError("add_param_group: curvkit's curvature state is laid out over the "
                         "trainable parameters at build time; to train more parameters "
                         "(e.g. after unfreezing), build a new optimizer with "
                         "curvkit.build_optimizer(model, loss_fn, config, param_groups=...)")

    # ------------------------------------------------------------------ step
    def _loss_and_grads(self, batch: tuple[Any, Tensor]) -> tuple[Tensor, list[Tensor]]:
        X, y = batch
        params = self._params
        with torch.enable_grad(), self._capture.suspended():
            out = self.model(X)
            if self._torch_loss and not isinstance(out, Tensor):
                # a torch loss takes one tensor: say how to pick it before anything moves
                # (a subclass of the user's may take the dict itself)
                passes.require_tensor_output(out, self.model, "optimizer")
            loss = self.loss_fn(out, y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        work.add(2)  # forward + backward
        if any(map(operator.is_, grads, itertools.repeat(None))):  # a parameter unused
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        else:
            grads = list(grads)
        loss = loss.detach()
        if distributed.active():
            reduced = distributed.weighted_mean([loss, *grads], batch_size(batch),
                                                getattr(self.loss_fn, "reduction", "mean"))
            loss, grads = reduced[0], reduced[1:]
        return loss, grads

    def step(self, *args: Any, **kwargs: Any) -> Tensor | None:  # type: ignore[override]
        """One optimization step; returns the loss before the step (:meth:`_step`).

        torch.optim's step wrapper (profiler label, step pre/post hooks) is taken whenever
        it can be seen: while a profiler records, or with a hook registered; otherwise the
        step runs without it. Its ``record_function`` scope costs time even when nothing
        records (a measurable share of a small model's step: ``benchmarks/bench_step.py``),
        and torch.optim.SGD opens two per step (``zero_grad`` and ``step``)."""
        if (_profiler_enabled() or self._optimizer_step_pre_hooks
                or self._optimizer_step_post_hooks or _GLOBAL_STEP_HOOKS[0]
                or _GLOBAL_STEP_HOOKS[1]):
            return _TORCH_STEP(self, *args, **kwargs)
        return self._step(*args, **kwargs)

    # torch.optim.Optimizer wraps a class's step unless it is marked as wrapped: this one
    # takes torch's wrapper itself when it is observable
    step.hooked = True  # type: ignore[attr-defined]

    def _step(self, batch: Any = None, closure: Any = None) -> Tensor | None:
        """One optimization step; returns the loss before the step.

        ``step((X, y))``: the step does the forward and backward pass it needs.
        ``step()`` after ``loss.backward()``, or ``step(closure)`` / ``step(closure=...)``
        (closure: zero_grad, forward, backward, return the loss; how LBFGS users and
        Lightning call it): the same step, from the caller's pass (its batch, loss and
        ``p.grad``); returns the loss of that pass (None if not seen).
        """
        # the step's passes (info["work"]) and this optimizer's collectives
        # (info["comm_bytes"]) are counted inside
        with work.counting(), distributed.counting(self.traffic):
            if closure is not None:
                if batch is not None:
                    raise TypeError("step: give a batch or a closure, not both")
                return self._step_from_pass(closure)
            if batch is None or callable(batch):
                return self._step_from_pass(batch)
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(f"step expects a batch (X, y), a closure or nothing (after "
                                f"loss.backward()); got {type(batch).__name__}")
            return self._step_on(tuple(batch))

    def _step_on(self, batch: tuple[Any, Tensor]) -> Tensor:
        start = (time.perf_counter(), self.traffic.bytes)
        if self._observation is not None:
            self._close_observation(keep=False)
        self._capture.reset()
        update = self.preconditioner.should_update(self.counters["steps"])
        # every other pass of this step (curvature, trial points) replays the random state
        # of the step's own forward: one dropout mask per step, and the generators advance
        # as for one forward
        if not self._needs_batch and not (update and self._observes):
            # no other pass in this step (identity + direct): nothing to replay
            loss, grads = self._loss_and_grads(batch)
            return self._take_step(batch, loss, grads, start)
        rng = passes.RandomState(self.model)
        with (self.estimator.observe(batch) if update and self._observes
              else contextlib.nullcontext()):
            loss, grads = self._loss_and_grads(batch)
        with passes.rng_scope(self.model, state=rng):
            return self._take_step(batch, loss, grads, start)

    # ------------------------------------------------------------------ torch.optim style
    def _paused(self) -> Any:
        """curvkit's own model calls are not the caller's pass."""
        return self._capture.pausing()

    def _open_observation(self, X: Any) -> None:
        """At the start of the caller's pass: record the estimator's statistics from it if
        this step refreshes the preconditioner (as ``step((X, y))`` does from its own)."""
        self._close_observation(keep=False)
        # the random state of the caller's forward, replayed by the step's other passes
        self._pass_rng = passes.RandomState(self.model)
        if self._observes and self.preconditioner.should_update(self.counters["steps"]):
            cm = self.estimator.observe(lambda: self._capture.batch if self._keep else None)
            cm.__enter__()
            self._observation = cm

    def _close_observation(self, keep: bool) -> None:
        cm, self._observation = self._observation, None
        if cm is not None:
            self._keep = keep
            cm.__exit__(None, None, None)

    def _step_from_pass(self, closure: Any) -> Tensor | None:
        start = (time.perf_counter(), self.traffic.bytes)
        returned = None
        if closure is not None:
            self._close_observation(keep=False)
            self._capture.reset()
            with torch.enable_grad():
                returned = closure()
        self._close_observation(keep=True)
        cap = self._capture
        batch, loss = cap.batch, cap.loss
        if loss is None and isinstance(returned, Tensor):
            loss = returned.detach()
        problem = cap.problem
        cap.reset()
        work.add(2)  # the caller's forward and backward
        if batch is None and self._needs_batch:
            raise TypeError(
                f"step() without a batch: {self._composition()} needs the batch (X, y), and "
                f"it could not be taken from your pass: {problem}. Call opt.step((X, y)).")
        if batch is not None and distributed.active():
            # p.grad is this rank's (or DDP's equally weighted) gradient; the step needs the
            # count-weighted one over ranks: recompute it
            loss, grads = self._loss_and_grads(batch)
        else:
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in self._params]
            if distributed.active():
                loss, grads = self._rank_average(loss, grads)
        known = loss is not None
        if loss is None:  # a loss that is not a module, with a composition needing no batch
            loss = torch.tensor(float("nan"), device=self._params[0].device)
        rng, self._pass_rng = self._pass_rng, None
        with (passes.rng_scope(self.model, state=rng) if rng is not None
              else contextlib.nullcontext()):
            result = self._take_step(batch, loss, grads, start, loss_known=known)
        if isinstance(returned, Tensor):
            return returned
        return result if known else None

    def _rank_average(self, loss: Tensor | None, grads: list[Tensor]
                      ) -> tuple[Tensor | None, list[Tensor]]:
        """Under torch.distributed without the batch (it could not be captured): the mean
        over ranks with equal weights, as DDP averages — p.grad is this rank's gradient
        unless the model is DDP-wrapped, whose backward averaged it already. Equal weights
        equal the count-weighted mean of ``step((X, y))`` for equal shards. The loss is
        averaged alike (reported, not used by a step without the batch)."""
        values = [] if self._ddp else list(grads)
        if loss is not None:
            values.append(loss.reshape(()))
        if not values:
            return loss, grads
        mean = distributed.equal_mean(values)
        if loss is not None:
            loss = mean.pop()
        return loss, grads if self._ddp else mean

    def _composition(self) -> str:
        c = self.config
        return (f"estimator {c.estimator.name!r} + preconditioner {c.preconditioner.name!r} "
                f"+ solver {c.solver.name!r}")

    # ------------------------------------------------------------------ the step
    def _take_step(self, batch: tuple[Any, Tensor] | None, loss: Tensor, grads: list[Tensor],
                   start: tuple[float, int], loss_known: bool = True) -> Tensor:
        """The step from the loss and gradients at θ; ``start``: (time, bytes sent) at the
        start of the step (its pass included)."""
        t_start, comm0 = start
        step = self.counters["steps"]
        self.counters["steps"] = step + 1
        value = float(loss)
        info: dict[str, Any] = {"step": step, "loss": value}
        # one ledger per step: a tensor checked here and passed on unchanged (the gradient
        # through identity + direct) is not scanned again by the solver or before the
        # update; the loss is checked as the number it is already read as
        finite = FiniteLedger()
        if (loss_known and not math.isfinite(value)) or finite.max_abs(grads) is None:
            return self._skip(loss, info, "loss or gradient")
        update = self._has_statistics and self.preconditioner.should_update(step)

        t_curv = time.perf_counter()
        if update:
            # a structure that guards its own state is not copied (a second copy of its
            # state at the update's peak); it returns how many pieces kept their old value
            guarded = bool(getattr(self.preconditioner, "guards_state", False))
            snapshot = None if guarded else self.preconditioner.state_dict()
            with self._paused():
                kept = self.preconditioner.update(self.estimator, batch, grads)
            if kept if guarded else not state_finite(self.preconditioner.state):
                if snapshot is not None:
                    self.preconditioner.load_state_dict(snapshot)
                self.estimator.advance()
                info["time_curvature"] = time.perf_counter() - t_curv
                return self._skip(loss, info, "preconditioner statistics")
            # released now, not held through the solve: the replaced state is freed
            snapshot = None
            info.update(self.preconditioner.info())
        info["time_curvature"] = time.perf_counter() - t_curv

        groups = self.param_groups
        check_shared_lr(groups, self.solver, "param_groups")
        ctx = StepContext(params=self._params, batch=batch, loss=loss, grads=grads,
                          estimator=self.estimator, preconditioner=self.preconditioner,
                          lr=groups[0]["lr"], step=step, finite=finite,
                          groups=groups, group_of=self._group_of)
        with self._paused():  # the solver's passes are not the caller's
            result = self.solver.step(ctx)
        self.estimator.advance()
        info.update(result.info)
        info["evaluations"] = ctx.evaluations
        if "work" not in result.info:  # a solver counting passes of its own reports them
            info["work"] = work.total()
        if result.accepted:
            dmax = finite.max_abs(result.direction)
            if dmax is None:
                return self._skip(loss, info, "step")
            if not update_finite(dmax, result.alpha, result.alphas, self._params,
                                  result.direction):
                # a finite direction times a NaN or huge lr (set through param_groups,
                # which no config check sees) must not reach the parameters either
                return self._skip(loss, info, "update lr·direction")
        info["accepted"] = bool(result.accepted)
        if result.accepted:
            with torch.no_grad():
                if result.alphas is None:
                    # one call for all parameters; per tensor the same add_ as torch.optim.SGD
                    torch._foreach_add_(self._params, list(result.direction),
                                        alpha=result.alpha)
                else:  # parameter groups with their own learning rates
                    for p, d, a in zip(self._params, result.direction, result.alphas):
                        p.add_(d, alpha=a)
        elif not info.get("nonfinite"):
            self.counters["rejected"] += 1
        else:
            self.counters["nonfinite"] += 1
        info["time_step"] = time.perf_counter() - t_start
        info["comm_bytes"] = self.traffic.bytes - comm0
        self.last_info = info
        return loss

    def _skip(self, loss: Tensor, info: dict[str, Any], what: str) -> Tensor:
        self.counters["nonfinite"] += 1
        info.setdefault("work", work.total())  # the passes were made all the same
        info.update(accepted=False, nonfinite=1, skipped=f"non-finite {what}")
        self.last_info = info
        return loss

    def structures(self) -> dict[str, str]:
        """Parameter name → structure preconditioning it (fallbacks included)."""
        return self.preconditioner.structures()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["curvkit"] = {
            "config": self.config.as_dict(),
            "params": _param_signature(self.names, self.param_groups[0]["params"]),
            "counters": dict(self.counters),
            "estimator": self.estimator.state_dict(),
            "preconditioner": self.preconditioner.state_dict(),
            "solver": self.solver.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`. Refused with a ``ValueError`` (and nothing loaded) when
        the checkpoint's parts, parameter names, shapes or dtypes differ from this
        optimizer's, or when it holds a non-finite number."""
        state_dict = dict(state_dict)
        parts = state_dict.pop("curvkit", None)
        if parts is not None:
            self._check_checkpoint(parts)
        saved = [(p, p.state_dict()) for p in (self.estimator, self.preconditioner,
                                                 self.solver)]
        try:
            super().load_state_dict(state_dict)
            if parts is None:
                return
            self.estimator.load_state_dict(parts["estimator"])
            self.preconditioner.load_state_dict(parts["preconditioner"])
            self.solver.load_state_dict(parts["solver"])
        except Exception:
            for part, sd in saved:  # a part that refuses its state leaves none half-loaded
                part.load_state_dict(sd)
            raise
        self.counters.update(parts["counters"])

    def _check_checkpoint(self, parts: Mapping[str, Any]) -> None:
        """Refuse a checkpoint of another composition or model before anything loads."""
        missing = [k for k in ("counters", "estimator", "preconditioner", "solver")
                   if k not in parts]
        if missing:
            raise ValueError(f"checkpoint: curvkit state lacks {', '.join(missing)}")
        config = parts.get("config") or {}
        for kind in ("estimator", "preconditioner", "solver"):
            theirs = (config.get(kind) or {}).get("name")
            ours = getattr(self.config, kind).name
            if theirs is not None and theirs != ours:
                raise ValueError(f"checkpoint: saved by a {kind} {theirs!r}, this optimizer's "
                                 f"{kind} is {ours!r} ({getattr(self.config, kind).path})")
        if "params" in parts:
            mine = _param_signature(self.names, self.param_groups[0]["params"])
            theirs = [tuple(x) for x in parts["params"]]
            if [n for n, *_ in theirs] != [n for n, *_ in mine]:
                gone = sorted({n for n, *_ in mine} - {n for n, *_ in theirs})
                new = sorted({n for n, *_ in theirs} - {n for n, *_ in mine})
                raise ValueError(f"checkpoint: parameter names differ (missing from the "
                                 f"checkpoint: {gone[:5]}, not in the model: {new[:5]}; or "
                                 f"in another order)")
            for (name, shape, dtype), (_, shape2, dtype2) in zip(mine, theirs):
                if tuple(shape) != tuple(shape2) or dtype != dtype2:
                    raise ValueError(f"checkpoint: parameter {name!r} is {dtype2} "
                                     f"{list(shape2)} in the checkpoint but {dtype} "
                                     f"{list(shape)} in the model")
        if not state_finite({k: parts[k] for k in ("estimator", "preconditioner",
                                                       "solver", "counters")}):
            raise ValueError("checkpoint: the curvkit state holds a non-finite number "
                             "(NaN or inf); refusing to load it")


def _plain_step(self: CurvkitOptimizer, *args: Any, **kwargs: Any) -> Tensor | None:
    return self._step(*args, **kwargs)  # looked up on the instance: a subclass's _step


# torch.optim's step wrapper around the plain step, and the registries of the global
# step hooks it calls (register_optimizer_step_pre_hook / _post_hook)
_TORCH_STEP = torch.optim.Optimizer.profile_hook_step(_plain_step)
_GLOBAL_STEP_HOOKS = (_torch_optimizer._global_optimizer_pre_hooks,
                      _torch_optimizer._global_optimizer_post_hooks)
_profiler_enabled = torch._C._autograd._profiler_enabled


def _construct(choice: PartChoice, **context: Any) -> Any:
    """Instantiate a configured part; a model it cannot handle is reported at its config path."""
    try:
        part = choice.spec.cls(options=choice.options, **context)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{choice.path}: {err}") from err
    part.config_path = choice.path
    return part


def _param_signature(names: list[str], params: list[Tensor]) -> list[tuple[str, list[int],
                                                                           str]]:
    """(name, shape, dtype) of each parameter: what a checkpoint must match."""
    return [(n, list(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in
            zip(names, params)]


def _initial_groups(model: nn.Module, named: list[tuple[str, nn.Parameter]],
                    config: OptimizerConfig, given: list[dict[str, Any]] | None
                    ) -> list[dict[str, Any]]:
    """The parameter groups: given ones, or the config's patterns (one group without)."""
    defaults = group_defaults(config.lr, config.solver)
    if given is not None:
        if config.param_groups:
            raise ConfigError("param_groups: given both to build_optimizer and in the config "
                              "(optimizer.param_groups); use one of them")
        groups = groups_from_user(named, given, config.solver, defaults)
    else:
        groups = groups_from_rules(model, named, config.param_groups, defaults)
    check_shared_lr(groups, config.solver.spec.cls, "param_groups")
    return groups


def build_optimizer(model: nn.Module, loss_fn: Any,
                    config: Mapping[str, Any] | str | Path,
                    param_groups: list[dict[str, Any]] | None = None) -> CurvkitOptimizer:
    """Validate ``config`` (dict or TOML path) and compose the optimizer.

    ``param_groups``: torch.optim-style groups ``[{"params": [...], "lr": ...,
    "weight_decay": ...}, ...]`` holding every trainable parameter once (or use the
    config's ``param_groups`` patterns). All errors (unknown part, wrong option,
    incompatible parts, a model the parts cannot handle) are raised here, before any
    training step.
    """
    return CurvkitOptimizer(model, loss_fn, parse_optimizer(config), param_groups)
