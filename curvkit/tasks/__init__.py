"""Experiment tasks: registered ``dataset`` and ``model`` parts (see :mod:`curvkit.tasks.base`)."""

from curvkit.tasks.base import DatasetPart, ModelPart, TaskData, default_cache_dir

__all__ = ["DatasetPart", "ModelPart", "TaskData", "default_cache_dir"]
