"""Collect results.json files into a table and the paper's plots.

    python -m eval.report RUN_DIRS_OR_RESULTS... --out DIR [--threshold 0.9] [--all-steps]

Each argument is a results.json file or a directory searched recursively for them (a run dir
holds one per evaluated checkpoint). Per run (`run_dir` of the document, else the folder of
the file) only the latest step is kept unless `--all-steps`. Writes:

- DIR/results.csv: one row per kept checkpoint: model, ffn kind, d, experts, total and
  active params, validation perplexity, each category mean, each task score, synthetic
  metrics, and the phone-book maximal size of the row's model.
- DIR/report.md: the same table (shortened), the phone-book maximal sizes, the plots, and a
  note for each plot skipped for lack of data.
- PNGs in the paper's form: per category, accuracy vs total and vs active params (log x),
  dense and MoE as separate series (MoE one series per expert count); accuracy vs
  validation perplexity per category; phone-book maximal size (largest book with accuracy
  >= threshold across runs of one model with different book sizes) vs total and active
  params (Fig. 4a); shortest-path valid and exact-match rates vs total and active params
  (Fig. 4b); memorization accuracy vs n (one line per model), the largest n memorized at
  >= threshold vs total and active params, and accuracy vs params at the largest n.
  Runs of one model and size (seeds of a grid, `slurm/grid.py`) are averaged.
- DIR/figures.csv: the numbers behind the synthetic-task figures, one row per plotted point
  (figure, series, model, total/active params, x, y, number of runs averaged).

Partial results never crash the report (a missing field leaves a cell empty and skips a
plot); no results at all or an unreadable file is a one-line error with a non-zero exit.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from eval.report_render import (
    csv_value,
    md_table,
    number,
    plot_vs_params,
    plot_vs_perplexity,
    write_figures_csv,
)
from eval.report_synthetic import (
    FIGURES,
    SECTIONS,
    SYNTHETIC_COLUMNS,
    add_phonebook_max_size,
    synthetic_values,
)
from mop.cli import ArgumentParser, examples
from mop.errors import DataError, UserError, check_dir_target, cli_entry
from mop.results import CATEGORIES, RESULTS_FILE, load_results

BASE_COLUMNS = (
    "run_dir",
    "step",
    "model",
    "ffn",
    "d_model",
    "n_layers",
    "num_experts",
    "top_k",
    "total_params",
    "active_params",
    "perplexity",
    *CATEGORIES,
)
# -- collecting -------------------------------------------------------------------------------


def find_results(paths: Sequence[str | Path], all_steps: bool = False) -> list[dict[str, Any]]:
    """Load every results.json under `paths`; keep the latest step per run unless all_steps.

    Returns the documents, each with `_path` (its file) added.
    """
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files += sorted(p.rglob(RESULTS_FILE))
        else:
            raise DataError(f"no such file or directory: {p}")
    docs = []
    for f in dict.fromkeys(f.resolve() for f in files):  # each file once, in order
        try:
            doc = load_results(f)
        except UserError:
            raise
        except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
            raise DataError(f"cannot read {f}: {exc}") from None
        if not isinstance(doc, dict):
            raise DataError(f"{f} does not hold a JSON object")
        doc["_path"] = str(f)
        docs.append(doc)
    if not docs:
        raise DataError(f"no {RESULTS_FILE} found under {', '.join(map(str, paths))}")
    if all_steps:
        return docs
    latest: dict[str, dict[str, Any]] = {}
    for doc in docs:
        key = str(doc.get("run_dir") or Path(doc["_path"]).parent)
        if key not in latest or _step(doc) >= _step(latest[key]):
            latest[key] = doc
    return list(latest.values())


def _step(doc: dict[str, Any]) -> int:
    step = doc.get("step")
    return step if isinstance(step, int) else -1


def flatten(doc: dict[str, Any]) -> dict[str, Any]:
    """One CSV row of a results document (missing values are None)."""
    m = doc.get("model") or {}
    row: dict[str, Any] = {
        "run_dir": doc.get("run_dir") or str(Path(doc.get("_path", "")).parent),
        "step": doc.get("step"),
        "model": m.get("name"),
        "ffn": m.get("ffn"),
        "d_model": m.get("d_model"),
        "n_layers": m.get("n_layers"),
        "num_experts": m.get("num_experts"),
        "top_k": m.get("top_k"),
        "total_params": number(m.get("total_params")),
        "active_params": number(m.get("active_params")),
        "perplexity": number((doc.get("ppl") or {}).get("perplexity")),
    }
    cats = doc.get("categories") or {}
    for cat in CATEGORIES:
        row[cat] = number(cats.get(cat))
    for name, task in (doc.get("tasks") or {}).items():
        row[f"task_{name}"] = number(task.get("score")) if isinstance(task, dict) else None
    row.update(synthetic_values(doc.get("synthetic") or {}, row["total_params"]))
    return row


def build_rows(docs: Sequence[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """Rows of all documents, each with the phone-book maximal size of its model."""
    rows = [flatten(doc) for doc in docs]
    add_phonebook_max_size(rows, threshold)
    rows.sort(
        key=lambda r: (
            str(r["ffn"]),
            r["num_experts"] or 0,
            r["d_model"] or 0,
            r["phonebook_book_size"] or 0,
            str(r["model"]),
            r["step"] if isinstance(r["step"], int) else -1,
        )
    )
    return rows


def columns_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    tasks = sorted({k for r in rows for k in r if k.startswith("task_")})
    return [*BASE_COLUMNS, *tasks, *SYNTHETIC_COLUMNS]


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    cols = columns_of(rows)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: csv_value(r.get(c)) for c in cols})


# -- plots ----------------------------------------------------------------------------------


def make_plots(rows: Sequence[dict], out: Path, threshold: float) -> tuple[list[str], list[str]]:
    """Write every plot the data allows and figures.csv; returns (PNG names, skip notes)."""
    import matplotlib

    matplotlib.use("Agg")
    written: list[str] = []
    notes: list[str] = []
    record: list[dict] = []  # every point of the synthetic-task figures -> figures.csv

    def attempt(name: str, ok: bool, why: str) -> None:
        (written.append(name) if ok else notes.append(f"`{name}` skipped: {why}"))

    for cat in CATEGORIES:
        name = f"{cat}_vs_params.png"
        ok = plot_vs_params(
            rows, cat, f"{cat} accuracy", f"{cat}: accuracy vs parameters", out / name
        )
        attempt(name, ok, f"no run has both parameter counts and a {cat} score")
    name = "accuracy_vs_perplexity.png"
    attempt(
        name,
        plot_vs_perplexity(rows, CATEGORIES, out / name),
        "no run has both a validation perplexity and a category score",
    )
    for figures in FIGURES:
        for name, ok, why in figures(rows, out, threshold, record):
            attempt(name, ok, why)
    write_figures_csv(record, out / "figures.csv")
    return written, notes


# -- markdown ---------------------------------------------------------------------------------


def write_markdown(
    rows: Sequence[dict],
    plots: Sequence[str],
    notes: Sequence[str],
    threshold: float,
    path: Path,
) -> None:
    cols = [
        c for c in columns_of(rows) if c != "run_dir" and any(r.get(c) is not None for r in rows)
    ]
    lines = [
        "# Mixture of Parrots: results",
        "",
        f"{len(rows)} checkpoint(s). Full table: `results.csv`; the points of the synthetic-task "
        "figures: `figures.csv`. Categories are unweighted means of their tasks' primary scores.",
        "",
        *md_table(rows, cols),
    ]
    for section in SECTIONS:
        lines += section(rows, threshold)
    lines += ["", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots] or ["No plot could be drawn."]
    if notes:
        lines += ["", "## Skipped", ""]
        lines += [f"- {n}" for n in notes]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- CLI --------------------------------------------------------------------------------------


def make_report(
    paths: Sequence[str | Path], out: str | Path, threshold: float = 0.9, all_steps: bool = False
) -> dict[str, Any]:
    """Collect, write CSV, plots and report.md under `out`; returns a summary."""
    docs = find_results(paths, all_steps=all_steps)
    rows = build_rows(docs, threshold)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    plots, notes = make_plots(rows, out, threshold)
    write_markdown(rows, plots, notes, threshold, out / "report.md")
    return {"rows": len(rows), "plots": plots, "notes": notes, "out": str(out)}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m eval.report",
        description=__doc__.split("\n")[0],
        epilog=examples(
            "python -m eval.report runs/ --out report/",
            "python -m eval.report runs/pb_1e5 runs/pb_3e5 --out report/pb --threshold 0.9",
            "python -m eval.report runs/moe_d512_e8/results.json --out /tmp/r --all-steps",
            notes="Writes report.md, results.csv and PNG plots into --out.",
        ),
    )
    p.add_argument("paths", nargs="+", help="results.json files or run/checkpoint directories")
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--threshold", type=float, default=0.9, help="phone-book accuracy threshold")
    p.add_argument("--all-steps", action="store_true", help="every checkpoint, not the latest")
    args = p.parse_args(argv)
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {args.threshold}")
    check_dir_target(args.out, "--out")
    summary = make_report(args.paths, args.out, args.threshold, args.all_steps)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
