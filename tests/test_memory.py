"""No tensor of a step outlives it: with the cycle collector off, every replaced statistic
and every temporary of a step is freed by reference counting alone, for every composition
(a tensor kept alive by a reference cycle made memory grow with the step count)."""

from __future__ import annotations

import gc
import itertools
import warnings
import weakref
from collections.abc import Iterator, Mapping

import pytest
import torch
from torch import Tensor, nn

import curvkit

PRECONDITIONERS = {
    "identity": "identity",
    "diagonal": {"name": "diagonal"},
    "block": {"name": "block"},
    "kronecker": {"name": "kronecker"},
    "lie_group": {"name": "lie_group", "update_every": 1},
    "partition": {"name": "partition"},
}
SOLVERS = {
    "direct": {"name": "direct", "momentum": 0.9},
    "trust_region": {"name": "trust_region", "max_iters": 3},
    "cubic": {"name": "cubic"},
    "varpro": {"name": "varpro", "alpha": 1e-3},
}


def compositions() -> Iterator[tuple[str, str, str]]:
    for pre, sol in itertools.product(PRECONDITIONERS, SOLVERS):
        if sol == "cubic" and pre != "partition":
            continue  # cubic needs the group summary only partition provides
        yield ("hessian" if sol == "cubic" else "ggn"), pre, sol


def state_tensors(x: object) -> Iterator[Tensor]:
    if isinstance(x, Tensor):
        yield x
    elif isinstance(x, Mapping):
        for v in x.values():
            yield from state_tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from state_tensors(v)


def held(opt: curvkit.CurvkitOptimizer) -> set[int]:
    parts = (opt.estimator, opt.preconditioner, opt.solver)
    return {id(t) for part in parts for t in state_tensors(getattr(part, "state", {}))}


@pytest.mark.parametrize("estimator,pre,sol", list(compositions()),
                         ids=["-".join(c) for c in compositions()])
def test_no_state_tensor_outlives_its_step(estimator, pre, sol):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    config = {"lr": 0.1, "estimator": estimator, "preconditioner": PRECONDITIONERS[pre],
              "solver": SOLVERS[sol]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), config)
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        opt.step((X, y))
        refs = [weakref.ref(t) for part in (opt.estimator, opt.preconditioner, opt.solver)
                for t in state_tensors(getattr(part, "state", {}))]
        for _ in range(2):
            opt.step((X, y))
        still = held(opt)
        leaked = [r() for r in refs if r() is not None and id(r()) not in still]
        assert not leaked, f"{len(leaked)} replaced state tensors still alive"
        # nothing of the steps is garbage that only the cycle collector could free
        # (cycles of torch's own pytree helpers hold no tensors)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        tensors = [o for o in gc.garbage if isinstance(o, Tensor)]
        assert not tensors, f"{len(tensors)} tensors only reachable through a cycle"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if enabled:
            gc.enable()
