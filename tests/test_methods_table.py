"""Every TOML snippet of docs/methods.md builds with curvkit.build_optimizer and takes two
steps on a tiny model (the snippets are read from the page itself, so docs cannot drift)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import tomllib
import torch
from torch import nn

import curvkit
from curvkit.testing.problems import make_data, mlp

PAGE = Path(__file__).resolve().parents[1] / "docs" / "methods.md"
SNIPPET = re.compile(r"```toml\n(.*?)```", re.S)


def snippets() -> list[tuple[str, dict]]:
    out = []
    for text in SNIPPET.findall(PAGE.read_text(encoding="utf-8")):
        match = re.search(r"^# method: (.+)$", text, re.M)
        assert match, f"snippet without a '# method:' line:\n{text}"
        out.append((match.group(1).strip(), tomllib.loads(text)))
    return out


SNIPPETS = snippets()

# one snippet per row of the table (Newton has two: trust region and direct on dense blocks)
ROWS = ("Newton", "Hessian-free", "K-FAC", "SINGD", "diagonal Fisher", "NewtonSummary",
        "GNvpro")


def test_every_row_of_the_table_has_a_snippet():
    names = [name for name, _ in SNIPPETS]
    for row in ROWS:
        assert any(n.startswith(row) for n in names), f"no snippet for {row!r}"


def part_name(value) -> str:
    return value if isinstance(value, str) else value["name"]


@pytest.mark.parametrize("name,config", SNIPPETS, ids=[n for n, _ in SNIPPETS])
def test_snippet_builds_and_steps(name, config):
    table = config["optimizer"]
    registered = curvkit.components()
    for kind in ("estimator", "preconditioner", "solver"):
        if kind in table and part_name(table[kind]) not in registered[kind]:
            pytest.skip(f"{kind} {part_name(table[kind])!r} is not registered")
    model = mlp(4, (5,), 3, seed=0)
    X, y = make_data("mlp", "ce", 16, 3, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = curvkit.build_optimizer(model, nn.CrossEntropyLoss(), config)
    losses = [float(opt.step((X, y))) for _ in range(2)]
    assert all(math.isfinite(v) for v in losses)
    assert opt.counters["nonfinite"] == 0, opt.last_info
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters())), \
        f"{name}: two steps left the parameters unchanged ({opt.last_info})"
