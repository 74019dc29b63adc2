"""Run configs: ``[task]`` + ``[train]`` + ``[optimizer]`` (+ ``[ablate]``), validated up front.

A run config is a TOML file (or the equivalent dict)::

    title = "digits: SGD vs K-FAC"            # optional, heads the report

    [task]
    dataset = "digits"                        # a registered dataset: name or {name=..., options}
    model = { name = "mlp", width = 32 }      # a registered model: name or table
    batch_size = 128

    [train]
    steps = 200
    seeds = [0, 1, 2]
    eval_every = 20

    [optimizer]                               # a curvkit optimizer (curvkit.config) ...
    lr = 0.1
    estimator = "ggn"
    preconditioner = "identity"
    solver = "trust_region"
    # ... or a torch.optim baseline:  torch = "Adam"  plus its keyword arguments

Every error names its dotted path (``train.stepz: unknown option; did you mean 'steps'?``).
The sections' options are the dataclasses below, so the docs table and the validation come
from one place.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import inspect
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from curvkit.config import (
    OptimizerConfig,
    OptimizerOptions,
    PartChoice,
    parse_optimizer,
    parse_part,
)
from curvkit.devices import check_device_name
from curvkit.errors import ConfigError
from curvkit.options import build_options, option, option_specs
from curvkit.registry import Registry, get_registry

SECTIONS = ("title", "description", "task", "train", "optimizer", "ablate", "executor",
            "tune")
# Keys holding a part, by section: (section, key) -> kind
PART_KEYS = {("task", "dataset"): "dataset", ("task", "model"): "model",
             ("optimizer", "estimator"): "estimator",
             ("optimizer", "preconditioner"): "preconditioner",
             ("optimizer", "solver"): "solver"}


@dataclass
class TaskOptions:
    """The ``[task]`` table: what is learned, by which model, with which batches."""

    dataset: str | dict = option("digits", "registered dataset: a name or {name=..., options}")
    model: str | dict = option("mlp", "registered model: a name or {name=..., options}")
    batch_size: int = option(128, "samples per step (0: the whole training set)", min=0)
    reduction: Literal["mean", "sum"] = option("mean", "reduction of the training loss")
    eval_batch_size: int = option(2048, "chunk size when evaluating whole splits", min=1)


@dataclass
class TrainOptions:
    """The ``[train]`` table: how long, which seeds, how often to evaluate."""

    steps: int = option(100, "optimizer steps per run", min=1)
    seeds: list[int] = option(default_factory=lambda: [0],
                              help="one run per seed (model init and batch order)")
    eval_every: int = option(10, "evaluate train/val/test loss every this many steps", min=1)
    dtype: Literal["float32", "float64", "bfloat16"] = option("float32",
                                                               "model and data dtype")
    target_loss: float | None = option(None, "train loss for the report's time-to-target")
    device: str = option("cpu", "device of the run's model and data: 'cpu', 'cuda', "
                                "'cuda:N' or 'mps' (an unavailable one is an error before "
                                "training)")
    max_nonfinite: int = option(10, "consecutive non-finite events (skipped steps) after "
                                    "which a run counts as diverged", min=1)
    diverge_factor: float = option(1e6, "a run whose batch loss exceeds this multiple of its "
                                        "initial train loss counts as diverged (0: never)",
                                   min=0.0)
    checkpoint_every: int = option(100, "write a checkpoint (model, optimizer, RNG states, "
                                        "data position) every this many steps, so an "
                                        "interrupted run resumes where it was (0: never)",
                                   min=0)

    def __post_init__(self) -> None:
        try:
            check_device_name(self.device, "device")
        except ConfigError as err:  # a ValueError gets the table's path from build_options
            raise ValueError(str(err)) from None
        if not self.seeds:
            raise ValueError("seeds: need at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: duplicate seeds in {self.seeds}")


@dataclass
class TorchOptimizer:
    """A ``torch.optim`` baseline: ``[optimizer] torch = "Adam"`` plus keyword arguments."""

    name: str
    cls: type
    kwargs: dict[str, Any]
    path: str = "optimizer"

    def build(self, params: Any) -> torch.optim.Optimizer:
        return self.cls(params, **self.kwargs)

    def as_dict(self) -> dict[str, Any]:
        return {"torch": self.name, **self.kwargs}


@dataclass
class RunConfig:
    """A validated run config (one configuration; seeds are run separately)."""

    title: str
    task: TaskOptions
    train: TrainOptions
    dataset: PartChoice
    model: PartChoice
    optimizer: OptimizerConfig | TorchOptimizer
    doc: dict[str, Any] = field(repr=False, default_factory=dict)

    def resolved(self) -> dict[str, Any]:
        """Everything that determines a run except the seed, with every default filled in
        (JSON types only). Its hash with the seed is the run id."""
        train = asdict(self.train)
        train.pop("seeds")
        train.pop("checkpoint_every")  # how a run is kept, not what it computes
        task = asdict(self.task)
        task["dataset"] = self.dataset.as_table()
        task["model"] = self.model.as_table()
        return _jsonable({"task": task, "train": train, "optimizer": self.optimizer.as_dict()})

    def config_id(self) -> str:
        """Hash of :meth:`resolved`: identifies a configuration across seeds."""
        return _digest(self.resolved())

    def run_id(self, seed: int) -> str:
        """Hash of the fully resolved config and the seed: identifies one run."""
        return _digest({"config": self.resolved(), "seed": int(seed)})

    def create_dataset(self, cache_dir: Any = None) -> Any:
        spec = self.dataset.spec
        part = spec.cls(options=self.dataset.options, cache_dir=cache_dir)
        part.config_path = self.dataset.path
        return part

    def create_model(self) -> Any:
        part = self.model.spec.cls(options=self.model.options)
        part.config_path = self.model.path
        return part

    @property
    def is_torch(self) -> bool:
        return isinstance(self.optimizer, TorchOptimizer)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=3)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def torch_optimizers() -> dict[str, type]:
    """Every ``torch.optim`` optimizer class by name."""
    return {n: c for n, c in vars(torch.optim).items()
            if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer)
            and c is not torch.optim.Optimizer}


def _check_torch_value(value: Any, default: Any, path: str, owner: str) -> Any:
    def bad(expected: str) -> ConfigError:
        shown = repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"
        return ConfigError(f"{path}: expected {expected} (the default of {owner} is "
                           f"{default!r}), got {shown}")

    if default is inspect.Parameter.empty or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("bool")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("int")
        return value
    if isinstance(default, (float, torch.Tensor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("float")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or len(value) != len(default):
            raise bad(f"a list of {len(default)} entries")
        return tuple(_check_torch_value(v, d, f"{path}[{i}]", owner)
                     for i, (v, d) in enumerate(zip(value, default)))
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("str")
        return value
    return value


def parse_torch_optimizer(table: Mapping[str, Any], path: str = "optimizer") -> TorchOptimizer:
    """Validate ``{torch = "Adam", lr = ..., ...}`` against the optimizer's signature."""
    table = dict(table)
    name = table.pop("torch")
    known = torch_optimizers()
    if not isinstance(name, str) or name not in known:
        hint = _suggest(str(name), list(known))
        raise ConfigError(f"{path}.torch: unknown torch.optim optimizer {name!r}{hint} "
                          f"(available: {', '.join(sorted(known))})")
    cls = known[name]
    owner = f"torch.optim.{name}"
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n not in ("self", "params") and p.kind in
              (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    kwargs = {}
    for key, value in table.items():
        if key not in params:
            raise ConfigError(f"{path}.{key}: unknown argument of {owner}"
                              f"{_suggest(key, list(params))} (arguments: "
                              f"{', '.join(params)})")
        kwargs[key] = _check_torch_value(value, params[key].default, f"{path}.{key}", owner)
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty
               and n not in kwargs]
    if missing:
        raise ConfigError(f"{path}.{missing[0]}: required argument of {owner} is missing")
    try:  # the optimizer's own checks (e.g. "Invalid learning rate") before any run
        cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    except (ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"{path}: {owner} rejects these arguments: {err}") from err
    return TorchOptimizer(name=name, cls=cls, kwargs=kwargs, path=path)


