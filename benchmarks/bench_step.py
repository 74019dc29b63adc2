"""The cost of curvkit's own step machinery: identity + direct against ``torch.optim.SGD``,
and a Hessian-free step against the products and gradients it is made of.

Run:  python benchmarks/bench_step.py [--repeats 15] [--plumbing-repeats N] [--blocks 8]
      [--threads 1] [--part all|plumbing|hf] [--out FILE]

In one process, float32, CPU, contenders interleaved in every round (one round = each
contender once, ``--inner`` calls averaged), ratios taken within a round and reported as
the median with the min–max over the rounds:

- **plumbing**: ``identity`` + ``direct`` (``opt.step(batch)``: forward, backward, the
  non-finite checks, the update) against ``torch.optim.SGD`` (zero_grad, forward,
  backward, ``step``), plain and with momentum 0.9; both move the same parameters bitwise
  (tests/test_optimizer_sgd.py); the rounds run in blocks, each on fresh copies of the
  model with the two sides' order swapped;
- **Hessian-free**: ``ggn`` + ``identity`` + ``trust_region`` with exactly 10 CG products
  per step (``max_iters = 10``, ``cg_tol = 0``, a radius CG never reaches) against what the
  step must compute anyway: ``linearize(batch)`` and 10 products ``op.matvec(v)``, plus 2
  gradients (the step's gradient, and the trial loss, counted as one more). The rest —
  CG's vector arithmetic, the solver's bookkeeping — is the overhead this ratio measures.

Not a test.
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import fmt, header, interleaved, models, ms, out_arg, publish, ratio
from torch import Tensor, nn

import curvkit


def hf_models(width: int) -> dict[str, tuple[nn.Module, Tensor, Tensor]]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                        nn.Linear(width, 10))
    out = {f"MLP 784-{width}-{width}-10, N=128": (mlp, torch.randn(128, 784),
                                                  torch.randint(0, 10, (128,)))}
    out.update({k: v for k, v in models((784, 1024, 1024), nn.ReLU).items() if k.startswith("CNN")})
    return out


def plumbing_row(label: str, model: nn.Module, X: Tensor, y: Tensor, settings: dict,
                 repeats: int, inner: int, blocks: int) -> str:
    """``repeats`` interleaved rounds in ``blocks`` blocks, each on fresh copies of the model
    for both sides (where the copies land in memory moved one whole run's ratio by up to
    ±0.4 %: over several placements it averages out) and with the order of the two sides
    swapped from block to block."""
    times: dict[str, list[float]] = {"curvkit": [], "SGD": []}
    per = max(1, -(-repeats // blocks))
    for block in range(blocks):
        ours, ref = copy.deepcopy(model), copy.deepcopy(model)
        # one loss module each: the optimizer hooks its own (to see the caller's pass), and
        # those hooks must not run in SGD's forward
        loss_fn, ref_loss = nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
        opt = curvkit.build_optimizer(ours, loss_fn, {
            "lr": 1e-3, "preconditioner": "identity",
            "solver": {"name": "direct", **settings}})
        sgd = torch.optim.SGD(ref.parameters(), lr=1e-3, **settings)

        def sgd_step(sgd: torch.optim.SGD = sgd, ref: nn.Module = ref,
                     ref_loss: nn.Module = ref_loss) -> None:
            sgd.zero_grad()
            ref_loss(ref(X), y).backward()
            sgd.step()

        sides = {"curvkit": lambda opt=opt: opt.step((X, y)), "SGD": sgd_step}
        if block % 2:
            sides = dict(reversed(sides.items()))
        t = interleaved(sides, per, inner)
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(p, q), "identity + direct left torch.optim.SGD"
        for k in times:
            times[k] += t[k]
    name = "SGD" + (" (momentum 0.9)" if settings else "")
    return (f"| {label} | identity + direct vs {name} | {ms(times['curvkit'])} | "
            f"{ms(times['SGD'])} | {fmt(ratio(times, 'curvkit', 'SGD'), 3)} | ≤ 1.02× |")


def hf_row(label: str, model: nn.Module, X: Tensor, y: Tensor, repeats: int,
           products: int = 10) -> str:
    loss_fn = nn.CrossEntropyLoss()
    batch = (X, y)
    opt = curvkit.build_optimizer(model, loss_fn, {
        "lr": 1e-3, "estimator": "ggn", "preconditioner": "identity",
        "solver": {"name": "trust_region", "max_iters": products, "cg_tol": 0.0,
                   "cg_forcing": "fixed", "initial_radius": 1e30, "max_radius": 1e30,
                   "damping": 1e-3}})
    est = opt.estimator
    params = [p for p in model.parameters() if p.requires_grad]
    v = [torch.randn_like(p) for p in params]
    # the reference gradient on a copy without the optimizer's capture hooks (the step's own
    # gradient pass does not run them either), with its own loss module
    plain, plain_loss = copy.deepcopy(model), nn.CrossEntropyLoss()
    plain_params = [p for p in plain.parameters() if p.requires_grad]

    def gradient() -> object:
        return torch.autograd.grad(plain_loss(plain(X), y), plain_params)

    def products_only() -> None:
        # as inside the step: the capture is paused during the solver's passes
        with opt._capture.pausing():
            op = est.linearize(batch)
            for _ in range(products):
                op.matvec(v)

    def hf_step() -> None:
        opt.step(batch)
        assert opt.last_info["matvecs"] == products, opt.last_info

    t = interleaved({"step": hf_step, "products": products_only, "gradient": gradient},
                    repeats)
    r = ratio(t, "step", ["products", "gradient"], [1.0, 2.0])
    return (f"| {label} | ggn Hessian-free step, {products} CG products | {ms(t['step'])} | "
            f"{ms(t['products'])} + 2 × {ms(t['gradient'])} | {fmt(r)} | ≤ 1.2× |")


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory instead of returning the heap's top to the
    system (``M_TRIM_THRESHOLD``) and to serve large blocks from the heap instead of one
    ``mmap`` each (``M_MMAP_THRESHOLD``): in one process that interleaves two contenders,
    the page faults of re-grown memory otherwise land on either of them at random. False
    where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)
                    and libc.mallopt(m_mmap_threshold, 1 << 28))
    except (OSError, AttributeError):
        return False


def plumbing(repeats: int, inner: int, blocks: int) -> list[str]:
    rows = []
    for label, (model, X, y) in models((784, 1024, 1024), nn.ReLU).items():
        for settings in ({}, {"momentum": 0.9}):
            rows.append(plumbing_row(label, model, X, y, settings, repeats, inner, blocks))
            print(rows[-1], flush=True)
    return rows


def hessian_free(repeats: int, width: int) -> list[str]:
    rows = []
    for label, (model, X, y) in hf_models(width).items():
        rows.append(hf_row(label, model, X, y, repeats))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
    ap.add_argument("--inner", type=int, default=5, help="plumbing steps per round")
    ap.add_argument("--plumbing-repeats", type=int, default=0,
                    help="plumbing rounds (default: 4 × --repeats; a plumbing round is "
                         "cheap and its ratio is a few tenths of a percent from the target)")
    ap.add_argument("--blocks", type=int, default=8,
                    help="plumbing: fresh model copies this many times over the rounds")
    ap.add_argument("--width", type=int, default=2048, help="Hessian-free MLP width")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--part", choices=("all", "plumbing", "hf"), default="all",
                    help="only the plumbing rows or only the Hessian-free rows")
    ap.add_argument("--out", **out_arg("step.md"))
    ap.add_argument("--system-allocator", action="store_true",
                    help="leave glibc's malloc as it is (by default it keeps freed memory)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kept = not args.system_allocator and keep_freed_memory()
    lines = header("Benchmark: the step's own cost", "bench_step.py",
                   f"{args.repeats} interleaved rounds (plumbing: "
                   f"{args.plumbing_repeats or 4 * args.repeats} rounds of {args.inner} "
                   f"steps, averaged, in {args.blocks} blocks on fresh model copies with "
                   "the two sides' order swapped between blocks), float32, "
                   "CrossEntropyLoss (mean); the ratio is taken "
                   "within each round: median (min–max over the rounds). Times in ms, "
                   "median (min–max). " + (
                       "glibc's malloc keeps the memory it frees (mallopt: no trimming, no "
                       "mmap per block): otherwise the heap's top was returned to the "
                       "system and faulted back in by whichever contender came next (up "
                       "to ~2000 page faults, 1–3 ms of system time per MLP step, for "
                       "SGD and curvkit alike)." if kept else
                       "glibc's malloc as configured (page faults included)."))
    lines += ["| model | comparison | curvkit (ms) | reference (ms) | ratio | target |",
              "|---|---|---:|---:|---:|---|"]
    if args.part in ("all", "plumbing"):
        lines += plumbing(args.plumbing_repeats or 4 * args.repeats, args.inner, args.blocks)
    if args.part in ("all", "hf"):
        lines += hessian_free(args.repeats, args.width)
    lines += [
        "",
        "Plumbing: a step checks the gradient for non-finite values in one read (its sum "
        "of squares per tensor: BLAS's dot for large CPU tensors, one "
        "`torch._foreach_norm` call for the rest; exact ends where a square overflows; "
        "the loss is checked as the number it is read as anyway), which also bounds "
        "max|d|: the bound on the applied update lr·d then needs no read of the "
        "parameters unless |lr|·max|d| comes near the dtype's largest value. A tensor "
        "that passes unchanged to the update (the gradient through identity + direct) is "
        "not scanned again (`curvkit.params.FiniteLedger`). With momentum the buffer is "
        "not scanned either: it carries a bound of its largest magnitude, "
        "momentum·B + (1 − dampening)·max|d| (rounding included), and is only computed "
        "aside and scanned when that bound reaches the dtype's largest value "
        "(`curvkit/solvers/direct.py`). The update is one `torch._foreach_add_` over all "
        "parameters; the optimizer's own forward takes torch's hook-free call path (the "
        "capture hooks for `loss.backward(); opt.step()` are set aside during it); "
        "torch.optim's step wrapper (a `record_function` scope for the profiler, step "
        "hooks) is taken only while a profiler records or a step hook is registered. SGD "
        "reads the gradient once (in its update), curvkit twice: that read is most of "
        "what the ratio shows on the MLP.",
        "",
        "Hessian-free: reference = `linearize(batch)` + 10 × `op.matvec(v)` + 2 gradients, "
        "timed in the same round. Per CG iteration the solver adds two dots and three "
        "in-place vector updates (`curvkit/solvers/_krylov.py`).",
        "",
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
