"""``curvkit report DIR``: a markdown summary table and PNG figures from ``results.jsonl``.

Works on any results directory, finished or not: incomplete runs are shown with what they
have written so far and marked. Figures are drawn with matplotlib's Agg canvas (no
display, no global backend switch) into ``DIR/figures/``; the report is ``DIR/report.md``.

Contents:

* a table per configuration: final train / test loss (mean ± sample std over seeds, at
  the last evaluation, on the whole split), test accuracy, time to the target train loss,
  steps per second, share of time spent in curvature, rejected steps, non-finite events,
  diverged / failed runs;
* loss against step and against training time (evaluation excluded), the mean over seeds
  with a min–max band; and against work (network passes, the per-step ``work`` number
  every composition logs through :mod:`curvkit.work`, and torch.optim baselines 2 per
  closure call);
* for runs whose optimizer reports square matrices (the ``partition`` preconditioner's H̄):
  heatmaps of H̄ and H̄⁻¹ early and late in training (as in Wolinski's Figures 1–2) and the
  per-group learning rates η over training;
* the grid points that were skipped (incompatible or unavailable parts) with the reason.

Why one module of about 800 lines: the table (with its work, memory and provenance
columns), the figures and the tuning section share the record grouping, the label and
number formats and the figure style; split across modules they would pass those around or
repeat them. The next thing to move out is the figures (one function per figure, ~300
lines), behind a small interface of groups and paths.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from curvkit._optional import require
from curvkit.experiments.store import RESULTS, Run, load_runs, write_text_atomic

REPORT = "report.md"
FIGURES = "figures"


@dataclass
class Group:
    """All runs (seeds) of one configuration."""

    config_id: str
    label: str
    index: int
    runs: list[Run] = field(default_factory=list)

    @property
    def ok_runs(self) -> list[Run]:
        """Runs whose numbers count in means: finished, or incomplete (partial)."""
        return [r for r in self.runs if r.status in ("finished", "incomplete") and r.evals]

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.runs)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")[:60] or "config"


def _num(value: float, decimals: int | None) -> str:
    return f"{value:.{decimals}f}" if decimals is not None else f"{value:.2e}"


def _decimals(scale: float, sig: int) -> int | None:
    """Decimals that show ``sig`` significant digits of ``scale`` in fixed notation, or None
    (scientific notation) when ``scale`` is too large or small for it."""
    if scale == 0 or not math.isfinite(scale):
        return 0
    exponent = math.floor(math.log10(abs(scale)))
    if exponent >= 5 or exponent < -4:
        return None
    return max(0, sig - 1 - exponent)


def _mean_std(values: list[float], sig: int = 4) -> str:
    """``mean ± std`` of the finite values, both in one format chosen from the mean (e.g.
    ``2013 ± 81``, ``0.008366 ± 0.000120``, ``2.01e+07 ± 8.14e+05``); "—" if none."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "—"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else None
    decimals = _decimals(mean if mean != 0 else (std or 0.0), sig)
    if std is None:
        return _num(mean, decimals)
    return f"{_num(mean, decimals)} ± {_num(std, decimals)}"


def _count_cell(total: int, steps: int) -> str:
    """A count over all seeds' steps: ``0``, or ``12 (0.8% of steps)``."""
    if total == 0:
        return "0"
    return f"{total} ({100 * total / steps:.1f}% of steps)" if steps else str(total)


def _final(run: Run) -> dict[str, Any]:
    return run.evals[-1] if run.evals else {}


def _time_to_target(run: Run, target: float) -> float | None:
    for ev in run.evals:
        loss = ev.get("train_loss")
        if loss is not None and loss <= target:
            return float(ev.get("time", 0.0))
    return None


def _work_to_target(run: Run, target: float) -> float | None:
    """Network passes (the logged ``work``) up to the first evaluation at or below
    ``target``; None if never reached or no work is logged."""
    work = cumulative_work(run)
    if work is None:
        return None
    for ev in run.evals:
        loss = ev.get("train_loss")
        if loss is not None and loss <= target:
            return work.get(int(ev["step"]))
    return None


