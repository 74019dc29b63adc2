"""HVP and GGN products on the zoo's language model, relative to one gradient, beside
curvlinops.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_zoo.py [--repeats 21] [--out PATH]

The model is the zoo's ``TinyLM`` (``tests/zoo.py``: Embedding + nn.TransformerEncoderLayer
+ Linear head, logits (N, V, L), cross-entropy over every position) at benchmark size
(float32, CPU). Contenders, interleaved in every repeat, CPU time of this process:

- one gradient (forward + backward of the loss): the unit;
- curvkit ``hessian`` and ``ggn`` ``matvec`` (each one evaluation: attention on the math
  kernel, see ``curvkit/passes.py``), and the k-th product through ``linearize``;
- curvlinops ``HessianLinearOperator @ v`` and ``GGNLinearOperator @ v`` on the same model
  and batch. curvlinops runs the model as it is: on the default (flash) attention kernel
  its Hessian/GGN products fail (no double backward / forward mode); the table says so and
  times it under ``sdpa_kernel(SDPBackend.MATH)`` set by the caller, where it runs.

Printed: the median of each contender divided by the median gradient, with the min–max
ratio range over repeats. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _common import header, interleaved, out_arg, publish
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import curvkit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from zoo import TinyLM  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", **out_arg("zoo.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    V, L, N = 64, 16, 16
    model = TinyLM(vocab=V, d=32, heads=4, ff=64)
    tokens = torch.randint(0, V, (N, L))
    targets = torch.randint(0, V, (N, L))
    batch = (tokens, targets)
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]

    def gradient() -> None:
        torch.autograd.grad(loss_fn(model(tokens), targets), params)

    hes = curvkit.create("estimator", "hessian", model=model, loss_fn=loss_fn)
    ggn = curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn)
    H_lin, G_lin = hes.linearize(batch), ggn.linearize(batch)
    fns: dict[str, Callable[[], object]] = {
        "gradient": gradient,
        "curvkit hessian matvec": lambda: hes.matvec(batch, v),
        "curvkit ggn matvec": lambda: ggn.matvec(batch, v),
        "curvkit hessian linearize product": lambda: H_lin.matvec(v),
        "curvkit ggn linearize product": lambda: G_lin.matvec(v),
    }
    notes = []
    try:
        import curvlinops

        H_op = curvlinops.HessianLinearOperator(model, loss_fn, params, [batch],
                                                check_deterministic=False)
        G_op = curvlinops.GGNLinearOperator(model, loss_fn, params, [batch],
                                            check_deterministic=False)
        for label, op in (("Hessian", H_op), ("GGN", G_op)):
            try:
                op @ [t.clone() for t in v]
                notes.append(f"curvlinops {label} runs on the default attention kernel")
            except Exception as err:  # the peer's failure is a result, reported
                notes.append(f"curvlinops {label} on the default attention kernel: "
                             f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")

        def under_math(op):
            def run():
                with sdpa_kernel([SDPBackend.MATH]):
                    return op @ [t.clone() for t in v]
            return run

        fns["curvlinops Hessian @ v (math kernel)"] = under_math(H_op)
        fns["curvlinops GGN @ v (math kernel)"] = under_math(G_op)
    except ImportError:
        notes.append("curvlinops not installed")
    times = interleaved(fns, args.repeats, warmup=1)
    base = statistics.median(times["gradient"])
    P = sum(p.numel() for p in params)
    lines = header("Zoo language model: curvature products", "bench_zoo.py",
                   f"TinyLM (Embedding + TransformerEncoderLayer + head), V={V}, L={L}, N={N}, "
                   f"P={P}, float32; median CPU time over {args.repeats} interleaved repeats, "
                   f"in gradients (min–max of the per-repeat ratio)")
    lines += ["| product | gradients | min–max |", "|---|---|---|"]
    for k, ts in times.items():
        ratios = [t / g for t, g in zip(ts, times["gradient"])]
        lines.append(f"| {k} | {statistics.median(ts) / base:.2f} | "
                     f"{min(ratios):.2f}–{max(ratios):.2f} |")
    lines += [""] + [f"- {n}" for n in notes]
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
