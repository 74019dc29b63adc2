"""``lie_group``: SINGD (Lin et al., "Structured Inverse-Free Natural Gradient Descent", 2024).

Per Linear/Conv2d layer the curvature block over vec_r(W̃), W̃ = [W | b] (d_out, d_K), is
G ⊗ A (the estimator's ``kronecker`` capability; the factors' square roots from its optional
``kronecker_roots`` when offered, which saves forming A and G). Instead of inverting the
damped factors, SINGD keeps two structured factors K (d_K×d_K) and C (d_out×d_out) with

    (A + λ·I)⁻¹ ≈ K Kᵀ,     (G + λ·I)⁻¹ ≈ C Cᵀ   (up to how λ is shared, see below),

and moves them multiplicatively on a matrix Lie group, so they stay invertible and
structured without a single inversion or decomposition (it runs in bfloat16).

Over 500 lines because SINGD's update and its state guard are one piece: the update is
computed layer by layer and each layer's new K, C, m_K, m_C are checked and written into
the existing tensors before the next layer is computed (no copy of the whole state is
held, see ``guards_state``), so the per-layer step, the fallback's update and the commit
share their bookkeeping; the structures themselves live in :mod:`curvkit.structures`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvkit.estimators.base import (
    KroneckerFactors,
    KroneckerRoots,
    layer_matrix,
    split_layer_matrix,
)
from curvkit.options import option, part_option
from curvkit.params import all_finite, check_like
from curvkit.parts import KRONECKER, KRONECKER_ROOTS
from curvkit.preconditioners._layerwise import LayerwiseKronecker
from curvkit.registry import get_registry
from curvkit.structures.base import Structure

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class LieGroupPreconditioner(LayerwiseKronecker):
    """SINGD: inverse-free structured Kronecker factors updated on a matrix Lie group.

    Every ``update_every`` steps, with A, G the layer's Kronecker factors from the estimator,
    Π the projection onto each factor's structure and tr̄(X) = tr(X)/dim X::

        H_K = Π(Kᵀ A K),                      H_C = Π(Cᵀ G C)
        m_K ← α₁ m_K + s·( tr̄(H_C)·H_K + λ·tr̄(Π(CᵀC))·Π(KᵀK) − I )
        m_C ← α₁ m_C + s·( tr̄(H_K)·H_C + λ·tr̄(Π(KᵀK))·Π(CᵀC) − I )
        K ← K (I − β_K m_K),                  C ← C (I − β_C m_C)

    with α₁ = ``alpha1``, λ = ``damping``, s = ½ (s = ½(1 − α₁) and β = β₁ / max(1,
    max|m|) with ``normalize_lr_cov``; otherwise β = β₁ = ``lr_cov``). At a fixed point
    (m_K = 0, dense K) K Kᵀ = (tr̄(CᵀGC)·A + λ·tr̄(CᵀC)·I)⁻¹ and symmetrically for C.
    ``kfac_like`` replaces the traces by 1 (and needs α₁ = 0), the IKFAC update with fixed
    point K Kᵀ = (A + λI)⁻¹, C Cᵀ = (G + λI)⁻¹. ``apply`` maps a layer's direction
    M (d_out, d_K) to C Cᵀ M K Kᵀ. K and C start at ``init_scale``·I.

    Structures (``structures`` = [K's, C's]): see :mod:`curvkit.structures`. Parameters no
    Kronecker factor covers use ``fallback``: ``"identity"`` (unchanged) or ``"diagonal"``:
    the same update with K = diag(k) on the estimator's diagonal h and C ≡ 1,
    m ← α₁ m + s(k²(h + λ) − 1), k ← k(1 − β m), direction ↦ k² d.
    """

    name = "lie_group"
    needs = frozenset({KRONECKER})
    # update() checks each layer's new K, C, m_K, m_C before they replace the old ones
    guards_state = True

    @dataclass
    class Options:
        lr_cov: float = option(1e-2, "β₁: step size of the factor updates K ← K(I − β₁ m_K)",
                               min=0.0)
        alpha1: float = option(0.5, "α₁: Riemannian momentum of m_K, m_C", min=0.0)
        damping: float = option(1e-3, "λ: damping inside the factor updates", min=0.0)
        update_every: int = option(10, "T: update K, C every T steps", min=1)
        structures: tuple[str | dict, str | dict] = part_option(
            "structure", ("dense", "dense"),
            "structures of K (input side, d_in [+1]) and C (output side), each a registered "
            "structure's name or a table with its options, e.g. "
            "[{name = \"block_diagonal\", block_size = 16}, \"diagonal\"]")
        kfac_approx: Literal["expand", "reduce"] | None = option(
            None, "K-FAC flavour for weight-sharing layers, as singd names it; unset = the "
                  "estimator's kfac_approx option, set = overrides it for this structure")
        kfac_like: bool = option(False, "IKFAC-like update: the trace terms coupling K and C "
                                        "are replaced by 1 (needs alpha1 = 0)")
        normalize_lr_cov: bool = option(False, "normalized steps: β = lr_cov / max(1, max|m|) "
                                               "and s = (1 − α₁)/2")
        exp_order: int = option(1, "truncation of the exponential map in K ← K·exp(−βm): "
                                   "1 = I − βm (SINGD), 2 = I − βm + β²m²/2, non-singular "
                                   "whenever m has a real spectrum (1 − x + x²/2 > 0)",
                                min=1, max=2)
        init_scale: float = option(1.0, "K and C start as init_scale·I (first "
                                        "preconditioner init_scale⁴·I)", min=0.0,
                                   min_exclusive=True)
        preconditioner_dtype: tuple[str, str] = option(
            ("param", "param"), "dtypes of (K, m_K) and (C, m_C): 'param' (the weight's) or "
                                + ", ".join(DTYPES))
        fallback: Literal["identity", "diagonal"] = option(
            "identity", "structure of parameters no Kronecker factor covers")

        def __post_init__(self) -> None:
            for i, d in enumerate(self.preconditioner_dtype):
                if d != "param" and d not in DTYPES:
                    raise ValueError(f"preconditioner_dtype[{i}]: expected 'param' or one of "
                                     f"{', '.join(DTYPES)}, got {d!r}")
            if self.kfac_like and self.alpha1 != 0.0:
                raise ValueError(f"kfac_like: the IKFAC-like update has no Riemannian "
                                 f"momentum; set alpha1 = 0 (got {self.alpha1})")
            if self.init_scale <= 0.0:
                raise ValueError("init_scale: must be > 0 (K and C must start invertible)")

    def __init__(self, model: nn.Module, options: Options | None = None) -> None:
        super().__init__(model, options)
        o = self.options
        registry = get_registry()
        where = self.config_path or "lie_group"
        sides = [registry.part_options("structure", s, f"{where}.structures[{i}]")
                 for i, s in enumerate(o.structures)]
        self._classes: list[type[Structure]] = [spec.cls for spec, _ in sides]
        self._resolved = [asdict(opts) for _, opts in sides]
        self._labels = [_structure_label(spec.name, opts) for spec, opts in sides]
        # K Kᵀ and C Cᵀ (for structures closed under transposition) between updates
        self._outer: dict[tuple[str, int], Structure | None] = {}
        self._last: dict[str, Any] = {}
        layers = self._predicted_layers()
        self.state["layers"] = layers
        self.state["factors"] = {}
        dims = {n: p for n, p in self.named_params}
        for mod, names in layers.items():
            W = dims[names[0]]
            d_K = W[0].numel() + (1 if len(names) > 1 else 0)
            self.state["factors"][mod] = self._initial(d_K, W.shape[0], W.dtype, W.device)
        if o.fallback == "diagonal":
            covered = {p for names in layers.values() for p in names}
            self.state["fallback"] = {
                n: {"k": torch.full_like(p, o.init_scale ** 2, dtype=self._dtype(0, p.dtype))}
                for n, p in self.named_params if n not in covered}

    # ------------------------------------------------------------------ structure helpers
    def _dtype(self, side: int, param_dtype: torch.dtype) -> torch.dtype:
        choice = self.options.preconditioner_dtype[side]
        return param_dtype if choice == "param" else DTYPES[choice]

    def _structure(self, side: int, dim: int, data: dict[str, Tensor]) -> Structure:
        # the state's tensors were checked when they entered it (update, load_state_dict)
        return self._classes[side].trusted(dim, data, self._resolved[side])

    def _initial(self, d_K: int, d_C: int, dtype: torch.dtype, device: torch.device
                 ) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        for side, (key, dim) in enumerate((("K", d_K), ("C", d_C))):
            eye = self._classes[side].eye(dim, dtype=self._dtype(side, dtype), device=device,
                                          scale=self.options.init_scale,
                                          **self._resolved[side])
            entry[key] = eye.data
            entry[f"dim_{key}"] = dim
        return entry

    # ------------------------------------------------------------------ coverage
    def _label(self) -> str:
        return f"lie_group[{', '.join(self._labels)}]"

    # ------------------------------------------------------------------ update
    def _statistics(self, estimator: Any, batch: Any
                    ) -> dict[str, KroneckerFactors] | dict[str, KroneckerRoots]:
        """The factors' square roots if the estimator offers them, else the factors."""
        # passed only when set, so estimators whose kronecker takes just the batch still work
        extra = {"approx": self.options.kfac_approx} if self.options.kfac_approx else {}
        # a declared capability (parts.KRONECKER_ROOTS), not a guess from an attribute
        has_roots = KRONECKER_ROOTS in getattr(estimator, "provides", frozenset())
        found = estimator.kronecker_roots(batch, **extra) if has_roots else None
        return estimator.kronecker(batch, **extra) if found is None else found

    def update(self, estimator: Any, batch: Any, grads: Sequence[Tensor]) -> int:
        """One SINGD step of every layer's K, C (and m_K, m_C), a group of layers at a time.

        The structure guards its own state (``guards_state``; the optimizer takes no
        snapshot of it, which held a second copy of the whole state through the update):

        * a non-finite statistic refuses the whole update before anything changes (the
          state is as before; returns the number of layers);
        * otherwise each group's new entries are checked, and only finite ones are written
          into the state, in place (see :meth:`_commit`); a layer whose new entry is not
          finite (an overflow of finite statistics) keeps its previous K, C, m_K, m_C,
          while the other layers keep their update. The same for each fallback entry.

        Returns the number of layers and fallback entries that kept their previous values;
        the optimizer skips the step when it is not 0. Besides the state, at most one
        group's new entries and curvature terms exist at a time. As for torch.optim, a
        ``state_dict()`` refers to the live tensors: save or copy it to keep a snapshot."""
        o = self.options
        named = dict(self.named_params)
        shapes = {n: p.shape for n, p in named.items()}
        found = self._statistics(estimator, batch)
        # the layers of this update are exactly those with statistics: a predicted layer
        # whose factors never arrive is not reported, or applied, as lie_group
        layers = self._coverage(found.values())
        if not all_finite([t for kf in found.values() for t in _statistic_tensors(kf)]):
            return max(len(found), 1)
        # K Kᵀ and the scalings of the previous state are stale from here: freed before the
        # update's peak rather than after it
        self._outer = {}
        old_layers, old = self.state["layers"], self.state["factors"]
        factors: dict[str, Any] = {}
        for kf in found.values():
            if old_layers.get(kf.module) == list(kf.params) and kf.module in old:
                factors[kf.module] = old[kf.module]
            else:
                W = named[kf.params[0]]
                factors[kf.module] = self._initial(*self._check_factors(kf, shapes),
                                                   W.dtype, W.device)
        self.state["layers"] = layers
        self.state["factors"] = factors
        del old
        kept = 0
        # the curvature terms of several layers first, so that their traces reach the host
        # at once (one transfer per trace cost as much as a small layer's arithmetic); but
        # never more layers' terms alive than the largest layer's own, or a floor of
        # _TERMS_AT_ONCE entries: the terms (four matrices per layer) of all layers at once
        # were two state copies of extra peak memory for dense structures
        for group in _groups(list(found.values()), factors):
            terms: list[list[Structure] | None] = [
                list(self._curvature_terms(factors[kf.module], kf)) for kf in group]
            traces = self._traces(terms)  # type: ignore[arg-type]
            new: dict[str, dict[str, Any]] = {}
            for i, (kf, tr) in enumerate(zip(group, traces)):
                layer_terms, terms[i] = terms[i], None  # consumed: freed as they are used
                new[kf.module] = self._step_layer(factors[kf.module], layer_terms, tr)
            kept += self._commit(new, factors)
            del new

        if o.fallback == "diagonal":
            kept += self._update_fallback(estimator, batch,
                                          {p for ns in layers.values() for p in ns})
        self.state["updates"] = int(self.state.get("updates", 0)) + 1
        self._last = {"lie_group_layers": len(found),
                      "lie_group_fallback_params": len(self.state.get("fallback", {}))}
        return kept

    @staticmethod
    def _commit(new: dict[str, dict[str, Any]], factors: dict[str, Any]) -> int:
        """Write the finite entries of ``new`` into ``factors`` (one check for the group;
        per layer only when it fails); the number of layers that kept their entries.

        The values are copied into the layer's existing tensors (as singd's ``K.add_``
        updates in place) and the new tensors freed: long-lived state that moved to fresh
        memory every update left the freed blocks scattered through the heap, and the
        process's resident memory grew by ~60 MiB over singd's at width 2048 (measured
        with glibc's default allocator; the live tensors were the same)."""
        def tensors(entry: dict[str, Any]) -> list[Tensor]:
            return [t for key in _ENTRY_KEYS if key in entry for t in entry[key].values()]

        every = all_finite([t for entry in new.values() for t in tensors(entry)])
        kept = 0
        for mod, entry in new.items():
            if not (every or all_finite(tensors(entry))):
                kept += 1
                continue
            prev = factors.get(mod)
            for key in _ENTRY_KEYS:
                old = prev.get(key) if prev is not None else None
                if key in entry and old is not None and all(
                        k in old and old[k].shape == t.shape and old[k].dtype == t.dtype
                        for k, t in entry[key].items()):
                    for k, t in entry[key].items():
                        old[k].copy_(t)
                    entry[key] = old
            factors[mod] = entry
        return kept

    @staticmethod
    def _projected(X: Structure, factor: Tensor, is_root: bool) -> Structure:
        """Π(Xᵀ F X) for the factor F, or for F = RᵀR given its root R (m, d)."""
        factor = _as(factor.detach() if factor.requires_grad else factor, X.dtype)
        if not is_root:
            return X.congruence(factor)
        if X.DENSE_PRODUCTS and factor.shape[0] > 2 * X.dim:
            # 2d²m for S = R X and SᵀS against d²m + 2d³ for F and Xᵀ F X
            return X.congruence(factor.T @ factor)
        return X.inner(factor.T)

    def _curvature_terms(self, entry: dict[str, Any], kf: KroneckerFactors | KroneckerRoots
                         ) -> tuple[Structure, ...]:
        """(K, C, H_K = Π(Kᵀ A K), H_C = Π(Cᵀ G C), Π(KᵀK), Π(CᵀC)) of one layer."""
        K = self._structure(0, entry["dim_K"], entry["K"])
        C = self._structure(1, entry["dim_C"], entry["C"])
        roots = isinstance(kf, KroneckerRoots)
        H_K = self._projected(K, kf.A_root if roots else kf.A, roots)
        H_C = self._projected(C, kf.G_root if roots else kf.G, roots)
        return K, C, H_K, H_C, K.gram(), C.gram()

    def _traces(self, terms: list[tuple[Structure, ...]]) -> list[tuple[float, ...]]:
        """tr̄ of (H_K, H_C, Π(KᵀK), Π(CᵀC)) per layer, in one host transfer (the update
        needs them as step coefficients; one transfer per trace cost as much as a layer's
        arithmetic for the sparse structures). ``kfac_like`` needs none."""
        if self.options.kfac_like or not terms:
            return [()] * len(terms)
        parts = [X.average_trace() for t in terms for X in t[2:]]
        if len({p.dtype for p in parts}) > 1:  # K and C kept in different dtypes
            parts = [p.double() for p in parts]
        flat = torch.stack(parts).tolist()
        return [tuple(flat[4 * i:4 * i + 4]) for i in range(len(terms))]

    def _step_layer(self, entry: dict[str, Any], terms: list[Structure],
                    traces: tuple[float, ...]) -> dict[str, Any]:
        """m ← α₁ m + s·(coef_H·H + coef_G·Π(XᵀX) − I); X ← X (I − β m), for X = K and C,
        each m formed as one linear combination (one allocation). ``terms`` (K, C, H_K,
        H_C, Π(KᵀK), Π(CᵀC)) is emptied, so each side's H and Π(XᵀX) are freed once that
        side is done (the caller keeps no other reference)."""
        o = self.options
        K, C, H_K, H_C, KtK, CtC = terms
        terms.clear()
        half = 0.5 * (1.0 - o.alpha1) if o.normalize_lr_cov else 0.5
        if o.kfac_like:
            coef_K = coef_C = (half, half * o.damping)
        else:
            # the traces couple the factors: tr̄(H_C)·H_K is the K-side of Π(Cᵀ G C) ⊗ Π(Kᵀ A K)
            tr_HK, tr_HC, tr_KK, tr_CC = traces
            coef_K = (half * tr_HC, half * tr_CC * o.damping)
            coef_C = (half * tr_HK, half * tr_KK * o.damping)
        new = {"dim_K": entry["dim_K"], "dim_C": entry["dim_C"]}
        sides = [(0, "K", K, H_K, KtK, coef_K), (1, "C", C, H_C, CtC, coef_C)]
        del K, C, H_K, H_C, KtK, CtC
        while sides:
            side, key, X, H, XtX, (c_H, c_G) = sides.pop(0)
            rest = [(XtX, c_G)]
            del XtX
            if o.alpha1 != 0.0 and f"m_{key}" in entry:
                old = self._structure(side, entry[f"dim_{key}"], entry[f"m_{key}"])
                rest.append((old, o.alpha1))
            # H is this update's own intermediate: m is accumulated into its storage
            m = H.lincomb(c_H, rest, identity=-half, reuse=True)
            del H, rest  # Π(XᵀX) freed before X's step allocates the new X
            beta = o.lr_cov
            if o.normalize_lr_cov:
                beta = o.lr_cov / max(1.0, float(m.max_abs()))
            if o.exp_order == 2:
                # X (I − βm + ½β²m²): the second-order truncation (closure keeps m² in the
                # structure)
                step = m.lincomb(-beta, [(m @ m, 0.5 * beta * beta)])
                new[key] = X.lincomb(1.0, [(X @ step, 1.0)]).data
            else:
                new[key] = X.right_step(m, -beta).data
            if o.alpha1 != 0.0:
                new[f"m_{key}"] = m.data
            del X, m
        return new

    def _update_fallback(self, estimator: Any, batch: Any, covered: set[str]) -> int:
        """The diagonal fallback's step; an entry whose new k or m is not finite keeps its
        previous one. Returns the number of entries kept so."""
        o = self.options
        names = [n for n, _ in self.named_params]
        diag = estimator.diagonal(batch)
        check_like(diag, self.params, what=f"{type(estimator).__name__}.diagonal(batch)")
        old = self.state.get("fallback", {})
        half = 0.5 * (1.0 - o.alpha1) if o.normalize_lr_cov else 0.5
        new: dict[str, dict[str, Tensor]] = {}
        for n, h in zip(names, diag):
            if n in covered:
                continue
            prev = old.get(n)
            k = prev["k"] if prev is not None else \
                torch.full_like(h, o.init_scale ** 2, dtype=self._dtype(0, h.dtype))
            m = half * (k.square() * (h.detach().to(k.dtype) + o.damping) - 1.0)
            if prev is not None and "m" in prev and o.alpha1 != 0.0:
                m = m + o.alpha1 * prev["m"]
            beta: float | Tensor = o.lr_cov
            if o.normalize_lr_cov:
                beta = o.lr_cov / m.abs().max().clamp_min(1.0)
            if o.exp_order == 2:
                entry = {"k": k * (1.0 - beta * m + 0.5 * beta * beta * m * m)}
            else:
                entry = {"k": k - beta * (k * m)}
            if o.alpha1 != 0.0:
                entry["m"] = m
            new[n] = entry
        kept = 0
        if not all_finite([t for e in new.values() for t in e.values()]):
            for n, entry in list(new.items()):
                if not all_finite(list(entry.values())):
                    kept += 1
                    k = entry["k"]
                    new[n] = old[n] if n in old else \
                        {"k": torch.full_like(k, o.init_scale ** 2)}  # the initial entry
        self.state["fallback"] = new
        return kept

    # ------------------------------------------------------------------ apply
    def _side(self, mod: str, side: int, entry: dict[str, Any], n_cols: int) -> Any:
        """K (or C) as a structure, and K Kᵀ when one product is cheaper than two."""
        key = "KC"[side]
        X = self._structure(side, entry[f"dim_{key}"], entry[key])
        cached = (mod, side)
        if cached not in self._outer:
            # with w = stored entries per row (d dense, b block-diagonal, 1 diagonal), forming
            # K Kᵀ costs ~d·w² once per update and saves ~d·w·n_cols on each of T steps;
            # near break-even (a square dense layer at T = 1) the product is not kept: it
            # would cost a d² matrix per layer of memory for no time (measured: 34 MiB of
            # SINGD dense's peak at width 2048)
            width = X.numel() / max(X.dim, 1)
            worth = 1.25 * width < self.options.update_every * n_cols
            self._outer[cached] = X.outer() if worth else None
        return X, self._outer[cached]

    def _scales(self, mod: str, entry: dict[str, Any], like: Sequence[Tensor]
                ) -> list[tuple[Tensor, Tensor | None]] | None:
        """For diagonal K and C: C Cᵀ M K Kᵀ = (c² k²ᵀ) ⊙ M, per parameter of the layer
        either (the scaling matrix, None) or (c² shaped to scale rows, k² shaped to scale
        columns); None for other structures. The matrix is formed once per update when an
        update serves several steps (one multiplication per parameter and step instead of
        two); at ``update_every = 1`` it would be formed for one use, and held between
        steps it cost as much memory as the parameters (measured: the difference to singd's
        extra memory at width 2048), so the two factors scale the direction instead."""
        key = (mod, "scales")
        if key not in self._outer:
            K, KKt = self._side(mod, 0, entry, like[0].shape[0])
            C, CCt = self._side(mod, 1, entry, entry["dim_K"])
            k2 = None if KKt is None else KKt.diagonal_entries()
            c2 = None if CCt is None else CCt.diagonal_entries()
            if k2 is None or c2 is None:
                self._outer[key] = None
            elif self.options.update_every > 1:
                # kept in the factors' dtype: the product with the direction is formed in it
                full = split_layer_matrix(c2.unsqueeze(1) * k2.unsqueeze(0), like,
                                          same_dtype=False)
                self._outer[key] = [(sc, None) for sc in full]
            else:
                pairs, start = [], 0
                for t in like:
                    k = t.numel() // t.shape[0]
                    rest = t.shape[1:]
                    pairs.append((c2.reshape(-1, *([1] * len(rest))),
                                  k2[start:start + k].reshape(rest)))
                    start += k
                self._outer[key] = pairs
        return self._outer[key]

    def apply(self, direction: Sequence[Tensor]) -> list[Tensor]:
        named = self.named_params
        check_like(direction, [p for _, p in named], what="direction")
        index = {n: i for i, (n, _) in enumerate(named)}
        out: list[Tensor | None] = [None] * len(direction)
        # (position, scale, direction) and (position, row scale, column scale, direction)
        scaled: list[tuple[int, Tensor, Tensor]] = []
        pairs: list[tuple[int, Tensor, Tensor, Tensor]] = []
        for mod, pnames in self.state["layers"].items():
            entry = self.state["factors"][mod]
            ds = [direction[index[p]] for p in pnames]
            scales = self._scales(mod, entry, ds)
            if scales is not None:
                for p, d, (sc, col) in zip(pnames, ds, scales):
                    if col is None:
                        scaled.append((index[p], sc, d))
                    else:
                        pairs.append((index[p], sc, col, d))
                continue
            M = layer_matrix(ds)                                         # (d_out, d_K)
            K, KKt = self._side(mod, 0, entry, M.shape[0])
            C, CCt = self._side(mod, 1, entry, M.shape[1])
            # each intermediate is released as soon as the next one exists: at most two
            # (d_out, d_K) matrices besides the result (four were alive for a dense layer)
            Mt = _as(M.T, K.dtype)
            del M
            Y = KKt.mm(Mt) if KKt is not None else K.mm(K.tmm(Mt))    # K Kᵀ Mᵀ
            del Mt
            Z = _as(Y.T, C.dtype)
            del Y
            R = CCt.mm(Z) if CCt is not None else C.mm(C.tmm(Z))      # C Cᵀ M K Kᵀ
            del Z
            for p, r in zip(pnames, split_layer_matrix(R, ds)):
                out[index[p]] = r
        if scaled:
            # every element-wise scaling of the step in one call
            prods = torch._foreach_mul([sc for _, sc, _ in scaled],
                                       [_as(d, sc.dtype) for _, sc, d in scaled])
            for (i, _, d), r in zip(scaled, prods):
                out[i] = _as(r, d.dtype)
        if pairs:
            # (d ⊙ k²ᵀ) ⊙ c², the second product in place: one new tensor per parameter
            prods = torch._foreach_mul([_as(d, col.dtype) for _, _, col, d in pairs],
                                       [col for _, _, col, _ in pairs])
            torch._foreach_mul_(prods, [row for _, row, _, _ in pairs])
            for (i, _, _, d), r in zip(pairs, prods):
                out[i] = _as(r, d.dtype)
        fallback = self.state.get("fallback", {})
        for i, (n, _) in enumerate(named):
            if out[i] is not None:
                continue
            d = direction[i]
            if n in fallback:
                k = fallback[n]["k"]
                out[i] = _as(k.square() * _as(d, k.dtype), d.dtype)
            else:
                out[i] = d
        return out  # type: ignore[return-value]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for mod, entry in state.get("factors", {}).items():
            for side, key in enumerate("KC"):
                for name in (key, f"m_{key}"):
                    if name in entry:
                        try:
                            self._classes[side](entry[f"dim_{key}"], entry[name],
                                                **self._resolved[side])
                        except ValueError as err:
                            raise ValueError(f"preconditioner 'lie_group': state of module "
                                             f"{mod!r}, {name}: {err}") from err
        super().load_state_dict(state)
        self._outer = {}

    def info(self) -> dict[str, Any]:
        return dict(self._last)


