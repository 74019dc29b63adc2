"""Data parallelism on torch.distributed: every statistic is reduced as a count-weighted sum.

Single process (no initialized process group, or world size 1): every function is a no-op
apart from the weighting, so the same code path serves both cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from curvkit.errors import CurvkitError


@dataclass
class Traffic:
    """Bytes and calls of the collectives made while this counter is active
    (:func:`counting`). Each optimizer owns one; there is no process-wide counter, so two
    optimizers (or threads) never see each other's traffic."""

    bytes: int = 0
    calls: int = 0


# the counters active in this context (nested optimizers each count their own collectives)
_ACTIVE: ContextVar[tuple[Traffic, ...]] = ContextVar("curvkit_traffic", default=())


class counting:  # noqa: N801 - used as a function: ``with counting(traffic)``
    """Count the collectives made inside the block into ``traffic`` (a class, not a
    generator: it opens every optimizer step)."""

    __slots__ = ("_token", "traffic")

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic

    def __enter__(self) -> Traffic:
        self._token = _ACTIVE.set(_ACTIVE.get() + (self.traffic,))
        return self.traffic

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.reset(self._token)


def _count(nbytes: int) -> None:
    for traffic in _ACTIVE.get():
        traffic.bytes += int(nbytes)
        traffic.calls += 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


class DistributedError(CurvkitError, RuntimeError):
    """A collective failed: another rank crashed, diverged in control flow, or timed out."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` or ``torch.compile`` wrapper (or the
    model itself).

    curvkit reduces every statistic itself, weighted by each rank's sample count; DDP's
    gradient hook averages with equal weights per rank, which is wrong for unequal shards,
    and it fires on ``.backward()`` only. So curvkit works on the wrapped module; the
    wrapper's job (identical initial parameters on every rank) is done at its construction.
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    # torch.compile's wrapper: parts hook and call the original module (its layers are the
    # compiled module's layers: hooks installed there run in the compiled forward too)
    orig = getattr(model, "_orig_mod", None)
    return orig if isinstance(orig, nn.Module) else model


def _collective(fn, what: str, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as err:  # gloo/NCCL raise RuntimeError subclasses with terse texts
        raise DistributedError(
            f"rank {dist.get_rank()}/{dist.get_world_size()}: {what} failed — another rank "
            f"crashed, timed out or took a different code path ({type(err).__name__}: {err})"
        ) from err


def all_reduce_sum_(tensors: Sequence[Tensor]) -> None:
    """Sum ``tensors`` in place over all ranks, as one flat message per dtype."""
    if not active() or not tensors:
        return
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        _collective(dist.all_reduce, f"all-reduce of {flat.numel()} values", flat,
                    op=dist.ReduceOp.SUM)
        _count(flat.numel() * flat.element_size())
        start = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[start:start + n].view_as(t))
            start += n


def shutdown(ok: bool = True) -> None:
    """Leave the process group: on success wait for every rank first (a rank that tears
    gloo down while a peer still talks to it dies in C++ with ``terminate called without an
    active exception``); after a failure just destroy, since peers may be gone."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if ok and dist.get_world_size() > 1:
            _collective(dist.barrier, "final barrier")
    finally:
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """End a process that ran data-parallel, after :func:`shutdown`, without interpreter
    teardown.

    Measured here: about 1 run in 25 of a 2-rank gloo job aborts (SIGABRT, "terminate
    called without an active exception") *after* the process group was destroyed cleanly,
    while native threads are torn down at interpreter exit — turning a finished run into a
    failed one. Everything curvkit writes is flushed and fsynced before this point, so the
    process flushes stdio and leaves with ``os._exit``.
    """
    import os
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def comm_device() -> torch.device:
    """The device collectives of the active process group need: CUDA (the current device)
    for NCCL, the CPU otherwise (gloo)."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def count_tensor(count: float, like: Tensor | None = None, dtype: torch.dtype = torch.float64
                 ) -> Tensor:
    """A one-element tensor holding a sample count, on ``like``'s device (a statistic it is
    reduced with) or the process group's; float64, or float32 where the device has no float64
    (MPS)."""
    device = like.device if like is not None else comm_device()
    if device.type == "mps" and dtype == torch.float64:
        dtype = torch.float32
    return torch.tensor([count], dtype=dtype, device=device)


def shard_rows(count: int) -> tuple[int, int]:
    """``(offset, total)``: this rank's ``count`` samples are rows ``offset:offset+count`` of
    the global batch (ranks in order) of ``total`` rows. Single process: ``(0, count)``."""
    if not active():
        return 0, int(count)
    mine = count_tensor(int(count), dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    _collective(dist.all_gather, "all-gather of shard sizes", every, mine)
    _count(8 * len(every))
    sizes = [int(t) for t in every]
    return sum(sizes[:dist.get_rank()]), sum(sizes)


def broadcast_(tensors: Sequence[Tensor], src: int) -> None:
    if not active():
        return
    for t in tensors:
        # collectives move raw storage: a non-contiguous tensor (e.g. eigh's column-major
        # eigenvectors) must travel through a contiguous buffer
        buf = t if t.is_contiguous() else t.contiguous()
        _collective(dist.broadcast, f"broadcast of {t.numel()} values from rank {src}", buf,
                    src=src)
        if buf is not t:
            t.copy_(buf)
        _count(t.numel() * t.element_size())


def equal_mean(values: Sequence[Tensor]) -> list[Tensor]:
    """The mean over ranks with equal weights, Σ_r value_r / R (what DDP does to gradients):
    one all-reduce per dtype. Returns new tensors; the inputs are not modified."""
    out = [v.detach().clone() for v in values]
    if not active():
        return out
    all_reduce_sum_(out)
    world = dist.get_world_size()
    return [v.div_(world) for v in out]


def weighted_mean(values: Sequence[Tensor], count: float, reduction: str = "mean"
                  ) -> list[Tensor]:
    """Combine per-rank statistics into the statistic of the union of all ranks' samples.

    ``values`` are this rank's results computed with the loss' ``reduction`` on ``count``
    samples. For ``'mean'`` the result is Σ_r count_r·value_r / Σ_r count_r, for ``'sum'``
    it is Σ_r value_r. Returns new tensors; the inputs are not modified.
    """
    if not active():
        return list(values)
    if reduction == "sum":
        out = [v.clone() for v in values]
        all_reduce_sum_(out)
        return out
    total = count_tensor(float(count), values[0] if values else None)
    out = [v * count for v in values]
    all_reduce_sum_(out + [total])
    n = float(total.item())
    return [v / n for v in out]
