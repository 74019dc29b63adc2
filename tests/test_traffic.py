"""Collective traffic is counted into counters owned by optimizers, not a process global."""

from __future__ import annotations

import threading

import torch
from torch import nn

import curvkit
from curvkit import distributed


def test_counters_are_owned_and_nest():
    outer, inner = distributed.Traffic(), distributed.Traffic()
    distributed._count(5)  # no active counter: nothing is kept anywhere
    with distributed.counting(outer):
        distributed._count(8)
        with distributed.counting(inner):
            distributed._count(16)
    distributed._count(32)
    assert (outer.bytes, outer.calls) == (24, 2)
    assert (inner.bytes, inner.calls) == (16, 1)
    assert not hasattr(distributed, "COMM")


def test_threads_do_not_see_each_others_traffic():
    seen = {}

    def work(name: str, n: int) -> None:
        t = distributed.Traffic()
        with distributed.counting(t):
            for _ in range(n):
                distributed._count(1)
        seen[name] = t.bytes

    threads = [threading.Thread(target=work, args=(f"t{i}", 50 * (i + 1))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"t0": 50, "t1": 100, "t2": 150}


def test_each_optimizer_reports_its_own_bytes():
    model = nn.Linear(3, 2)
    opt = curvkit.build_optimizer(model, nn.MSELoss(), {"lr": 0.1})
    opt.step((torch.randn(4, 3), torch.randn(4, 2)))
    assert opt.last_info["comm_bytes"] == 0  # single process: no collectives
    assert isinstance(opt.traffic, distributed.Traffic)
