"""The training runner: one run = one validated config and one seed, metrics as records.
(Just over 500 lines: the training loop, its checkpoint/resume and its records must agree
field by field, so they stay in one module.)

``execute(spec, emit, attempt=...)`` builds the data, the model (initialised from the seed)
and the optimizer, trains for ``train.steps`` steps and hands every record to ``emit`` (the
results writer, or a queue to the parent process under ``ablate --jobs``). Records are
described in :mod:`curvkit.experiments.store`.

* Per step: the mini-batch loss (mean over the batch whatever the training reduction, so
  runs are comparable), the training time so far (evaluation excluded), the time spent in
  curvature (``optimizer.last_info["time_curvature"]``), accepted / rejected steps and
  non-finite events, and every number or short vector the optimizer's ``last_info``
  reports (the ``partition`` preconditioner's per-group η among them); for torch.optim
  baselines ``work`` = 2 network passes per closure call, as the curvkit solvers count it.
* Every ``eval_every`` steps (and at steps 0 and ``steps``): loss and accuracy on the whole
  train / validation / test splits, and a ``snapshot`` of the latest square matrices and
  name lists of ``last_info`` (the ``partition`` preconditioner's H̄ and group names).
* A run whose loss becomes non-finite or exceeds ``train.diverge_factor`` times its
  initial train loss, or that has ``train.max_nonfinite`` non-finite events (steps the
  optimizer skipped) in a row, ends with status ``diverged``; any other exception ends it
  with status ``failed`` and the error. Neither stops an ablation.

torch.distributed: when a process group is active each rank trains on its shard (a
contiguous slice) of every batch, the optimizer reduces gradients and statistics across
ranks, and only rank 0 emits records.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from curvkit import __version__, distributed
from curvkit.devices import resolve_device
from curvkit.experiments import checkpoint
from curvkit.experiments.config import RunConfig, parse_run_config
from curvkit.experiments.report import code_commit
from curvkit.optimizer import CurvkitOptimizer
from curvkit.tasks.base import TaskData, as_dtype

Emit = Callable[[dict[str, Any]], None]
STEP_CHUNK = 100          # at most this many steps per "steps" record
MAX_VECTOR = 4096         # longer info lists are not logged per step


@dataclass
class RunSpec:
    """One run of a grid: a config document (without ``[ablate]``) and a seed."""

    doc: dict[str, Any]
    seed: int
    run_id: str
    config_id: str
    label: str
    index: int = 0
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"doc": self.doc, "seed": self.seed, "run_id": self.run_id,
                "config_id": self.config_id, "label": self.label, "index": self.index,
                "steps": self.steps, "extra": self.extra}


class Diverged(Exception):
    """The run's loss went non-finite (recorded as status ``diverged``)."""


# --------------------------------------------------------------------------- data and models
_TASK_CACHE: dict[tuple, TaskData] = {}


def load_task(cfg: RunConfig, cache_dir: Any = None) -> TaskData:
    """The run's data in its dtype; kept in memory per process for later runs."""
    key = (cfg.dataset.spec.cls, repr(cfg.dataset.options), cfg.train.dtype, str(cache_dir))
    if key not in _TASK_CACHE:
        if len(_TASK_CACHE) >= 8:
            _TASK_CACHE.pop(next(iter(_TASK_CACHE)))
        _TASK_CACHE[key] = cfg.create_dataset(cache_dir).load(cfg.train.dtype)
    return _TASK_CACHE[key]