def parse_run_config(doc: Mapping[str, Any], registry: Registry | None = None,
                     allow_ablate: bool = True) -> RunConfig:
    """Validate a whole run config (a parsed TOML document). ``[ablate]`` is ignored here
    (see :mod:`curvkit.experiments.ablate`); every other problem raises
    :class:`~curvkit.errors.ConfigError` naming its dotted path."""
    registry = registry or get_registry()
    if not isinstance(doc, Mapping):
        raise ConfigError(f"config: expected a table, got {type(doc).__name__}")
    known = list(SECTIONS) if allow_ablate else [s for s in SECTIONS if s != "ablate"]
    for key in doc:
        if key not in known:
            raise ConfigError(f"{key}: unknown section{_suggest(key, known)} "
                              f"(sections: {', '.join(known)})")
    for key in ("title", "description"):
        if key in doc and not isinstance(doc[key], str):
            raise ConfigError(f"{key}: expected str, got {doc[key]!r}")
    tables = {}
    for key in ("task", "train", "optimizer"):
        value = doc.get(key, {})
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table, got {value!r}")
        tables[key] = dict(value)
    if "optimizer" not in doc:
        raise ConfigError("optimizer: missing [optimizer] table (a curvkit optimizer, or "
                          "torch = \"Adam\" for a torch.optim baseline)")
    task = build_options(TaskOptions, tables["task"], "task")
    train = build_options(TrainOptions, tables["train"], "train")
    dataset = parse_part("dataset", task.dataset, "task.dataset", registry)
    model = parse_part("model", task.model, "task.model", registry)
    if "torch" in tables["optimizer"]:
        optimizer: OptimizerConfig | TorchOptimizer = parse_torch_optimizer(tables["optimizer"])
    else:
        optimizer = parse_optimizer(tables["optimizer"], registry)
    return RunConfig(title=str(doc.get("title", "")), task=task, train=train, dataset=dataset,
                     model=model, optimizer=optimizer, doc=copy.deepcopy(dict(doc)))