_ENTRY_KEYS = ("K", "C", "m_K", "m_C")  # the tensors of a layer's entry
_TERMS_AT_ONCE = 1 << 20  # stored entries of the layers whose terms are formed together


def _groups(found: list[Any], factors: dict[str, Any]) -> list[list[Any]]:
    """Consecutive layers in groups whose stored K and C entries sum to at most the
    largest layer's (or :data:`_TERMS_AT_ONCE`)."""
    def size(kf: Any) -> int:
        entry = factors[kf.module]
        return sum(t.numel() for key in ("K", "C") for t in entry[key].values())

    sizes = [size(kf) for kf in found]
    budget = max([_TERMS_AT_ONCE, *sizes])
    groups: list[list[Any]] = []
    total = budget + 1
    for kf, n in zip(found, sizes):
        if total + n > budget:
            groups.append([])
            total = 0
        groups[-1].append(kf)
        total += n
    return groups


def _statistic_tensors(kf: KroneckerFactors | KroneckerRoots) -> list[Tensor]:
    """The floating-point tensors of one layer's statistics (roots or factors)."""
    ts = [kf.A_root, kf.G_root] if isinstance(kf, KroneckerRoots) else [kf.A, kf.G]
    return [t for t in ts if t.is_floating_point()]


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without a dispatcher call when it already is (most calls)."""
    return t if t.dtype == dtype else t.to(dtype)


__all__ = ["LieGroupPreconditioner"]


def _structure_label(name: str, options: Any) -> str:
    """``name`` with the options that differ from the structure's defaults, e.g.
    ``block_diagonal(block_size=16)`` (what ``structures()`` reports)."""
    changed = [f"{f.name}={getattr(options, f.name)!r}" for f in fields(options)
               if getattr(options, f.name) != getattr(type(options)(), f.name)]
    return f"{name}({', '.join(changed)})" if changed else name
