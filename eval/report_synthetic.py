"""The synthetic-task part of `python -m eval.report`: columns, figures and report sections.

One registry per concern, so that a new task adds one entry to each and touches nothing else:

- `SYNTHETIC_FIELDS`: results.csv column -> (section, key) of results.json's `synthetic` part;
- `FIGURES`: functions (rows, out, threshold, record) -> [(png name, drawn?, why not)], each
  drawing a task's figures and appending every plotted point to `record` (figures.csv);
- `SECTIONS`: functions (rows, threshold) -> markdown lines of report.md.

Runs of one model and size (the seeds of a grid, `slurm/grid.py`) are averaged (`seed_means`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eval.report_render import (
    MODEL_KEY_FIELDS,
    draw,
    figure_point,
    fmt,
    md_table,
    model_key,
    plot_vs_params,
    row_model,
    series_name,
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
INTEGER_FIELDS = ("memorization_n",)  # counts: 64, not 64.0, in the CSV and on the axes
# Columns of results.csv: the fields, plus the phone-book maximal size of the row's model.
SYNTHETIC_COLUMNS = (
    *list(SYNTHETIC_FIELDS)[:4],
    "phonebook_max_size",
    *list(SYNTHETIC_FIELDS)[4:],
)

Attempt = tuple[str, bool, str]  # (png name, drawn, why it was skipped)


# -- averaging over seeds -------------------------------------------------------------------


def seed_means(rows: Sequence[dict], y: str, by: str | None = None) -> list[dict]:
    """Rows with `y` averaged over the runs of one model (and one value of `by`, e.g. the size n).

    A grid repeats each (model, size) over seeds; a figure shows their mean. Each returned row
    is the first run's row with `y` replaced by the mean and `runs` set to the count.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get(y) is not None and (by is None or r.get(by) is not None):
            groups[(row_model(r), r.get(by) if by else None)].append(r)
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


def at_largest(rows: Sequence[dict], y: str, n_col: str | None) -> tuple[list[dict], Any]:
    """Seed means of `y` per model at the largest `n_col` value present (all rows if None)."""
    if n_col is None:
        return seed_means(rows, y), None
    sizes = [r[n_col] for r in rows if r.get(n_col) is not None and r.get(y) is not None]
    if not sizes:
        return [], None
    n = max(sizes)
    return seed_means([r for r in rows if r.get(n_col) == n], y), n


# -- phone-book (Fig. 4a) --------------------------------------------------------------------


def phonebook_max_sizes(docs: Sequence[dict[str, Any]], threshold: float) -> dict[tuple, int]:
    """model_key -> the largest book recalled at >= threshold across that model's runs
    (only models that have phone-book results; None where no book reaches it)."""
    by_model: dict[tuple, list[dict]] = defaultdict(list)
    for doc in docs:
        by_model[model_key(doc)].append(doc)
    groups = {
        key: group
        for key, group in by_model.items()
        if any((d.get("synthetic") or {}).get("phonebook") for d in group)
    }
    if not groups:
        return {}
    from eval.synthetic import max_book_size_at  # imports torch: only when needed

    return {key: max_book_size_at(group, threshold) for key, group in groups.items()}


