"""Steihaug-Toint truncated CG and the trust-region radius rule shared by the Krylov solvers.

Vectors are lists of tensors (one per parameter, or a single tensor); scalars are Python
floats accumulated in float64. Nothing here touches model parameters.

The subproblem (Nocedal & Wright §7.2, Conn-Gould-Toint §7.5, preconditioned form)::

    minimize  m(p) = gᵀp + ½ pᵀ B p   subject to  ‖p‖_M ≤ Δ,

with B given by ``matvec`` (any symmetric operator, possibly indefinite) and the trust
region measured in the norm ‖p‖_M = sqrt(pᵀ M p) of the preconditioner, of which only
M⁻¹ (``precond``) is available. The M-inner products of the iterates are exact, without
applying M: with y = M⁻¹r and d₀ = −y₀, the identities M d₀ = −r₀,
M d_{k+1} = −r_{k+1} + β M d_k and M z_{k+1} = M z_k + α M d_k hold by linearity of M⁻¹.
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
def vdot(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """⟨a, b⟩ accumulated in float64."""
    return float(sum(torch.sum(x * y, dtype=torch.float64) for x, y in zip(a, b)))


def axpy(alpha: float, x: Sequence[Tensor], y: Sequence[Tensor]) -> Vec:
    """y + alpha·x (new tensors)."""
    return [b.add(a, alpha=alpha) for a, b in zip(x, y)]


def scale(alpha: float, x: Sequence[Tensor]) -> Vec:
    return [alpha * a for a in x]


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
                max_iters: int, tol: float | Callable[[float], float]) -> CGResult:
    """Preconditioned Steihaug-Toint CG on m(p) = gᵀp + ½pᵀBp within ‖p‖_M ≤ ``radius``.

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
    """
    apply = precond if precond is not None else (lambda v: v)
    z = zeros_like(g)
    r = [t.clone() for t in g]
    y = list(apply(r))
    ry = vdot(r, y)
    Md = scale(-1.0, r)              # M d₀ = −r₀
    Mz = zeros_like(g)
    zMz = 0.0
    gz = 0.0                          # gᵀz, so m(z) and pᵀBp follow without extra products
    d = scale(-1.0, y)
    matvecs = 0

    def result(p: Vec, res: Vec, gp: float, pMp: float, iters: int, stop: str,
               boundary: bool) -> CGResult:
        # pᵀBp = pᵀ(r − g) since r = g + Bp
        pBp = vdot(p, res) - gp
        return CGResult(p, res, gp, pBp, math.sqrt(max(pMp, 0.0)), iters, matvecs, stop,
                        boundary)

    if vdot(g, g) == 0.0:
        return result(z, r, 0.0, 0.0, 0, "zero_gradient", False)
    if not (ry > 0.0 and finite(ry)):
        return result(z, r, 0.0, 0.0, 0, "indefinite_preconditioner", False)
    if callable(tol):
        tol = tol(math.sqrt(ry))
    for k in range(max_iters):
        Bd = list(matvec(d))
        matvecs += 1
        dBd = vdot(d, Bd)
        if not finite(dBd):
            return result(z, r, gz, zMz, k, "nonfinite", False)
        zMd, dMd = vdot(z, Md), vdot(d, Md)
        if dBd <= 0.0:
            ta, tb = boundary_taus(zMz, zMd, dMd, radius)
            rd = vdot(r, d)
            # m(z + τd) − m(z) = τ rᵀd + ½ τ² dᵀBd; ties go to the positive root
            tau = ta if ta * rd + 0.5 * ta * ta * dBd < tb * rd + 0.5 * tb * tb * dBd else tb
            p, res = axpy(tau, d, z), axpy(tau, Bd, r)
            return result(p, res, gz + tau * vdot(g, d), radius * radius, k + 1,
                          "negative_curvature", True)
        alpha = ry / dBd
        zMz_next = zMz + 2.0 * alpha * zMd + alpha * alpha * dMd
        if zMz_next >= radius * radius:
            _, tb = boundary_taus(zMz, zMd, dMd, radius)
            p, res = axpy(tb, d, z), axpy(tb, Bd, r)
            return result(p, res, gz + tb * vdot(g, d), radius * radius, k + 1, "boundary",
                          True)
        gz += alpha * vdot(g, d)
        z = axpy(alpha, d, z)
        Mz = axpy(alpha, Md, Mz)
        r = axpy(alpha, Bd, r)
        y = list(apply(r))
        ry_next = vdot(r, y)
        zMz = vdot(z, Mz)
        if math.sqrt(max(ry_next, 0.0)) < tol:
            return result(z, r, gz, zMz, k + 1, "converged", False)
        if not (ry_next > 0.0 and finite(ry_next)):
            stop = "nonfinite" if not finite(ry_next) else "indefinite_preconditioner"
            return result(z, r, gz, zMz, k + 1, stop, False)
        beta = ry_next / ry
        d = axpy(beta, d, scale(-1.0, y))
        Md = axpy(beta, Md, scale(-1.0, r))
        ry = ry_next
    return result(z, r, gz, zMz, max_iters, "max_iters", False)


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
                                   min=0.0)
    max_radius: float = option(1000.0, "largest radius Δ̂", min=0.0)
    min_radius: float = option(0.0, "the radius never shrinks below this", min=0.0)
    eta: float = option(0.15, "accept the step if ρ > eta (N&W Alg. 4.1: eta ∈ [0, ¼))",
                        min=0.0, max=0.25)
    shrink_threshold: float = option(0.25, "ρ below this shrinks the radius", min=0.0,
                                     max=1.0)
    shrink_factor: float = option(0.25, "Δ ← shrink_factor·Δ on shrink", min=0.0, max=1.0)
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
        x = axpy(alpha, d, x)
        r = axpy(-alpha, Ad, r)
        rr_next = vdot(r, r)
        if math.sqrt(rr_next) <= rtol * bnorm:
            break
        d = axpy(rr_next / rr, d, r)
        rr = rr_next
    return x, products
