"""The tests every preconditioner structure must pass, as a base class to inherit.

A structure's test module subclasses :class:`PreconditionerSuite`, sets ``name`` and
declares its ground truth::

    from curvkit.testing import Case, PreconditionerSuite

    class TestDiagonal(PreconditionerSuite):
        name = "diagonal"

        def cases(self):
            return [Case("mlp-ce", {"damping": 0.1}),
                    Case("cnn-mse", {"damping": 0.01}, arch="cnn", loss="mse")]

        def reference(self, case, ctx):
            # P⁻¹ ctx.direction from a dense formula built independently of the part,
            # e.g. from ctx.each_update(lambda est, b: est.dense(b))
            ...

Every case runs: the dense reference, the state_dict round trip (through
``torch.save``/``torch.load(weights_only=True)``), purity of ``apply``, statistics replaced
rather than modified in place (the optimizer's rollback relies on it) — or, for a structure
that guards its own state, left exactly as they were by non-finite statistics, ``structures()``
covering every trainable parameter, and a second preconditioner with the same options agreeing
(without touching the global RNG). Through ``curvkit.build_optimizer`` (``train_config``):
a non-finite statistic never reaches the parameters and is rolled back, a short run
decreases the loss, a checkpoint taken mid-training continues bitwise, ``update`` runs on
the steps divisible by ``update_every``, and an estimator lacking a needed capability is
refused before training with the providers named.

Hooks a subclass may override: ``cases``, ``reference`` (required), ``make_problem``,
``direction``, ``train_case``, ``train_config``, ``train_steps``, ``poison``.
Cases run in float64 on the tiny models of :mod:`curvkit.testing.problems`.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor

import curvkit
from curvkit.errors import IncompatibleError
from curvkit.parts import ESTIMATOR_CAPABILITIES, KRONECKER_ROOTS
from curvkit.testing.problems import Problem, problem


@dataclass
class Case:
    """One configuration of the structure on one tiny problem."""

    id: str
    options: dict[str, Any] = field(default_factory=dict)
    estimator: str = "ggn"
    estimator_options: dict[str, Any] = field(default_factory=dict)
    arch: str = "mlp"
    loss: str = "ce"
    reduction: str = "mean"
    n: int = 6
    updates: int = 1          # update() calls, each on its own batch, before apply()
    build: Callable[[], Problem] | None = None   # custom problem (overrides arch/loss/…)
    rtol: float = 1e-9
    atol: float = 1e-11


@dataclass
class Context:
    """What a reference formula may use: the problem, the estimator (bound to the same
    model), the batches ``update`` saw (in order, with the MC draw and the gradient each
    update got) and the direction that was preconditioned."""

    problem: Problem
    estimator: Any
    batches: list[tuple[Tensor, Tensor]]
    direction: list[Tensor]
    draws: list[int]
    grads: list[list[Tensor]]  # the ``grads`` argument of each update

    def each_update(self, fn: Callable[[Any, tuple[Tensor, Tensor]], Any]) -> list[Any]:
        """``[fn(estimator, batch_k) for each update k]``, with the estimator's Monte Carlo
        draw set to the one update k used (so MC estimators reproduce the same operator)."""
        saved = self.estimator.state.get("draw", 0)
        out = []
        try:
            for draw, batch in zip(self.draws, self.batches):
                self.estimator.state["draw"] = draw
                out.append(fn(self.estimator, batch))
        finally:
            self.estimator.state["draw"] = saved
        return out

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.problem.params


def ema_average(values: Sequence[Any], ema: float, bias_correction: bool = True) -> Any:
    """Reference running average written out as an explicit weighted sum.

    bias correction: Σ_t (1−β) β^{T−t} x_t / (1 − β^T);
    without:         β^{T−1} x_1 + Σ_{t≥2} (1−β) β^{T−t} x_t.
    Works on tensors or on lists of tensors.
    """
    T = len(values)
    if bias_correction:
        weights = [(1 - ema) * ema ** (T - t) / (1 - ema ** T) if ema else float(t == T)
                   for t in range(1, T + 1)]
    else:
        weights = [ema ** (T - 1)] + [(1 - ema) * ema ** (T - t) for t in range(2, T + 1)]
    if isinstance(values[0], (list, tuple)):
        return [sum(w * v[i] for w, v in zip(weights, values)) for i in range(len(values[0]))]
    return sum(w * v for w, v in zip(weights, values))


def flat(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for t in like:
        out.append(vector[start:start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def state_tensors(obj: Any) -> list[Tensor]:
    """Every tensor inside a (nested) state."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in state_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in state_tensors(v)]
    return []


