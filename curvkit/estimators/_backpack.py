"""BackPACK as a backend of ``ggn``, ``fisher`` and ``ef`` (option ``backend = "backpack"``).

With ``backend = "backpack"`` an estimator's ``diagonal`` and ``kronecker`` come from
BackPACK's extensions (Dangel et al., 2020) instead of curvkit's own passes; ``matvec``,
``dense`` and everything else stay curvkit's. Which extension, and how its result is put
into curvkit's convention (c the loss' reduction factor, loss = c·Σ_n ℓ_n):

============  ================  ==========================================================
estimator     capability        BackPACK
============  ================  ==========================================================
ggn           diagonal          ``DiagGGNExact``: diag(Jᵀ H_loss J), the same quantity
fisher        diagonal          ``DiagGGNMC(mc_samples)``: the same estimator of the GGN
                                diagonal; labels drawn by BackPACK from torch's generator,
                                seeded from the estimator's (``seed``, draw, batch) inside
                                ``torch.random.fork_rng`` (the caller's RNG is untouched;
                                the samples differ from the autograd backend's)
ef            diagonal          ``SumGradSquared`` = Σ_n (c ∇ℓ_n)², divided by c: the
                                per-sample EF c Σ_n (∇ℓ_n)². With several loss terms per
                                sample this is ``outer_products = "per_sample"``; the
                                per-term EF is refused (BackPACK's per-sample gradients
                                have summed the terms)
ggn           kronecker         ``KFLR``: G, and A = (1/N) Σ_n a_n a_nᵀ of each Linear
fisher        kronecker         ``KFAC(mc_samples)``: as KFLR with sampled G
ef            kronecker         refused: BackPACK has no empirical K-FAC
============  ================  ==========================================================

For a Linear layer on (N, d_in) inputs BackPACK's G and A are curvkit's (``expand`` and
``reduce`` coincide there); the bias column of curvkit's augmented A = [[A, ā], [āᵀ, 1]]
comes from the input mean ā, recorded by a forward hook on the copy. BackPACK's K-FAC of a
convolution is G_reduce ⊗ (Σ_t a_t a_tᵀ / N) — neither curvkit's ``expand`` nor its
``reduce`` flavour — and a Linear on (N, T, d) inputs is not the per-sample layout it
assumes, so ``kronecker`` with this backend is refused for models with such layers.

BackPACK runs on a **copy** of the model, never on the user's: ``backpack.extend`` installs
module hooks that break ``torch.func`` transforms on the same instance (curvkit's other
capabilities). The copy is made once (``copy.deepcopy``, without the model's hooks); its
parameters share the storage of the user's (no copy of the weights; an optimizer's in-place
update is seen at once; a parameter whose storage was replaced is re-pointed), buffers are
copied in at each call, and train/eval flags are mirrored. Refused at build, naming module
and option: a module BackPACK's extension does not know (BackPACK needs the model as a
``Sequential`` of its supported modules for its second-order extensions), a loss it does
not support, BatchNorm in training mode, a missing ``backpack`` extra.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from curvkit import passes
from curvkit._optional import require
from curvkit.estimators.base import Batch, KroneckerFactors, as_batches
from curvkit.options import option
from curvkit.parts import DIAGONAL, KRONECKER

if TYPE_CHECKING:
    from curvkit.estimators.base import CurvatureEstimator

Backend = Literal["autograd", "backpack"]
Statistic = Literal["exact", "mc", "empirical"]

# (capability, statistic) → BackPACK extension class name, and the field it writes
_EXTENSIONS: dict[tuple[str, str], tuple[str, str] | None] = {
    (DIAGONAL, "exact"): ("DiagGGNExact", "diag_ggn_exact"),
    (DIAGONAL, "mc"): ("DiagGGNMC", "diag_ggn_mc"),
    (DIAGONAL, "empirical"): ("SumGradSquared", "sum_grad_squared"),
    (KRONECKER, "exact"): ("KFLR", "kflr"),
    (KRONECKER, "mc"): ("KFAC", "kfac"),
    (KRONECKER, "empirical"): None,
}
_FIRST_ORDER = {"SumGradSquared"}


def backend_option() -> Any:
    """The ``backend`` option of ggn, fisher and ef (one definition for the three)."""
    return option("autograd", "how `diagonal` and `kronecker` are computed: curvkit's own "
                              "passes ('autograd') or BackPACK's extensions on a private "
                              "copy of the model ('backpack', extra 'backpack')")


class BackpackBackend:
    """BackPACK's diagonal and Kronecker extraction for one estimator (see the module doc).

    ``statistic``: ``"exact"`` (ggn), ``"mc"`` (fisher), ``"empirical"`` (ef).
    """

    def __init__(self, estimator: CurvatureEstimator, statistic: Statistic) -> None:
        # the estimator owns this backend: a weak reference, so the two form no cycle that
        # would keep the model copy alive until the garbage collector runs
        self._est = weakref.ref(estimator)
        self.statistic = statistic
        self.where = f"estimator {estimator.name!r} with backend = 'backpack'"
        self.backpack = require("backpack", self.where)
        self._copy: nn.Module | None = None
        self._key: tuple = ()
        self._loss: nn.Module | None = None
        # every estimator with this backend offers its diagonal: a model BackPACK cannot
        # run that extension on is refused now, before training
        why = self.refusal(DIAGONAL)
        if why:
            raise ValueError(f"{self.where}: {why}")

    @property
    def est(self) -> CurvatureEstimator:
        est = self._est()
        assert est is not None, "the estimator of this BackPACK backend is gone"
        return est

    # ------------------------------------------------------------- build-time checks
    def _extension(self, capability: str, mc_samples: int = 1) -> tuple[Any, str]:
        name, field = _EXTENSIONS[(capability, self.statistic)]  # type: ignore[misc]
        cls = getattr(self.backpack.extensions, name)
        return (cls(mc_samples) if name in ("DiagGGNMC", "KFAC") else cls()), field

    def refusal(self, capability: str) -> str:
        """'' if BackPACK can give ``capability`` here in curvkit's convention, else why."""
        if capability not in (DIAGONAL, KRONECKER):
            return ""
        spec = _EXTENSIONS[(capability, self.statistic)]
        option_path = f"estimator {self.est.name!r}: backend = 'backpack'"
        if spec is None:
            return (f"{option_path} has no Kronecker factors for the empirical Fisher (BackPACK "
                    f"has no empirical K-FAC: its KFAC samples labels, KFLR uses the loss "
                    f"Hessian); use backend = 'autograd', or estimator 'fisher' or 'ggn'")
        name = spec[0]
        ext, _ = self._extension(capability)
        known = getattr(ext, "_BackpropExtension__module_extensions", {})
        from backpack.utils.module_classification import is_no_op

        second = name not in _FIRST_ORDER
        if second:
            why = self._loss_refusal(known, name)
            if why:
                return f"{option_path}: {why}"
        holders: dict[int, list[str]] = {}
        for mod_name, mod in self.est.model.named_modules(remove_duplicate=False):
            for p in mod.parameters(recurse=False):
                holders.setdefault(id(p), []).append(mod_name or "<model>")
        shared = [names for names in holders.values() if len(set(names)) > 1]
        if shared:
            return (f"{option_path}: modules {', '.join(sorted(set(shared[0])))} hold one "
                    f"parameter; BackPACK computes its quantities per module")
        for mod_name, mod in self.est.model.named_modules():
            label = f"module {mod_name or '<model>'} ({type(mod).__name__})"
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:
                return (f"{option_path}: {label} is in training mode and couples the "
                        f"samples of a batch; call model.eval() first")
            if is_no_op(mod):
                continue
            own = [p for p in mod.parameters(recurse=False) if p.requires_grad]
            if type(mod) not in known and (second or own):
                how = ("a Sequential of modules it supports"
                       if second else "parameters in modules it supports")
                return (f"{option_path}: BackPACK's {name} has no extension for {label} "
                        f"(it needs {how}: "
                        f"{', '.join(sorted(k.__name__ for k in known))}); use backend = "
                        f"'autograd'")
            if capability == KRONECKER and own and not isinstance(mod, nn.Linear):
                return (f"{option_path}: BackPACK's {name} factors of {label} are "
                        f"G_reduce ⊗ Σ_t a_t a_tᵀ/N, neither of curvkit's K-FAC flavours "
                        f"(kfac_approx 'expand' or 'reduce'); use backend = 'autograd'")
        return ""

    def _loss_refusal(self, known: dict, name: str) -> str:
        loss_fn = self.est.loss_fn
        supported = (nn.CrossEntropyLoss, nn.MSELoss)
        if type(loss_fn) not in supported or type(loss_fn) not in known:
            return (f"BackPACK's {name} is used here for nn.CrossEntropyLoss and nn.MSELoss "
                    f"only, not {type(loss_fn).__name__}; use backend = 'autograd'")
        if isinstance(loss_fn, nn.CrossEntropyLoss) and (
                loss_fn.weight is not None or loss_fn.label_smoothing != 0.0):
            return ("BackPACK's cross-entropy has no class weights or label smoothing; use "
                    "backend = 'autograd'")
        return ""

    def _refuse(self, capability: str) -> None:
        why = self.refusal(capability)
        if why:
            raise ValueError(why)

    # ------------------------------------------------------------- the copy
    def _synced(self) -> nn.Module:
        """The private extended copy, its parameters sharing the user's storage, its
        buffers and train/eval flags those of the user's model now."""
        model = self.est.model
        params = list(model.parameters())
        key = (tuple(id(p) for p in params), tuple(id(m) for m in model.modules()))
        if self._copy is None or key != self._key:
            self._copy = self._make_copy(model)
            self._key = key
        cp = self._copy
        with torch.no_grad():
            for p, q in zip(params, cp.parameters()):
                if q.data_ptr() != p.data_ptr() or q.shape != p.shape or q.dtype != p.dtype:
                    q.data = p.detach()  # the user replaced the storage: share the new one
                q.requires_grad_(p.requires_grad)
                q.grad = None
            for b, c in zip(model.buffers(), cp.buffers()):
                if c.shape != b.shape or c.dtype != b.dtype or c.device != b.device:
                    c.data = b.detach().clone()
                else:
                    c.copy_(b)
        for m, c in zip(model.modules(), cp.modules()):
            c.training = m.training
        return cp

    def _make_copy(self, model: nn.Module) -> nn.Module:
        memo: dict[int, Any] = {}
        for p in model.parameters():
            # a new Parameter on the same storage: no copy of the weights
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
        cp = copy.deepcopy(model, memo)
        for m in cp.modules():
            # the user's hooks (an optimizer's batch recorder, …) must not fire on the copy
            for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                         "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                         "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called"):
                d = getattr(m, attr, None)
                if d is not None:
                    d.clear()
        self._loss = self.backpack.extend(copy.deepcopy(self.est.loss_fn))
        return self.backpack.extend(cp)

    # ------------------------------------------------------------- one pass
    def _run(self, X: Any, y: Tensor, extension: Any, seed: int | None,
             hook: Callable[[nn.Module, tuple, Any], None] | None = None) -> Tensor:
        """Forward and backward of the loss on the copy with ``extension``; the output."""
        cp = self._synced()
        calls: dict[str, int] = {}

        def count(name: str) -> Callable[..., None]:
            def hook(mod: nn.Module, inputs: tuple, output: Any) -> None:
                calls[name] = calls.get(name, 0) + 1
                if calls[name] > 1:
                    # BackPACK keeps one input per module: a second call would overwrite it
                    raise ValueError(f"{self.where}: module {name} ({type(mod).__name__}) is "
                                     f"called more than once in one forward pass; BackPACK "
                                     f"handles a module applied once; use backend = "
                                     f"'autograd'")
            return hook

        handles = [m.register_forward_hook(count(n or "<model>")) for n, m in cp.named_modules()
                   if any(True for _ in m.parameters(recurse=False))]
        if hook is not None:
            handles += [m.register_forward_hook(hook) for m in cp.modules()
                        if isinstance(m, nn.Linear)]
        devices = [p.device for p in cp.parameters() if p.device.type == "cuda"][:1]
        try:
            with contextlib.ExitStack() as stack:
                if seed is not None:
                    # BackPACK draws its labels from torch's global generator in the
                    # backward pass: a private seed inside a forked RNG leaves the caller's
                    # stream as it was (seeded after the forward, which replays the
                    # evaluation's random state for its dropout masks)
                    stack.enter_context(torch.random.fork_rng(devices=devices))
                stack.enter_context(torch.enable_grad())
                stack.enter_context(self.backpack.backpack(extension))
                out = passes.require_tensor_output(passes.forward(cp, X), cp, self.where)
                if isinstance(self._loss, nn.MSELoss) and out.ndim != 2 and \
                        type(extension).__name__ not in _FIRST_ORDER:
                    raise ValueError(f"{self.where}: BackPACK's MSELoss takes (N, C) outputs, "
                                     f"got {tuple(out.shape)}; use backend = 'autograd'")
                assert self._loss is not None
                loss = self._loss(out, y)
                if seed is not None:
                    torch.manual_seed(seed)
                loss.backward()
        finally:
            for h in handles:
                h.remove()
        return out.detach()

    def _named_copy_params(self) -> list[tuple[str, nn.Parameter]]:
        assert self._copy is not None
        names = {n for n, _ in self.est.named_params}
        return [(n, p) for n, p in self._copy.named_parameters() if n in names]

    def _clear(self, field: str) -> None:
        assert self._copy is not None
        for p in self._copy.parameters():
            if hasattr(p, field):
                delattr(p, field)
            p.grad = None

    # ------------------------------------------------------------- diagonal
    def diagonal(self, batch: Batch | Iterable[Batch],
                 seed: Callable[[int], int] | None = None, mc_samples: int = 1,
                 per_term: bool = False) -> list[Tensor]:
        """diag(C) shaped like the trainable parameters, over batches and ranks like the
        autograd backend. ``seed(i)``: batch i's seed (Monte Carlo only)."""
        self._refuse(DIAGONAL)
        ext, field = self._extension(DIAGONAL, mc_samples)
        counter = iter(range(1 << 62))

        def one(X: Any, y: Tensor) -> list[Tensor]:
            i = next(counter)
            out = self._run(X, y, ext, None if seed is None else seed(i))
            try:
                res = [getattr(p, field).detach().clone() for _, p in self._named_copy_params()]
            finally:
                self._clear(field)
            if self.statistic == "empirical":
                loss = self.est.loss
                if per_term and loss.terms(out).shape[1] > 1:
                    raise ValueError(
                        f"{self.where}: the output has {loss.terms(out).shape[1]} loss terms "
                        f"per sample and outer_products = 'per_term', but BackPACK's "
                        f"per-sample gradients have summed a sample's terms; set estimator "
                        f"option outer_products = 'per_sample', or backend = 'autograd'")
                c = loss.reduction_factor(out, y)
                res = [r / c for r in res]
            return res

        return self.est.accumulate(as_batches(batch), one, first_order=True)

    # ------------------------------------------------------------- kronecker
    def kronecker(self, batch: Batch | Iterable[Batch],
                  seed: Callable[[int], int] | None = None, mc_samples: int = 1
                  ) -> dict[str, KroneckerFactors]:
        """{module: KroneckerFactors} of every Linear with a trainable parameter, combined
        over batches and ranks like :func:`curvkit.estimators.kfac.kronecker_factors`."""
        self._refuse(KRONECKER)
        ext, field = self._extension(KRONECKER, mc_samples)
        sum_red = self.est.reduction == "sum"
        counter = iter(range(1 << 62))
        trainable = {n for n, _ in self.est.named_params}

        def one(X: Any, y: Tensor) -> dict[str, Any]:
            i = next(counter)
            sums: dict[int, tuple[Tensor, int]] = {}

            def record(mod: nn.Module, inputs: tuple, output: Any) -> None:
                x = inputs[0]
                if x.ndim != 2:
                    raise ValueError(
                        f"{self.where}: a Linear got input of shape {tuple(x.shape)}; BackPACK's "
                        f"K-FAC takes (N, d_in) inputs (no weight-sharing positions); use "
                        f"backend = 'autograd'")
                sums[id(mod)] = (x.detach().sum(0), x.shape[0])

            self._run(X, y, ext, None if seed is None else seed(i), hook=record)
            assert self._copy is not None
            A: dict[str, Tensor] = {}
            G: dict[str, Tensor] = {}
            count: dict[str, Tensor] = {}
            try:
                for name, mod in self._copy.named_modules():
                    if not isinstance(mod, nn.Linear) or id(mod) not in sums:
                        continue
                    w_name = f"{name}.weight" if name else "weight"
                    b_name = f"{name}.bias" if name else "bias"
                    use_w = w_name in trainable
                    use_b = mod.bias is not None and b_name in trainable
                    if not (use_w or use_b):
                        continue
                    s, n = sums[id(mod)]
                    if use_w:
                        g, a = getattr(mod.weight, field)
                    else:
                        g, a = getattr(mod.bias, field)[0], s.new_zeros(0, 0)
                        s = s[:0]
                    if use_b:
                        d = a.shape[0]
                        aug = a.new_empty(d + 1, d + 1)
                        aug[:d, :d] = a
                        aug[:d, d] = s / n
                        aug[d, :d] = s / n
                        aug[d, d] = 1.0
                        a = aug
                    A[name] = a * n if sum_red else a.clone()
                    G[name] = g.clone()
                    count[name] = torch.tensor(float(n), dtype=a.dtype, device=a.device)
            finally:
                self._clear(field)
            out: dict[str, Any] = {"A": A, "G": G}
            if sum_red:
                out["count"] = count
            return out

        acc = self.est.accumulate(as_batches(batch), one, reduction=self.est.reduction,
                                  first_order=True)
        if sum_red:
            acc["A"] = {n: a / acc["count"][n] for n, a in acc["A"].items()}
        res = {}
        for name in acc["A"]:
            params = tuple(p for p in (f"{name}.weight" if name else "weight",
                                       f"{name}.bias" if name else "bias") if p in trainable)
            res[name] = KroneckerFactors(module=name, params=params, A=acc["A"][name],
                                         G=acc["G"][name])
        return res


def mc_seeds(seed_of_batch: Callable[[int], torch.Generator]) -> Callable[[int], int]:
    """Batch index → an integer seed, from the estimator's per-batch generators."""
    return lambda i: int(seed_of_batch(i).initial_seed()) % (2 ** 63)


__all__ = ["Backend", "BackpackBackend", "backend_option", "mc_seeds"]
