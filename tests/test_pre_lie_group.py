"""``lie_group`` (SINGD): a dense float64 reference, the singd package, bfloat16, no inversion.

The dense reference runs the SINGD recursion with plain d×d matrices; the projection Π of
each structure comes from its pattern alone (``curvkit.testing.reference_projection``),
and the preconditioner is assembled as the P×P matrix (C Cᵀ ⊗ K Kᵀ) over vec_r([W | b])
mapped to the model's own parameter order with explicit index bookkeeping, so vec order,
bias column, trace coupling, momentum and normalisation are all checked against formulas.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import curvkit
from curvkit.errors import ConfigError, IncompatibleError
from curvkit.structures import STRUCTURES
from curvkit.testing.preconditioner import Case, Context, PreconditionerSuite
from curvkit.testing.problems import Problem, make_data, make_loss, mlp, param_offsets
from curvkit.testing.structure import reference_projection


# ----------------------------------------------------------------------------- reference
def pattern_key(structure: str | dict):
    """key(i, j, d) of a structure given as a name or a nested table (see test_structures)."""
    table = {"name": structure} if isinstance(structure, str) else structure
    name = table["name"]
    b = table.get("block_size", 30)
    k1, k2 = table.get("k1", 15), table.get("k2", 15)
    lower = table.get("lower", True)

    def hierarchical(i, j, d):
        top, mid_end = (d, d) if d <= k1 else ((k1, k1) if d <= k1 + k2 else (k1, d - k2))
        if i < top:
            return (i, j)
        if i < mid_end:
            return (i, j) if i == j else None
        return (i, j) if j >= top else None

    keys = {
        "dense": lambda i, j, d: (i, j),
        "diagonal": lambda i, j, d: (i, j) if i == j else None,
        "block_diagonal": lambda i, j, d: (i, j) if i // b == j // b else None,
        "hierarchical": hierarchical,
        "triangular_toeplitz": (lambda i, j, d: i - j if i >= j else None) if lower else
                               (lambda i, j, d: j - i if j >= i else None),
        "lower_triangular": lambda i, j, d: (i, j) if i >= j else None,
        "upper_triangular": lambda i, j, d: (i, j) if j >= i else None,
    }
    return keys[name]


def singd_factor_recursion(factors: list[tuple[torch.Tensor, torch.Tensor]], options: dict
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense K, C after SINGD updates on [(A, G), ...] (Lin et al. 2024, Fig. 1)."""
    lr = options.get("lr_cov", 1e-2)
    a1 = options.get("alpha1", 0.5)
    lam = options.get("damping", 1e-3)
    kfac_like = options.get("kfac_like", False)
    normalize = options.get("normalize_lr_cov", False)
    s0 = options.get("init_scale", 1.0)
    sk, sc = options.get("structures", ("dense", "dense"))
    PK = lambda X: reference_projection(X, pattern_key(sk))  # noqa: E731
    PC = lambda X: reference_projection(X, pattern_key(sc))  # noqa: E731
    dK, dC = factors[0][0].shape[0], factors[0][1].shape[0]
    K, C = s0 * torch.eye(dK, dtype=torch.float64), s0 * torch.eye(dC, dtype=torch.float64)
    mK, mC = torch.zeros(dK, dK, dtype=torch.float64), torch.zeros(dC, dC, dtype=torch.float64)
    half = 0.5 * (1 - a1) if normalize else 0.5
    for A, G in factors:
        HK, HC = PK(K.T @ A @ K), PC(C.T @ G @ C)
        KtK, CtC = PK(K.T @ K), PC(C.T @ C)
        tr = lambda X: torch.trace(X) / X.shape[0]  # noqa: E731
        cK, cC = (1.0, 1.0) if kfac_like else (tr(HC), tr(HK))
        eK, eC = (1.0, 1.0) if kfac_like else (tr(CtC), tr(KtK))
        mK = a1 * mK + half * (cK * HK + lam * eK * KtK - torch.eye(dK, dtype=torch.float64))
        mC = a1 * mC + half * (cC * HC + lam * eC * CtC - torch.eye(dC, dtype=torch.float64))
        bK = lr / max(1.0, float(mK.abs().max())) if normalize else lr
        bC = lr / max(1.0, float(mC.abs().max())) if normalize else lr
        K = K @ (torch.eye(dK, dtype=torch.float64) - bK * mK)
        C = C @ (torch.eye(dC, dtype=torch.float64) - bC * mC)
    return K, C


