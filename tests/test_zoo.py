"""The model zoo (tests/zoo.py): every estimator capability against independent float64
references, every composition of docs/methods.md for 5 steps; plus the pass mechanics
(curvkit.passes) the zoo depends on.

The default suite runs one fast case per family; ``tox -e slow`` runs the whole cross.
"""

from __future__ import annotations

import pytest
import torch
from test_methods_table import SNIPPETS
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from zoo import BY_NAME, CASES
from zoo_refs import ESTIMATORS, Problem, check_estimator, composition

import curvkit
from curvkit import passes
from curvkit.errors import ConfigError

FAST = [c.name for c in CASES if c.fast]
SLOW = [c.name for c in CASES if not c.fast]
# the default suite runs these compositions on the fast cases (trial points, a capture
# pass, the partition summary with D3); the others run in `tox -e slow`
FAST_METHODS = ("Hessian-free", "K-FAC", "NewtonSummary")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread (two threads on a shared 2-core machine spend more
    time synchronizing than computing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _params(names):
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in names]


@pytest.mark.parametrize("case", _params(FAST + SLOW))
def test_estimator_capabilities_match_references(case):
    pb = Problem(BY_NAME[case])
    bad = {}
    for estimator in ESTIMATORS:
        cells = check_estimator(pb, estimator)
        bad.update({f"{estimator}.{k}": c.detail for k, c in cells.items() if not c.ok})
    assert not bad, bad


def _compositions():
    out = []
    for case in FAST + SLOW:
        for method, config in SNIPPETS:
            slow = case not in FAST or not method.startswith(FAST_METHODS)
            out.append(pytest.param(case, method, config, id=f"{case}-{method}",
                                    marks=pytest.mark.slow if slow else ()))
    return out


@pytest.mark.parametrize("case,method,config", _compositions())
def test_composition_runs_or_is_refused_at_build(case, method, config):
    cell = composition(BY_NAME[case], method, config)
    assert cell.ok, cell.detail


# ----------------------------------------------------------------------------- mechanics
def test_differentiable_restores_the_callers_attention_backend():
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        before = torch.nn.attention._cur_sdpa_kernel_backends()
        with passes.differentiable():
            assert torch.nn.attention._cur_sdpa_kernel_backends() == [SDPBackend.MATH]
        assert torch.nn.attention._cur_sdpa_kernel_backends() == before


@pytest.mark.parametrize("norm", ["layer", "batch", "group"])
def test_third_derivative_through_normalization_matches_finite_differences(norm):
    """The summary's D3 through the norms torch's fused kernels get wrong at third order."""
    torch.manual_seed(0)
    layer = {"layer": nn.LayerNorm(5), "batch": nn.BatchNorm1d(5),
             "group": nn.GroupNorm(1, 5)}[norm]
    model = nn.Sequential(nn.Linear(4, 5), layer, nn.Tanh(), nn.Linear(5, 3)).double()
    X = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    from zoo import Case
    pb = Problem(Case("t", "t", lambda: (model, (X, y), nn.CrossEntropyLoss())))
    est = curvkit.create("estimator", "hessian", model=model, loss_fn=nn.CrossEntropyLoss())
    u = torch.randn(pb.P, dtype=torch.float64)
    s = est.summary((X, y), pb.split(u))
    S = len(pb.named)
    start = 0
    for k, (_, p) in enumerate(pb.named):
        uk = torch.zeros_like(u)
        uk[start:start + p.numel()] = u[start:start + p.numel()]
        start += p.numel()
        fd = pb.third(uk)
        assert abs(float(s.D3[k]) - fd) <= 1e-4 * max(1.0, abs(fd)), (k, float(s.D3[k]), fd)
    assert S == len(s.D3)


def test_dropout_one_mask_per_evaluation_and_callers_rng_untouched():
    pb = Problem(BY_NAME["dropout"])
    for name in ("ggn", "ef", "hessian"):
        est = curvkit.create("estimator", name, model=pb.model, loss_fn=pb.loss_fn)
        v = pb.split(torch.randn(pb.P, dtype=torch.float64))
        state = torch.get_rng_state()
        D = est.dense(pb.batch)
        mv = torch.cat([t.reshape(-1) for t in est.matvec(pb.batch, v)])
        assert torch.equal(torch.get_rng_state(), state), "an evaluation advanced the RNG"
        assert torch.allclose(D @ torch.cat([t.reshape(-1) for t in v]), mv, atol=1e-10)
        if name != "hessian":
            diag = torch.cat([t.reshape(-1) for t in est.diagonal(pb.batch)])
            assert torch.allclose(diag, D.diagonal(), atol=1e-10)


