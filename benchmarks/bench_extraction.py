"""Diagonal and Kronecker extraction: curvkit's estimators against BackPACK (and curvlinops).

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_extraction.py [--repeats 11] [--out FILE]

Compared, in one process, on the same model and batch (float32, CPU, 1 thread):

- diagonals: ``ggn.diagonal`` (exact) vs BackPACK ``DiagGGNExact``; ``fisher.diagonal``
  (1 MC sample) vs ``DiagGGNMC(mc_samples=1)``; ``ef.diagonal`` vs ``SumGradSquared``
  (the same work; BackPACK's is scaled by c² instead of c). For information, the exact GGN
  diagonal through the layer-capture path that ``ef``/``fisher`` use
  (``kfac.layer_diagonals`` with exact loss-Hessian columns).
- Kronecker factors: ``ggn.kronecker`` (KFLR) vs BackPACK ``KFLR``; ``fisher.kronecker``
  (KFAC, 1 sample) vs BackPACK ``KFAC(mc_samples=1)``; ``ef.kronecker`` (empirical K-FAC);
  each also vs curvlinops' ``KFACLinearOperator.compute_kronecker_factors`` (type-2 / mc /
  empirical).

BackPACK runs on an extended deepcopy of the model (made once, outside the timing: the
user's model is never extended); a BackPACK timing is forward + backward with the extension.
The gradient, curvkit and the peer run once each per round, ``--repeats`` rounds after
warm-up; every number is a per-round ratio (median, min–max): relative to the round's
gradient evaluation (forward + backward of the loss) and curvkit / peer. ``--out FILE``
writes the table, machine, load, date and commit into FILE's results block (e.g.
docs/benchmarks/extraction.md), or as a page of its own if it has none.
Not a test.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from _common import backpack_runner, fmt, header, interleaved, models, out_arg, publish, ratio
from torch import Tensor, nn

import curvkit
from curvkit.estimators.kfac import layer_diagonals, output_columns


def curvlinops_runner(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor,
                      fisher_type: str) -> Callable[[], object] | None:
    try:
        from curvlinops import KFACLinearOperator
    except ImportError:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    op = KFACLinearOperator(model, loss_fn, params, [(X, y)], fisher_type=fisher_type,
                            mc_samples=1, check_deterministic=False,
                            separate_weight_and_bias=False)
    return op.compute_kronecker_factors


def bench_model(label: str, model: nn.Module, X: Tensor, y: Tensor, repeats: int
                ) -> list[dict[str, object]]:
    from backpack.extensions import KFAC, KFLR, DiagGGNExact, DiagGGNMC, SumGradSquared

    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient() -> object:
        return torch.autograd.grad(loss_fn(model(X), y), params)

    ggn = curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn)
    fisher = curvkit.create("estimator", "fisher", model=model, loss_fn=loss_fn)
    ef = curvkit.create("estimator", "ef", model=model, loss_fn=loss_fn)

    def capture_exact() -> object:
        return layer_diagonals(ggn, X, lambda out: output_columns(ggn.loss, out, y, "exact"))

    def bp(extension: object) -> Callable[[], object]:
        return backpack_runner(model, loss_fn, X, y, extension)

    def cl(fisher_type: str) -> Callable[[], object] | None:
        return curvlinops_runner(model, loss_fn, X, y, fisher_type)

    cases = [
        ("diag GGN exact", lambda: ggn.diagonal((X, y)),
         "BackPACK DiagGGNExact", bp(DiagGGNExact())),
        ("diag GGN exact, layer capture (_kfac)", capture_exact,
         "BackPACK DiagGGNExact", bp(DiagGGNExact())),
        ("diag fisher (MC, 1 sample)", lambda: fisher.diagonal((X, y)),
         "BackPACK DiagGGNMC", bp(DiagGGNMC(1))),
        ("diag ef", lambda: ef.diagonal((X, y)), "BackPACK SumGradSquared", bp(SumGradSquared())),
        ("kronecker ggn (KFLR)", lambda: ggn.kronecker((X, y)), "BackPACK KFLR", bp(KFLR())),
        ("kronecker ggn (KFLR)", lambda: ggn.kronecker((X, y)),
         "curvlinops KFAC type-2", cl("type-2")),
        ("kronecker fisher (KFAC, 1 sample)", lambda: fisher.kronecker((X, y)),
         "BackPACK KFAC", bp(KFAC(1))),
        ("kronecker fisher (KFAC, 1 sample)", lambda: fisher.kronecker((X, y)),
         "curvlinops KFAC mc", cl("mc")),
        ("kronecker ef (empirical)", lambda: ef.kronecker((X, y)),
         "curvlinops KFAC empirical", cl("empirical")),
    ]
    rows: list[dict[str, object]] = []
    for what, ours, peer_name, peer in cases:
        fns = {"gradient": gradient, "ours": ours}
        if peer is not None:
            fns["peer"] = peer
        t = interleaved(fns, repeats)
        nan = (float("nan"),) * 3
        rows.append({"model": label, "what": what, "ours": ratio(t, "ours", "gradient"),
                     "peer": peer_name,
                     "theirs": ratio(t, "peer", "gradient") if peer is not None else nan,
                     "ratio": ratio(t, "ours", "peer") if peer is not None else nan})
        r = rows[-1]
        print(f"{label:38s} {what:38s} {fmt(r['ours'])} grad | {peer_name:26s} "
              f"{fmt(r['theirs'])} grad | curvkit/peer {fmt(r['ratio'])}", flush=True)
    return rows


def run(repeats: int) -> list[dict[str, object]]:
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook")
    rows: list[dict[str, object]] = []
    for label, (model, X, y) in models().items():
        rows += bench_model(label, model, X, y, repeats)
    return rows


def markdown(rows: list[dict[str, object]], repeats: int) -> str:
    lines = header("Benchmark: diagonal and Kronecker extraction vs BackPACK",
                   "bench_extraction.py",
                   f"float32, CrossEntropyLoss (mean), {repeats} interleaved rounds (the "
                   "gradient, curvkit and the peer once each per round, after warm-up); "
                   "\"× grad\" = time / the gradient evaluation (forward + backward of the "
                   "loss) of the same round; ratio = curvkit / peer (< 1: curvkit faster); "
                   "each as median (min–max over the rounds).")[4:]
    lines += [
        "| model | curvkit | × grad | peer | × grad | ratio |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['what']} | {fmt(r['ours'])} | {r['peer']} | "
                     f"{fmt(r['theirs'])} | {fmt(r['ratio'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", **out_arg("extraction.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.repeats)
    table = markdown(rows, args.repeats)
    publish(table, args.out)


if __name__ == "__main__":
    main()
