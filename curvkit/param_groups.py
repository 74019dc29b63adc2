"""Parameter groups: torch.optim's ``param_groups``, given explicitly or by name patterns.

A group is a dict ``{"params": [...], "lr": ..., **solver_group_options}``. Which options a
group may set is declared by the solver (``Solver.group_options``; ``direct`` has
``momentum``, ``dampening``, ``weight_decay``, ``nesterov``); ``lr`` is always a group
option, but a solver whose step is not a sum of per-parameter steps (``per_group_lr =
False``: trust_region, cubic, varpro) refuses groups with different learning rates. Every
group holds every option (defaults from the config), so LR and momentum schedulers find
them.

Groups come from either

* ``build_optimizer(..., param_groups=[{"params": [...], "lr": 0.1}, ...])``: as in
  ``torch.optim``; together they must hold every trainable parameter exactly once (the
  estimator and preconditioner are laid out over all of them), or
* the config: ``param_groups = [{names = ["*.bias"], modules = ["LayerNorm"],
  weight_decay = 0.0}, ...]`` — a parameter goes to the first rule whose ``names``
  (fnmatch patterns on its full name) or ``modules`` (fnmatch patterns on the class name
  of the module owning it) match; unmatched parameters form group 0 with the defaults.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from torch import nn

from curvkit.errors import ConfigError
from curvkit.options import build_options, coerce

RULE_KEYS = ("names", "modules")


@dataclass
class GroupRule:
    """One ``param_groups`` entry of a config: patterns and the options they set."""

    names: tuple[str, ...]
    modules: tuple[str, ...]
    overrides: dict[str, Any]
    path: str

    def as_table(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.names:
            out["names"] = list(self.names)
        if self.modules:
            out["modules"] = list(self.modules)
        return {**out, **self.overrides}


def group_defaults(lr: float, solver: Any) -> dict[str, Any]:
    """Options every group carries: ``lr`` and the solver's group options (from ``solver``,
    a :class:`~curvkit.config.PartChoice` or a solver instance)."""
    cls = solver.spec.cls if hasattr(solver, "spec") else type(solver)
    opts = solver.options
    return {"lr": lr, **{k: getattr(opts, k) for k in cls.group_options}}


def check_overrides(values: Mapping[str, Any], solver: Any, path: str,
                    allow: Sequence[str] = ()) -> dict[str, Any]:
    """Validate the options a group sets against the solver (types, bounds, cross-checks of
    its ``Options``); unknown keys are errors naming ``path`` and the allowed keys."""
    cls = solver.spec.cls if hasattr(solver, "spec") else type(solver)
    name = cls.name
    allowed = ("lr", *cls.group_options)
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key in allow:
            continue
        if key not in allowed:
            hint = f"{', '.join(allowed)}" if allowed else "lr"
            raise ConfigError(f"{path}.{key}: not an option a parameter group of solver "
                              f"{name!r} can set (group options: {hint})")
        out[key] = value
    if "lr" in out:
        lr = coerce(out["lr"], float, f"{path}.lr")
        if not (math.isfinite(lr) and lr >= 0):
            raise ConfigError(f"{path}.lr: must be a finite number >= 0, got {out['lr']!r}")
        out["lr"] = lr
    solver_keys = {k: v for k, v in out.items() if k != "lr"}
    if solver_keys:
        base = asdict(solver.options) if is_dataclass(solver.options) else {}
        checked = build_options(cls.Options, {**base, **solver_keys}, path)
        out.update({k: getattr(checked, k) for k in solver_keys})
    return out


def parse_rules(raw: Sequence[Any], solver: Any, path: str) -> list[GroupRule]:
    """The config's ``param_groups`` list → validated :class:`GroupRule` s."""
    rules = []
    for i, entry in enumerate(raw):
        where = f"{path}[{i}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{where}: expected a table like {{names = [\"*.bias\"], "
                              f"weight_decay = 0.0}}, got {entry!r}")
        pats = {k: tuple(coerce(entry.get(k, []), list[str], f"{where}.{k}"))
                for k in RULE_KEYS}
        if not pats["names"] and not pats["modules"]:
            raise ConfigError(f"{where}: needs names = [patterns of parameter names] and/or "
                              f"modules = [patterns of module class names]")
        overrides = check_overrides(entry, solver, where, allow=RULE_KEYS)
        rules.append(GroupRule(pats["names"], pats["modules"], overrides, where))
    return rules


