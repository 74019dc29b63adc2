"""Tuning: for each grid point, an Optuna search on the validation split under a fixed
budget, then the seeds run with the best values (``[tune]``; the ``tune`` extra).

A comparison of optimizers is only fair when each gets its hyperparameters tuned with the
same budget. ``[tune]`` lists the options to search and the budget::

    [tune]
    trials = 20                 # Optuna trials per grid point
    steps = 50                  # training steps per trial (default: train.steps)
    seed = 0                    # seed of the trials' runs and of the sampler
    metric = "val_loss"         # minimised: the validation split at the trial's last step
    timeout_s = 0               # optional wall-clock limit of a point's search (0: none)
    points = ["Adam"]           # optional: tune only the grid points with these labels
    [tune.space]
    "optimizer.lr" = { low = 1e-3, high = 1.0, log = true }
    "optimizer.preconditioner.damping" = { low = 1e-4, high = 0.1, log = true,
                                           points = ["K-FAC"] }   # only for these points
    "optimizer.solver.momentum" = [0.0, 0.5, 0.9]       # a list: categorical
    "optimizer.solver.max_iters" = { choices = [5, 10, 20], points = ["GN"] }

A point is named by its whole label or by the label of one of its axis values (the
``label`` of an optimizer entry: ``"K-FAC"`` names ``"MLP/mnist1d, K-FAC"``).

Each trial trains the point's configuration with the suggested values on the training
split for ``steps`` steps (seed ``seed``) and scores it by ``metric`` on the validation
split (a diverged or failed trial scores +inf). The best values are written into the
point's configuration, whose runs (every seed of ``train.seeds``) then go into
``results.jsonl`` as usual: their resolved config, and so their run ids and the report,
show the tuned values. A key of the space that does not apply to a point (the damping of
a preconditioner a torch.optim baseline does not have) is left out for that point and
said so.

The first trial is the point's configuration as written (when every searched option has a
value in its range there), so a search never ends worse on its metric than the values the
config names; TPE starts up on the first half of the trials (at most 10) and models the
rest.

Trials are appended to ``DIR/tune.jsonl`` as they finish (``trial`` records), and the
outcome of a point as a ``best`` record: re-running the command reuses a finished search
and continues an interrupted one from its recorded trials (Optuna's sampler state is not
restored, so the continued search may propose other values than an uninterrupted one
would have). ``curvkit report`` shows each point's search: trials, best value and values.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curvkit.errors import ConfigError, CurvkitError
from curvkit.experiments.store import ResultsWriter

TUNE_FILE = "tune.jsonl"
OPTIONS = ("trials", "steps", "seed", "metric", "timeout_s", "points", "space")
METRICS = ("val_loss", "val_accuracy", "train_loss")


@dataclass
class Dimension:
    """One searched option: a float/int range (optionally log-scaled) or a categorical list."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: list[Any] = field(default_factory=list)
    points: list[str] | None = None  # searched only for these grid points (None: all)

    def suggest(self, trial: Any) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.key, self.choices)
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)

    def distribution(self) -> Any:
        import optuna

        if self.choices:
            return optuna.distributions.CategoricalDistribution(self.choices)
        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high),
                                                        log=self.log)
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high),
                                                      log=self.log)


@dataclass
class TuneOptions:
    trials: int
    steps: int | None
    seed: int
    metric: str
    timeout_s: float
    space: list[Dimension]
    points: list[str] | None = None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _names(table: Mapping[str, Any], path: str) -> list[str] | None:
    """An optional ``points`` list of grid point labels."""
    points = table.get("points")
    if points is not None and (not isinstance(points, list) or not points or
                               not all(isinstance(x, str) for x in points)):
        raise ConfigError(f"{path}: expected a non-empty list of grid point labels, got "
                          f"{points!r}")
    return points


def _names_of(point: Any) -> set[str]:
    """What names a grid point: its label and the labels of its axis values."""
    from curvkit.experiments.ablate import value_label

    return {point.label, *(value_label(k, v) for k, v in point.overrides.items())}


