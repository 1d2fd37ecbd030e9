"""The synthetic-task part of `python -m eval.report`: columns, figures and report sections.

One registry per concern, so that a new task adds one entry to each and touches nothing else:

- `SYNTHETIC_FIELDS`: results.csv column -> (section, key) of results.json's `synthetic` part;
- `FIGURES`: functions (rows, out, threshold, record) -> [(png name, drawn?, why not)], each
  drawing a task's figures and appending every plotted point to `record` (figures.csv);
- `SECTIONS`: functions (rows, threshold) -> markdown lines of report.md.

Runs of one model and size (the seeds of a grid, `slurm/grid.py`) are averaged (`seed_means`):
figures show the mean with an error bar from the lowest to the highest seed, figures.csv holds
the mean, standard deviation, min and max and the number of runs.

Phone-book capacity (Fig. 4a and Allen-Zhu & Li 2024, "Physics of Language Models 3.3"):
beside the paper's axis (the largest book recalled at >= threshold exact, per seed, then
averaged), each run gets the bits it stores, from the teacher-forced loss per answer digit
on its queried entries: bits = book x 8 digits x (ln 10 - answer_loss) / ln 2 (0 at chance,
26.6 per entry when every digit is certain). It counts partial knowledge (a digit narrowed to
2 candidates is 2.3 bits) and is their measure; entries recalled exactly x 26.6 bits (also in
results.csv) is the stricter lower bound. A model's capacity is the most bits any of its books
holds (in practice the largest book, which it cannot hold whole), and bits per parameter
divides it by the total parameters.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eval.report_length2 import FIELDS as LENGTH2_FIELDS
from eval.report_length2 import VERTICES as LENGTH2_VERTICES
from eval.report_length2 import length2_figures, length2_markdown
from eval.report_render import (
    draw,
    figure_point,
    fmt,
    md_table,
    number,
    plot_vs_params,
    row_model,
    series_name,
    spread,
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
    **LENGTH2_FIELDS,
}
# counts: 64, not 64.0, in the CSV and on axes
INTEGER_FIELDS = ("memorization_n", "seed", LENGTH2_VERTICES)
PHONEBOOK_DIGITS = 8  # digits per number (data_prep.synthetic.phonebook.NUMBER_DIGITS)
BITS_PER_ENTRY = PHONEBOOK_DIGITS * math.log2(10)  # 26.6: a number known for certain
# Columns of results.csv: the data seed, the fields, and what the report derives from them.
SYNTHETIC_COLUMNS = (
    "seed",
    *list(SYNTHETIC_FIELDS)[:4],
    "phonebook_max_size",
    "phonebook_entries_recalled",
    "phonebook_bits",
    "phonebook_bits_exact",
    "phonebook_bits_per_param",
    *list(SYNTHETIC_FIELDS)[4:],
)

Attempt = tuple[str, bool, str]  # (png name, drawn, why it was skipped)


def synthetic_values(synth: dict[str, Any], total_params: float | None) -> dict[str, Any]:
    """The synthetic columns of one results.json (its `synthetic` part), derived ones included
    (phonebook_max_size is per model and seed: `add_phonebook_max_size`)."""
    row: dict[str, Any] = {}
    for col, (section, key) in SYNTHETIC_FIELDS.items():
        row[col] = number((synth.get(section) or {}).get(key))
    seeds = [s.get("seed") for s in synth.values() if isinstance(s, dict)]
    row["seed"] = next((number(x) for x in seeds if number(x) is not None), None)
    for col in INTEGER_FIELDS:
        if row[col] is not None:
            row[col] = int(row[col])
    book, acc = row["phonebook_book_size"], row["phonebook_accuracy"]
    loss = row["phonebook_answer_loss"]
    row["phonebook_entries_recalled"] = acc * book if acc is not None and book else None
    row["phonebook_bits_exact"] = acc * book * BITS_PER_ENTRY if acc is not None and book else None
    bits = None
    if loss is not None and book:
        bits = max(0.0, book * PHONEBOOK_DIGITS * (math.log(10) - loss) / math.log(2))
    row["phonebook_bits"] = bits
    row["phonebook_bits_per_param"] = (
        bits / total_params if bits is not None and total_params else None
    )
    return row


# -- averaging over seeds -------------------------------------------------------------------


def seed_means(rows: Sequence[dict], y: str, by: str | None = None) -> list[dict]:
    """Rows with `y` averaged over the runs of one model (and one value of `by`, e.g. the size n).

    A grid repeats each (model, size) over seeds; a figure shows their mean. Each returned row
    is the first run's row with `y` replaced by the mean, `runs` set to the count and, for two
    runs or more, `spread[y]` = (standard deviation, min, max) over them.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get(y) is not None and (by is None or r.get(by) is not None):
            groups[(row_model(r), r.get(by) if by else None)].append(r)
    out = []
    for members in groups.values():
        row = dict(members[0])
        values = [m[y] for m in members]
        row[y] = sum(values) / len(values)
        row["runs"] = len(values)
        row["spread"] = dict(row.get("spread") or {})
        if len(values) > 1:
            row["spread"][y] = (statistics.stdev(values), min(values), max(values))
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


