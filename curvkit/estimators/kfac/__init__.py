"""K-FAC (Kronecker factors) of Linear, Conv1d/2d/3d and Embedding layers and of
MultiheadAttention's projections, for ggn, fisher, ef.

Convention (see :class:`curvkit.estimators.base.KroneckerFactors`): for a layer with weight
W (d_out, d_in) — a Conv2d weight viewed as (C_out, C_in·kh·kw) — and a trainable bias b,
W̃ = [W | b], and the curvature block over vec_r(W̃) is approximated by G ⊗ A.

Per sample n the layer sees inputs ã_{n,t} (augmented by a trailing 1 when the bias is
included) at T positions t (T = 1 for a Linear on (N, d_in) inputs; the leading extra dims
of a Linear input, or the output pixels of a Conv2d, are weight-sharing positions). The
curvature is C = Σ_n Σ_k (Σ_t g_{n,t,k} ⊗ ã_{n,t})(Σ_t g_{n,t,k} ⊗ ã_{n,t})ᵀ where
g_{n,t,k} is the gradient w.r.t. the layer output at position t of the scalar ⟨f_n, s_{n,k}⟩,
and the columns s_{n,k} of the output space satisfy Σ_k s_{n,k} s_{n,k}ᵀ = c·B_n with c the
loss' reduction factor and B_n

* ``"exact"`` (KFLR): the loss Hessian ∂²ℓ_n/∂f_n² (its symmetric square root's columns),
* ``"mc"`` (KFAC): (1/M) Σ_m ∇ℓ(f_n, ŷ_m)∇ℓ(f_n, ŷ_m)ᵀ with ŷ_m ~ p(y | f_n),
* ``"empirical"``: ∇ℓ(f_n, y_n)∇ℓ(f_n, y_n)ᵀ with the true labels.

The two weight-sharing flavours of Eschenhagen et al. (2023):

* ``"expand"``: positions are extra samples,
  A = 1/(N·T) Σ_{n,t} ã_{n,t} ã_{n,t}ᵀ,   G = Σ_{n,t,k} g_{n,t,k} g_{n,t,k}ᵀ;
* ``"reduce"``: positions are summed first,
  A = 1/N Σ_n ā_n ā_nᵀ with ā_n = (1/T) Σ_t ã_{n,t},   G = Σ_{n,k} ĝ_{n,k} ĝ_{n,k}ᵀ with
  ĝ_{n,k} = Σ_t g_{n,t,k}.

Both coincide when T = 1. For a single sample and a single layer they are exact
(``expand`` when the loss treats positions separately, ``reduce`` when the positions are
summed before the loss).

**Weight sharing across calls** (a module called several times in one forward, modules of
one type and configuration tied to the same weight and bias): every call u is a further set
of weight-sharing positions, t runs over the positions of all calls (T = Σ_u T_u) in both
formulas. So a Linear called twice on (N, d) inputs has the factors of one call on the
(N, 2, d) stack of the two inputs (the same as curvlinops' KFACLinearOperator computes for
that stacked model, ``expand`` and ``reduce``), and the weight gradient Σ_u Σ_t g ãᵀ is the
true one. (curvlinops, applied to the module called twice, adds the calls' factors, each
normalized by its own positions: A is R times larger under ``expand`` for R calls of equal
T, and ``reduce`` reduces within each call only; the convention here does not depend on
how a model batches its calls.) ``reduce`` is exact for one sample when every use sees
the same input (e.g. one projection applied twice to x): Σ_u g_u ãᵀ = ĝ āᵀ.

**An Embedding tied to a Linear head** (the same matrix in its two orientations) is a
group of two layers; the sum of their Kronecker products (G_h ⊗ A_h for the head, A_e ⊗ G_e
for the Embedding, over the stored weight and the head's bias) is not a Kronecker product,
and is replaced by the upper bound (Σ c_i X_i) ⊗ (Σ Y_i / c_i) with the c_i that minimise
the cross terms' trace — Martens & Grosse's bound for factored damping (``factors.
_combine_group``); it never underestimates either use's curvature. Sharing in another
form — a weight tied while the biases are not, an Embedding tied to several heads — is not
covered: that weight is left to the preconditioner's fallback, with one warning when the
optimizer is built (:func:`~curvkit.estimators.kfac.layers.kfac_exclusions` names the
modules and the way out: untie), and ``structures()`` reports it as the fallback.

Module inputs and output gradients are captured with temporary forward hooks on the
user's model, removed in ``finally``; each hook hands on a copy of the layer output, so a
later in-place operation (``ReLU(inplace=True)``) cannot corrupt the captured tensor. A
module called with several inputs or a grouped convolution raises an error naming the
module. As a guard against any other silently wrong
factor, the weight gradient implied by the captured inputs and output gradients is compared
with the true weight gradient (from the same backward pass); a mismatch (the weight also
used outside the module's forward, a subclass with a different forward) raises too. The
guard is skipped for a layer whose plain use the model's code proves at build
(``KFACLayer.plain``, found by ``layers._plain_uses`` from the fx trace) while no forward
hook could change what the capture records (``capture._needs_check``); it stays wherever
fx cannot show that.

Observed passes (the ``"empirical"`` statistic only): :func:`observe_pass` installs the same
capture, plus tensor hooks for the gradients, around someone else's forward and backward pass
of the loss (the optimizer's). With one column √c·∇_f ℓ_n per sample and the pass delivering
c·∇ℓ_n at every layer output, the statistics follow by dividing those gradients by √c, with
no pass of their own (:func:`_observed_columns`, which also checks that the pass was the
loss' and otherwise leaves the batch to the ordinary path).

The same capture gives exact diagonals (:func:`layer_diagonals`, BackPACK's algorithm for
``DiagGGN*``/``SumGradSquared``), where such layers are left to the caller instead.

Layout of this subpackage: ``layers`` (the handlers, one per module family: Linear,
Conv1d/2d/3d, Embedding; what a layer sees as inputs and output gradients), ``attention``
(MultiheadAttention's in_proj and out_proj as Linear uses), ``capture``
(the own pass: hooks, backpropagated columns, the gradient check), ``observe`` (an
observed pass, and ``captured_columns``: observed, else own), ``factors`` (columns from the
loss part, the one accumulator :func:`kronecker_statistics` — factors, or their square roots
with ``roots=True`` — layer diagonals), ``roots`` (``kronecker_roots``: that accumulator
with ``roots=True``, for the ``kronecker_roots`` capability).
"""

from curvkit.estimators.kfac.factors import (
    STATISTIC_NEEDS,
    Approx,
    Statistic,
    factors_to_dense,
    kronecker_factors,
    kronecker_statistics,
    layer_diagonals,
    output_columns,
)
from curvkit.estimators.kfac.layers import CONV, KFACLayer, kfac_exclusions, kfac_layers
from curvkit.estimators.kfac.observe import Observation, captured_columns, observe_pass
from curvkit.estimators.kfac.roots import kronecker_roots

__all__ = ["kronecker_factors", "kronecker_statistics", "kronecker_roots", "kfac_layers",
           "kfac_exclusions", "captured_columns", "factors_to_dense", "output_columns",
           "layer_diagonals", "Observation", "observe_pass", "STATISTIC_NEEDS", "KFACLayer",
           "CONV", "Statistic", "Approx"]
