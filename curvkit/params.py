"""Trainable parameters as ordered lists, and conversions between list, flat and module form;
and the non-finite checks on them that the step relies on: bounds of each tensor's largest
magnitude (:func:`max_abs`, :func:`magnitude_bounds`, one :class:`FiniteLedger` per step),
whether θ + α·d stays finite (:func:`update_finite`), whether a part's state is finite
(:func:`state_finite`).

Order everywhere in curvkit: ``[p for p in model.parameters() if p.requires_grad]``.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs of the trainable parameters, in ``model.parameters()`` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def owners(model: nn.Module) -> dict[str, tuple[str, nn.Module, str]]:
    """Map a parameter's full name to ``(module name, module, attribute name)``."""
    out = {}
    for mod_name, mod in model.named_modules():
        for attr, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{attr}" if mod_name else attr
            out.setdefault(full, (mod_name, mod, attr))
    return out


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors, each flattened, into one vector of length P."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Inverse of :func:`flatten`: split a P-vector into tensors shaped like ``like``."""
    out, start = [], 0
    for t in like:
        n = t.numel()
        out.append(vector[start:start + n].view_as(t))
        start += n
    if start != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, parameters have {start}")
    return out


def check_like(v: Sequence[Tensor], like: Sequence[Tensor], what: str = "v") -> None:
    """Raise a clear error unless ``v`` matches the parameter shapes."""
    if len(v) != len(like):
        raise ValueError(f"{what} has {len(v)} tensors, the model has {len(like)} trainable "
                         f"parameters")
    for i, (a, b) in enumerate(zip(v, like)):
        if a.shape != b.shape:
            raise ValueError(f"{what}[{i}] has shape {tuple(a.shape)}, parameter {i} has "
                             f"shape {tuple(b.shape)}")


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """True if every entry of every tensor is finite.

    A NaN or ±inf entry makes its tensor's sum non-finite, so one sum per tensor (several
    times cheaper than an element-wise isfinite scan, measured on a step of SINGD) decides
    the common case; only when a sum is non-finite — possibly an overflow of finite values —
    is the exact element-wise check run. The sums stay in the tensors' own dtype: a wider
    accumulator tripled their cost, and an overflow only sends the check to the exact path.
    """
    if not tensors:
        return True
    # stack promotes mixed dtypes (exactly, and keeping inf and NaN); the sums reach the
    # host as one list and are judged there: half the cost of isfinite/all/bool on a device
    # tensor and a dtype scan, for a layer-wise state of small tensors (measured)
    if all(map(math.isfinite, torch.stack([t.sum() for t in tensors]).tolist())):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


