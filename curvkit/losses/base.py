"""The base of ``loss`` parts: what curvature needs to know about a family of loss modules.

A loss part describes one family of PyTorch loss modules (matched by type, :meth:`LossPart.
matches`, and by settings, :meth:`LossPart.refusal`), bound to one instance ``loss_fn``.
Everything is written for the model output ``out`` (N, …) and the targets ``y`` of one
batch. With the loss' *terms* (a sample's output may hold several loss terms: the positions
of a sequence for cross-entropy, the rows of an (N, 5, 3) regression output; see
:meth:`LossPart.terms`), the loss is

    L = c · Σ_n ℓ_n,     ℓ_n = Σ_t ω_{n,t} ℓ(f_{n,t}, y_{n,t})

with c the reduction factor (1 for ``sum``, 1/(number of terms that count) for ``mean``,
:meth:`reduction_factor`) and ω_{n,t} ≥ 0 a term weight (0 for an ignored target). A part
provides, per sample n (unscaled, i.e. without c):

* ``per_sample``: ℓ_n (N,);
* ``gradient``: ∇_{f_n} ℓ_n, shaped like ``out``;
* ``hessian_sqrt``: columns S (K, *out.shape) with Σ_k S_k[n] S_k[n]ᵀ = ∂²ℓ_n/∂f_n², the
  output-Hessian factorization H = S Sᵀ (``terms="separate"``: each column lives in one
  loss term; ``terms="joint"``: K-FAC's columns, one per term dimension, on all terms at
  once, so that Σ_k S_k S_kᵀ has H's term blocks plus cross-term blocks that K-FAC's
  "expand" never sees through position-wise layers);
* ``hessian_vector``: w ↦ H w (the same H);
* ``sample_labels`` / ``sampled_gradients``: labels ŷ drawn from the model's predictive
  distribution with a caller's generator, and the columns s with E[s sᵀ] = H per term.

Capabilities (``provides``): :data:`LOSS_GRADIENT`, :data:`LOSS_HESSIAN`,
:data:`LOSS_SAMPLING`; estimators state which they need (``ef``: gradient, ``ggn``'s
diagonal and Kronecker factors: Hessian, ``fisher``: sampling).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, vjp

from curvkit.parts import Part

LOSS_GRADIENT = "loss_gradient"
LOSS_HESSIAN = "loss_hessian"
LOSS_SAMPLING = "loss_sampling"
LOSS_CAPABILITIES = (LOSS_GRADIENT, LOSS_HESSIAN, LOSS_SAMPLING)

Terms = Literal["separate", "joint"]


class LossPart(Part):
    """A family of loss modules, bound to one instance ``loss_fn``."""

    kind = "loss"
    #: the loss module class this part describes (instances of subclasses match too)
    loss_type: ClassVar[type] = nn.Module
    provides = frozenset(LOSS_CAPABILITIES)
    #: why a capability the part does not provide is missing (said in the refusal)
    missing_reason: ClassVar[str] = ""

    def __init__(self, loss_fn: nn.Module, options: Any | None = None) -> None:
        super().__init__(options)
        self.loss_fn = loss_fn
        red = getattr(loss_fn, "reduction", "mean")
        if red not in ("mean", "sum"):
            raise ValueError(f"loss {type(loss_fn).__name__}: reduction={red!r} is not "
                             f"supported; curvature is defined for reduction 'mean' or 'sum'")
        self.reduction: str = red

    # ------------------------------------------------------------------ matching
    @classmethod
    def matches(cls, loss_fn: Any) -> bool:
        """Whether ``loss_fn`` belongs to this part's family (by type)."""
        return isinstance(loss_fn, cls.loss_type)

    @classmethod
    def refusal(cls, loss_fn: Any) -> str:
        """'' if the part handles ``loss_fn``'s settings, else why not (said at build time)."""
        return ""

    # ------------------------------------------------------------------ layout
    def check(self, out: Tensor, y: Tensor, where: str) -> None:
        """Raise a clear error if ``out``/``y`` are not shaped as the loss needs."""
        if out.ndim < 1:
            raise ValueError(f"{where}: loss {type(self.loss_fn).__name__} needs a batched "
                             f"output (N, …), got a scalar")

    def terms(self, t: Tensor, lead: int = 0) -> Tensor:
        """A tensor shaped ``(*lead dims, *out.shape)`` as ``(*lead, N, T, D)``: T loss terms
        per sample of D entries each. Default (curvlinops' convention for losses other than
        cross-entropy): every dimension but the batch and the last one indexes terms."""
        shape = t.shape[lead:]
        N = shape[0]
        D = shape[-1] if len(shape) > 1 else 1
        return t.reshape(*t.shape[:lead], N, -1, D)

    def untermed(self, t: Tensor, shape: torch.Size, lead: int = 0) -> Tensor:
        """Inverse of :meth:`terms` for an output of ``shape``."""
        return t.reshape(*t.shape[:lead], *shape)

    def term_weights(self, out: Tensor, y: Tensor) -> Tensor | None:
        """ω (N, T) when some terms are weighted or ignored, else None (all ω = 1)."""
        return None

    def normalizer(self, out: Tensor, y: Tensor) -> float:
        """What the ``mean`` reduction divides Σ_n ℓ_n by (default: every output entry)."""
        return float(max(out.numel(), 1))

    def reduction_factor(self, out: Tensor, y: Tensor) -> float:
        """c with L = c·Σ_n ℓ_n: 1 for ``sum``, 1/:meth:`normalizer` for ``mean``."""
        if self.reduction == "sum":
            return 1.0
        n = self.normalizer(out, y)
        return 1.0 / n if n > 0 else 0.0

    # ------------------------------------------------------------------ the math
    def per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        """ℓ_n (N,), unscaled: L = c·Σ_n ℓ_n. Differentiable in ``out``."""
        raise RuntimeError(f"loss part {self.name!r} defines no per-sample losses")

    def gradient(self, out: Tensor, y: Tensor) -> Tensor:
        """∇_{f_n} ℓ_n for every sample, shaped like ``out`` (default: autograd)."""
        z = out.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.per_sample(z, y).sum(), z)
        return g

    def hessian_sqrt(self, out: Tensor, y: Tensor, terms: Terms = "separate") -> Tensor:
        """S (K, *out.shape) with Σ_k S_k[n] S_k[n]ᵀ = ∂²ℓ_n/∂f_n² (see the module doc)."""
        raise RuntimeError(f"loss part {self.name!r}: {self.missing_reason or 'no Hessian'}")

    def hessian_vector(self, out: Tensor, y: Tensor) -> Callable[[Tensor], Tensor]:
        """w ↦ (∂²ℓ_n/∂f_n²) w_n for every sample at once (w shaped like ``out``); default:
        reverse-over-reverse on :meth:`per_sample` (H is symmetric)."""
        out = out.detach()
        _, pull = vjp(grad(lambda o: self.per_sample(o, y).sum()), out)
        return lambda w: pull(w.to(out.dtype))[0]

    def sample_labels(self, out: Tensor, mc_samples: int, generator: torch.Generator,
                      rows: tuple[int, int] | None = None) -> Tensor:
        """(M, *target shape): labels drawn from the model's predictive distribution at
        ``out``, only from ``generator``. ``rows = (offset, total)``: these N samples are
        rows offset:offset+N of a global batch of ``total`` (data parallel); the noise is
        drawn for the global batch and sliced, so sharding does not change a sample's draw."""
        raise RuntimeError(f"loss part {self.name!r}: {self.missing_reason or 'no sampling'}")

    def sampled_gradients(self, out: Tensor, y: Tensor, mc_samples: int,
                          generator: torch.Generator, rows: tuple[int, int] | None = None
                          ) -> Tensor:
        """(M, *out.shape): s_m with E[s sᵀ] = ∂²ℓ_n/∂f_n² on every term (unscaled)."""
        raise RuntimeError(f"loss part {self.name!r}: {self.missing_reason or 'no sampling'}")


