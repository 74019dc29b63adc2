"""``kronecker`` (K-FAC): apply against (G ⊗ A + damping)⁻¹ vec(grad) built densely.

The reference builds the full P×P preconditioner matrix in the model's own parameter
flattening (weights flattened row-major, biases after them, fallback parameters on the
diagonal) from the estimator's factors with ``torch.kron`` and solves with it, so the vec
order, the bias column and the damping forms are all checked against the formula.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit.errors import ConfigError, IncompatibleError
from curvkit.testing.preconditioner import Case, Context, PreconditionerSuite, ema_average
from curvkit.testing.problems import Problem, make_data, make_loss, mlp, param_offsets, problem


def layernorm_problem(seed: int = 1, n: int = 6, batches: int = 3) -> Problem:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(),
                          nn.Linear(5, 3, bias=False)).to(torch.float64)
    with torch.no_grad():  # a non-trivial LayerNorm affine part
        model[1].weight.add_(0.3 * torch.randn(5, dtype=torch.float64))
        model[1].bias.add_(0.2 * torch.randn(5, dtype=torch.float64))
    data = [make_data("mlp", "ce", n, 3, seed=seed * 100 + i) for i in range(batches)]
    return Problem(model, make_loss("ce"), data)


def unused_layer_problem(seed: int = 1) -> Problem:
    class WithSpare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.spare = nn.Linear(4, 3)  # trainable but never called

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    torch.manual_seed(seed)
    data = [make_data("mlp", "mse", 6, 3, seed=seed * 100 + i) for i in range(2)]
    return Problem(WithSpare().to(torch.float64), make_loss("mse"), data)


def dense_preconditioner(ctx: Context, options: dict) -> torch.Tensor:
    """The P×P matrix K-FAC applies the inverse of, from the estimator's factors."""
    damping = options.get("damping", 1e-3)
    ema = options.get("ema", 0.95)
    bias_correction = options.get("bias_correction", True)
    form = options.get("damping_form", "factored")
    fallback = options.get("fallback", "diagonal")
    factors = ctx.each_update(lambda est, b: est.kronecker(b))
    named = [(n, p) for n, p in ctx.problem.model.named_parameters() if p.requires_grad]
    offset, P = param_offsets(ctx.problem.model)
    M = torch.zeros(P, P, dtype=torch.float64)
    covered = set()
    for mod in factors[-1]:
        kf = factors[-1][mod]
        A = ema_average([f[mod].A for f in factors], ema, bias_correction)
        G = ema_average([f[mod].G for f in factors], ema, bias_correction)
        if form == "exact":
            K = torch.kron(G, A) + damping * torch.eye(G.shape[0] * A.shape[0],
                                                        dtype=torch.float64)
        else:
            pi = 1.0
            if options.get("pi_correction", False):
                pi = math.sqrt((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0]))
            r = math.sqrt(damping)
            K = torch.kron(G + r / pi * torch.eye(G.shape[0], dtype=torch.float64),
                           A + pi * r * torch.eye(A.shape[0], dtype=torch.float64))
        # row i of W̃ = [W | b] holds (W[i, :], b[i]); map vec_r(W̃) → [vec(W), b]
        d_out, d_aug = G.shape[0], A.shape[0]
        w_name = kf.params[0]
        d_in = dict(named)[w_name].numel() // d_out
        coords = []
        for i in range(d_out):
            for j in range(d_aug):
                if j < d_in:
                    coords.append(offset[w_name] + i * d_in + j)
                else:
                    coords.append(offset[kf.params[1]] + i)
        idx = torch.tensor(coords)
        M[idx[:, None], idx[None, :]] = K
        covered.update(kf.params)
    if fallback == "diagonal":
        diag = ema_average(ctx.each_update(lambda est, b: torch.diagonal(est.dense(b)).clone()),
                           ema, bias_correction)
    for n, p in named:
        if n in covered:
            continue
        idx = torch.arange(offset[n], offset[n] + p.numel())
        if fallback == "diagonal":
            M[idx, idx] = diag[idx].clamp_min(0) + damping
        else:
            M[idx, idx] = 1.0
    return M


