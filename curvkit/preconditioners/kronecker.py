"""``kronecker``: K-FAC (Martens & Grosse 2015), a Kronecker-factored block per layer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvkit import distributed
from curvkit.estimators.base import layer_matrix, split_layer_matrix
from curvkit.options import option
from curvkit.params import all_finite, check_like
from curvkit.parts import KRONECKER
from curvkit.preconditioners._layerwise import LayerwiseKronecker
from curvkit.preconditioners._running import (
    blend,
    damped_copy,
    ema_weight,
    nan_like,
    psd_inverse,
    working_dtype,
)


class KroneckerPreconditioner(LayerwiseKronecker):
    """K-FAC: per Linear/Conv2d layer the curvature block of vec_r([W | b]) is G ⊗ A.

    With Ḡ, Ā the running averages (``ema``) of the factors the estimator's ``kronecker``
    capability returns (see :class:`~curvkit.estimators.base.KroneckerFactors`: W̃ = [W | b]
    is (d_out, d_in [+1]), vec_r row-major, block ≈ G ⊗ A) and M = ∇W̃ the layer's direction
    as a matrix, the preconditioned direction is, for δ = ``damping``:

    * ``damping_form = "factored"`` (Tikhonov on each factor, Martens & Grosse §6.3)::

          (Ḡ + (√δ/π) I)⁻¹ M (Ā + π √δ I)⁻¹ = [(Ḡ + √δ/π I) ⊗ (Ā + π√δ I)]⁻¹ vec_r(M)

      with π = 1, or with ``pi_correction`` π = √((tr Ā / dim Ā) / (tr Ḡ / dim Ḡ))
      (π = 1 when a trace is zero or not finite). The two inverses are computed by
      Cholesky (``inverse = "cholesky"``, eigh fallback if a damped factor is not positive
      definite) or by eigendecomposition (``inverse = "eigh"``); both give the same matrix.
      A factor is kept as its Cholesky factor and applied by triangular solves instead
      (same result to round-off) where that is cheaper: when each factorisation is applied
      once (the solver's ``applications_per_step`` times the steps between inversions is
      1: ``direct`` with factors inverted every step), and for a factor of size n ≥ 256
      and ≥ 4× the other (a 10-class head on 1024 inputs skips the n³ of forming
      (Ā + π√δ I)⁻¹).
    * ``damping_form = "exact"`` (needs ``inverse = "eigh"``): the damped Kronecker product
      itself, (Ḡ ⊗ Ā + δ I)⁻¹ vec_r(M) = U_G [(U_Gᵀ M U_A) ⊘ (λ_G λ_Aᵀ + δ)] U_Aᵀ, with the
      factors' eigenvalues clipped at 0 (they are PSD up to round-off).

    Factors are measured every ``update_every`` steps and inverted every ``invert_every``
    steps (a multiple of ``update_every``; 0, the default, inverts at every update), in
    ``inv_dtype`` (float32 for a bfloat16 model under ``"auto"``); the averages are kept in
    that dtype too and directions are cast back to the parameter dtype. Parameters no
    factor covers (LayerNorm, Embedding, custom modules, …) use ``fallback``:
    ``"diagonal"`` → d / (max(ŝ, 0) + δ) with ŝ the running average of the estimator's
    diagonal, ``"identity"`` → d unchanged; ``structures()`` says which.
    """

    name = "kronecker"
    needs = frozenset({KRONECKER})

    @dataclass
    class Options:
        damping: float = option(1e-3, "Tikhonov damping δ (see damping_form)", min=0.0)
        pi_correction: bool = option(False, "factored damping split between the factors by "
                                            "π (Martens & Grosse §6.3)")
        inverse: Literal["cholesky", "eigh"] = option(
            "cholesky", "how factors are inverted: Cholesky or eigendecomposition")
        damping_form: Literal["factored", "exact"] = option(
            "factored", "factored: (G + √δ/π I) ⊗ (A + π√δ I); exact: G ⊗ A + δ I "
                        "(eigen form, needs inverse = 'eigh')")
        ema: float = option(0.95, "running average of the factors; 0 = no averaging",
                            min=0.0, max=1.0)
        bias_correction: bool = option(True, "divide the average by 1 − emaᵗ as Adam does")
        update_every: int = option(1, "measure the factors every T steps", min=1)
        invert_every: int = option(0, "invert the factors every T steps (a multiple of "
                                      "update_every); 0 = at every update", min=0)
        inv_dtype: Literal["auto", "float32", "float64"] = option(
            "auto", "dtype of factor averages and inversions; auto = float32 for "
                    "bfloat16/float16 models, the model dtype otherwise")
        state_dtype: Literal["inherit", "bfloat16", "float16", "float32", "float64"] = option(
            "inherit", "dtype the factor averages and stored inverses are kept in; inherit = "
                       "inv_dtype's. Inversion runs in the lowest dtype torch's linear "
                       "algebra supports at or above it (float32 for bfloat16/float16) and "
                       "is rounded back")
        fallback: Literal["diagonal", "identity"] = option(
            "diagonal", "structure of parameters no Kronecker factor covers")
        distribute_inversions: bool = option(
            False, "data parallel: invert layer k on rank k mod world size only and "
                   "broadcast the inverse (kfac-pytorch's layer assignment)")

        def __post_init__(self) -> None:
            if self.ema >= 1.0:
                raise ValueError("ema: must be < 1 (ema = 1 would never take in a statistic)")
            if self.invert_every and self.invert_every % self.update_every != 0:
                raise ValueError(f"invert_every: must be a multiple of update_every "
                                 f"({self.update_every}), got {self.invert_every}")
            if self.damping_form == "exact" and self.inverse != "eigh":
                raise ValueError("damping_form: 'exact' needs inverse = 'eigh' (the damped "
                                 "Kronecker product is inverted through the factors' "
                                 "eigendecompositions)")
            if self.damping_form == "exact" and self.pi_correction:
                raise ValueError("pi_correction: only applies to damping_form = 'factored'")

    def __init__(self, model: nn.Module, options: Options | None = None) -> None:
        super().__init__(model, options)
        self._last: dict[str, Any] = {}

    # ------------------------------------------------------------------ update
    def update(self, estimator: Any, batch: Any, grads: Sequence[Tensor]) -> None:
        o = self.options
        dtypes = {n: p.dtype for n, p in self.named_params}
        found = estimator.kronecker(batch)
        layers = self._coverage(found.values())

        count = int(self.state.get("updates", 0)) + 1
        w = ema_weight(count, o.ema, o.bias_correction)
        old = self.state.get("factors", {})
        factors: dict[str, dict[str, Tensor]] = {}
        for kf in found.values():
            dt = self._state_dtype(dtypes[kf.params[0]])
            prev = old.get(kf.module, {})
            factors[kf.module] = {
                "A": blend(prev.get("A"), kf.A.detach().to(dt), w),
                "G": blend(prev.get("G"), kf.G.detach().to(dt), w)}

        covered = {p for names in layers.values() for p in names}
        fallback_names = [n for n, _ in self.named_params if n not in covered]
        if o.fallback == "diagonal" and fallback_names:
            diag = estimator.diagonal(batch)
            check_like(diag, self.params, what=f"{type(estimator).__name__}.diagonal(batch)")
            by_name = dict(zip((n for n, _ in self.named_params), diag))
            prev_diag = self.state.get("fallback_diag", {})
            self.state["fallback_diag"] = {
                n: blend(prev_diag.get(n), by_name[n].detach().to(self._state_dtype(dtypes[n])),
                         w)
                for n in fallback_names}

        # invert on updates 1, 1 + k, 1 + 2k, … with k = invert_every / update_every, i.e. on
        # the steps divisible by invert_every; a layer seen for the first time is inverted now
        period = max(o.invert_every // o.update_every, 1)
        due = (count - 1) % period == 0
        inverses = dict(self.state.get("inverses", {}))
        todo = [mod for mod in factors if due or mod not in inverses]
        pis = self._invert_layers(todo, factors, inverses, self._applied_once())
        self.state["inverses"] = {m: inverses[m] for m in factors}
        self.state["factors"] = factors
        self.state["layers"] = layers
        self.state["updates"] = count
        self._last = {"kfac_layers": len(factors), "kfac_inverted": len(pis),
                      "kfac_fallback_params": len(fallback_names)}
        if pis and o.pi_correction:
            self._last["kfac_pi_mean"] = sum(pis.values()) / len(pis)

    def _applied_once(self) -> bool:
        """True if every factorisation is applied exactly once before the next one: the
        solver applies P⁻¹ once per step (``applications_per_step``, told by the optimizer)
        and the factors are inverted every step. Then two triangular solves per factor
        cost less than forming the inverse and one product with it (measured on 1024 × 1025
        and 1024 × 785 layers, one thread: 81 vs 101 ms and 54 vs 72 ms); from two
        applications on, the inverse's products (2·n²·m at GEMM speed) win."""
        per_step = self.applications_per_step
        o = self.options
        return per_step == 1 and (o.invert_every or o.update_every) == 1

    def _invert_layers(self, todo: list[str], factors: dict[str, dict[str, Tensor]],
                       inverses: dict[str, Any], solve_all: bool = False
                       ) -> dict[str, float]:
        """Invert the factors of the layers in ``todo`` into ``inverses``; returns their π.

        With ``distribute_inversions`` under several ranks, layer k (in the estimator's
        module order, the same on every rank) is inverted by rank k mod world size alone
        and broadcast: the factors are identical on all ranks (all-reduced), so every rank
        ends with the inverse one process would have computed.
        """
        pis: dict[str, float] = {}
        if not (self.options.distribute_inversions and distributed.active()):
            for mod in todo:
                inverses[mod], pis[mod] = self._invert(factors[mod]["A"], factors[mod]["G"],
                                                       solve_all=solve_all)
            return pis
        world, me = distributed.world_size(), distributed.rank()
        for k, mod in enumerate(todo):
            A, G = factors[mod]["A"], factors[mod]["G"]
            owner = k % world
            if owner == me:
                # explicit inverses only: the receivers' buffers must know the form
                inv, pi = self._invert(A, G, factor_form=False)
            else:  # receive buffers shaped like the owner's result
                inv, pi = self._inverse_buffers(A, G), 0.0
            pi_t = distributed.count_tensor(pi, A)  # on the factors' (= the group's) device
            distributed.broadcast_([*inv.values(), pi_t], src=owner)
            inverses[mod], pis[mod] = inv, float(pi_t)
        return pis

    def _inverse_buffers(self, A: Tensor, G: Tensor) -> dict[str, Tensor]:
        if self.options.damping_form == "exact":
            return {"QA": torch.empty_like(A), "lA": torch.empty_like(A[0]),
                    "QG": torch.empty_like(G), "lG": torch.empty_like(G[0])}
        return {"A": torch.empty_like(A), "G": torch.empty_like(G)}

    def _state_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        o = self.options
        if o.state_dtype == "inherit":
            return working_dtype(param_dtype, o.inv_dtype)
        return getattr(torch, o.state_dtype)

    def _invert(self, A: Tensor, G: Tensor, factor_form: bool = True, solve_all: bool = False
                ) -> tuple[dict[str, Tensor], float]:
        """The inverses in the factors' dtype, computed in :func:`linalg_dtype` of it
        (``factor_form``: a factor may be kept as its Cholesky factor, every one with
        ``solve_all``, see :meth:`_invert_in`; only where the stored dtype is the one linear
        algebra runs in)."""
        work = linalg_dtype(A.dtype, A.device)
        if work == A.dtype:
            return self._invert_in(A, G, factor_form, solve_all)
        inv, pi = self._invert_in(A.to(work), G.to(work), False)
        return {k: v.to(A.dtype) for k, v in inv.items()}, pi

    def _invert_in(self, A: Tensor, G: Tensor, factor_form: bool = False,
                   solve_all: bool = False) -> tuple[dict[str, Tensor], float]:
        """{"A": (A + π√δ I)⁻¹, "G": (G + √δ/π I)⁻¹} (factored damping), or the eigen form.

        With ``factor_form`` and ``inverse = "cholesky"``, a factor is kept as its Cholesky
        factor L ("LA"/"LG") and applied by two triangular solves (see :meth:`apply`) when
        ``solve_all`` (each factorisation is applied once, :meth:`_applied_once`) or when it
        has size n ≥ 256 and is at least 4× the other one (size m: the columns it is
        applied to): forming the inverse costs ~n³ (Cholesky + ``cholesky_inverse``), the
        solves n²m — the flops of one product with the explicit inverse. A thin layer
        (the 10-class head on 1024 inputs) thus skips the n³ of its big factor. A damped
        factor that is not positive definite falls back to the explicit inverse."""
        o = self.options
        # one sum per factor, not an element-wise scan (all_finite): a NaN or inf entry
        # makes the sum non-finite, only then is the exact check run
        if not all_finite([A, G]):
            if o.damping_form == "exact":
                return {"QA": nan_like(A), "lA": nan_like(A[0]), "QG": nan_like(G),
                        "lG": nan_like(G[0])}, 1.0
            return {"A": nan_like(A), "G": nan_like(G)}, 1.0
        if o.damping_form == "exact":
            lA, QA = torch.linalg.eigh(A)
            lG, QG = torch.linalg.eigh(G)
            return {"QA": QA, "lA": lA.clamp_min(0.0), "QG": QG, "lG": lG.clamp_min(0.0)}, 1.0
        pi = pi_factor(A, G) if o.pi_correction else 1.0
        root = math.sqrt(o.damping)
        res: dict[str, Tensor] = {}
        for key, X, other, damp in (("A", A, G, pi * root), ("G", G, A, root / pi)):
            n = X.shape[0]
            if factor_form and o.inverse == "cholesky" and (
                    solve_all or (n >= 256 and n >= 4 * other.shape[0])):
                L, info = torch.linalg.cholesky_ex(damped_copy(X, damp))
                if int(info) == 0:
                    res["L" + key] = L
                    continue
            # factors are PSD, so "negative" never matters beyond round-off: clip
            res[key], _ = psd_inverse(X, damp, o.inverse, "clip", check_finite=False)
        return res, pi

    # ------------------------------------------------------------------ apply
    def apply(self, direction: Sequence[Tensor]) -> list[Tensor]:
        inverses = self.state.get("inverses")
        if inverses is None:
            raise RuntimeError("preconditioner 'kronecker': apply() before the first update()")
        check_like(direction, self.params, what="direction")
        names = [n for n, _ in self.named_params]
        index = {n: i for i, n in enumerate(names)}
        out: list[Tensor | None] = [None] * len(direction)
        damping = self.options.damping
        for mod, pnames in self.state["layers"].items():
            inv = inverses[mod]
            ds = [direction[index[p]] for p in pnames]
            dt = next(iter(inv.values())).dtype
            M = layer_matrix(ds).to(dt)
            if "LA" in inv or "LG" in inv:
                # Cholesky factors (see _invert_in): G⁻¹ M A⁻¹ by triangular solves
                left = _solve_left(inv["LG"], M) if "LG" in inv else inv["G"] @ M
                R = _solve_right(left, inv["LA"]) if "LA" in inv else left @ inv["A"]
            elif "QA" in inv:
                V = inv["QG"].T @ M @ inv["QA"]
                V = V / (torch.outer(inv["lG"], inv["lA"]) + damping)
                R = inv["QG"] @ V @ inv["QA"].T
            elif M.requires_grad:
                R = torch.einsum("ij,jk,kl->il", inv["G"], M, inv["A"])
            else:
                # G M A as Rᵀ = Aᵀ (Mᵀ Gᵀ), the chain einsum runs (BLAS ~10 % faster here
                # than G @ M @ A: the products' rows are then the 1024 outputs, not 1025
                # columns), written through Rᵀ's view straight into a row-major R: the same
                # numbers as einsum, without the transposing copy
                R = torch.empty(M.shape, dtype=M.dtype, device=M.device)
                torch.mm(inv["A"].mT, M.mT @ inv["G"].mT, out=R.mT)
            # the direction's readers (the finite check, momentum, p.add_) are row-major like
            # the parameters: a column-major R (the solves, the eigen form) is copied once
            # here, which cost less than their strided reads (MLP 784-1024-1024-10: 5 %)
            R = R.contiguous()
            for p, r in zip(pnames, split_layer_matrix(R, ds)):
                out[index[p]] = r
        diag = self.state.get("fallback_diag", {})
        for i, n in enumerate(names):
            if out[i] is not None:
                continue
            d = direction[i]
            if self.options.fallback == "diagonal":
                s = diag.get(n)
                if s is None:
                    raise RuntimeError(f"preconditioner 'kronecker': no diagonal statistic for "
                                       f"fallback parameter {n!r}")
                out[i] = (d.to(s.dtype) / (s.clamp_min(0.0) + damping)).to(d.dtype)
            else:
                out[i] = d
        return out  # type: ignore[return-value]

    def info(self) -> dict[str, Any]:
        return dict(self._last)


