"""Does assigning each layer's K-FAC inversion to one rank (and broadcasting) pay off?

Two ranks (gloo, loopback, one thread each) run fisher + kronecker + direct on an MLP with
wide layers, inverting every step, with ``distribute_inversions`` off and on; the script
prints the median step time of each, their ratio, and the bytes communicated per step.

    python benchmarks/bench_distributed.py [--width 512] [--layers 4] [--steps 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def worker(rank: int, world: int, store: str, args: argparse.Namespace, out: dict) -> None:
    import curvkit
    from curvkit import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    results = {}
    for flag in (False, True):
        torch.manual_seed(0)
        layers: list[nn.Module] = [nn.Linear(64, args.width), nn.Tanh()]
        for _ in range(args.layers - 1):
            layers += [nn.Linear(args.width, args.width), nn.Tanh()]
        model = nn.Sequential(*layers, nn.Linear(args.width, 10))
        opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
            "lr": 0.1, "estimator": "fisher", "solver": "direct",
            "preconditioner": {"name": "kronecker", "damping": 1e-2,
                               "distribute_inversions": flag}})
        X = torch.randn(args.batch, 64)
        y = torch.randint(0, 10, (args.batch,))
        shard = slice(rank, None, world)
        times, comm = [], []
        for step in range(args.steps):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step((X[shard], y[shard]))
            times.append(time.perf_counter() - t0)
            comm.append(opt.last_info["comm_bytes"])
            del step
        results[flag] = (statistics.median(times[2:]), statistics.median(comm))
    if rank == 0:
        out.update(results)
    distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(2, os.path.join(tmp, "store"), args, out), nprocs=2)
        (t_off, c_off), (t_on, c_on) = out[False], out[True]
    print(f"MLP 64-{args.width}x{args.layers}-10, batch {args.batch} on 2 ranks, "
          f"fisher + kronecker (invert every step)")
    print(f"{'distribute_inversions':>22} | {'step ms':>8} | {'bytes/step':>10}")
    print(f"{'off':>22} | {1e3 * t_off:8.1f} | {c_off:10.0f}")
    print(f"{'on':>22} | {1e3 * t_on:8.1f} | {c_on:10.0f}")
    print(f"ratio on/off: {t_on / t_off:.2f}× time, {c_on / max(c_off, 1):.2f}× bytes")


if __name__ == "__main__":
    sys.exit(main())