def diagonal_fallback(diags: list[torch.Tensor], options: dict) -> torch.Tensor:
    """k after the one-factor diagonal updates m ← α₁m + s(k²(h + λ) − 1), k ← k(1 − βm)."""
    lr, a1 = options.get("lr_cov", 1e-2), options.get("alpha1", 0.5)
    lam, normalize = options.get("damping", 1e-3), options.get("normalize_lr_cov", False)
    half = 0.5 * (1 - a1) if normalize else 0.5
    k = torch.full_like(diags[0], options.get("init_scale", 1.0) ** 2)
    m = torch.zeros_like(k)
    for h in diags:
        m = a1 * m + half * (k ** 2 * (h + lam) - 1)
        beta = lr / max(1.0, float(m.abs().max())) if normalize else lr
        k = k * (1 - beta * m)
    return k


def dense_preconditioner(ctx: Context, options: dict) -> torch.Tensor:
    """The P×P matrix lie_group multiplies directions by."""
    factors = ctx.each_update(lambda est, b: est.kronecker(b))
    named = [(n, p) for n, p in ctx.problem.model.named_parameters() if p.requires_grad]
    offset, P = param_offsets(ctx.problem.model)
    M = torch.zeros(P, P, dtype=torch.float64)
    covered = set()
    for mod, kf in factors[-1].items():
        K, C = singd_factor_recursion([(f[mod].A, f[mod].G) for f in factors], options)
        block = torch.kron(C @ C.T, K @ K.T)  # over vec_r(W̃), W̃ = [W | b]
        d_out, d_aug = C.shape[0], K.shape[0]
        w_name = kf.params[0]
        d_in = dict(named)[w_name].numel() // d_out
        coords = [offset[w_name] + i * d_in + j if j < d_in else offset[kf.params[1]] + i
                  for i in range(d_out) for j in range(d_aug)]
        idx = torch.tensor(coords)
        M[idx[:, None], idx[None, :]] = block
        covered.update(kf.params)
    fallback = options.get("fallback", "identity")
    if fallback == "diagonal":
        diags = ctx.each_update(lambda est, b: torch.diagonal(est.dense(b)).clone())
    for n, p in named:
        if n in covered:
            continue
        idx = torch.arange(offset[n], offset[n] + p.numel())
        if fallback == "diagonal":
            M[idx, idx] = diagonal_fallback([d[idx] for d in diags], options) ** 2
        else:
            M[idx, idx] = 1.0
    return M


def layernorm_problem(seed: int = 1, n: int = 6, batches: int = 3) -> Problem:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(),
                          nn.Linear(5, 3, bias=False)).to(torch.float64)
    data = [make_data("mlp", "ce", n, 3, seed=seed * 100 + i) for i in range(batches)]
    return Problem(model, make_loss("ce"), data)


SMALL = {"block_diagonal": {"block_size": 3}, "hierarchical": {"k1": 2, "k2": 2}}


def small(*names: str, **extra: dict) -> list[str | dict]:
    """Structures as nested tables with small sizes (so the tiny layers exercise every
    block): ``small("diagonal", "block_diagonal")``; ``extra`` adds options by name."""
    out = []
    for n in names:
        opts = {**SMALL.get(n, {}), **extra.get(n, {})}
        out.append({"name": n, **opts} if opts else n)
    return out