def test_trial_points_see_the_steps_dropout_mask_and_buffers():
    """loss_at(0) inside a step is the step's own loss: the same mask, the same BatchNorm
    statistics (batch statistics, buffers untouched)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.4),
                          nn.Linear(6, 3)).double()
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    seen = []

    class Probe(curvkit.Solver):
        name = "probe"

        def step(self, ctx):
            seen.append((float(ctx.loss), float(ctx.loss_at())))
            return curvkit.StepResult(direction=[torch.zeros_like(p) for p in ctx.params])

    # built with a solver that evaluates trial points (identity + direct has no other pass
    # than the gradient's, so the optimizer keeps no random state for it), then probed
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(),
                                  {"lr": 1.0, "estimator": "ggn", "preconditioner": "identity",
                                   "solver": "trust_region"})
    opt.solver = Probe()
    for _ in range(3):
        opt.step((X, y))
    assert all(abs(a - b) < 1e-12 for a, b in seen), seen
    assert int(model[1].num_batches_tracked) == 3
    assert len({a for a, _ in seen}) == 3  # a fresh mask every step


def test_dict_output_is_refused_with_the_way_out_and_select_output_works():
    model, batch, loss_fn = BY_NAME["dict_output"].build()
    est = curvkit.create("estimator", "ggn", model=model, loss_fn=loss_fn)
    v = [torch.zeros_like(p) for p in model.parameters()]
    with pytest.raises(TypeError, match=r"SelectOutput\(model, 'logits'\)"):
        est.matvec(batch, v)
    # the code shows the dict: every composition refuses it at build, with the same advice
    for _method, config in SNIPPETS:
        with pytest.raises(ConfigError, match=r"optimizer: model DictOut returns a dict with "
                                              r"keys 'logits', 'features'.*curvkit\.SelectOutput"
                                              r"\(model, 'logits'\)"):
            curvkit.build_optimizer(model, loss_fn, config)
    wrapped = curvkit.SelectOutput(model, "logits")
    opt = curvkit.build_optimizer(wrapped, loss_fn, {"estimator": "ggn", "solver": "direct",
                                                     "preconditioner": "identity"})
    assert torch.isfinite(opt.step(batch))


def test_structured_output_only_a_forward_pass_shows_is_refused_before_anything_moves():
    """A dict output behind control flow on values (fx cannot read the code): refused at
    the first step with the same advice, before any parameter moves; a tuple output the
    code shows is refused at build; a user's loss that takes the dict itself is accepted."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            z = self.head(x)
            return {"logits": z} if float(z.detach().sum()) > -1e9 else {"logits": -z}

    torch.manual_seed(0)
    model = Branchy().double()
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    before = [p.detach().clone() for p in model.parameters()]
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), SNIPPETS[0][1])
    with pytest.raises(TypeError, match=r"optimizer: model Branchy returns a dict with keys "
                                        r"'logits'.*SelectOutput\(model, 'logits'\)"):
        opt.step((X, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    tmodel, _, loss_fn = BY_NAME["tuple_output"].build()
    with pytest.raises(ConfigError, match=r"returns a tuple of 2.*SelectOutput\(model, 0\)"):
        curvkit.build_optimizer(tmodel, loss_fn, SNIPPETS[0][1])

    class DictCE(nn.CrossEntropyLoss):
        def forward(self, out, target):
            return super().forward(out["logits"], target)

    dmodel, batch, _ = BY_NAME["dict_output"].build()
    opt = curvkit.build_optimizer(dmodel, DictCE(), {"estimator": "hessian", "solver": "direct",
                                                     "preconditioner": "identity"})
    assert torch.isfinite(opt.step(batch))


class _PackedGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(3, 3, batch_first=True)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        lengths = (x.abs().sum(-1) > 0).sum(-1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)
        return self.head(self.rnn(packed)[1][0])


def test_packed_sequences_run_on_autograd_passes_and_torch_func_passes_say_what_to_do():
    """torch.func cannot transform the packed recurrent kernels (inside torch: "Cannot
    access data pointer ..."): passes that need it raise a TypeError naming the module and
    the way out, before any parameter moves; plain-autograd compositions train."""
    torch.manual_seed(0)
    X = torch.randn(6, 4, 3, dtype=torch.float64)
    for i, n in enumerate((4, 2, 3, 1, 4, 2)):
        X[i, n:] = 0.0
    batch = (X, torch.randint(0, 3, (6,)))
    model = _PackedGRU().double()
    est = curvkit.create("estimator", "ggn", model=model, loss_fn=nn.CrossEntropyLoss())
    advice = r"module rnn \(GRU\) runs on a PackedSequence.*mask the padded steps"
    with pytest.raises(TypeError, match=advice):
        est.dense(batch)
    before = [p.detach().clone() for p in model.parameters()]
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), dict(SNIPPETS)["K-FAC"])
    with pytest.raises(TypeError, match=advice):
        opt.step(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for config in ({"lr": 0.5, "estimator": "ggn", "preconditioner": "identity",
                    "solver": "trust_region"}, dict(SNIPPETS)["GNvpro"]):
        model = _PackedGRU().double()
        opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), config)
        losses = [float(opt.step(batch)) for _ in range(3)]
        assert losses[-1] < losses[0], (config, losses)


