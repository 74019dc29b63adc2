"""The plugin's entry point: the module named in ``[project.entry-points.curvkit]``."""

import curvkit
from curvkit_fd_hessian.fd_hessian import FiniteDifferenceHessian


@curvkit.hookimpl
def curvkit_parts():
    return [FiniteDifferenceHessian]