def _train_time(run: Run) -> tuple[int, float]:
    """(steps done, training seconds) from the records written so far."""
    steps, seconds = 0, 0.0
    for rec in run.steps:
        if rec["step"]:
            steps = max(steps, rec["step"][-1] + 1)
            seconds = max(seconds, rec["time"][-1])
    return steps, seconds


def _curvature_share(run: Run) -> float | None:
    _, total = _train_time(run)
    curv = sum(sum(v for v in rec.get("time_curvature", []) if v is not None)
               for rec in run.steps)
    return curv / total if total > 0 else None


def group_runs(runs: dict[str, Run]) -> list[Group]:
    groups: dict[str, Group] = {}
    for run in runs.values():
        g = groups.setdefault(run.config_id, Group(run.config_id, run.label,
                                                   int(run.start.get("index", 1 << 30))))
        g.runs.append(run)
    for g in groups.values():
        g.runs.sort(key=lambda r: r.seed)
    return sorted(groups.values(), key=lambda g: (g.index, g.label))


def _target_from(runs: dict[str, Run], config: dict[str, Any]) -> float | None:
    target = config.get("train", {}).get("target_loss")
    if target is None:
        for run in runs.values():
            target = run.start.get("config", {}).get("train", {}).get("target_loss")
            if target is not None:
                break
    return float(target) if target is not None else None


def summary_rows(groups: list[Group], target: float | None) -> tuple[list[str], list[list[str]]]:
    classification = any("test_accuracy" in _final(r) for g in groups for r in g.runs)
    header = ["configuration", "seeds", "final train loss", "final test loss"]
    if classification:
        header.append("test accuracy")
    work_col = f"work to train loss ≤ {target:g} (passes)" if target is not None else \
        "work to target (passes)"
    header += [f"time to train loss ≤ {target:g} (s)" if target is not None
               else "time to target (s)", work_col, "steps/s", "curvature time", "rejected",
               "non-finite", "diverged", "failed"]
    rows = []
    for g in groups:
        ok = g.ok_runs
        incomplete = g.count("incomplete")
        seeds = f"{len(g.runs)}" + (f" ({incomplete} incomplete)" if incomplete else "")
        row = [g.label, seeds,
               _mean_std([_final(r).get("train_loss") for r in ok]),
               _mean_std([_final(r).get("test_loss") for r in ok])]
        if classification:
            row.append(_mean_std([_final(r).get("test_accuracy") for r in ok], 3))
        if target is None:
            row.append("—")
        else:
            times = [_time_to_target(r, target) for r in ok]
            reached = [t for t in times if t is not None]
            row.append(f"{_mean_std(reached, 3)} ({len(reached)}/{len(g.runs)})"
                       if reached else f"not reached (0/{len(g.runs)})")
        works = [_work_to_target(r, target) for r in ok] if target is not None else []
        reached_work = [w for w in works if w is not None]
        row.append(f"{_mean_std(reached_work, 3)} ({len(reached_work)}/{len(g.runs)})"
                   if reached_work else "—")
        rates = []
        for r in g.runs:
            steps, seconds = _train_time(r)
            if seconds > 0:
                rates.append(steps / seconds)
        row.append(_mean_std(rates, 3))
        shares = [_curvature_share(r) for r in g.runs]
        shares = [s for s in shares if s is not None]
        row.append(f"{100 * statistics.fmean(shares):.0f}%" if shares else "—")
        steps_total = sum(r.steps_done for r in g.runs)
        row.append(_count_cell(sum(int(r.steps[-1].get("rejected", 0)) for r in g.runs
                                   if r.steps), steps_total))
        row.append(_count_cell(sum(int(r.steps[-1].get("nonfinite", 0)) for r in g.runs
                                   if r.steps), steps_total))
        row.append(str(g.count("diverged")))
        row.append(str(g.count("failed")))
        rows.append(row)
    _memory_columns(groups, header, rows)
    j = header.index(work_col)
    if all(row[j] == "—" for row in rows):  # no run logs work, or no target
        header.pop(j)
        for row in rows:
            row.pop(j)
    # counts that are 0 in every row say nothing: the columns go, the text says why
    for name in ("rejected", "non-finite", "diverged", "failed"):
        j = header.index(name)
        if all(row[j] == "0" for row in rows):
            header.pop(j)
            for row in rows:
                row.pop(j)
    return header, rows