class TestLieGroup(PreconditionerSuite):
    name = "lie_group"
    train_lr = 0.2

    def cases(self) -> list[Case]:
        return [
            Case("ef-dense-momentum", {"structures": ["dense", "dense"], "lr_cov": 0.3,
                                       "damping": 0.05}, estimator="ef", updates=3),
            Case("ggn-diag-block-cnn-normalized",
                 {"structures": small("diagonal", "block_diagonal"), "lr_cov": 0.5,
                  "normalize_lr_cov": True, "alpha1": 0.3},
                 arch="cnn", loss="mse", reduction="sum", updates=2),
            Case("ef-hierarchical-toeplitz-kfac-like",
                 {"structures": small("hierarchical", "triangular_toeplitz",
                                      triangular_toeplitz={"lower": False}),
                  "lr_cov": 0.2, "kfac_like": True, "alpha1": 0.0},
                 estimator="ef", updates=2),
            Case("fisher-triangular-cnn",
                 {"structures": ["lower_triangular", "upper_triangular"], "lr_cov": 0.2,
                  "init_scale": 0.9}, estimator="fisher", arch="cnn", updates=2),
            Case("ef-layernorm-fallback-diagonal",
                 {"structures": small("block_diagonal", "hierarchical"), "lr_cov": 0.3,
                  "fallback": "diagonal"}, estimator="ef", build=layernorm_problem,
                 updates=2),
        ]

    def train_case(self) -> Case:
        # update_every = 1: the suite poisons the statistics of the second step
        return Case("train", {"structures": ["dense", "diagonal"], "lr_cov": 0.1,
                              "update_every": 1}, estimator="ef", n=16)

    def reference(self, case: Case, ctx: Context) -> list[torch.Tensor]:
        M = dense_preconditioner(ctx, case.options)
        g = torch.cat([d.reshape(-1) for d in ctx.direction]) @ M.T
        out, start = [], 0
        for d in ctx.direction:
            out.append(g[start:start + d.numel()].reshape(d.shape))
            start += d.numel()
        return out


# ----------------------------------------------------------------------------- singd
SINGD_NAMES = {"dense": "dense", "diagonal": "diagonal", "block_diagonal": "block30diagonal",
               "hierarchical": "hierarchical15_15", "triangular_toeplitz": "triltoeplitz"}


