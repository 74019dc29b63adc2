"""Bad input is refused before any training, with the dotted path of the problem."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from torch import nn

import curvkit
from curvkit.config import parse_optimizer
from curvkit.errors import ConfigError, IncompatibleError
from curvkit.options import build_options, option


@pytest.fixture
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def build(model, config):
    return curvkit.build_optimizer(model, nn.CrossEntropyLoss(), config)


def test_misspelled_part_suggests(model):
    with pytest.raises(ConfigError) as err:
        build(model, {"solver": "direkt"})
    assert str(err.value).startswith("optimizer.solver: unknown solver 'direkt'")
    assert "did you mean 'direct'" in str(err.value)


def test_misspelled_part_in_table_points_at_name(model):
    with pytest.raises(ConfigError, match=r"^optimizer\.preconditioner\.name: unknown "
                                          r"preconditioner 'identiy'.*'identity'"):
        build(model, {"preconditioner": {"name": "identiy"}})


def test_wrong_option_type(model):
    with pytest.raises(ConfigError) as err:
        build(model, {"solver": {"name": "direct", "momentum": "abc"}})
    assert str(err.value) == "optimizer.solver.momentum: expected float, got 'abc'"


def test_bool_is_not_a_number(model):
    with pytest.raises(ConfigError, match=r"optimizer\.lr: expected float, got True"):
        build(model, {"lr": True})


def test_unknown_option_is_an_error_with_suggestion(model):
    with pytest.raises(ConfigError) as err:
        build(model, {"solver": {"name": "direct", "momentun": 0.9}})
    msg = str(err.value)
    assert msg.startswith("optimizer.solver.momentun: unknown option")
    assert "did you mean 'momentum'" in msg


def test_unknown_top_level_key(model):
    with pytest.raises(ConfigError, match=r"^optimizer\.solvr: unknown option.*'solver'"):
        build(model, {"solvr": "direct"})


def test_bounds_and_cross_field_checks(model):
    with pytest.raises(ConfigError, match=r"optimizer\.solver\.momentum: must be >= 0"):
        build(model, {"solver": {"name": "direct", "momentum": -0.1}})
    with pytest.raises(ConfigError, match=r"optimizer\.solver: nesterov"):
        build(model, {"solver": {"name": "direct", "nesterov": True}})


def test_missing_name_in_part_table(model):
    with pytest.raises(ConfigError, match=r"optimizer\.solver\.name: missing"):
        build(model, {"solver": {"momentum": 0.9}})


def test_toml_file(tmp_path, model):
    path = tmp_path / "opt.toml"
    path.write_text(textwrap.dedent("""
        [optimizer]
        lr = 0.5
        solver = { name = "direct", momentum = 0.5 }
    """))
    opt = build(model, str(path))
    assert opt.param_groups[0]["lr"] == 0.5
    assert opt.solver.options.momentum == 0.5

    path.write_text("[optimizer]\nlr = 'fast'\n")
    with pytest.raises(ConfigError, match=r"optimizer\.lr: expected float, got 'fast'"):
        build(model, str(path))
    with pytest.raises(ConfigError, match="not found"):
        build(model, str(tmp_path / "missing.toml"))


def _registered(kind, name):
    return name in curvkit.components()[kind]


@pytest.mark.skipif(not (_registered("estimator", "hessian")
                         and _registered("preconditioner", "kronecker")),
                    reason="needs the hessian estimator and kronecker preconditioner")
def test_incompatible_combination_names_part_capability_and_providers(model):
    with pytest.raises(IncompatibleError) as err:
        build(model, {"estimator": "hessian", "preconditioner": "kronecker"})
    msg = str(err.value)
    assert msg.startswith("optimizer.preconditioner: preconditioner 'kronecker' needs "
                          "capability 'kronecker'")
    assert "estimator 'hessian' does not provide" in msg
    for provider in curvkit.get_registry().providers("kronecker"):
        assert provider in msg


def test_incompatibility_is_found_without_a_model():
    # validation alone (no model, no data): what `curvkit ablate` does before any run
    if not _registered("solver", "cubic"):
        pytest.skip("needs the cubic solver")
    with pytest.raises(IncompatibleError, match="optimizer.solver: solver 'cubic' needs"):
        parse_optimizer({"estimator": "ggn", "preconditioner": "identity", "solver": "cubic"})


def test_error_while_building_a_part_names_its_config_path(model):
    from curvkit.errors import ConfigError
    from curvkit.solvers.base import Solver

    class Picky(Solver):
        name = "picky"

        def __init__(self, options=None):
            super().__init__(options)
            raise ValueError("this model has no layer named 'head'")

        def step(self, ctx):
            return None

    from curvkit.config import PartChoice
    from curvkit.optimizer import _construct
    from curvkit.registry import PartSpec

    spec = PartSpec("solver", "picky", Picky, "", (), frozenset(), frozenset(), "test", "test")
    with pytest.raises(ConfigError, match=r"^optimizer\.solver: this model has no layer"):
        _construct(PartChoice(spec, Picky.Options(), "optimizer.solver"))


@dataclass
class OptionalChoice:
    flavour: Literal["expand", "reduce"] | None = option(None, "")


def test_optional_choice_keeps_its_suggestion():
    Opts = OptionalChoice
    assert build_options(Opts, {"flavour": None}, "x").flavour is None
    assert build_options(Opts, {"flavour": "reduce"}, "x").flavour == "reduce"
    with pytest.raises(ConfigError, match=r"^x\.flavour: expected one of .*did you mean "
                                          r"'reduce'"):
        build_options(Opts, {"flavour": "reduced"}, "x")
    with pytest.raises(ConfigError, match=r"^x\.flavour: expected 'expand' \| 'reduce' \| "
                                          r"None, got 3"):
        build_options(Opts, {"flavour": 3}, "x")
