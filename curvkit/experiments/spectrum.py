"""``curvkit spectrum CONFIG.toml --out DIR``: curvature spectra along a training run.

Trains the config's run (first seed) like ``curvkit train`` and, at step 0, every
``train.eval_every`` steps and at the end, measures on a fixed batch of training samples
(the first ``--samples``) for each estimator of ``--estimators`` (default: the optimizer's
own): the ``--k`` largest eigenvalues (:func:`curvkit.spectral.top_eigenvalues`), the trace
(:func:`curvkit.spectral.trace`, Hutch++) and the spectral density
(:func:`curvkit.spectral.density`, stochastic Lanczos quadrature).

Writes to DIR:

* ``spectrum.jsonl`` — one record per measurement (step, estimator, eigenvalues, trace,
  density grid and values), appended and flushed one by one: an interrupted run keeps
  every finished measurement;
* ``eigenvalues.png`` — eigenvalue trajectories over the steps (one panel per estimator);
* ``density.png`` — the spectral densities at the first and last measured steps;
* ``spectrum.md`` — a table of λ₁…λ_k and the trace per step.

Figures and the table are written through a temporary file and renamed (never half-written).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from curvkit import spectral
from curvkit.errors import ConfigError


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def measure(est: Any, batch: tuple, k: int, samples: int, probes: int, steps: int,
            seed: int) -> dict[str, Any]:
    """Eigenvalues, trace and density of ``est`` on ``batch`` at the current parameters."""
    op = est.linearize(batch)
    n = op.shape[0]
    vals, _ = spectral.top_eigenvalues(op, min(k, n), tol=1e-4, seed=seed)
    tr = spectral.trace(op, samples=samples, seed=seed)
    dens = spectral.density(op, probes=probes, steps=min(steps, n), points=128, seed=seed)
    return {"eigenvalues": [float(v) for v in vals], "trace": tr,
            "density": {"grid": dens.grid.tolist(), "values": dens.values.tolist(),
                        "sigma": dens.sigma}}


def run_spectrum(config: str | os.PathLike, out: str | os.PathLike, *,
                 estimators: Sequence[str] | None = None, k: int = 3, samples: int = 256,
                 trace_samples: int = 30, probes: int = 4, lanczos_steps: int = 40,
                 seed: int | None = None, cache_dir: Any = None, progress: bool = True,
                 log: Callable[[str], None] = print) -> Path:
    """Run the measurement (see the module docstring); returns the results directory."""
    import curvkit
    from curvkit.devices import resolve_device
    from curvkit.experiments.ablate import load_config
    from curvkit.experiments.config import parse_run_config
    from curvkit.experiments.runner import BatchSampler, build_model, load_task, on_device
    from curvkit.optimizer import CurvkitOptimizer

    for name, value, low in (("--k", k, 1), ("--samples", samples, 1),
                             ("--trace-samples", trace_samples, 3), ("--probes", probes, 1),
                             ("--lanczos-steps", lanczos_steps, 1)):
        if value < low:
            raise ConfigError(f"{name}: must be >= {low}, got {value}")
    _, doc = load_config(config)
    cfg = parse_run_config(doc)
    if cfg.is_torch:
        raise ConfigError("optimizer: spectrum trains with a curvkit optimizer; a torch.optim "
                          "baseline has no curvature estimator to measure")
    names = list(estimators) if estimators else [cfg.optimizer.estimator.name]
    known = curvkit.components()["estimator"]
    for name in names:
        if name not in known:
            raise ConfigError(f"--estimators: unknown estimator {name!r} (registered: "
                              f"{', '.join(known)})")
    seed = cfg.train.seeds[0] if seed is None else seed
    device = resolve_device(cfg.train.device)
    data = on_device(load_task(cfg, cache_dir), device)
    model = build_model(cfg, data, seed).to(device)
    loss_fn = data.loss_fn(cfg.task.reduction)
    opt = CurvkitOptimizer(model, loss_fn, cfg.optimizer)
    ests = {n: curvkit.create("estimator", n, model=model, loss_fn=loss_fn) for n in names}
    X_train, y_train = data.train
    fixed = (X_train[:samples], y_train[:samples])
    sampler = BatchSampler(int(y_train.shape[0]), cfg.task.batch_size, seed)
    steps, every = cfg.train.steps, cfg.train.eval_every
    points = sorted({0, steps, *range(every, steps, every)})

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps + len(points) * len(names), desc="spectrum", unit="step")
    with (out / "spectrum.jsonl").open("w", encoding="utf-8") as fh:
        def measure_all(step: int) -> None:
            for name, est in ests.items():
                t0 = time.perf_counter()
                rec = {"step": step, "estimator": name,
                       **measure(est, fixed, k, trace_samples, probes, lanczos_steps, seed),
                       "seconds": time.perf_counter() - t0}
                records.append(rec)
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                if bar is not None:
                    bar.update(1)

        try:
            measure_all(0)
            for step in range(steps):
                idx, _ = sampler.next()
                loss = float(opt.step((X_train[idx], y_train[idx])))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4g}")
                if not math.isfinite(loss):
                    log(f"stopped: non-finite loss at step {step}")
                    break
                if step + 1 in points:
                    measure_all(step + 1)
        finally:
            if bar is not None:
                bar.close()
    write_outputs(out, records, names)
    log(f"spectrum: {len(records)} measurement(s) of {', '.join(names)} in {out}")
    return out


def write_outputs(out: Path, records: list[dict[str, Any]], names: Sequence[str]) -> None:
    """The table and the two figures from the measurement records."""
    lines = ["| step | estimator | eigenvalues (largest first) | trace |", "|---|---|---|---|"]
    for r in records:
        vals = ", ".join(f"{v:.4g}" for v in r["eigenvalues"])
        lines.append(f"| {r['step']} | {r['estimator']} | {vals} | {r['trace']:.4g} |")
    _atomic_write(out / "spectrum.md", lambda p: p.write_text("\n".join(lines) + "\n"))
    if not records:
        return
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5 * len(names), 3.5))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        mine = [r for r in records if r["estimator"] == name]
        steps = [r["step"] for r in mine]
        for j in range(max(len(r["eigenvalues"]) for r in mine)):
            ax.plot(steps, [r["eigenvalues"][j] if j < len(r["eigenvalues"]) else math.nan
                            for r in mine], marker="o", label=f"λ{j + 1}")
        ax.set_title(f"{name}: top eigenvalues")
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    fig.tight_layout()
    _atomic_write(out / "eigenvalues.png", lambda p: fig.savefig(p, format="png", dpi=100))

    fig = Figure(figsize=(4.5 * len(names), 3.5))
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        mine = [r for r in records if r["estimator"] == name]
        top = 0.0
        for r in (mine[0], mine[-1]) if len(mine) > 1 else mine:
            ax.plot(r["density"]["grid"], r["density"]["values"], label=f"step {r['step']}")
            top = max(top, max(r["density"]["values"]))
        ax.set_yscale("log")
        if top > 0:  # the Gaussian tails between nodes go to ~0: show six decades
            ax.set_ylim(bottom=top * 1e-6)
        ax.set_title(f"{name}: spectral density (SLQ)")
        ax.set_xlabel("eigenvalue")
        ax.legend(fontsize="small")
    fig.tight_layout()
    _atomic_write(out / "density.png", lambda p: fig.savefig(p, format="png", dpi=100))