def build_model(cfg: RunConfig, data: TaskData, seed: int) -> nn.Module:
    """The model initialised from ``seed`` (torch's global RNG is forked, not disturbed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cfg.create_model().build(data.input_shape, data.num_outputs)
    return model.to(as_dtype(cfg.train.dtype))


def on_device(data: TaskData, device: torch.device) -> TaskData:
    """The splits moved to ``device`` (the cached CPU copy is kept as it is)."""
    if device.type == "cpu":
        return data
    moved = {s: tuple(t.to(device) for t in data.split(s)) for s in ("train", "val", "test")}
    return dataclasses.replace(data, **moved)


def build_training_optimizer(cfg: RunConfig, model: nn.Module, loss_fn: nn.Module
                             ) -> torch.optim.Optimizer:
    if cfg.is_torch:
        return cfg.optimizer.build(model.parameters())
    return CurvkitOptimizer(model, loss_fn, cfg.optimizer)


class BatchSampler:
    """Mini-batches without replacement, reshuffled every epoch from the run's seed.

    ``batch_size = 0`` (or ≥ N) gives the full training set every step. Under
    torch.distributed each rank keeps its contiguous shard of every batch (all ranks draw
    the same permutation), so the union over ranks is the single-process batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n = n
        self.batch_size = n if batch_size <= 0 or batch_size >= n else batch_size
        self.gen = torch.Generator().manual_seed(int(seed) + 0x5EED)
        self.perm = torch.arange(n)
        self.pos = n

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])

    def next(self) -> tuple[Tensor, int]:
        """This rank's sample indices of the next batch, and the size of the whole batch."""
        if self.batch_size == self.n:
            idx = self.perm
        else:
            if self.pos + self.batch_size > self.n:
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.pos = 0
            idx = self.perm[self.pos:self.pos + self.batch_size]
            self.pos += self.batch_size
        if distributed.active():
            return torch.tensor_split(idx, distributed.world_size())[distributed.rank()], len(idx)
        return idx, len(idx)


def mean_loss(loss: float, reduction: str, samples: int, outputs: int) -> float:
    """The (rank-reduced) batch loss as ``reduction='mean'`` would give it: a sum is divided
    by the samples of the whole batch (cross-entropy, ``outputs = 1``) or by its entries
    (MSE averages over every output too)."""
    if reduction == "mean":
        return loss
    return loss / max(samples * outputs, 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, chunk: int) -> dict[str, float]:
    """Mean loss (and accuracy for classification) on every split, in chunks."""
    was_training = model.training
    model.eval()
    loss_fn = data.loss_fn("sum")
    out: dict[str, float] = {}
    try:
        for split in ("train", "val", "test"):
            X, y = data.split(split)
            n = int(y.shape[0])
            if n == 0:
                continue
            total, correct = 0.0, 0
            for start in range(0, n, chunk):
                xb, yb = X[start:start + chunk], y[start:start + chunk]
                pred = model(xb)
                # losses summed in float64, whatever the model's dtype
                total += float(loss_fn(pred.double(), yb if data.classification
                                       else yb.double()))
                if data.classification:
                    correct += int((pred.argmax(dim=1) == yb).sum())
            count = n if data.classification else y.numel()
            out[f"{split}_loss"] = total / count
            if data.classification:
                out[f"{split}_accuracy"] = correct / n
    finally:
        model.train(was_training)
    return out


