"""A whole K-FAC step against the same step built on curvlinops, and K-FAC factor extraction
against curvlinops' and BackPACK's KFAC.

Run:  python benchmarks/bench_kfac.py [--repeats 11] [--threads 1] [--out FILE]
      python benchmarks/bench_kfac.py --only step      # or: --only extraction

In one process, float32, CPU, one thread, contenders interleaved in every round, ratios
taken within a round and reported as the median with the min–max over the rounds:

- **step**: curvkit's ``fisher`` + ``kronecker`` + ``direct`` (MC Fisher with one sample,
  factored damping δ with π = 1, Cholesky factorisations — applied by triangular solves
  at T = 1, where each is used once, as inverses at T = 10 —, ``ema = 0`` so that each
  update uses the new factors as curvlinops does) against the same step on curvlinops: the gradient
  (forward + backward), every T-th step ``KFACLinearOperator.compute_kronecker_factors``
  (MC, one sample) and a fresh ``KFACInverseLinearOperator`` (damping (√δ, √δ), the same
  factored damping), then ``inverse @ gradient`` and ``p -= lr·d``. One round = T steps of
  each contender (T = 1: factors every step; T = 10: once per round, so a round holds one
  update and nine steps on the stored inverses).
- **extraction**: ``fisher.kronecker`` (KFAC, one MC sample) and ``ggn.kronecker`` (KFLR)
  against curvlinops' ``compute_kronecker_factors`` (mc / type-2) and BackPACK's
  ``KFAC(mc_samples=1)`` / ``KFLR`` (forward + backward of an extended deepcopy, extended
  once outside the timing), on the test zoo's language model (``tests/zoo.py``'s TinyLM at
  a larger size: Embedding, a TransformerEncoderLayer, a Linear head; logits (N, V, L),
  sequence cross-entropy, K-FAC "expand") and the small CNN. On the LM only the layers
  curvlinops' KFAC covers are trainable (feed-forward pair and head; curvkit would also
  give the Embedding's and the attention projections' factors); BackPACK has no KFAC for
  the transformer layer: that cell says so. On the CNN also the ``"reduce"`` flavour
  (``approx="reduce"``) against curvlinops' ``kfac_approx="reduce"`` (the same quantity);
  BackPACK's convolution KFAC/KFLR is G_reduce ⊗ (Σ_t a_t a_tᵀ / N), neither flavour (its G
  is the reduce one, its A the expand one times T), so its ratio in those rows compares
  cost only.

Not a test.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from _common import backpack_runner, fmt, header, interleaved, models, ms, out_arg, publish, ratio
from torch import Tensor, nn

import curvkit

DAMPING = 1e-3
LR = 1e-3


def extraction_models() -> dict[str, tuple[nn.Module, Tensor, Tensor, bool]]:
    """(model, X, y, whether BackPACK's KFAC supports it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from zoo import TinyLM

    torch.manual_seed(0)
    lm = TinyLM(vocab=256, d=64, heads=4, ff=256)
    # the same layers for all: curvlinops' KFAC covers the Linear modules the forward calls
    # (the feed-forward pair and the head); curvkit would also give the Embedding's and the
    # attention projections' factors, more work than the peer's, so those are frozen here
    for name, p in lm.named_parameters():
        p.requires_grad_(name.startswith(("layer.linear1", "layer.linear2", "head")))
    tokens = torch.randint(0, 256, (32, 32))
    cnn = models((784, 1024, 1024), nn.ReLU)["CNN 2×conv3(8)+linear, 3×16×16, N=64"]
    return {
        "TinyLM (zoo) vocab 256, d 64, 4 heads, ff 256, 32×32 tokens": (
            lm, tokens, torch.randint(0, 256, (32, 32)), False),
        "CNN 2×conv3(8)+linear, 3×16×16, N=64": (*cnn, True),
    }


# ----------------------------------------------------------------------------- step
def curvkit_step(model: nn.Module, X: Tensor, y: Tensor, T: int) -> Callable[[], None]:
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
        "lr": LR, "estimator": {"name": "fisher", "mc_samples": 1},
        "preconditioner": {"name": "kronecker", "damping": DAMPING, "ema": 0.0,
                           "update_every": T},
        "solver": "direct"})

    def steps() -> None:
        for _ in range(T):
            opt.step((X, y))

    return steps


def curvlinops_step(model: nn.Module, X: Tensor, y: Tensor, T: int) -> Callable[[], None]:
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    kfac = KFACLinearOperator(model, loss_fn, params, [(X, y)], fisher_type="mc",
                              mc_samples=1, check_deterministic=False,
                              separate_weight_and_bias=False, num_data=X.shape[0],
                              num_per_example_loss_terms=1)
    root = math.sqrt(DAMPING)
    state: dict[str, object] = {}

    def step(update: bool) -> None:
        grads = torch.autograd.grad(loss_fn(model(X), y), params)
        if update or "inv" not in state:
            kfac.compute_kronecker_factors()
            state["inv"] = KFACInverseLinearOperator(kfac, damping=(root, root))
        d = state["inv"] @ list(grads)
        with torch.no_grad():
            torch._foreach_add_(params, d, alpha=-LR)

    def steps() -> None:
        for i in range(T):
            step(i == 0)

    return steps


