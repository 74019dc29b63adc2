"""Ablations: the ``[ablate]`` grid × ``train.seeds``, resumable, optionally in parallel.

``[ablate]`` maps dotted config keys to lists of values; the grid is their Cartesian
product (in the order written), and every grid point runs once per seed::

    [ablate]
    "optimizer.preconditioner" = ["identity", "diagonal", "kronecker"]
    "optimizer.lr" = [0.1, 0.01]

A value replaces the whole entry at its key, so a table swaps a whole subtree — e.g. whole
optimizers, curvkit ones and torch.optim baselines side by side (an optional ``label`` in
such a table names the point in the report)::

    [ablate]
    optimizer = [
      { label = "SGD", lr = 0.1, preconditioner = "identity", solver = "direct" },
      { label = "Adam", torch = "Adam", lr = 1e-3 },
    ]

Before the first run every point is validated and built once (data, model, optimizer).
Points whose parts are incompatible (:class:`~curvkit.errors.IncompatibleError`) are
skipped and listed with the reason; with ``unavailable = "skip"`` in ``[ablate]``, points
naming a part that is not registered (yet) are skipped and listed too; any other error
aborts before anything runs, naming the point and the dotted path.

The output directory keeps a copy of the config (``config.toml``), the grid with skipped
points (``grid.json``) and the records (``results.jsonl``, see
:mod:`curvkit.experiments.store`). Re-running the same command resumes: finished runs are
skipped, interrupted ones restarted as a new attempt; a directory made from a different
config is refused.

Slightly over 500 lines because grid expansion, validation before the first run and the
resume bookkeeping read the same point records; executors, the lock, the store and tuning
already live in their own modules.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import torch

from curvkit import distributed
from curvkit.errors import ConfigError, IncompatibleError, NonFiniteError, StepError
from curvkit.experiments.checkpoint import checkpoint_path
from curvkit.experiments.checkpoint import remove as remove_checkpoint
from curvkit.experiments.config import (
    PART_KEYS,
    RunConfig,
    parse_run_config,
    part_references,
)
from curvkit.experiments.runner import (
    Resume,
    RunSpec,
    build_model,
    build_training_optimizer,
    load_task,
    torch_step,
)
from curvkit.experiments.store import (
    RESULTS,
    ResultsWriter,
    load_attempts,
    write_json_atomic,
    write_text_atomic,
)
from curvkit.registry import Registry, get_registry

GRID_FILE = "grid.json"
CONFIG_FILE = "config.toml"
GRID_OPTIONS = {"unavailable": ("error", "skip")}
AXIS_ROOTS = ("task", "train", "optimizer")
EXECUTION_KEYS = ("executor",)


@dataclass
class GridPoint:
    """One configuration of the grid (all seeds)."""

    index: int
    label: str
    overrides: dict[str, Any]
    doc: dict[str, Any]
    config: RunConfig | None = None
    skipped: str = ""          # "" | "incompatible" | "unavailable" | "duplicate"
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "overrides": self.overrides,
                "config_id": self.config.config_id() if self.config else None,
                "skipped": self.skipped, "reason": self.reason}


@dataclass
class Grid:
    points: list[GridPoint]
    seeds: list[int]
    axes: list[tuple[str, list[Any]]] = field(default_factory=list)

    @property
    def active(self) -> list[GridPoint]:
        return [p for p in self.points if not p.skipped]

    @property
    def skipped(self) -> list[GridPoint]:
        return [p for p in self.points if p.skipped]

    def runs(self, seeds: list[int] | None = None) -> list[RunSpec]:
        out = []
        for point in self.active:
            cfg = point.config
            assert cfg is not None
            for seed in (seeds if seeds is not None else cfg.train.seeds):
                out.append(RunSpec(doc=point.doc, seed=int(seed), run_id=cfg.run_id(seed),
                                   config_id=cfg.config_id(), label=point.label,
                                   index=point.index, steps=cfg.train.steps))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"axes": [[k, v] for k, v in self.axes], "seeds": self.seeds,
                "points": [p.to_dict() for p in self.points]}


# --------------------------------------------------------------------------- grid expansion
def ablate_axes(doc: Mapping[str, Any]) -> tuple[list[tuple[str, list[Any]]], dict[str, str]]:
    """The grid axes ``[(dotted key, values)]`` and the grid options of ``[ablate]``.

    Quoted dotted keys (``"optimizer.lr" = [...]``) and TOML's nested form
    (``optimizer.lr = [...]``, a sub-table) are the same axis.
    """
    table = doc.get("ablate", {})
    if not isinstance(table, Mapping):
        raise ConfigError(f"ablate: expected a table of dotted keys → lists, got {table!r}")
    axes: list[tuple[str, list[Any]]] = []
    options = {k: v[0] for k, v in GRID_OPTIONS.items()}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"ablate.{prefix}: expected a non-empty list of values")
            axes.append((prefix, value))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            raise ConfigError(f"ablate.{prefix}: expected a list of values, got {value!r}")

    for key, value in table.items():
        if key in GRID_OPTIONS:
            if value not in GRID_OPTIONS[key]:
                raise ConfigError(f"ablate.{key}: expected one of "
                                  f"{', '.join(repr(c) for c in GRID_OPTIONS[key])}, got {value!r}")
            options[key] = value
            continue
        walk(key, value)
    for key, _ in axes:
        root = key.split(".")[0]
        if root not in AXIS_ROOTS:
            raise ConfigError(f"ablate.{key}: grid keys start with one of "
                              f"{', '.join(AXIS_ROOTS)} (or set one of the grid options "
                              f"{', '.join(GRID_OPTIONS)})")
        if key == "train.seeds":
            raise ConfigError("ablate.train.seeds: seeds are always a grid axis; list them in "
                              "[train] seeds")
    seen = set()
    for key, _ in axes:
        if key in seen:
            raise ConfigError(f"ablate.{key}: given twice")
        seen.add(key)
    return axes, options


def default_part(section: str, key: str) -> str:
    """The default part name of ``section.key`` (e.g. ``optimizer.solver`` → ``direct``)."""
    from curvkit.config import OptimizerOptions
    from curvkit.experiments.config import TaskOptions
    from curvkit.options import option_specs

    cls = OptimizerOptions if section == "optimizer" else TaskOptions
    return next(s.default for s in option_specs(cls) if s.name == key)


def set_path(doc: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in a config document. A part given by name (``"kronecker"``), or left
    to its default, becomes ``{name = "kronecker"}`` when an option below it is set."""
    parts = key.split(".")
    node = doc
    for i, k in enumerate(parts[:-1]):
        child = node.get(k)
        is_part = i == 1 and (parts[0], k) in PART_KEYS
        if is_part and child is None:
            child = default_part(parts[0], k)
        if isinstance(child, str) and is_part:
            child = {"name": child}
        elif child is None:
            child = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"ablate.{key}: cannot set below {'.'.join(parts[:i + 1])}, "
                              f"which is {child!r}")
        node[k] = child
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def describe_optimizer(table: Mapping[str, Any]) -> str:
    """A short name for an optimizer table: ``ggn+kronecker+direct`` or ``torch.Adam``."""
    if not isinstance(table, Mapping):  # reported by the validation that follows
        return "optimizer"
    if "torch" in table:
        return f"torch.{table['torch']}"
    names = []
    for key, default in (("estimator", "ggn"), ("preconditioner", "identity"),
                         ("solver", "direct")):
        value = table.get(key, default)
        names.append(str(value.get("name", "?")) if isinstance(value, Mapping) else str(value))
    return "+".join(names)


