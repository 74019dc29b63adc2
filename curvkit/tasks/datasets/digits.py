"""``digits``: scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curvkit._optional import require
from curvkit.options import option
from curvkit.tasks.base import DatasetPart


class DigitsDataset(DatasetPart):
    """scikit-learn's bundled 8×8 digits, 10 classes, inputs (1, 8, 8) scaled to [0, 1].

    The 1797 images ship inside scikit-learn (nothing is downloaded). They are shuffled
    with ``seed`` and split into ``test_size`` test, ``val_size`` validation and the rest
    (1197 by default) for training. Pixel intensities 0…16 are divided by 16.
    """

    name = "digits"
    loss = "cross_entropy"

    @dataclass
    class Options:
        val_size: int = option(300, "validation images", min=0)
        test_size: int = option(300, "test images", min=1)
        seed: int = option(0, "seed of the shuffle before splitting")

        def __post_init__(self) -> None:
            if self.val_size + self.test_size >= 1797:
                raise ValueError("val_size + test_size: must leave training images "
                                 f"(1797 in total), got {self.val_size} + {self.test_size}")

    def generate(self) -> dict[str, np.ndarray]:
        datasets = require("sklearn.datasets", "dataset 'digits'")
        bunch = datasets.load_digits()
        x = (bunch.images.astype(np.float64) / 16.0)[:, None, :, :]
        y = bunch.target.astype(np.int64)
        order = np.random.default_rng(self.options.seed).permutation(len(y))
        x, y = x[order], y[order]
        n_test, n_val = self.options.test_size, self.options.val_size
        return {
            "x_test": x[:n_test], "y_test": y[:n_test],
            "x_val": x[n_test:n_test + n_val], "y_val": y[n_test:n_test + n_val],
            "x_train": x[n_test + n_val:], "y_train": y[n_test + n_val:],
        }
