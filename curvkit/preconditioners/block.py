"""``block``: a dense curvature block per parameter tensor (or per layer), inverted exactly."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from curvkit.errors import ConfigError
from curvkit.options import option
from curvkit.params import check_like, owners
from curvkit.parts import DENSE, MATVEC
from curvkit.preconditioners._running import blend, ema_weight, psd_inverse, working_dtype
from curvkit.preconditioners.base import Preconditioner


class BlockPreconditioner(Preconditioner):
    """Block-diagonal curvature: one dense block per parameter tensor or per layer.

    For each block b (a set of parameter tensors, flattened and concatenated in parameter
    order into n_b coordinates) the block C_bb of the estimator's curvature is measured,
    symmetrised (C_bb + C_bbᵀ)/2, averaged over updates (``ema``, ``bias_correction``), and

        (P⁻¹ d)_b = (C̄_bb + δ I)⁻¹ d_b                       inverse = "cholesky"
        (P⁻¹ d)_b = U diag(1 / (ρ(λ) + δ)) Uᵀ d_b,  C̄_bb = U diag(λ) Uᵀ   inverse = "eigh"

    with δ = ``damping`` and ρ from ``negative`` (|λ| or max(λ, 0)). With ``"cholesky"`` a
    block whose damped matrix is not positive definite (an indefinite Hessian block) is
    inverted by the ``"eigh"`` formula instead; ``info()`` counts those fallbacks.

    ``source = "matvec"`` measures each block with n_b products C e_i with the unit vectors
    of the block's coordinates; ``"dense"`` asks the estimator for the whole P×P matrix
    once (small models). Statistics are kept in the parameter dtype, promoted to float32
    for bfloat16/float16 parameters.
    """

    name = "block"
    needs = frozenset({MATVEC})

    @dataclass
    class Options:
        blocks: Literal["parameter", "layer"] = option(
            "parameter", "one block per parameter tensor, or per layer (all parameters "
                         "owned directly by one module)")
        max_block_size: int = option(4096, "largest block (entries) allowed; larger blocks "
                                           "are refused when the optimizer is built", min=1)
        damping: float = option(1e-3, "δ added to the block (or to its rectified "
                                      "eigenvalues)", min=0.0)
        ema: float = option(0.0, "running average of the blocks; 0 = no averaging",
                            min=0.0, max=1.0)
        bias_correction: bool = option(True, "divide the average by 1 − emaᵗ as Adam does")
        inverse: Literal["cholesky", "eigh"] = option(
            "cholesky", "Cholesky of the damped block (eigh fallback if not positive "
                        "definite), or always the eigendecomposition")
        negative: Literal["abs", "clip"] = option(
            "abs", "eigh: negative eigenvalues replaced by |λ| or by max(λ, 0)")
        source: Literal["matvec", "dense"] = option(
            "matvec", "measure blocks with matvec over each block's basis, or slice "
                      "estimator.dense (small models)")
        update_every: int = option(1, "refresh the blocks every T steps", min=1)

        def __post_init__(self) -> None:
            if self.ema >= 1.0:
                raise ValueError("ema: must be < 1 (ema = 1 would never take in a statistic)")

    @classmethod
    def requirements(cls, options: Any) -> frozenset[str]:
        return frozenset({DENSE}) if options.source == "dense" else frozenset({MATVEC})

    def __init__(self, model: nn.Module, options: Options | None = None) -> None:
        super().__init__(model, options)
        self.block_names, self.block_members = self._partition()
        limit = self.options.max_block_size
        for name, members in zip(self.block_names, self.block_members):
            size = sum(self.params[i].numel() for i in members)
            if size > limit:
                per_layer = self.options.blocks == "layer"
                what = "module" if per_layer else "parameter"
                other = "use blocks = 'parameter', " if per_layer else ""
                raise ConfigError(
                    f"max_block_size: {what} {name!r} has {size} entries, more than "
                    f"max_block_size = {limit} (its dense block would be {size}×{size}); "
                    f"raise max_block_size, {other}or use a structured preconditioner "
                    f"('diagonal', 'kronecker')")

    def _partition(self) -> tuple[list[str], list[list[int]]]:
        names = [n for n, _ in self.named_params]
        if self.options.blocks == "parameter":
            return names, [[i] for i in range(len(names))]
        owner = owners(self.model)
        groups: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            mod = owner[n][0] if n in owner else n.rpartition(".")[0]
            groups.setdefault(mod or "(root)", []).append(i)
        return list(groups), list(groups.values())

    # ------------------------------------------------------------------ measure
    def _measure_matvec(self, estimator: Any, batch: Any) -> list[Tensor]:
        params = self.params
        zeros = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
        # all products are on one batch at one θ: the operator reuses the per-batch work
        # (the hessian's gradient graph, the ggn's forward graph) across them
        op = estimator.linearize(batch)
        out = []
        for members in self.block_members:
            cols = []
            for i in members:
                p = params[i]
                for k in range(p.numel()):
                    e = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                    e[k] = 1.0
                    v = list(zeros)
                    v[i] = e.view_as(p)
                    Cv = op.matvec(v)
                    cols.append(torch.cat([Cv[j].reshape(-1) for j in members]))
            out.append(torch.stack(cols, dim=1))
        return out

    def _measure_dense(self, estimator: Any, batch: Any) -> list[Tensor]:
        C = estimator.dense(batch)
        params = self.params
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        if C.shape != (offsets[-1], offsets[-1]):
            raise ValueError(f"{type(estimator).__name__}.dense(batch) has shape "
                             f"{tuple(C.shape)}; the model has {offsets[-1]} trainable entries")
        out = []
        for members in self.block_members:
            idx = torch.cat([torch.arange(offsets[i], offsets[i + 1], device=C.device)
                             for i in members])
            out.append(C[idx][:, idx])
        return out

    # ------------------------------------------------------------------ contract
    def update(self, estimator: Any, batch: Any, grads: Sequence[Tensor]) -> None:
        o = self.options
        raw = (self._measure_dense(estimator, batch) if o.source == "dense"
               else self._measure_matvec(estimator, batch))
        params = self.params
        count = int(self.state.get("updates", 0)) + 1
        w = ema_weight(count, o.ema, o.bias_correction)
        old = self.state.get("blocks")
        blocks, inverses, fallbacks = [], [], 0
        for b, (B, members) in enumerate(zip(raw, self.block_members)):
            B = B.detach().to(working_dtype(params[members[0]].dtype))
            B = blend(None if old is None else old[b], 0.5 * (B + B.T), w)
            inv, used_eigh = psd_inverse(B, o.damping, o.inverse, o.negative)
            fallbacks += int(used_eigh and o.inverse == "cholesky")
            blocks.append(B)
            inverses.append(inv)
        self.state["blocks"] = blocks
        self.state["inverses"] = inverses
        self.state["updates"] = count
        self._fallbacks = fallbacks

    def apply(self, direction: Sequence[Tensor]) -> list[Tensor]:
        inverses = self.state.get("inverses")
        if inverses is None:
            raise RuntimeError("preconditioner 'block': apply() before the first update()")
        check_like(direction, self.params, what="direction")
        out: list[Tensor | None] = [None] * len(direction)
        for inv, members in zip(inverses, self.block_members):
            d = torch.cat([direction[i].reshape(-1).to(inv.dtype) for i in members])
            r = inv @ d
            start = 0
            for i in members:
                n = direction[i].numel()
                out[i] = r[start:start + n].reshape(direction[i].shape).to(direction[i].dtype)
                start += n
        return out  # type: ignore[return-value]

    def structures(self) -> dict[str, str]:
        names = [n for n, _ in self.named_params]
        return {names[i]: "block" for members in self.block_members for i in members}

    def info(self) -> dict[str, Any]:
        if "blocks" not in self.state:
            return {}
        return {"block_count": len(self.block_members),
                "block_eigh_fallbacks": getattr(self, "_fallbacks", 0)}