class TestKronecker(PreconditionerSuite):
    name = "kronecker"
    train_lr = 0.5

    def cases(self) -> list[Case]:
        return [
            Case("mlp-ce-cholesky", {"damping": 1e-2, "ema": 0.0}),
            Case("mlp-mse-sum-eigh", {"damping": 1e-2, "inverse": "eigh", "ema": 0.0},
                 loss="mse", reduction="sum"),
            Case("mlp-nobias-cholesky", {"damping": 1e-2, "ema": 0.0},
                 build=lambda: Problem(mlp(bias=False, seed=2), make_loss("mse"),
                                       [make_data("mlp", "mse", 6, 3, seed=7)])),
            Case("cnn-ce-pi", {"damping": 1e-2, "pi_correction": True, "ema": 0.0},
                 arch="cnn"),
            Case("cnn-mse-exact", {"damping": 1e-3, "inverse": "eigh",
                                   "damping_form": "exact", "ema": 0.0},
                 arch="cnn", loss="mse"),
            Case("mlp-exact-ema", {"damping": 1e-3, "inverse": "eigh", "damping_form": "exact",
                                   "ema": 0.8}, updates=3),
            Case("cnn-pi-eigh-ema-uncorrected", {"damping": 1e-2, "pi_correction": True,
                                                 "inverse": "eigh", "ema": 0.6,
                                                 "bias_correction": False},
                 arch="cnn", updates=2),
            Case("fisher-cnn-ema", {"damping": 1e-2, "ema": 0.7}, estimator="fisher",
                 estimator_options={"mc_samples": 2}, arch="cnn", updates=2),
            Case("ef-mlp-mse-sum", {"damping": 1e-2, "ema": 0.0}, estimator="ef", loss="mse",
                 reduction="sum"),
            Case("fisher-layernorm-fallback", {"damping": 1e-2, "ema": 0.0}, estimator="fisher",
                 build=layernorm_problem),
            Case("layernorm-fallback-diagonal", {"damping": 1e-2, "ema": 0.5},
                 build=layernorm_problem, updates=2),
            Case("layernorm-fallback-identity", {"damping": 1e-2, "fallback": "identity",
                                                 "pi_correction": True},
                 build=layernorm_problem),
        ]

    def train_case(self) -> Case:
        # K-FAC as Martens & Grosse: the MC Fisher, Kronecker factors, a direct step
        return Case("train", {"damping": 0.1, "ema": 0.9}, estimator="fisher", n=16)

    def reference(self, case: Case, ctx: Context) -> list[torch.Tensor]:
        M = dense_preconditioner(ctx, case.options)
        g = torch.cat([d.reshape(-1) for d in ctx.direction])
        x = torch.linalg.solve(M, g)
        out, start = [], 0
        for d in ctx.direction:
            out.append(x[start:start + d.numel()].reshape(d.shape))
            start += d.numel()
        return out


def test_layernorm_parameters_use_the_fallback():
    prob = layernorm_problem()
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "estimator": "ggn", "preconditioner": {"name": "kronecker", "damping": 0.1}})
    want = {"0.weight": "kronecker", "0.bias": "kronecker", "1.weight": "diagonal",
            "1.bias": "diagonal", "3.weight": "kronecker"}
    assert opt.structures() == want
    opt.step(prob.batches[0])
    assert opt.structures() == want
    assert opt.last_info["kfac_fallback_params"] == 2
    assert set(opt.preconditioner.state["fallback_diag"]) == {"1.weight", "1.bias"}


