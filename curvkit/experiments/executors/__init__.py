"""Executors: where the runs of ``train`` / ``ablate`` execute (registered parts, kind
``executor``).

An executor receives the pending runs and a ``write`` callback; it runs each (a
:class:`~curvkit.experiments.runner.RunSpec` with the attempt to use and, for an
interrupted run, where to :class:`~curvkit.experiments.runner.Resume`) and hands every
record back to ``write`` in the calling process, which is the only writer of
``results.jsonl``. The built-in executors are ``local`` (in process, or ``jobs`` spawned
processes), ``ray`` (Ray tasks) and ``submitit`` (Slurm jobs). Choose one with
``curvkit ablate CONFIG --out DIR --executor NAME``; its options are the ``[executor]``
table of the config.
"""