def run_side_by_side(structures, steps=6, reduction="mean", lr=0.05, **hp):
    SINGD = pytest.importorskip("singd.optim.optimizer").SINGD
    torch.manual_seed(0)
    # hidden 40 > 30 = singd's block size and > 15 + 15 (hierarchical): every block type used
    model = nn.Sequential(nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 8))
    ref = copy.deepcopy(model)
    X, y = torch.randn(48, 12), torch.randint(0, 8, (48,))
    loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    T = hp.pop("T", 2)
    momentum, wd = 0.9, 1e-2
    opt = curvkit.build_optimizer(model, loss_fn, {
        "lr": lr, "estimator": "ef",
        "preconditioner": {"name": "lie_group", "structures": list(structures),
                           "update_every": T, **hp},
        "solver": {"name": "direct", "momentum": momentum, "weight_decay": wd}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singd warns about its naive structure methods
        theirs = SINGD(ref, lr=lr, momentum=momentum, weight_decay=wd, T=T,
                       structures=tuple(SINGD_NAMES[s] for s in structures),
                       loss_average="batch" if reduction == "mean" else None, **hp)
    errors = []
    for t in range(steps):
        sl = slice((t % 3) * 16, (t % 3 + 1) * 16)
        loss = opt.step((X[sl], y[sl]))
        theirs.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss_ref = loss_fn(ref(X[sl]), y[sl])
            loss_ref.backward()
            theirs.step()
        torch.testing.assert_close(loss, loss_ref.detach(), rtol=1e-5, atol=1e-6)
        errors.append(max(float((a - b).detach().abs().max()) for a, b in
                          zip(model.parameters(), ref.parameters())))
        assert all(torch.isfinite(p).all() for p in model.parameters())
    return errors, opt


@pytest.mark.parametrize("structures,hp", [
    (("dense", "dense"), {"lr_cov": 0.05}),
    (("diagonal", "diagonal"), {"lr_cov": 0.1, "alpha1": 0.3}),
    # T = 1: the diagonal scalings applied as two factors instead of a cached matrix
    (("diagonal", "diagonal"), {"lr_cov": 0.1, "alpha1": 0.3, "T": 1}),
    (("block_diagonal", "block_diagonal"), {"lr_cov": 0.05, "normalize_lr_cov": True}),
    (("dense", "diagonal"), {"lr_cov": 0.05, "kfac_like": True, "alpha1": 0.0, "T": 1}),
    (("hierarchical", "triangular_toeplitz"), {"lr_cov": 0.05, "damping": 1e-2}),
])
def test_trajectory_matches_singd(structures, hp):
    errors, opt = run_side_by_side(structures, **hp)
    assert max(errors) < 2e-6, errors
    assert opt.counters["nonfinite"] == 0


def test_trajectory_matches_singd_sum_reduction():
    # singd's loss_average=None is a summed loss: G carries no 1/N, like curvkit's "sum"
    # (lr / 16: the summed loss over a batch of 16 has 16 times the gradient)
    errors, _ = run_side_by_side(("dense", "block_diagonal"), reduction="sum",
                                 lr=0.05 / 16, lr_cov=0.02)
    assert max(errors) < 2e-6, errors


# ----------------------------------------------------------------------------- precision
def test_bfloat16_run_stays_finite_and_never_inverts(monkeypatch):
    forbidden = ["inv", "inv_ex", "cholesky", "cholesky_ex", "eigh", "eig", "eigvals",
                 "eigvalsh", "svd", "svdvals", "qr", "solve", "solve_ex", "lstsq", "pinv",
                 "lu", "lu_factor", "ldl_factor", "matrix_power", "det", "slogdet"]

    def refuse(name):
        def fn(*args, **kwargs):
            raise AssertionError(f"lie_group called torch.linalg.{name}")
        return fn

    for name in forbidden:
        if hasattr(torch.linalg, name):
            monkeypatch.setattr(torch.linalg, name, refuse(name))
    for name in ("inverse", "cholesky", "cholesky_inverse", "pinverse", "svd", "qr"):
        monkeypatch.setattr(torch, name, refuse(name))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5)).to(torch.bfloat16)
    X = torch.randn(64, 10).to(torch.bfloat16)
    y = torch.randint(0, 5, (64,))
    loss_fn = nn.CrossEntropyLoss()
    for structures in (["dense", "dense"], ["hierarchical", "block_diagonal"],
                       ["triangular_toeplitz", "lower_triangular"]):
        m = copy.deepcopy(model)
        opt = curvkit.build_optimizer(m, loss_fn, {
            "lr": 0.05, "estimator": "ef",
            "preconditioner": {"name": "lie_group", "lr_cov": 0.05, "update_every": 1,
                               "structures": [
                                   {"name": s, **{"hierarchical": {"k1": 4, "k2": 4},
                                                  "block_diagonal": {"block_size": 8}
                                                  }.get(s, {})} for s in structures]},
            "solver": {"name": "direct", "momentum": 0.9}})
        losses = [float(opt.step((X[i * 16:(i + 1) * 16], y[i * 16:(i + 1) * 16])))
                  for i in range(4) for _ in range(2)]
        assert opt.counters["nonfinite"] == 0, structures
        assert all(torch.isfinite(torch.tensor(losses))), structures
        state = opt.preconditioner.state["factors"]
        for entry in state.values():
            for key in ("K", "C", "m_K", "m_C"):
                for t in entry[key].values():
                    assert t.dtype == torch.bfloat16 and torch.isfinite(t).all(), key
        assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all()
                   for p in m.parameters())


def test_preconditioner_dtype_keeps_factors_in_float32_for_a_bfloat16_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
        "lr": 0.05, "estimator": "ef",
        "preconditioner": {"name": "lie_group", "preconditioner_dtype": ["float32", "param"],
                           "update_every": 1}})
    X, y = torch.randn(16, 6).to(torch.bfloat16), torch.randint(0, 3, (16,))
    for _ in range(3):
        opt.step((X, y))
    entry = opt.preconditioner.state["factors"]["0"]
    assert entry["K"]["mat"].dtype == torch.float32 and entry["C"]["mat"].dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert opt.counters["nonfinite"] == 0


# ----------------------------------------------------------------------------- fallback, options
def test_layernorm_falls_back_and_is_reported():
    prob = layernorm_problem()
    for fallback in ("identity", "diagonal"):
        opt = curvkit.build_optimizer(prob.model, prob.loss_fn, {
            "lr": 0.1, "estimator": "ef",
            "preconditioner": {"name": "lie_group", "fallback": fallback,
                               "structures": ["dense", "diagonal"], "update_every": 1}})
        assert opt.structures() == {"0.weight": "lie_group[dense, diagonal]",
                                    "0.bias": "lie_group[dense, diagonal]",
                                    "1.weight": fallback, "1.bias": fallback,
                                    "3.weight": "lie_group[dense, diagonal]"}
        before = prob.model[1].weight.detach().clone()
        losses = [float(opt.step(prob.batches[0])) for _ in range(5)]
        assert losses[-1] < losses[0]
        assert not torch.equal(prob.model[1].weight, before)  # the fallback trains it


