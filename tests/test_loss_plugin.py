"""The plugin tutorial's loss part ("Add your own likelihood"), registered like a plugin:
found for its loss, value/gradient/Hessian against autograd, K-FAC and Fisher run on it."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn
from torch.func import hessian

import curvkit
from curvkit import registry
from curvkit.hookspecs import hookimpl
from curvkit.losses import loss_part

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugin-tutorial.md"


def tutorial_part() -> type:
    text = DOC.read_text()
    section = text[text.index("## Add your own likelihood"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, str(DOC), "exec"), ns)  # noqa: S102 - our own documentation
    return ns["PoissonLoss"]


def test_tutorial_loss_part_works_as_a_plugin(monkeypatch):
    cls = tutorial_part()

    class Plugin:
        @hookimpl
        def curvkit_parts(self):
            return [cls]

    reg = registry.Registry()
    from curvkit import __version__, builtins
    reg.add_plugin(builtins, "curvkit", f"curvkit {__version__}")
    reg.add_plugin(Plugin(), "poisson", "curvkit-poisson 0.1")
    reg._collect()
    monkeypatch.setattr(registry, "_REGISTRY", reg)
    assert "poisson" in curvkit.components()["loss"]

    loss_fn = nn.PoissonNLLLoss()
    part = loss_part(loss_fn)
    assert part.name == "poisson"
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.poisson(out.exp(), generator=g)
    c = part.reduction_factor(out, y)
    torch.testing.assert_close(c * part.per_sample(out, y).sum(), loss_fn(out, y))
    z = out.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(loss_fn(z, y), z)
    torch.testing.assert_close(c * part.gradient(out, y), ref)
    H = hessian(lambda o: part.per_sample(o, y).sum())(out).reshape(18, 18)
    S = part.hessian_sqrt(out, y)                     # (K, N, 3): per-sample columns
    blocks = torch.einsum("kne,knf->nef", S, S)
    torch.testing.assert_close(torch.block_diag(*blocks), H)

    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(6, 4, generator=g, dtype=torch.float64)
    ggn = curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn)
    fac = ggn.kronecker((X, y))
    assert set(fac) == {"0", "2"}
    fisher = curvkit.create("estimator", "fisher", model=model, loss_fn=loss_fn)
    assert torch.isfinite(fisher.dense((X, y))).all()