def add_phonebook_max_size(rows: Sequence[dict], threshold: float) -> None:
    """Set `phonebook_max_size` on every phone-book row: the largest book that the row's model
    recalls at >= threshold with the row's data seed (None where no book reaches it)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("phonebook_book_size") is not None:
            groups[(row_model(r), r.get("seed"))].append(r)
    if not groups:
        return
    from eval.synthetic import max_book_size_at  # imports torch: only when needed

    for group in groups.values():
        sections = [
            {"book_size": r["phonebook_book_size"], "accuracy": r.get("phonebook_accuracy")}
            for r in group
        ]
        best = max_book_size_at(sections, threshold)
        for r in group:
            r["phonebook_max_size"] = best


def _per_seed(rows: Sequence[dict], col: str, pick: Callable[[list[dict]], dict | None]):
    """One row per (model, seed) chosen by `pick` among its runs; then seed means per model."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get(col) is not None:
            groups[(row_model(r), r.get("seed"))].append(r)
    chosen = [row for row in (pick(g) for g in groups.values()) if row is not None]
    return seed_means(chosen, col)


def phonebook_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per model: its maximal book size, the mean over seeds (seeds where no book
    reaches the threshold are left out; `runs` says how many are in)."""
    return _per_seed(rows, "phonebook_max_size", lambda g: g[0])


def phonebook_capacity_rows(rows: Sequence[dict]) -> list[dict]:
    """One row per model: the most bits any of its books holds, per seed, averaged over seeds,
    with the entries recalled exactly and the bits per parameter of those runs (seed means);
    `phonebook_book_size` is the book that held the most bits for the first seed."""
    pick = defaultdict(list)
    for r in rows:
        if r.get("phonebook_bits") is not None:
            pick[(row_model(r), r.get("seed"))].append(r)
    chosen = [max(g, key=lambda r: r["phonebook_bits"]) for g in pick.values()]
    out = seed_means(chosen, "phonebook_bits")
    for col in ("phonebook_entries_recalled", "phonebook_bits_per_param"):
        means = {row_model(m): m for m in seed_means(chosen, col)}
        for r in out:
            m = means.get(row_model(r))
            r[col] = m[col] if m else None
            if m and spread(m, col) is not None:
                r["spread"][col] = spread(m, col)
    return out


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
    attempts = [(name, ok, why)]
    name = "phonebook_bits.png"
    ok = plot_vs_params(
        phonebook_capacity_rows(rows),
        "phonebook_bits",
        "bits stored (most over its books)",
        "phone-book: capacity in bits (Allen-Zhu & Li's measure)",
        out / name,
        logy=True,
        record=record,
    )
    attempts.append((name, ok, "no phone-book results with an answer loss"))
    return attempts


def phonebook_markdown(rows: Sequence[dict], threshold: float) -> list[str]:
    """The maximal sizes per model, then per run: exact recall beside the partial measures
    (digits right, loss on the answer)."""
    lines = ["", "## Phone-book maximal size", ""]
    pb_models = {row_model(r): r for r in phonebook_rows(rows)}
    capacity = phonebook_capacity_rows(rows)
    if capacity:
        lines.append(
            f"Per model, mean over seeds [min, max]: the largest book recalled at >= {threshold:g}"
            " exact, and its capacity: the most bits any of its books holds (loss-based), that"
            " book, its entries recalled exactly, and bits per parameter (of the total)."
        )
        lines += [
            "",
            "| model | ffn | experts | total params | active params | max book | "
            "bits stored | book | entries exact | bits / param | seeds |",
        ]
        lines.append("|" + "---|" * 11)
        for r in sorted(
            capacity, key=lambda r: (r.get("ffn") != "dense", r.get("total_params") or 0)
        ):
            mx = pb_models.get(row_model(r))
            cells = [
                fmt(r.get(c), c)
                for c in ("model", "ffn", "num_experts", "total_params", "active_params")
            ]
            cells.append(_mean_range(mx, "phonebook_max_size", ",.0f") if mx else "-")
            cells.append(_mean_range(r, "phonebook_bits", ",.0f"))
            cells.append(fmt(r.get("phonebook_book_size"), "n"))
            cells.append(_mean_range(r, "phonebook_entries_recalled", ",.0f"))
            cells.append(_mean_range(r, "phonebook_bits_per_param", ".3f"))
            cells.append(str(r["runs"]))
            lines.append("| " + " | ".join(cells) + " |")
    elif pb_models:
        lines.append(f"Largest book size with accuracy >= {threshold:g}, per model:")
        lines.append("")
        lines += md_table(
            list(pb_models.values()),
            ["model", "ffn", "num_experts", "total_params", "active_params", "phonebook_max_size"],
        )
    else:
        lines.append(f"No model reaches accuracy >= {threshold:g} (or no phone-book results).")
    pb = [r for r in rows if r.get("phonebook_accuracy") is not None]
    if not any(r.get("phonebook_digit_accuracy") is not None for r in pb):
        return lines
    cols = ["model", "ffn", "num_experts", "total_params", "active_params", "seed"]
    cols += ["phonebook_book_size", "step", "phonebook_accuracy", "phonebook_digit_accuracy"]
    cols += ["phonebook_answer_loss", "phonebook_bits"]
    lines += ["", "Phone-book recall per run (exact, per digit, loss on the answer):", ""]
    return lines + md_table(pb, cols)


def _mean_range(row: dict, y: str, spec: str) -> str:
    """`0.412 [0.398, 0.431]`: a seed mean with its range (the mean alone for one run)."""
    value = row.get(y)
    if value is None:
        return "-"
    sp = spread(row, y)
    text = format(value, spec)
    return text if sp is None else f"{text} [{format(sp[1], spec)}, {format(sp[2], spec)}]"


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
    lines = ["", "## Shortest path", "", "Held-out graphs, mean over seeds [min, max]:", ""]
    lines += ["| " + " | ".join([*cols, "valid shortest path", "exact match", "runs"]) + " |"]
    lines.append("|" + "---|" * (len(cols) + 3))
    for key, r in sorted(valid.items(), key=lambda kv: kv[1].get("active_params") or 0):
        em = exact.get(key, {}).get("shortest_path_exact_match")
        cells = [fmt(r.get(c), c) for c in cols]
        cells.append(_mean_range(r, "shortest_path_valid", ".3f"))
        cells.append(
            "-" if em is None else _mean_range(exact[key], "shortest_path_exact_match", ".3f")
        )
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
            _mean_range(r["acc"][n], "memorization_accuracy", ".3f") if n in r["acc"] else "-"
            for n in sizes
        ]
        cells.append(fmt(best.get(key), "n"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# -- the registries (a new task: one entry in each) -----------------------------------------

FigureMaker = Callable[[Sequence[dict], Path, float, list[dict]], list[Attempt]]
SectionMaker = Callable[[Sequence[dict], float], list[str]]
FIGURES: tuple[FigureMaker, ...] = (
    phonebook_figures,
    shortest_path_figures,
    memorization_figures,
    length2_figures,
)
SECTIONS: tuple[SectionMaker, ...] = (
    phonebook_markdown,
    memorization_markdown,
    shortest_path_markdown,
    length2_markdown,
)