def test_fallback_decides_requirements():
    prob = layernorm_problem()
    cls = curvkit.get_registry().get("preconditioner", "kronecker").cls
    diag = curvkit.create("preconditioner", "kronecker", model=prob.model)
    ident = curvkit.create("preconditioner", "kronecker", model=prob.model, fallback="identity")
    assert cls.requirements(diag.options) == {"kronecker", "diagonal"}
    assert cls.requirements(ident.options) == {"kronecker"}


def test_hessian_is_refused_naming_the_providers():
    prob = problem("mlp", "ce")
    with pytest.raises(IncompatibleError) as err:
        curvkit.build_optimizer(prob.model, prob.loss_fn, {
            "estimator": "hessian", "preconditioner": "kronecker"})
    msg = str(err.value)
    assert "preconditioner 'kronecker' needs capability 'kronecker'" in msg, msg
    providers = curvkit.get_registry().providers("kronecker")
    assert "ggn" in providers
    assert all(p in msg for p in providers), msg


def test_uncovered_linear_falls_back_with_a_warning():
    prob = unused_layer_problem()
    est = curvkit.create("estimator", "ggn", model=prob.model, loss_fn=prob.loss_fn)
    pre = curvkit.create("preconditioner", "kronecker", model=prob.model, fallback="identity")
    assert pre.structures()["spare.weight"] == "kronecker"  # predicted before any update
    with pytest.warns(UserWarning, match=r"no Kronecker factors for Linear module 'spare'"):
        pre.update(est, prob.batches[0], [])
    assert pre.structures() == {"fc.weight": "kronecker", "fc.bias": "kronecker",
                                "spare.weight": "identity", "spare.bias": "identity"}
    d = [torch.randn_like(p) for p in prob.params]
    out = pre.apply(d)
    assert torch.equal(out[2], d[2]) and torch.equal(out[3], d[3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre.update(est, prob.batches[1], [])  # warned once only


def test_invert_every_keeps_the_previous_inverse():
    prob = problem("mlp", "mse", n=6, num_batches=3, seed=3)
    est = curvkit.create("estimator", "ggn", model=prob.model, loss_fn=prob.loss_fn)
    opts = {"damping": 1e-2, "ema": 0.0, "update_every": 1, "invert_every": 2}
    pre = curvkit.create("preconditioner", "kronecker", model=prob.model, **opts)
    only_first = curvkit.create("preconditioner", "kronecker", model=prob.model,
                                **{**opts, "invert_every": 1})
    every = curvkit.create("preconditioner", "kronecker", model=prob.model,
                           **{**opts, "invert_every": 1})
    d = [torch.randn_like(p) for p in prob.params]
    pre.update(est, prob.batches[0], [])
    only_first.update(est, prob.batches[0], [])
    pre.update(est, prob.batches[1], [])          # factors refreshed, not inverted
    every.update(est, prob.batches[1], [])
    assert pre.info()["kfac_inverted"] == 0
    for a, b in zip(pre.apply(d), only_first.apply(d)):
        assert torch.equal(a, b)
    assert torch.equal(pre.state["factors"]["0"]["A"], every.state["factors"]["0"]["A"])
    pre.update(est, prob.batches[1], [])          # third update: inverted again
    assert pre.info()["kfac_inverted"] == 2
    for a, b in zip(pre.apply(d), every.apply(d)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_update_and_invert_every_through_the_optimizer():
    prob = problem("mlp", "ce", n=8)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "lr": 0.1, "estimator": "ggn",
        "preconditioner": {"name": "kronecker", "update_every": 2, "invert_every": 4,
                           "damping": 0.1}})
    inverted = []
    for step in range(9):
        opt.step(prob.batches[0])
        if "kfac_inverted" in opt.last_info:
            inverted.append((step, opt.last_info["kfac_inverted"]))
    # factors on steps 0, 2, 4, 6, 8; both layers inverted on steps 0, 4, 8
    assert inverted == [(0, 2), (2, 0), (4, 2), (6, 0), (8, 2)]
    assert opt.preconditioner.state["updates"] == 5


def test_default_invert_every_inverts_at_every_update():
    prob = problem("mlp", "ce", n=8)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "lr": 0.1, "estimator": "ggn",
        "preconditioner": {"name": "kronecker", "update_every": 3, "damping": 0.1}})
    inverted = []
    for step in range(7):
        opt.step(prob.batches[0])
        if "kfac_inverted" in opt.last_info:
            inverted.append((step, opt.last_info["kfac_inverted"]))
    assert inverted == [(0, 2), (3, 2), (6, 2)]


