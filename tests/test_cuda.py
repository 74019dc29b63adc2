"""Every estimator and every composition on CUDA, against the same computation on the CPU.

Skipped without CUDA. ``CURVKIT_TEST_DEVICE=cpu`` runs the module on the CPU (a second CPU
copy as the "device"), which checks the test itself on machines without a GPU.
"""

from __future__ import annotations

import copy
import itertools
import os

import pytest
import torch
from models import problem

import curvkit
from curvkit.errors import IncompatibleError

DEVICE = os.environ.get("CURVKIT_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                reason="no CUDA device")

ESTIMATORS = ["hessian", "ggn", "ef", "fisher", "outer_product"]
CAPABILITIES = ["matvec", "dense", "diagonal", "kronecker", "linearize"]


def moved(prob, device):
    model = copy.deepcopy(prob.model).to(device)
    batch = tuple(t.to(device) for t in prob.batches[0])
    return model, batch


def assert_same(a, b, what):
    """Equal up to reduction-order round-off (float64)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same(a[k], b[k], f"{what}[{k}]")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert b.device.type == torch.device(DEVICE).type, f"{what}: on {b.device}"
        torch.testing.assert_close(b.cpu(), a, rtol=1e-8, atol=1e-10, msg=what)
    elif hasattr(a, "__dict__"):
        assert_same(vars(a), vars(b), what)


@pytest.mark.parametrize("name,capability", itertools.product(ESTIMATORS, CAPABILITIES))
def test_estimator_on_device_equals_cpu(name, capability):
    prob = problem("cnn", "ce", "mean", n=5, seed=7)
    results = []
    for device in ("cpu", DEVICE):
        model, batch = moved(prob, device)
        est = curvkit.create("estimator", name, model=model, loss_fn=prob.loss_fn)
        if capability != "linearize" and not hasattr(est, capability):
            pytest.skip(f"{name} has no {capability}")
        g = torch.Generator().manual_seed(1)
        v = [torch.randn(p.shape, generator=g, dtype=p.dtype).to(device)
             for p in model.parameters()]
        if capability == "matvec":
            results.append(est.matvec(batch, v))
        elif capability == "linearize":
            op = est.linearize(batch)
            results.append([op @ v, curvkit.spectral.top_eigenvalues(op, 2, tol=1e-10)[0]])
        elif capability in ("dense", "diagonal"):
            results.append(getattr(est, capability)(batch))
        else:
            try:
                results.append(est.kronecker(batch))
            except (ValueError, NotImplementedError) as err:
                pytest.skip(f"{name}.kronecker: {err}")
    assert_same(results[0], results[1], f"{name}.{capability}")


def compositions():
    reg = curvkit.components()
    yield from itertools.product(ESTIMATORS, reg["preconditioner"], reg["solver"])


@pytest.mark.parametrize("est,pre,sol", list(compositions()))
def test_every_composition_steps_on_device_like_on_cpu(est, pre, sol):
    prob = problem("mlp", "ce", "mean", n=8, seed=8)
    config = {"lr": 0.1, "estimator": est, "preconditioner": pre, "solver": sol}
    params = []
    for device in ("cpu", DEVICE):
        model, batch = moved(prob, device)
        try:
            opt = curvkit.build_optimizer(model, prob.loss_fn, config)
        except IncompatibleError:
            pytest.skip("incompatible parts")
        except curvkit.ConfigError as err:
            pytest.skip(f"not buildable for this model: {err}")
        for _ in range(3):
            loss = opt.step(batch)
            assert loss.device.type == torch.device(device).type
        # the torch.optim style on the device as well
        opt.zero_grad()
        prob.loss_fn(model(batch[0]), batch[1]).backward()
        opt.step()
        assert opt.counters["nonfinite"] == 0
        params.append([p.detach() for p in model.parameters()])
    # Monte Carlo parts draw on the CPU generator: the same samples on both devices
    for a, b in zip(*params):
        assert b.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-8)