def phonebook_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per model (the sweep's maximal book size), for the maximal-size plot."""
    seen: dict[tuple, dict] = {}
    for r in rows:
        if r.get("phonebook_max_size") is None:
            continue
        seen.setdefault(tuple(r.get(k) for k in MODEL_KEY_FIELDS), r)
    return list(seen.values())


def phonebook_figures(
    rows: Sequence[dict], out: Path, threshold: float, record: list[dict]
) -> list[Attempt]:
    name = "phonebook_max_size.png"
    ok = plot_vs_params(
        phonebook_rows(rows),
        "phonebook_max_size",
        f"largest book with accuracy >= {threshold:g}",
        "phone-book: maximal book size",
        out / name,
        logy=True,
        record=record,
    )
    why = (
        f"no model reaches phone-book accuracy >= {threshold:g} at any book size "
        "(or no phone-book results)"
    )
    return [(name, ok, why)]


def phonebook_markdown(rows: Sequence[dict], threshold: float) -> list[str]:
    """The maximal sizes per model, then per run: exact recall beside the partial measures
    (digits right, loss on the answer)."""
    lines = ["", "## Phone-book maximal size", ""]
    pb_models = phonebook_rows(rows)
    if pb_models:
        lines.append(f"Largest book size with accuracy >= {threshold:g}, per model:")
        lines.append("")
        lines += md_table(
            pb_models,
            ["model", "ffn", "num_experts", "total_params", "active_params", "phonebook_max_size"],
        )
    else:
        lines.append(f"No model reaches accuracy >= {threshold:g} (or no phone-book results).")
    pb = [r for r in rows if r.get("phonebook_accuracy") is not None]
    if not any(r.get("phonebook_digit_accuracy") is not None for r in pb):
        return lines
    cols = ["model", "ffn", "num_experts", "total_params", "active_params"]
    cols += ["phonebook_book_size", "step", "phonebook_accuracy", "phonebook_digit_accuracy"]
    cols.append("phonebook_answer_loss")
    lines += ["", "Phone-book recall per run (exact, per digit, loss on the answer):", ""]
    return lines + md_table(pb, cols)


# -- shortest path (Fig. 4b) -----------------------------------------------------------------


def shortest_path_figures(
    rows: Sequence[dict], out: Path, threshold: float, record: list[dict]
) -> list[Attempt]:
    """Accuracy (any valid shortest path, and the exact reference path) per model, seed mean."""
    attempts = []
    for col, ylabel in (
        ("shortest_path_valid", "valid shortest-path rate"),
        ("shortest_path_exact_match", "exact-match rate"),
    ):
        name = f"{col}.png"
        ok = plot_vs_params(
            seed_means(rows, col),
            col,
            ylabel,
            "shortest path on held-out graphs vs parameters",
            out / name,
            record=record,
        )
        attempts.append((name, ok, "no shortest path results with parameter counts"))
    return attempts


def shortest_path_markdown(rows: Sequence[dict], threshold: float) -> list[str]:
    """Shortest-path accuracy per model, seeds averaged."""
    valid = {row_model(r): r for r in seed_means(rows, "shortest_path_valid")}
    if not valid:
        return []
    exact = {row_model(r): r for r in seed_means(rows, "shortest_path_exact_match")}
    cols = ["model", "ffn", "num_experts", "total_params", "active_params"]
    lines = ["", "## Shortest path", "", "Held-out graphs, mean over seeds:", ""]
    lines += ["| " + " | ".join([*cols, "valid shortest path", "exact match", "runs"]) + " |"]
    lines.append("|" + "---|" * (len(cols) + 3))
    for key, r in sorted(valid.items(), key=lambda kv: kv[1].get("active_params") or 0):
        em = exact.get(key, {}).get("shortest_path_exact_match")
        cells = [fmt(r.get(c), c) for c in cols]
        cells += [f"{r['shortest_path_valid']:.3f}", "-" if em is None else f"{em:.3f}"]
        cells.append(str(r["runs"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# -- memorization (theory task) --------------------------------------------------------------


def memorization_max_rows(rows: Sequence[dict], threshold: float) -> list[dict]:
    """One row per model with `memorization_max_n`: the largest n whose (seed-mean) accuracy is
    >= threshold; models that reach it at no n are left out (as for the phone-book)."""
    best: dict[tuple, dict] = {}
    for r in seed_means(rows, "memorization_accuracy", by="memorization_n"):
        if r["memorization_accuracy"] < threshold:
            continue
        key = row_model(r)
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
            figure_point(
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
    draw(ax, series, logx=True)
    ax.set_xlabel("number of sequences n")
    ax.set_ylabel("train accuracy (memorized fraction)")
    ax.set_title("memorization: accuracy vs n")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def memorization_figures(
    rows: Sequence[dict], out: Path, threshold: float, record: list[dict]
) -> list[Attempt]:
    attempts: list[Attempt] = []
    name = "memorization_vs_n.png"
    ok = plot_memorization_vs_n(rows, out / name, record)
    attempts.append((name, ok, "no memorization results with their n"))
    name = "memorization_max_n.png"
    ok = plot_vs_params(
        memorization_max_rows(rows, threshold),
        "memorization_max_n",
        f"largest n with accuracy >= {threshold:g}",
        "memorization: maximal n memorized",
        out / name,
        logy=True,
        record=record,
    )
    why = (
        f"no model reaches memorization accuracy >= {threshold:g} at any n "
        "(or no memorization results with their n)"
    )
    attempts.append((name, ok, why))
    has_n = any(r.get("memorization_n") is not None for r in rows)
    mem_rows, mem_n = at_largest(rows, "memorization_accuracy", "memorization_n" if has_n else None)
    name = "memorization_accuracy.png"
    ok = plot_vs_params(
        mem_rows,
        "memorization_accuracy",
        "train accuracy",
        "memorization vs parameters" + (f" (n={mem_n:,.0f})" if mem_n else ""),
        out / name,
        record=record,
    )
    attempts.append((name, ok, "no memorization results with parameter counts"))
    return attempts


def memorization_markdown(rows: Sequence[dict], threshold: float) -> list[str]:
    """Accuracy per model (rows) and n (columns), seeds averaged, plus the maximal n."""
    means = seed_means(rows, "memorization_accuracy", by="memorization_n")
    if not means:
        return []
    sizes = sorted({r["memorization_n"] for r in means})
    by_model: dict[tuple, dict] = {}
    for r in means:
        by_model.setdefault(row_model(r), {**r, "acc": {}})["acc"][r["memorization_n"]] = r
    best = {row_model(r): r["memorization_max_n"] for r in memorization_max_rows(rows, threshold)}
    head = ["model", "ffn", "num_experts", "total_params", "active_params"]
    cols = [*head, *(f"n={n:,.0f}" for n in sizes), f"max n (>= {threshold:g})"]
    lines = ["", "## Memorization", "", "Train accuracy (mean over seeds) per model and n:", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    order = sorted(by_model.items(), key=lambda kv: (kv[1].get("active_params") or 0, str(kv[0])))
    for key, r in order:
        cells = [fmt(r.get(c), c) for c in head]
        cells += [
            f"{r['acc'][n]['memorization_accuracy']:.3f}" if n in r["acc"] else "-" for n in sizes
        ]
        cells.append(fmt(best.get(key), "n"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# -- the registries (a new task: one entry in each) -----------------------------------------

FigureMaker = Callable[[Sequence[dict], Path, float, list[dict]], list[Attempt]]
SectionMaker = Callable[[Sequence[dict], float], list[str]]
FIGURES: tuple[FigureMaker, ...] = (phonebook_figures, shortest_path_figures, memorization_figures)
SECTIONS: tuple[SectionMaker, ...] = (
    phonebook_markdown,
    memorization_markdown,
    shortest_path_markdown,
)
