"""Datasets and models of the experiment tasks: shapes, dtypes, determinism, caching."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

import curvkit
from curvkit.errors import ConfigError
from curvkit.tasks.base import DatasetPart, ModelPart, TaskData, default_cache_dir
from curvkit.tasks.datasets import cdr as cdr_mod


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One dataset cache for the module (mnist1d is generated once)."""
    return tmp_path_factory.mktemp("curvkit-cache")


def load(name, cache_dir, dtype=torch.float32, **options) -> TaskData:
    return curvkit.create("dataset", name, cache_dir=cache_dir, **options).load(dtype)


def check_splits(data: TaskData, sizes, input_shape, outputs, loss):
    assert data.input_shape == input_shape
    assert data.num_outputs == outputs
    assert data.loss == loss
    for (X, y), n in zip((data.train, data.val, data.test), sizes):
        assert X.shape == (n, *input_shape)
        if loss == "cross_entropy":
            assert y.dtype == torch.int64 and y.shape == (n,)
            assert int(y.min()) >= 0 and int(y.max()) < outputs
        else:
            assert y.shape == (n, outputs) and y.dtype == X.dtype
        assert torch.isfinite(X.float()).all()


# --------------------------------------------------------------------------- registration
def test_parts_registered_with_options():
    comps = curvkit.components()
    assert {"mnist1d", "digits", "cdr", "teacher"} <= set(comps["dataset"])
    assert {"mlp", "cnn", "resmlp"} <= set(comps["model"])
    reg = curvkit.get_registry()
    for kind, name in [("dataset", "cdr"), ("model", "mlp"), ("model", "cnn")]:
        spec = reg.get(kind, name)
        assert spec.options, f"{kind} {name} lists no options"
        assert spec.description
        assert issubclass(spec.cls, DatasetPart if kind == "dataset" else ModelPart)
    assert curvkit.DatasetPart is DatasetPart and curvkit.ModelPart is ModelPart


# --------------------------------------------------------------------------- datasets
def test_digits_shapes_dtypes_and_split(cache_dir):
    data = load("digits", cache_dir)
    check_splits(data, (1197, 300, 300), (1, 8, 8), 10, "cross_entropy")
    assert data.train[0].dtype == torch.float32
    assert float(data.train[0].min()) >= 0.0 and float(data.train[0].max()) <= 1.0
    other = load("digits", cache_dir, seed=1)
    assert not torch.equal(data.test[0], other.test[0])
    assert torch.equal(data.test[0], load("digits", cache_dir).test[0])
    d64 = load("digits", cache_dir, torch.float64)
    assert d64.train[0].dtype == torch.float64
    assert isinstance(data.loss_fn("sum"), nn.CrossEntropyLoss)
    assert data.loss_fn("sum").reduction == "sum"


def test_digits_options_checked():
    with pytest.raises(ConfigError, match=r"dataset\.digits: val_size \+ test_size"):
        curvkit.create("dataset", "digits", val_size=1000, test_size=900)


def test_teacher_deterministic_regression(cache_dir):
    a = load("teacher", cache_dir, n_train=40, n_val=10, n_test=20, in_dim=5, out_dim=3)
    check_splits(a, (40, 10, 20), (5,), 3, "mse")
    b = load("teacher", cache_dir, n_train=40, n_val=10, n_test=20, in_dim=5, out_dim=3)
    assert torch.equal(a.train[1], b.train[1])
    c = load("teacher", cache_dir, n_train=40, n_val=10, n_test=20, in_dim=5, out_dim=3,
             seed=1)
    assert not torch.equal(a.train[1], c.train[1])
    assert isinstance(a.loss_fn(), nn.MSELoss)
    # noise-free targets are exactly a function of the inputs: same x → same y
    clean = load("teacher", cache_dir, n_train=30, n_val=0, n_test=5, noise=0.0, depth=0,
                 in_dim=4, out_dim=2)
    X, y = clean.train
    X1 = torch.cat([X, torch.ones(len(X), 1)], 1).double()
    W = torch.linalg.lstsq(X1, y.double()).solution
    assert torch.allclose(X1 @ W, y.double(), atol=1e-5)  # depth 0 teacher is affine