def _solve_right(M: Tensor, L: Tensor) -> Tensor:
    """M (L Lᵀ)⁻¹ for a lower-triangular Cholesky factor L (as torch returns it), M (r, n).

    Two right-side triangular solves, M L⁻ᵀ then · L⁻¹: at near GEMM speed here (one
    thread; ``cholesky_solve`` on the transposed M took 2.5× as long). With fewer than 32
    rows the right-side solve is the slow one (r = 10, n = 1153: 2.7 vs 0.8 ms), so the
    left-side solves L⁻ᵀ (L⁻¹ Mᵀ) run instead."""
    solve = torch.linalg.solve_triangular
    if M.shape[0] < 32:
        return solve(L.mT, solve(L, M.mT, upper=False), upper=True).mT
    return solve(L, solve(L.mT, M, upper=True, left=False), upper=False, left=False)


def _solve_left(L: Tensor, M: Tensor) -> Tensor:
    """(L Lᵀ)⁻¹ M = (Mᵀ (L Lᵀ)⁻¹)ᵀ through :func:`_solve_right` on the transposed view
    (left-side solves on M were ~1.5× slower for many columns)."""
    return _solve_right(M.mT, L).mT


_LINALG_DTYPE: dict[tuple[torch.dtype, str], torch.dtype] = {}


