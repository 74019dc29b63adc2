"""benchmarks/summary.py: the summary table of docs/benchmarks.md is read from the pages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _summary():
    spec = importlib.util.spec_from_file_location("bench_summary",
                                                  ROOT / "benchmarks" / "summary.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_summary"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


STEP = """# Benchmark: step

- date: 2030-01-01 00:00 UTC, commit abc1234
- load at the start: 0.1 / 0.1 / 0.1 (1/5/15 min) on 2 CPUs

| model | comparison | curvkit (ms) | reference (ms) | ratio | target |
|---|---|---:|---:|---:|---|
| MLP 784-1024-1024-10, N=128 | identity + direct vs SGD | 1 | 1 | 1.011× (1.001–1.030) | ≤ 1.02× |
| MLP 784-1024-1024-10 | identity + direct vs SGD (momentum 0.9) | 1 | 1 | 1.5× (1–2) | - |
| CNN 2×conv3(8)+linear | identity + direct vs SGD | 1 | 1 | **0.99×** (0.9–1.1) | ≤ 1.02× |
"""


def test_figures_come_from_the_pages_and_the_rest_of_the_page_is_kept(tmp_path):
    summary = _summary()
    pages = tmp_path / "benchmarks"
    pages.mkdir()
    (pages / "step.md").write_text(STEP)
    target = tmp_path / "benchmarks.md"
    target.write_text(f"# Benchmarks\n\nintro\n\n{summary.START}\nold\n{summary.END}\n\n"
                      "## Where targets are missed\n\nprose\n")
    missing = summary.write(pages, target)
    text = target.read_text()
    assert "intro" in text and "prose" in text and "\nold\n" not in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| identity + `direct`"))
    # the plain comparison, not its momentum variant; markdown emphasis dropped
    assert "MLP 1.011× (1.001–1.030); CNN 0.99× (0.9–1.1)" in row
    assert "[step](benchmarks/step.md)" in row
    assert "2030-01-01 00:00 UTC, commit abc1234" in text
    # a figure no page has is reported, not invented
    assert any(m.startswith("memory:") for m in missing)
    assert "— (not on the page)" in text


def test_the_docs_summary_matches_its_pages():
    """docs/benchmarks.md is what summary.py makes of docs/benchmarks/ (no hand edits)."""
    summary = _summary()
    block, _ = summary.build(ROOT / "docs" / "benchmarks", "benchmarks/")
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert block in text
