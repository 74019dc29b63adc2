"""Options of a part: one dataclass is the single source of names, types, defaults and help.

A part declares::

    @dataclass
    class Options:
        damping: float = option(1e-3, "Tikhonov damping added to each factor", min=0.0)
        method: Literal["cholesky", "eigh"] = option("cholesky", "how factors are inverted")

From that dataclass curvkit derives the ``curvkit components`` listing, the docs table,
and the validation of user configs (:func:`build_options`), so nothing is typed twice.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from typing import Any, Literal, Union, get_args, get_origin

from curvkit.errors import ConfigError

# int options are sizes, counts and seeds that end up in torch (int64)
INT_MAX = 2**63 - 1
INT_MIN = -(2**63)

__all__ = ["option", "OptionSpec", "NoOptions", "option_specs", "build_options", "check_bounds",
           "format_type"]


def option(default: Any = MISSING, help: str = "", *, min: float | None = None,
           max: float | None = None, min_exclusive: bool = False, part: str | None = None,
           keep: tuple[str, ...] = (), default_factory: Any = MISSING) -> Any:
    """A dataclass field carrying its help text and optional numeric bounds.

    ``min_exclusive``: the value must be strictly greater than ``min`` (a radius or a
    shrink factor of 0 would reject every step).

    ``part``: the option is a nested part of that kind (a composite part's child, like
    Distributed Shampoo's ``grafting_config``): the config layer resolves a name or table
    into a validated :class:`curvkit.config.PartChoice` before the Options are built, so
    the part receives typed data and never parses config itself. Strings in ``keep`` are
    plain values that are not parts (e.g. ``"gradient"``)."""
    metadata = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive,
                "nested": part, "keep": tuple(keep)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass
class NoOptions:
    """A part without options."""


@dataclass(frozen=True)
class OptionSpec:
    """One option as data: what ``curvkit components`` prints and configs are checked against."""

    name: str
    type: Any
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    part: str | None = None
    keep: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def describe(self) -> str:
        default = "required" if self.required else f"default {self.default!r}"
        bounds = ""
        if self.min is not None or self.max is not None:
            lo = "-inf" if self.min is None else f"{self.min:g}"
            hi = "inf" if self.max is None else f"{self.max:g}"
            bounds = f", in {'(' if self.min_exclusive else '['}{lo}, {hi}]"
        text = f"{self.name}: {format_type(self.type)} ({default}{bounds})"
        return f"{text} — {self.help}" if self.help else text


def option_specs(options_cls: type) -> tuple[OptionSpec, ...]:
    """The options of a dataclass, with their resolved types."""
    hints = typing.get_type_hints(options_cls)
    specs = []
    for f in dataclasses.fields(options_cls):
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = MISSING
        specs.append(OptionSpec(f.name, hints[f.name], default, f.metadata.get("help", ""),
                                f.metadata.get("min"), f.metadata.get("max"),
                                bool(f.metadata.get("min_exclusive", False)),
                                f.metadata.get("nested"), tuple(f.metadata.get("keep", ()))))
    return tuple(specs)


def format_type(tp: Any) -> str:
    origin = get_origin(tp)
    if tp is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(format_type(a) for a in get_args(tp))
    if origin in (tuple, list, dict):
        inner = ", ".join("..." if a is Ellipsis else format_type(a) for a in get_args(tp))
        return f"{origin.__name__}[{inner}]"
    if tp is Any:
        return "any"
    return getattr(tp, "__name__", str(tp))


def _describe_value(value: Any) -> str:
    return repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (ints widen to float,
    lists to tuples). Raises :class:`ConfigError` naming ``path``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{path}: expected None, got {_describe_value(value)}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and type(value) is type(choices[choices.index(value)]):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"{path}: expected one of {', '.join(repr(c) for c in choices)}, "
                          f"got {_describe_value(value)}{hint}")
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return coerce(value, arg, path)
            except ConfigError:
                pass
        for arg in get_args(tp):
            # a value of the right type but not among a Literal's choices: that arm's error
            # carries the close-match suggestion (e.g. Literal["expand", "reduce"] | None)
            if get_origin(arg) is Literal and any(type(c) is type(value) for c in get_args(arg)):
                coerce(value, arg, path)
        raise ConfigError(f"{path}: expected {format_type(tp)}, got {_describe_value(value)}")
    if origin is tuple or tp is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {format_type(tp)}, got {_describe_value(value)}")
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} entries ({format_type(tp)}), "
                              f"got {len(value)}")
        return tuple(coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list or tp is list:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {format_type(tp)}, got {_describe_value(value)}")
        return [coerce(v, args[0], f"{path}[{i}]") if args else v for i, v in enumerate(value)]
    if origin is dict or tp is dict or origin is Mapping:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a table, got {_describe_value(value)}")
        args = get_args(tp)
        if not args:
            return dict(value)
        return {coerce(k, args[0], path): coerce(v, args[1], f"{path}.{k}")
                for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected bool, got {_describe_value(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not INT_MIN <= value <= INT_MAX:
                # would overflow inside torch (a size, a seed) far from the config
                raise ConfigError(f"{path}: an integer of {len(str(abs(value)))} digits is "
                                  f"out of range (it must fit in 64 bits)")
            return value
        raise ConfigError(f"{path}: expected int, got {_describe_value(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out = float(value)
            except OverflowError:  # an int beyond float range, e.g. 10**400
                raise ConfigError(f"{path}: an integer of {len(str(abs(value)))} digits is "
                                  f"too large for a float") from None
            if not math.isfinite(out):
                # NaN passes every bound check (nan < min is False) and inf freezes or
                # blows up training; no option means either
                raise ConfigError(f"{path}: must be a finite number, got {out!r}")
            return out
        raise ConfigError(f"{path}: expected float, got {_describe_value(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected str, got {_describe_value(value)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{path}: expected {format_type(tp)}, got {_describe_value(value)}")
    return value


def check_bounds(spec: OptionSpec, value: Any, path: str) -> None:
    """Raise :class:`ConfigError` at ``path`` if a number is outside ``spec``'s bounds
    (NaN is outside every bound: the comparisons are written so that it fails them)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{path}: must be a finite number, got {value!r}")
    if spec.min is not None:
        if spec.min_exclusive and not value > spec.min:
            raise ConfigError(f"{path}: must be > {spec.min:g}, got {value!r}")
        if not value >= spec.min:
            raise ConfigError(f"{path}: must be >= {spec.min:g}, got {value!r}")
    if spec.max is not None and not value <= spec.max:
        raise ConfigError(f"{path}: must be <= {spec.max:g}, got {value!r}")


def build_options(options_cls: type, raw: Mapping[str, Any] | None, path: str) -> Any:
    """Validate ``raw`` against ``options_cls`` and return an instance.

    Unknown keys are errors (with close matches), types are checked, numeric bounds
    enforced, and a ``ValueError`` from the dataclass' ``__post_init__`` is re-raised
    as a :class:`ConfigError` under ``path``.
    """
    raw = dict(raw or {})
    specs = {s.name: s for s in option_specs(options_cls)}
    unknown = [k for k in raw if k not in specs]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(specs), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(specs) or "none"
        raise ConfigError(f"{path}.{key}: unknown option{hint} (options: {known})")
    values = {}
    for name, spec in specs.items():
        if name not in raw:
            if spec.required:
                raise ConfigError(f"{path}.{name}: required option is missing")
            continue
        if spec.part and not isinstance(raw[name], (str, Mapping)):
            # a nested part already resolved by the config layer (a PartChoice)
            values[name] = raw[name]
            continue
        value = coerce(raw[name], spec.type, f"{path}.{name}")
        check_bounds(spec, value, f"{path}.{name}")
        values[name] = value
    try:
        return options_cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from err


def part_option(kind: str, default: Any, help: str = "") -> Any:
    """An option naming child parts of ``kind``: each a name or a table
    ``{name = "...", **its options}`` (the option may hold a tuple of them).

    A composite part's children are configured like any part: the config layer
    (``Registry.resolve_parts``, run by ``build_optimizer`` and ``curvkit.create``) checks
    each against the child's own ``Options`` and stores it as a complete table."""
    return dataclasses.field(default=default, metadata={"help": help, "part": kind})
