"""``backend = "backpack"`` on ggn, fisher and ef: BackPACK's DiagGGNExact / DiagGGNMC /
SumGradSquared / KFLR / KFAC on a private copy of the model, in curvkit's convention.

float64 throughout. Where both backends compute the same quantity (ggn diagonal and KFLR,
the EF diagonal per sample, the A factors) they agree to round-off; the Monte Carlo ones
(fisher) agree in expectation: with many samples both approach the exact GGN. What BackPACK
cannot express in curvkit's convention is refused, naming the option.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import curvkit
from curvkit._optional import MissingExtraError

pytest.importorskip("backpack")
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook")


def _mlp() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), torch.randn(6, 4)


def _cnn() -> tuple[nn.Module, torch.Tensor]:
    return (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)),
            torch.randn(6, 2, 5, 5))


def _seq() -> tuple[nn.Module, torch.Tensor]:
    """Per-position logits (N, C, L): several loss terms per sample."""
    return nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 3, 1)), \
        torch.randn(5, 2, 7)


def _problem(arch: str, loss: str, reduction: str):
    torch.manual_seed(0)
    model, X = {"mlp": _mlp, "cnn": _cnn, "seq": _seq}[arch]()
    model = model.double()
    X = X.double()
    if loss == "ce":
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        y = torch.randint(0, 3, (X.shape[0], *([7] if arch == "seq" else [])))
    else:
        loss_fn = nn.MSELoss(reduction=reduction)
        y = torch.randn(X.shape[0], 3, *([7] if arch == "seq" else []), dtype=torch.float64)
    return model, loss_fn, X, y


def _pair(name: str, model, loss_fn, **options):
    a = curvkit.create("estimator", name, model=model, loss_fn=loss_fn, **options)
    b = curvkit.create("estimator", name, model=model, loss_fn=loss_fn, backend="backpack",
                       **options)
    return a, b


def _close(xs, ys, tol=1e-10) -> None:
    for x, y in zip(xs, ys, strict=True):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * (1 + float(x.detach().abs().max())))


@pytest.mark.parametrize("arch", ["mlp", "cnn", "seq"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_diagonals_agree(arch, loss, reduction):
    model, loss_fn, X, y = _problem(arch, loss, reduction)
    a, b = _pair("ggn", model, loss_fn)
    if arch == "seq" and loss == "mse":
        # BackPACK's MSELoss takes (N, C) outputs only
        _refused("MSELoss takes \\(N, C\\) outputs", lambda: b.diagonal((X, y)))
    else:
        _close(a.diagonal((X, y)), b.diagonal((X, y)))
    # the EF per sample: BackPACK's per-sample gradients sum a sample's loss terms
    a, b = _pair("ef", model, loss_fn, outer_products="per_sample")
    _close(a.diagonal((X, y)), b.diagonal((X, y)))
    # several batches: weighted like the autograd backend (count-weighted mean, or summed)
    X2, y2 = X[:3] * 0.5, y[:3]
    batches = [(X, y), (X2, y2)]
    _close(a.diagonal(batches), b.diagonal(batches))


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kflr_agrees(loss, reduction):
    model, loss_fn, X, y = _problem("mlp", loss, reduction)
    model[0].bias.requires_grad_(False)  # a layer without a trainable bias, and one with
    X2, y2 = X[:4] + 1.0, y[:4]
    for batch in ((X, y), [(X, y), (X2, y2)]):
        a, b = _pair("ggn", model, loss_fn)
        ka, kb = a.kronecker(batch), b.kronecker(batch)
        assert list(ka) == list(kb) == ["0", "2"]
        for n in ka:
            assert ka[n].params == kb[n].params
            _close([ka[n].A, ka[n].G], [kb[n].A, kb[n].G])


def test_bias_alone_gets_g():
    """A frozen weight with a trainable bias: the bias' G and A = [1], as autograd."""
    model, loss_fn, X, y = _problem("mlp", "ce", "mean")
    model[2].weight.requires_grad_(False)
    a, b = _pair("ggn", model, loss_fn)
    ka, kb = a.kronecker((X, y)), b.kronecker((X, y))
    assert kb["2"].params == ("2.bias",) and kb["2"].A.shape == (1, 1)
    _close([ka["2"].A, ka["2"].G], [kb["2"].A, kb["2"].G])


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_fisher_is_the_ggn_in_expectation(loss):
    """DiagGGNMC and KFAC with many samples approach the exact GGN's diagonal and KFLR's G;
    A is deterministic and equal; repeated calls are identical (the estimator's seed and
    draw), the caller's RNG is untouched, a new draw gives new samples."""
    model, loss_fn, X, y = _problem("mlp", loss, "mean")
    ggn = curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn)
    fisher = curvkit.create("estimator", "fisher", model=model, loss_fn=loss_fn,
                            backend="backpack", mc_samples=4000, seed=3)
    exact, kexact = ggn.diagonal((X, y)), ggn.kronecker((X, y))
    state = torch.random.get_rng_state()
    d1 = fisher.diagonal((X, y))
    k1 = fisher.kronecker((X, y))
    assert torch.equal(torch.random.get_rng_state(), state)
    for e, d in zip(exact, d1):
        assert float((e - d).norm() / e.norm()) < 0.08
    for n in kexact:
        torch.testing.assert_close(k1[n].A, kexact[n].A, rtol=1e-12, atol=1e-12)
        assert float((k1[n].G - kexact[n].G).norm() / kexact[n].G.norm()) < 0.08
    _close(d1, fisher.diagonal((X, y)), tol=0.0)
    fisher.advance()
    assert any(not torch.equal(u, v) for u, v in zip(d1, fisher.diagonal((X, y))))


