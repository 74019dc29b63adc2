"""The shared base of layer-wise Kronecker preconditioners (``kronecker``, ``lie_group``).

Both precondition each layer the estimator's ``kronecker`` capability covers with a
Kronecker-structured block over W̃ = [W | b], and every other parameter with ``fallback``.
What is common lives here, once:

* **coverage**: before the first update the layers are *predicted* (the layers the K-FAC
  handlers cover: Linear/Conv/Embedding modules with a trainable weight or bias, tied
  modules as one layer, a weight shared in another way left out); after an update they
  are exactly the layers the estimator returned statistics for. ``structures()`` reports
  that truth: a layer whose statistics never arrive (a Linear whose weight is used outside
  its forward; an unused Linear; the in_proj of a cross-attention) is reported as,
  and treated as, the fallback — never as Kronecker-preconditioned.
* **warnings**, once per preconditioner: for a predicted layer the estimator returned no
  statistics for, and for the parameters of modules no Kronecker handler covers
  (LayerNorm, biases-only modules of other kinds, bare parameters, …).
* **factor checks**: shapes of factors or of their roots against the parameters, and no
  parameter covered twice.
* **build-time checks** (:meth:`check_estimator`, called by the optimizer when it is
  built): the estimator can give Kronecker statistics for this loss, and the diagonal the
  ``"diagonal"`` fallback needs for this model (e.g. not for ``ef``/``fisher`` with a
  BatchNorm in training mode: the advice is ``fallback = "identity"``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from curvkit.estimators.base import KroneckerFactors, KroneckerRoots
from curvkit.estimators.kfac import kfac_exclusions, kfac_layers
from curvkit.parts import DIAGONAL, KRONECKER
from curvkit.preconditioners.base import Preconditioner

#: module types whose parameters a Kronecker handler may cover (used for the prediction
#: before the first update and for the warning about uncovered modules)
KRONECKER_MODULES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                                        nn.Embedding)


class LayerwiseKronecker(Preconditioner):
    """Coverage, factor checks, fallback warnings and ``structures()`` of layer-wise
    Kronecker preconditioners (see the module doc)."""

    needs = frozenset({KRONECKER})

    def __init__(self, model: nn.Module, options: Any | None = None) -> None:
        super().__init__(model, options)
        self._warned: set[str] = set()
        # the prediction walks the module tree; the parameters it is laid out over are
        # fixed at construction, so it is made once (every update's coverage check used it)
        self._prediction: dict[str, list[str]] | None = None

    # ------------------------------------------------------------------ coverage
    def _predicted_layers(self) -> dict[str, list[str]]:
        """Before any statistics: the layers the K-FAC handlers cover on this model
        (:func:`~curvkit.estimators.kfac.kfac_layers`; a weight shared in a way they do
        not cover is left out), {module: [weight, (bias)]} of the trainable ones."""
        if self._prediction is not None:
            return {k: list(v) for k, v in self._prediction.items()}
        trainable_names = {n for n, _ in self.named_params}
        layers: dict[str, list[str]] = {}
        for layer in kfac_layers(self.model, strict=False):
            names = layers.setdefault(layer.group or layer.name, [])  # a tied group is one
            names += [n for n in layer.params if n in trainable_names and n not in names]
        # weight before bias (a group's Embedding brings the weight alone)
        self._prediction = {k: sorted(v, key=lambda n: n.endswith("bias"))
                            for k, v in layers.items() if v}
        return {k: list(v) for k, v in self._prediction.items()}

    def _excluded_params(self) -> dict[str, list[str]]:
        """{why: parameters} of the modules whose weight is shared in a way K-FAC does not
        cover (:func:`~curvkit.estimators.kfac.kfac_exclusions`) and that no layer covers."""
        predicted = {p for names in self._predicted_layers().values() for p in names}
        full = {id(p): n for n, p in self.named_params}
        out: dict[str, list[str]] = {}
        for mod, why in kfac_exclusions(self.model).items():
            # recurse: an attention's out_proj is left out with it
            held = [full[id(p)] for p in self.model.get_submodule(mod).parameters()
                    if id(p) in full and full[id(p)] not in predicted]
            reported = {n for names in out.values() for n in names}
            if held and not set(held) <= reported:  # one warning per shared parameter
                out[why] = held
        return out

    def _layers(self) -> dict[str, list[str]]:
        """The layers preconditioned with Kronecker structure now: those of the last update,
        predicted before the first one."""
        if int(self.state.get("updates", 0)) > 0:
            return dict(self.state.get("layers") or {})
        return self._predicted_layers()

    def _label(self) -> str:
        return self.name

    def structures(self) -> dict[str, str]:
        covered = {p for names in self._layers().values() for p in names}
        fallback = self.options.fallback
        label = self._label()
        return {n: label if n in covered else fallback for n, _ in self.named_params}

    def _coverage(self, found: Iterable[KroneckerFactors | KroneckerRoots]
                  ) -> dict[str, list[str]]:
        """{module: its parameters} of the statistics returned, each checked against the
        parameters (:meth:`_check_factors`); a parameter covered twice is an error."""
        shapes = {n: p.shape for n, p in self.named_params}
        layers: dict[str, list[str]] = {}
        seen: dict[str, str] = {}
        for kf in found:
            self._check_factors(kf, shapes)
            for p in kf.params:
                if p in seen:
                    raise ValueError(f"preconditioner {self.name!r}: parameter {p!r} is "
                                     f"covered by the factors of both {seen[p]!r} and "
                                     f"{kf.module!r}")
                seen[p] = kf.module
            layers[kf.module] = list(kf.params)
        self._warn_uncovered(layers)
        return layers

    def _check_factors(self, kf: KroneckerFactors | KroneckerRoots,
                       shapes: dict[str, torch.Size]) -> tuple[int, int]:
        """(columns of W̃, d_out) after checking the factors' (or roots') shapes."""
        where = f"preconditioner {self.name!r}: factors of module {kf.module!r}"
        if not kf.params or any(p not in shapes for p in kf.params):
            raise ValueError(f"{where} cover {list(kf.params)}, which are not all trainable "
                             f"parameters of the model")
        d_out = shapes[kf.params[0]][0]
        cols = sum(math.prod(shapes[p]) // d_out for p in kf.params)
        if isinstance(kf, KroneckerRoots):
            A, G, what = kf.A_root, kf.G_root, "A_root and G_root need {} and {} columns"
            ok = A.ndim == 2 and G.ndim == 2 and A.shape[1] == cols and G.shape[1] == d_out
        else:
            A, G, what = kf.A, kf.G, "A and G need shapes ({0}, {0}) and ({1}, {1})"
            ok = tuple(A.shape) == (cols, cols) and tuple(G.shape) == (d_out, d_out)
        if not ok:
            raise ValueError(f"{where}: got shapes {tuple(A.shape)} and {tuple(G.shape)}; for "
                             f"parameters {list(kf.params)} " + what.format(cols, d_out))
        return cols, d_out

    def _warn_uncovered(self, layers: dict[str, list[str]]) -> None:
        fallback = self.options.fallback
        for mod, names in self._predicted_layers().items():
            if mod not in layers and mod not in self._warned:
                self._warned.add(mod)
                kind = type(self.model.get_submodule(mod)).__name__
                warnings.warn(f"preconditioner {self.name!r}: the estimator returned no "
                              f"Kronecker factors for {kind} module {mod!r} (its weight is "
                              f"used outside its forward, or it is not used"
                              + ("; an attention's in_proj is covered for self-attention "
                                 "only" if kind == "MultiheadAttention" else "")
                              + f"); its parameters {names} use the {fallback!r} "
                              f"fallback", stacklevel=4)
        if "<other modules>" in self._warned:
            return
        self._warned.add("<other modules>")
        covered = {p for names in layers.values() for p in names}
        predicted = {p for names in self._predicted_layers().values() for p in names}
        predicted |= {p for names in self._excluded_params().values() for p in names}
        other = [n for n, _ in self.named_params if n not in covered and n not in predicted]
        if other:
            kinds = sorted({self._owner_type(n) for n in other})
            warnings.warn(f"preconditioner {self.name!r}: {len(other)} parameter(s) of modules "
                          f"no Kronecker handler covers ({', '.join(kinds)}) use the "
                          f"{fallback!r} fallback: {other[:8]}"
                          + (" …" if len(other) > 8 else ""), stacklevel=4)

    def _owner_type(self, param: str) -> str:
        mod, _, _ = param.rpartition(".")
        try:
            return type(self.model.get_submodule(mod)).__name__ if mod else \
                type(self.model).__name__
        except AttributeError:
            return "?"

    # ------------------------------------------------------------------ build time
    def check_estimator(self, estimator: Any) -> None:
        """Refuse, before training, an estimator that cannot give what this structure
        needs on this model and loss (the optimizer calls this when it is built)."""
        why = getattr(estimator, "refusal", lambda cap: "")(KRONECKER)
        if why:
            raise ValueError(f"preconditioner {self.name!r} needs Kronecker factors: {why}")
        # what no forward is needed to see: a grouped convolution is refused now, a weight
        # shared in a way K-FAC does not cover falls back (one warning each, now)
        kfac_layers(self.model, strict=True)
        for why, names in self._excluded_params().items():
            if why not in self._warned:
                self._warned.add(why)
                warnings.warn(f"preconditioner {self.name!r}: {why}. Its parameters {names} "
                              f"use the {self.options.fallback!r} fallback", stacklevel=3)
        if self.options.fallback != "diagonal":
            return
        covered = {p for names in self._predicted_layers().values() for p in names}
        if all(n in covered for n, _ in self.named_params):
            return
        why = getattr(estimator, "refusal", lambda cap: "")(DIAGONAL)
        if why:
            raise ValueError(
                f"preconditioner {self.name!r}: the parameters no Kronecker factor covers "
                f"use fallback = 'diagonal', but estimator {estimator.name!r} cannot give "
                f"their diagonal: {why}. Set fallback = 'identity' (they take plain gradient "
                f"steps), or use estimator 'ggn'")


__all__ = ["LayerwiseKronecker", "KRONECKER_MODULES"]
