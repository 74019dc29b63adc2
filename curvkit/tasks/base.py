"""Bases of the experiment parts: ``dataset`` (data generated or loaded offline) and ``model``.

A dataset part turns its options into train / validation / test arrays (``generate``);
the base converts them to tensors of the requested dtype, caches expensive generations on
disk and tells the runner the input shape, the number of outputs and the natural loss.
A model part builds an ``nn.Module`` for an input shape and a number of outputs.

Both are registered like every other part (one part per file under
``curvkit/tasks/datasets/`` and ``curvkit/tasks/models/``, or through a plugin), so
``curvkit components`` lists them with their options and a run config names them in
``[task]``.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from torch import Tensor, nn

from curvkit.parts import Part

CACHE_ENV = "CURVKIT_CACHE_DIR"
SPLITS = ("train", "val", "test")
LossName = Literal["cross_entropy", "mse"]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def default_cache_dir() -> Path:
    """``$CURVKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/curvkit``, else ``~/.cache/curvkit``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "curvkit"


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}") from None


@dataclass
class TaskData:
    """Train / validation / test splits as tensors, and what a model and a loss need to know.

    ``train``, ``val``, ``test`` are ``(X, y)`` pairs: X of shape ``(N, *input_shape)`` in the
    requested floating dtype; y int64 class labels of shape ``(N,)`` for ``cross_entropy``,
    or targets ``(N, num_outputs)`` in the floating dtype for ``mse``.
    """

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    input_shape: tuple[int, ...]
    num_outputs: int
    loss: LossName

    @property
    def classification(self) -> bool:
        return self.loss == "cross_entropy"

    def loss_fn(self, reduction: str = "mean") -> nn.Module:
        """The natural loss: ``nn.CrossEntropyLoss`` or ``nn.MSELoss`` with ``reduction``."""
        if self.loss == "cross_entropy":
            return nn.CrossEntropyLoss(reduction=reduction)
        return nn.MSELoss(reduction=reduction)

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return getattr(self, name)


def options_key(options: Any) -> str:
    """A short stable hash of an Options instance (names the cache file)."""
    data = asdict(options) if is_dataclass(options) else {}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` so that readers see either no file or the whole file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _read_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of a cache file, or None if it is missing or unreadable (then regenerate)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


class DatasetPart(Part):
    """A data set for experiments: train / validation / test splits generated offline.

    Subclasses set ``name``, ``loss`` (``"cross_entropy"`` or ``"mse"``), an ``Options``
    dataclass, and implement :meth:`generate`. ``cached = True`` stores the generated arrays
    in the cache directory (``cache_dir``, else ``$CURVKIT_CACHE_DIR``, else
    ``~/.cache/curvkit``) under a name made of the part name, ``version`` and a hash of the
    options; the file is written atomically (temporary file + ``os.replace``), so concurrent
    processes never read a half-written cache. Bump ``version`` when generation changes.
    """

    kind = "dataset"
    loss: ClassVar[LossName] = "mse"
    cached: ClassVar[bool] = False
    version: ClassVar[int] = 1

    def __init__(self, options: Any | None = None, cache_dir: str | os.PathLike | None = None
                 ) -> None:
        super().__init__(options)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

    @abc.abstractmethod
    def generate(self) -> dict[str, np.ndarray]:
        """Arrays ``x_train, y_train, x_val, y_val, x_test, y_test`` (numpy).

        x arrays have shape ``(N, *input_shape)``; y arrays hold integer class labels
        ``(N,)`` for cross-entropy or targets ``(N, outputs)`` for MSE. Generation must be
        deterministic in the options and must not download anything.
        """

    @property
    def cache_path(self) -> Path:
        return self.cache_dir / f"{self.name}-v{self.version}-{options_key(self.options)}.npz"

    def arrays(self) -> dict[str, np.ndarray]:
        """The generated arrays, from the on-disk cache when ``cached``."""
        if not self.cached:
            return self._checked(self.generate())
        found = _read_npz(self.cache_path)
        if found is not None and all(f"{a}_{s}" in found for a in "xy" for s in SPLITS):
            return found
        arrays = self._checked(self.generate())
        _write_npz_atomic(self.cache_path, arrays)
        return arrays

    def _checked(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [f"{a}_{s}" for s in SPLITS for a in "xy" if f"{a}_{s}" not in arrays]
        if missing:
            raise ValueError(f"dataset {self.name!r}: generate() did not return "
                             f"{', '.join(missing)}")
        for s in SPLITS:
            x, y = arrays[f"x_{s}"], arrays[f"y_{s}"]
            if len(x) != len(y):
                raise ValueError(f"dataset {self.name!r}: split {s!r} has {len(x)} inputs "
                                 f"and {len(y)} targets")
        return {k: np.asarray(v) for k, v in arrays.items()}

    def num_outputs(self, arrays: dict[str, np.ndarray]) -> int:
        """Classes (cross-entropy: largest label + 1 over all splits) or target width (MSE)."""
        if self.loss == "cross_entropy":
            return int(max(int(arrays[f"y_{s}"].max(initial=0)) for s in SPLITS)) + 1
        y = arrays["y_train"]
        return int(y.shape[1]) if y.ndim > 1 else 1

    def load(self, dtype: torch.dtype | str = torch.float32) -> TaskData:
        """The splits as tensors: inputs (and MSE targets) in ``dtype``, labels int64."""
        dtype = as_dtype(dtype)
        arrays = self.arrays()

        def convert(s: str) -> tuple[Tensor, Tensor]:
            # via float32/64 numpy: numpy has no bfloat16, torch casts from there
            x = torch.from_numpy(np.ascontiguousarray(arrays[f"x_{s}"], dtype=np.float64))
            y_np = arrays[f"y_{s}"]
            if self.loss == "cross_entropy":
                y = torch.from_numpy(np.ascontiguousarray(y_np).astype(np.int64))
            else:
                y = torch.from_numpy(np.ascontiguousarray(y_np, dtype=np.float64))
                if y.ndim == 1:
                    y = y[:, None]
                y = y.to(dtype)
            return x.to(dtype), y

        train, val, test = (convert(s) for s in SPLITS)
        return TaskData(train=train, val=val, test=test,
                        input_shape=tuple(int(d) for d in train[0].shape[1:]),
                        num_outputs=self.num_outputs(arrays), loss=self.loss)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
    "elu": nn.ELU, "silu": nn.SiLU, "softplus": nn.Softplus,
}
Activation = Literal["relu", "tanh", "sigmoid", "gelu", "elu", "silu", "softplus"]


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"activation {name!r}: expected one of {', '.join(ACTIVATIONS)}"
                         ) from None


class ModelPart(Part):
    """A model architecture: ``build(input_shape, num_outputs)`` returns a fresh ``nn.Module``.

    Parameters are initialised from torch's global RNG (the runner seeds it per run inside
    ``torch.random.fork_rng``), in float32; the runner casts the model to the run's dtype.
    The module maps inputs ``(N, *input_shape)`` to outputs ``(N, num_outputs)``.
    """

    kind = "model"

    @abc.abstractmethod
    def build(self, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
        """A new module for inputs of shape ``(N, *input_shape)`` and ``num_outputs`` outputs."""
