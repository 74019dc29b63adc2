"""Extra peak memory of SINGD (``lie_group``, estimator ``ef``, solver ``direct``) vs singd.

Run:  python benchmarks/bench_singd_memory.py [--width 2048] [--steps 4]
      [--structures dense diagonal] [--out FILE]

Each contender trains an MLP 784-W-W-W-10 (batch 128, float32, CrossEntropyLoss) with an
update every step (T = 1), the same hyperparameters (lr, momentum 0.9, lr_cov, alpha1,
damping) and structure for K and C, in a fresh process. Reported: peak RSS (``ru_maxrss``)
after ``--steps`` steps minus the peak after one plain forward and backward of the model
(before the optimizer exists), i.e. the optimizer's extra memory; once with glibc's
default allocator settings and once with ``MALLOC_MMAP_THRESHOLD_=1048576`` (every matrix
of ≥ 1 MiB mapped and returned on free: what the live tensors need, without the heap that
glibc's growing mmap threshold retains). Not a test; memory only, no timing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import warnings

import torch
from _common import header, out_arg, publish
from torch import nn

HP = {"lr_cov": 1e-2, "alpha1": 0.5, "damping": 1e-3}
SINGD_NAMES = {"dense": "dense", "diagonal": "diagonal"}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(side: str, width: int, steps: int, structure: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width),
                          nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 10))
    X, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(model(X), y).backward()
    model.zero_grad(set_to_none=True)
    base = peak_mib()
    if side == "curvkit":
        import curvkit
        opt = curvkit.build_optimizer(model, loss_fn, {
            "lr": 1e-2, "estimator": "ef",
            "preconditioner": {"name": "lie_group", "structures": [structure, structure],
                               "update_every": 1, **HP},
            "solver": {"name": "direct", "momentum": 0.9}})

        def step() -> None:
            opt.step((X, y))
    else:
        from singd.optim.optimizer import SINGD
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sopt = SINGD(model, lr=1e-2, momentum=0.9, T=1,
                         structures=(SINGD_NAMES[structure],) * 2, **HP)

        def step() -> None:
            sopt.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loss_fn(model(X), y).backward()
                sopt.step()
    for _ in range(steps):
        step()
    print(json.dumps({"extra": peak_mib() - base}))


def run(side: str, width: int, steps: int, structure: str, fixed: bool) -> float:
    env = dict(os.environ)
    if fixed:
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    res = subprocess.run([sys.executable, __file__, "--child", side, "--width", str(width),
                          "--steps", str(steps), "--structures", structure],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(res.stdout.strip().splitlines()[-1])["extra"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--structures", nargs="+", default=["dense", "diagonal"])
    ap.add_argument("--repeats", type=int, default=1, help="unused (run_all passes it)")
    ap.add_argument("--child", default="")
    ap.add_argument("--out", **out_arg("singd_memory.md"))
    args = ap.parse_args()
    if args.child:
        child(args.child, args.width, args.steps, args.structures[0])
        return
    torch.set_num_threads(1)  # as in the children (the header reports it)
    lines = header("Benchmark: SINGD's extra memory vs singd", "bench_singd_memory.py",
                   f"MLP 784-{args.width}-{args.width}-{args.width}-10, batch 128, float32, "
                   f"T = 1, {args.steps} steps, each contender in a fresh process; extra "
                   f"peak RSS over one plain forward and backward. Target: curvkit ≤ singd.",
                   timed=False)
    lines += ["| structure | allocator | curvkit (MiB) | singd (MiB) | ratio |",
              "|---|---|---:|---:|---:|"]
    for structure in args.structures:
        for fixed in (False, True):
            ours = run("curvkit", args.width, args.steps, structure, fixed)
            theirs = run("singd", args.width, args.steps, structure, fixed)
            alloc = "mmap ≥ 1 MiB" if fixed else "default"
            lines.append(f"| {structure} | {alloc} | +{ours:.0f} | +{theirs:.0f} | "
                         f"{ours / theirs:.2f}× |")
            print(lines[-1], flush=True)
    lines.append("")
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