def value_label(key: str, value: Any) -> str:
    if isinstance(value, Mapping):
        if "label" in value:
            return str(value["label"])
        if key == "optimizer":
            extra = f" lr={_fmt(value['lr'])}" if "lr" in value else ""
            return describe_optimizer(value) + extra
        if "name" in value:
            opts = [f"{k}={_fmt(v)}" for k, v in value.items() if k != "name"]
            return str(value["name"]) + (f"({', '.join(opts)})" if opts else "")
        return ",".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return _fmt(value)


def point_label(overrides: list[tuple[str, Any]], doc: Mapping[str, Any]) -> str:
    if not overrides:
        return describe_optimizer(doc.get("optimizer", {}))
    pieces = []
    for key, value in overrides:
        text = value_label(key, value)
        whole = isinstance(value, Mapping) and (key in AXIS_ROOTS or "label" in value)
        pieces.append(text if whole else f"{key.split('.')[-1]}={text}")
    return ", ".join(pieces)


def _strip_labels(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: v for k, v in value.items() if k != "label"}
    return value


def build_grid(doc: Mapping[str, Any], registry: Registry | None = None, *,
               use_ablate: bool = True, check_build: bool = True, cache_dir: Any = None,
               ) -> Grid:
    """Expand and validate the grid. Raises :class:`ConfigError` (naming the point and the
    dotted path) for any problem other than incompatible or unavailable parts."""
    registry = registry or get_registry()
    if not isinstance(doc, Mapping):
        raise ConfigError("config: expected a table")
    axes, options = ablate_axes(doc) if use_ablate else ([], {"unavailable": "error"})
    base = {k: copy.deepcopy(v) for k, v in doc.items() if k != "ablate"}
    points: list[GridPoint] = []
    combos = itertools.product(*[v for _, v in axes]) if axes else [()]
    for index, combo in enumerate(combos):
        point_doc = copy.deepcopy(base)
        overrides = list(zip([k for k, _ in axes], combo))
        for key, value in overrides:
            set_path(point_doc, key, _strip_labels(value))
        label = point_label(overrides, point_doc)
        points.append(GridPoint(index, label, {k: v for k, v in overrides}, point_doc))
    # unique labels
    counts: dict[str, int] = {}
    for p in points:
        counts[p.label] = counts.get(p.label, 0) + 1
    for p in points:
        if counts[p.label] > 1:
            p.label = f"{p.label} #{p.index + 1}"

    where = (lambda p: f"ablate point {p.index + 1} [{p.label}]: ") if axes else \
        (lambda p: "")
    seen: dict[str, GridPoint] = {}
    for p in points:
        missing = [(path, kind, name) for path, kind, name in part_references(p.doc)
                   if (kind, name) not in registry.parts]
        if missing and options["unavailable"] == "skip":
            p.skipped = "unavailable"
            p.reason = "; ".join(f"{kind} {name!r} is not registered ({path})"
                                 for path, kind, name in missing)
            continue
        try:
            p.config = parse_run_config(p.doc, registry)
        except IncompatibleError as err:
            p.skipped, p.reason = "incompatible", str(err)
            continue
        except ConfigError as err:
            raise ConfigError(f"{where(p)}{err}") from err
        cid = p.config.config_id()
        if cid in seen:
            p.skipped = "duplicate"
            p.reason = f"same resolved config as point {seen[cid].index + 1} [{seen[cid].label}]"
            continue
        seen[cid] = p
    if check_build:
        for p in points:
            if p.skipped or p.config is None:
                continue
            try:
                check_buildable(p.config, cache_dir)
            except IncompatibleError as err:
                p.skipped, p.reason = "incompatible", str(err)
            except Exception as err:
                raise ConfigError(f"{where(p)}cannot be built: {type(err).__name__}: {err}"
                                  ) from err
    seeds = list(points[0].config.train.seeds) if points and points[0].config else \
        list(doc.get("train", {}).get("seeds", [0]))
    return Grid(points, seeds, axes)