def _bytes(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def _memory_columns(groups: list[Group], header: list[str], rows: list[list[str]]) -> None:
    """The optimizer's state between steps (runner.state_bytes): every tensor it keeps, and
    the preconditioner's share; columns only when some run recorded them (a seed's state
    has the same size as any other's, so the first finished run speaks for the row)."""
    for key, name in (("state_bytes", "optimizer state"),
                      ("preconditioner_bytes", "preconditioner state")):
        cells = []
        for g in groups:
            sizes = [r.end[key] for r in g.runs if r.end and isinstance(r.end.get(key), int)]
            cells.append(_bytes(sizes[0]) if sizes else "—")
        if any(c != "—" for c in cells):
            header.append(name)
            for row, c in zip(rows, cells):
                row.append(c)


def _absent_counts(header: list[str]) -> str:
    gone = [n for n in ("rejected", "non-finite", "diverged", "failed") if n not in header]
    names = {"rejected": "rejected a step", "non-finite": "skipped a non-finite update",
             "diverged": "diverged", "failed": "failed"}
    if not gone:
        return ""
    return " No run " + " or ".join(names[n] for n in gone) + " (those columns are left out)."


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures
def _figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.0)) -> Any:
    FigureCanvasAgg = require("matplotlib.backends.backend_agg",
                              "curvkit report's figures").FigureCanvasAgg
    Figure = require("matplotlib.figure", "curvkit report's figures").Figure
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _colors(n: int) -> list[Any]:
    colormaps = require("matplotlib", "curvkit report's figures").colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def cumulative_work(run: Run) -> dict[int, float] | None:
    """Steps done → work done so far (sum of the per-step ``work`` numbers), or None when
    the run logs no work. A step without a number (e.g. a skipped non-finite step) counts
    as no work."""
    steps, values = run.step_series("work")
    if not any(isinstance(v, (int, float)) for v in values):
        return None
    out, total = {0: 0.0}, 0.0
    for step, value in sorted(zip(steps, values), key=lambda p: p[0]):
        if isinstance(value, (int, float)) and math.isfinite(value):
            total += float(value)
        out[step + 1] = total
    return out


def _eval_curves(g: Group, key: str, x: str = "step"
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                            np.ndarray] | None:
    """Steps, mean time (or mean work for ``x = "work"``), mean, min, max over seeds of an
    eval metric, on the eval steps every contributing run has reached."""
    runs = [r for r in g.ok_runs if any(key in e for e in r.evals)]
    if x == "work":
        works = {r.run: cumulative_work(r) for r in runs}
        runs = [r for r in runs if works[r.run] is not None]
    if not runs:
        return None
    common = None
    for r in runs:
        steps = {e["step"] for e in r.evals if e.get(key) is not None}
        common = steps if common is None else common & steps
    if not common:
        return None
    steps = np.array(sorted(common))
    vals = np.array([[next(e[key] for e in r.evals if e["step"] == s) for s in steps]
                     for r in runs], dtype=float)
    if x == "work":
        steps = np.array([s for s in steps if all(int(s) in works[r.run] for r in runs)])
        if not len(steps):
            return None
        vals = np.array([[next(e[key] for e in r.evals if e["step"] == s) for s in steps]
                         for r in runs], dtype=float)
        times = np.array([[works[r.run][int(s)] for s in steps] for r in runs], dtype=float)
    else:
        times = np.array([[next(e.get("time", 0.0) for e in r.evals if e["step"] == s)
                           for s in steps] for r in runs], dtype=float)
    return steps, times.mean(0), vals.mean(0), vals.min(0), vals.max(0)


