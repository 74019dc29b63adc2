"""Step time of Wolinski's NewtonSummary (``hessian`` + ``partition`` + ``cubic``) vs SGD.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_partition.py [--repeats 7] [--steps 10]
          [--threads 1] [--out docs/benchmarks/partition.md]

In one process, on the same model and batch (float32, CPU, CrossEntropyLoss), the mean
time per step over ``--steps`` steps is compared with a ``torch.optim.SGD`` step
(zero_grad + forward + backward + step) timed right before it, ``--repeats`` times; the
median ratio is reported:

- ``hessian + partition + cubic`` (canonical partition, λ_int = 1), summary every step
  (T = 1) and every 10 steps (T = 10);
- ``ggn + partition + direct`` (plain η = (H̄ + 1e-3 I)⁻¹ḡ, no D3), T = 1.

Then the cost of one summary is split: the gradient alone (forward + backward), the
``hessian`` summary (ḡ, H̄ and D3: one gradient graph, S batched Hessian-vector products,
one batched third-order backward), the ``ggn`` summary (ḡ and H̄ only), and the cubic root
find on the S×S result. Prints tables and writes them, with the machine and date, to
``--out``. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import machine, models, publish, sgd_step  # noqa: E402
from torch import Tensor, nn

import curvkit
from curvkit.solvers.cubic import cubic_eta

CONFIGS = {
    "hessian + partition + cubic, T=1": {
        "lr": 0.1, "estimator": "hessian", "preconditioner": {"name": "partition"},
        "solver": {"name": "cubic", "lambda_int": 1.0}},
    "hessian + partition + cubic, T=10": {
        "lr": 0.1, "estimator": "hessian",
        "preconditioner": {"name": "partition", "update_every": 10},
        "solver": {"name": "cubic", "lambda_int": 1.0}},
    "ggn + partition + direct, T=1": {
        "lr": 0.1, "estimator": "ggn", "preconditioner": {"name": "partition", "damping": 1e-3},
        "solver": "direct"},
}


def median_time(fn: Callable[[], object], steps: int, repeats: int) -> float:
    for _ in range(steps):  # warm-up over a whole update period
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - t) / steps)
    return statistics.median(times)


def paired(fn: Callable[[], object], ref: Callable[[], object], steps: int, repeats: int
           ) -> tuple[float, float, float]:
    """Median times of ``fn`` and ``ref`` and the median of their per-repeat ratio; the two
    are timed alternately, so that load changes on a shared machine hit both."""
    for _ in range(steps):  # warm-up over a whole update period
        fn()
        ref()
    t_fn, t_ref, ratios = [], [], []
    for _ in range(repeats):
        for fun, out in ((ref, t_ref), (fn, t_fn)):
            t = time.perf_counter()
            for _ in range(steps):
                fun()
            out.append((time.perf_counter() - t) / steps)
        ratios.append(t_fn[-1] / t_ref[-1])
    return statistics.median(t_fn), statistics.median(t_ref), statistics.median(ratios)


def time_optimizer(model: nn.Module, X: Tensor, y: Tensor, cfg: dict, steps: int,
                   repeats: int) -> tuple[float, float, float, str]:
    """Step time, SGD step time, their ratio, and ``skipped/total`` steps of one config."""
    opt = curvkit.build_optimizer(copy.deepcopy(model), nn.CrossEntropyLoss(), cfg)
    sgd = sgd_step(copy.deepcopy(model), X, y)
    t, t_sgd, ratio = paired(lambda: opt.step((X, y)), sgd, steps, repeats)
    skipped = opt.counters["rejected"] + opt.counters["nonfinite"]
    return t, t_sgd, ratio, f"{skipped}/{opt.counters['steps']}"


def step_rows(repeats: int, steps: int) -> list[tuple[str, str, float, float, float, str]]:
    rows = []
    for mname, (model, X, y) in models().items():
        for label, cfg in CONFIGS.items():
            t, t_sgd, ratio, skipped = time_optimizer(model, X, y, cfg, steps, repeats)
            rows.append((mname, label, t, t_sgd, ratio, skipped))
            print(f"{mname:38s} {label:36s} {t * 1e3:9.3f} ms  SGD {t_sgd * 1e3:7.3f} ms  "
                  f"{ratio:6.1f}× (skipped {skipped})", flush=True)
    return rows


def summary_split(model: nn.Module, X: Tensor, y: Tensor, steps: int, repeats: int
                  ) -> tuple[int, dict[str, tuple[float, float]]]:
    """S, and for the gradient, both summaries and the root find: (time, × gradient)."""
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    pre = curvkit.create("preconditioner", "partition", model=model)
    ids, S = pre.partition.ids, pre.partition.groups

    def gradient() -> list[Tensor]:
        return list(torch.autograd.grad(loss_fn(model(X), y), params))

    u = gradient()
    hess = curvkit.create("estimator", "hessian", model=model, loss_fn=loss_fn)
    ggn = curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn)
    summary = hess.summary((X, y), u, ids, S)
    parts = {
        "hessian summary (ḡ, H̄, D3)": lambda: hess.summary((X, y), u, ids, S),
        "ggn summary (ḡ, H̄)": lambda: ggn.summary((X, y), u, ids, S),
        "cubic root find (S×S)": lambda: cubic_eta(summary.H, summary.g, summary.D3, 1.0),
    }
    out = {"gradient (forward + backward)": (median_time(gradient, steps, repeats), 1.0)}
    for what, fn in parts.items():
        t, _, ratio = paired(fn, gradient, steps, repeats)
        out[what] = (t, ratio)
    return S, out


def split_rows(repeats: int, steps: int) -> list[tuple[str, int, dict]]:
    out = []
    for mname, (model, X, y) in models().items():
        S, times = summary_split(model, X, y, steps, repeats)
        out.append((mname, S, times))
        for what, (t, ratio) in times.items():
            print(f"{mname:38s} S={S:<3d} {what:32s} {t * 1e3:9.3f} ms {ratio:6.2f}× gradient",
                  flush=True)
    return out


def markdown(rows, splits, repeats: int, steps: int) -> str:
    lines = [
        "# Benchmark: partition summary + cubic step vs SGD",
        "",
        "Generated by `benchmarks/bench_partition.py` (do not edit by hand).",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {machine()}",
        f"- method: median over {repeats} repeats of the mean time per call over {steps} "
        f"calls (after a warm-up of {steps}); each repeat times the reference (the SGD "
        "step, or the gradient) and the candidate back to back, and the ratio is the median "
        "of the per-repeat ratios. float32, CrossEntropyLoss (mean), canonical partition "
        "(one group per weight and bias tensor). The machine is shared with other jobs: "
        "compare ratios, not absolute times; even the ratios of repeated runs of this "
        "script have differed by up to 2× there.",
        "",
        "## Optimizer step",
        "",
        "| model | optimizer | step (ms) | SGD step (ms) | ratio | skipped steps |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mname, label, t, t_sgd, ratio, skipped in rows:
        lines.append(f"| {mname} | {label} | {t * 1e3:.3f} | {t_sgd * 1e3:.3f} | "
                     f"{ratio:.1f}× | {skipped} |")
    lines += [
        "",
        "T = `update_every` of the partition preconditioner: the summary and η are "
        "recomputed every T steps, the other steps scale the fresh gradient by the stored η. "
        "lr = 0.1 throughout; skipped steps = rejected (cubic failures) + non-finite, out of "
        "all steps run (a diverging run would time failure paths instead of steps).",
        "",
        "## Cost of one summary",
        "",
        "| model | S | part | time (ms) | × gradient |",
        "|---|---:|---|---:|---:|",
    ]
    for mname, S, times in splits:
        for what, (t, ratio) in times.items():
            lines.append(f"| {mname} | {S} | {what} | {t * 1e3:.3f} | {ratio:.2f}× |")
    lines += [
        "",
        "The `hessian` summary builds one gradient graph (create_graph), takes the S "
        "Hessian-vector products HŪ in one batched double backward and the S third-order "
        "terms in one batched triple backward; the `ggn` summary needs S Jacobian-vector "
        "products and no third order. The root find works on S×S matrices in float64 and "
        "does not depend on the model size.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs" /
                                         "benchmarks" / "partition.md"),
                    help="markdown file to write ('' to skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = step_rows(args.repeats, args.steps)
    splits = split_rows(args.repeats, args.steps)
    text = markdown(rows, splits, args.repeats, args.steps)
    publish(text, args.out)


if __name__ == "__main__":
    main()