def test_invert_every_must_be_a_multiple_of_update_every():
    prob = problem("mlp", "ce")
    with pytest.raises(ConfigError, match=r"optimizer\.preconditioner: invert_every: must be "
                                          r"a multiple of update_every \(2\), got 3"):
        curvkit.build_optimizer(prob.model, prob.loss_fn, {
            "preconditioner": {"name": "kronecker", "update_every": 2, "invert_every": 3}})
    with pytest.raises(ConfigError, match=r"damping_form: 'exact' needs inverse = 'eigh'"):
        curvkit.create("preconditioner", "kronecker", model=prob.model, damping_form="exact")
    with pytest.raises(ConfigError, match=r"pi_correction: only applies"):
        curvkit.create("preconditioner", "kronecker", model=prob.model, inverse="eigh",
                       damping_form="exact", pi_correction=True)


@pytest.mark.parametrize("inv_dtype,want", [("auto", torch.float32),
                                            ("float64", torch.float64)])
def test_bfloat16_model_inverts_in_higher_precision(inv_dtype, want):
    prob = problem("cnn", "ce", n=16, dtype=torch.bfloat16)
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "lr": 0.2, "estimator": "ggn",
        "preconditioner": {"name": "kronecker", "damping": 0.1, "inv_dtype": inv_dtype}})
    losses = [float(opt.step(prob.batches[0])) for _ in range(4)]
    assert opt.counters["nonfinite"] == 0, opt.last_info
    state = opt.preconditioner.state
    for mod in state["factors"]:
        assert state["factors"][mod]["A"].dtype == want
        # explicit inverses or Cholesky factors ("LA"/"LG"), whichever form was kept
        assert all(t.dtype == want for t in state["inverses"][mod].values())
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in prob.params)
    assert losses[-1] < losses[0]


def test_pi_factor_matches_the_trace_formula_and_is_guarded():
    from curvkit.preconditioners.kronecker import pi_factor

    A = torch.diag(torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64))
    G = torch.diag(torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert pi_factor(A, G) == pytest.approx(math.sqrt((6.0 / 3) / (1.0 / 2)))
    assert pi_factor(A, torch.zeros(2, 2, dtype=torch.float64)) == 1.0


@pytest.mark.parametrize("inverse", ["cholesky", "eigh"])
def test_state_dtype_bfloat16_keeps_factors_and_inverses_in_bfloat16(inverse, monkeypatch):
    """Issue 16 item 4: state_dtype = bfloat16 stores the factor averages and the inverses in
    bfloat16 (the SINGD claim's setting); the inversion runs in float32, the lowest dtype
    torch's eigh/Cholesky support here, and the direction matches the float32 state's to
    bfloat16 rounding."""
    from curvkit.preconditioners import kronecker as kron_mod

    assert kron_mod.linalg_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    seen = []
    real = kron_mod.psd_inverse

    def spy(matrix, *args, **kwargs):
        seen.append(matrix.dtype)
        return real(matrix, *args, **kwargs)

    monkeypatch.setattr(kron_mod, "psd_inverse", spy)
    prob = problem("mlp", "ce", n=16, dtype=torch.float32)
    pres = {}
    for dt in ("bfloat16", "inherit"):
        pre = curvkit.create("preconditioner", "kronecker", model=prob.model, damping=0.1,
                             inverse=inverse, state_dtype=dt)
        est = curvkit.create("estimator", "ggn", model=prob.model, loss_fn=prob.loss_fn)
        pre.update(est, prob.batches[0], [torch.zeros_like(p) for p in prob.params])
        pres[dt] = pre
    state = pres["bfloat16"].state
    for mod in state["factors"]:
        assert state["factors"][mod]["A"].dtype == torch.bfloat16
        assert state["inverses"][mod]["A"].dtype == torch.bfloat16
        assert pres["inherit"].state["inverses"][mod]["A"].dtype == torch.float32
    assert torch.bfloat16 not in seen and torch.float32 in seen
    g = [torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) for p in prob.params]
    low, ref = pres["bfloat16"].apply(g), pres["inherit"].apply(g)
    for a, b in zip(low, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * float(b.abs().max()))


