"""The tiny test problems live in :mod:`curvkit.testing.problems` (shipped with curvkit so
plugin test suites can use them); this module keeps ``from models import ...`` working."""

from curvkit.testing.problems import *  # noqa: F401,F403
