"""Experiments: run configs, the training runner, ablation grids, the results store, reports.

The command line (``curvkit train | ablate | report``) is a thin layer over
:func:`~curvkit.experiments.ablate.build_grid`, :func:`~curvkit.experiments.ablate.run_grid`
and :func:`~curvkit.experiments.report.build_report`.
"""

from curvkit.experiments.ablate import build_grid, prepare_directory, run_grid
from curvkit.experiments.config import RunConfig, parse_run_config
from curvkit.experiments.report import build_report
from curvkit.experiments.runner import RunSpec, execute
from curvkit.experiments.store import ResultsWriter, load_runs, read_records

__all__ = ["RunConfig", "parse_run_config", "build_grid", "prepare_directory", "run_grid",
           "build_report", "RunSpec", "execute", "ResultsWriter", "load_runs", "read_records"]