def _split_info(info: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """last_info → (numbers, numeric vectors, square matrices / string lists)."""
    numbers, vectors, other = {}, {}, {}
    for key, value in info.items():
        if key in ("step", "loss", "accepted", "time_curvature"):  # logged on their own
            continue
        if isinstance(value, Tensor):
            value = value.detach().cpu().tolist() if value.numel() <= MAX_VECTOR else None
        if isinstance(value, bool):
            numbers[key] = int(value)
        elif isinstance(value, (int, float)):
            numbers[key] = value
        elif isinstance(value, (list, tuple)) and value:
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                if len(value) <= MAX_VECTOR:
                    vectors[key] = list(value)
            elif all(isinstance(v, (list, tuple)) for v in value) and \
                    len(value) == len(value[0]) and len(value) <= 256:
                other[key] = [list(r) for r in value]
            elif all(isinstance(v, str) for v in value):
                other[key] = list(value)
    return numbers, vectors, other


class _Chunk:
    """Per-step values collected between two ``steps`` records."""

    def __init__(self) -> None:
        self.step: list[int] = []
        self.loss: list[float] = []
        self.time: list[float] = []
        self.time_curvature: list[float] = []
        self.accepted: list[int] = []
        self.info: dict[str, list[Any]] = {}

    def add(self, step: int, loss: float, t: float, t_curv: float, accepted: bool,
            numbers: dict[str, Any], vectors: dict[str, Any]) -> None:
        k = len(self.step)
        self.step.append(step)
        self.loss.append(loss)
        self.time.append(t)
        self.time_curvature.append(t_curv)
        self.accepted.append(int(accepted))
        for key, value in {**numbers, **vectors}.items():
            self.info.setdefault(key, [None] * k).append(value)
        for values in self.info.values():
            if len(values) < k + 1:
                values.append(None)

    def record(self, base: dict[str, Any], counters: dict[str, int]) -> dict[str, Any]:
        return {**base, "type": "steps", "step": self.step, "loss": self.loss,
                "time": self.time, "time_curvature": self.time_curvature,
                "accepted": self.accepted, "nonfinite": counters["nonfinite"],
                "rejected": counters["rejected"], "info": self.info}


@dataclass
class Resume:
    """Where an interrupted attempt can continue: its number, and how far the results file
    holds its records (steps recorded, last evaluation step; -1 if none)."""

    attempt: int
    steps: int
    last_eval: int


def usable_checkpoint(path: Any, resume: Resume | None, cfg: RunConfig
                      ) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if the results file holds its attempt's records through
    its step (steps before it, and its last evaluation), else None."""
    if path is None or resume is None:
        return None
    state = checkpoint.load(path)
    if state is None or state.get("attempt") != resume.attempt:
        return None
    step = int(state["step"])
    every = cfg.train.eval_every
    if resume.steps < step or resume.last_eval < step - step % every:
        return None
    return state


def train(cfg: RunConfig, seed: int, emit: Emit, base: dict[str, Any], *,
          cache_dir: Any = None, progress: Callable[[int], None] | None = None,
          checkpoint_file: Any = None, state: dict[str, Any] | None = None
          ) -> dict[str, Any]:
    """Train one run, emitting ``steps`` and ``eval`` records; returns the ``end`` record
    fields (status ``finished`` or ``diverged``). Exceptions propagate.

    ``checkpoint_file``: where to write a checkpoint every ``train.checkpoint_every`` steps
    (None: no checkpoints); ``state``: a checkpoint to continue from (a ``resume`` record
    is emitted first). Torch's, numpy's and Python's global RNGs are seeded from ``seed``
    (or restored from the checkpoint) and put back as they were when the run ends."""
    outer_rng = checkpoint.rng_state()
    try:
        return _train(cfg, seed, emit, base, cache_dir, progress, checkpoint_file, state)
    finally:
        checkpoint.set_rng_state(outer_rng)


def _train(cfg: RunConfig, seed: int, emit: Emit, base: dict[str, Any], cache_dir: Any,
           progress: Callable[[int], None] | None, checkpoint_file: Any,
           state: dict[str, Any] | None) -> dict[str, Any]:
    wall0 = time.perf_counter()
    device = resolve_device(cfg.train.device)  # unavailable: an error before anything runs
    data = on_device(load_task(cfg, cache_dir), device)
    model = build_model(cfg, data, seed).to(device)
    loss_fn = data.loss_fn(cfg.task.reduction)
    opt = build_training_optimizer(cfg, model, loss_fn)
    sampler = BatchSampler(int(data.train[1].shape[0]), cfg.task.batch_size, seed)
    X_train, y_train = data.train
    steps, every = cfg.train.steps, cfg.train.eval_every
    save_every = cfg.train.checkpoint_every if checkpoint_file is not None else 0
    counters = {"nonfinite": 0, "rejected": 0}
    train_time, streak, reason = 0.0, 0, ""
    chunk = _Chunk()
    last_other: dict[str, Any] = {}
    last_eval: dict[str, Any] = {}
    limit: float | None = None
    first = 0
    wall_before = 0.0
    checkpoint.seed_all(seed)

    def do_eval(step: int) -> None:
        nonlocal last_eval
        metrics = evaluate(model, data, cfg.task.eval_batch_size)
        rec = {**base, "type": "eval", "step": step, "time": train_time,
               "wall": wall_before + time.perf_counter() - wall0, **metrics}
        if last_other:
            rec["snapshot"] = dict(last_other)
        emit(rec)
        last_eval = {"step": step, "time": train_time, **metrics}
        bad = [k for k, v in metrics.items() if k.endswith("_loss") and not math.isfinite(v)]
        if bad:
            raise Diverged(f"non-finite {bad[0]} at step {step}")

    def flush() -> None:
        nonlocal chunk
        if chunk.step:
            emit(chunk.record(base, counters))
            chunk = _Chunk()

    def save(done: int) -> None:
        checkpoint.save(checkpoint_file, {
            "run": base["run"], "attempt": base["attempt"], "step": done,
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "sampler": sampler.state_dict(), "rng": checkpoint.rng_state(),
            "runner": {"counters": dict(counters), "train_time": train_time,
                       "streak": streak, "limit": limit, "last_other": last_other,
                       "last_eval": last_eval,
                       "wall": wall_before + time.perf_counter() - wall0}})

    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        checkpoint.set_rng_state(state["rng"])
        r = state["runner"]
        counters.update(r["counters"])
        train_time, streak, limit = float(r["train_time"]), int(r["streak"]), r["limit"]
        last_other, last_eval = dict(r["last_other"]), dict(r["last_eval"])
        wall_before = float(r["wall"])
        first = int(state["step"])
        emit({**base, "type": "resume", "step": first, "time": time.time()})

    status = "finished"
    done = first
    if progress is not None and first:
        progress(first)
    try:
        if state is None:
            do_eval(0)
            initial = last_eval.get("train_loss")
            limit = cfg.train.diverge_factor * initial if cfg.train.diverge_factor > 0 and \
                initial is not None and initial > 0 else None
        for step in range(first, steps):
            t0 = time.perf_counter()
            idx, full = sampler.next()
            batch = (X_train[idx], y_train[idx])
            if cfg.is_torch:
                calls: dict[str, int] = {}
                loss_value = torch_step(opt, model, loss_fn, batch, calls)
                # work in network passes, as the curvkit solvers count it: forward +
                # backward per closure call (LBFGS may call it several times)
                info: dict[str, Any] = {"work": 2 * calls.get("closure", 1)}
                accepted, t_curv = True, 0.0
                event = not math.isfinite(loss_value)
            else:
                loss_value = float(opt.step(batch))
                info = opt.last_info
                accepted = bool(info.get("accepted", True))
                t_curv = float(info.get("time_curvature", 0.0))
                event = opt.counters["nonfinite"] > counters["nonfinite"]
                counters["nonfinite"] = opt.counters["nonfinite"]
                counters["rejected"] = opt.counters["rejected"]
            if cfg.is_torch and event:
                counters["nonfinite"] += 1
            train_time += time.perf_counter() - t0
            done = step + 1
            numbers, vectors, other = _split_info(info)
            if other:
                last_other = other
            batch_loss = mean_loss(loss_value, cfg.task.reduction, full,
                                   1 if data.classification else data.num_outputs)
            chunk.add(step, batch_loss, train_time, t_curv, accepted, numbers, vectors)
            if progress is not None:
                progress(1)
            if not math.isfinite(batch_loss):
                raise Diverged(f"non-finite training loss at step {step}")
            if limit is not None and batch_loss > limit:
                raise Diverged(f"training loss {batch_loss:.3g} at step {step} exceeds "
                               f"diverge_factor × initial train loss ({limit:.3g})")
            streak = streak + 1 if event else 0
            if streak >= cfg.train.max_nonfinite:
                raise Diverged(f"{streak} non-finite events in a row (last at step {step})")
            due = save_every > 0 and done % save_every == 0 and done < steps
            if done % every == 0 or done == steps or len(chunk.step) >= STEP_CHUNK or due:
                flush()
            if done % every == 0 or done == steps:
                do_eval(done)
            if due:  # after the records through this step were handed to the writer
                save(done)
    except Diverged as err:
        status, reason = "diverged", str(err)
        flush()
        if progress is not None and done < steps:
            progress(steps - done)
    structures = opt.structures() if isinstance(opt, CurvkitOptimizer) else {}
    memory = state_bytes(opt)
    return {"status": status, "reason": reason, "steps": done, "time": train_time,
            "wall": wall_before + time.perf_counter() - wall0, "final": last_eval,
            "nonfinite": counters["nonfinite"], "rejected": counters["rejected"],
            "steps_per_second": done / train_time if train_time > 0 else None,
            "params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "structures": structures, **memory}


def _tensor_bytes(obj: Any, seen: set[tuple[int, int]]) -> int:
    """Bytes of the tensors in a nested state (dicts, lists, tuples), each storage once."""
    if isinstance(obj, Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def state_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    """What the optimizer keeps between steps, in bytes: ``state_bytes`` (every tensor of its
    ``state_dict()``: momentum buffers, Adam's moments, curvature statistics, stored
    inverses) and, for curvkit, ``preconditioner_bytes`` (the preconditioner's part: the
    factors K-FAC/SINGD keep, in their state dtype). Storages shared by several entries
    count once."""
    sd = opt.state_dict()
    out = {"state_bytes": _tensor_bytes(sd, set())}
    parts = sd.get("curvkit") if isinstance(sd, dict) else None
    if isinstance(parts, dict):
        out["preconditioner_bytes"] = _tensor_bytes(parts.get("preconditioner", {}), set())
    return out


def torch_step(opt: torch.optim.Optimizer, model: nn.Module, loss_fn: nn.Module,
                batch: tuple[Tensor, Tensor], counts: dict[str, int] | None = None) -> float:
    """One torch.optim step through a closure (works for LBFGS too); under
    torch.distributed the gradients are reduced like curvkit's (count-weighted).
    ``counts["closure"]`` receives the number of closure calls."""
    X, y = batch
    first: list[float] = []
    if counts is not None:
        counts["closure"] = 0

    def closure() -> Tensor:
        if counts is not None:
            counts["closure"] += 1
        opt.zero_grad(set_to_none=False)
        with torch.enable_grad():
            loss = loss_fn(model(X), y)
            loss.backward()
        if distributed.active():
            params = [p for p in model.parameters() if p.grad is not None]
            reduction = getattr(loss_fn, "reduction", "mean")
            reduced = distributed.weighted_mean([loss.detach(), *[p.grad for p in params]],
                                                int(y.shape[0]), reduction)
            for p, g in zip(params, reduced[1:]):
                p.grad.copy_(g)
            loss = reduced[0]
        if not first:
            first.append(float(loss.detach()))
        return loss

    opt.step(closure)
    return first[0]


def execute(spec: RunSpec, emit: Emit, *, attempt: int = 1, cache_dir: Any = None,
            progress: Callable[[int], None] | None = None, checkpoint_dir: Any = None,
            resume: Resume | None = None) -> dict[str, Any]:
    """Run one spec end to end: ``start``, ``steps``/``eval`` records and an ``end`` record
    (status finished / diverged / failed). Only rank 0 emits under torch.distributed.

    ``checkpoint_dir``: the results directory whose ``checkpoints/`` keeps this run's
    checkpoint (None: none). ``resume``: the interrupted attempt of this run; if its
    checkpoint is usable (:func:`usable_checkpoint`) the run continues that attempt from
    it, else it starts over as ``attempt``."""
    if distributed.rank() != 0:
        def emit(record: dict[str, Any]) -> None:  # noqa: F811 - rank ≠ 0 writes nothing
            return None
    cfg = parse_run_config(spec.doc)
    ckpt_file = None if checkpoint_dir is None or distributed.active() else \
        checkpoint.checkpoint_path(checkpoint_dir, spec.run_id)
    state = usable_checkpoint(ckpt_file, resume, cfg)
    if state is not None:
        attempt = int(state["attempt"])
    base = {"run": spec.run_id, "attempt": attempt}
    wall0 = time.perf_counter()
    if state is None:
        emit({**base, "type": "start", "config_id": spec.config_id, "label": spec.label,
              "seed": spec.seed, "index": spec.index, "config": cfg.resolved(),
              "time": time.time(), "versions": {"curvkit": __version__,
                                                "commit": code_commit(),
                                                "torch": torch.__version__,
                                                "python": platform.python_version()},
              "world_size": distributed.world_size(), **spec.extra})
    try:
        end = train(cfg, spec.seed, emit, base, cache_dir=cache_dir, progress=progress,
                    checkpoint_file=ckpt_file, state=state)
    except Exception as err:  # recorded, so one broken configuration does not stop a grid
        end = {"status": "failed", "error": f"{type(err).__name__}: {err}",
               "traceback": traceback.format_exc(limit=8)[-4000:],
               "wall": time.perf_counter() - wall0}
    record = {**base, "type": "end", **end}
    emit(record)
    return record