def test_fallback_diagonal_needs_the_diagonal_capability():
    spec = curvkit.get_registry().get("preconditioner", "lie_group")
    opts = curvkit.create("preconditioner", "lie_group", model=mlp(),
                          fallback="diagonal").options
    assert spec.cls.requirements(opts) == {"kronecker", "diagonal"}
    opts = curvkit.create("preconditioner", "lie_group", model=mlp()).options
    assert spec.cls.requirements(opts) == {"kronecker"}
    with pytest.raises(IncompatibleError, match="needs capability 'kronecker'"):
        curvkit.build_optimizer(mlp(), nn.MSELoss(), {"estimator": "hessian",
                                                      "preconditioner": "lie_group"})


@pytest.mark.parametrize("options,match", [
    ({"structures": ["dense", "diagonl"]}, r"structures\[1\].*did you mean 'diagonal'"),
    ({"kfac_like": True}, "kfac_like.*alpha1 = 0"),
    ({"preconditioner_dtype": ["param", "float8"]}, r"preconditioner_dtype\[1\]"),
    ({"init_scale": 0.0}, "init_scale"),
    ({"structures": ["dense"]}, "expected 2 entries"),
    ({"kfac_approx": "reduced"}, "kfac_approx.*did you mean 'reduce'"),
])
def test_option_errors_name_the_field(options, match):
    with pytest.raises(ConfigError, match=match):
        curvkit.build_optimizer(mlp(), nn.MSELoss(), {
            "estimator": "ef", "preconditioner": {"name": "lie_group", **options}})


def test_identity_before_first_update_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = mlp(seed=3)
    pre = curvkit.create("preconditioner", "lie_group", model=model, init_scale=2.0 ** 0.25)
    d = [torch.randn_like(p) for p in model.parameters()]
    for a, b in zip(pre.apply(d), d):  # K = C = s·I: P⁻¹ = s⁴·I
        torch.testing.assert_close(a, 2 * b)
    est = curvkit.create("estimator", "ef", model=model, loss_fn=nn.CrossEntropyLoss())
    X, y = make_data("mlp", "ce", 8, 3)
    pre.update(est, (X, y), d)
    buf = io.BytesIO()
    torch.save(pre.state_dict(), buf)
    buf.seek(0)
    fresh = curvkit.create("preconditioner", "lie_group", model=model, init_scale=2.0 ** 0.25)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for a, b in zip(pre.apply(d), fresh.apply(d)):
        assert torch.equal(a, b)
    assert pre.info() == {"lie_group_layers": 2, "lie_group_fallback_params": 0}


# ----------------------------------------------------------------------------- factor roots
@pytest.mark.parametrize("estimator", ["ef", "fisher"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kronecker_roots_square_to_the_factors(estimator, approx):
    """The optional ``kronecker_roots`` capability lie_group prefers: RᵀR equals the
    estimator's own factors, on weight sharing (Conv2d, a Linear on sequences), several
    batches of unequal size and both reductions."""
    from curvkit.estimators.base import KroneckerRoots

    torch.manual_seed(0)
    models = {
        "cnn": (nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)),
                (1, 5, 5)),
        "seq": (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Flatten(),
                              nn.Linear(15, 3, bias=False)), (3, 4)),
    }
    for name, (model, shape) in models.items():
        model = model.double()
        batches = [(torch.randn(n, *shape, dtype=torch.float64), torch.randint(0, 3, (n,)))
                   for n in (5, 2)]
        for reduction in ("mean", "sum"):
            est = curvkit.create("estimator", estimator, model=model,
                                 loss_fn=nn.CrossEntropyLoss(reduction=reduction),
                                 kfac_approx=approx)
            for batch in (batches[0], batches):
                factors = est.kronecker(batch)
                roots = est.kronecker_roots(batch)
                assert set(roots) == set(factors), name
                for mod, r in roots.items():
                    assert isinstance(r, KroneckerRoots) and r.params == factors[mod].params
                    torch.testing.assert_close(r.A_root.T @ r.A_root, factors[mod].A,
                                               rtol=1e-12, atol=1e-14)
                    torch.testing.assert_close(r.G_root.T @ r.G_root, factors[mod].G,
                                               rtol=1e-12, atol=1e-14)


