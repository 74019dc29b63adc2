"""The built-in parts, registered as the first plugin through the same hook as any other.

Every module of the part subpackages (one part per file, the file named as the part is
registered) is imported and the part classes it defines are collected.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from curvkit.hookspecs import hookimpl
from curvkit.parts import Part

PACKAGES = ("curvkit.estimators", "curvkit.preconditioners", "curvkit.solvers",
            "curvkit.losses", "curvkit.structures", "curvkit.tasks.datasets",
            "curvkit.tasks.models",
            "curvkit.experiments.executors")


def _parts_in(module) -> list[type]:
    return [obj for _, obj in inspect.getmembers(module, inspect.isclass)
            if issubclass(obj, Part) and obj.__module__ == module.__name__
            and obj.__dict__.get("name")]


@hookimpl
def curvkit_parts() -> list[type]:
    found: list[type] = []
    for pkg_name in PACKAGES:
        try:
            pkg = importlib.import_module(pkg_name)
        except ModuleNotFoundError as err:
            if err.name == pkg_name:
                continue
            raise
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.startswith("_") or info.name == "base":
                continue
            found.extend(_parts_in(importlib.import_module(f"{pkg_name}.{info.name}")))
    return found
