"""The ``curvkit`` command line: ``components``, ``train``, ``ablate``, ``report``,
``spectrum`` (in :mod:`curvkit.experiments.spectrum`).

Exit codes: 0 success; 1 some run failed (an exception inside a run; diverged runs are
results, not failures); 2 bad input (config errors are reported with their dotted path
before anything runs); 130 interrupted (re-run the same command to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curvkit.errors import ConfigError, CurvkitError, IncompatibleError


def _out(msg: str = "") -> None:
    print(msg, flush=True)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- components
def cmd_components(args: argparse.Namespace) -> int:
    from curvkit.registry import get_registry

    reg = get_registry()
    specs = sorted(reg.parts.values(), key=lambda s: (s.kind, s.name))
    if args.kind:
        specs = [s for s in specs if s.kind == args.kind]
    if args.json:
        data = {"parts": [s.to_dict() for s in specs], "failed_plugins": dict(reg.failed)}
        _out(json.dumps(data, indent=2))
        return 0
    from curvkit.parts import KINDS

    for kind in KINDS:
        of_kind = [s for s in specs if s.kind == kind]
        if not of_kind:
            continue
        _out(f"{kind} ({len(of_kind)})")
        for s in of_kind:
            _out(f"  {s.name} — {s.description}" if s.description else f"  {s.name}")
            _out(f"      source: {s.source} (plugin {s.plugin!r})")
            if s.provides:
                _out(f"      provides: {', '.join(sorted(s.provides))}")
            if s.needs:
                _out(f"      needs: {', '.join(sorted(s.needs))}")
            if s.options:
                _out("      options:")
                for o in s.options:
                    _out(f"        {o.describe()}")
        _out()
    if reg.failed:
        _out("skipped plugins:")
        for name, why in reg.failed.items():
            _out(f"  {name}: {why}")
    return 0


# --------------------------------------------------------------------------- train / ablate
def _maybe_init_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1) join the process group (gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    return True


def _is_rank0() -> bool:
    from curvkit import distributed

    return distributed.rank() == 0


def _print_grid(grid: Any, runs: int) -> None:
    active = grid.active
    _out(f"grid: {len(grid.points)} point(s), {len(active)} to run × {len(grid.seeds)} "
         f"seed(s) = {runs} run(s)")
    for p in grid.skipped:
        _out(f"  skipped [{p.label}] ({p.skipped}): {p.reason}")


def _executor(args: argparse.Namespace, doc: Any, config: str) -> Any:
    """The executor part: ``--executor NAME`` (default ``[executor] name``, else ``local``)
    with the options of the config's ``[executor]`` table (``--jobs`` / ``--threads`` for
    ``local``)."""
    from curvkit.config import parse_part
    from curvkit.registry import get_registry

    table = doc.get("executor", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{config}: executor: expected a table (name = ..., options), "
                          f"got {table!r}")
    table = dict(table)
    name = getattr(args, "executor", None)
    if name is not None and table.get("name", name) != name:
        raise ConfigError(f"{config}: executor.name: the config's [executor] is for "
                          f"{table['name']!r}, but --executor {name} was given; its options "
                          f"would not apply")
    table["name"] = name or table.get("name", "local")
    if table["name"] == "local":
        table.setdefault("jobs", getattr(args, "jobs", 1))
        table.setdefault("threads", args.threads)
    choice = parse_part("executor", table, "executor", get_registry())
    return choice.spec.cls(options=choice.options)


def _run(args: argparse.Namespace, mode: str) -> int:
    from curvkit.experiments.ablate import (
        build_grid,
        load_config,
        plan,
        prepare_directory,
        run_grid,
    )
    from curvkit.experiments.lock import DirectoryLock

    if args.threads < 0:
        raise ConfigError(f"--threads: must be >= 0, got {args.threads}")
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    dist_on = _maybe_init_distributed()
    rank0 = _is_rank0()
    log = _out if rank0 else (lambda msg="": None)
    try:
        text, doc = load_config(args.config)
        cache = args.cache_dir
        try:
            grid = build_grid(doc, use_ablate=(mode == "ablate"), cache_dir=cache)
            executor = _executor(args, doc, args.config)
            from curvkit.experiments.tune import parse_tune

            parse_tune(doc)  # [tune] errors before anything runs
        except ConfigError as err:
            raise ConfigError(f"{args.config}: {err}") from err
        out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
        seeds = None
        if not grid.active:
            if len(grid.points) == 1:
                p = grid.points[0]
                raise IncompatibleError(f"{args.config}: the only configuration "
                                        f"is {p.skipped}: {p.reason}")
            raise IncompatibleError(f"{args.config}: every grid point is skipped; nothing "
                                    f"can run:\n" + "\n".join(
                                        f"  [{p.label}] ({p.skipped}): {p.reason}"
                                        for p in grid.points))
        if mode == "train":
            cfg = grid.active[0].config
            seeds = [args.seed if args.seed is not None else cfg.train.seeds[0]]
        from curvkit.devices import resolve_device

        for point in grid.active:  # an unavailable device: an error before anything runs
            resolve_device(point.config.train.device)
        runs = len(grid.runs(seeds))
        if mode == "ablate" and rank0:
            _print_grid(grid, runs)
        if getattr(args, "dry_run", False):
            for p in grid.active:
                log(f"  [{p.label}] config {p.config.config_id()}")
            return 0
        lock = DirectoryLock(out) if rank0 else None
        if lock is not None:
            lock.acquire()
        try:
            if rank0:
                prepare_directory(out, text, doc)
                if mode == "train" and not args.resume:
                    todo, _ = plan(grid.runs(seeds), out)
                    started = [r for _, _, r in todo if r is not None and r.steps > 0]
                    if started:
                        raise ConfigError(
                            f"{out}: holds an interrupted run of this config (steps "
                            f"0..{started[0].steps - 1} recorded); pass --resume to continue "
                            f"it from its last checkpoint, or use another --out")
                from curvkit.experiments.tune import tune_grid

                try:
                    tune_grid(grid, doc, out, cache_dir=cache, log=log)
                except ConfigError as err:
                    raise ConfigError(f"{args.config}: {err}") from err
            if dist_on:
                import torch.distributed as dist

                dist.barrier()
            result = run_grid(grid, out, jobs=getattr(args, "jobs", 1), seeds=seeds,
                              threads=args.threads,
                              cache_dir=cache, progress=not args.no_progress,
                              retry_failed=getattr(args, "retry_failed", False), desc=mode,
                              log=log, executor=executor)
        finally:
            if lock is not None:
                lock.release()
    except KeyboardInterrupt:
        again = "the same command with --resume" if mode == "train" else "the same command"
        _err(f"interrupted: finished runs and checkpoints are kept; re-run {again} to resume")
        return 130
    if result.nothing_to_do:
        what = "run" if mode == "train" else f"all {result.total} runs"
        log(f"nothing to do: {what} in {out} already finished; results unchanged "
            f"({out / 'results.jsonl'})")
        log(f"report: curvkit report {out}")
        return 0
    counts = ", ".join(f"{v} {k}" for k, v in sorted(result.statuses.items()))
    log(f"{mode}: {result.todo} run(s) done ({counts}); {result.already} were already "
        f"finished")
    if mode == "train" and rank0:
        _print_train_summary(out, grid, seeds)
    for e in result.errors:
        _err(f"error: {e}")
    log(f"results: {out / 'results.jsonl'}")
    log(f"report: curvkit report {out}")
    failed = result.statuses.get("failed", 0) + len(result.errors)
    return 1 if failed else 0


def _print_train_summary(out: Path, grid: Any, seeds: list[int]) -> None:
    from curvkit.experiments.store import load_runs

    cfg = grid.active[0].config
    run = load_runs(out).get(cfg.run_id(seeds[0]))
    if run is None or run.end is None:
        return
    end = run.end
    final = end.get("final", {})
    parts = [f"status {end['status']}"]
    for key in ("train_loss", "test_loss", "test_accuracy"):
        if final.get(key) is not None:
            parts.append(f"{key} {final[key]:.4g}")
    if end.get("time") is not None:
        parts.append(f"training time {end['time']:.2f}s")
    _out("  " + ", ".join(parts))
    if end.get("error"):
        _err(f"error: {end['error']}")
    if end.get("reason"):
        _out(f"  {end['reason']}")


def cmd_train(args: argparse.Namespace) -> int:
    return _run(args, "train")


def cmd_ablate(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        _err("error: --jobs: must be >= 1")
        return 2
    return _run(args, "ablate")


def cmd_report(args: argparse.Namespace) -> int:
    from curvkit.experiments.report import build_report

    try:
        build_report(args.dir, target_loss=args.target_loss, log=_out)
    except FileNotFoundError as err:
        _err(f"error: {err}")
        return 2
    return 0


def cmd_spectrum(args: argparse.Namespace) -> int:
    from curvkit.experiments.spectrum import run_spectrum

    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.estimators.split(",") if n.strip()] \
        if args.estimators else None
    run_spectrum(args.config, args.out, estimators=names, k=args.k, samples=args.samples,
                 trace_samples=args.trace_samples, probes=args.probes,
                 lanczos_steps=args.lanczos_steps, seed=args.seed, cache_dir=args.cache_dir,
                 progress=not args.no_progress, log=_out)
    return 0


# --------------------------------------------------------------------------- entry point
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curvkit", description="Second-order optimization of "
                                "PyTorch models from swappable parts.")
    from curvkit import __version__

    p.add_argument("--version", action="version", version=f"curvkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("components", help="list every registered part with its options")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    from curvkit.parts import KINDS

    c.add_argument("--kind", choices=KINDS, help="only parts of this kind")
    c.set_defaults(func=cmd_components)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", help="TOML run config ([task], [train], [optimizer])")
        sp.add_argument("--cache-dir", default=None,
                        help="dataset cache (default $CURVKIT_CACHE_DIR or ~/.cache/curvkit)")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")
        sp.add_argument("--threads", type=int, default=int(os.environ.get("CURVKIT_THREADS", 1)),
                        help="torch threads per run process (default 1, or $CURVKIT_THREADS; "
                             "0 = torch's default). Small models run fastest single-threaded; "
                             "use --jobs for parallelism")

    t = sub.add_parser("train", help="one training run (first seed unless --seed)")
    common(t)
    t.add_argument("--out", default=None, help="results directory (default runs/<config name>)")
    t.add_argument("--seed", type=int, default=None, help="seed (default: first of train.seeds)")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out from its last checkpoint")
    t.set_defaults(func=cmd_train)

    a = sub.add_parser("ablate", help="the [ablate] grid × train.seeds, resumable")
    common(a)
    a.add_argument("--out", required=True, help="results directory")
    a.add_argument("--jobs", type=int, default=1,
                   help="parallel processes of the local executor (default 1)")
    a.add_argument("--executor", default=None,
                   help="where runs execute: a registered executor (local, ray, submitit; "
                        "default [executor] name in the config, else local); its options "
                        "are the config's [executor] table")
    a.add_argument("--retry-failed", action="store_true",
                   help="also re-run runs that ended with an error")
    a.add_argument("--dry-run", action="store_true", help="validate and list the grid only")
    a.set_defaults(func=cmd_ablate)

    r = sub.add_parser("report", help="markdown table and PNG figures from a results directory")
    r.add_argument("dir", help="results directory (of ablate or train)")
    r.add_argument("--target-loss", type=float, default=None,
                   help="train loss for time-to-target (default: train.target_loss)")
    r.set_defaults(func=cmd_report)

    s = sub.add_parser("spectrum", help="eigenvalues, trace and spectral density of the "
                                        "curvature along a training run (at eval steps)")
    common(s)
    s.add_argument("--out", required=True, help="results directory")
    s.add_argument("--estimators", default="",
                   help="comma-separated estimators to measure (default: the optimizer's)")
    s.add_argument("--k", type=int, default=3, help="top eigenvalues per measurement")
    s.add_argument("--samples", type=int, default=256,
                   help="training samples of the fixed measurement batch")
    s.add_argument("--trace-samples", type=int, default=30, help="Hutch++ products")
    s.add_argument("--probes", type=int, default=4, help="SLQ probe vectors")
    s.add_argument("--lanczos-steps", type=int, default=40, help="SLQ Lanczos steps per probe")
    s.add_argument("--seed", type=int, default=None, help="seed (default: first of train.seeds)")
    s.set_defaults(func=cmd_spectrum)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from curvkit import distributed

    code = 1
    try:
        code = int(args.func(args))
    except CurvkitError as err:
        _err(f"error: {err}")
        code = 2
    except BrokenPipeError:
        # output piped into e.g. `head`: stop quietly (and keep Python from complaining
        # about the closed stdout at exit)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    finally:
        ran_distributed = distributed.active()
        distributed.shutdown(code == 0)
    if ran_distributed:
        distributed.exit_process(code)  # see there: gloo can abort at interpreter teardown
    return code


if __name__ == "__main__":
    sys.exit(main())
