"""Peak memory over many steps: it must not grow with the step count.

Run:  python benchmarks/bench_memory.py [--steps 1000] [--width 256] [--only COMPOSITION]
      [--out FILE]

Every composition that builds (estimator × preconditioner × solver) trains in a fresh
process (``--child``) without any explicit ``gc.collect()``, and reports its peak resident
set size (``ru_maxrss``) after 3 steps and after ``--steps`` steps; the ratio must stay
≤ 1.10 (1000 steps at width 256: a few minutes per composition on 2 cores; ``hessian`` +
``diagonal`` with 4 Hutchinson probes instead of 64). A reference cycle on the step path
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
import time
import warnings

import torch
from _common import header, out_arg, publish
from torch import nn

ESTIMATORS = ("ef", "fisher", "ggn", "hessian", "outer_product")
PRECONDITIONERS = ("identity", "diagonal", "kronecker", "lie_group", "block", "partition")
SOLVERS = ("direct", "trust_region", "cubic", "varpro")
# options that keep 1000 steps affordable without changing what the step keeps in memory
OPTIONS = {
    ("hessian", "diagonal"): {"estimator": {"name": "hessian", "samples": 4}},
    ("*", "lie_group"): {"preconditioner": {"name": "lie_group", "update_every": 1}},
    # the blocks from estimator.dense (one vectorised pass) instead of a product per column
    ("*", "block"): {"preconditioner": {"name": "block", "source": "dense"}},
}


def model_for(preconditioner: str, width: int) -> tuple[nn.Module, tuple]:
    """The MLP 784-width-width-10 (batch 128); ``block`` (one dense block per parameter
    tensor) on an MLP 8-8-8-10, the size it is built for."""
    torch.manual_seed(0)
    d, w = (8, 8) if preconditioner == "block" else (784, width)
    model = nn.Sequential(nn.Linear(d, w), nn.Tanh(), nn.Linear(w, w), nn.Tanh(),
                          nn.Linear(w, 10))
    return model, (torch.randn(128, d), torch.randint(0, 10, (128,)))


def config(est: str, pre: str, sol: str) -> dict:
    cfg: dict = {"lr": 1e-3, "estimator": est, "preconditioner": pre, "solver": sol}
    for (e, p), extra in OPTIONS.items():
        if e in (est, "*") and p == pre:
            cfg.update(extra)
    return cfg


def compositions(width: int) -> list[str]:
    """Every estimator + preconditioner + solver that builds on its model (the others are
    refused at build time, which is not what this measures)."""
    import curvkit
    from curvkit.errors import ConfigError

    out = []
    for sol in SOLVERS:
        for pre in PRECONDITIONERS:
            for est in ESTIMATORS:
                model, _ = model_for(pre, width)
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        curvkit.build_optimizer(model, nn.CrossEntropyLoss(),
                                                config(est, pre, sol))
                except (ConfigError, ValueError, TypeError):
                    continue
                out.append(f"{est} + {pre} + {sol}")
    return out


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(label: str, steps: int, width: int) -> None:
    import curvkit

    torch.set_num_threads(1)
    est, pre, sol = label.split(" + ")
    model, batch = model_for(pre, width)
    base = peak_mib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), config(est, pre, sol))
    out = {}
    t0 = time.process_time()
    for k in range(1, steps + 1):
        opt.step(batch)
        if k in (3, steps):
            out[k] = peak_mib()
    print(json.dumps({"base": base, "start": out[3], "end": out[steps],
                      "cpu_s": time.process_time() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--only", default="", help="one composition, 'est + pre + sol'")
    ap.add_argument("--repeats", type=int, default=1, help="unused (run_all passes it)")
    ap.add_argument("--child", default="")
    ap.add_argument("--out", **out_arg("memory.md"))
    args = ap.parse_args()
    if args.child:
        child(args.child, args.steps, args.width)
        return
    labels = [args.only] if args.only else compositions(args.width)
    lines = header("Benchmark: peak memory over steps", "bench_memory.py",
                   f"MLP 784-{args.width}-{args.width}-10 (`block`: MLP 8-8-8-10), batch "
                   f"128, float32, CrossEntropyLoss; every composition that builds, each in "
                   f"a fresh process, no explicit `gc.collect()`; peak RSS (`ru_maxrss`) "
                   f"after 3 and after {args.steps} steps; growth: the difference. "
                   f"Target: ratio ≤ 1.10×.", timed=False)
    lines += ["| composition | peak after 3 steps (MiB) | peak after "
              f"{args.steps} steps (MiB) | ratio | growth (MiB) |",
              "|---|---:|---:|---:|---:|"]
    worst, worst_label = 0.0, ""
    for label in labels:
        res = subprocess.run([sys.executable, __file__, "--child", label, "--steps",
                              str(args.steps), "--width", str(args.width)],
                             capture_output=True, text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        if r["end"] / r["start"] > worst:
            worst, worst_label = r["end"] / r["start"], label
        lines.append(f"| {label} | {r['start']:.0f} | {r['end']:.0f} | "
                     f"{r['end'] / r['start']:.3f}× | {r['end'] - r['start']:.1f} |")
        print(lines[-1], f"({r['cpu_s']:.0f} s CPU)", flush=True)
    lines += ["", "| compositions | largest ratio | composition |", "|---:|---:|---|",
              f"| {len(labels)} | {worst:.3f}× | {worst_label} |"]
    lines.append("")
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