#: (largest finite value F, machine epsilon) of the floating dtypes, looked up on the step's
#: hot path by the finite checks here, the momentum bounds and the update check
FLOAT_LIMITS = {dt: (torch.finfo(dt).max, torch.finfo(dt).eps)
                for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


def float_limits(dtype: torch.dtype) -> tuple[float, float]:
    """The largest finite value F of a floating ``dtype`` and its machine epsilon."""
    return FLOAT_LIMITS.get(dtype) or _finfo_limits(dtype)


@functools.cache
def _finfo_limits(dtype: torch.dtype) -> tuple[float, float]:
    info = torch.finfo(dtype)
    return info.max, info.eps


def max_abs(tensors: Sequence[Tensor]) -> list[float] | None:
    """``max |t|`` of each tensor (0 for an empty or integer one), or None if any entry is
    NaN or ±inf.

    The least and largest entry of each tensor: exact (no sum that may overflow), and the
    largest magnitude bounds the update ``θ + α·d`` without reading θ
    (:func:`update_finite`); NaN propagates through both. One
    ``aminmax`` per tensor (one read): right after the backward pass, on the MLP of
    bench_step, it cost half of ``amin`` + ``amax`` (two reads of gradients that are no
    longer in cache). A float32 sum costs about half but bounds no entry (entries of
    opposite sign cancel); the step's own check takes the 2-norms instead
    (:func:`magnitude_bounds`), a bound that is cheaper still. On the CPU the ends are read
    one by one, which costs half of stacking them first (12 ends of the CNN of bench_step:
    2.2 vs 4.4 µs); elsewhere they come back in one host transfer.
    """
    isfinite = math.isfinite
    if all(t.is_floating_point() and t.numel() for t in tensors):  # the common case
        ends = [e for t in tensors for e in torch.aminmax(t)]
        if not ends:
            return []
        if ends[0].device.type == "cpu" or len({e.device for e in ends}) > 1:
            # read one by one: half the cost of stacking them (one more operation) on the
            # CPU; across devices (a model split over several) they cannot be stacked
            values = [e.item() for e in ends]
        else:  # one host transfer
            if len({t.dtype for t in tensors}) > 1:
                ends = [e.double() for e in ends]  # exact for every float dtype
            values = torch.stack(ends).tolist()
        if not all(map(isfinite, values)):
            return None
        return list(map(max, map(operator.neg, values[0::2]), values[1::2]))
    idx = [i for i, t in enumerate(tensors) if t.is_floating_point() and t.numel()]
    out = [0.0] * len(tensors)
    found = max_abs([tensors[i] for i in idx]) if idx else []
    if found is None:
        return None
    for i, m in zip(idx, found):
        out[i] = m
    return out


_NORMED = (torch.float32, torch.float64)
# the largest finite value of each float dtype (-1: no bound proves another dtype finite)
_TOP = {dt: top for dt, (top, _) in FLOAT_LIMITS.items()}
# 1 + 4ε of the normed dtypes: what rounding can take off a sum of squares' root
_ROUNDING = {dt: 1 + 4 * FLOAT_LIMITS[dt][1] for dt in _NORMED}
# sqrt of float32's smallest normal: what squares lost to underflow can hide of an entry
_UNDERFLOW = math.sqrt(torch.finfo(torch.float32).tiny)
# from this many entries on, a CPU tensor's sum of squares is BLAS's dot (numpy's) rather
# than torch's norm kernel: the same one read of the gradient, with less work per entry
# (the figures: docs/benchmarks.md, the plumbing rows); below it the conversion to a numpy
# view costs more than it saves
_BLAS_MIN = 1 << 15


def magnitude_bounds(tensors: Sequence[Tensor]) -> list[float] | None:
    """An upper bound of ``max |t|`` for each tensor, or None if any entry is NaN or ±inf.

    float32/float64 tensors: the square root of their sum of squares ``s`` (BLAS's dot
    ``t·t`` for large CPU tensors, else their 2-norms in one ``torch._foreach_norm`` call:
    cheaper than one ``aminmax`` per tensor). A sum of squares only adds non-negative
    terms, in any order and with or without fused multiply-adds, so it is not below any
    rounded square: ``max |t| <= sqrt(s)·(1 + 4ε)`` plus what underflowed squares can hide
    (``_UNDERFLOW``). A NaN or ±inf entry makes ``s`` NaN or inf; so does a square or sum
    that overflows, and then :func:`max_abs` decides exactly. Other dtypes (float16's
    squares overflow at 256, and a bound that loose would send its update check to the
    exact path) take :func:`max_abs`.
    """
    if not tensors:
        return []
    roots: list[float] = [0.0] * len(tensors)
    rest: list[int] = []
    for i, t in enumerate(tensors):
        if t.dtype not in _NORMED or not t.numel():
            return max_abs(tensors)
        if t.is_cpu and t.numel() >= _BLAS_MIN and t.is_contiguous():
            try:
                a = t.detach().numpy().reshape(-1)
            except (RuntimeError, TypeError):  # a tensor numpy cannot view (a subclass)
                rest.append(i)
                continue
            with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN: decided below
                roots[i] = math.sqrt(float(np.dot(a, a)))  # sqrt(nan or inf) stays so
        else:
            rest.append(i)
    if rest:
        norms = torch._foreach_norm([tensors[i] for i in rest])
        if norms[0].device.type == "cpu" or len({n.device for n in norms}) > 1:
            values = [n.item() for n in norms]
        else:  # one host transfer
            if len({n.dtype for n in norms}) > 1:
                norms = [n.double() for n in norms]
            values = torch.stack(norms).tolist()
        for i, v in zip(rest, values):
            roots[i] = v
    if not all(map(math.isfinite, roots)):
        return max_abs(tensors)  # non-finite, or an overflow of finite entries
    return [r * _ROUNDING[t.dtype] + _UNDERFLOW for r, t in zip(roots, tensors)]


class FiniteLedger:
    """:func:`max_abs` that does not scan a tensor twice in one step.

    A tensor found finite is remembered with its version counter (bumped by every in-place
    operation) and a bound of its largest magnitude (:func:`magnitude_bounds`: the root of
    the sum of squares for float32/float64, the exact ends otherwise); checked again while
    it is the same object at the same version, it is not scanned. identity + direct then reads the
    gradient once per step: its finite check, the preconditioned direction's and the bound
    on the applied step are one scan. A tensor computed from checked tensors by arithmetic
    whose result is bounded (SGD's momentum recursion, :mod:`curvkit.solvers.direct`) is
    recorded with that bound (:meth:`note`) instead of scanned. :meth:`max_abs` so returns
    upper bounds of ``max |t|``, never below it. The ledger holds its tensors, so an id is
    not reused while it lives: keep one per step.
    """

    __slots__ = ("_last", "_seen")

    def __init__(self) -> None:
        # tensors answered: id -> (tensor, version, max |t| or its bound)
        self._seen: dict[int, tuple[Tensor, int, float]] = {}
        # the last list answered: (its tensors, their versions, the answer); the same
        # tensors unchanged (the gradient passed on as the direction) are answered from it
        self._last: tuple[list[Tensor], list[int], list[float]] | None = None

    def __call__(self, tensors: Sequence[Tensor]) -> bool:
        return self.max_abs(tensors) is not None

    def note(self, t: Tensor, bound: float) -> None:
        """Record that ``t``, as it is now, is finite with ``max |t| <= bound``, known from
        how it was computed (a bound not below the dtype's largest value proves nothing
        and is not recorded)."""
        v = _version(t)
        if v is not None and t.is_floating_point() and bound <= float_limits(t.dtype)[0]:
            self._seen[id(t)] = (t, v, float(bound))

    def remember(self, tensors: Sequence[Tensor], bounds: Sequence[float]) -> None:
        """:meth:`note` for a list at once, answered as a whole when asked again (the
        solver's direction, asked for by the update check); a bound that proves nothing
        leaves its tensor to be scanned."""
        try:
            if all(map(operator.le, bounds, [_TOP.get(t.dtype, -1.0) for t in tensors])):
                last, self._last = self._last, None
                if last is not None:  # keep what the last list knew
                    for t, v, m in zip(*last):
                        self._seen[id(t)] = (t, v, m)
                self._last = (list(tensors), [t._version for t in tensors],
                              [float(b) for b in bounds])
                return
        except RuntimeError:  # an inference tensor has no version counter
            pass
        for t, b in zip(tensors, bounds):
            self.note(t, b)

    def max_abs(self, tensors: Sequence[Tensor]) -> list[float] | None:
        """``max |t|`` (or the bound given to :meth:`note`) of each tensor, or None if any
        is non-finite; only the tensors not seen unchanged in this step are scanned."""
        last = self._last
        try:
            if last is not None and len(tensors) == len(last[0]) \
                    and all(map(operator.is_, tensors, last[0])) \
                    and [t._version for t in tensors] == last[1]:
                return list(last[2])
            # the step's first check (the gradient): nothing to look up
            found = self._max_abs(tensors) if last or self._seen \
                else magnitude_bounds(tensors)
            if found is not None:
                self._last = (list(tensors), [t._version for t in tensors], found)
                return list(found)
        except RuntimeError:  # an inference tensor has no version counter: not remembered
            found = magnitude_bounds(tensors)
        return found

    def _max_abs(self, tensors: Sequence[Tensor]) -> list[float] | None:
        seen = self._seen
        last, self._last = self._last, None
        if last is not None:  # remembered one by one from now on
            for t, v, m in zip(*last):
                seen[id(t)] = (t, v, m)
        hits = [seen.get(id(t)) for t in tensors]
        todo = [i for i, (h, t) in enumerate(zip(hits, tensors))
                if h is None or h[0] is not t or h[1] != t._version]
        found = magnitude_bounds([tensors[i] for i in todo]) if todo else []
        if found is None:
            return None
        for i, m in zip(todo, found):
            t = tensors[i]
            seen[id(t)] = (t, t._version, m)
        out = [h[2] if h is not None else 0.0 for h in hits]
        for i, m in zip(todo, found):
            out[i] = m
        return out


def update_finite(dmax: list[float], alpha: float, alphas: list[float] | None,
                  params: list[Tensor], direction: list[Tensor]) -> bool:
    """True if θ + α·d stays finite in each parameter's dtype, given ``dmax >= max|d|`` of
    a finite direction (from the step's ledger: the direction's own finite check, or the
    bound the momentum recursion carries); α is ``alpha``, or ``alphas[i]`` per parameter.

    Round to nearest cannot carry a finite θ past the dtype's largest value F when
    |α|·max|d| is below half the spacing of the floats at F (≈ F·eps/4): then the bound
    needs no read of θ (identity + direct reads the gradient once per step, as SGD does
    for its update). Larger steps take the exact bound max|θ| + |α|·max|d| ≤ F (a read of
    those parameters, and of their directions where ``dmax`` is only a bound). θ itself
    is not rechecked on the fast path: a parameter that is already NaN or inf was made so
    by someone else, and its loss is non-finite.
    """
    if not dmax:
        return True
    if alphas is None:
        if not math.isfinite(alpha):
            return False
        biggest = abs(alpha)
    else:
        if not all(map(math.isfinite, alphas)):
            return False
        biggest = max(map(abs, alphas))
    # the common case in one comparison: the largest step against the smallest headroom
    if biggest * max(dmax) <= min(map(_headroom, params)):
        return True
    slow = []
    for i, (p, m) in enumerate(zip(params, dmax)):
        size = abs(alpha if alphas is None else alphas[i]) * m
        if size > _headroom(p):
            slow.append(i)
    if not slow:
        return True
    exact = max_abs([direction[i] for i in slow])
    if exact is None:
        return False
    pmax = torch.stack([params[i].detach().abs().amax().double() for i in slow]).tolist()
    return all(math.isfinite(m)
               and m + abs(alpha if alphas is None else alphas[i]) * e
               <= _step_limits(params[i].dtype)[0]
               for i, m, e in zip(slow, pmax, exact))


def _headroom(p: Tensor) -> float:
    """The step size that cannot carry a finite entry of ``p`` past its largest value
    (infinite for a non-floating parameter, which no step changes)."""
    return _HEADROOM.get(p.dtype) or (_step_limits(p.dtype)[1] if p.is_floating_point()
                                      else math.inf)


def _step_limits(dtype: torch.dtype) -> tuple[float, float]:
    """The largest finite value F of ``dtype`` and a step size that cannot carry a finite
    value past it (F·eps/16: an eighth of half the spacing of the floats at F)."""
    top, eps = float_limits(dtype)
    return top, top * eps / 16


_HEADROOM = {dt: top * eps / 16 for dt, (top, eps) in FLOAT_LIMITS.items()}


def state_finite(state: Any) -> bool:
    """True if every float and floating-point tensor in a nested state is finite (the
    tensors checked together by :func:`all_finite`: one fused check instead of one
    element-wise scan and host sync per tensor).

    An explicit stack, not a recursive closure: a nested function that calls itself holds
    its own cell, and that cycle kept the collected tensors (every replaced statistic of the
    update) alive until the cycle collector ran, so memory grew with the step count.
    """
    tensors: list[Tensor] = []
    stack = [state]
    while stack:
        x = stack.pop()
        if isinstance(x, Tensor):
            if x.is_floating_point():
                tensors.append(x)
        elif isinstance(x, Mapping):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif isinstance(x, float) and not math.isfinite(x):
            return False
    return all_finite(tensors)