def _owner_classes(model: nn.Module) -> dict[str, str]:
    out: dict[str, str] = {}
    for mod_name, mod in model.named_modules():
        for attr, _ in mod.named_parameters(recurse=False):
            out.setdefault(f"{mod_name}.{attr}" if mod_name else attr, type(mod).__name__)
    return out


def groups_from_rules(model: nn.Module, named: Sequence[tuple[str, nn.Parameter]],
                      rules: Sequence[GroupRule], defaults: Mapping[str, Any]
                      ) -> list[dict[str, Any]]:
    """Assign each trainable parameter to the first matching rule (else group 0)."""
    if not rules:
        return [{"params": [p for _, p in named], **defaults}]
    owners = _owner_classes(model)
    members: list[list[nn.Parameter]] = [[] for _ in range(len(rules) + 1)]
    for name, p in named:
        cls = owners.get(name, "")
        for j, rule in enumerate(rules):
            if any(fnmatch.fnmatchcase(name, pat) for pat in rule.names) or \
                    any(fnmatch.fnmatchcase(cls, pat) for pat in rule.modules):
                members[j + 1].append(p)
                break
        else:
            members[0].append(p)
    for rule, got in zip(rules, members[1:]):
        if not got:
            some = ", ".join(n for n, _ in named[:6])
            raise ConfigError(f"{rule.path}: matches no trainable parameter (names "
                              f"{list(rule.names)}, modules {list(rule.modules)}; parameters "
                              f"are named like {some})")
    groups = []
    if members[0]:
        groups.append({"params": members[0], **defaults})
    for rule, got in zip(rules, members[1:]):
        groups.append({"params": got, **defaults, **rule.overrides})
    return groups


def groups_from_user(named: Sequence[tuple[str, nn.Parameter]], given: Sequence[Any],
                     solver: Any, defaults: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``build_optimizer(param_groups=...)`` → complete groups, every trainable parameter
    exactly once (errors name the group and the parameter)."""
    if isinstance(given, Mapping) or not isinstance(given, Sequence) or not given:
        raise ConfigError("param_groups: expected a non-empty list of dicts "
                          "{'params': [...], 'lr': ..., ...}")
    index = {id(p): n for n, p in named}
    seen: dict[int, int] = {}
    groups = []
    for i, g in enumerate(given):
        where = f"param_groups[{i}]"
        if not isinstance(g, Mapping) or "params" not in g:
            raise ConfigError(f"{where}: expected a dict with 'params', got {g!r}")
        params = g["params"]
        params = [params] if isinstance(params, nn.Parameter) else list(params)
        for p in params:
            if id(p) not in index:
                what = "a frozen parameter (requires_grad=False)" \
                    if isinstance(p, nn.Parameter) and not p.requires_grad \
                    else "not a trainable parameter of the model"
                raise ConfigError(f"{where}.params: a tensor of shape {tuple(p.shape)} is "
                                  f"{what}")
            if id(p) in seen:
                raise ConfigError(f"{where}.params: parameter {index[id(p)]!r} is also in "
                                  f"param_groups[{seen[id(p)]}]")
            seen[id(p)] = i
        overrides = check_overrides({k: v for k, v in g.items() if k != "params"},
                                    solver, where)
        groups.append({"params": params, **defaults, **overrides})
    missing = [n for n, p in named if id(p) not in seen]
    if missing:
        raise ConfigError(f"param_groups: trainable parameters in no group: "
                          f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; the "
                          f"curvature is laid out over all trainable parameters — add them "
                          f"to a group, or freeze them with requires_grad_(False) first")
    return groups


def check_shared_lr(groups: Sequence[Mapping[str, Any]], solver: Any, where: str) -> None:
    """A solver without per-group learning rates needs one lr in all groups."""
    if getattr(solver, "per_group_lr", False) or len(groups) < 2:
        return
    lrs = [g["lr"] for g in groups]
    for i, lr in enumerate(lrs[1:], start=1):
        if lr != lrs[0]:
            raise ConfigError(f"{where}[{i}].lr = {lr!r} differs from group 0's {lrs[0]!r}: "
                              f"solver {solver.name!r} takes one learning rate for all "
                              f"parameters (its step is not a sum of per-parameter steps); "
                              f"use solver 'direct' for per-group learning rates")