def parse_tune(doc: Mapping[str, Any]) -> TuneOptions | None:
    """The validated ``[tune]`` table, or None without one; errors name the dotted path."""
    table = doc.get("tune")
    if table is None:
        return None
    if not isinstance(table, Mapping):
        raise ConfigError(f"tune: expected a table, got {table!r}")
    for key in table:
        if key not in OPTIONS:
            raise ConfigError(f"tune.{key}: unknown option (options: {', '.join(OPTIONS)})")
    trials = table.get("trials", 20)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"tune.trials: expected an int >= 1, got {trials!r}")
    steps = table.get("steps")
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool)
                              or steps < 1):
        raise ConfigError(f"tune.steps: expected an int >= 1, got {steps!r}")
    seed = table.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"tune.seed: expected an int, got {seed!r}")
    metric = table.get("metric", "val_loss")
    if metric not in METRICS:
        raise ConfigError(f"tune.metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    timeout = table.get("timeout_s", 0)
    if not _number(timeout) or timeout < 0:
        raise ConfigError(f"tune.timeout_s: expected a number >= 0, got {timeout!r}")
    points = _names(table, "tune.points")
    space_table = table.get("space")
    if not isinstance(space_table, Mapping) or not space_table:
        raise ConfigError("tune.space: expected a table of dotted keys → {low, high, log} or "
                          "a list of choices, e.g. \"optimizer.lr\" = { low = 1e-3, high = 1, "
                          "log = true }")
    space = []

    def walk(prefix: str, value: Any) -> None:
        path = f"tune.space.{prefix}"
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{path}: expected a non-empty list of choices")
            space.append(Dimension(prefix, choices=list(value)))
        elif isinstance(value, Mapping) and "choices" in value:
            unknown = [k for k in value if k not in ("choices", "points")]
            if unknown:
                raise ConfigError(f"{path}.{unknown[0]}: unknown (a categorical table has "
                                  f"choices, points)")
            if not isinstance(value["choices"], list) or not value["choices"]:
                raise ConfigError(f"{path}.choices: expected a non-empty list of choices")
            space.append(Dimension(prefix, choices=list(value["choices"]),
                                   points=_names(value, f"{path}.points")))
        elif isinstance(value, Mapping) and ("low" in value or "high" in value):
            unknown = [k for k in value if k not in ("low", "high", "log", "points")]
            if unknown:
                raise ConfigError(f"{path}.{unknown[0]}: unknown (a range has low, high, log, "
                                  f"points)")
            low, high, log = value.get("low"), value.get("high"), value.get("log", False)
            if not _number(low) or not _number(high) or not low < high:
                raise ConfigError(f"{path}: expected numbers low < high, got low={low!r}, "
                                  f"high={high!r}")
            if not isinstance(log, bool):
                raise ConfigError(f"{path}.log: expected true or false, got {log!r}")
            if log and low <= 0:
                raise ConfigError(f"{path}: a log range needs low > 0, got {low!r}")
            integer = isinstance(low, int) and isinstance(high, int)
            space.append(Dimension(prefix, low, high, log, integer,
                                   points=_names(value, f"{path}.points")))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        else:
            raise ConfigError(f"{path}: expected {{ low, high, log }} or a list of choices, "
                              f"got {value!r}")

    for key, value in space_table.items():
        walk(key, value)
    for dim in space:
        if dim.key.split(".")[0] not in ("optimizer", "task", "train"):
            raise ConfigError(f"tune.space.{dim.key}: keys start with optimizer., task. or "
                              f"train.")
        if dim.key in ("train.seeds", "train.steps"):
            raise ConfigError(f"tune.space.{dim.key}: not searchable (the budget is "
                              f"tune.steps)")
    return TuneOptions(trials, steps, seed, metric, float(timeout), space, points)


# --------------------------------------------------------------------------- the search
def _read(path: Path) -> list[dict[str, Any]]:
    out = []
    if not path.exists():
        return out
    with path.open("rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict) and isinstance(rec.get("point"), str) and \
                    rec.get("type") in ("trial", "best") and isinstance(rec.get("params"), dict):
                out.append(rec)
    return out


def load_searches(directory: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Per grid point (config id of the untuned point): ``label``, ``trials`` (records),
    ``best`` (record or None)."""
    out: dict[str, dict[str, Any]] = {}
    for rec in _read(Path(directory) / TUNE_FILE):
        entry = out.setdefault(rec["point"], {"label": rec.get("label", rec["point"]),
                                              "trials": [], "best": None})
        if rec["type"] == "trial":
            entry["trials"].append(rec)
        else:
            entry["best"] = rec
    return out


def _apply(doc: dict[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    from curvkit.experiments.ablate import set_path

    doc = copy.deepcopy(doc)
    for key, value in params.items():
        set_path(doc, key, value)
    return doc


def _applicable(doc: dict[str, Any], dims: list[Dimension]) -> tuple[list[Dimension], list[str]]:
    """The dimensions that a point's config accepts (checked with a value of each)."""
    from curvkit.experiments.config import parse_run_config

    ok, left_out = [], []
    for dim in dims:
        value = dim.choices[0] if dim.choices else dim.low
        try:
            parse_run_config(_apply(doc, {dim.key: value}))
        except CurvkitError as err:
            left_out.append(f"{dim.key} ({err})")
            continue
        ok.append(dim)
    return ok, left_out


def _starting_point(doc: dict[str, Any], dims: list[Dimension]) -> dict[str, Any]:
    """The values the point's config gives every searched option, when each lies in its
    range (or choices); {} otherwise (e.g. an option left to its default)."""
    out = {}
    for dim in dims:
        node: Any = doc
        for k in dim.key.split("."):
            node = node.get(k) if isinstance(node, dict) else None
        if node is None or isinstance(node, bool):
            return {}
        if dim.choices:
            if node not in dim.choices:
                return {}
        elif not _number(node) or not dim.low <= node <= dim.high:
            return {}
        out[dim.key] = node
    return out


def trial_value(doc: dict[str, Any], opts: TuneOptions, cache_dir: Any) -> float:
    """Train one trial configuration for the budget and score it (+inf if it diverged)."""
    from curvkit.experiments.config import parse_run_config
    from curvkit.experiments.runner import train

    doc = copy.deepcopy(doc)
    train_table = dict(doc.get("train", {}))
    steps = opts.steps or int(train_table.get("steps", 100))
    train_table.update(steps=steps, eval_every=steps, checkpoint_every=0)
    doc["train"] = train_table
    cfg = parse_run_config(doc)
    end = train(cfg, opts.seed, lambda rec: None, {"run": "tune", "attempt": 1},
                cache_dir=cache_dir)
    value = end["final"].get(opts.metric)
    if end["status"] != "finished" or value is None or not math.isfinite(value):
        return math.inf
    return -float(value) if opts.metric.endswith("accuracy") else float(value)


def tune_point(point: Any, opts: TuneOptions, out: Path, writer: ResultsWriter,
               previous: dict[str, Any] | None, cache_dir: Any,
               log: Callable[[str], None]) -> dict[str, Any] | None:
    """Search one grid point (continuing ``previous`` trials); returns the best params."""
    try:
        import optuna
    except ImportError as err:
        raise ConfigError("tune: needs the optuna package (pip install 'curvkit[tune]')") \
            from err
    if previous and previous.get("best"):
        return previous["best"]["params"]
    names = _names_of(point)
    mine = [d for d in opts.space if d.points is None or names & set(d.points)]
    dims, left_out = _applicable(point.doc, mine)
    for why in left_out:
        log(f"  tune [{point.label}]: left out {why}")
    point_id = point.config.config_id()
    if not dims:
        log(f"  tune [{point.label}]: nothing in tune.space applies; not tuned")
        writer.append({"type": "best", "point": point_id, "label": point.label, "params": {},
                       "value": None, "trials": 0})
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # TPE samples at random for its first n_startup_trials (10 by default): with a budget of
    # a few trials that would be a pure random search, so half the trials start it up
    sampler = optuna.samplers.TPESampler(seed=opts.seed,
                                         n_startup_trials=min(10, max(1, opts.trials // 2)))
    study = optuna.create_study(direction="minimize", sampler=sampler)
    distributions = {d.key: d.distribution() for d in dims}
    done = 0
    for rec in (previous or {}).get("trials", []):
        if set(rec["params"]) != set(distributions):
            continue
        value = rec.get("value")
        state = optuna.trial.TrialState.COMPLETE if value is not None else \
            optuna.trial.TrialState.FAIL
        study.add_trial(optuna.trial.create_trial(
            params=rec["params"], distributions=distributions,
            value=value if value is not None else None, state=state))
        done += 1

    def objective(trial: Any) -> float:
        params = {d.key: d.suggest(trial) for d in dims}
        try:
            value = trial_value(_apply(point.doc, params), opts, cache_dir)
        except CurvkitError:
            value = math.inf
        writer.append({"type": "trial", "point": point_id, "label": point.label,
                       "number": trial.number, "params": params,
                       "value": value if math.isfinite(value) else None})
        return value if math.isfinite(value) else float("inf")

    start = _starting_point(point.doc, dims)
    if not done and start:
        # the configuration as written is the first trial: the search never ends worse (on
        # its metric) than the values the config names
        study.enqueue_trial(start)
    remaining = opts.trials - done
    if remaining > 0:
        study.optimize(objective, n_trials=remaining,
                       timeout=opts.timeout_s if opts.timeout_s > 0 else None)
    complete = [t for t in study.trials if t.value is not None and math.isfinite(t.value)]
    if not complete:
        log(f"  tune [{point.label}]: every trial diverged or failed; running the config "
            f"as written")
        best: dict[str, Any] = {}
        value = None
    else:
        top = min(complete, key=lambda t: t.value)
        best, value = dict(top.params), top.value
        if opts.metric.endswith("accuracy"):
            value = -value
    writer.append({"type": "best", "point": point_id, "label": point.label, "params": best,
                   "value": value, "metric": opts.metric, "trials": len(study.trials)})
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in best.items())
    log(f"  tune [{point.label}]: {len(study.trials)} trials, best {opts.metric} "
        f"{value if value is None else f'{value:.4g}'} with {shown or 'the config as written'}")
    return best


def tune_grid(grid: Any, doc: Mapping[str, Any], out: Path, *, cache_dir: Any = None,
              log: Callable[[str], None] = print) -> bool:
    """Tune every active grid point (``[tune]``) and write the best values into its config.
    Returns whether the config has a ``[tune]`` table."""
    from curvkit import distributed
    from curvkit.experiments.config import parse_run_config

    opts = parse_tune(doc)
    if opts is None:
        return False
    if distributed.active():
        raise ConfigError("tune: tune without torchrun first (the search runs in one "
                          "process); the tuned runs can then resume under torchrun")
    chosen = grid.active
    known = set().union(*(_names_of(p) for p in grid.active)) if grid.active else set()
    for path, names in [("tune.points", opts.points),
                        *((f"tune.space.{d.key}.points", d.points) for d in opts.space)]:
        unknown = [x for x in names or [] if x not in known]
        if unknown:
            raise ConfigError(f"{path}: no grid point is labelled {unknown[0]!r} "
                              f"(labels: {', '.join(repr(p.label) for p in grid.active)})")
    if opts.points is not None:
        chosen = [p for p in grid.active if _names_of(p) & set(opts.points)]
    searches = load_searches(out)
    with ResultsWriter(out / TUNE_FILE) as writer:
        for point in chosen:
            point_id = point.config.config_id()
            best = tune_point(point, opts, out, writer, searches.get(point_id), cache_dir, log)
            if best:
                point.doc = _apply(point.doc, best)
                point.config = parse_run_config(point.doc)
    return True