def test_user_model_not_extended_and_copy_follows_parameters():
    model, loss_fn, X, y = _problem("mlp", "ce", "mean")
    a, b = _pair("ggn", model, loss_fn)
    b.diagonal((X, y))
    # no BackPACK hook or attribute on the user's model: torch.func still works on it
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert not any(hasattr(m, "_backpack_extend") for m in model.modules())
    v = [torch.randn_like(p) for p in model.parameters()]
    _close(a.matvec((X, y), v), b.matvec((X, y), v))
    curvkit.create("estimator", "hessian", model=model, loss_fn=loss_fn).matvec((X, y), v)
    # the copy shares the parameters' storage: an in-place update is seen without a copy
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    _close(a.diagonal((X, y)), b.diagonal((X, y)))
    # a replaced storage is followed too
    model[0].weight.data = torch.randn_like(model[0].weight)
    _close(a.diagonal((X, y)), b.diagonal((X, y)))


def test_no_reference_cycle_keeps_the_copy_alive():
    """The estimator and its backend form no cycle: dropping the estimator frees the model
    copy at once, without the garbage collector."""
    import gc
    import weakref

    model, loss_fn, X, y = _problem("mlp", "ce", "mean")
    gc.collect()
    gc.disable()
    try:
        est = curvkit.create("estimator", "fisher", model=model, loss_fn=loss_fn,
                             backend="backpack")
        est.kronecker((X, y))
        copy_ref = weakref.ref(est._backpack._copy)
        del est
        assert copy_ref() is None
    finally:
        gc.enable()


def test_optimizer_trajectory_matches_autograd():
    """ggn + kronecker + direct: the same parameters after three steps with either backend."""
    model, loss_fn, X, y = _problem("mlp", "ce", "mean")
    models = [model, __import__("copy").deepcopy(model)]
    opts = [curvkit.build_optimizer(m, loss_fn, {
        "lr": 0.1, "estimator": {"name": "ggn", "backend": backend},
        "preconditioner": {"name": "kronecker", "damping": 1e-2}, "solver": "direct"})
        for m, backend in zip(models, ["autograd", "backpack"])]
    for _ in range(3):
        for opt in opts:
            opt.step((X, y))
    _close(list(models[0].parameters()), list(models[1].parameters()), tol=1e-9)


# ----------------------------------------------------------------------------- refusals
def _refused(match: str, fn) -> None:
    with pytest.raises(ValueError, match=match):
        fn()