def linalg_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The lowest dtype at or above ``dtype`` in which torch's eigh and Cholesky run on
    ``device`` (probed once per dtype and device type): float32 for bfloat16 and float16
    (not implemented in torch 2.x), ``dtype`` itself for float32/float64."""
    key = (dtype, device.type)
    if key not in _LINALG_DTYPE:
        found = torch.float64
        for cand in (dtype, torch.float32, torch.float64):
            if cand.itemsize < dtype.itemsize:
                continue
            try:
                eye = torch.eye(2, dtype=cand, device=device)
                torch.linalg.cholesky_ex(eye)
                torch.linalg.eigh(eye)
            except (RuntimeError, NotImplementedError):
                continue
            found = cand
            break
        _LINALG_DTYPE[key] = found
    return _LINALG_DTYPE[key]


def pi_factor(A: Tensor, G: Tensor) -> float:
    """π = √((tr A / dim A) / (tr G / dim G)) (Martens & Grosse §6.3); 1 if undefined."""
    ta = float(torch.diagonal(A).sum()) / A.shape[0]
    tg = float(torch.diagonal(G).sum()) / G.shape[0]
    if not (ta > 0 and tg > 0 and math.isfinite(ta) and math.isfinite(tg)):
        return 1.0
    return math.sqrt(ta / tg)


__all__ = ["KroneckerPreconditioner", "linalg_dtype", "pi_factor"]
