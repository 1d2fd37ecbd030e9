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
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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
SYNTHETIC_COLUMNS = (
    "phonebook_book_size",
    "phonebook_accuracy",
    "phonebook_digit_accuracy",
    "phonebook_answer_loss",
    "phonebook_max_size",
    "shortest_path_exact_match",
    "shortest_path_valid",
    "memorization_accuracy",
    "memorization_n",
)
SYNTHETIC_FIELDS = {  # column -> (section, key) in the `synthetic` part of results.json
    "phonebook_book_size": ("phonebook", "book_size"),
    "phonebook_accuracy": ("phonebook", "accuracy"),
    "phonebook_digit_accuracy": ("phonebook", "digit_accuracy"),  # partial recall
    "phonebook_answer_loss": ("phonebook", "answer_loss"),
    "shortest_path_exact_match": ("shortest_path", "exact_match"),
    "shortest_path_valid": ("shortest_path", "valid_shortest_path"),
    "memorization_accuracy": ("memorization", "accuracy"),
    "memorization_n": ("memorization", "n"),
}
PARAM_AXES = (("total_params", "total parameters"), ("active_params", "active parameters"))


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


def _num(value: Any) -> float | None:
    """A finite number or None (missing, null, text, NaN all become None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


MODEL_KEY_FIELDS = ("ffn", "d_model", "n_layers", "num_experts", "top_k", "total_params")


def model_key(doc: dict[str, Any]) -> tuple:
    """What identifies 'the same model' across a phone-book sweep of book sizes.

    The architecture, not the name: names default to run directory names, which differ per
    book size in a sweep. total_params catches other differences (FFN width, vocab).
    """
    m = doc.get("model") or {}
    key = tuple(m.get(k) for k in MODEL_KEY_FIELDS)
    return key if any(v is not None for v in key) else ("name", m.get("name"))


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
        "total_params": _num(m.get("total_params")),
        "active_params": _num(m.get("active_params")),
        "perplexity": _num((doc.get("ppl") or {}).get("perplexity")),
    }
    cats = doc.get("categories") or {}
    for cat in CATEGORIES:
        row[cat] = _num(cats.get(cat))
    for name, task in (doc.get("tasks") or {}).items():
        row[f"task_{name}"] = _num(task.get("score")) if isinstance(task, dict) else None
    synth = doc.get("synthetic") or {}
    for col, (section, key) in SYNTHETIC_FIELDS.items():
        row[col] = _num((synth.get(section) or {}).get(key))
    if row["memorization_n"] is not None:  # a count: 64, not 64.0, in the CSV and the axes
        row["memorization_n"] = int(row["memorization_n"])
    return row


def build_rows(docs: Sequence[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """Rows of all documents, each with the phone-book maximal size of its model."""
    by_model: dict[tuple, list[dict]] = defaultdict(list)
    for doc in docs:
        by_model[model_key(doc)].append(doc)
    rows = []
    for doc in docs:
        row = flatten(doc)
        group = by_model[model_key(doc)]
        has_pb = any((d.get("synthetic") or {}).get("phonebook") for d in group)
        if has_pb:
            from eval.synthetic import max_book_size_at  # imports torch: only when needed

        row["phonebook_max_size"] = max_book_size_at(group, threshold) if has_pb else None
        rows.append(row)
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
            writer.writerow({c: _csv_value(r.get(c)) for c in cols})


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:
        return int(v)  # parameter counts and book sizes read better without ".0"
    return v


# -- plotting ---------------------------------------------------------------------------------


def series_name(row: dict[str, Any]) -> str:
    """Dense is one series; routed MoE one series per expert count (as the paper's figures)."""
    ffn = row.get("ffn") or "unknown"
    if ffn == "dense":
        return "dense"
    label = {"moe": "MoE", "soft_moe": "Soft MoE", "peer": "PEER"}.get(ffn, str(ffn))
    e = row.get("num_experts")
    return f"{label} ({e} experts)" if e else label


def _points(rows: Iterable[dict], x: str, y: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r.get(x) is not None and r.get(y) is not None:
            out[series_name(r)].append((r[x], r[y]))
    return out


def _series_sort_key(name: str) -> tuple:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (name != "dense", name.split(" (")[0], int(digits) if digits else 0)


def _draw(ax, series: dict[str, list[tuple[float, float]]], logx: bool, logy: bool = False):
    for i, name in enumerate(sorted(series, key=_series_sort_key)):
        pts = sorted(series[name])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if name == "dense":
            style = {"color": "black", "marker": "s", "linestyle": "-"}
        elif name.startswith("dense"):  # one series per dense model (memorization vs n)
            style = {"color": f"C{i % 10}", "marker": "s", "linestyle": "-"}
        else:
            style = {"color": f"C{i % 10}", "marker": "o", "linestyle": "--"}
        ax.plot(xs, ys, label=name, **style)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from pretrain.model_info import human

    # Log axes labelled 140K / 1.2M at 1-2-5 steps: matplotlib's default minor labels
    # (1.4x10^5, ...) overlap when the data spans less than a decade.
    for on, axis, scale in ((logx, ax.xaxis, ax.set_xscale), (logy, ax.yaxis, ax.set_yscale)):
        if on:
            scale("log")
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda v, _: human(int(round(v)))))
            axis.set_minor_formatter(NullFormatter())
    if logx:  # within one decade matplotlib falls back to dense linear ticks
        ax.tick_params(axis="x", labelrotation=30)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot_vs_params(
    rows: Sequence[dict],
    y: str,
    ylabel: str,
    title: str,
    path: Path,
    logy: bool = False,
    record: list[dict] | None = None,
) -> bool:
    """Two panels: `y` vs total params and vs active params. False if nothing to plot.

    `record` (if given) receives one dict per plotted point, for figures.csv.
    """
    panels = [(_points(rows, x, y), label) for x, label in PARAM_AXES]
    if not any(pts for pts, _ in panels):
        return False
    if record is not None:
        for r in rows:
            for x, _ in PARAM_AXES:
                if r.get(x) is not None and r.get(y) is not None:
                    record.append(_point(path.name, series_name(r), r, x, r[x], y, r[y]))
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (pts, label) in zip(axes, panels):
        if pts:
            _draw(ax, pts, logx=True, logy=logy)
        ax.set_xlabel(label)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_vs_perplexity(rows: Sequence[dict], cats: Sequence[str], path: Path) -> bool:
    """One panel per category: accuracy vs validation perplexity (dense and MoE series)."""
    panels = [(cat, _points(rows, "perplexity", cat)) for cat in cats]
    panels = [(c, p) for c, p in panels if p]
    if not panels:
        return False
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (cat, pts) in zip(axes[0], panels):
        _draw(ax, pts, logx=False)
        ax.set_xlabel("validation perplexity")
        ax.set_ylabel(f"{cat} accuracy")
        ax.set_title(cat)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def phonebook_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per model (the sweep's maximal book size), for the maximal-size plot."""
    seen: dict[tuple, dict] = {}
    for r in rows:
        if r.get("phonebook_max_size") is None:
            continue
        seen.setdefault(tuple(r.get(k) for k in MODEL_KEY_FIELDS), r)
    return list(seen.values())


# -- the synthetic grids: seeds averaged, one point per model ---------------------------------

FIGURE_COLUMNS = (
    "figure",
    "series",
    "model",
    "total_params",
    "active_params",
    "x_name",
    "x",
    "y_name",
    "y",
    "runs",
)


def _point(fig: str, series: str, row: dict, x_name: str, x: Any, y_name: str, y: Any) -> dict:
    """One row of figures.csv: a plotted point and the model it belongs to."""
    return {
        "figure": fig,
        "series": series,
        "model": row.get("model"),
        "total_params": row.get("total_params"),
        "active_params": row.get("active_params"),
        "x_name": x_name,
        "x": x,
        "y_name": y_name,
        "y": y,
        "runs": row.get("runs", 1),
    }


def _row_model(row: dict) -> tuple:
    return tuple(row.get(k) for k in MODEL_KEY_FIELDS)


def seed_means(rows: Sequence[dict], y: str, by: str | None = None) -> list[dict]:
    """Rows with `y` averaged over the runs of one model (and one value of `by`, e.g. the size n).

    A grid repeats each (model, size) over seeds; a figure shows their mean. Each returned row
    is the first run's row with `y` replaced by the mean and `runs` set to the count.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get(y) is not None and (by is None or r.get(by) is not None):
            groups[(_row_model(r), r.get(by) if by else None)].append(r)
    out = []
    for members in groups.values():
        row = dict(members[0])
        row[y] = sum(m[y] for m in members) / len(members)
        row["runs"] = len(members)
        out.append(row)
    return out


def model_label(row: dict) -> str:
    """`dense_f32 (1.3K total / 1.3K active)`: a model's series name when each model is a line."""
    from pretrain.model_info import human

    name = row.get("model") or series_name(row)
    total, active = row.get("total_params"), row.get("active_params")
    if total is None or active is None:
        return str(name)
    prefix = "" if str(name).startswith(row.get("ffn") or "-") else f"{row.get('ffn')} "
    return f"{prefix}{name} ({human(int(total))} total / {human(int(active))} active)"


def memorization_max_rows(rows: Sequence[dict], threshold: float) -> list[dict]:
    """One row per model with `memorization_max_n`: the largest n whose (seed-mean) accuracy is
    >= threshold; models that reach it at no n are left out (as for the phone-book)."""
    best: dict[tuple, dict] = {}
    for r in seed_means(rows, "memorization_accuracy", by="memorization_n"):
        if r["memorization_accuracy"] < threshold:
            continue
        key = _row_model(r)
        if key not in best or r["memorization_n"] > best[key]["memorization_max_n"]:
            best[key] = {**r, "memorization_max_n": r["memorization_n"]}
    return list(best.values())


def plot_memorization_vs_n(rows: Sequence[dict], path: Path, record: list[dict]) -> bool:
    """Accuracy vs n (log x), one line per model (dense solid, MoE dashed), seeds averaged."""
    means = seed_means(rows, "memorization_accuracy", by="memorization_n")
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in means:
        label = model_label(r)
        series[label].append((r["memorization_n"], r["memorization_accuracy"]))
        record.append(
            _point(
                path.name,
                label,
                r,
                "memorization_n",
                r["memorization_n"],
                "memorization_accuracy",
                r["memorization_accuracy"],
            )
        )
    if not series:
        return False
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    _draw(ax, series, logx=True)
    ax.set_xlabel("number of sequences n")
    ax.set_ylabel("train accuracy (memorized fraction)")
    ax.set_title("memorization: accuracy vs n")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def at_largest(rows: Sequence[dict], y: str, n_col: str | None) -> tuple[list[dict], Any]:
    """Seed means of `y` per model at the largest `n_col` value present (all rows if None)."""
    if n_col is None:
        return seed_means(rows, y), None
    sizes = [r[n_col] for r in rows if r.get(n_col) is not None and r.get(y) is not None]
    if not sizes:
        return [], None
    n = max(sizes)
    return seed_means([r for r in rows if r.get(n_col) == n], y), n


def make_plots(rows: Sequence[dict], out: Path, threshold: float) -> tuple[list[str], list[str]]:
    """Write every plot the data allows and figures.csv; returns (PNG names, skip notes)."""
    import matplotlib

    matplotlib.use("Agg")
    written: list[str] = []
    notes: list[str] = []
    record: list[dict] = []  # every point of the synthetic-task figures -> figures.csv

    def attempt(ok: bool, name: str, why: str) -> None:
        (written.append(name) if ok else notes.append(f"`{name}` skipped: {why}"))

    for cat in CATEGORIES:
        name = f"{cat}_vs_params.png"
        ok = plot_vs_params(
            rows, cat, f"{cat} accuracy", f"{cat}: accuracy vs parameters", out / name
        )
        attempt(ok, name, f"no run has both parameter counts and a {cat} score")
    name = "accuracy_vs_perplexity.png"
    attempt(
        plot_vs_perplexity(rows, CATEGORIES, out / name),
        name,
        "no run has both a validation perplexity and a category score",
    )
    name = "phonebook_max_size.png"
    pb_models = phonebook_rows(rows)
    attempt(
        plot_vs_params(
            pb_models,
            "phonebook_max_size",
            f"largest book with accuracy >= {threshold:g}",
            "phone-book: maximal book size",
            out / name,
            logy=True,
            record=record,
        ),
        name,
        f"no model reaches phone-book accuracy >= {threshold:g} at any book size "
        "(or no phone-book results)",
    )
    # Fig. 4b: shortest-path accuracy (any valid shortest path, and the exact reference path)
    # per model, mean over the seeds of the grid.
    for col, ylabel in (
        ("shortest_path_valid", "valid shortest-path rate"),
        ("shortest_path_exact_match", "exact-match rate"),
    ):
        name = f"{col}.png"
        attempt(
            plot_vs_params(
                seed_means(rows, col),
                col,
                ylabel,
                "shortest path on held-out graphs vs parameters",
                out / name,
                record=record,
            ),
            name,
            "no shortest path results with parameter counts",
        )
    name = "memorization_vs_n.png"
    attempt(
        plot_memorization_vs_n(rows, out / name, record),
        name,
        "no memorization results with their n",
    )
    name = "memorization_max_n.png"
    attempt(
        plot_vs_params(
            memorization_max_rows(rows, threshold),
            "memorization_max_n",
            f"largest n with accuracy >= {threshold:g}",
            "memorization: maximal n memorized",
            out / name,
            logy=True,
            record=record,
        ),
        name,
        f"no model reaches memorization accuracy >= {threshold:g} at any n "
        "(or no memorization results with their n)",
    )
    mem_rows, mem_n = at_largest(
        rows,
        "memorization_accuracy",
        "memorization_n" if any(r.get("memorization_n") is not None for r in rows) else None,
    )
    name = "memorization_accuracy.png"
    attempt(
        plot_vs_params(
            mem_rows,
            "memorization_accuracy",
            "train accuracy",
            "memorization vs parameters" + (f" (n={mem_n:,.0f})" if mem_n else ""),
            out / name,
            record=record,
        ),
        name,
        "no memorization results with parameter counts",
    )
    write_figures_csv(record, out / "figures.csv")
    return written, notes


def write_figures_csv(points: Sequence[dict], path: Path) -> None:
    """The numbers behind the synthetic-task figures, one row per plotted point."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIGURE_COLUMNS)
        writer.writeheader()
        for p in points:
            writer.writerow({c: _csv_value(p.get(c)) for c in FIGURE_COLUMNS})


# -- markdown ---------------------------------------------------------------------------------


def _fmt(v: Any, col: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:
        v = int(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and col.endswith("_params"):
        from pretrain.model_info import human

        return human(v)
    if isinstance(v, int):
        return f"{v:,}"  # steps and book sizes: exact, with thousands separators
    return str(v)


def _md_table(rows: Sequence[dict], cols: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c), c) for c in cols) + " |" for r in rows]
    return lines


def _phonebook_md(rows: Sequence[dict]) -> list[str]:
    """Per run: exact recall beside the partial measures (digits right, loss on the answer)."""
    pb = [r for r in rows if r.get("phonebook_accuracy") is not None]
    if not any(r.get("phonebook_digit_accuracy") is not None for r in pb):
        return []
    cols = ["model", "ffn", "num_experts", "total_params", "active_params"]
    cols += ["phonebook_book_size", "step", "phonebook_accuracy", "phonebook_digit_accuracy"]
    cols.append("phonebook_answer_loss")
    return [
        "",
        "Phone-book recall per run (exact, per digit, loss on the answer):",
        "",
    ] + _md_table(pb, cols)


def _memorization_md(rows: Sequence[dict], threshold: float) -> list[str]:
    """Accuracy per model (rows) and n (columns), seeds averaged, plus the maximal n."""
    means = seed_means(rows, "memorization_accuracy", by="memorization_n")
    if not means:
        return []
    sizes = sorted({r["memorization_n"] for r in means})
    by_model: dict[tuple, dict] = {}
    for r in means:
        by_model.setdefault(_row_model(r), {**r, "acc": {}})["acc"][r["memorization_n"]] = r
    best = {_row_model(r): r["memorization_max_n"] for r in memorization_max_rows(rows, threshold)}
    head = ["model", "ffn", "num_experts", "total_params", "active_params"]
    cols = [*head, *(f"n={n:,.0f}" for n in sizes), f"max n (>= {threshold:g})"]
    lines = ["", "## Memorization", "", "Train accuracy (mean over seeds) per model and n:", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    order = sorted(by_model.items(), key=lambda kv: (kv[1].get("active_params") or 0, str(kv[0])))
    for key, r in order:
        cells = [_fmt(r.get(c), c) for c in head]
        cells += [
            f"{r['acc'][n]['memorization_accuracy']:.3f}" if n in r["acc"] else "-" for n in sizes
        ]
        cells.append(_fmt(best.get(key), "n"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _shortest_path_md(rows: Sequence[dict]) -> list[str]:
    """Shortest-path accuracy per model, seeds averaged."""
    valid = {_row_model(r): r for r in seed_means(rows, "shortest_path_valid")}
    if not valid:
        return []
    exact = {_row_model(r): r for r in seed_means(rows, "shortest_path_exact_match")}
    cols = ["model", "ffn", "num_experts", "total_params", "active_params"]
    lines = ["", "## Shortest path", "", "Held-out graphs, mean over seeds:", ""]
    lines += ["| " + " | ".join([*cols, "valid shortest path", "exact match", "runs"]) + " |"]
    lines.append("|" + "---|" * (len(cols) + 3))
    for key, r in sorted(valid.items(), key=lambda kv: kv[1].get("active_params") or 0):
        em = exact.get(key, {}).get("shortest_path_exact_match")
        cells = [_fmt(r.get(c), c) for c in cols]
        cells += [f"{r['shortest_path_valid']:.3f}", "-" if em is None else f"{em:.3f}"]
        cells.append(str(r["runs"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


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
        *_md_table(rows, cols),
        "",
        "## Phone-book maximal size",
        "",
    ]
    pb = phonebook_rows(rows)
    if pb:
        lines.append(f"Largest book size with accuracy >= {threshold:g}, per model:")
        lines.append("")
        lines += _md_table(
            pb,
            ["model", "ffn", "num_experts", "total_params", "active_params", "phonebook_max_size"],
        )
    else:
        lines.append(f"No model reaches accuracy >= {threshold:g} (or no phone-book results).")
    lines += _phonebook_md(rows)
    lines += _memorization_md(rows, threshold)
    lines += _shortest_path_md(rows)
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