def test_refusals_name_the_option_and_the_reason():
    model, loss_fn, X, y = _problem("mlp", "ce", "mean")
    ef = curvkit.create("estimator", "ef", model=model, loss_fn=loss_fn, backend="backpack")
    assert "no empirical K-FAC" in ef.refusal("kronecker")
    _refused("backend = 'backpack'.*no empirical K-FAC", lambda: curvkit.build_optimizer(
        model, loss_fn, {"estimator": {"name": "ef", "backend": "backpack"},
                         "preconditioner": "kronecker", "solver": "direct"}))
    # convolutions: BackPACK's K-FAC is neither expand nor reduce
    cnn, _, Xc, yc = _problem("cnn", "ce", "mean")
    ggn = curvkit.create("estimator", "ggn", model=cnn, loss_fn=loss_fn, backend="backpack")
    _refused("module 0 \\(Conv2d\\).*kfac_approx", lambda: ggn.kronecker((Xc, yc)))
    _refused("needs Kronecker factors.*Conv2d", lambda: curvkit.build_optimizer(
        cnn, loss_fn, {"estimator": {"name": "fisher", "backend": "backpack"},
                       "preconditioner": "kronecker", "solver": "direct"}))
    # a module BackPACK does not know, a custom container: at build
    ln = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    _refused("no extension for module 1 \\(LayerNorm\\)", lambda: curvkit.create(
        "estimator", "ggn", model=ln, loss_fn=loss_fn, backend="backpack"))

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)

        def forward(self, x):
            return self.a(x).tanh()

    _refused("Custom", lambda: curvkit.create("estimator", "fisher", model=Custom().double(),
                                              loss_fn=loss_fn, backend="backpack"))
    # a module called twice (its one stored input would be overwritten), a tied parameter
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.a(x))

    ef = curvkit.create("estimator", "ef", model=Twice().double(), loss_fn=loss_fn,
                        backend="backpack")
    _refused("module a \\(Linear\\) is called more than once",
             lambda: ef.diagonal((X, y % 3)))
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).double()
    tied[2].weight = tied[0].weight
    _refused("modules 0, 2 hold one parameter", lambda: curvkit.create(
        "estimator", "ggn", model=tied, loss_fn=loss_fn, backend="backpack"))
    # losses and settings BackPACK does not support (second-order extensions)
    for bad in (nn.HuberLoss(), nn.CrossEntropyLoss(label_smoothing=0.1)):
        _refused("backend = 'autograd'", lambda bad=bad: curvkit.create(
            "estimator", "ggn", model=model, loss_fn=bad, backend="backpack"))
    # BatchNorm in training mode couples the samples
    bn = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    _refused("BatchNorm1d.*training mode", lambda: curvkit.create(
        "estimator", "ggn", model=bn, loss_fn=loss_fn, backend="backpack"))
    bn.eval()
    a, b = _pair("ggn", bn, loss_fn)
    _close(a.diagonal((X, y)), b.diagonal((X, y)))
    # the EF per loss term with several terms per sample: not what BackPACK computes
    seq, loss_fn, Xs, ys = _problem("seq", "ce", "mean")
    ef = curvkit.create("estimator", "ef", model=seq, loss_fn=loss_fn, backend="backpack")
    _refused("outer_products = 'per_sample'", lambda: ef.diagonal((Xs, ys)))
    # a Linear on (N, T, d) inputs: no per-sample K-FAC in BackPACK
    ggn = curvkit.create("estimator", "ggn", model=_problem("mlp", "ce", "mean")[0],
                         loss_fn=nn.CrossEntropyLoss(), backend="backpack")
    _refused("BackPACK's K-FAC takes \\(N, d_in\\)", lambda: ggn.kronecker(
        (torch.randn(6, 2, 4, dtype=torch.float64), torch.randint(0, 3, (6, 3, 2)))))
    # unknown backend: the options say which exist
    with pytest.raises(curvkit.errors.ConfigError, match="'autograd', 'backpack'"):
        curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn, backend="torch")


def test_missing_extra_is_named(monkeypatch):
    model, loss_fn, _, _ = _problem("mlp", "ce", "mean")
    monkeypatch.setitem(sys.modules, "backpack", None)
    with pytest.raises(MissingExtraError, match=r'curvkit\[backpack\]'):
        curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn, backend="backpack")
