"""Hook specifications of the ``curvkit`` plugin system (pluggy project ``curvkit``).

A plugin is a module (or object) with functions decorated by :data:`hookimpl`.
Built-in parts are registered through the very same hook as external ones
(:mod:`curvkit.builtins` is the first plugin), so a plugin part is a first-class part.

External plugins are found through the entry-point group ``curvkit``::

    [project.entry-points.curvkit]
    my_plugin = "my_plugin.hooks"
"""

from __future__ import annotations

import pluggy

PROJECT = "curvkit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def curvkit_parts() -> list[type]:
    """Return the part classes this plugin registers.

    Each class derives from one of the part bases (``curvkit.CurvatureEstimator``,
    ``curvkit.Preconditioner``, ``curvkit.Solver``, ``curvkit.LossPart``,
    ``curvkit.DatasetPart``, ``curvkit.ModelPart``) and sets the class attribute
    ``name``; its options come from its nested ``Options`` dataclass, its description from
    the first line of its docstring, its capabilities from ``provides`` / ``needs``.
    """