def step_rows(repeats: int) -> list[str]:
    rows = []
    for label, (model, X, y) in models((784, 1024, 1024), nn.ReLU).items():
        for T in (1, 10):
            ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
            t = interleaved({"curvkit": curvkit_step(ours, X, y, T),
                             "curvlinops": curvlinops_step(theirs, X, y, T)}, repeats)
            rows.append(f"| {label} | fisher + kronecker + direct, update every {T} | "
                        f"{ms([x / T for x in t['curvkit']])} | "
                        f"{ms([x / T for x in t['curvlinops']])} | "
                        f"{fmt(ratio(t, 'curvkit', 'curvlinops'))} | ≤ 1.0× |")
            print(rows[-1], flush=True)
    return rows


# ----------------------------------------------------------------------------- extraction
def curvlinops_run(model: nn.Module, X: Tensor, y: Tensor, fisher_type: str,
                   approx: str = "expand") -> Callable[[], object]:
    from curvlinops import KFACLinearOperator

    # the parameters of the modules curvlinops' KFAC supports
    params = [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              for p in m.parameters(recurse=False) if p.requires_grad]
    op = KFACLinearOperator(model, nn.CrossEntropyLoss(), params, [(X, y)],
                            fisher_type=fisher_type, mc_samples=1, check_deterministic=False,
                            separate_weight_and_bias=False, num_data=X.shape[0],
                            kfac_approx=approx)
    return op.compute_kronecker_factors


def extraction_rows(repeats: int) -> list[str]:
    from backpack.extensions import KFAC, KFLR

    rows = []
    for label, (model, X, y, bp_ok) in extraction_models().items():
        loss_fn = nn.CrossEntropyLoss()
        fisher = curvkit.create("estimator", "fisher", model=model, loss_fn=loss_fn)
        ggn = curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn)
        batch = (X, y)
        cases = [("fisher.kronecker (KFAC, 1 sample)",
                  lambda e=fisher, b=batch: e.kronecker(b), "mc", KFAC(mc_samples=1), "KFAC",
                  "expand"),
                 ("ggn.kronecker (KFLR)", lambda e=ggn, b=batch: e.kronecker(b), "type-2",
                  KFLR(), "KFLR", "expand")]
        if bp_ok:
            # the "reduce" flavour on the convolutions, against curvlinops' "reduce" (the same
            # quantity); BackPACK's conv KFAC/KFLR has the reduce G and an A summed over
            # positions (neither flavour): its cost for comparison, marked as such
            cases += [
                ("fisher.kronecker (KFAC, 1 sample, reduce)",
                 lambda e=fisher, b=batch: e.kronecker(b, approx="reduce"), "mc",
                 KFAC(mc_samples=1), "KFAC", "reduce"),
                ("ggn.kronecker (KFLR, reduce)",
                 lambda e=ggn, b=batch: e.kronecker(b, approx="reduce"), "type-2", KFLR(),
                 "KFLR", "reduce")]
        for what, ours, ftype, ext, ext_name, approx in cases:
            fns = {"curvkit": ours, "curvlinops": curvlinops_run(model, X, y, ftype, approx)}
            if bp_ok:
                fns["backpack"] = backpack_runner(model, nn.CrossEntropyLoss(), X, y, ext)
            t = interleaved(fns, repeats)
            bp = (f"{fmt(ratio(t, 'curvkit', 'backpack'))}" if bp_ok
                  else f"— (BackPACK {ext_name}: no TransformerEncoderLayer)")
            if bp_ok and approx == "reduce":
                bp += " (its conv A is summed over positions, not reduced: not the same)"
            rows.append(f"| {label} | {what} | {ms(t['curvkit'])} | "
                        f"{fmt(ratio(t, 'curvkit', 'curvlinops'))} | {bp} | ≤ 1.0× |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=11, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["step", "extraction"], default=None)
    ap.add_argument("--out", **out_arg("kfac.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook")
    lines = header("Benchmark: K-FAC step and factor extraction vs curvlinops and BackPACK",
                   "bench_kfac.py",
                   f"{args.repeats} interleaved rounds after warm-up, float32, "
                   "CrossEntropyLoss (mean); the ratio is taken within each round: median "
                   "(min–max over the rounds). Times in ms per step or call, median "
                   "(min–max).")
    if args.only in (None, "step"):
        lines += ["## Whole step", "",
                  "| model | step | curvkit (ms) | curvlinops (ms) | ratio | target |",
                  "|---|---|---:|---:|---:|---|"]
        lines += step_rows(args.repeats)
        lines += [""]
    if args.only in (None, "extraction"):
        lines += ["## Factor extraction", "",
                  "| model | curvkit | curvkit (ms) | / curvlinops | / BackPACK | target |",
                  "|---|---|---:|---:|---:|---|"]
        lines += extraction_rows(args.repeats)
        lines += [""]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