LEGEND_INSIDE_MAX = 12     # more configurations than this: legend below the axes
CLIP_FACTOR = 10.0         # loss axes stop at this multiple of the largest initial loss
XLABELS = {"step": "step", "time": "training time (s, evaluation excluded)",
           "work": "work (network passes: forward, backward, JVP, VJP; 2 per gradient)"}


LINESTYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]


def line_style(i: int, n: int) -> dict[str, Any]:
    """Colour, line style and marker of the i-th of n curves: no two curves share all three,
    and markers sit at staggered points so that curves lying on top of each other (e.g.
    K-FAC with the Fisher and with the GGN) both stay visible."""
    return {"color": _colors(n)[i], "linestyle": LINESTYLES[i % len(LINESTYLES)],
            "marker": MARKERS[i % len(MARKERS)], "markersize": 4,
            "markevery": (i % 5 / 5 * 0.2, 0.2), "linewidth": 1.4}


def loss_figure(groups: list[Group], x: str, path: Path) -> bool:
    """Train and test loss against ``x`` ("step", "time" or "work") with min–max seed
    bands; for "work" only the configurations that log it (work on a log axis when it
    spans more than two decades). The legend sits outside the axes."""
    keys = [k for k in ("train_loss", "test_loss")
            if any(_eval_curves(g, k, x) is not None for g in groups)]
    if not keys:
        return False
    # Large grids: the legend goes below the axes, else to their right; the figure grows
    # to hold it, so it never covers a curve.
    many = len(groups) > LEGEND_INSIDE_MAX
    ncol = 1 if max(len(g.label) for g in groups) > 80 or not many else 2
    rows = math.ceil(len(groups) / ncol) if many else 0
    widest = max(len(g.label) for g in groups)
    extra_w = 0.0 if many else min(4.0, 0.6 + 0.055 * widest)
    fig, axes = _figure(len(keys), 1, size=(5.0 + extra_w / len(keys), 4.0 + 0.14 * rows))
    for ax, key in zip(axes[0], keys):
        positive = True
        starts: list[float] = []
        spans: list[float] = []
        firsts: list[float] = []
        for i, g in enumerate(groups):
            curves = _eval_curves(g, key, x)
            if curves is None:
                continue
            steps, times, mean, lo, hi = curves
            xs = steps if x == "step" else times
            if x == "work":
                # the seeds' work differs (rejected steps, CG iterations): mean per eval
                n_ok = sum(cumulative_work(r) is not None for r in g.ok_runs)
                if len(xs) > 1 and xs[1] > 0:
                    spans.append(float(xs[-1] / xs[1]))
                    firsts.append(float(xs[1]))
            else:
                n_ok = len(g.ok_runs)
            style = line_style(i, len(groups))
            ax.plot(xs, mean, label=f"{g.label} ({n_ok})", **style)
            if n_ok > 1:
                ax.fill_between(xs, lo, hi, color=style["color"], alpha=0.15, linewidth=0)
            positive = positive and bool(np.all(lo > 0))
            if np.isfinite(mean[0]):
                starts.append(float(mean[0]))
        if positive:
            ax.set_yscale("log")
        if x == "work" and spans and max(spans) > 100:
            # direct solvers do a few passes per step, Krylov ones hundreds: a log axis
            # (linear below the first evaluation's work, so work 0 at step 0 stays)
            ax.set_xscale("symlog", linthresh=min(firsts))
        # a diverging configuration would flatten every other curve: the axis stops at
        # CLIP_FACTOR × the largest initial loss (the table still has its numbers)
        if starts and positive and ax.get_ylim()[1] > CLIP_FACTOR * max(starts):
            ax.set_ylim(top=CLIP_FACTOR * max(starts))
            ax.set_title(f"clipped at {CLIP_FACTOR:g}× the largest initial loss", fontsize=8)
        ax.set_xlabel(XLABELS[x])
        ax.set_ylabel(key.replace("_", " ") + " (whole split)")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:  # a configuration may only have a test curve
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if many:
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=6,
                   frameon=False)
    else:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7, frameon=False)
    fig.suptitle(f"loss vs {x}: mean over seeds (runs per line in brackets), "
                 f"band = min–max", fontsize=10)
    fig.savefig(path, dpi=110)
    return True


