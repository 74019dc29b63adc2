"""Step time of Wolinski's NewtonSummary (``hessian`` + ``partition`` + ``cubic``) vs SGD.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_partition.py [--repeats 7] [--steps 10]
          [--threads 1] [--out FILE]

In one process, on the same model and batch (float32, CPU, CrossEntropyLoss), the mean
time per step over ``--steps`` steps is compared with a ``torch.optim.SGD`` step
(zero_grad + forward + backward + step) timed in the same round, ``--repeats`` rounds; the
median of the per-round ratios is reported with their min–max:

- ``hessian + partition + cubic`` (canonical partition, λ_int = 1), summary every step
  (T = 1) and every 10 steps (T = 10);
- ``ggn + partition + direct`` (plain η = (H̄ + 1e-3 I)⁻¹ḡ, no D3), T = 1.

Then the cost of one summary is split: the gradient alone (forward + backward), the
``hessian`` summary (ḡ, H̄ and D3: one gradient graph, then per group one double and one
triple backward), the ``ggn`` summary (ḡ and H̄ only), and the cubic root
find on the S×S result. Prints tables and writes them, with machine, load, date and
commit, to ``--out`` (nothing is written without it). Not a test.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from _common import (
    fmt,
    header,
    interleaved,
    models,  # noqa: E402
    ms,
    out_arg,
    publish,
    ratio,
    sgd_step,
)
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


def paired(fn: Callable[[], object], ref: Callable[[], object], steps: int, repeats: int
           ) -> tuple[list[float], list[float], tuple[float, float, float]]:
    """Times of ``fn`` and ``ref`` (``steps`` calls per round, averaged) over interleaved
    rounds, and their per-round ratio (median, min, max)."""
    t = interleaved({"ref": ref, "fn": fn}, repeats, inner=steps, warmup=steps)
    return t["fn"], t["ref"], ratio(t, "fn", "ref")


def time_optimizer(model: nn.Module, X: Tensor, y: Tensor, cfg: dict, steps: int,
                   repeats: int) -> tuple[list[float], list[float], tuple, str]:
    """Step time, SGD step time, their ratio, and ``skipped/total`` steps of one config."""
    opt = curvkit.build_optimizer(copy.deepcopy(model), nn.CrossEntropyLoss(), cfg)
    sgd = sgd_step(copy.deepcopy(model), X, y)
    t, t_sgd, r = paired(lambda: opt.step((X, y)), sgd, steps, repeats)
    skipped = opt.counters["rejected"] + opt.counters["nonfinite"]
    return t, t_sgd, r, f"{skipped}/{opt.counters['steps']}"


def step_rows(repeats: int, steps: int) -> list[tuple[str, str, float, float, float, str]]:
    rows = []
    for mname, (model, X, y) in models().items():
        for label, cfg in CONFIGS.items():
            t, t_sgd, r, skipped = time_optimizer(model, X, y, cfg, steps, repeats)
            rows.append((mname, label, t, t_sgd, r, skipped))
            print(f"{mname:38s} {label:36s} {ms(t)} ms  SGD {ms(t_sgd)} ms  "
                  f"{fmt(r, 1)} (skipped {skipped})", flush=True)
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
    t = interleaved({"gradient (forward + backward)": gradient, **parts}, repeats,
                    inner=steps, warmup=steps)
    return S, {what: (t[what], ratio(t, what, "gradient (forward + backward)"))
               for what in t}


def split_rows(repeats: int, steps: int) -> list[tuple[str, int, dict]]:
    out = []
    for mname, (model, X, y) in models().items():
        S, times = summary_split(model, X, y, steps, repeats)
        out.append((mname, S, times))
        for what, (t, r) in times.items():
            print(f"{mname:38s} S={S:<3d} {what:32s} {ms(t)} ms {fmt(r)} gradient",
                  flush=True)
    return out


def markdown(rows, splits, repeats: int, steps: int) -> str:
    lines = header(
        "Benchmark: partition summary + cubic step vs SGD", "bench_partition.py",
        f"{repeats} interleaved rounds; in each, the reference (the SGD step, or the "
        f"gradient) and every candidate run {steps} calls each (averaged, after a warm-up "
        f"of {steps}); the ratio is taken within a round: median (min–max over the "
        "rounds). Times in ms, median (min–max). float32, CrossEntropyLoss (mean), "
        "canonical partition (one group per weight and bias tensor). The machine is "
        "shared with other jobs: compare ratios, not absolute times.")
    lines += [
        "## Optimizer step",
        "",
        "| model | optimizer | step (ms) | SGD step (ms) | ratio | skipped steps |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for mname, label, t, t_sgd, r, skipped in rows:
        lines.append(f"| {mname} | {label} | {ms(t)} | {ms(t_sgd)} | {fmt(r, 1)} | "
                     f"{skipped} |")
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
        for what, (t, r) in times.items():
            lines.append(f"| {mname} | {S} | {what} | {ms(t)} | {fmt(r)} |")
    lines += [
        "",
        "The `hessian` summary builds one gradient graph (create_graph), then per group s "
        "one double backward of ḡ_s with graph, restricted to the tensors of groups t ≥ s "
        "(row s of H̄), and one triple backward of H̄[s, s] restricted to group s (D3[s]): "
        "1 + 2S backward passes, a loop over the groups (batching the S directions was "
        "measured slower on CPU, see `HessianEstimator.summary`). The `ggn` summary needs "
        "S Jacobian-vector products and no third order. The root find works on S×S "
        "matrices in float64 and does not depend on the model size.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", **out_arg("partition.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = step_rows(args.repeats, args.steps)
    splits = split_rows(args.repeats, args.steps)
    text = markdown(rows, splits, args.repeats, args.steps)
    publish(text, args.out)


if __name__ == "__main__":
    main()
