"""The core install carries only what the library imports; experiment tooling is an extra.

`pip install curvkit` brings torch, pluggy, numpy, scipy and tqdm. matplotlib, scikit-learn
and mnist1d come with the ``experiments`` extra, BackPACK with ``backpack``; the ``dev``
extra lists both by self-reference so the README's install command still sets up the tests.
Here the optional packages are hidden from a fresh interpreter (``sys.modules[name] = None``
makes their import fail as if they were not installed): every curvkit module still imports,
an optimizer still trains, and the parts that need an extra say which one.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("matplotlib", "sklearn", "mnist1d", "backpack", "torchvision", "curvlinops",
            "singd", "pytest", "ray", "submitit", "optuna")


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_core_dependencies_are_the_library_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _requirement_names(project["dependencies"]) == {
        "torch", "pluggy", "numpy", "scipy", "tqdm"}
    extras = project["optional-dependencies"]
    assert _requirement_names(extras["experiments"]) >= {"matplotlib", "scikit-learn",
                                                          "mnist1d"}
    assert "backpack-for-pytorch" in _requirement_names(extras["backpack"])
    # the tests need every extra: `dev` names them by self-reference
    selfref = [r for r in extras["dev"] if r.startswith("curvkit[")]
    assert selfref, "dev must list the extras the tests need, e.g. curvkit[experiments]"
    named = {e.strip() for r in selfref for e in r[len("curvkit["):r.index("]")].split(",")}
    assert {"experiments", "backpack", "testing", "ray", "slurm", "tune"} <= named


def _run_without_optional(code: str) -> dict:
    prelude = textwrap.dedent(f"""
        import sys
        for name in {OPTIONAL!r}:
            sys.modules[name] = None  # import fails as if not installed
    """)
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_curvkit_works_without_the_optional_packages():
    result = _run_without_optional("""
        import importlib, json, pkgutil
        import torch
        import curvkit
        from curvkit._optional import MissingExtraError

        mods = [m.name for m in pkgutil.walk_packages(curvkit.__path__, "curvkit.")
                if not m.name.startswith("curvkit.testing")]
        for m in mods:
            importlib.import_module(m)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                    torch.nn.Linear(4, 2))
        X, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        opt = curvkit.build_optimizer(model, torch.nn.CrossEntropyLoss(), {
            "lr": 0.5, "estimator": "ggn", "preconditioner": {"name": "block", "damping": 1.0},
            "solver": "direct"})
        losses = [float(opt.step((X, y))) for _ in range(3)]
        errors = {}
        for name in ("digits", "mnist1d"):
            try:
                curvkit.create("dataset", name).generate()
            except MissingExtraError as err:
                errors[name] = str(err)
        try:
            import curvkit.testing  # noqa: F401
        except MissingExtraError as err:
            errors["curvkit.testing"] = str(err)
        print(json.dumps({"modules": len(mods), "losses": losses, "errors": errors,
                          "components": curvkit.components()}))
    """)
    assert result["modules"] > 30
    assert result["losses"][-1] < result["losses"][0]
    errors = result["errors"]
    assert set(errors) == {"digits", "mnist1d", "curvkit.testing"}
    for name in ("digits", "mnist1d"):
        msg = errors[name]
        assert f"dataset '{name}'" in msg and 'pip install "curvkit[experiments]"' in msg, msg
    assert 'pip install "curvkit[testing]"' in errors["curvkit.testing"]
    assert "digits" in result["components"]["dataset"]  # still listed, just not generated


def test_report_figures_name_the_extra(tmp_path):
    result = _run_without_optional("""
        import json
        from curvkit._optional import MissingExtraError
        from curvkit.experiments import figures
        try:
            figures._figure()
        except MissingExtraError as err:
            print(json.dumps({"error": str(err)}))
    """)
    assert "matplotlib" in result["error"] and "curvkit[experiments]" in result["error"]


def test_a_broken_optional_package_is_not_reported_as_missing(tmp_path):
    """Only a missing package gets the install hint; an import error inside an installed
    package propagates as it is (the hint would send the user the wrong way)."""
    pkg = tmp_path / "sklearn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import no_such_module_inside_sklearn\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from curvkit._optional import MissingExtraError, require
        try:
            require("sklearn.datasets", "dataset 'digits'")
        except MissingExtraError:
            print("wrongly reported as missing")
        except ModuleNotFoundError as err:
            print("propagated", err.name)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.stdout.strip() == "propagated no_such_module_inside_sklearn", out.stderr