def _matrix_snapshots(run: Run) -> list[tuple[int, dict[str, Any]]]:
    return [(e["step"], e["snapshot"]) for e in run.evals if e.get("snapshot")]


def _square_keys(matrices: dict[str, Any]) -> list[str]:
    out = []
    for key, value in matrices.items():
        if isinstance(value, list) and value and all(isinstance(r, list) for r in value) \
                and len(value) == len(value[0]) and all(
                    isinstance(v, (int, float)) or v is None for r in value for v in r):
            out.append(key)
    return out


def _group_names(matrices: dict[str, Any], size: int) -> list[str] | None:
    for value in matrices.values():
        if isinstance(value, list) and len(value) == size and all(isinstance(v, str)
                                                                 for v in value):
            return value
    return None


def _block_order(names: list[str] | None, size: int) -> tuple[list[int], list[int]]:
    """Weights first, then biases, then the rest (Wolinski's WW / WB / BB blocks): the
    permutation and the block boundaries."""
    if not names:
        return list(range(size)), []
    weights = [i for i, n in enumerate(names) if n.endswith("weight")]
    biases = [i for i, n in enumerate(names) if n.endswith("bias")]
    rest = [i for i in range(size) if i not in weights and i not in biases]
    order = weights + biases + rest
    cuts, pos = [], 0
    for block in (weights, biases, rest):
        pos += len(block)
        if 0 < pos < size and block:
            cuts.append(pos)
    return order, cuts


def readable_names(names: list[str]) -> list[str]:
    """Parameter names as layer names: ``net.0.weight``, ``net.2.bias`` → ``layer 1 W``,
    ``layer 2 b`` (layers numbered in order of appearance; a named module keeps its
    name: ``fc1.weight`` → ``fc1 W``). Other group names are kept."""
    modules: dict[str, int] = {}
    out = []
    for name in names:
        head, dot, tail = name.rpartition(".")
        if not dot or tail not in ("weight", "bias") and not tail.endswith(("weight", "bias")):
            out.append(name)
            continue
        index = modules.setdefault(head, len(modules) + 1)
        last = head.rpartition(".")[2]
        layer = f"layer {index}" if last.isdigit() or not last else last
        short = {"weight": "W", "bias": "b"}.get(tail, tail)
        out.append(f"{layer} {short}")
    return out if len(set(out)) == len(out) else names


def normalized(M: np.ndarray) -> np.ndarray:
    """M_ij / sqrt(|M_ii M_jj|): the interaction between groups i and j on a common scale."""
    d = np.sqrt(np.abs(np.diag(M)))
    d[d == 0] = 1.0
    return M / np.outer(d, d)


