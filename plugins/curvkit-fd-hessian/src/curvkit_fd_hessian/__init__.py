"""Example curvkit plugin: the ``fd_hessian`` estimator."""

from curvkit_fd_hessian.fd_hessian import FiniteDifferenceHessian

__all__ = ["FiniteDifferenceHessian"]
