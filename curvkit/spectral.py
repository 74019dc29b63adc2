"""Spectra of curvature operators: top eigenpairs, trace, spectral density.

All three work on any :class:`~curvkit.linops.LinearOperator` (``est.linearize(batch)``
for the Hessian, GGN, empirical Fisher or Fisher), only through products ``op @ v``; the
Krylov arithmetic is in float64 on the operator's device, whatever the operator's dtype.

* :func:`top_eigenvalues`: Lanczos with full reorthogonalisation (twice, Gram-Schmidt
  "twice is enough"), stopped when the wanted Ritz pairs (θ_i, y_i) have residual
  ‖A y_i − θ_i y_i‖ = β_m |s_{m,i}| ≤ max(tol·|θ_i|, ε^(2/3)‖T‖) — ARPACK's criterion, so
  ``tol`` means what it means for ``scipy.sparse.linalg.eigsh``. No restarts: the Krylov
  basis grows up to ``max_iter`` vectors (P × max_iter float64). Like any single-vector
  Krylov method it finds one copy of a repeated eigenvalue (the zero eigenvalues of a
  rank-deficient GGN or Fisher among them).
* :func:`trace`: Hutch++ (Meyer, Musco, Musco, Woodruff 2021): with m = ``samples``
  products, Q = orth(A S) for m/3 sign vectors S, then
  tr(A) ≈ tr(Qᵀ A Q) + (3/m) tr(Gᵀ (I − QQᵀ) A (I − QQᵀ) G) for m/3 more sign vectors G;
  exact when Q spans A's range (rank ≤ m/3).
* :func:`density`: stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao 2019; Lin,
  Saad, Yang 2016): per probe v (random signs, ‖v‖ = 1) ``steps`` Lanczos steps give nodes
  θ_j (eigenvalues of the tridiagonal T) and weights τ_j = (e_1ᵀ s_j)², a Gauss quadrature
  of vᵀ f(A) v; the density is the probe average of Σ_j τ_j N(t; θ_j, σ²), which integrates
  to 1 and has E[Σ_j τ_j θ_j^p] = tr(A^p)/P for p < 2·steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from curvkit.linops import LinearOperator

__all__ = ["top_eigenvalues", "trace", "density", "SpectralDensity", "lanczos"]

_EPS23 = torch.finfo(torch.float64).eps ** (2 / 3)
_WHICH = {"LA": "LA", "largest": "LA", "SA": "SA", "smallest": "SA", "LM": "LM",
          "magnitude": "LM"}


def _product(op: LinearOperator) -> tuple[Callable[[Tensor], Tensor], int, torch.device]:
    """(x ↦ A x in float64, P, the device of the Krylov vectors: the operator's, or the CPU
    for MPS, which has no float64; products still run on the operator's device)."""
    n = op.shape[0]
    device = torch.device("cpu") if op.device.type == "mps" else op.device
    return (lambda x: (op @ x).to(torch.float64)), n, device


def _signs(n: int, k: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """(n, k) Rademacher ±1 in float64 (drawn on the CPU generator: reproducible on any
    device)."""
    r = torch.randint(0, 2, (n, k), generator=gen, dtype=torch.int8)
    return (2.0 * r.to(torch.float64) - 1.0).to(device)


def lanczos(matvec: Callable[[Tensor], Tensor], v0: Tensor, steps: int,
            stop: Callable[[Tensor, Tensor, float], bool] | None = None
            ) -> tuple[Tensor, Tensor, Tensor, float]:
    """Lanczos with full reorthogonalisation from ``v0`` (n,), float64.

    Returns (alpha (m,), beta (m−1,), Q (n, m), β_m) with T = tridiag(beta, alpha, beta) =
    Qᵀ A Q; stops after ``steps`` steps, at an invariant subspace (β ≈ 0: then T's
    eigenvalues are exact eigenvalues of A), or when ``stop(alpha, beta, β_m)`` is true.
    """
    n = v0.numel()
    steps = max(1, min(steps, n))
    Q = torch.zeros(n, steps, dtype=torch.float64, device=v0.device)
    alphas: list[float] = []
    betas: list[float] = []
    q = v0 / v0.norm()
    beta_last = 0.0
    scale = 0.0
    for j in range(steps):
        Q[:, j] = q
        w = matvec(q)
        alpha = float(q @ w)
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * Q[:, j - 1]
        basis = Q[:, :j + 1]
        for _ in range(2):  # reorthogonalise twice against the whole basis
            w = w - basis @ (basis.T @ w)
        beta = float(w.norm())
        alphas.append(alpha)
        scale = max(scale, abs(alpha), beta)
        beta_last = beta
        m = j + 1
        if beta <= 1e-13 * max(scale, 1e-300) or m == steps:
            break
        # the tridiagonal problem is tiny (m × m): it lives on the host, whatever the vectors'
        # device
        a_t = torch.tensor(alphas, dtype=torch.float64, device="cpu")
        b_t = torch.tensor(betas, dtype=torch.float64, device="cpu")
        if stop is not None and stop(a_t, b_t, beta):
            break
        betas.append(beta)
        q = w / beta
    m = len(alphas)
    return (torch.tensor(alphas, dtype=torch.float64, device="cpu"),
            torch.tensor(betas[:m - 1], dtype=torch.float64, device="cpu"), Q[:, :m], beta_last)


def _tridiag(alpha: Tensor, beta: Tensor) -> Tensor:
    T = torch.diag(alpha)
    if beta.numel():
        T = T + torch.diag(beta, 1) + torch.diag(beta, -1)
    return T


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    if which == "LA":
        order = torch.argsort(theta, descending=True)
    elif which == "SA":
        order = torch.argsort(theta)
    else:
        order = torch.argsort(theta.abs(), descending=True)
    return order[:k]


def top_eigenvalues(op: LinearOperator, k: int = 1, *, which: str = "LA",
                    tol: float = 1e-6, max_iter: int | None = None, seed: int = 0
                    ) -> tuple[Tensor, Tensor]:
    """The k extreme eigenpairs of a symmetric operator by Lanczos.

    ``which``: "LA" / "largest" (algebraic, default), "SA" / "smallest", "LM" /
    "magnitude". ``tol``: relative residual of each pair (as ``eigsh``'s ``tol``).
    Returns ``(values (k,), vectors (P, k))`` in float64 on the operator's device, values
    ordered as ``which`` ranks them (largest first for "LA"), vectors orthonormal.
    """
    if not getattr(op, "symmetric", True):
        raise ValueError("top_eigenvalues: the operator is not symmetric; Lanczos needs a "
                         "symmetric operator")
    if which not in _WHICH:
        raise ValueError(f"which: expected one of {', '.join(_WHICH)}, got {which!r}")
    which = _WHICH[which]
    mv, n, device = _product(op)
    if not 1 <= k <= n:
        raise ValueError(f"k: must be in [1, {n}] (the operator is {n}×{n}), got {k}")
    if not tol > 0:
        raise ValueError(f"tol: must be > 0, got {tol}")
    max_iter = min(n, max_iter if max_iter is not None else max(300, 4 * k))
    if max_iter < k:
        raise ValueError(f"max_iter: must be >= k = {k}, got {max_iter}")
    gen = torch.Generator().manual_seed(int(seed))
    v0 = torch.randn(n, generator=gen, dtype=torch.float64).to(device)

    def converged(alpha: Tensor, beta: Tensor, beta_m: float) -> bool:
        if alpha.numel() < k:
            return False
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        idx = _select(theta, k, which)
        resid = beta_m * S[-1, idx].abs()
        # ARPACK's test: relative to the value, with a floor ε^(2/3)‖T‖ for values near 0
        floor = _EPS23 * float(theta.abs().max())
        return bool((resid <= (tol * theta[idx].abs()).clamp_min(floor)).all())

    alpha, beta, Q, _ = lanczos(mv, v0, max_iter, converged)
    theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
    if theta.numel() < k:
        # an invariant subspace smaller than k (e.g. a rank-deficient operator from a start
        # vector inside it): the rest of the wanted spectrum is 0 on its complement
        raise ValueError(f"top_eigenvalues: the Krylov space closed at dimension "
                         f"{theta.numel()} < k = {k}; lower k")
    idx = _select(theta, k, which)
    vectors = Q @ S[:, idx].to(Q.device)
    return theta[idx].to(device), vectors


def trace(op: LinearOperator, samples: int = 30, *, seed: int = 0) -> float:
    """Hutch++ estimate of tr(A) from ``samples`` products (at least 3)."""
    if samples < 3:
        raise ValueError(f"samples: Hutch++ needs at least 3 products, got {samples}")
    mv, n, device = _product(op)
    gen = torch.Generator().manual_seed(int(seed))
    s = samples // 3
    g = samples - 2 * s
    S = _signs(n, s, gen, device)
    G = _signs(n, g, gen, device)

    def apply(M: Tensor) -> Tensor:
        return torch.stack([mv(M[:, j]) for j in range(M.shape[1])], dim=1)

    Q, _ = torch.linalg.qr(apply(S))
    t_low = float(torch.trace(Q.T @ apply(Q)))
    G = G - Q @ (Q.T @ G)
    t_rest = float((G * apply(G)).sum()) / g
    return t_low + t_rest


@dataclass
class SpectralDensity:
    """A smoothed spectral density: ``values[i]`` ≈ density at ``grid[i]`` (integrates to
    1), and the quadrature it is made of: per probe ``nodes`` (Ritz values) and ``weights``
    (each probe's weights sum to 1)."""

    grid: Tensor
    values: Tensor
    nodes: list[Tensor]
    weights: list[Tensor]
    sigma: float

    def moment(self, p: int) -> float:
        """Σ_j τ_j θ_j^p averaged over probes: an estimate of tr(A^p) / P."""
        return float(sum((w * t ** p).sum() for t, w in zip(self.nodes, self.weights))
                     / len(self.nodes))


def density(op: LinearOperator, *, probes: int = 4, steps: int = 40, points: int = 256,
            sigma: float | None = None, seed: int = 0) -> SpectralDensity:
    """Stochastic Lanczos quadrature of the spectral density of a symmetric operator.

    ``probes`` random-sign start vectors, ``steps`` Lanczos steps each (``steps`` products
    per probe), Gaussian smoothing of width ``sigma`` (default 1% of the spectral range
    found) evaluated on ``points`` grid points spanning the nodes ± 3σ.
    """
    if probes < 1 or steps < 1 or points < 2:
        raise ValueError(f"density: probes >= 1, steps >= 1, points >= 2 needed, got "
                         f"{probes}, {steps}, {points}")
    mv, n, device = _product(op)
    gen = torch.Generator().manual_seed(int(seed))
    nodes, weights = [], []
    for _ in range(probes):
        v = _signs(n, 1, gen, device)[:, 0]
        alpha, beta, _, _ = lanczos(mv, v, steps)
        theta, S = torch.linalg.eigh(_tridiag(alpha, beta))
        nodes.append(theta)
        weights.append(S[0] ** 2)
    lo = min(float(t.min()) for t in nodes)
    hi = max(float(t.max()) for t in nodes)
    if sigma is None:
        span = hi - lo
        sigma = 0.01 * span if span > 0 else max(1e-3 * abs(hi), 1e-8)
    if not sigma > 0:
        raise ValueError(f"sigma: must be > 0, got {sigma}")
    grid = torch.linspace(lo - 3 * sigma, hi + 3 * sigma, points, dtype=torch.float64)
    values = torch.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for t, w in zip(nodes, weights):
        z = (grid[:, None] - t[None, :]) / sigma
        values += (w[None, :] * torch.exp(-0.5 * z * z)).sum(1) * norm
    return SpectralDensity(grid, values / probes, nodes, weights, float(sigma))
