"""Optional dependencies: import them where they are used, with an error naming the extra.

The core install carries what the library itself needs (torch, pluggy, numpy, scipy, tqdm).
The experiment tooling's packages (matplotlib for report figures, scikit-learn and mnist1d
for two data sets) come with ``pip install "curvkit[experiments]"``; importing one of them
through :func:`require` when it is missing raises :class:`MissingExtraError`, which says
which part needs it and which extra brings it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from curvkit.errors import CurvkitError

# module (top-level import name) → the extra of curvkit's pyproject.toml that installs it
EXTRAS = {
    "matplotlib": "experiments",
    "sklearn": "experiments",
    "mnist1d": "experiments",
    "backpack": "backpack",
    "pytest": "testing",
}


class MissingExtraError(CurvkitError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, what: str) -> ModuleType:
    """Import ``module`` (dotted path allowed) for ``what`` (e.g. ``"dataset 'digits'"``).

    Raises :class:`MissingExtraError` naming the extra from :data:`EXTRAS` when the
    top-level package is missing; any other import failure propagates unchanged.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        top = module.split(".")[0]
        if err.name is None or err.name.split(".")[0] != top:
            raise  # the package is there, something it imports is broken: show that
        extra = EXTRAS.get(top)
        how = (f'pip install "curvkit[{extra}]"' if extra else f"pip install {top}")
        raise MissingExtraError(
            f"{what} needs the optional package {top!r}, which is not installed; "
            f"install it with {how}") from err
