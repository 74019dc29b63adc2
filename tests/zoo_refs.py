"""Independent references for the model zoo and the checks that produce its support matrix.

References are computed in float64 by central finite differences of first-order
quantities (the output, and the gradient by plain reverse mode), never by the higher-order
autograd that the estimators use and that PyTorch gets wrong in places (triple backward
through normalization, forward mode of the flash-attention kernel):

    H[:, i]  = (∇L(θ + h e_i) − ∇L(θ − h e_i)) / 2h           (Hessian)
    J[:, i]  = (f(θ + h e_i) − f(θ − h e_i)) / 2h              (output Jacobian)
    GGN      = Jᵀ H_out J,  H_out = ∂²L/∂f² of the loss alone (no model inside)
    EF       = Σ_{n,t} (1/c) (J_{n,t}ᵀ ∇_{f_{n,t}}L)(…)ᵀ,  L = c Σ_{n,t} ℓ_{n,t}  (t: positions)
    D3[s]    = φ_s'''(0), φ_s(t) = L(θ + t u_s), 6-point stencil

Every forward of a reference replays one random state and uses copies of the buffers, as
curvkit's evaluations do, so models with dropout and BatchNorm (train) have one
well-defined loss function.

:func:`check_estimator` and :func:`check_composition` return :class:`Cell` results
(``exact`` / ``estimate`` / ``runs`` / ``refused`` / ``FAIL``) for the tests and for the
generated ``docs/models.md``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from zoo import Case

import curvkit
from curvkit.errors import ConfigError

ESTIMATORS = ("hessian", "ggn", "ef", "fisher", "outer_product")
CAPABILITIES = ("matvec", "dense", "diagonal", "summary")


@dataclass
class Cell:
    status: str  # exact | estimate | runs | refused | FAIL
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"


class Problem:
    """A zoo case prepared for references: model (a tensor output), batch, loss, θ."""

    def __init__(self, case: Case) -> None:
        model, batch, loss_fn = case.build()
        probe = model(batch[0])
        if not isinstance(probe, Tensor):
            key = "logits" if isinstance(probe, dict) else 0
            model = curvkit.SelectOutput(model, key)
        self.case, self.model, self.batch, self.loss_fn = case, model, batch, loss_fn
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in self.named])
        self.P = self.theta.numel()
        self.rng = torch.get_rng_state()

    def unflat(self, theta: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, p in self.named:
            out[n] = theta[i:i + p.numel()].view_as(p)
            i += p.numel()
        return out

    def split(self, flat: Tensor) -> list[Tensor]:
        return list(self.unflat(flat).values())

    def output(self, theta: Tensor) -> Tensor:
        torch.set_rng_state(self.rng)
        state = self.unflat(theta)
        state.update({n: b.clone() for n, b in self.model.named_buffers()})
        return functional_call(self.model, state, (self.batch[0],))

    def loss(self, theta: Tensor) -> Tensor:
        return self.loss_fn(self.output(theta), self.batch[1])

    def grad(self, theta: Tensor) -> Tensor:
        t = theta.detach().requires_grad_(True)
        g, = torch.autograd.grad(self.loss(t), t, allow_unused=True)
        return torch.zeros_like(theta) if g is None else g

    # ------------------------------------------------------------- references
    def hessian(self, h: float = 1e-5) -> Tensor:
        cols = []
        for i in range(self.P):
            e = torch.zeros_like(self.theta)
            e[i] = h
            cols.append((self.grad(self.theta + e) - self.grad(self.theta - e)) / (2 * h))
        H = torch.stack(cols, dim=1)
        return (H + H.T) / 2

    def jacobian(self, h: float = 1e-6) -> tuple[Tensor, Tensor]:
        if getattr(self, "_jacobian", None) is None:
            self._jacobian = self._fd_jacobian(h)
        return self._jacobian

    def _fd_jacobian(self, h: float) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            out = self.output(self.theta)
            cols = []
            for i in range(self.P):
                e = torch.zeros_like(self.theta)
                e[i] = h
                cols.append(((self.output(self.theta + e) - self.output(self.theta - e))
                             / (2 * h)).reshape(-1))
        return out, torch.stack(cols, dim=1)

    def ggn(self) -> Tensor:
        out, J = self.jacobian()
        y = self.batch[1]
        H_out = torch.autograd.functional.hessian(
            lambda o: self.loss_fn(o.view_as(out), y), out.reshape(-1))
        return J.T @ H_out @ J

    def ef(self) -> Tensor:
        out, J = self.jacobian()
        o = out.detach().requires_grad_(True)
        g_out, = torch.autograd.grad(self.loss_fn(o, self.batch[1]), o)
        # cross-entropy (every zoo loss): L = c Σ_n ℓ_n with c = 1 for "sum", else 1 over
        # the number of targets (samples × positions)
        c = 1.0 if self.loss_fn.reduction == "sum" else out.shape[1] / out.numel()
        # one term per sample and position (cross-entropy over (N, C, d…) logits): rows
        # J_{n,t}ᵀ ∇_{f_{n,:,t}} L
        N, C = out.shape[0], out.shape[1]
        Jt = J.reshape(N, C, -1, self.P)
        rows = torch.einsum("nct,nctp->ntp", g_out.reshape(N, C, -1), Jt).reshape(-1, self.P)
        return rows.T @ rows / c

    def outer_product(self) -> Tensor:
        g = self.grad(self.theta)
        return torch.outer(g, g)

    def third(self, u: Tensor, h: float = 1e-3) -> float:
        def phi(t: float) -> float:
            with torch.no_grad():
                return float(self.loss(self.theta + t * u))
        return (-phi(3 * h) + 8 * phi(2 * h) - 13 * phi(h) + 13 * phi(-h) - 8 * phi(-2 * h)
                + phi(-3 * h)) / (8 * h ** 3)


def _close(a: Tensor, b: Tensor, rtol: float = 1e-6) -> tuple[bool, float]:
    scale = max(float(b.abs().max()), 1e-12)
    err = float((a - b).abs().max()) / scale
    return err <= rtol, err


def _call(fn: Callable[[], object], rng: Tensor) -> object:
    torch.set_rng_state(rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def check_estimator(pb: Problem, name: str, capabilities: tuple[str, ...] = CAPABILITIES,
                    reference: Tensor | None = None) -> dict[str, Cell]:
    """Every capability of estimator ``name`` on ``pb`` against the reference."""
    opts = {"samples": 1024} if name == "hessian" else {}
    if name == "fisher":
        opts = {"mc_samples": 1}
    try:
        est = curvkit.create("estimator", name, model=pb.model, loss_fn=pb.loss_fn, **opts)
    except (ValueError, TypeError) as err:
        return {c: Cell("refused", str(err)) for c in capabilities}
    provided = est.provides
    cells: dict[str, Cell] = {}
    stochastic = name == "fisher"
    if reference is None and not stochastic:
        reference = {"hessian": pb.hessian, "ggn": pb.ggn, "ef": pb.ef,
                     "outer_product": pb.outer_product}[name]()
    g = torch.Generator().manual_seed(3)
    v_flat = torch.randn(pb.P, generator=g, dtype=pb.theta.dtype)
    dense = None
    for cap in capabilities:
        if cap not in provided:
            cells[cap] = Cell("n/a", "not provided")
            continue
        refusal = est.refusal(cap) if hasattr(est, "refusal") else ""
        if refusal:  # declared before any pass, with the module and the way out
            cells[cap] = Cell("refused", refusal)
            continue
        try:
            cells[cap] = _check_capability(pb, est, name, cap, reference, v_flat, stochastic)
        except Exception as err:  # a crash is a FAIL cell, reported with its message
            cells[cap] = Cell("FAIL", f"{type(err).__name__}: {str(err)[:300]}")
        if cap == "dense" and cells[cap].ok:
            dense = _call(lambda: est.dense(pb.batch), pb.rng)
    if stochastic and dense is not None:
        # the Monte Carlo Fisher: its own capabilities agree with each other
        for cap in ("matvec", "diagonal"):
            if cap in cells and cells[cap].status == "runs":
                cells[cap] = _check_capability(pb, est, name, cap, dense, v_flat, False,
                                               status="runs")
        cells["dense"] = Cell("runs", "Monte Carlo; matvec/diagonal agree with it")
    return cells


def _check_capability(pb: Problem, est, name: str, cap: str, ref: Tensor | None,
                      v_flat: Tensor, stochastic: bool, status: str = "exact") -> Cell:
    batch = pb.batch
    if stochastic:
        if cap == "summary":
            return Cell("n/a")
        # checked against dense afterwards
        out = _call(lambda: est.matvec(batch, pb.split(v_flat)) if cap == "matvec" else
                    est.dense(batch) if cap == "dense" else est.diagonal(batch), pb.rng)
        return Cell("runs") if all(torch.isfinite(t).all() for t in
                                   (out if isinstance(out, list) else [out])) \
            else Cell("FAIL", "non-finite")
    assert ref is not None
    if cap == "matvec":
        got = torch.cat([t.reshape(-1) for t in
                         _call(lambda: est.matvec(batch, pb.split(v_flat)), pb.rng)])
        ok, err = _close(got, ref @ v_flat)
    elif cap == "dense":
        ok, err = _close(_call(lambda: est.dense(batch), pb.rng), ref)
    elif cap == "diagonal":
        got = torch.cat([t.reshape(-1) for t in _call(lambda: est.diagonal(batch), pb.rng)])
        if name == "hessian":  # Hutchinson: unbiased, 5 standard deviations
            K = est.options.samples
            off = (ref ** 2).sum(1) - ref.diagonal() ** 2
            bound = 5 * torch.sqrt(off / K) + 1e-8
            bad = ((got - ref.diagonal()).abs() > bound).sum()
            return Cell("estimate", "Hutchinson") if int(bad) == 0 else \
                Cell("FAIL", f"Hutchinson diagonal outside 5σ at {int(bad)} entries")
        ok, err = _close(got, ref.diagonal())
    else:
        return _check_summary(pb, est, name, ref, v_flat)
    return Cell(status, f"rel. err {err:.1e}") if ok else \
        Cell("FAIL", f"differs from the reference by {err:.1e} (relative)")


def _check_summary(pb: Problem, est, name: str, ref: Tensor, u: Tensor) -> Cell:
    S = len(pb.named)
    s = _call(lambda: est.summary(pb.batch, pb.split(u)), pb.rng)
    U = torch.zeros(pb.P, S, dtype=u.dtype)
    i = 0
    for k, (_, p) in enumerate(pb.named):
        U[i:i + p.numel(), k] = u[i:i + p.numel()]
        i += p.numel()
    errs = []
    ok_g, e = _close(s.g, U.T @ pb.grad(pb.theta))
    errs.append(e)
    ok_h, e = _close(s.H, U.T @ ref @ U)
    errs.append(e)
    ok_d = True
    if s.D3 is not None and name == "hessian":
        if not pb.case.smooth:
            return Cell("exact" if ok_g and ok_h else "FAIL",
                        "g, H exact; D3 not checked (kinks)")
        fd = torch.tensor([pb.third(U[:, k]) for k in range(S)], dtype=u.dtype)
        ok_d, e = _close(s.D3, fd, rtol=1e-4)
        errs.append(e)
    worst = max(errs)
    return Cell("exact", f"rel. err {worst:.1e}") if ok_g and ok_h and ok_d else \
        Cell("FAIL", f"summary differs from the reference by {worst:.1e}")


# ----------------------------------------------------------------------------- compositions
def _advice(detail: str) -> bool:
    return "module" in detail or "model" in detail


def composition(case: Case, method: str, config: dict, steps: int = 5) -> Cell:
    """:func:`check_composition`; a refusal that names neither the module nor the model is
    a failure (every refusal must say where and what to do). ``method`` names the cell."""
    cell = check_composition(case, config, steps)
    if cell.status == "refused" and not _advice(cell.detail):
        return Cell("FAIL", f"{method}: refused without naming the module: {cell.detail}")
    return cell


def check_composition(case: Case, config: dict, steps: int = 5) -> Cell:
    """Build the optimizer on a fresh model and take ``steps`` steps: runs with a finite
    loss (and BatchNorm statistics advanced exactly once per step), or refused at build."""
    model, batch, loss_fn = case.build()
    probe = model(batch[0])
    wrapped = not isinstance(probe, Tensor)
    if wrapped:
        model = curvkit.SelectOutput(model, "logits" if isinstance(probe, dict) else 0)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.training]
    for m in bns:
        m.num_batches_tracked.zero_()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = curvkit.build_optimizer(model, loss_fn, config)
    except ConfigError as err:
        return Cell("refused", str(err))
    losses = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(steps):
                losses.append(float(opt.step(batch)))
    except Exception as err:
        return Cell("FAIL", f"step {len(losses)}: {type(err).__name__}: {str(err)[:300]}")
    if not all(math.isfinite(v) for v in losses):
        return Cell("FAIL", f"non-finite loss {losses}")
    for m in bns:
        if int(m.num_batches_tracked) != steps:
            return Cell("FAIL", f"BatchNorm statistics advanced {int(m.num_batches_tracked)} "
                                f"times in {steps} steps")
    skipped = opt.counters.get("nonfinite", 0)
    detail = f"loss {losses[0]:.3g} → {losses[-1]:.3g}"
    if skipped:
        detail += f", {skipped} steps skipped (non-finite)"
    if wrapped:
        detail += " (through curvkit.SelectOutput)"
    if losses[-1] > 10 * max(losses[0], 1e-12):
        # finite, but not training: said in the matrix rather than hidden in "runs"
        return Cell("diverges", detail)
    return Cell("runs", detail)
