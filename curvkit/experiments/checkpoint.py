"""Checkpoints of a run in progress: resume after SIGKILL with the records of an
uninterrupted run.

Every ``train.checkpoint_every`` steps the runner first hands the records through that
step to the writer (a ``steps`` chunk always ends at a checkpoint, so the chunks of a
resumed run are those of an uninterrupted one), then writes ``DIR/checkpoints/<run>.pt``:

* the model's and the optimizer's state (a curvkit optimizer's includes its parts'
  ``state``, e.g. the draw counters their generators are seeded from),
* the RNG states: torch's CPU generator, numpy's and Python's global ones (the runner
  seeds all three from the run's seed, so a run does not depend on what ran before it in
  the process), and the batch sampler's generator with its permutation and position,
* the runner's counters: training time, non-finite / rejected counts and streak, the
  divergence limit, the latest evaluation and matrix snapshot.

The file is written to a temporary name, flushed and fsync'ed, renamed over the old one
and the directory fsync'ed, so a kill at any moment leaves the old checkpoint or the new
one. It loads with ``torch.load(weights_only=True)`` (numpy's state is stored as tensors).

A checkpoint is used only if the results file holds that attempt's records through its
step (the writer may be a different process that died before writing them); otherwise
the run starts over as a new attempt. The writer removes it once the run's ``end`` record
is written.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINTS = "checkpoints"
VERSION = 1


def checkpoint_path(directory: str | os.PathLike, run_id: str) -> Path:
    return Path(directory) / CHECKPOINTS / f"{run_id}.pt"


def rng_state() -> dict[str, Any]:
    """torch (CPU), numpy and Python global RNG states, as weights-only-loadable data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss": gauss}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def seed_all(seed: int) -> None:
    """Seed torch's, numpy's and Python's global RNGs from a run's seed."""
    torch.manual_seed(int(seed))
    np.random.seed(int(seed) % (2 ** 32))
    random.seed(int(seed))


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: temp file, fsync, rename, fsync of the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        torch.save({"version": VERSION, **state}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None if there is none; an unreadable one is reported
    (the run then starts over) rather than trusted."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a checkpoint must never stop a run from starting over
        warnings.warn(f"{path}: unreadable checkpoint ({type(err).__name__}: {err}); the run "
                      f"starts over", UserWarning, stacklevel=2)
        return None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        warnings.warn(f"{path}: not a checkpoint of this curvkit version; the run starts over",
                      UserWarning, stacklevel=2)
        return None
    return state


def remove(path: str | os.PathLike) -> None:
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass
