"""Top Hessian eigenvalue: ``curvkit.spectral.top_eigenvalues`` vs ``scipy eigsh`` on
curvlinops' ``HessianLinearOperator``, at the same tolerance.

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_spectral.py [--repeats 7] [--tol 1e-3]
      [--out docs/benchmarks/spectral.md]

Both sides compute the largest algebraic eigenvalue (k = 1) of the Hessian of the same
model on the same batch (float32, CPU), from the same kind of start vector, stopping at
the same relative residual tolerance (ARPACK's criterion, which ``top_eigenvalues`` uses
too): curvkit through ``op = est.linearize(batch)`` (the batch's graph made once) and
Lanczos; the peer ``eigsh(HessianLinearOperator(...), k=1, which="LA", tol=tol)``. The
two are interleaved in every repeat; the table gives the ratio of the median times and the
min–max of the per-repeat ratios, the number of products each needed and both
eigenvalues. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _common import header, models, publish
from torch import nn

import curvkit
from curvkit import spectral


def compare(label: str, model: nn.Module, X: torch.Tensor, y: torch.Tensor,
            args: argparse.Namespace) -> tuple:
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    est = curvkit.create("estimator", "hessian", model=model, loss_fn=loss_fn)
    counts = {"curvkit": 0, "peer": 0}

    def ours(seed: int) -> float:
        op = est.linearize((X, y))
        inner = op._apply

        def counted(v: list) -> list:
            counts["curvkit"] += 1
            return inner(v)

        op._apply = counted
        vals, _ = spectral.top_eigenvalues(op, 1, tol=args.tol, seed=seed)
        return float(vals[0])

    def peer(seed: int) -> float:
        H = HessianLinearOperator(model, loss_fn, params, [(X, y)],
                                  progressbar=False, check_deterministic=False)
        sp = H.to_scipy()
        inner = sp.matvec

        def mv(x: np.ndarray) -> np.ndarray:
            counts["peer"] += 1
            return inner(x)

        counted = LinearOperator(sp.shape, matvec=mv, dtype=sp.dtype)
        v0 = np.random.default_rng(seed).standard_normal(P)
        val = eigsh(counted, k=1, which="LA", tol=args.tol, v0=v0, return_eigenvectors=False)
        return float(val[0])

    ours(0), peer(0)  # warm-up
    counts.update(curvkit=0, peer=0)
    times: dict[str, list[float]] = {"curvkit": [], "peer": []}
    values: dict[str, list[float]] = {"curvkit": [], "peer": []}
    for r in range(args.repeats):
        order = (("curvkit", ours), ("peer", peer))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            t = time.process_time()
            values[name].append(fn(r))
            times[name].append(time.process_time() - t)
    ratios = [a / b for a, b in zip(times["curvkit"], times["peer"])]
    med = {k: statistics.median(v) for k, v in times.items()}
    row = (label, P, med["curvkit"] / med["peer"], min(ratios), max(ratios),
           counts["curvkit"] / args.repeats, counts["peer"] / args.repeats,
           med["curvkit"], med["peer"], statistics.median(values["curvkit"]),
           statistics.median(values["peer"]))
    print(f"{label}: ratio {row[2]:.2f}x", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [compare(label, model, X, y, args) for label, (model, X, y) in models().items()]
    lines = header("Spectral: top Hessian eigenvalue vs scipy eigsh on curvlinops",
                   "bench_spectral.py",
                   f"`--repeats {args.repeats} --tol {args.tol}`; the two interleaved "
                   f"(alternating order) in every repeat; ratio = median(curvkit) / "
                   f"median(eigsh on curvlinops), min–max over the per-repeat ratios. "
                   f"Products: mean Hessian-vector products per solve")
    lines += ["| model | P | ratio (median) | min–max | products curvkit | products eigsh | "
             "curvkit s | eigsh s | λ₁ curvkit | λ₁ eigsh |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]:.2f}× | {r[3]:.2f}–{r[4]:.2f}× | {r[5]:.1f} | "
                     f"{r[6]:.1f} | {r[7]:.3f} | {r[8]:.3f} | {r[9]:.5g} | {r[10]:.5g} |")
    publish("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
