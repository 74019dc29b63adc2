"""``curvkit report``: numbers of the summary table, figures, partial results files."""

from __future__ import annotations

import statistics
import textwrap
from pathlib import Path

import pytest
import torch

import curvkit
from curvkit.cli import main
from curvkit.experiments.figures import normalized
from curvkit.experiments.report import build_report, markdown_table
from curvkit.experiments.store import RESULTS, ResultsWriter

CONFIG = textwrap.dedent("""
    title = "tiny report"
    [task]
    dataset = { name = "teacher", n_train = 32, n_val = 8, n_test = 16, in_dim = 3, out_dim = 2 }
    model = { name = "mlp", width = 4, depth = 1 }
    batch_size = 16
    [train]
    steps = 6
    seeds = [0, 1]
    eval_every = 2
    dtype = "float64"
    target_loss = 0.5
    [optimizer]
    lr = 0.1
    [ablate]
    "optimizer.lr" = [0.05, 0.1]
    """)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CURVKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def synthetic(directory: Path) -> None:
    """Two configurations; 'a' with two finished seeds, 'b' one diverged and one partial."""
    directory.mkdir(parents=True, exist_ok=True)
    with ResultsWriter(directory / RESULTS) as w:
        for rid, cid, label, seed, idx in [("a0", "A", "a", 0, 0), ("a1", "A", "a", 1, 0),
                                           ("b0", "B", "b", 0, 1), ("b1", "B", "b", 1, 1)]:
            w.append({"type": "start", "run": rid, "attempt": 1, "config_id": cid,
                      "label": label, "seed": seed, "index": idx,
                      "config": {"train": {"target_loss": 0.5}}})
        finals = {"a0": (0.4, 0.6), "a1": (0.2, 0.8)}
        for rid, (train, test) in finals.items():
            w.append({"type": "steps", "run": rid, "attempt": 1, "step": [0, 1, 2, 3],
                      "loss": [1.0, 0.8, 0.6, 0.4], "time": [0.5, 1.0, 1.5, 2.0],
                      "time_curvature": [0.25, 0.25, 0.25, 0.25], "accepted": [1, 1, 0, 1],
                      "nonfinite": 0, "rejected": 1, "info": {}})
            w.append({"type": "eval", "run": rid, "attempt": 1, "step": 0, "time": 0.0,
                      "train_loss": 1.0, "test_loss": 1.1})
            w.append({"type": "eval", "run": rid, "attempt": 1, "step": 2,
                      "time": 1.0 if rid == "a0" else 1.5, "train_loss": 0.5,
                      "test_loss": 0.9})
            w.append({"type": "eval", "run": rid, "attempt": 1, "step": 4, "time": 2.0,
                      "train_loss": train, "test_loss": test})
            w.append({"type": "end", "run": rid, "attempt": 1, "status": "finished",
                      "steps": 4, "time": 2.0})
        w.append({"type": "eval", "run": "b0", "attempt": 1, "step": 0, "time": 0.0,
                  "train_loss": 1.0, "test_loss": 1.0})
        w.append({"type": "end", "run": "b0", "attempt": 1, "status": "diverged",
                  "reason": "non-finite training loss at step 1"})
        w.append({"type": "eval", "run": "b1", "attempt": 1, "step": 0, "time": 0.0,
                  "train_loss": 3.0, "test_loss": 3.5})


def table_rows(report: str) -> dict[str, list[str]]:
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("| configuration"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_summary_numbers(tmp_path):
    synthetic(tmp_path)
    text = build_report(tmp_path, log=lambda m: None).read_text()
    rows = table_rows(text)
    a, b = rows["a"], rows["b"]
    sd = statistics.stdev([0.4, 0.2])
    assert a[1] == "2"
    # one format per cell, chosen from the mean (4 significant digits, 3 for times)
    assert a[2] == "0.3000 ± 0.1414" and f"{sd:.4f}" == "0.1414"  # final train loss
    assert a[3] == "0.7000 ± 0.1414"                # final test loss
    assert a[4] == "1.25 ± 0.35 (2/2)"              # time to 0.5
    assert a[5] == "2.00 ± 0.00"                    # steps/s: 4 steps in 2 s
    assert a[6] == "50%"                            # curvature share
    assert a[7] == "2 (25.0% of steps)"             # rejected: total over the seeds' steps
    header = next(line for line in text.splitlines() if line.startswith("| configuration"))
    # columns that are 0 on every row are left out, and the text says so
    assert "non-finite" not in header and "failed" not in header and "diverged" in header
    assert "No run skipped a non-finite update or failed (those columns are left out)" in text
    assert a[-1] == "0"
    assert b[1] == "2 (1 incomplete)"
    assert b[2] == "3.000"  # only the partial run counts; the diverged one is excluded
    assert b[4] == "not reached (0/2)"
    assert b[-1] == "1"
    assert "**Partial results**: 1 run(s)" in text
    assert "diverged: **b** seed 0: non-finite training loss at step 1" in text
    assert (tmp_path / "figures" / "loss_vs_step.png").stat().st_size > 1000
    assert "![Loss vs training time](figures/loss_vs_time.png)" in text


def test_report_on_partial_results_file(tmp_path, capsys):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG)
    out = tmp_path / "out"
    assert main(["ablate", str(cfg), "--out", str(out), "--no-progress", "--threads", "0"]) == 0
    raw = (out / RESULTS).read_bytes()
    (out / RESULTS).write_bytes(raw[: int(len(raw) * 0.6)])  # cut mid-line, mid-grid
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.md'}" in printed
    text = (out / "report.md").read_text()
    assert text.startswith("# tiny report")
    assert "**Partial results**" in text
    assert "time to train loss ≤ 0.5 (s)" in text
    assert "lr=0.05" in text
    assert (out / "figures" / "loss_vs_step.png").exists()
    assert (out / "figures" / "loss_vs_time.png").exists()


