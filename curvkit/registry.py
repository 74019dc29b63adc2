"""The registry of parts, built on pluggy.

Plugins are the built-in module :mod:`curvkit.builtins` and every entry point of the
group ``curvkit``. ``CURVKIT_DISABLE_PLUGINS=a,b`` skips the named entry points. A plugin
that fails to import (or whose hook raises or returns junk) is reported by name as a
warning and skipped; so is a malformed part of a plugin (not a part class, Options that are
not a dataclass or do not resolve, an option default outside its own bounds, a name
already registered in its kind: the first registration is kept). An unknown name in
``CURVKIT_DISABLE_PLUGINS`` is warned about. Only the built-in parts raise.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from curvkit import hookspecs
from curvkit.errors import ConfigError, RegistryError
from curvkit.options import OptionSpec, build_options, check_bounds, coerce, option_specs
from curvkit.parts import KINDS, Part

ENTRY_POINT_GROUP = "curvkit"
DISABLE_ENV = "CURVKIT_DISABLE_PLUGINS"
BUILTIN_PLUGIN = "curvkit"


class PluginWarning(UserWarning):
    """A plugin could not be loaded and was skipped."""


@dataclass(frozen=True)
class PartSpec:
    """A registered part, as data."""

    kind: str
    name: str
    cls: type
    description: str
    options: tuple[OptionSpec, ...]
    provides: frozenset[str]
    needs: frozenset[str]
    plugin: str
    source: str  # "distribution version" the part came from

    @property
    def context(self) -> tuple[str, ...]:
        """Constructor arguments that are not options (e.g. ``model``, ``loss_fn``)."""
        sig = inspect.signature(self.cls.__init__)
        return tuple(n for n, p in sig.parameters.items()
                     if n not in ("self", "options") and p.kind in
                     (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "name": self.name, "description": self.description,
            "options": [o.describe() for o in self.options],
            "provides": sorted(self.provides), "needs": sorted(self.needs),
            "plugin": self.plugin, "source": self.source,
        }


def _describe(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def _check_part(cls: Any, plugin: str) -> None:
    where = f"plugin {plugin!r}"
    if not (isinstance(cls, type) and issubclass(cls, Part)):
        raise RegistryError(f"{where} registered {cls!r}, which is not a curvkit part class")
    if cls.kind not in KINDS:
        raise RegistryError(f"{where}: part {cls.__qualname__} has kind {cls.kind!r}; "
                            f"expected one of {', '.join(KINDS)}")
    if not cls.name or not isinstance(cls.name, str):
        raise RegistryError(f"{where}: part {cls.__qualname__} has no `name`")
    for cap in cls.provides:
        if cap in ("matvec", "dense", "diagonal", "kronecker", "kronecker_roots", "summary",
                   "group_summary") and \
                not callable(getattr(cls, cap, None)):
            raise RegistryError(f"{where}: {cls.kind} {cls.name!r} declares capability {cap!r} "
                                f"but has no method `{cap}`")
    try:
        specs = option_specs(cls.Options)
    except Exception as err:  # unresolvable annotations, Options not a dataclass, ...
        raise RegistryError(f"{where}: the options of {cls.kind} {cls.name!r} cannot be read "
                            f"from {cls.__qualname__}.Options ({type(err).__name__}: {err}); "
                            f"it must be a dataclass whose annotations resolve at module "
                            f"level") from err
    for spec in specs:
        if spec.required:
            continue
        try:  # the default is what a config that leaves the option out gets: same checks
            check_bounds(spec, coerce(spec.default, spec.type, spec.name), spec.name)
        except ConfigError as err:
            raise RegistryError(f"{where}: {cls.kind} {cls.name!r}: the default of option "
                                f"{err}") from err


class Registry:
    """All parts known to this process, keyed by ``(kind, name)``."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.parts: dict[tuple[str, str], PartSpec] = {}
        self.sources: dict[str, str] = {}
        self.failed: dict[str, str] = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, entry_points: bool = True) -> Registry:
        reg = cls()
        from curvkit import __version__, builtins

        reg.add_plugin(builtins, BUILTIN_PLUGIN, f"curvkit {__version__}")
        if entry_points:
            reg._load_entry_points()
        reg._collect()
        return reg

    def add_plugin(self, plugin: Any, name: str, source: str) -> None:
        self.pm.register(plugin, name=name)
        self.sources[name] = source

    def _load_entry_points(self) -> None:
        disabled = {s.strip() for s in os.environ.get(DISABLE_ENV, "").split(",") if s.strip()}
        seen = set()
        eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
        unknown = sorted(disabled - {ep.name for ep in eps})
        if unknown:  # a typo here would silently leave the plugin on
            known = ", ".join(sorted({ep.name for ep in eps})) or "none installed"
            warnings.warn(f"{DISABLE_ENV} names {', '.join(map(repr, unknown))}, which "
                          f"{'is' if len(unknown) == 1 else 'are'} not an installed curvkit "
                          f"plugin (plugins: {known})", PluginWarning, stacklevel=3)
        for ep in eps:
            if ep.name in disabled or ep.name in seen:
                continue
            seen.add(ep.name)
            dist = getattr(ep, "dist", None)
            source = f"{dist.name} {dist.version}" if dist is not None else ep.value
            try:
                plugin = ep.load()
            except Exception as err:  # a broken plugin must not take curvkit down
                self._fail(ep.name, source, f"import of {ep.value!r} failed: "
                                            f"{type(err).__name__}: {err}")
                continue
            try:
                self.add_plugin(plugin, ep.name, source)
            except Exception as err:
                self._fail(ep.name, source, f"{type(err).__name__}: {err}")

    def _fail(self, name: str, source: str, why: str) -> None:
        self.failed[name] = why
        warnings.warn(f"curvkit plugin {name!r} ({source}) skipped: {why}", PluginWarning,
                      stacklevel=3)

    def _collect(self) -> None:
        # Each plugin's hook is called on its own, so every part is attributed to the
        # plugin (and distribution) it came from, and one failing plugin is skipped alone.
        # A malformed part of a plugin is named and skipped (the rest of that plugin and of
        # curvkit stay usable); a malformed built-in part is curvkit's own bug and raises.
        # Built-ins first: on a name clash the built-in part is the one kept.
        impls = sorted(self.pm.hook.curvkit_parts.get_hookimpls(),
                       key=lambda i: i.plugin_name != BUILTIN_PLUGIN)
        for impl in impls:
            name = impl.plugin_name
            source = self.sources.get(name, "?")
            try:
                returned = impl.function()
                classes = [] if returned is None else list(returned)
            except Exception as err:
                if name == BUILTIN_PLUGIN:
                    raise
                self._fail(name, source, f"hook curvkit_parts raised or returned something "
                                         f"that is not a list ({type(err).__name__}: {err})")
                continue
            for cls in classes:
                try:
                    _check_part(cls, name)
                    self._add(cls, name)
                except RegistryError as err:
                    if name == BUILTIN_PLUGIN:
                        raise
                    self._skip_part(name, source, cls, str(err))

    def _skip_part(self, plugin: str, source: str, cls: Any, why: str) -> None:
        label = getattr(cls, "__qualname__", repr(cls))
        self.failed[f"{plugin}:{label}"] = why
        warnings.warn(f"curvkit plugin {plugin!r} ({source}): part {label} skipped: {why}",
                      PluginWarning, stacklevel=4)

    def _add(self, cls: type, plugin: str) -> None:
        key = (cls.kind, cls.name)
        source = self.sources.get(plugin, plugin)
        if key in self.parts:
            other = self.parts[key]
            raise RegistryError(
                f"{cls.kind} {cls.name!r} is registered twice: by plugin {other.plugin!r} "
                f"({other.source}, {other.cls.__module__}.{other.cls.__qualname__}) and by "
                f"plugin {plugin!r} ({source}, {cls.__module__}.{cls.__qualname__}); the "
                f"first is kept; disable one with {DISABLE_ENV}=<plugin>")
        self.parts[key] = PartSpec(
            kind=cls.kind, name=cls.name, cls=cls, description=_describe(cls),
            options=option_specs(cls.Options), provides=frozenset(cls.provides),
            needs=frozenset(cls.needs), plugin=plugin, source=source)

    # ------------------------------------------------------------------ queries
    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self.parts if k == kind)

    def components(self) -> dict[str, list[str]]:
        return {kind: self.names(kind) for kind in KINDS}

    def get(self, kind: str, name: str, path: str | None = None) -> PartSpec:
        if kind not in KINDS:
            raise RegistryError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}")
        try:
            return self.parts[(kind, name)]
        except KeyError:
            pass
        known = self.names(kind)
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        where = f"{path}: " if path else ""
        from curvkit.errors import ConfigError

        raise ConfigError(f"{where}unknown {kind} {name!r}{hint} "
                          f"(registered: {', '.join(known) or 'none'})")

    def providers(self, capability: str, kinds: tuple[str, ...] = ("estimator",)) -> list[str]:
        """Names of registered parts of ``kinds`` that provide ``capability``."""
        return sorted(s.name for s in self.parts.values()
                      if s.kind in kinds and capability in s.provides)

    def create(self, kind: str, name: str, *, path: str | None = None, **kwargs: Any) -> Part:
        from curvkit.config import resolve_nested  # config imports the registry

        spec = self.get(kind, name, path)
        context_names = spec.context
        context = {k: v for k, v in kwargs.items() if k in context_names}
        raw = {k: v for k, v in kwargs.items() if k not in context_names}
        where = path or f"{kind}.{name}"
        raw = resolve_nested(spec.cls.Options, raw, where, self)
        opts = self.resolve_parts(build_options(spec.cls.Options, raw, where), where)
        part = spec.cls(options=opts, **context)
        part.config_path = where
        return part


    # ------------------------------------------------------------------ nested parts
    def part_options(self, kind: str, value: Any, path: str) -> tuple[PartSpec, Any]:
        """A child part given as ``"name"`` or ``{name = "...", **options}`` → its registry
        entry and validated ``Options`` (errors name ``path``)."""
        from curvkit.errors import ConfigError

        if isinstance(value, str):
            name, raw, name_path = value, {}, path
        elif isinstance(value, Mapping):
            raw = dict(value)
            name = raw.pop("name", None)
            if not isinstance(name, str):
                raise ConfigError(f"{path}.name: missing or not a string; a {kind} table "
                                  f"needs name = one of {', '.join(self.names(kind))}")
            name_path = f"{path}.name"
        else:
            raise ConfigError(f"{path}: expected a {kind} name or table, got {value!r}")
        spec = self.get(kind, name, path=name_path)
        return spec, build_options(spec.cls.Options, raw, path)

    def resolve_parts(self, options: Any, path: str) -> Any:
        """``options`` with every :func:`~curvkit.options.part_option` field checked and
        completed: each child becomes ``{"name": ..., **all its options}``."""
        if not dataclasses.is_dataclass(options):
            return options
        changes = {}
        for f in dataclasses.fields(options):
            kind = f.metadata.get("part")
            if kind is None:
                continue
            value = getattr(options, f.name)
            where = f"{path}.{f.name}"

            def table(v: Any, p: str, kind: str = kind) -> dict[str, Any]:
                spec, opts = self.part_options(kind, v, p)
                return {"name": spec.name, **dataclasses.asdict(opts)}

            if isinstance(value, (tuple, list)):
                changes[f.name] = type(value)(table(v, f"{where}[{i}]")
                                              for i, v in enumerate(value))
            else:
                changes[f.name] = table(value, where)
        return dataclasses.replace(options, **changes) if changes else options


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry.load()
    return _REGISTRY


def reload_registry() -> Registry:
    """Rebuild the registry (after installing a plugin or changing the environment)."""
    global _REGISTRY
    _REGISTRY = Registry.load()
    return _REGISTRY
