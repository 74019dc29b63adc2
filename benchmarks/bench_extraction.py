"""Diagonal and Kronecker extraction: curvkit's estimators against BackPACK (and curvlinops).

Run:  OMP_NUM_THREADS=1 python benchmarks/bench_extraction.py [--repeats 11] [--write]

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
Every number is the median of ``--repeats`` runs after warm-up, reported relative to one
gradient evaluation (forward + backward of the loss) and as the ratio curvkit / peer.
``--write`` puts the table, machine and date into docs/benchmarks/extraction.md.
Not a test.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _common import machine, models  # noqa: E402
from torch import Tensor, nn

import curvkit
from curvkit.estimators.kfac import layer_diagonals, output_columns

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "extraction.md"


def median_time(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def backpack_runner(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor,
                    extension: object) -> Callable[[], object]:
    import backpack

    ext_model = backpack.extend(copy.deepcopy(model))
    ext_loss = backpack.extend(copy.deepcopy(loss_fn))

    def run() -> object:
        ext_model.zero_grad(set_to_none=True)
        with backpack.backpack(extension):
            ext_loss(ext_model(X), y).backward()
        return None

    return run


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

    t_grad = median_time(gradient, repeats)
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
    cache: dict[str, float] = {}
    for what, ours, peer_name, peer in cases:
        if what not in cache:
            cache[what] = median_time(ours, repeats)
        t_ours = cache[what]
        t_peer = median_time(peer, repeats) if peer is not None else float("nan")
        rows.append({"model": label, "what": what, "ours": t_ours / t_grad,
                     "peer": peer_name, "theirs": t_peer / t_grad, "ratio": t_ours / t_peer})
        print(f"{label:38s} {what:38s} {t_ours / t_grad:7.2f}× grad | {peer_name:26s} "
              f"{t_peer / t_grad:7.2f}× grad | curvkit/peer {t_ours / t_peer:6.2f}", flush=True)
    return rows


def run(repeats: int) -> list[dict[str, object]]:
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook")
    rows: list[dict[str, object]] = []
    for label, (model, X, y) in models().items():
        rows += bench_model(label, model, X, y, repeats)
    return rows


def markdown(rows: list[dict[str, object]], repeats: int) -> str:
    lines = [
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {machine()}",
        f"- method: float32, CrossEntropyLoss (mean), median of {repeats} repeats after "
        f"warm-up; \"× grad\" = time / one gradient evaluation (forward + backward of the "
        f"loss); ratio = curvkit / peer (< 1: curvkit faster).",
        "",
        "| model | curvkit | × grad | peer | × grad | ratio |",
        "|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['what']} | {r['ours']:.2f} | {r['peer']} | "
                     f"{r['theirs']:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text()
    new = re.sub(r"<!-- results:start -->.*<!-- results:end -->",
                 f"<!-- results:start -->\n{table}\n<!-- results:end -->", text, flags=re.S)
    DOC.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true",
                        help=f"write the table into {DOC.relative_to(DOC.parent.parent.parent)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.repeats)
    table = markdown(rows, args.repeats)
    print()
    print(table)
    if args.write:
        write_doc(table)


if __name__ == "__main__":
    main()
