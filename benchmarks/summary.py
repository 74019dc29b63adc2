"""The summary table of docs/benchmarks.md, taken from the generated pages of one run.

    python benchmarks/summary.py docs/benchmarks            # rewrite docs/benchmarks.md
    python benchmarks/summary.py benchmark-results          # write benchmark-results/index.md

``run_all.py`` calls this after its scripts ran. Every figure of the summary is read from
a table of a generated page (``ROWS`` says which page, which row and which column), so the
summary cannot drift from the pages, and a run states its own dates, commits and load.
The text of docs/benchmarks.md outside the ``<!-- summary:start -->`` …
``<!-- summary:end -->`` block (what the figures mean, where targets are missed) is kept.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

START, END = "<!-- summary:start -->", "<!-- summary:end -->"


@dataclass
class Cell:
    """One figure: the rows of ``page`` whose cells match ``where`` (exact, or a prefix
    when the value ends in ``*``), the text under ``column`` (several columns: joined as
    ``a (b)``); ``label`` names each figure (a fixed text, or ``{column}`` from the row)."""

    where: dict[str, str]
    column: str | tuple[str, ...]
    label: str = ""
    pattern: str = ""  # instead of a table cell: group 1 of this regex in the page's text


@dataclass
class Row:
    comparison: str
    target: str
    page: str
    cells: list[Cell] = field(default_factory=list)


def _ratio(model: str, **where: str) -> Cell:
    return Cell({"model": model, **where}, "ratio")


MLP, CNN = "MLP*", "CNN*"
ROWS = [
    Row("identity + `direct` step / `torch.optim.SGD` step (same parameters, bitwise)",
        "≤ 1.02×", "step",
        [Cell({"model": m, "comparison": "identity + direct vs SGD"}, "ratio", n)
         for m, n in ((MLP, "MLP"), (CNN, "CNN"))]),
    Row("… with momentum 0.9", "≤ 1.02×", "step",
        [Cell({"model": m, "comparison": "identity + direct vs SGD (momentum 0.9)"}, "ratio",
              n) for m, n in ((MLP, "MLP"), (CNN, "CNN"))]),
    Row("Hessian-free step (ggn, 10 CG products) / (10 products + 2 gradients)", "≤ 1.2×",
        "step", [Cell({"model": m, "comparison": "ggn Hessian-free step, 10 CG products"},
                      "ratio", n) for m, n in ((MLP, "MLP"), (CNN, "CNN"))]),
    Row("peak RSS after N steps / after 3 steps, largest over every composition", "≤ 1.10×",
        "memory", [Cell({}, ("largest ratio", "composition"), "of {compositions}:")]),
    Row("`lie_group` extra peak memory / singd's (MLP width 2048, T = 1)", "≤ 1.0×",
        "singd_memory", [Cell({"structure": st, "allocator": "default"}, "ratio", st)
                         for st in ("dense", "diagonal")]),
    *[Row(f"`{est}` {what} / curvlinops `{op}`", "≤ 1.0×", "estimators",
          [Cell({"model": m, "quantity": q}, "curvkit / peer", n)
           for m, n in ((MLP, "MLP"), (CNN, "CNN"))])
      for est, op in (("hessian", "HessianLinearOperator"), ("ggn", "GGNLinearOperator"))
      for what, q in (("matvec", f"{est} matvec"),
                      ("product via `linearize` (k-th on one batch)",
                       f"{est} matvec, k-th product on one batch (linearize)"))],
    *[Row(f"`{est}` {what} / one gradient", "≤ 2×" if est == "hessian" else "—",
          "estimators", [Cell({"model": m, "quantity": q}, "curvkit / gradient", n)
                         for m, n in ((MLP, "MLP"), (CNN, "CNN"))])
      for est in ("hessian", "ggn")
      for what, q in (("matvec from scratch", f"{est} matvec"),
                      ("product via `linearize`",
                       f"{est} matvec, k-th product on one batch (linearize)"))],
    Row("`hessian.summary` / Wolinski's reference loop", "≤ 0.5×", "estimators",
        [Cell({"model": m, "quantity": "hessian summary*"}, "curvkit / peer", n)
         for m, n in ((MLP, "MLP"), (CNN, "CNN"))]),
    *[Row(f"{ours} / {peer}", "≤ 1.0×", "extraction",
          [Cell({"model": m, "curvkit": cv, "peer": pv}, "ratio", n)
           for m, n in ((MLP, "MLP"), (CNN, "CNN"))])
      for ours, peer, cv, pv in (
          ("`ggn.diagonal`", "BackPACK `DiagGGNExact`", "diag GGN exact",
           "BackPACK DiagGGNExact"),
          ("`fisher.diagonal`", "BackPACK `DiagGGNMC`", "diag fisher (MC, 1 sample)",
           "BackPACK DiagGGNMC"),
          ("`ef.diagonal`", "BackPACK `SumGradSquared`", "diag ef", "BackPACK SumGradSquared"),
          ("`ggn.kronecker`", "BackPACK `KFLR`", "kronecker ggn (KFLR)", "BackPACK KFLR"),
          ("`ggn.kronecker`", "curvlinops `KFACLinearOperator` (type-2)",
           "kronecker ggn (KFLR)", "curvlinops KFAC type-2"),
          ("`fisher.kronecker`", "BackPACK `KFAC`", "kronecker fisher (KFAC, 1 sample)",
           "BackPACK KFAC"),
          ("`fisher.kronecker`", "curvlinops `KFACLinearOperator` (mc)",
           "kronecker fisher (KFAC, 1 sample)", "curvlinops KFAC mc"),
          ("`ef.kronecker`", "curvlinops `KFACLinearOperator` (empirical)",
           "kronecker ef (empirical)", "curvlinops KFAC empirical"))],
    Row("fisher + `kronecker` step / SGD step", "—", "preconditioners",
        [Cell({"model": m, "optimizer": f"kronecker (fisher), T={t}"}, "ratio", f"{n}, T = {t}")
         for m, n in (("MLP 64-128-128-10*", "MLP"), ("CNN 2×conv3(8)*", "CNN"))
         for t in (1, 10)]),
    Row("fisher + `kronecker` + `direct` step / the same step on curvlinops "
        "`KFACLinearOperator`", "≤ 1.0×", "kfac",
        [Cell({"model": m, "step": f"fisher + kronecker + direct, update every {t}"}, "ratio",
              f"{n}, T = {t}") for m, n in ((MLP, "MLP"), (CNN, "CNN")) for t in (1, 10)]),
    *[Row(f"`{est}.kronecker` on the zoo LM and the CNN / {peer} {kind}", "≤ 1.0×", "kfac",
          [Cell({"model": m, "curvkit": f"{est}.kronecker*"}, col, n)
           for m, n in (("TinyLM*", "LM"), (CNN, "CNN"))])
      for est, kind in (("fisher", "KFAC"), ("ggn", "KFLR"))
      for peer, col in (("curvlinops", "/ curvlinops"), ("BackPACK", "/ BackPACK"))],
    Row("`kronecker(approx=\"reduce\")` on the CNN / curvlinops `kfac_approx=\"reduce\"`",
        "≤ 1.0×", "kfac",
        [Cell({"model": CNN, "curvkit": what}, "/ curvlinops", n)
         for what, n in (("fisher.kronecker (KFAC, 1 sample, reduce)", "KFAC"),
                         ("ggn.kronecker (KFLR, reduce)", "KFLR"))]),
    Row("hessian + `partition` + cubic step / SGD step", "—", "partition",
        [Cell({"model": m, "optimizer": f"hessian + partition + cubic, T={t}"}, "ratio",
              f"{n}, T = {t}") for m, n in ((MLP, "MLP"), (CNN, "CNN")) for t in (1, 10)]),
    *[Row(f"`lie_group` step / singd `SINGD` step, T = {t}", "≤ 1.0×", "singd",
          [Cell({"structures (K, C)": f"{s}, {s}", "T": str(t)}, "ratio (min–max)", s)
           for s in ("dense", "block_diagonal", "diagonal", "hierarchical")])
      for t in (10, 1)],
    Row("`lie_group` diagonal step / singd `SINGD` step on the CNN", "≤ 1.0×", "singd_cnn",
        [Cell({"structures (K, C)": "diagonal, diagonal", "T": str(t)}, "ratio (min–max)",
              f"T = {t}") for t in (1, 10)]),
    Row("`spectral.top_eigenvalues(k=1)` of the Hessian / scipy `eigsh` on curvlinops "
        "`HessianLinearOperator`", "≤ 1.0×", "spectral",
        [Cell({"model": m}, ("ratio (median)", "min–max"), n)
         for m, n in ((MLP, "MLP"), (CNN, "CNN"))]),
    Row("zoo language model: product / one gradient", "—", "zoo",
        [Cell({"product": p}, ("gradients", "min–max"), n) for p, n in (
            ("curvkit hessian matvec", "hessian"), ("curvkit ggn matvec", "ggn"),
            ("curvkit hessian linearize product", "hessian via linearize"),
            ("curvkit ggn linearize product", "ggn via linearize"),
            ("curvlinops Hessian @ v (math kernel)", "curvlinops Hessian"),
            ("curvlinops GGN @ v (math kernel)", "curvlinops GGN"))]),
]


def tables(text: str) -> list[list[dict[str, str]]]:
    """The markdown tables of a page, each a list of rows keyed by the header's cells."""
    out: list[list[dict[str, str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and \
                re.fullmatch(r"\|[\s:|-]+\|", lines[i + 1].strip()):
            head = _cells(lines[i])
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(dict(zip(head, _cells(lines[i]))))
                i += 1
            out.append(rows)
        else:
            i += 1
    return out


def _cells(line: str) -> list[str]:
    return [c.strip().replace("**", "") for c in
            re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def _match(row: dict[str, str], where: dict[str, str]) -> bool:
    for key, want in where.items():
        have = row.get(key)
        if have is None:
            return False
        if want.endswith("*") and not have.startswith(want[:-1]):
            return False
        if not want.endswith("*") and have != want:
            return False
    return True


def figures(cell: Cell, page_tables: list[list[dict[str, str]]], text: str = "") -> list[str]:
    if cell.pattern:
        m = re.search(cell.pattern, text)
        return [f"{cell.label} {m.group(1)}".strip()] if m else []
    cols = (cell.column,) if isinstance(cell.column, str) else cell.column
    out = []
    for rows in page_tables:
        for row in rows:
            if not all(c in row for c in cols) or not _match(row, cell.where):
                continue
            values = [row[c] for c in cols]
            value = values[0] + (f" ({values[1]})" if len(values) > 1 else "")
            label = re.sub(r"\{([^}]+)\}", lambda m, r=row: r.get(m.group(1), m.group(0)),
                           cell.label)
            out.append(f"{label} {value}".strip())
        if out:
            return out[:1] if cell.where else out
    return []


def page_meta(text: str) -> dict[str, str]:
    meta = {}
    for line in text.splitlines():
        m = re.match(r"- (date|load at the start): (.*)", line)
        if m:
            meta[m.group(1)] = m.group(2)
    m = re.search(r"on (\d{4}-\d\d-\d\d \d\d:\d\d UTC), (commit \S+), load at the start "
                  r"(.*?) \(do not edit", text)
    if not meta and m:  # a page that states them in one sentence (bench_singd)
        meta = {"date": f"{m.group(1)}, {m.group(2)}", "load at the start": m.group(3)}
    return meta


def build(pages_dir: Path, link: str = "") -> tuple[str, list[str]]:
    """The summary block (markdown) and the figures no page had; ``link`` prefixes the
    pages' links (``benchmarks/`` from docs/benchmarks.md)."""
    missing: list[str] = []
    lines = ["| comparison | target | result: median (min–max over the rounds) | page |",
             "|---|---|---|---|"]
    for row in ROWS:
        path = pages_dir / f"{row.page}.md"
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        found = tables(text)
        parts = []
        for cell in row.cells:
            got = figures(cell, found, text)
            if not got:
                missing.append(f"{row.page}: {cell.label or row.comparison} ({cell.where})")
                got = [f"{cell.label} — (not on the page)".strip()]
            parts += got
        lines.append(f"| {row.comparison} | {row.target} | {'; '.join(parts)} | "
                     f"[{row.page}]({link}{row.page}.md) |")
    runs = ["", "Where each page's figures come from (every page states its own method):", ""]
    for path in sorted(pages_dir.glob("*.md")):
        meta = page_meta(path.read_text(encoding="utf-8"))
        if meta:
            runs.append(f"- [{path.stem}]({link}{path.name}): {meta.get('date', '?')}; "
                        f"load {meta.get('load at the start', '?')}")
    return "\n".join(lines + runs), missing


def write(pages_dir: Path, target: Path) -> list[str]:
    """Put the summary between the markers of ``target`` (created if absent)."""
    link = "" if target.parent.resolve() == pages_dir.resolve() else f"{pages_dir.name}/"
    block, missing = build(pages_dir, link)
    old = target.read_text(encoding="utf-8") if target.exists() else \
        f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in old or END not in old:
        old = old.rstrip() + f"\n\n{START}\n{END}\n"
    head, rest = old.split(START, 1)
    target.write_text(f"{head}{START}\n{block}\n{END}{rest.split(END, 1)[1]}",
                      encoding="utf-8")
    return missing


def main(argv: list[str]) -> int:
    pages = Path(argv[0]) if argv else Path("benchmark-results")
    target = pages.parent / "benchmarks.md" if pages.name == "benchmarks" else \
        pages / "index.md"
    missing = write(pages, target)
    print(f"summary written to {target}")
    for m in missing:
        print(f"not found: {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
