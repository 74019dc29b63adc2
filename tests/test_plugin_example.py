"""The example plugin in plugins/curvkit-fd-hessian: discovered, listed with its source, usable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import curvkit
from curvkit.params import flatten, unflatten

pytest.importorskip("curvkit_fd_hessian",
                    reason="install plugins/curvkit-fd-hessian (.ci/run does)")


def test_discovered_with_source_distribution():
    spec = curvkit.get_registry().get("estimator", "fd_hessian")
    assert spec.source == "curvkit-fd-hessian 0.1.0"
    assert spec.plugin == "fd_hessian"
    assert "fd_hessian" in curvkit.components()["estimator"]
    assert [o.name for o in spec.options] == ["eps"]


@pytest.mark.parametrize("loss_fn", [nn.MSELoss(), nn.MSELoss(reduction="sum")])
def test_matvec_matches_dense_hessian(loss_fn):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    X, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    est = curvkit.create("estimator", "fd_hessian", model=model, loss_fn=loss_fn)
    params = [p.detach() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]

    def loss_flat(theta):
        out = torch.func.functional_call(model, dict(zip(names, unflatten(theta, params))), X)
        return loss_fn(out, y)

    H = torch.autograd.functional.hessian(loss_flat, flatten(params))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    Hv = flatten(est.matvec((X, y), unflatten(v, params)))
    torch.testing.assert_close(Hv, H @ v, rtol=1e-6, atol=1e-8)


def test_usable_from_a_config():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    X, y = torch.randn(32, 3), torch.randint(0, 3, (32,))
    if "block" not in curvkit.components()["preconditioner"]:
        pytest.skip("needs the block preconditioner")
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), {
        "lr": 0.5, "estimator": {"name": "fd_hessian", "eps": 1e-3},
        "preconditioner": {"name": "block", "damping": 1.0}, "solver": "direct"})
    assert type(opt.estimator).__name__ == "FiniteDifferenceHessian"
    losses = [float(opt.step((X, y))) for _ in range(5)]
    assert losses[-1] < losses[0]


def test_cli_components_lists_the_plugin_with_its_source(capsys):
    from curvkit.cli import main

    assert main(["components", "--kind", "estimator"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("fd_hessian — "):]
    assert "source: curvkit-fd-hessian 0.1.0 (plugin 'fd_hessian')" in block.splitlines()[1]
    assert "eps: float | None" in block


def test_the_plugins_tests_inherit_curvkits_suite():
    """The plugin's own test file (run in full with the slow tests) is a subclass of
    curvkit.testing.EstimatorSuite; a few of its checks run here, in the default suite."""
    import importlib.util
    from pathlib import Path

    from curvkit.testing import EstimatorSuite

    path = Path(__file__).resolve().parents[1] / "plugins/curvkit-fd-hessian/tests" \
        / "test_fd_hessian.py"
    spec = importlib.util.spec_from_file_location("fd_hessian_plugin_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    suite = module.TestFiniteDifferenceHessian
    assert issubclass(suite, EstimatorSuite)
    t = suite()
    t.test_batch_and_output_sizes("mse", 5, 4, "mean")
    t.test_repeated_calls_identical_and_model_untouched()
    t.test_model_without_trainable_parameters_is_rejected()
    t.test_wrong_vector_shapes_are_rejected()
