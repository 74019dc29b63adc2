"""Parts meet only through declared capabilities and typed data (issue 18 item 1, the
cubic/partition side): no preconditioner imports the config parser or a solver, no solver
imports a preconditioner module, and ``cubic`` reads ``partition`` only through the typed
``group_summary`` value."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import curvkit
from curvkit.parts import GroupSummary

ROOT = Path(curvkit.__file__).parent


def imported_modules(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


@pytest.mark.parametrize("path", sorted((ROOT / "preconditioners").glob("*.py")),
                         ids=lambda p: p.name)
def test_no_preconditioner_imports_the_config_parser_or_a_solver(path):
    bad = {m for m in imported_modules(path)
           if m.startswith("curvkit.config") or m.startswith("curvkit.solvers")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((ROOT / "solvers").glob("*.py")), ids=lambda p: p.name)
def test_no_solver_imports_a_preconditioner(path):
    bad = {m for m in imported_modules(path) if m.startswith("curvkit.preconditioners")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_cubic_uses_only_the_group_summary_capability():
    source = (ROOT / "solvers" / "cubic.py").read_text()
    attrs = {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)
             and isinstance(n.value, ast.Attribute) and n.value.attr == "preconditioner"}
    assert attrs == {"group_summary"}, attrs
    for name in ("set_eta_rule", "eta_valid", "_rule"):
        assert name not in source


def test_partition_children_are_typed_configs_resolved_by_the_config_layer():
    from curvkit.config import PartChoice, parse_optimizer

    cfg = parse_optimizer({"estimator": "hessian", "preconditioner": {
        "name": "partition", "direction": {"name": "diagonal", "damping": 0.1}}})
    child = cfg.preconditioner.options.direction
    assert isinstance(child, PartChoice) and child.name == "diagonal"
    assert child.path == "optimizer.preconditioner.direction"
    assert child.options.damping == 0.1
    # the table form round-trips (checkpoints and reports store it)
    table = cfg.as_dict()["preconditioner"]
    assert table["direction"]["name"] == "diagonal" and table["direction"]["damping"] == 0.1
    again = parse_optimizer({"estimator": "hessian", "preconditioner": table})
    assert again.preconditioner.options.direction.options == child.options
    # an unresolved table handed to the part directly is refused, not parsed by it
    spec = curvkit.get_registry().get("preconditioner", "partition")
    with pytest.raises(ValueError, match="resolved by the config layer"):
        spec.cls.Options(direction={"name": "diagonal"})


def test_group_summary_value_combines_and_projects():
    u = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([5.0, 6.0])]
    ids = [torch.tensor([[0, 1], [1, 2]]), torch.tensor(2)]  # element-wise and whole-tensor
    s = GroupSummary(g=torch.zeros(3, dtype=torch.float64), H=torch.eye(3, dtype=torch.float64),
                     D3=None, version=1, u=u, ids=ids)
    eta = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    out = s.combine(eta)
    torch.testing.assert_close(out[0], torch.tensor([[1.0, 20.0], [30.0, 400.0]]))
    torch.testing.assert_close(out[1], torch.tensor([500.0, 600.0]))
    grads = [torch.ones(2, 2), torch.ones(2)]
    torch.testing.assert_close(s.along_u(grads), torch.tensor([1.0, 5.0, 15.0],
                                                              dtype=torch.float64))