def global_noise(shape: tuple[int, ...], mc_samples: int, rows: tuple[int, int] | None,
                 generator: torch.Generator, like: Tensor, kind: str = "normal") -> Tensor:
    """(M, N, *shape[1:]) noise for the rows of this batch, drawn for the whole global batch
    (``rows = (offset, total)``) so that a sample's draw depends only on its global index."""
    n = shape[0]
    offset, total = rows if rows is not None else (0, n)
    draw = torch.randn if kind == "normal" else torch.rand
    noise = draw((mc_samples, total, *shape[1:]), generator=generator, dtype=like.dtype,
                 device=like.device)
    return noise[:, offset:offset + n]


def categorical(p: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF draws from the categorical distributions ``p`` (…, C) with uniforms ``u``
    (M, …): the randomness consumed does not depend on the probabilities."""
    C = p.shape[-1]
    cdf = p.cumsum(-1).unsqueeze(0).expand(u.shape[0], *p.shape).contiguous()
    # category k has mass [cdf_{k-1}, cdf_k); the clamp guards cdf_C < 1 from rounding
    labels = torch.searchsorted(cdf, u.unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    return labels.clamp_(max=C - 1)


__all__ = ["LossPart", "LOSS_GRADIENT", "LOSS_HESSIAN", "LOSS_SAMPLING", "LOSS_CAPABILITIES",
           "Terms", "global_noise", "categorical"]
