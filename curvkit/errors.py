"""Exceptions raised by curvkit. Every message names *where* the problem is."""

from __future__ import annotations


class CurvkitError(Exception):
    """Base class of curvkit's own errors."""


class ConfigError(CurvkitError, ValueError):
    """A configuration value is wrong. The message starts with its dotted path."""


class RegistryError(CurvkitError):
    """A part is missing, registered twice, or malformed."""


class IncompatibleError(ConfigError):
    """Parts that cannot work together (a needed capability is not provided)."""


class NonFiniteError(CurvkitError, FloatingPointError):
    """A loss, gradient or curvature quantity is not finite."""


class StepError(CurvkitError):
    """A solver cannot take a step (the message names the config path)."""