def assert_state_equal(a: Any, b: Any, path: str = "state") -> None:
    """Bitwise equality of two (nested) states."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {set(a)} vs {set(b)}"
        for k in a:
            assert_state_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def poisoned(obj: Any) -> Any:
    """The same structure with every floating tensor filled with NaN."""
    if isinstance(obj, Tensor):
        return torch.full_like(obj, float("nan")) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: poisoned(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [poisoned(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(poisoned(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: poisoned(getattr(obj, f.name))
                                           for f in dataclasses.fields(obj) if f.init})
    return obj


def poison_estimator(est: Any) -> Callable[[], None]:
    """Make every output of ``est`` non-finite (its capabilities and the products of its
    ``linearize``); returns the undo."""
    originals = {}
    # the optional square roots of the Kronecker factors are estimator outputs too
    for cap in (*ESTIMATOR_CAPABILITIES, KRONECKER_ROOTS):
        fn = getattr(est, cap, None)
        if callable(fn):
            originals[cap] = fn
            setattr(est, cap, lambda *a, _fn=fn, **k: poisoned(_fn(*a, **k)))
    # products through an operator (`linearize`) are estimator outputs too
    originals["linearize"] = est.linearize

    def poisoned_linearize(*a: Any, _fn: Any = est.linearize, **k: Any) -> Any:
        op = _fn(*a, **k)
        products = op.matvec
        op.matvec = lambda v: poisoned(products(v))
        return op

    est.linearize = poisoned_linearize

    def undo() -> None:
        for cap in originals:
            delattr(est, cap)

    return undo


class PreconditionerSuite:
    """Base class of every preconditioner's tests (see the module docstring)."""

    name: str = ""
    train_lr: float = 0.1

    # ------------------------------------------------------------------ hooks
    def cases(self) -> list[Case]:
        raise TypeError(f"{type(self).__name__} must declare its cases()")

    def reference(self, case: Case, ctx: Context) -> list[Tensor]:
        raise TypeError(f"{type(self).__name__} must declare its dense reference()")

    def make_problem(self, case: Case) -> Problem:
        if case.build is not None:
            return case.build()
        return problem(case.arch, case.loss, case.reduction, n=case.n,
                       num_batches=case.updates + 1, seed=1)

    @staticmethod
    def gradient(prob: Problem, batch: tuple[Tensor, Tensor]) -> list[Tensor]:
        X, y = batch
        loss = prob.loss_fn(prob.model(X), y)
        return [g.detach() for g in torch.autograd.grad(loss, prob.params)]

    def direction(self, prob: Problem) -> list[Tensor]:
        """The direction to precondition: the gradient on the problem's last batch."""
        return self.gradient(prob, prob.batches[-1])

    def train_case(self) -> Case:
        """The case the optimizer-level tests train with (default: the first case)."""
        return self.cases()[0]

    def train_config(self, case: Case) -> dict[str, Any]:
        return {"lr": self.train_lr,
                "estimator": {"name": case.estimator, **case.estimator_options},
                "preconditioner": {"name": self.name, **case.options},
                "solver": "direct"}

    def train_steps(self) -> int:
        return 6

    def poison(self, opt: Any) -> Callable[[], None]:
        """Make every estimator output non-finite; returns the undo."""
        return poison_estimator(opt.estimator)

    # ------------------------------------------------------------------ machinery
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "case" in metafunc.fixturenames:
            cases = self.cases()
            metafunc.parametrize("case", cases, ids=[c.id for c in cases])

    def create(self, case: Case, model: torch.nn.Module) -> Any:
        return curvkit.create("preconditioner", self.name, model=model, **case.options)

    def estimator(self, case: Case, prob: Problem) -> Any:
        return curvkit.create("estimator", case.estimator, model=prob.model,
                              loss_fn=prob.loss_fn, **case.estimator_options)

    def run_updates(self, case: Case, prob: Problem, pre: Any, est: Any
                    ) -> tuple[list[tuple[Tensor, Tensor]], list[int], list[list[Tensor]]]:
        """``case.updates`` updates on successive batches, advancing the MC draw between
        them like the optimizer does; every update gets ``self.direction(prob)`` as its
        ``grads`` (the direction ``apply`` is tested on). Returns the batches, draws and
        ``grads`` used."""
        batches, draws, grads = [], [], []
        for k in range(case.updates):
            batch = prob.batches[k % len(prob.batches)]
            g = self.direction(prob)
            draws.append(int(est.state.get("draw", 0)))
            pre.update(est, batch, g)
            est.advance()
            batches.append(batch)
            grads.append(g)
        return batches, draws, grads

    def setup(self, case: Case) -> tuple[Problem, Any, Any, Context]:
        prob = self.make_problem(case)
        pre = self.create(case, prob.model)
        est = self.estimator(case, prob)
        batches, draws, grads = self.run_updates(case, prob, pre, est)
        ctx = Context(prob, est, batches, self.direction(prob), draws, grads)
        return prob, pre, est, ctx

    @contextmanager
    def _no_global_rng_use(self):
        state = torch.random.get_rng_state()
        yield
        assert torch.equal(state, torch.random.get_rng_state()), \
            f"{self.name}: used the global RNG"

    # ------------------------------------------------------------------ per case
    def test_apply_matches_dense_reference(self, case: Case) -> None:
        prob, pre, est, ctx = self.setup(case)
        got = pre.apply(ctx.direction)
        want = self.reference(case, ctx)
        assert len(got) == len(want) == len(prob.params)
        for (n, _), g, w in zip(prob.model.named_parameters(), got, want):
            assert g.shape == w.shape, n
            torch.testing.assert_close(g, w.to(g.dtype), rtol=case.rtol, atol=case.atol,
                                       msg=lambda m, n=n: f"{self.name} [{case.id}] {n}: {m}")

    def test_state_dict_round_trip(self, case: Case) -> None:
        prob, pre, est, ctx = self.setup(case)
        buf = io.BytesIO()
        torch.save(pre.state_dict(), buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        fresh = self.create(case, prob.model)
        fresh.load_state_dict(loaded)
        assert_state_equal(pre.state_dict(), fresh.state_dict())
        for a, b in zip(pre.apply(ctx.direction), fresh.apply(ctx.direction)):
            assert torch.equal(a, b)
        assert pre.structures() == fresh.structures()

    def test_apply_is_pure(self, case: Case) -> None:
        prob, pre, est, ctx = self.setup(case)
        before = [d.clone() for d in ctx.direction]
        first = pre.apply(ctx.direction)
        second = pre.apply(ctx.direction)
        for d, b in zip(ctx.direction, before):
            assert torch.equal(d, b), "apply modified its input"
        for a, b, p in zip(first, second, prob.params):
            assert a.shape == p.shape and a.dtype == p.dtype
            assert torch.equal(a, b), "apply is not deterministic"

    def test_update_replaces_state_tensors(self, case: Case) -> None:
        """A structure the optimizer snapshots must replace its tensors (the snapshot is a
        shallow copy); one that guards its state (``guards_state``) may write checked
        values in place, and must then leave every tensor as it was when the statistics
        are not finite, and say so by the count it returns."""
        prob, pre, est, ctx = self.setup(case)
        snapshot = pre.state_dict()
        tensors = state_tensors(snapshot)
        copies = [t.clone() for t in tensors]
        guarded = bool(getattr(pre, "guards_state", False))
        undo = poison_estimator(est) if guarded else (lambda: None)
        kept = pre.update(est, prob.batches[-1], ctx.direction)
        undo()
        if guarded:
            assert isinstance(kept, int) and kept > 0, \
                f"update() with non-finite statistics returned {kept!r}, not a count > 0"
        for t, c in zip(tensors, copies):
            torch.testing.assert_close(
                t, c, rtol=0, atol=0, equal_nan=True,
                msg="update() modified a state tensor in place; the optimizer's rollback "
                    "needs statistics to be replaced" if not guarded else
                    "update() wrote non-finite statistics into a guarded state")

    def test_structures_cover_every_parameter(self, case: Case) -> None:
        prob = self.make_problem(case)
        pre = self.create(case, prob.model)
        names = [n for n, p in prob.model.named_parameters() if p.requires_grad]
        for when in ("before update", "after update"):
            found = pre.structures()
            assert sorted(found) == sorted(names), when
            assert all(isinstance(v, str) and v for v in found.values()), when
            if when == "before update":
                est = self.estimator(case, prob)
                self.run_updates(case, prob, pre, est)

    def test_two_instances_agree(self, case: Case) -> None:
        prob, pre, est, ctx = self.setup(case)
        other = self.create(case, prob.model)
        est2 = self.estimator(case, prob)
        with self._no_global_rng_use():
            self.run_updates(case, prob, other, est2)
        for a, b in zip(pre.apply(ctx.direction), other.apply(ctx.direction)):
            assert torch.equal(a, b)

    # ------------------------------------------------------------------ optimizer level
    def _train_problem(self) -> tuple[Case, Problem]:
        case = self.train_case()
        return case, self.make_problem(case)

    def _build(self, case: Case, prob: Problem) -> Any:
        return curvkit.build_optimizer(prob.model, prob.loss_fn, self.train_config(case))

    def test_nonfinite_statistics_never_reach_parameters(self) -> None:
        case, prob = self._train_problem()
        opt = self._build(case, prob)
        batch = prob.batches[0]
        opt.step(batch)
        params = [p.detach().clone() for p in prob.params]
        state = copy.deepcopy(opt.preconditioner.state_dict())
        undo = self.poison(opt)
        opt.step(batch)
        undo()
        for p, q in zip(prob.params, params):
            assert torch.equal(p, q), "a non-finite statistic changed the parameters"
        assert opt.counters["nonfinite"] == 1
        assert "preconditioner statistics" in opt.last_info.get("skipped", ""), opt.last_info
        assert_state_equal(state, opt.preconditioner.state_dict())
        opt.step(batch)
        assert all(torch.isfinite(p).all() for p in prob.params)
        assert any(not torch.equal(p, q) for p, q in zip(prob.params, params))

    def test_training_decreases_loss(self) -> None:
        case, prob = self._train_problem()
        opt = self._build(case, prob)
        batch = prob.batches[0]
        losses = [float(opt.step(batch)) for _ in range(self.train_steps())]
        with torch.no_grad():
            final = float(prob.loss_fn(prob.model(batch[0]), batch[1]))
        assert opt.counters["nonfinite"] == 0
        assert final < losses[0], f"{self.name}: loss {losses[0]:.4g} → {final:.4g} ({losses})"

    def test_checkpoint_continues_bitwise(self) -> None:
        case, prob = self._train_problem()
        opt = self._build(case, prob)
        batches = prob.batches
        steps = self.train_steps()
        for t in range(steps // 2):
            opt.step(batches[t % len(batches)])
        buf = io.BytesIO()
        torch.save({"model": prob.model.state_dict(), "opt": opt.state_dict()}, buf)
        for t in range(steps // 2, steps):
            opt.step(batches[t % len(batches)])
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        model2 = copy.deepcopy(prob.model)
        model2.load_state_dict(ckpt["model"])
        opt2 = curvkit.build_optimizer(model2, prob.loss_fn, self.train_config(case))
        opt2.load_state_dict(ckpt["opt"])
        for t in range(steps // 2, steps):
            opt2.step(batches[t % len(batches)])
        for a, b in zip(prob.model.parameters(), model2.parameters()):
            assert torch.equal(a, b)

    def test_update_every_schedule(self) -> None:
        case, prob = self._train_problem()
        cls = curvkit.get_registry().get("preconditioner", self.name).cls
        if "update_every" not in {f.name for f in dataclasses.fields(cls.Options)}:
            pytest.skip(f"{self.name!r} has no update_every option")
        cfg = self.train_config(case)
        cfg["preconditioner"] = {**cfg["preconditioner"], "update_every": 3}
        cfg["preconditioner"].pop("invert_every", None)
        opt = curvkit.build_optimizer(prob.model, prob.loss_fn, cfg)
        calls: list[int] = []
        original = opt.preconditioner.update

        def counting(*args: Any, **kwargs: Any) -> None:
            calls.append(opt.counters["steps"] - 1)
            original(*args, **kwargs)

        opt.preconditioner.update = counting
        for t in range(7):
            opt.step(prob.batches[t % len(prob.batches)])
        assert calls == [0, 3, 6]

    def test_incompatible_estimator_refused(self) -> None:
        case, prob = self._train_problem()
        reg = curvkit.get_registry()
        cfg = self.train_config(case)
        spec = reg.get("preconditioner", self.name)
        options = curvkit.create("preconditioner", self.name, model=prob.model,
                                 **case.options).options
        needs = spec.cls.requirements(options)
        tried = 0
        for est in reg.names("estimator"):
            est_cls = reg.get("estimator", est).cls
            missing = sorted(needs - est_cls.capabilities(est_cls.Options()))
            if not missing:
                continue
            tried += 1
            with pytest.raises(IncompatibleError) as err:
                curvkit.build_optimizer(prob.model, prob.loss_fn, {**cfg, "estimator": est})
            msg = str(err.value)
            assert msg.startswith("optimizer.preconditioner:"), msg
            assert f"needs capability {missing[0]!r}" in msg, msg
            for provider in reg.providers(missing[0]):
                assert provider in msg, msg
        if not tried:
            pytest.skip(f"every registered estimator provides what {self.name!r} needs")