def test_a_thin_layers_big_factor_is_applied_by_cholesky_solves():
    """A factor n ≥ 256 and ≥ 4× the other is kept as its Cholesky factor (no n³ inverse):
    the direction equals (G + √δ I)⁻¹ M (A + √δ I)⁻¹ from the stored factors."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 300), torch.nn.Tanh(),
                                torch.nn.Linear(300, 3)).double()
    X, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    loss_fn = torch.nn.CrossEntropyLoss()
    pre = curvkit.create("preconditioner", "kronecker", model=model, damping=1e-2, ema=0.0)
    est = curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn)
    params = list(model.parameters())
    pre.update(est, (X, y), [torch.zeros_like(p) for p in params])
    inv = pre.state["inverses"]
    assert set(inv["2"]) == {"LA", "G"} and set(inv["0"]) == {"A", "LG"}
    g = [torch.randn_like(p) for p in params]
    out = pre.apply(g)
    root = 0.1
    for mod, (w, b) in (("0", (0, 1)), ("2", (2, 3))):
        A, G = pre.state["factors"][mod]["A"], pre.state["factors"][mod]["G"]
        M = torch.cat([g[w], g[b][:, None]], 1)
        R = torch.linalg.solve(G + root * torch.eye(len(G), dtype=G.dtype), M) @ \
            torch.linalg.inv(A + root * torch.eye(len(A), dtype=A.dtype))
        torch.testing.assert_close(torch.cat([out[w], out[b][:, None]], 1), R, rtol=1e-9,
                                   atol=1e-12)


def test_factors_applied_once_are_kept_as_cholesky_factors_with_the_same_direction():
    """Told by the optimizer that each step applies P⁻¹ once (``direct``'s
    ``applications_per_step``) and inverting every step, every factor is kept as its
    Cholesky factor and applied by triangular solves; the direction equals the explicit
    inverses' and (G + √δ I)⁻¹ M (A + √δ I)⁻¹ computed densely. Applied more often
    (invert_every = 2, or a solver that does not declare a count) the inverses are
    formed. Widths 40 and 7/3 reach both branches of the solves (≥ 32 and < 32 rows)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Tanh(),
                                torch.nn.Linear(40, 3)).double()
    X, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    loss_fn = torch.nn.CrossEntropyLoss()
    est = curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn)
    params = list(model.parameters())
    zeros = [torch.zeros_like(p) for p in params]
    g = [torch.randn_like(p) for p in params]
    out = {}
    for label, per_step, invert_every in (("once", 1, 0), ("explicit", None, 0),
                                          ("twice", 1, 2)):
        pre = curvkit.create("preconditioner", "kronecker", model=model, damping=1e-2,
                             ema=0.0, invert_every=invert_every)
        pre.expect_applications(per_step)
        pre.update(est, (X, y), zeros)
        keys = {k for inv in pre.state["inverses"].values() for k in inv}
        assert keys == ({"LA", "LG"} if label == "once" else {"A", "G"}), label
        out[label] = pre.apply(g)
    for a, b in zip(out["once"], out["explicit"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    for mod, (w, b) in (("0", (0, 1)), ("2", (2, 3))):
        A, G = pre.state["factors"][mod]["A"], pre.state["factors"][mod]["G"]
        M = torch.cat([g[w], g[b][:, None]], 1)
        R = torch.linalg.solve(G + 0.1 * torch.eye(len(G), dtype=G.dtype), M) @ \
            torch.linalg.inv(A + 0.1 * torch.eye(len(A), dtype=A.dtype))
        torch.testing.assert_close(torch.cat([out["once"][w], out["once"][b][:, None]], 1),
                                   R, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solver,want", [("direct", 1), ("trust_region", None)])
def test_the_optimizer_tells_the_preconditioner_the_solvers_applications(solver, want):
    prob = problem("mlp", "ce")
    opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
        "preconditioner": "kronecker", "solver": solver})
    assert opt.preconditioner.applications_per_step == want


def test_apply_to_a_direction_that_requires_grad_is_differentiable_and_equal():
    """The explicit-inverse product writes into a preallocated row-major result (``out=``),
    which autograd refuses; a direction that requires grad takes the einsum instead: the
    same numbers, and P⁻¹ is linear so the gradient of Σ P⁻¹d is P⁻¹ 1."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3)).double()
    X, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    pre = curvkit.create("preconditioner", "kronecker", model=model, damping=1e-2)
    est = curvkit.create("estimator", "ggn", model=model, loss_fn=torch.nn.CrossEntropyLoss())
    params = list(model.parameters())
    pre.update(est, (X, y), [torch.zeros_like(p) for p in params])
    assert all(set(inv) == {"A", "G"} for inv in pre.state["inverses"].values())
    g = [torch.randn_like(p) for p in params]
    plain = pre.apply(g)
    leaves = [t.clone().requires_grad_() for t in g]
    out = pre.apply(leaves)
    for a, b in zip(out, plain):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-14)
    sum(t.sum() for t in out).backward()
    ones = pre.apply([torch.ones_like(p) for p in params])
    for leaf, want in zip(leaves, ones):
        torch.testing.assert_close(leaf.grad, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("every,forms", [(1, {"LA", "LG"}), (10, {"A", "G"})])
def test_direct_kfac_step_equals_curvlinops_kfac_inverse_step(every, forms):
    """The whole step of ggn + kronecker + direct moves the parameters by exactly
    curvlinops' KFACInverseLinearOperator (type-2, damping (√δ, √δ)) applied to the
    gradient, in float64: with factors every step kept as Cholesky factors and applied by
    triangular solves (widths reaching both solve branches), every 10 steps as inverses."""
    curvlinops = pytest.importorskip("curvlinops")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 40), torch.nn.Tanh(),
                                torch.nn.Linear(40, 5)).double()
    X, y = torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 5, (64,))
    loss_fn = torch.nn.CrossEntropyLoss()
    peer = copy.deepcopy(model)
    opt = curvkit.build_optimizer(model, loss_fn, {
        "lr": 1.0, "estimator": "ggn", "solver": "direct",
        "preconditioner": {"name": "kronecker", "damping": 1e-2, "ema": 0.0,
                           "update_every": every}})
    before = [p.detach().clone() for p in model.parameters()]
    opt.step((X, y))
    inverses = opt.preconditioner.state["inverses"]
    assert {k for inv in inverses.values() for k in inv} == forms
    moved = [b - p.detach() for b, p in zip(before, model.parameters())]
    params = list(peer.parameters())
    grads = torch.autograd.grad(loss_fn(peer(X), y), params)
    op = curvlinops.KFACLinearOperator(peer, loss_fn, params, [(X, y)], fisher_type="type-2",
                                       check_deterministic=False,
                                       separate_weight_and_bias=False)
    want = curvlinops.KFACInverseLinearOperator(op, damping=(0.1, 0.1)) @ list(grads)
    for a, b in zip(moved, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
