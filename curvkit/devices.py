"""Device names of configs (``[train] device``): parsed up front, checked before training.

``"cpu"``, ``"cuda"`` (the current CUDA device), ``"cuda:N"`` and ``"mps"`` are accepted by
:func:`check_device_name` (at config validation, on any machine); :func:`resolve_device`
(before a run starts) raises a :class:`~curvkit.errors.ConfigError` naming the option when
the device is not available here. curvkit itself has no device-specific code path: every
tensor it makes takes the device (and dtype) of the parameters or statistics it belongs to.
"""

from __future__ import annotations

import re

import torch

from curvkit.errors import ConfigError

_NAME = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


def check_device_name(name: str, path: str = "train.device") -> str:
    """``name`` if it is a device curvkit runs on, else a ConfigError naming ``path``."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{path}: expected 'cpu', 'cuda', 'cuda:N' or 'mps', got {name!r}")
    return name


def resolve_device(name: str, path: str = "train.device") -> torch.device:
    """The ``torch.device`` for ``name``, or a ConfigError saying why it is unavailable."""
    check_device_name(name, path)
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{path}: {name!r} requested, but CUDA is not available here "
                              f"(torch {torch.__version__}, built with CUDA "
                              f"{torch.version.cuda or 'no'}); use device = 'cpu'")
        device = torch.device(name)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{path}: {name!r} requested, but this machine has {count} CUDA "
                              f"device(s) (cuda:0 … cuda:{count - 1})")
        return device
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        raise ConfigError(f"{path}: 'mps' requested, but the MPS backend (Apple silicon) is "
                          f"not available here; use device = 'cpu'")
    return torch.device("mps")
