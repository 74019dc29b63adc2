"""Run every side-by-side benchmark in this folder (bench_*.py), one after another.

    python benchmarks/run_all.py                      # all, pages into ./benchmark-results/
    python benchmarks/run_all.py singd step           # those whose file name contains a word
    python benchmarks/run_all.py --out-dir DIR        # pages into DIR
    python benchmarks/run_all.py --docs               # pages into docs/benchmarks/ (publish)
    python benchmarks/run_all.py --repeats 5          # short: every script's --repeats

Afterwards the summary table (docs/benchmarks.md with ``--docs``, else ``index.md`` in the
output directory) is rebuilt from the pages by ``summary.py``.

Each script compares curvkit with a peer (or a reference computation) in one process,
its contenders interleaved round by round, and prints ratios of medians with min–max
(machines here are noisy: ratios, not absolute times). Each writes its page
(``bench_X.py`` → ``X.md``) into the output directory, with machine, load, date and commit;
docs/ is written only with ``--docs``. Not a test.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import summary  # benchmarks/summary.py (this folder is on sys.path when run as a script)

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "benchmarks"
# scripts that print without a page (bench_distributed needs several processes)
NO_PAGE = {"bench_distributed"}
# further pages of a script with other arguments: script → [(page, arguments)]
EXTRA = {"bench_singd": [("singd_cnn", ["--model", "cnn", "--structures", "diagonal",
                                        "--T", "1", "10"])]}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("words", nargs="*", help="run the scripts whose name contains a word")
    ap.add_argument("--out-dir", default="benchmark-results",
                    help="directory for the pages (default ./benchmark-results)")
    ap.add_argument("--docs", action="store_true",
                    help=f"write the pages into {DOCS.relative_to(HERE.parent)} instead")
    ap.add_argument("--repeats", type=int, default=0,
                    help="passed to every script (0: each script's default)")
    args = ap.parse_args(argv)
    out_dir = DOCS if args.docs else Path(args.out_dir)
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.words:
        scripts = [s for s in scripts if any(w in s.stem for w in args.words)]
    failed = []
    runs = []
    for script in scripts:
        if script.stem in NO_PAGE:
            runs.append((script, [sys.executable, str(script)]))
            continue
        pages = [(script.stem.removeprefix("bench_"), [])] + EXTRA.get(script.stem, [])
        for page, extra in pages:
            cmd = [sys.executable, str(script), *extra, "--out", str(out_dir / f"{page}.md")]
            runs.append((script, cmd + (["--repeats", str(args.repeats)] if args.repeats
                                        else [])))
    for script, cmd in runs:
        print(f"\n=== {' '.join(cmd[1:])} ===", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"--- {script.name}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            failed.append(script.name)
    # the summary reads every figure from the pages just written (and earlier ones)
    target = DOCS.parent / "benchmarks.md" if args.docs else out_dir / "index.md"
    for miss in summary.write(out_dir, target):
        print(f"summary: not found on the pages: {miss}")
    print(f"summary written to {target}")
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
