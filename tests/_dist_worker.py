"""One rank of a data-parallel curvkit run, launched by tests/test_distributed.py.

usage: python _dist_worker.py RANK WORLD STORE CASE_JSON OUT
Rank r trains on its shard of every batch (rows r::WORLD ... contiguous halves) and
rank 0 writes the final parameters and per-step losses to OUT (torch.save).
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from curvkit import distributed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _dist_problem import make_problem, run_steps  # noqa: E402


def main() -> None:
    rank, world, store, case_json, out = sys.argv[1:6]
    rank, world = int(rank), int(world)
    case = json.loads(case_json)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world,
                            timeout=timedelta(seconds=float(case.get("timeout", 60))))
    ok = False
    try:
        fail_at = case.get("fail_rank_at_step")
        model, loss_fn, batches = make_problem(case)

        def on_step(step: int) -> None:
            if fail_at is not None and rank == case.get("fail_rank", 1) and step == fail_at:
                if case.get("fail_mode") == "hang":
                    time.sleep(float(case.get("hang_seconds", 30)))
                raise RuntimeError(f"injected failure on rank {rank} at step {step}")

        shards = []
        for X, y in batches:
            n = X.shape[0]
            # unequal shards on purpose: the reduction must weight by sample counts
            cut = int(case.get("split", 0.5) * n)
            lo, hi = (0, cut) if rank == 0 else (cut, n)
            shards.append((X[lo:hi], y[lo:hi]))
        if case.get("ddp"):
            model = torch.nn.parallel.DistributedDataParallel(model)
        losses, params, infos = run_steps(model, loss_fn, shards, case, on_step)
        if rank == 0:
            torch.save({"losses": losses, "params": params, "infos": infos}, out)
        ok = True
    finally:
        distributed.shutdown(ok)
    distributed.exit_process(0)


if __name__ == "__main__":
    main()
