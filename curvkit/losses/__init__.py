"""Losses: the registered ``loss`` parts and how curvature code finds the one for a loss.

Each built-in part (one per file: ``cross_entropy``, ``mse``, ``bce_with_logits``,
``gaussian_nll``, ``nll``) describes a family of PyTorch loss modules; see
:mod:`curvkit.losses.base` for what a part provides. :func:`loss_part` finds the part of a
``loss_fn`` among all registered ones (plugins included), by type and settings, and refuses
a loss no part handles with a message naming it and listing the registered loss parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

from torch import Tensor
from torch.func import grad, vjp

from curvkit.errors import ConfigError
from curvkit.losses.base import (
    LOSS_CAPABILITIES,
    LOSS_GRADIENT,
    LOSS_HESSIAN,
    LOSS_SAMPLING,
    LossPart,
)
from curvkit.losses.gaussian_nll import GaussianNLL

Reduction = Literal["mean", "sum"]


class UnsupportedLossError(ConfigError, TypeError):
    """No registered loss part handles this loss (or not with these settings)."""


def reduction_of(loss_fn: object, where: str = "loss_fn") -> Reduction:
    """The loss' reduction, ``'mean'`` or ``'sum'``; ``'none'`` is rejected with a clear error.

    A plain callable without a ``reduction`` attribute is taken to average over the batch.
    """
    red = getattr(loss_fn, "reduction", "mean")
    if red not in ("mean", "sum"):
        raise ValueError(f"{where}: reduction={red!r} is not supported; curvature is defined "
                         f"for reduction 'mean' or 'sum'")
    return red


def batch_size(batch: tuple) -> int:
    """Number of samples in ``(X, y)``: the leading dimension of ``y``."""
    return int(batch[1].shape[0])


def _specificity(cls: type, loss_fn: Any) -> int:
    """How close the part's ``loss_type`` is to ``type(loss_fn)`` (0 = exactly it)."""
    mro = type(loss_fn).__mro__
    return mro.index(cls.loss_type) if cls.loss_type in mro else len(mro)


def find_loss_part(loss_fn: Any) -> type[LossPart] | None:
    """The registered loss part class for ``loss_fn``, or None if none matches. Several
    matches: the one whose loss type is closest to the loss' class; a tie is an error."""
    from curvkit.registry import get_registry

    reg = get_registry()
    found = [s for s in reg.parts.values() if s.kind == "loss" and s.cls.matches(loss_fn)]
    if not found:
        return None
    found.sort(key=lambda s: _specificity(s.cls, loss_fn))
    if len(found) > 1 and _specificity(found[0].cls, loss_fn) == \
            _specificity(found[1].cls, loss_fn):
        raise UnsupportedLossError(
            f"loss {type(loss_fn).__name__} is matched by the loss parts {found[0].name!r} "
            f"({found[0].source}) and {found[1].name!r} ({found[1].source}) alike; disable one "
            f"plugin")
    return found[0].cls


def registered_losses() -> list[str]:
    from curvkit.registry import get_registry

    reg = get_registry()
    return [f"{s.name} ({s.cls.loss_type.__module__}.{s.cls.loss_type.__qualname__})"
            for s in sorted(reg.parts.values(), key=lambda s: s.name) if s.kind == "loss"]


def loss_part(loss_fn: Any, where: str = "loss_fn", needs: Iterable[str] = ()) -> LossPart:
    """The registered loss part bound to ``loss_fn``, providing ``needs`` (capabilities
    :data:`LOSS_GRADIENT`, :data:`LOSS_HESSIAN`, :data:`LOSS_SAMPLING`); a clear error
    naming the loss and the registered loss parts otherwise."""
    if isinstance(loss_fn, LossPart):
        part = loss_fn
    else:
        cls = find_loss_part(loss_fn)
        name = type(loss_fn).__name__
        if cls is None:
            raise UnsupportedLossError(
                f"{where}: loss {name} is not supported; no registered loss part describes "
                f"it (registered: {', '.join(registered_losses())}). A plugin adds one: see "
                f"'Add your own likelihood' in the plugin tutorial")
        why = cls.refusal(loss_fn)
        if why:
            raise UnsupportedLossError(f"{where}: loss {name} (loss part {cls.name!r}): {why}")
        part = cls(loss_fn)
    missing = [n for n in needs if n not in part.provides]
    if missing:
        reason = part.missing_reason or (f"the loss part {part.name!r} does not provide "
                                         f"{', '.join(missing)}")
        raise UnsupportedLossError(f"{where}: loss {type(part.loss_fn).__name__}: {reason}")
    return part


def try_loss_part(loss_fn: Any) -> LossPart | None:
    """:func:`loss_part` or None when no part handles the loss (no error)."""
    try:
        return loss_part(loss_fn)
    except UnsupportedLossError:
        return None


def output_hvp(loss_fn: Any, out: Tensor, y: Tensor,
               part: LossPart | None = None) -> Callable[[Tensor], Tensor]:
    """w ↦ ∂²L/∂f² w for the loss L = loss_fn(out, y) under its reduction: the loss part's
    c·H when a part provides the Hessian, else ``torch.func`` on the loss itself (any
    twice-differentiable loss; reverse-over-reverse since H is symmetric)."""
    if part is not None and LOSS_HESSIAN in part.provides:
        c = part.reduction_factor(out, y)
        h = part.hessian_vector(out.detach(), y)
        return h if c == 1.0 else (lambda w: c * h(w))
    out = out.detach()
    _, pull = vjp(grad(lambda o: loss_fn(o, y)), out)
    return lambda w: pull(w.to(out.dtype))[0]


__all__ = ["LossPart", "GaussianNLL", "UnsupportedLossError", "loss_part", "try_loss_part",
           "find_loss_part", "registered_losses", "output_hvp", "reduction_of", "batch_size",
           "LOSS_GRADIENT", "LOSS_HESSIAN", "LOSS_SAMPLING", "LOSS_CAPABILITIES"]
