"""The suite every ``loss`` part inherits: its math against autograd on the loss module itself.

A loss part (kind ``loss``) describes a family of PyTorch loss modules to the estimators:
the reduction factor c, per-sample losses ℓ_n (L = c·Σ_n ℓ_n), the output gradient, a
factorization H = S Sᵀ of the output Hessian, Hessian-vector products and label sampling.
A test class names the part and gives cases (a loss module, an output, targets)::

    from curvkit.testing import LossCase, LossSuite

    class TestMSE(LossSuite):
        name = "mse"
        def cases(self):
            g = torch.Generator().manual_seed(0)
            out = torch.randn(4, 3, generator=g, dtype=torch.float64)
            return [LossCase("sum", nn.MSELoss(reduction="sum"), out, torch.randn_like(out)),
                    LossCase("mean", nn.MSELoss(), out, torch.randn_like(out))]

Every reference is autograd on ``loss_fn(out, y)`` itself (the dense output Hessian by
``torch.autograd.functional.hessian``), so the part is checked against the module it
describes, in float64. Sampling is checked statistically (``mc_samples`` draws; the mean of
s sᵀ against H within ``mc_rtol``) and for not touching the global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import curvkit


@dataclass
class LossCase:
    """One loss module on one output (float64) and its targets."""

    id: str
    loss_fn: nn.Module
    out: Tensor
    y: Tensor


class LossSuite:
    """Inherit, set ``name`` and implement :meth:`cases` (see the module docstring)."""

    name: ClassVar[str] = ""
    mc_samples: ClassVar[int] = 20000
    mc_rtol: ClassVar[float] = 0.05
    rtol: ClassVar[float] = 1e-9
    atol: ClassVar[float] = 1e-11

    def cases(self) -> list[LossCase]:
        raise AssertionError(f"{type(self).__name__} must define cases()")

    # ------------------------------------------------------------------ helpers
    def part(self, case: LossCase) -> Any:
        return curvkit.create("loss", self.name, loss_fn=case.loss_fn)

    def provides(self, capability: str) -> bool:
        return capability in curvkit.get_registry().get("loss", self.name).provides

    def close(self, actual: Tensor, expected: Tensor, what: str, case: LossCase) -> None:
        scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
        torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=self.rtol,
                                   atol=self.atol * scale,
                                   msg=lambda m: f"{self.name} [{case.id}] {what}: {m}")

    @staticmethod
    def output_hessian(case: LossCase) -> Tensor:
        """∂²L/∂out² (M × M, M = out.numel()) by autograd on the loss module."""
        out = case.out.detach()
        H = torch.autograd.functional.hessian(lambda o: case.loss_fn(o, case.y), out)
        return H.reshape(out.numel(), out.numel())

    def each_case(self):
        cases = self.cases()
        assert cases, "cases() returned no case"
        for case in cases:
            yield case, self.part(case)

    # ------------------------------------------------------------------ the tests
    def test_registered_and_matching(self) -> None:
        spec = curvkit.get_registry().get("loss", self.name)
        assert spec.kind == "loss"
        for case, _ in self.each_case():
            assert spec.cls.matches(case.loss_fn), case.id
            assert spec.cls.refusal(case.loss_fn) == "", case.id

    def test_per_sample_losses_add_up_to_the_loss(self) -> None:
        for case, part in self.each_case():
            ell = part.per_sample(case.out, case.y)
            assert ell.shape == (case.out.shape[0],), case.id
            c = part.reduction_factor(case.out, case.y)
            self.close(c * ell.sum(), case.loss_fn(case.out, case.y), "c·Σ ℓ_n = L", case)

    def test_gradient_is_the_output_gradient(self) -> None:
        for case, part in self.each_case():
            out = case.out.detach().requires_grad_(True)
            (ref,) = torch.autograd.grad(case.loss_fn(out, case.y), out)
            g = part.gradient(case.out, case.y)
            assert g.shape == case.out.shape, case.id
            c = part.reduction_factor(case.out, case.y)
            self.close(c * g, ref, "c·∇ℓ = ∇L", case)

    def test_hessian_vector_products(self) -> None:
        gen = torch.Generator().manual_seed(1)
        for case, part in self.each_case():
            H = self.output_hessian(case)
            c = part.reduction_factor(case.out, case.y)
            hv = part.hessian_vector(case.out, case.y)
            for _ in range(2):
                w = torch.randn(case.out.shape, generator=gen, dtype=case.out.dtype)
                got = hv(w)
                assert got.shape == case.out.shape, case.id
                self.close(c * got.reshape(-1), H @ w.reshape(-1), "c·H w", case)

    def test_hessian_sqrt_factorizes_each_sample_block(self) -> None:
        from curvkit.losses.base import LOSS_HESSIAN

        if not self.provides(LOSS_HESSIAN):
            pytest.skip(f"loss {self.name!r} provides no output Hessian")
        for case, part in self.each_case():
            H = self.output_hessian(case)
            c = part.reduction_factor(case.out, case.y)
            S = part.hessian_sqrt(case.out, case.y)
            assert S.shape[1:] == case.out.shape, case.id
            N = case.out.shape[0]
            per = case.out[0].numel()
            blocks = H.reshape(N, per, N, per)
            for n in range(N):
                cols = S[:, n].reshape(S.shape[0], per)
                self.close(c * cols.T @ cols, blocks[n, :, n], f"c·S Sᵀ, sample {n}", case)
                for m in range(N):  # the loss adds over samples: no cross-sample curvature
                    if m != n:
                        assert float(blocks[n, :, m].abs().max()) == 0.0, case.id

    def test_sampled_gradients_have_the_hessian_as_second_moment(self) -> None:
        from curvkit.losses.base import LOSS_SAMPLING

        if not self.provides(LOSS_SAMPLING):
            pytest.skip(f"loss {self.name!r} provides no sampling")
        for case, part in self.each_case():
            H = self.output_hessian(case)
            c = part.reduction_factor(case.out, case.y)
            rng = torch.get_rng_state()
            gen = torch.Generator().manual_seed(5)
            s = part.sampled_gradients(case.out, case.y, self.mc_samples, gen)
            assert torch.equal(rng, torch.get_rng_state()), "used the global RNG"
            assert s.shape == (self.mc_samples, *case.out.shape), case.id
            N = case.out.shape[0]
            per = case.out[0].numel()
            flat = s.reshape(self.mc_samples, N, per)
            blocks = H.reshape(N, per, N, per)
            for n in range(N):
                moment = c * flat[:, n].T @ flat[:, n] / self.mc_samples
                ref = blocks[n, :, n]
                err = float((moment - ref).abs().max())
                assert err <= self.mc_rtol * max(float(ref.abs().max()), 1e-12), \
                    f"{self.name} [{case.id}] E[s sᵀ] vs H, sample {n}: max error {err:.3g}"
            again = part.sampled_gradients(case.out, case.y, self.mc_samples,
                                           torch.Generator().manual_seed(5))
            assert torch.equal(s, again), "the same generator seed must give the same draw"