def test_bfloat16_and_unknown_dtype(cache_dir):
    data = load("teacher", cache_dir, torch.bfloat16, n_train=8, n_val=2, n_test=2)
    assert data.train[0].dtype == torch.bfloat16 and data.train[1].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'float8'"):
        curvkit.create("dataset", "teacher").load("float8")


def test_mnist1d_offline_cached_and_rng_untouched(cache_dir, monkeypatch):
    import mnist1d.data

    def no_download(*a, **k):
        raise AssertionError("get_dataset downloads; curvkit must never call it")

    monkeypatch.setattr(mnist1d.data, "get_dataset", no_download)
    random.seed(123)
    np.random.seed(123)
    py_before, np_before = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    part = curvkit.create("dataset", "mnist1d", cache_dir=cache_dir)
    data = part.load()
    assert (random.random(), np.random.rand()) == (py_before, np_before)
    check_splits(data, (3500, 500, 1000), (1, 40), 10, "cross_entropy")
    assert part.cache_path.exists() and part.cache_path.parent == cache_dir
    assert not [p for p in os.listdir(cache_dir) if p.endswith(".tmp")]

    def fail():
        raise AssertionError("cached data must not be regenerated")

    monkeypatch.setattr(part, "generate", fail)
    again = part.load(torch.float64)
    assert torch.equal(again.train[0].float(), data.train[0])


def test_corrupt_cache_is_regenerated(tmp_path):
    part = curvkit.create("dataset", "cdr", cache_dir=tmp_path, n_train=6, n_val=2, n_test=3,
                          grid=10)
    first = part.load(torch.float64)
    part.cache_path.write_bytes(b"not a zip file")
    second = part.load(torch.float64)
    assert torch.equal(first.train[1], second.train[1])


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CURVKIT_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CURVKIT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "curvkit"


# --------------------------------------------------------------------------- cdr
def test_cdr_sizes_like_the_paper_and_deterministic(tmp_path):
    part = curvkit.create("dataset", "cdr", cache_dir=tmp_path, n_train=12, n_val=4,
                          n_test=5, grid=12)
    data = part.load(torch.float64)
    check_splits(data, (12, 4, 5), (55,), 72, "mse")
    # standardised with the training statistics
    assert torch.allclose(data.train[1].mean(0), torch.zeros(72, dtype=torch.float64),
                          atol=1e-10)
    fresh = curvkit.create("dataset", "cdr", cache_dir=tmp_path / "other", n_train=12,
                           n_val=4, n_test=5, grid=12).load(torch.float64)
    assert torch.equal(data.test[1], fresh.test[1])
    defaults = curvkit.create("dataset", "cdr").options
    assert (defaults.n_train, defaults.n_val, defaults.n_test) == (400, 200, 200)


