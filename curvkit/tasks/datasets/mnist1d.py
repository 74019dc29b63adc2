"""``mnist1d``: the MNIST-1D benchmark, generated offline by the ``mnist1d`` package."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from curvkit._optional import require
from curvkit.options import option
from curvkit.tasks.base import DatasetPart


class Mnist1dDataset(DatasetPart):
    """MNIST-1D (Greydanus 2020): 10 classes of 1-D signals of length 40, inputs (1, 40).

    Generated with ``mnist1d.data.make_dataset`` from ``get_dataset_args()`` (never
    ``get_dataset``, which downloads), with ``num_samples`` and ``seed`` overridden from the
    options; the package's own 80/20 split gives the test set, and the last ``val_size``
    training samples become the validation set (default 3500 / 500 / 1000). Generation
    takes about a second and is cached on disk; the global ``random`` / ``numpy`` RNG states
    the package reseeds are restored afterwards.
    """

    name = "mnist1d"
    loss = "cross_entropy"
    cached = True

    @dataclass
    class Options:
        num_samples: int = option(5000, "samples generated in total (80% train+val, 20% test)",
                                  min=100)
        val_size: int = option(500, "samples taken from the training part for validation",
                               min=0)
        seed: int = option(42, "mnist1d's generation seed (42 is the published data set)")
        shuffle_seq: bool = option(False, "permute the 40 positions (the 'shuffled' variant)")

        def __post_init__(self) -> None:
            if self.val_size >= int(self.num_samples * 0.8):
                raise ValueError(f"val_size: must be smaller than the training part "
                                 f"({int(self.num_samples * 0.8)}), got {self.val_size}")

    def generate(self) -> dict[str, np.ndarray]:
        data_mod = require("mnist1d.data", "dataset 'mnist1d'")
        get_dataset_args, make_dataset = data_mod.get_dataset_args, data_mod.make_dataset
        args = get_dataset_args()
        args.num_samples = self.options.num_samples
        args.seed = self.options.seed
        args.shuffle_seq = self.options.shuffle_seq
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            data = make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        x, y = np.asarray(data["x"], np.float64), np.asarray(data["y"], np.int64)
        n_val = self.options.val_size
        n_train = len(y) - n_val
        return {
            "x_train": x[:n_train, None, :], "y_train": y[:n_train],
            "x_val": x[n_train:, None, :], "y_val": y[n_train:],
            "x_test": np.asarray(data["x_test"], np.float64)[:, None, :],
            "y_test": np.asarray(data["y_test"], np.int64),
        }
