"""Peak memory over many steps: it must not grow with the step count.

Run:  python benchmarks/bench_memory.py [--steps 100] [--width 1024] [--out FILE]

Each composition trains in a fresh process (``--child``) without any explicit
``gc.collect()``, and reports its peak resident set size (``ru_maxrss``) after 3 steps and
after ``--steps`` steps; the ratio must stay ≤ 1.10. A reference cycle on the step path
(a recursive closure in the optimizer's finite check once kept every replaced statistic
alive until the cycle collector ran) makes the peak grow with the step count.
``tests/test_memory.py`` checks the cause on a small model for every composition (no
state tensor outlives its step with the collector off). Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import warnings

import torch
from _common import header, out_arg, publish
from torch import nn

CONFIGS = {
    "fisher + kronecker + direct (K-FAC)": {
        "estimator": "fisher", "preconditioner": {"name": "kronecker", "damping": 1e-2},
        "solver": {"name": "direct", "momentum": 0.9}},
    "ef + lie_group (dense) + direct (SINGD)": {
        "estimator": "ef", "preconditioner": {"name": "lie_group", "update_every": 1},
        "solver": {"name": "direct", "momentum": 0.9}},
    "fisher + diagonal + direct": {
        "estimator": "fisher", "preconditioner": {"name": "diagonal", "damping": 1e-2},
        "solver": "direct"},
    "ggn + identity + trust_region (Hessian-free)": {
        "estimator": "ggn", "preconditioner": "identity",
        "solver": {"name": "trust_region", "max_iters": 5}},
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(label: str, steps: int, width: int) -> None:
    import curvkit

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width),
                          nn.Tanh(), nn.Linear(width, 10))
    X, y = torch.randn(128, 784), torch.randint(0, 10, (128,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(),
                                      {"lr": 1e-3, **CONFIGS[label]})
    out = {}
    for k in range(1, steps + 1):
        opt.step((X, y))
        if k in (3, steps):
            out[k] = peak_mib()
    print(json.dumps({"start": out[3], "end": out[steps]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1, help="unused (run_all passes it)")
    ap.add_argument("--child", default="")
    ap.add_argument("--out", **out_arg("memory.md"))
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps, args.width)
        return
    lines = header("Benchmark: peak memory over steps", "bench_memory.py",
                   f"MLP 784-{args.width}-{args.width}-10, batch 128, float32; each "
                   f"composition in a fresh process, no explicit `gc.collect()`; peak RSS "
                   f"(`ru_maxrss`) after 3 and after {args.steps} steps. Target: ≤ 1.10×.",
                   timed=False)
    lines += ["| composition | peak after 3 steps (MiB) | peak after "
              f"{args.steps} steps (MiB) | ratio |", "|---|---:|---:|---:|"]
    for label in CONFIGS:
        res = subprocess.run([sys.executable, __file__, "--child", label, "--steps",
                              str(args.steps), "--width", str(args.width)],
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        lines.append(f"| {label} | {r['start']:.0f} | {r['end']:.0f} | "
                     f"{r['end'] / r['start']:.3f}× |")
        print(lines[-1], flush=True)
    lines.append("")
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
