"""The pluggy registry: entry points, sources, duplicates, broken and disabled plugins."""

from __future__ import annotations

import textwrap
import warnings

import pytest

import curvkit
from curvkit.errors import RegistryError
from curvkit.registry import DISABLE_ENV, PluginWarning, Registry


def make_dist(root, dist: str, module: str, body: str, ep_name: str | None = None):
    """Write an installed-looking distribution (dist-info + module) under ``root``."""
    ep_name = ep_name or dist
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[curvkit]\n{ep_name} = {module}\n")


GOOD_PLUGIN = """
    from dataclasses import dataclass
    import curvkit
    from curvkit.preconditioners.base import Preconditioner

    class Halve(Preconditioner):
        '''Halves the direction: P = 2 I.'''
        name = "halve"

        @dataclass
        class Options:
            factor: float = curvkit.option(0.5, "scale applied to the direction", min=0.0)

        def apply(self, direction):
            return [d * self.options.factor for d in direction]

    @curvkit.hookimpl
    def curvkit_parts():
        return [Halve]
"""


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(DISABLE_ENV, raising=False)
    return tmp_path


def test_builtins_registered_through_the_hook():
    reg = Registry.load(entry_points=False)
    spec = reg.get("solver", "direct")
    assert spec.plugin == "curvkit"
    assert spec.source.startswith("curvkit ")
    assert {o.name for o in spec.options} >= {"momentum", "weight_decay"}
    assert spec.description.startswith("Preconditioned gradient step")
    assert "identity" in reg.names("preconditioner")


def test_external_plugin_discovered_with_source(plugin_dir):
    make_dist(plugin_dir, "halve-plugin", "halve_plugin_mod", GOOD_PLUGIN, "halve")
    reg = Registry.load()
    spec = reg.get("preconditioner", "halve")
    assert spec.source == "halve-plugin 1.2.3"
    assert spec.plugin == "halve"
    assert spec.options[0].name == "factor" and spec.options[0].default == 0.5
    part = reg.create("preconditioner", "halve", model=None, factor=0.25)
    assert part.options.factor == 0.25


def test_plugin_failing_on_import_is_named_and_skipped(plugin_dir):
    make_dist(plugin_dir, "broken-plugin", "broken_plugin_mod",
              "raise RuntimeError('boom at import')\n", "broken")
    make_dist(plugin_dir, "halve-plugin", "halve_plugin_mod", GOOD_PLUGIN, "halve")
    with pytest.warns(PluginWarning, match=r"'broken'.*boom at import"):
        reg = Registry.load()
    assert "broken" in reg.failed
    assert "halve" in reg.names("preconditioner")  # the rest still works
    assert "direct" in reg.names("solver")


def test_plugin_whose_hook_raises_is_skipped(plugin_dir):
    make_dist(plugin_dir, "raising-plugin", "raising_plugin_mod", """
        import curvkit
        @curvkit.hookimpl
        def curvkit_parts():
            raise ValueError("cannot list parts")
    """, "raising")
    with pytest.warns(PluginWarning, match=r"'raising'.*cannot list parts"):
        reg = Registry.load()
    assert "raising" in reg.failed


def test_duplicate_name_names_both_sources(plugin_dir):
    make_dist(plugin_dir, "dup-plugin", "dup_plugin_mod", """
        import curvkit
        from curvkit.preconditioners.base import Preconditioner
        class Identity2(Preconditioner):
            '''Another identity.'''
            name = "identity"
        @curvkit.hookimpl
        def curvkit_parts():
            return [Identity2]
    """, "dup")
    with pytest.warns(PluginWarning) as rec:
        reg = Registry.load()
    msg = " ".join(str(w.message) for w in rec)
    assert "registered twice" in msg and "'curvkit'" in msg and "dup-plugin 1.2.3" in msg
    # the first registration (the built-in) is kept, curvkit still works
    assert reg.get("preconditioner", "identity").plugin == "curvkit"
    assert "direct" in reg.names("solver")


def test_disable_env_skips_named_plugins(plugin_dir, monkeypatch):
    make_dist(plugin_dir, "broken-plugin", "broken_plugin_mod",
              "raise RuntimeError('boom')\n", "broken")
    make_dist(plugin_dir, "halve-plugin", "halve_plugin_mod", GOOD_PLUGIN, "halve")
    monkeypatch.setenv(DISABLE_ENV, "broken, halve")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        reg = Registry.load()
    assert "halve" not in reg.names("preconditioner")
    assert not reg.failed


def test_part_declaring_missing_capability_method_is_rejected(plugin_dir):
    make_dist(plugin_dir, "liar-plugin", "liar_plugin_mod", """
        import curvkit
        from curvkit.estimators.base import CurvatureEstimator
        class Liar(CurvatureEstimator):
            '''Claims a diagonal it does not have.'''
            name = "liar"
            provides = CurvatureEstimator.provides | {"diagonal"}
            def _matvec(self, X, y, v):
                return v
        @curvkit.hookimpl
        def curvkit_parts():
            return [Liar]
    """, "liar")
    with pytest.warns(PluginWarning, match=r"'liar'.*Liar skipped.*declares capability "
                                           r"'diagonal'"):
        reg = Registry.load()
    assert "liar" not in reg.names("estimator") and "ggn" in reg.names("estimator")


