"""Optimizer configs: a dict or the ``[optimizer]`` table of a TOML file, validated up front.

Every error names the dotted path of the offending value
(``optimizer.preconditioner.damping: expected float, got 'abc'``), unknown part names
list close matches, unknown options are errors, and an impossible combination of parts
is refused before any training with the part, the missing capability and its providers.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import tomllib

from curvkit.errors import ConfigError, IncompatibleError
from curvkit.options import build_options, option, option_specs
from curvkit.param_groups import GroupRule, parse_rules
from curvkit.registry import PartSpec, Registry, get_registry


@dataclass
class OptimizerOptions:
    """Top-level keys of the ``[optimizer]`` table."""

    lr: float = option(1.0, "learning rate (kept in param_groups, so LR schedulers work)",
                       min=0.0)
    estimator: str | dict = option("ggn", "curvature estimator: a name or {name=..., options}")
    preconditioner: str | dict = option("identity", "preconditioner structure: a name or table")
    solver: str | dict = option("direct", "solver: a name or table")
    param_groups: list[dict] = option(
        default_factory=list, help="parameter groups by pattern: [{names = [\"*.bias\"], "
        "modules = [\"LayerNorm\"], weight_decay = 0.0}, ...]; first match wins, the rest "
        "keep the defaults (keys: lr and the solver's group options)")


@dataclass
class PartChoice:
    """A configured part: its registry entry, validated options and config path."""

    spec: PartSpec
    options: Any
    path: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def provides(self) -> frozenset[str]:
        return self.spec.cls.capabilities(self.options)

    @property
    def needs(self) -> frozenset[str]:
        return self.spec.cls.requirements(self.options)

    def as_table(self) -> dict[str, Any]:
        """``{name, **options}``, nested parts as their own tables (JSON/TOML-able)."""
        opts = {}
        if is_dataclass(self.options):
            for f in fields(self.options):
                value = getattr(self.options, f.name)
                opts[f.name] = value.as_table() if isinstance(value, PartChoice) else \
                    copy.deepcopy(value)
        return {"name": self.name, **opts}


@dataclass
class OptimizerConfig:
    lr: float
    estimator: PartChoice
    preconditioner: PartChoice
    solver: PartChoice
    param_groups: list[GroupRule] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {"lr": self.lr, "estimator": self.estimator.as_table(),
               "preconditioner": self.preconditioner.as_table(),
               "solver": self.solver.as_table()}
        if self.param_groups:
            out["param_groups"] = [r.as_table() for r in self.param_groups]
        return out


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err


def optimizer_table(config: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """The optimizer table of a config dict or TOML file (``[optimizer]`` if present)."""
    from_file = isinstance(config, (str, Path))
    if from_file:
        doc = load_toml(config)
        if "optimizer" not in doc:
            raise ConfigError(f"{config}: no [optimizer] table")
        config = doc
    if not isinstance(config, Mapping):
        raise ConfigError(f"optimizer: expected a table, got {type(config).__name__}")
    if "optimizer" in config and isinstance(config["optimizer"], Mapping):
        if from_file:
            return dict(config["optimizer"])  # a run file's other tables are the runner's
        extra = sorted(str(k) for k in config if k != "optimizer")
        if extra:
            # {"optimizer": {...}, "lr": 0.1} would silently train with the table's lr
            raise ConfigError(f"{extra[0]}: unexpected key beside 'optimizer' in an optimizer "
                              f"config (keys: {', '.join(extra)}); put options inside the "
                              f"'optimizer' table, or pass the table itself")
        return dict(config["optimizer"])
    return dict(config)


def parse_part(kind: str, value: Any, path: str, registry: Registry | None = None) -> PartChoice:
    """``"name"`` or ``{name = "...", **options}`` → a validated :class:`PartChoice`."""
    registry = registry or get_registry()
    if isinstance(value, str):
        name, raw = value, {}
    elif isinstance(value, Mapping):
        raw = dict(value)
        if "name" not in raw:
            raise ConfigError(f"{path}.name: missing; a {kind} table needs name = "
                              f"one of {', '.join(registry.names(kind))}")
        name = raw.pop("name")
        if not isinstance(name, str):
            raise ConfigError(f"{path}.name: expected str, got {name!r}")
    else:
        raise ConfigError(f"{path}: expected a {kind} name or table, got {value!r}")
    spec = registry.get(kind, name, path=f"{path}.name" if isinstance(value, Mapping) else path)
    raw = resolve_nested(spec.cls.Options, raw, path, registry)
    options = registry.resolve_parts(build_options(spec.cls.Options, raw, path), path)
    return PartChoice(spec, options, path)


def resolve_nested(options_cls: type, raw: Mapping[str, Any], path: str,
                   registry: Registry) -> dict[str, Any]:
    """Resolve the options declared ``option(part=kind)`` (given or defaulted) into validated
    :class:`PartChoice` values at ``path.<option>``: a composite part receives its children
    as typed configs and never calls the parser itself."""
    raw = dict(raw)
    for spec in option_specs(options_cls):
        if not spec.part:
            continue
        value = raw.get(spec.name, None if spec.required else spec.default)
        if value is None or isinstance(value, PartChoice) or \
                (isinstance(value, str) and value in spec.keep):
            continue
        raw[spec.name] = parse_part(spec.part, value, f"{path}.{spec.name}", registry)
    return raw


def parse_optimizer(config: Mapping[str, Any] | str | Path,
                    registry: Registry | None = None, path: str = "optimizer"
                    ) -> OptimizerConfig:
    """Validate a whole optimizer config, including the compatibility of its parts."""
    registry = registry or get_registry()
    table = optimizer_table(config)
    top = build_options(OptimizerOptions, table, path)
    cfg = OptimizerConfig(
        lr=top.lr,
        estimator=parse_part("estimator", top.estimator, f"{path}.estimator", registry),
        preconditioner=parse_part("preconditioner", top.preconditioner,
                                  f"{path}.preconditioner", registry),
        solver=parse_part("solver", top.solver, f"{path}.solver", registry),
    )
    cfg.param_groups = parse_rules(top.param_groups, cfg.solver, f"{path}.param_groups")
    if cfg.param_groups and not cfg.solver.spec.cls.per_group_lr and \
            any("lr" in r.overrides and r.overrides["lr"] != cfg.lr for r in cfg.param_groups):
        bad = next(r for r in cfg.param_groups if r.overrides.get("lr", cfg.lr) != cfg.lr)
        raise ConfigError(f"{bad.path}.lr: solver {cfg.solver.name!r} takes one learning "
                          f"rate for all parameters; use solver 'direct' for per-group rates")
    check_compatible(cfg, registry)
    return cfg


def check_compatible(cfg: OptimizerConfig, registry: Registry | None = None) -> None:
    """Refuse a combination whose needs are not provided, naming part, capability, providers.

    A preconditioner's needs must come from the estimator; a solver's from the estimator
    or the preconditioner.
    """
    registry = registry or get_registry()
    est = cfg.estimator
    pre = cfg.preconditioner
    checks = [(pre, est.provides, ("estimator",)),
              (cfg.solver, est.provides | pre.provides, ("estimator", "preconditioner"))]
    for part, available, kinds in checks:
        missing = sorted(part.needs - available)
        if not missing:
            continue
        cap = missing[0]
        offers = []
        for kind in kinds:
            names = registry.providers(cap, (kind,))
            if names:
                offers.append(f"{kind}s {', '.join(names)}")
        by = " or ".join(f"{k} {c.name!r}" for k, c in
                         zip(kinds, (est, pre)))
        where = "; provided by " + " and ".join(offers) if offers else \
            "; no registered part provides it"
        raise IncompatibleError(
            f"{part.path}: {part.spec.kind} {part.name!r} needs capability {cap!r}, which "
            f"{by} does not provide{where}")