def test_factors_and_roots_give_the_same_preconditioner():
    """lie_group from ``kronecker_roots`` (ef) equals lie_group from ``kronecker`` alone,
    for every structure, including the tall-root branch of dense-product structures."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(27, 4)).double()
    X, y = torch.randn(6, 1, 5, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    est = curvkit.create("estimator", "ef", model=model, loss_fn=nn.CrossEntropyLoss())

    class FactorsOnly:
        def kronecker(self, batch):
            return est.kronecker(batch)

    d = [torch.randn_like(p) for p in model.parameters()]
    names = list(STRUCTURES)
    for k, c in zip(names, names[1:] + names[:1]):
        opts = {"structures": small(k, c), "lr_cov": 0.3}
        a = curvkit.create("preconditioner", "lie_group", model=model, **opts)
        b = curvkit.create("preconditioner", "lie_group", model=model, **opts)
        for _ in range(2):
            a.update(est, (X, y), d)
            b.update(FactorsOnly(), (X, y), d)
        for u, v in zip(a.apply(d), b.apply(d)):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


def test_kfac_approx_on_lie_group_overrides_the_estimator_option():
    """singd's option name works on lie_group: set there, it equals setting it on the
    estimator (a CNN, where "expand" and "reduce" differ)."""
    import copy

    import curvkit

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4))
    X, y = torch.randn(16, 1, 6, 6), torch.randint(0, 4, (16,))

    def run(estimator, pre):
        model = copy.deepcopy(net)
        opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
            "lr": 0.05, "estimator": estimator, "solver": "direct",
            "preconditioner": {"name": "lie_group", "update_every": 1, **pre}})
        for _ in range(3):
            opt.step((X, y))
        return [p.detach().clone() for p in model.parameters()]

    on_pre = run("ef", {"kfac_approx": "reduce"})
    on_est = run({"name": "ef", "kfac_approx": "reduce"}, {})
    expand = run("ef", {})
    for a, b in zip(on_pre, on_est):
        assert torch.equal(a, b)
    assert any(not torch.allclose(a, b) for a, b in zip(on_pre, expand))


def test_exp_order_two_is_the_second_order_truncation():
    """Issue 16 item 4: exp_order = 2 steps K ← K(I − βm + β²m²/2) (non-singular for a real
    spectrum of βm, since 1 − x + x²/2 > 0); from K₀ = I it differs from SINGD's K(I − βm)
    by exactly β²m²/2, with the same m, for the dense and the diagonal (fallback) factors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    X, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    beta = 0.3
    states = {}
    for order in (1, 2):
        pre = curvkit.create("preconditioner", "lie_group", model=model, lr_cov=beta,
                             alpha1=0.5, update_every=1, exp_order=order,
                             fallback="diagonal")
        est = curvkit.create("estimator", "ef", model=model, loss_fn=nn.CrossEntropyLoss())
        pre.update(est, (X, y), [torch.zeros_like(p) for p in model.parameters()])
        states[order] = pre.state
    for mod, e1 in states[1]["factors"].items():
        e2 = states[2]["factors"][mod]
        for key in ("K", "C"):
            m = e1[f"m_{key}"]["mat"]
            torch.testing.assert_close(e2[f"m_{key}"]["mat"], m, rtol=0, atol=0)
            torch.testing.assert_close(e2[key]["mat"] - e1[key]["mat"],
                                       0.5 * beta ** 2 * m @ m, rtol=1e-12, atol=1e-14)
    fb1, fb2 = states[1]["fallback"], states[2]["fallback"]
    assert fb1
    for n in fb1:
        m = fb1[n]["m"]
        torch.testing.assert_close(fb2[n]["k"] - fb1[n]["k"],
                                   0.5 * beta ** 2 * m * m,  # k₀ = init_scale² = 1
                                   rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- guarded state
def test_an_overflowing_layer_keeps_its_state_and_the_step_is_skipped():
    """lie_group guards its own state (no snapshot): finite statistics whose update
    overflows in one layer leave that layer's K, C, m_K, m_C bitwise as they were, the other
    layer takes its update, the step is skipped (parameters unchanged, counted non-finite),
    and the next step trains; the state's tensors keep their storage (written in place)."""
    model = mlp(hidden=(5,), seed=2)
    X, y = make_data("mlp", "ce", 16, 3, seed=1)
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
        "lr": 0.1, "estimator": "ef",
        "preconditioner": {"name": "lie_group", "structures": ["dense", "dense"],
                           "update_every": 1, "alpha1": 0.5},
        "solver": "direct"})
    opt.step((X, y))
    opt.step((X, y))
    state = opt.preconditioner.state
    first, second = list(state["factors"])
    before = copy.deepcopy(state["factors"])
    ptrs = {(mod, key): t.data_ptr() for mod, e in state["factors"].items()
            for key in ("K", "C", "m_K", "m_C") for t in e[key].values()}
    params = [p.detach().clone() for p in model.parameters()]
    est = opt.estimator
    roots = est.kronecker_roots

    def overflowing(*a, **k):  # finite, but H_K = Π(Kᵀ A K) of the first layer overflows
        found = roots(*a, **k)
        kf = found[first]
        found[first] = type(kf)(kf.module, kf.params, kf.A_root * 1e160, kf.G_root)
        return found

    est.kronecker_roots = overflowing
    opt.preconditioner.state_dict = None  # the optimizer must not snapshot this structure
    opt.step((X, y))
    del est.kronecker_roots, opt.preconditioner.state_dict
    assert opt.counters["nonfinite"] == 1
    assert "preconditioner statistics" in opt.last_info["skipped"]
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = opt.preconditioner.state["factors"]
    for key in ("K", "C", "m_K", "m_C"):
        assert torch.equal(after[first][key]["mat"], before[first][key]["mat"]), key
        assert not torch.equal(after[second][key]["mat"], before[second][key]["mat"]), key
    opt.step((X, y))
    assert opt.counters["nonfinite"] == 1 and opt.last_info["accepted"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert ptrs == {(mod, key): t.data_ptr() for mod, e in after.items()
                    for key in ("K", "C", "m_K", "m_C") for t in e[key].values()}


def test_a_step_allocates_less_than_a_copy_of_the_state(monkeypatch):
    """No second copy of the state through a step (the snapshot for a rollback was one):
    the bytes of tensors made during a step and alive at once stay below the state's own
    (six dense layers, one per group as for wide layers — small ones are grouped up to a
    floor of entries: one layer's terms and new factors, the gradients and the direction
    fit, a new state would not)."""
    import curvkit.preconditioners.lie_group as lie_group_module

    monkeypatch.setattr(lie_group_module, "_TERMS_AT_ONCE", 0)
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(48, 48) for _ in range(6)])
    X, y = torch.randn(8, 48), torch.randint(0, 48, (8,))
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
        "lr": 0.01, "estimator": "ef",
        "preconditioner": {"name": "lie_group", "structures": ["dense", "dense"],
                           "update_every": 1, "alpha1": 0.5},
        "solver": {"name": "direct", "momentum": 0.9}})
    opt.step((X, y))
    opt.step((X, y))
    state = sum(t.numel() * t.element_size() for e in opt.preconditioner.state["factors"].values()
                for key in ("K", "C", "m_K", "m_C") for t in e[key].values())
    live: dict[int, tuple[StorageWeakRef, int]] = {}
    peak = [0]

    class Allocations(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for k in [k for k, (ref, _) in live.items() if ref.expired()]:
                del live[k]
            # an output sharing an input's storage (a view, an in-place op) is no allocation
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    st = t.untyped_storage()
                    if st.data_ptr() not in inputs:
                        live.setdefault(st.data_ptr(), (StorageWeakRef(st), st.nbytes()))
            peak[0] = max(peak[0], sum(n for _, n in live.values()))
            return out

    with Allocations():
        opt.step((X, y))
    assert opt.last_info["accepted"]
    assert peak[0] < state, (peak[0], state)
