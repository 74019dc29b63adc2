"""The batch of the caller's own training pass, for ``loss.backward(); opt.step()``.

torch.optim's ``step()`` gets no batch, but most curvature needs one. :class:`PassCapture`
keeps three hooks while the optimizer lives: a forward pre-hook and a forward hook on the
model (its input ``X`` and output), and a forward pre-hook on the loss module (its target
``y``, kept only when the loss is called on that very output). After
``loss = loss_fn(model(X), y); loss.backward()`` the optimizer so knows ``(X, y)`` and the
loss, and takes the step it would take for ``step((X, y))``, reusing the gradients in
``p.grad``.

Only passes that can be the training pass are recorded: grad mode on, no torch.func
transform active (curvkit's own passes run under them, or with capture paused), the model
called with one positional input. ``problem`` says why nothing usable was recorded
(several forwards since the last step, a loss that is not a module, …), for the error a
composition that needs the batch raises.

``on_forward(X)`` is called at the start of the first recorded forward after a
:meth:`reset` (the optimizer opens the estimator's ``observe`` block there, so statistics
come from this very pass).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def _internal_pass() -> bool:
    """True inside torch.func transforms (curvkit's own vmap/grad/jvp passes)."""
    return bool(torch._C._are_functorch_transforms_active())


def _remove(handles: list[Any]) -> None:
    for h in handles:
        h.remove()


class _Paused:
    """The capture paused inside (nothing recorded): curvkit's own model calls are not the
    caller's pass. A class, not a generator-based context manager: a step enters it twice."""

    __slots__ = ("_capture", "_was")

    def __init__(self, capture: PassCapture) -> None:
        self._capture = capture

    def __enter__(self) -> None:
        cap = self._capture
        self._was, cap.paused = cap.paused, True

    def __exit__(self, *exc: object) -> None:
        self._capture.paused = self._was


class _Suspended(_Paused):
    """Paused, and each hook alone in its dict taken off for the block (see
    :meth:`PassCapture.suspended`)."""

    __slots__ = ("_taken",)

    def __enter__(self) -> None:
        super().__enter__()
        cap = self._capture
        self._taken = taken = []
        for hooks, key, hook in cap._hooks:
            if len(hooks) == 1 and key in hooks:
                del hooks[key]
                taken.append((hooks, key, hook))

    def __exit__(self, *exc: object) -> None:
        for hooks, key, hook in self._taken:
            hooks[key] = hook
            if len(hooks) > 1:  # one registered meanwhile: ours came first
                hooks.move_to_end(key, last=False)
        super().__exit__()


class PassCapture:
    """Hooks recording ``(X, y)``, the output and the loss of the caller's training pass."""

    def __init__(self, model: nn.Module, loss_fn: Any,
                 on_forward: Callable[[Any], None] | None = None) -> None:
        self.on_forward = on_forward
        self.paused = False
        self.reset()
        me = weakref.ref(self)  # the hooks must not keep the optimizer alive
        # a deep copy of the model (or loss) carries these hooks along: they act only for
        # the very modules they were installed on
        model_id, loss_id = id(model), id(loss_fn)

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            cap = me()
            if cap is not None and id(module) == model_id:
                cap._forward_start(args, kwargs)

        def post(module: nn.Module, args: tuple, output: Any) -> None:
            cap = me()
            if cap is not None and cap._in_forward and id(module) == model_id:
                cap._in_forward = False
                cap._output = output

        def loss_pre(module: nn.Module, args: tuple) -> None:
            cap = me()
            if cap is not None and id(module) == loss_id:
                cap._loss_start(args)

        def loss_post(module: nn.Module, args: tuple, output: Any) -> None:
            cap = me()
            if cap is not None and cap._in_loss and id(module) == loss_id:
                cap._in_loss = False
                cap.loss = output.detach() if isinstance(output, Tensor) else None

        self._handles = [model.register_forward_pre_hook(pre, with_kwargs=True),
                         model.register_forward_hook(post)]
        # (hook dict, key, hook) of each: see suspended()
        self._hooks = [(model._forward_pre_hooks, self._handles[0].id, pre),
                       (model._forward_hooks, self._handles[1].id, post)]
        self.loss_is_module = isinstance(loss_fn, nn.Module)
        if self.loss_is_module:
            self._handles += [loss_fn.register_forward_pre_hook(loss_pre),
                              loss_fn.register_forward_hook(loss_post)]
            self._hooks += [(loss_fn._forward_pre_hooks, self._handles[2].id, loss_pre),
                            (loss_fn._forward_hooks, self._handles[3].id, loss_post)]
        # the hooks go when the optimizer goes (they would otherwise pile up on the model)
        weakref.finalize(self, _remove, list(self._handles))

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the last pass (after a step)."""
        self.forwards = 0
        self.X: Any = None
        self.y: Tensor | None = None
        self.loss: Tensor | None = None
        self._output: Any = None
        self._in_forward = False
        self._in_loss = False
        self._problem: str | None = None

    def _recording(self) -> bool:
        return not self.paused and torch.is_grad_enabled() and not _internal_pass()

    def _forward_start(self, args: tuple, kwargs: dict) -> None:
        if not self._recording():
            return
        self.forwards += 1
        self.y = self.loss = None
        if kwargs or len(args) != 1:
            self.X, self._output = None, None
            self._problem = (f"the model was called with {len(args)} positional and "
                             f"{len(kwargs)} keyword arguments; a batch is (X, y) with one "
                             f"input X")
            return
        self.X = args[0]
        self._in_forward = True
        if self.forwards == 1 and self.on_forward is not None:
            self.on_forward(self.X)

    def _loss_start(self, args: tuple) -> None:
        if not self._recording() or self._output is None:
            return
        if len(args) >= 2 and args[0] is self._output and isinstance(args[1], Tensor):
            self.y = args[1]
            self._in_loss = True

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooks.clear()

    def pausing(self) -> _Paused:
        """A context in which nothing is recorded (curvkit's own passes)."""
        return _Paused(self)

    def suspended(self) -> _Suspended:
        """A context for curvkit's own pass: paused (nothing recorded), and each hook that
        is the only one of its kind on its module is taken off for the duration, so the
        module is called by torch's hook-free path — a module with any hook runs a
        general dispatch (~60 Python lines per call) that an SGD step never pays. Hooks
        sharing their dict with others stay (order kept); they do nothing while paused."""
        return _Suspended(self)

    # ------------------------------------------------------------------ results
    @property
    def batch(self) -> tuple[Any, Tensor] | None:
        """``(X, y)`` of the single training pass since the last reset, or None."""
        if self.forwards != 1 or self.X is None or self.y is None:
            return None
        return self.X, self.y

    @property
    def problem(self) -> str:
        """Why :attr:`batch` is None (for error messages)."""
        if self._problem:
            return self._problem
        if not self.loss_is_module:
            return ("the loss function is not an nn.Module (e.g. F.cross_entropy), so its "
                    "targets cannot be seen; pass a loss module such as nn.CrossEntropyLoss()")
        if self.forwards == 0:
            return ("no forward pass of the model with gradients since the last step "
                    "(call loss.backward() before step(), or pass a closure)")
        if self.forwards > 1:
            return (f"{self.forwards} forward passes since the last step (gradient "
                    f"accumulation?); the curvature of one step is measured on one batch")
        return ("the loss module given to build_optimizer was not called on the model's "
                "output (targets unknown)")