def part_references(doc: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(dotted path, kind, name)`` of every part a config names (for availability checks)."""
    out = []
    for (section, key), kind in PART_KEYS.items():
        table = doc.get(section)
        if not isinstance(table, Mapping) or key not in table:
            continue
        if section == "optimizer" and "torch" in table:
            continue
        value = table[key]
        if isinstance(value, str):
            out.append((f"{section}.{key}", kind, value))
        elif isinstance(value, Mapping) and isinstance(value.get("name"), str):
            out.append((f"{section}.{key}.name", kind, value["name"]))
    if "optimizer" in doc and isinstance(doc["optimizer"], Mapping) \
            and "torch" not in doc["optimizer"]:
        # defaults of parse_optimizer count as references too
        opt = doc["optimizer"]
        for spec in option_specs(OptimizerOptions):
            if spec.name in ("estimator", "preconditioner", "solver") and spec.name not in opt:
                out.append((f"optimizer.{spec.name}", spec.name, spec.default))
    return out


def options_table(options_cls: type) -> str:
    """A markdown table of an Options dataclass (name, type, default, help) — the source of
    the tables in docs/experiments.md, so the docs cannot drift from the code."""
    from curvkit.options import format_type

    rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for spec in option_specs(options_cls):
        default = "required" if spec.required else f"`{spec.default!r}`"
        bounds = ""
        if spec.min is not None or spec.max is not None:
            lo = "-inf" if spec.min is None else f"{spec.min:g}"
            hi = "inf" if spec.max is None else f"{spec.max:g}"
            bounds = f" (in [{lo}, {hi}])"
        kind = format_type(spec.type).replace("|", "\\|")
        rows.append(f"| `{spec.name}` | {kind} | {default} | {spec.help}{bounds} |")
    return "\n".join(rows)


def schema_markdown(registry: Registry | None = None) -> str:
    """The generated part of docs/experiments.md: the option tables of ``[task]``,
    ``[train]``, ``[optimizer]`` and of the built-in datasets and models."""
    registry = registry or get_registry()
    out = ["### `[task]`", "", options_table(TaskOptions), "",
           "### `[train]`", "", options_table(TrainOptions), "",
           "### `[optimizer]`", "", options_table(OptimizerOptions), ""]
    for kind, title in (("dataset", "Datasets"), ("model", "Models")):
        out += [f"### {title}", ""]
        for name in registry.names(kind):
            spec = registry.get(kind, name)
            if spec.plugin != "curvkit":
                continue
            out += [f"#### `{name}`", "", spec.description, "", options_table(spec.cls.Options),
                    ""]
    return "\n".join(out).rstrip() + "\n"
