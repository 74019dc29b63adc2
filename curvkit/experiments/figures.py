"""The figures of ``curvkit report``: loss curves and the partition summaries' heatmaps and
per-group learning rates, drawn with matplotlib's Agg canvas (no display, no global backend
switch). Each function takes grouped runs (:class:`curvkit.experiments.report.Group`) or one
run and the path(s) to write, and returns what it wrote; the report module lays them out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from curvkit._optional import require
from curvkit.experiments.store import Run

if TYPE_CHECKING:  # report imports this module; the type is only for annotations
    from curvkit.experiments.report import Group


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


def matrix_snapshots(run: Run) -> list[tuple[int, dict[str, Any]]]:
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
    snaps = matrix_snapshots(run)
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
    snaps = matrix_snapshots(run)
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