def test_report_missing_results(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no results.jsonl" in capsys.readouterr().err


def test_partition_heatmaps_and_group_rates(tmp_path):
    needed = {("estimator", "hessian"), ("preconditioner", "partition"), ("solver", "cubic")}
    if not needed <= set(curvkit.get_registry().parts):
        pytest.skip("hessian + partition + cubic are not all registered")
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(CONFIG.replace('[optimizer]\nlr = 0.1\n', '[optimizer]\nlr = 1.0\n'
                                  'estimator = "hessian"\npreconditioner = "partition"\n'
                                  'solver = "cubic"\n').replace(
        '[ablate]\n"optimizer.lr" = [0.05, 0.1]\n', ""))
    out = tmp_path / "out"
    assert main(["ablate", str(cfg), "--out", str(out), "--no-progress", "--threads", "0"]) == 0
    text = build_report(out, log=lambda m: None).read_text()
    assert "## Partition summaries" in text
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert any(n.startswith("heatmap_") for n in figs), figs
    assert any(n.startswith("group_lr_") for n in figs), figs


def test_number_formats():
    from curvkit.experiments.report import _mean_std

    assert _mean_std([2000.0, 2115.0]) == "2058 ± 81"   # not "2e+03 ± 81.4"
    assert _mean_std([1e-7, 2e-7]) == "1.50e-07 ± 7.07e-08"
    assert _mean_std([0.0, 0.0]) == "0 ± 0" and _mean_std([None, float("nan")]) == "—"
    assert _mean_std([0.5]) == "0.5000"


def test_readable_layer_names_and_distinct_line_styles():
    from curvkit.experiments.figures import line_style, readable_names

    assert readable_names(["net.0.weight", "net.0.bias", "net.2.weight", "fc.bias"]) == \
        ["layer 1 W", "layer 1 b", "layer 2 W", "fc b"]
    assert readable_names(["weights", "biases"]) == ["weights", "biases"]
    styles = [line_style(i, 8) for i in range(8)]
    keys = {(str(s["color"]), s["linestyle"], s["marker"]) for s in styles}
    assert len(keys) == 8 and len({s["marker"] for s in styles}) == 8


def test_helpers():
    import numpy as np

    M = np.array([[4.0, 2.0], [2.0, 9.0]])
    np.testing.assert_allclose(normalized(M), [[1.0, 1 / 3], [1 / 3, 1.0]])
    table = markdown_table(["a", "b"], [["x|y", "1"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | 1 |"]


def test_loss_against_work(tmp_path):
    """The per-step ``work`` numbers are summed into the x axis of the loss-vs-work figure;
    configurations that log no work are left out of it and named."""
    from curvkit.experiments.figures import cumulative_work
    from curvkit.experiments.store import load_runs

    tmp_path.mkdir(exist_ok=True)
    with ResultsWriter(tmp_path / RESULTS) as w:
        for rid, cid, label, work in [("w0", "W", "with work", [2, 10, None, 4]),
                                      ("n0", "N", "no work", None)]:
            w.append({"type": "start", "run": rid, "attempt": 1, "config_id": cid,
                      "label": label, "seed": 0, "index": 0 if cid == "W" else 1})
            w.append({"type": "steps", "run": rid, "attempt": 1, "step": [0, 1, 2, 3],
                      "loss": [1.0, 0.8, 0.6, 0.4], "time": [0.5, 1.0, 1.5, 2.0],
                      "time_curvature": [0, 0, 0, 0], "accepted": [1, 1, 1, 1],
                      "nonfinite": 0, "rejected": 0,
                      "info": {"work": work} if work else {}})
            for step, loss in [(0, 1.0), (2, 0.5), (4, 0.25)]:
                w.append({"type": "eval", "run": rid, "attempt": 1, "step": step,
                          "time": float(step), "train_loss": loss, "test_loss": loss})
            w.append({"type": "end", "run": rid, "attempt": 1, "status": "finished",
                      "steps": 4, "time": 2.0})
    runs = load_runs(tmp_path)
    assert cumulative_work(runs["w0"]) == {0: 0.0, 1: 2.0, 2: 12.0, 3: 12.0, 4: 16.0}
    assert cumulative_work(runs["n0"]) is None
    text = build_report(tmp_path, log=lambda m: None).read_text()
    assert "![Loss vs work](figures/loss_vs_work.png)" in text
    assert "Not shown (no work logged): no work." in text
    assert (tmp_path / "figures" / "loss_vs_work.png").stat().st_size > 1000


def test_torch_baselines_log_work_per_closure_call():
    import torch
    from torch import nn

    from curvkit.experiments.runner import torch_step

    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    batch = (torch.randn(8, 3), torch.randn(8, 2))
    for opt, calls in [(torch.optim.Adam(model.parameters(), lr=1e-3), 1),
                       (torch.optim.LBFGS(model.parameters(), max_iter=3), None)]:
        counts: dict[str, int] = {}
        torch_step(opt, model, nn.MSELoss(), batch, counts)
        if calls is not None:
            assert counts == {"closure": calls}
        else:  # LBFGS evaluates the closure once per inner iteration (and once more)
            assert counts["closure"] > 1


def test_state_memory_is_recorded_and_reported(tmp_path):
    """The end record carries the optimizer's state size; K-FAC's bfloat16 state is half its
    float32 state (factors and inverses, both counted), Adam's state is its two moments."""
    from curvkit.experiments.runner import state_bytes

    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    X, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    loss_fn = torch.nn.CrossEntropyLoss()
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        opt = curvkit.build_optimizer(model, loss_fn, {
            "lr": 0.1, "estimator": "fisher",
            "preconditioner": {"name": "kronecker", "state_dtype": dtype},
            "solver": "direct"})
        opt.step((X, y))
        sizes[dtype] = state_bytes(opt)
    assert sizes["float32"]["preconditioner_bytes"] > 0
    assert sizes["bfloat16"]["preconditioner_bytes"] * 2 == sizes["float32"]["preconditioner_bytes"]
    adam = torch.optim.Adam(model.parameters())
    loss_fn(model(X), y).backward()
    adam.step()
    moments = 2 * sum(p.numel() * 4 for p in model.parameters())
    assert moments <= state_bytes(adam)["state_bytes"] <= moments + 64
    assert "preconditioner_bytes" not in state_bytes(adam)

    (tmp_path / "grid.toml").write_text(CONFIG.replace('"optimizer.lr" = [0.05, 0.1]',
                                                       '"optimizer.lr" = [0.1]'))
    assert main(["ablate", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "r")]) == 0
    report = build_report(tmp_path / "r", log=lambda _: None).read_text()
    assert "optimizer state" in report
    (row,) = table_rows(report).values()
    assert "B" in row[-1]


def test_work_to_target_column(tmp_path):
    """Runs that log `work` get the passes spent until the first evaluation at or below the
    target; without logged work the column is left out."""
    synthetic(tmp_path / "plain")
    header_plain = summary_header(tmp_path / "plain")
    assert not any(h.startswith("work to") for h in header_plain)
    out = tmp_path / "work"
    synthetic(out)
    text = (out / RESULTS).read_text().replace('"info":{}', '"info":{"work":[2,3,2,3]}')
    (out / RESULTS).write_text(text)
    report = build_report(out, log=lambda _: None).read_text()
    header = _header(report)
    j = header.index("work to train loss ≤ 0.5 (passes)")
    # both seeds of 'a' reach 0.5 at the evaluation of step 2: 2 + 3 passes
    assert table_rows(report)["a"][j].startswith("5") and "(2/2)" in table_rows(report)["a"][j]
    assert table_rows(report)["b"][j] == "—"


def summary_header(directory: Path) -> list[str]:
    return _header(build_report(directory, log=lambda _: None).read_text())


def _header(report: str) -> list[str]:
    line = next(ln for ln in report.splitlines() if ln.startswith("| configuration"))
    return [c.strip() for c in line.strip("|").split("|")]