def check_buildable(cfg: RunConfig, cache_dir: Any = None) -> None:
    """Build data, model and optimizer (seed 0) and take one step on a few training samples,
    so that a configuration cannot fail at setup or at its first step once the grid runs
    (this also pays one-time costs, e.g. lazy imports, outside the timed runs)."""
    data = load_task(cfg, cache_dir)
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg, data, 0)
        loss_fn = data.loss_fn(cfg.task.reduction)
        opt = build_training_optimizer(cfg, model, loss_fn)
        n = min(32, int(data.train[1].shape[0]))
        batch = (data.train[0][:n], data.train[1][:n])
        try:
            if cfg.is_torch:
                torch_step(opt, model, loss_fn, batch)
            else:
                opt.step(batch)
        except (StepError, NonFiniteError):
            # a property of this step's numbers (e.g. an indefinite H̄ for the cubic solver
            # without regularization), not of the configuration: the run will record it
            pass


# --------------------------------------------------------------------------- directory
def load_config(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """The text and the parsed document of a TOML config file (errors name the file, and
    the line of a byte that is not UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} "
                          f"at offset {err.start}); TOML configs are UTF-8") from err
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    return text, doc


def first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in a:
                return f"{sub} is new"
            if key not in b:
                return f"{sub} was removed"
            diff = first_difference(a[key], b[key], sub)
            if diff:
                return diff
        return ""
    if a != b:
        return f"{path or 'config'}: {a!r} before, {b!r} now"
    return ""


def prepare_directory(out: str | os.PathLike, text: str, doc: Mapping[str, Any]) -> Path:
    """Create ``out`` with a copy of the config, or check that it was made from this config."""
    out = Path(out)
    cfg_file = out / CONFIG_FILE
    if cfg_file.exists():
        try:
            old = tomllib.loads(cfg_file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{cfg_file}: unreadable ({err}); not a curvkit results "
                              f"directory?") from err
        # where runs execute does not change their results: a grid may resume elsewhere
        old, new = ({k: v for k, v in d.items() if k not in EXECUTION_KEYS}
                    for d in (old, dict(doc)))
        if old != new:
            raise ConfigError(
                f"{out}: holds results of a different config "
                f"({first_difference(old, dict(doc))}); resuming would mix them. Use another "
                f"--out directory, or remove {out} to start over")
        return out
    if (out / RESULTS).exists():
        raise ConfigError(f"{out}: has {RESULTS} but no {CONFIG_FILE}; refusing to append "
                          f"results of unknown origin")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cfg_file, text)
    return out


# --------------------------------------------------------------------------- progress
class Progress:
    """A tqdm bar over all steps of the pending runs, fed per step or per record."""

    def __init__(self, runs: list[RunSpec], enabled: bool, desc: str) -> None:
        self.expected = {r.run_id: r.steps for r in runs}
        self.counted = {r.run_id: 0 for r in runs}
        self.statuses: dict[str, int] = {}
        self.total_runs = len(runs)
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=sum(self.expected.values()), desc=desc, unit="step",
                            dynamic_ncols=True, smoothing=0.05)
            self._postfix()

    def _postfix(self) -> None:
        if self.bar is not None:
            done = sum(self.statuses.values())
            extra = "".join(f" {k}={v}" for k, v in sorted(self.statuses.items())
                            if k != "finished")
            self.bar.set_postfix_str(f"runs {done}/{self.total_runs}{extra}")

    def steps(self, run: str, n: int) -> None:
        n = min(n, self.expected.get(run, n) - self.counted.get(run, 0))
        if n <= 0:
            return
        self.counted[run] = self.counted.get(run, 0) + n
        if self.bar is not None:
            self.bar.update(n)

    def record(self, rec: dict[str, Any], per_step: bool) -> None:
        if rec["type"] == "steps" and not per_step:
            self.steps(rec["run"], len(rec["step"]))
        elif rec["type"] == "end":
            self.steps(rec["run"], self.expected.get(rec["run"], 0))
            status = rec.get("status", "?")
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self._postfix()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- execution
@dataclass
class AblateResult:
    out: Path
    grid: Grid
    total: int
    already: int
    todo: int
    statuses: dict[str, int]
    errors: list[str]

    @property
    def nothing_to_do(self) -> bool:
        return self.todo == 0


def plan(runs: list[RunSpec], out: Path, retry_failed: bool = False
         ) -> tuple[list[tuple[RunSpec, int, Resume | None]], int]:
    """The pending runs ``(spec, attempt if started over, interrupted attempt or None)`` and
    the number of runs already done. A run is done when its chosen attempt ended whole
    (finished or diverged; failed too unless ``retry_failed``)."""
    status = load_attempts(out / RESULTS)
    todo: list[tuple[RunSpec, int, Resume | None]] = []
    already = 0
    for spec in runs:
        chosen, highest = status.get(spec.run_id, (None, 0))
        st = chosen.status if chosen is not None else "new"
        if st in ("finished", "diverged") or (st == "failed" and not retry_failed):
            already += 1
            continue
        resume = None
        if chosen is not None and st == "incomplete" and not chosen.damaged and \
                chosen.attempt == highest:
            last_eval = max((e["step"] for e in chosen.evals), default=-1)
            resume = Resume(chosen.attempt, chosen.steps_done, last_eval)
        todo.append((spec, highest + 1, resume))
    return todo, already


def run_grid(grid: Grid, out: Path, *, jobs: int = 1, seeds: list[int] | None = None,
             threads: int = 0,
             cache_dir: Any = None, progress: bool = True, retry_failed: bool = False,
             desc: str = "ablate", log: Callable[[str], None] = print,
             executor: Any = None) -> AblateResult:
    """Run every pending run of ``grid`` into ``out/results.jsonl`` (resuming).

    ``executor``: an executor part (see :mod:`curvkit.experiments.executors`); default the
    ``local`` executor with ``jobs`` spawned processes, each with ``threads`` torch threads
    (0: torch's default). Whatever the executor, the calling process is the only writer of
    the file; interrupted runs continue from their checkpoints."""
    runs = grid.runs(seeds)
    is_writer = distributed.rank() == 0
    todo, already = plan(runs, out, retry_failed)
    if is_writer:
        write_json_atomic(out / GRID_FILE, grid.to_dict())
    if distributed.active():
        import torch.distributed as dist

        dist.barrier()  # every rank planned from the same file before rank 0 appends
        if jobs > 1:
            raise ConfigError("--jobs: cannot run parallel processes under torch.distributed")
    counts: dict[str, int] = {}
    errors: list[str] = []
    if not todo:
        return AblateResult(out, grid, len(runs), already, 0, counts, errors)
    bar = Progress([s for s, _, _ in todo], enabled=progress and is_writer, desc=desc)
    writer = ResultsWriter(out / RESULTS) if is_writer else None

    def write(rec: dict[str, Any], per_step: bool) -> None:
        if writer is not None:
            writer.append(rec)
            if rec["type"] == "end":  # the run is whole in the file: its checkpoint is done
                remove_checkpoint(checkpoint_path(out, rec["run"]))
        bar.record(rec, per_step=per_step)

    try:
        if executor is None:
            from curvkit.experiments.executors.local import LocalExecutor

            executor = LocalExecutor(LocalExecutor.Options(jobs=jobs, threads=threads))
        errors = executor.run(todo, write, out=out, cache_dir=cache_dir,
                              steps=bar.steps)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    counts = dict(bar.statuses)
    return AblateResult(out, grid, len(runs), already, len(todo), counts, errors)