def test_outputs_whose_rows_are_not_samples_get_exact_diagonals():
    """A model that folds positions into the first output dimension ((N·L, C) logits):
    per-sample passes over the batch would pair the wrong rows (vmap raised on the size
    mismatch); the diagonals come from the full Jacobian, equal to diag(dense)."""
    torch.manual_seed(0)

    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):  # (N, L, 3) → (N·L, 2)
            return self.head(torch.tanh(self.body(x))).reshape(-1, 2)

    model = Folded().double()
    X = torch.randn(3, 4, 3, dtype=torch.float64)
    batch = (X, torch.randint(0, 2, (12,)))
    assert "rows are not the samples" in passes.per_sample_obstacle(model, X)
    for name in ("ggn", "ef"):
        est = curvkit.create("estimator", name, model=model, loss_fn=nn.CrossEntropyLoss())
        diag = torch.cat([t.reshape(-1) for t in est.diagonal(batch)])
        torch.testing.assert_close(diag, est.dense(batch).diagonal(), rtol=1e-10, atol=1e-12)


def test_dense_and_matvec_agree_with_dropout_on_non_contiguous_tensors():
    """Dropout on a non-contiguous tensor (inside nn.TransformerEncoderLayer): a plain
    forward draws the mask in memory order, torch.func's transforms in logical order;
    curvkit's forwards draw the plain forward's mask, so the torch.func dense (jacrev) and
    the matvec agree."""
    torch.manual_seed(0)

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.1, batch_first=True)
            self.layer.self_attn.dropout = 0.0
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.layer(x).mean(1))

    model = Enc().double()
    batch = (torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 3, (6,)))
    est = curvkit.create("estimator", "ggn", model=model, loss_fn=nn.CrossEntropyLoss())
    v = [torch.randn_like(p) for p in model.parameters()]
    flat = torch.cat([t.reshape(-1) for t in v])
    mv = torch.cat([t.reshape(-1) for t in est.matvec(batch, v)])
    torch.testing.assert_close(est.dense(batch) @ flat, mv, rtol=1e-8, atol=1e-10)


def test_vmap_or_loop_falls_back_where_vmap_cannot_batch():
    def fn(x):
        return x * float(x.sum().item())  # .item() cannot be batched by vmap

    x = torch.arange(6.0).reshape(3, 2)
    out = passes.vmap_or_loop(fn, x)
    assert torch.equal(out, torch.stack([r * float(r.sum()) for r in x]))


def test_sdpa_model_hessian_matches_finite_differences_under_the_flash_kernel():
    """F.scaled_dot_product_attention's CPU flash kernel has no double backward: curvkit
    routes its own passes to the math kernel (dense Hessian = FD reference)."""
    pb = Problem(BY_NAME["sdpa"])
    est = curvkit.create("estimator", "hessian", model=pb.model, loss_fn=pb.loss_fn)
    H = est.dense(pb.batch)
    ref = pb.hessian()
    assert torch.allclose(H, ref, atol=1e-7 * float(ref.abs().max()))


def test_models_page_is_the_generated_matrix_of_this_zoo():
    """docs/models.md comes from `python tests/zoo.py --write docs/models.md` (regenerate
    it when the zoo changes): its header is the generator's, every zoo case has its rows,
    and no cell is an unexplained failure."""
    from pathlib import Path

    from zoo import HEADER

    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    assert text.startswith(HEADER)
    for case in CASES:
        assert text.count(f"| `{case.name}` |") == 1 + len(ESTIMATORS) + 1, case.name
    assert "FAIL" not in text.split("## Notes")[0]
    assert "known" not in text.split("## Notes")[0]
