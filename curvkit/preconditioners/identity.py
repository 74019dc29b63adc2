"""``identity``: no preconditioning, P = I."""

from __future__ import annotations

from curvkit.preconditioners.base import Preconditioner


class IdentityPreconditioner(Preconditioner):
    """No preconditioning (P = I): the direction passes through unchanged."""

    name = "identity"
    needs_batch = False  # no statistics