def heatmap_figure(run: Run, label: str, path_for: Callable[[str], Path]) -> list[Path]:
    """H̄ and H̄⁻¹ early and late in training, one PNG per square matrix key.

    Entries are shown normalized, M_ij / sqrt(|M_ii M_jj|), with groups ordered weights
    first, then biases, so the weight-weight, weight-bias and bias-bias interaction blocks
    of Wolinski's Figures 1–2 appear as blocks (separated by lines)."""
    snaps = _matrix_snapshots(run)
    if not snaps:
        return []
    chosen = [snaps[0]] if len(snaps) == 1 else [snaps[0], snaps[-1]]
    paths = []
    for key in _square_keys(snaps[-1][1]):
        fig, axes = _figure(len(chosen), 2, size=(4.6, 4.0))
        for col, (step, mats) in enumerate(chosen):
            if key not in mats:
                continue
            M = np.array([[np.nan if v is None else v for v in r] for r in mats[key]], float)
            names = _group_names(mats, len(M))
            order, cuts = _block_order(names, len(M))
            inv = np.linalg.pinv(M) if np.isfinite(M).all() else np.full_like(M, np.nan)
            for row, (A, title) in enumerate(((M, key), (inv, f"{key}⁻¹"))):
                ax = axes[row][col]
                A = normalized(A)[np.ix_(order, order)]
                im = ax.imshow(A, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
                for c in cuts:
                    ax.axhline(c - 0.5, color="k", linewidth=0.8)
                    ax.axvline(c - 0.5, color="k", linewidth=0.8)
                ax.set_title(f"{title}, step {step}", fontsize=9)
                if names and len(names) <= 24:
                    shown = readable_names([names[i] for i in order])
                    ax.set_xticks(range(len(shown)), shown, rotation=90, fontsize=8)
                    ax.set_yticks(range(len(shown)), shown, fontsize=8)
                fig.colorbar(im, ax=ax, shrink=0.8)
        fig.suptitle(f"{label} (seed {run.seed}): {key} and its (pseudo-)inverse, "
                     f"normalized M_ij/√|M_ii M_jj|", fontsize=10)
        path = path_for(key)
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def group_lr_figure(run: Run, label: str, path_for: Callable[[str], Path]) -> list[Path]:
    """Per-group learning rates (every per-step vector whose key mentions eta / lr)."""
    keys = sorted({k for rec in run.steps for k, vals in rec.get("info", {}).items()
                   if re.search(r"eta|(^|_)lrs?($|_)", k)
                   and any(isinstance(v, list) for v in vals)})
    keys = [k for k in keys if not k.endswith("_valid")]
    paths = []
    names = None
    snaps = _matrix_snapshots(run)
    series: list[tuple[list[str], np.ndarray, np.ndarray]] = []
    for key in keys:
        steps, values = run.step_series(key)
        pairs = [(s, v) for s, v in zip(steps, values) if isinstance(v, list)]
        if not pairs:
            continue
        width = max(len(v) for _, v in pairs)
        data = np.full((len(pairs), width), np.nan)
        for i, (_, v) in enumerate(pairs):
            data[i, :len(v)] = [np.nan if x is None else abs(x) for x in v]
        xs = np.array([s for s, _ in pairs])
        # the same rates logged under two keys (the cubic solver echoes the partition
        # preconditioner's η) are drawn once, titled with both keys
        same = next((k for k, d, x0 in series if d.shape == data.shape and
                     np.array_equal(x0, xs) and np.array_equal(d, data, equal_nan=True)), None)
        if same is not None:
            same.append(key)
            continue
        series.append(([key], data, xs))
    for keys_of, data, xs in series:
        key, width = keys_of[0], data.shape[1]
        if snaps:
            names = _group_names(snaps[-1][1], width)
            names = readable_names(names) if names else None
        fig, axes = _figure(1, 1, size=(7.0, 4.2))
        ax = axes[0][0]
        colors = _colors(width)
        for j in range(width):
            ax.plot(xs, data[:, j], color=colors[j], linewidth=1,
                    linestyle=LINESTYLES[(j // 10) % len(LINESTYLES)],
                    label=names[j] if names else f"group {j}")
        if np.nanmin(data, initial=np.inf) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"|{key}|")
        ax.grid(True, alpha=0.3)
        if width <= 16:
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title(f"{label} (seed {run.seed}): per-group {' = '.join(keys_of)} over "
                     f"training", fontsize=9)
        path = path_for(key)
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def tuning_lines(directory: Path) -> list[str]:
    """The ``[tune]`` searches (``tune.jsonl``): per point, trials, best value, values."""
    from curvkit.experiments.tune import load_searches

    searches = load_searches(directory)
    if not searches:
        return []
    rows = []
    for entry in searches.values():
        trials = entry["trials"]
        best = entry["best"]
        scored = [t["value"] for t in trials if t.get("value") is not None]
        failed = len(trials) - len(scored)
        metric = (best or {}).get("metric", "val_loss")
        rows.append([entry["label"], f"{len(trials)}" + (f" ({failed} diverged)" if failed
                                                         else ""),
                     _value(best["value"]) if best and best.get("value") is not None else
                     ("—" if best else "searching"),
                     f"{_value(min(scored))} … {_value(max(scored))}" if scored else "—",
                     ", ".join(f"{k} = {_value(v)}" for k, v in (best or {}).get(
                         "params", {}).items()) or "—", metric])
    return ["## Tuning", "",
            "Each configuration's options in `[tune] space` were searched with Optuna (TPE) "
            "on the validation split, every trial training for the same budget; the seeds "
            "then ran with the best values (the summary's rows).", "",
            markdown_table(["configuration", "trials", "best", "range of trial values",
                            "best values", "metric"], rows), ""]


def code_commit() -> str:
    """The git commit of the checkout curvkit is imported from (12 hex digits, ``+dirty``
    for uncommitted changes under curvkit/; "unknown" outside git)."""
    return _code_commit()


@functools.lru_cache(maxsize=1)
def _code_commit() -> str:
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--",
                                "curvkit"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def provenance_line(directory: Path, runs: Iterable[Run] = ()) -> str:
    """Which code and which config produced the report: the curvkit commit(s) the runs
    recorded in their start records (``versions.commit``), else the commit of the checkout
    rendering the report, and the sha256 of ``config.toml`` as written by the run, so a
    stale report is recognisable."""
    import hashlib

    ran = sorted({r.start.get("versions", {}).get("commit") for r in runs
                  if isinstance(r.start.get("versions"), dict)} - {None})
    commit = code_commit()
    cfg = directory / "config.toml"
    digest = hashlib.sha256(cfg.read_bytes()).hexdigest()[:16] if cfg.exists() else "none"
    if ran:
        shown = ", ".join(f"`{c}`" for c in ran)
        return (f"Provenance: runs at curvkit commit {shown}, config.toml sha256 "
                f"`{digest}`; report rendered at `{commit}`.")
    return f"Provenance: curvkit commit `{commit}`, config.toml sha256 `{digest}`."


# --------------------------------------------------------------------------- report
def build_report(directory: str | Path, target_loss: float | None = None,
                 log: Callable[[str], None] = print) -> Path:
    """Write ``DIR/report.md`` and ``DIR/figures/*.png``; returns the report's path."""
    directory = Path(directory)
    if not (directory / RESULTS).exists():
        raise FileNotFoundError(f"{directory}: no {RESULTS} (run `curvkit ablate` or "
                                f"`curvkit train` with --out {directory} first)")
    runs = load_runs(directory)
    config: dict[str, Any] = {}
    if (directory / "config.toml").exists():
        try:
            config = tomllib.loads((directory / "config.toml").read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError:
            config = {}
    grid: dict[str, Any] = {}
    if (directory / "grid.json").exists():
        try:
            grid = json.loads((directory / "grid.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            grid = {}
    target = target_loss if target_loss is not None else _target_from(runs, config)
    groups = group_runs(runs)
    figdir = directory / FIGURES
    figdir.mkdir(exist_ok=True)

    statuses: dict[str, int] = {}
    for run in runs.values():
        statuses[run.status] = statuses.get(run.status, 0) + 1
    title = config.get("title") or f"curvkit report: {directory.name}"
    lines = [f"# {title}", ""]
    if config.get("description"):
        lines += [str(config["description"]), ""]
    counts = ", ".join(f"{v} {k}" for k, v in sorted(statuses.items())) or "no runs yet"
    lines.append(f"Results in `{directory}`: {len(runs)} runs of {len(groups)} "
                 f"configurations ({counts}). Generated "
                 f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.")
    lines += ["", provenance_line(directory, runs.values()), ""]
    if statuses.get("incomplete"):
        lines += [f"**Partial results**: {statuses['incomplete']} run(s) have not finished; "
                  "their numbers are those of their last evaluation so far.", ""]
    if groups:
        header, rows = summary_rows(groups, target)
        lines += ["## Summary", "", markdown_table(header, rows), ""]
        lines += ["Losses are means over the whole split at each run's last evaluation, "
                  "mean ± sample standard deviation over seeds (diverged and failed runs "
                  "excluded). Times are training time only (evaluation excluded); "
                  "'curvature time' is the share spent refreshing curvature statistics "
                  "(`last_info['time_curvature']`); rejected (trust-region steps not "
                  "taken) and non-finite (updates skipped because a value was not finite) "
                  "are totals over the seeds' steps." + _absent_counts(header), ""]
    lines += tuning_lines(directory)
    skipped = [p for p in grid.get("points", []) if p.get("skipped")]
    if skipped:
        lines += ["## Skipped grid points", ""]
        lines += [f"- **{p['label']}** ({p['skipped']}): {p['reason']}" for p in skipped]
        lines.append("")

    figures: list[tuple[str, Path]] = []
    if groups:
        names = {"step": "step", "time": "training time", "work": "work"}
        for x in ("step", "time", "work"):
            path = figdir / f"loss_vs_{x}.png"
            if loss_figure(groups, x, path):
                figures.append((f"Loss vs {names[x]}", path))
    if figures:
        lines += ["## Loss curves", ""]
        lines += [f"![{name}]({p.relative_to(directory).as_posix()})" for name, p in figures]
        lines.append("")
        if any(name == "Loss vs work" for name, _ in figures):
            without = [g.label for g in groups
                       if g.ok_runs and all(cumulative_work(r) is None for r in g.ok_runs)]
            lines += ["Work counts network passes per step as the runs log it (`work`, "
                      "`curvkit.work`): 2 for the step's gradient, 1 per extra forward "
                      "(trial points, loss evaluations), and what the estimator's calls "
                      "cost — a forward plus one backward per output column for ef, "
                      "fisher and ggn statistics, 2 per curvature product, none for K-FAC "
                      "statistics taken from the step's own pass; every forward, JVP and "
                      "VJP for `varpro`; 2 per closure call for torch.optim baselines." +
                      (f" Not shown (no work logged): {', '.join(without)}." if without
                       else ""), ""]

    part_lines: list[str] = []
    for g in groups:
        runs_with = [r for r in g.ok_runs if _matrix_snapshots(r) or any(
            rec.get("info") for rec in r.steps)]
        if not runs_with:
            continue
        run = runs_with[0]
        slug = f"{g.index + 1:02d}_{_slug(g.label)}" if g.index < 1 << 30 else _slug(g.label)
        heat = heatmap_figure(run, g.label,
                              lambda k, s=slug: figdir / f"heatmap_{s}_{_slug(k)}.png")
        lrs = group_lr_figure(run, g.label,
                              lambda k, s=slug: figdir / f"group_lr_{s}_{_slug(k)}.png")
        if heat or lrs:
            part_lines += [f"### {g.label}", ""]
            part_lines += [f"![{p.stem}]({p.relative_to(directory).as_posix()})"
                           for p in heat + lrs]
            part_lines.append("")
    if part_lines:
        lines += ["## Partition summaries", "",
                  "H̄ and its (pseudo-)inverse at the first and last evaluation that has "
                  "them, normalized as M_ij/√|M_ii M_jj| (weights first, then biases), and "
                  "the per-group learning rates |η| over training (first seed). Where "
                  "`partition_eta` and `cubic_eta` are drawn separately they differ: the "
                  "first is the partition preconditioner's own rule (H̄ + λI)⁻¹ḡ, the "
                  "second the η the cubic solver stepped with (regularized by D³, after "
                  "its safeguard); identical series are drawn once.", ""] + part_lines

    failed = [r for r in runs.values() if r.status == "failed"]
    diverged = [r for r in runs.values() if r.status == "diverged"]
    if failed or diverged:
        lines += ["## Diverged and failed runs", ""]
        for r in diverged:
            lines.append(f"- diverged: **{r.label}** seed {r.seed}: {r.end.get('reason', '')}")
        for r in failed:
            lines.append(f"- failed: **{r.label}** seed {r.seed}: {r.end.get('error', '')}")
        lines.append("")
    path = directory / REPORT
    write_text_atomic(path, "\n".join(lines))
    log(f"report: {path}")
    return path