def dense_reference(y: np.ndarray, n: int, kappa0: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The same PDE assembled node by node (loops, κ evaluated pointwise)."""
    h = 1.0 / (n + 1)

    def kappa(x1, x2):
        s = np.log(kappa0)
        k = 0
        for a in range(5):
            for b in range(5):
                s += y[k] * 0.5 / (1 + a + b) * np.cos(np.pi * a * x1) * np.cos(np.pi * b * x2)
                k += 1
        return np.exp(s)

    def source(x1, x2):
        s = 0.0
        k = 0
        for i in range(5):
            for j in range(5):
                c1, c2 = (i + 1) / 6, (j + 1) / 6
                s += y[25 + k] * np.exp(-((x1 - c1) ** 2 + (x2 - c2) ** 2) / (2 * 0.08**2))
                k += 1
        p1, p2 = 0.5 + 0.3 * y[53], 0.5 + 0.3 * y[54]
        return s + 5.0 * np.exp(-((x1 - p1) ** 2 + (x2 - p2) ** 2) / (2 * 0.05**2))

    v = (y[50], y[51])
    A = np.zeros((n * n, n * n))
    rhs = np.zeros(n * n)
    for i in range(n):
        for j in range(n):
            k = i * n + j
            x1, x2 = (i + 1) * h, (j + 1) * h
            rhs[k] = source(x1, x2)
            A[k, k] += np.exp(y[52])
            for di, dj in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                kf = kappa(x1 + di * h / 2, x2 + dj * h / 2) / h**2
                vel = v[0] if di else v[1]
                step = di if di else dj
                # upwind: -step·v > 0 means the flow comes from this neighbour
                conv = max(-step * vel, 0.0) / h
                A[k, k] += kf + conv
                ii, jj = i + di, j + dj
                if 0 <= ii < n and 0 <= jj < n:
                    A[k, ii * n + jj] -= kf + conv
    return A, rhs


def test_cdr_discretisation_matches_loop_reference():
    rng = np.random.default_rng(3)
    y = rng.uniform(-1, 1, 55)
    n = 7
    A, s = cdr_mod.assemble(y, n)
    A_ref, s_ref = dense_reference(y, n)
    np.testing.assert_allclose(A.toarray(), A_ref, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(s, s_ref, rtol=1e-12, atol=1e-12)


def test_cdr_physics_sanity():
    n = 20
    # y = 0: constant κ, no flow, centred positive source → symmetric positive solution
    u = cdr_mod.solve(np.zeros(55), n)
    assert u.min() > 0
    np.testing.assert_allclose(u, u[::-1, :], atol=1e-12)
    np.testing.assert_allclose(u, u.T, atol=1e-12)
    # flow towards +x1 moves the plume downstream
    y = np.zeros(55)
    y[50] = 1.0
    shifted = cdr_mod.solve(y, n)
    x = np.arange(n)
    assert (shifted.sum(1) @ x) / shifted.sum() > (u.sum(1) @ x) / u.sum()
    P = cdr_mod.sensor_matrix(n)
    assert P.shape == (72, n * n)
    np.testing.assert_allclose(np.asarray(P.sum(1)).ravel(), 1.0)  # sensors are interior


# --------------------------------------------------------------------------- models
def test_mlp_depth_and_widths():
    m = curvkit.create("model", "mlp", depth=20, width=8, activation="relu").build((1, 40), 10)
    linears = [l for l in m if isinstance(l, nn.Linear)]
    assert len(linears) == 21
    assert m(torch.randn(3, 1, 40)).shape == (3, 10)
    m2 = curvkit.create("model", "mlp", widths=[7, 5], bias=False).build((55,), 72)
    assert [l.out_features for l in m2 if isinstance(l, nn.Linear)] == [7, 5, 72]
    assert all(l.bias is None for l in m2 if isinstance(l, nn.Linear))
    with pytest.raises(ConfigError, match=r"^model\.mlp\.width: expected int, got 'abc'"):
        curvkit.create("model", "mlp", width="abc")
    with pytest.raises(ConfigError, match=r"model\.mlp\.activation: expected one of"):
        curvkit.create("model", "mlp", activation="tanhh")


def test_cnn_dimension_follows_input():
    cnn = curvkit.create("model", "cnn", channels=[4, 6])
    m1 = cnn.build((1, 40), 10)
    assert any(isinstance(l, nn.Conv1d) for l in m1)
    assert m1(torch.randn(2, 1, 40)).shape == (2, 10)
    m2 = cnn.build((1, 8, 8), 10)
    assert any(isinstance(l, nn.Conv2d) for l in m2)
    assert m2(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    m3 = cnn.build((12,), 3)
    assert m3(torch.randn(2, 12)).shape == (2, 3)
    with pytest.raises(ValueError, match="neither"):
        cnn.build((1, 2, 3, 4), 2)
    with pytest.raises(ConfigError, match="kernel_size: must be odd"):
        curvkit.create("model", "cnn", kernel_size=4)


def test_resmlp_residual_and_deterministic_init():
    part = curvkit.create("model", "resmlp", width=6, blocks=3, norm=True)
    torch.manual_seed(0)
    a = part.build((4,), 2)
    torch.manual_seed(0)
    b = part.build((4,), 2)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert a(torch.randn(5, 4)).shape == (5, 2)
    block = a[2]
    with torch.no_grad():
        block.fc2.weight.zero_()
        block.fc2.bias.zero_()
    x = torch.randn(3, 6)
    assert torch.equal(block(x), x)  # the skip connection