def test_components_lists_kinds():
    comps = curvkit.components()
    assert set(comps) == {"estimator", "preconditioner", "solver", "loss", "structure",
                          "dataset", "model", "executor"}
    assert "direct" in comps["solver"]


def test_create_unknown_name_suggests():
    with pytest.raises(curvkit.ConfigError, match="did you mean 'direct'"):
        curvkit.create("solver", "dirct")


def test_part_with_unreadable_options_is_named(plugin_dir):
    make_dist(plugin_dir, "badopts-plugin", "badopts_plugin_mod", """
        from __future__ import annotations
        from dataclasses import dataclass
        import curvkit
        from curvkit.preconditioners.base import Preconditioner

        def parts():
            from typing import Literal  # local: the annotation cannot be resolved

            class Local(Preconditioner):
                '''Options annotated with a name local to a function.'''
                name = "local"

                @dataclass
                class Options:
                    mode: Literal["a", "b"] = "a"

            return [Local]

        @curvkit.hookimpl
        def curvkit_parts():
            return parts()
    """, "badopts")
    with pytest.warns(PluginWarning, match=r"plugin 'badopts'.*preconditioner 'local'.*"
                                           r"Options.*NameError"):
        reg = Registry.load()
    assert "local" not in reg.names("preconditioner")


MALFORMED_PARTS = '''
    from dataclasses import dataclass
    import curvkit
    from curvkit.preconditioners.base import Preconditioner

    class NotDataclass(Preconditioner):
        """Options is a plain class."""
        name = "not_dataclass"

        class Options:
            factor = 0.5

    class BadDefault(Preconditioner):
        """Its default is outside its own bounds."""
        name = "bad_default"

        @dataclass
        class Options:
            factor: float = curvkit.option(-1.0, "scale", min=0.0)

    class Fine(Preconditioner):
        """A good part beside the bad ones."""
        name = "fine"

    @curvkit.hookimpl
    def curvkit_parts():
        return [NotDataclass, BadDefault, "junk", Fine]
'''


def test_malformed_parts_are_named_and_skipped_the_rest_loads(plugin_dir):
    make_dist(plugin_dir, "mixed-plugin", "mixed_plugin_mod", MALFORMED_PARTS, "mixed")
    with pytest.warns(PluginWarning) as rec:
        reg = Registry.load()
    msgs = [str(w.message) for w in rec]
    assert any("NotDataclass skipped" in m for m in msgs), msgs
    assert any("BadDefault skipped" in m and "factor: must be >= 0" in m for m in msgs), msgs
    assert any("'junk'" in m and "not a curvkit part class" in m for m in msgs), msgs
    names = reg.names("preconditioner")
    assert "fine" in names and "not_dataclass" not in names and "bad_default" not in names


def test_hook_returning_junk_is_skipped(plugin_dir):
    make_dist(plugin_dir, "junk-plugin", "junk_plugin_mod", """
        import curvkit
        @curvkit.hookimpl
        def curvkit_parts():
            return 42
    """, "junk")
    with pytest.warns(PluginWarning, match=r"'junk'.*not a list"):
        reg = Registry.load()
    assert "junk" in reg.failed and "direct" in reg.names("solver")


def test_cli_survives_a_malformed_plugin(plugin_dir):
    import os
    import subprocess
    import sys

    make_dist(plugin_dir, "mixed-plugin", "mixed_plugin_mod", MALFORMED_PARTS, "mixed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_dir), *sys.path])}
    out = subprocess.run([sys.executable, "-m", "curvkit", "components"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fine" in out.stdout and "BadDefault skipped" in out.stderr


def test_unknown_name_in_disable_env_is_warned(plugin_dir, monkeypatch):
    make_dist(plugin_dir, "halve-plugin", "halve_plugin_mod", GOOD_PLUGIN, "halve")
    monkeypatch.setenv(DISABLE_ENV, "halv")
    with pytest.warns(PluginWarning, match=r"'halv'.*not an installed curvkit plugin.*halve"):
        reg = Registry.load()
    assert "halve" in reg.names("preconditioner")


def test_builtin_part_errors_still_raise():
    from curvkit import registry as registry_mod
    from curvkit.parts import Part

    class Broken(Part):
        kind = "solver"
        name = ""

    class Plugin:
        @staticmethod
        @curvkit.hookimpl
        def curvkit_parts():
            return [Broken]

    reg = Registry()
    reg.add_plugin(Plugin(), registry_mod.BUILTIN_PLUGIN, "curvkit x")
    with pytest.raises(RegistryError, match="has no `name`"):
        reg._collect()
