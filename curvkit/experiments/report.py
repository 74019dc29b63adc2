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

The figures themselves are drawn by :mod:`curvkit.experiments.figures`.
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

import tomllib

from curvkit.experiments.figures import (
    cumulative_work,
    group_lr_figure,
    heatmap_figure,
    loss_figure,
    matrix_snapshots,
)
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
        runs_with = [r for r in g.ok_runs if matrix_snapshots(r) or any(
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
