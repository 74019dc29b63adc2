"""Steihaug-Toint truncated CG and the trust-region radius rule shared by the Krylov solvers.

Vectors are lists of tensors (one per parameter, or a single tensor), updated in place with
``torch._foreach_*`` where the algorithm owns them; scalars are Python floats (per-tensor dots
summed in float64, see :func:`vdot`). Nothing here touches model parameters.

The subproblem (Nocedal & Wright §7.2, Conn-Gould-Toint §7.5, preconditioned form)::

    minimize  m(p) = gᵀp + ½ pᵀ B p   subject to  ‖p‖_M ≤ Δ,

with B given by ``matvec`` (any symmetric operator, possibly indefinite) and the trust
region measured in the norm ‖p‖_M = sqrt(pᵀ M p) of the preconditioner, of which only
M⁻¹ (``precond``) is available. The M-inner products of the iterates follow without
applying M from scalar recurrences (see :func:`steihaug_cg`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from curvkit.options import option

Vec = list[Tensor]

STOP_REASONS = ("converged", "boundary", "negative_curvature", "max_iters", "zero_gradient",
                "nonfinite", "indefinite_preconditioner")


# ----------------------------------------------------------------------------- vector algebra
# Measured at width 2048 (one thread, float32): ``sum(x*y, dtype=float64)`` per tensor cost
# 10-50× a BLAS ``dot`` (a product temporary plus a widening pass), and an axpy into new
# tensors 5-10× an in-place ``_foreach_add_`` (fresh pages for every temporary). So dots are
# one ``torch.dot`` per tensor in the tensors' dtype (BLAS accumulates in blocks: relative
# error ≈ 1e-8 of Σ|xᵢyᵢ| over 14M float32 entries, against 6e-8 for one rounding of the
# vectors themselves), summed across tensors in float64, with one host transfer.
def vdot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """⟨a, b⟩: a dot per tensor in its dtype, the per-tensor values summed in float64."""
    dots = [torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]
    if not dots:
        return 0.0
    if len(dots) == 1:
        return float(dots[0])
    return float(torch.stack(dots).sum(dtype=torch.float64))


def axpy(alpha: float, x: Sequence[Tensor], y: Sequence[Tensor]) -> Vec:
    """y + alpha·x (new tensors)."""
    return list(torch._foreach_add(list(y), list(x), alpha=alpha))


def scale(alpha: float, x: Sequence[Tensor]) -> Vec:
    """alpha·x (new tensors)."""
    return list(torch._foreach_mul(list(x), alpha))


def zeros_like(x: Sequence[Tensor]) -> Vec:
    return [torch.zeros_like(a) for a in x]


def finite(x: float) -> bool:
    return math.isfinite(x)


# ----------------------------------------------------------------------------- CG
@dataclass
class CGResult:
    """Outcome of :func:`steihaug_cg`.

    ``step`` p, ``residual`` r = g + Bp (the model gradient at p), ``gp`` = gᵀp,
    ``pBp`` = pᵀBp (so m(τp) = τ·gp + ½τ²·pBp), ``norm`` = ‖p‖_M, ``iters`` CG
    iterations, ``matvecs`` products with B, ``stop`` one of :data:`STOP_REASONS`,
    ``hit_boundary`` whether ‖p‖_M = Δ.
    """

    step: Vec
    residual: Vec
    gp: float
    pBp: float
    norm: float
    iters: int
    matvecs: int
    stop: str
    hit_boundary: bool

    def model(self, tau: float = 1.0) -> float:
        """m(τp) = τ gᵀp + ½ τ² pᵀBp."""
        return tau * self.gp + 0.5 * tau * tau * self.pBp


def boundary_taus(zMz: float, zMd: float, dMd: float, radius: float) -> tuple[float, float]:
    """Both roots τ_a ≤ τ_b of ‖z + τd‖²_M = Δ², in the cancellation-free form."""
    a, b, c = dMd, 2.0 * zMd, zMz - radius * radius
    disc = max(b * b - 4.0 * a * c, 0.0)
    aux = b + math.copysign(math.sqrt(disc), b)
    if aux == 0.0:
        return 0.0, 0.0
    ta, tb = -aux / (2.0 * a), -2.0 * c / aux
    return (ta, tb) if ta <= tb else (tb, ta)


def steihaug_cg(g: Sequence[Tensor], matvec: Callable[[Vec], Sequence[Tensor]],
                precond: Callable[[Vec], Sequence[Tensor]] | None, radius: float,
                max_iters: int, tol: float | Callable[[float], float],
                shift: float = 0.0) -> CGResult:
    """Preconditioned Steihaug-Toint CG on m(p) = gᵀp + ½pᵀBp within ‖p‖_M ≤ ``radius``,
    B = ``matvec`` + ``shift``·I (a damping λ folded into CG's own in-place updates: adding
    it to each product made a new P-vector per iteration, which cost as much as all of CG's
    other arithmetic together).

    Stops (``stop``):
      * ``"converged"``: ‖r‖_{M⁻¹} = sqrt(rᵀM⁻¹r) < ``tol`` (absolute; or
        ``tol(‖g‖_{M⁻¹})`` if ``tol`` is a function, e.g. of :func:`cg_tolerance`);
      * ``"boundary"``: the next CG iterate leaves the region; p is where the segment
        z_k → z_{k+1} crosses the boundary;
      * ``"negative_curvature"``: dᵀBd ≤ 0; p = z + τd with τ the boundary root (either
        sign) of lower model value, i.e. the direction is followed to the boundary;
      * ``"max_iters"``: the last iterate;
      * ``"zero_gradient"``: g = 0 (p = 0);
      * ``"nonfinite"``: a non-finite curvature product (p = the last finite iterate);
      * ``"indefinite_preconditioner"``: rᵀM⁻¹r ≤ 0 (p = the last iterate).

    Per iteration: one product, two dots (dᵀBd, rᵀy; a third, dᵀd, with a shift) and three
    in-place vector updates (z, r, d; r twice with a shift). The M-norms come from the
    scalar recurrences of Conn-Gould-Toint §7.5.1 (y = M⁻¹r; rᵀ_{k+1}z_{k+1} = 0 and
    rᵀ_{k+1}d_k = 0)::

        zMz_{k+1} = zMz_k + 2α zMd_k + α² dMd_k
        zMd_{k+1} = β (zMd_k + α dMd_k),   dMd_{k+1} = r_{k+1}ᵀy_{k+1} + β² dMd_k

    so no M-vector is carried. gᵀp and pᵀBp are two dots of the returned vectors at exit.
    ``matvec`` and ``precond`` must not keep their argument (it is updated in place).
    """
    r = [t.clone() for t in g]
    y = list(precond(r)) if precond is not None else r
    ry = vdot(r, y)
    zMz = zMd = 0.0
    dMd = ry                          # M d₀ = −r₀, so d₀ᵀMd₀ = r₀ᵀy₀
    z: Vec | None = None              # z₀ = 0, allocated by the first update
    matvecs = 0

    def result(p: Vec | None, res: Vec, pMp: float, iters: int, stop: str,
               boundary: bool) -> CGResult:
        if p is None:
            return CGResult(zeros_like(g), res, 0.0, 0.0, 0.0, iters, matvecs, stop,
                            boundary)
        gp = vdot(g, p)
        pBp = vdot(p, res) - gp       # r = g + Bp
        return CGResult(p, res, gp, pBp, math.sqrt(max(pMp, 0.0)), iters, matvecs, stop,
                        boundary)

    if vdot(g, g) == 0.0:
        return result(None, r, 0.0, 0, "zero_gradient", False)
    if not (ry > 0.0 and finite(ry)):
        return result(None, r, 0.0, 0, "indefinite_preconditioner", False)
    if callable(tol):
        tol = tol(math.sqrt(ry))
    d = list(torch._foreach_neg(y))

    def moved(res: Vec, tau: float, Cd: Vec) -> Vec:  # res + τ·B d, as new tensors
        out = axpy(tau, Cd, res)
        if shift:
            torch._foreach_add_(out, d, alpha=tau * shift)
        return out

    for k in range(max_iters):
        Bd = list(matvec(d))          # C d; B d = C d + shift·d
        matvecs += 1
        dBd = vdot(d, Bd) + (shift * vdot(d, d) if shift else 0.0)
        if not finite(dBd):
            return result(z, r, zMz, k, "nonfinite", False)
        if dBd <= 0.0:
            ta, tb = boundary_taus(zMz, zMd, dMd, radius)
            rd = -ry                  # rᵀd = −rᵀy + β rᵀd_{k−1} = −rᵀy
            # m(z + τd) − m(z) = τ rᵀd + ½ τ² dᵀBd; ties go to the positive root
            tau = ta if ta * rd + 0.5 * ta * ta * dBd < tb * rd + 0.5 * tb * tb * dBd else tb
            p = scale(tau, d) if z is None else axpy(tau, d, z)
            return result(p, moved(r, tau, Bd), radius * radius, k + 1,
                          "negative_curvature", True)
        alpha = ry / dBd
        zMz_next = zMz + 2.0 * alpha * zMd + alpha * alpha * dMd
        if zMz_next >= radius * radius:
            _, tb = boundary_taus(zMz, zMd, dMd, radius)
            p = scale(tb, d) if z is None else axpy(tb, d, z)
            return result(p, moved(r, tb, Bd), radius * radius, k + 1, "boundary", True)
        if z is None:
            z = scale(alpha, d)
        else:
            torch._foreach_add_(z, d, alpha=alpha)
        torch._foreach_add_(r, Bd, alpha=alpha)
        if shift:
            torch._foreach_add_(r, d, alpha=alpha * shift)
        del Bd
        y = list(precond(r)) if precond is not None else r
        ry_next = vdot(r, y)
        zMz = zMz_next
        if math.sqrt(max(ry_next, 0.0)) < tol:
            return result(z, r, zMz, k + 1, "converged", False)
        if not (ry_next > 0.0 and finite(ry_next)):
            stop = "nonfinite" if not finite(ry_next) else "indefinite_preconditioner"
            return result(z, r, zMz, k + 1, stop, False)
        beta = ry_next / ry
        zMd = beta * (zMd + alpha * dMd)
        dMd = ry_next + beta * beta * dMd
        torch._foreach_mul_(d, beta)  # d ← −y + β d
        torch._foreach_sub_(d, y)
        ry = ry_next
    return result(z, r, zMz, max_iters, "max_iters", False)


def cg_tolerance(gnorm: float, rel: float, forcing: str) -> float:
    """Absolute CG tolerance: ``rel``·‖g‖ ("fixed") or min(rel, sqrt‖g‖)·‖g‖ ("superlinear",
    Nocedal & Wright eq. 7.3, scipy's trust-ncg with rel = 0.5)."""
    if forcing == "superlinear":
        return min(rel, math.sqrt(gnorm)) * gnorm
    return rel * gnorm


# ----------------------------------------------------------------------------- options, rule
@dataclass
class TrustRegionOptions:
    """Options of a Newton-Krylov trust region (shared by ``trust_region`` and ``varpro``)."""

    max_iters: int = option(50, "maximum CG iterations (= curvature products) per step",
                            min=1)
    cg_tol: float = option(0.5, "relative CG residual tolerance (see cg_forcing)",
                           min=0.0)
    cg_forcing: Literal["superlinear", "fixed"] = option(
        "superlinear", "CG stops when ‖r‖ < min(cg_tol, sqrt‖g‖)·‖g‖ (superlinear, "
                       "scipy trust-ncg) or < cg_tol·‖g‖ (fixed); norms in M⁻¹")
    initial_radius: float = option(1.0, "trust radius Δ₀ (in the preconditioner's norm)",
                                   min=0.0, min_exclusive=True)
    max_radius: float = option(1000.0, "largest radius Δ̂", min=0.0, min_exclusive=True)
    min_radius: float = option(0.0, "the radius never shrinks below this", min=0.0)
    eta: float = option(0.15, "accept the step if ρ > eta (N&W Alg. 4.1: eta ∈ [0, ¼))",
                        min=0.0, max=0.25)
    shrink_threshold: float = option(0.25, "ρ below this shrinks the radius", min=0.0,
                                     max=1.0)
    shrink_factor: float = option(0.25, "Δ ← shrink_factor·Δ on shrink", min=0.0, max=1.0,
                                  min_exclusive=True)
    expand_threshold: float = option(0.75, "ρ above this with a step on the boundary "
                                           "expands the radius", min=0.0, max=1.0)
    expand_factor: float = option(2.0, "Δ ← min(expand_factor·Δ, max_radius) on expand",
                                  min=1.0)
    damping: float = option(0.0, "λ in the model's C + λI (initial value if adapted)",
                            min=0.0)
    adapt_damping: bool = option(False, "Levenberg-Marquardt: λ ← damping_factor·λ when "
                                        "ρ < shrink_threshold, λ/damping_factor when "
                                        "ρ > expand_threshold")
    damping_factor: float = option(1.5, "LM factor (Martens 2010: 3/2)", min=1.0)
    min_damping: float = option(1e-8, "LM: λ is kept in [min_damping, max_damping]",
                                min=0.0)
    max_damping: float = option(1e8, "LM: upper bound of λ", min=0.0)
    retries: int = option(0, "after a rejection, re-solve on the same batch with the "
                             "shrunk radius up to this many times", min=0)

    def __post_init__(self) -> None:
        if self.eta >= self.shrink_threshold and self.shrink_threshold > 0:
            raise ValueError(f"eta: must be < shrink_threshold ({self.shrink_threshold}), "
                             f"got {self.eta}")
        if self.shrink_threshold > self.expand_threshold:
            raise ValueError(f"shrink_threshold: must be <= expand_threshold "
                             f"({self.expand_threshold}), got {self.shrink_threshold}")
        if self.initial_radius > self.max_radius:
            raise ValueError(f"initial_radius: must be <= max_radius ({self.max_radius}), "
                             f"got {self.initial_radius}")
        if self.min_radius > self.initial_radius:
            raise ValueError(f"min_radius: must be <= initial_radius "
                             f"({self.initial_radius}), got {self.min_radius}")
        if self.min_damping > self.max_damping:
            raise ValueError(f"min_damping: must be <= max_damping ({self.max_damping}), "
                             f"got {self.min_damping}")


def initial_state(o: Any) -> dict[str, Any]:
    """Checkpointed trust-region state: radius, λ and counters."""
    return {"radius": float(o.initial_radius), "damping": float(o.damping),
            "accepted": 0, "rejected": 0, "matvecs": 0, "cg_iters": 0}


def ratio(actual: float, predicted: float) -> float:
    """ρ = actual / predicted reduction; −inf for a non-finite trial loss or a model that
    predicts no decrease (such a step is never accepted)."""
    if not finite(actual) or not (predicted > 0.0) or not finite(predicted):
        return -math.inf
    return actual / predicted


def update_radius(o: Any, state: dict[str, Any], rho: float, hit_boundary: bool) -> bool:
    """Nocedal & Wright Alg. 4.1 on ``state["radius"]`` (and LM on ``state["damping"]``).

    Returns whether the step is accepted (ρ > eta).
    """
    radius = state["radius"]
    if rho < o.shrink_threshold:
        radius = max(o.shrink_factor * radius, o.min_radius)
    elif rho > o.expand_threshold and hit_boundary:
        radius = min(o.expand_factor * radius, o.max_radius)
    state["radius"] = float(radius)
    if o.adapt_damping:
        lam = state["damping"]
        if rho < o.shrink_threshold:
            lam = lam * o.damping_factor
        elif rho > o.expand_threshold:
            lam = lam / o.damping_factor
        state["damping"] = float(min(max(lam, o.min_damping), o.max_damping))
    accepted = rho > o.eta
    state["accepted" if accepted else "rejected"] += 1
    return accepted


def conjugate_gradient(matvec: Callable[[Vec], Sequence[Tensor]], b: Sequence[Tensor],
                       rtol: float, max_iters: int) -> tuple[Vec, int]:
    """Plain CG for A x = b with A symmetric positive (semi-)definite; returns (x, products).

    Stops when ‖b − Ax‖ ≤ rtol·‖b‖, after ``max_iters`` products, or when dᵀAd ≤ 0 (A
    singular along d: the iterate so far is the Krylov solution; for a consistent right-hand
    side in the range of a semi-definite A this is the minimum-norm solution).
    """
    x = zeros_like(b)
    r = [t.clone() for t in b]
    d = [t.clone() for t in b]
    rr = vdot(r, r)
    bnorm = math.sqrt(rr)
    products = 0
    if bnorm == 0.0:
        return x, products
    for _ in range(max_iters):
        Ad = list(matvec(d))
        products += 1
        dAd = vdot(d, Ad)
        if not (dAd > 0.0) or not finite(dAd):
            break
        alpha = rr / dAd
        torch._foreach_add_(x, d, alpha=alpha)
        torch._foreach_add_(r, Ad, alpha=-alpha)
        rr_next = vdot(r, r)
        if math.sqrt(rr_next) <= rtol * bnorm:
            break
        torch._foreach_mul_(d, rr_next / rr)  # d ← r + β d
        torch._foreach_add_(d, r)
        rr = rr_next
    return x, products
