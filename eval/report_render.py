"""How `python -m eval.report` draws and writes: figures, figures.csv, markdown tables.

Shared by the report's general part (eval/report.py: categories vs parameters and
perplexity) and its synthetic-task sections (eval/report_synthetic.py). Rows are the flat
dicts of `eval.report.flatten`; a "model" is identified by its architecture
(`MODEL_KEY_FIELDS`), not its name, because names differ per run directory in a sweep.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PARAM_AXES = (("total_params", "total parameters"), ("active_params", "active parameters"))
MODEL_KEY_FIELDS = ("ffn", "d_model", "n_layers", "num_experts", "top_k", "total_params")


def number(value: Any) -> float | None:
    """A finite number or None (missing, null, text, NaN all become None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# -- what "the same model" means ----------------------------------------------------------


def model_key(doc: dict[str, Any]) -> tuple:
    """What identifies 'the same model' in a results document, across a sweep of book sizes.

    The architecture, not the name: names default to run directory names, which differ per
    book size in a sweep. total_params catches other differences (FFN width, vocab).
    """
    m = doc.get("model") or {}
    key = tuple(m.get(k) for k in MODEL_KEY_FIELDS)
    return key if any(v is not None for v in key) else ("name", m.get("name"))


def row_model(row: dict) -> tuple:
    """The same key for a flat row."""
    return tuple(row.get(k) for k in MODEL_KEY_FIELDS)


def series_name(row: dict[str, Any]) -> str:
    """Dense is one series; routed MoE one series per expert count (as the paper's figures)."""
    ffn = row.get("ffn") or "unknown"
    if ffn == "dense":
        return "dense"
    label = {"moe": "MoE", "soft_moe": "Soft MoE", "peer": "PEER"}.get(ffn, str(ffn))
    e = row.get("num_experts")
    return f"{label} ({e} experts)" if e else label


# -- figures ------------------------------------------------------------------------------


Point = tuple[float, ...]  # (x, y) or (x, y, low, high): a mean and the range of its seeds


def spread(row: dict, y: str) -> tuple[float, float, float] | None:
    """(std, min, max) of `y` over the seeds averaged into `row` (seed_means), if any."""
    return (row.get("spread") or {}).get(y)


def points(rows: Iterable[dict], x: str, y: str) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = defaultdict(list)
    for r in rows:
        if r.get(x) is not None and r.get(y) is not None:
            sp = spread(r, y)
            out[series_name(r)].append((r[x], r[y]) if sp is None else (r[x], r[y], sp[1], sp[2]))
    return out


def _series_sort_key(name: str) -> tuple:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (name != "dense", name.split(" (")[0], int(digits) if digits else 0)


def draw(ax, series: dict[str, list[Point]], logx: bool, logy: bool = False):
    """One line per series; a point with a seed range gets an error bar from min to max."""
    for i, name in enumerate(sorted(series, key=_series_sort_key)):
        pts = sorted(series[name])
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        if name == "dense":
            style = {"color": "black", "marker": "s", "linestyle": "-"}
        elif name.startswith("dense"):  # one series per dense model (memorization vs n)
            style = {"color": f"C{i % 10}", "marker": "s", "linestyle": "-"}
        else:
            style = {"color": f"C{i % 10}", "marker": "o", "linestyle": "--"}
        if any(len(p) == 4 and p[2] != p[3] for p in pts):
            lo = [p[1] - (p[2] if len(p) == 4 else p[1]) for p in pts]
            hi = [(p[3] if len(p) == 4 else p[1]) - p[1] for p in pts]
            ax.errorbar(xs, ys, yerr=[lo, hi], label=name, capsize=3, **style)
        else:
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
    panels = [(points(rows, x, y), label) for x, label in PARAM_AXES]
    if not any(pts for pts, _ in panels):
        return False
    if record is not None:
        for r in rows:
            for x, _ in PARAM_AXES:
                if r.get(x) is not None and r.get(y) is not None:
                    record.append(figure_point(path.name, series_name(r), r, x, r[x], y, r[y]))
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (pts, label) in zip(axes, panels):
        if pts:
            draw(ax, pts, logx=True, logy=logy)
        ax.set_xlabel(label)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_vs_perplexity(rows: Sequence[dict], cats: Sequence[str], path: Path) -> bool:
    """One panel per category: accuracy vs validation perplexity (dense and MoE series)."""
    panels = [(cat, points(rows, "perplexity", cat)) for cat in cats]
    panels = [(c, p) for c, p in panels if p]
    if not panels:
        return False
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (cat, pts) in zip(axes[0], panels):
        draw(ax, pts, logx=False)
        ax.set_xlabel("validation perplexity")
        ax.set_ylabel(f"{cat} accuracy")
        ax.set_title(cat)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- figures.csv: every plotted point of the synthetic-task figures --------------------------

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
    "y_std",
    "y_min",
    "y_max",
    "runs",
)


def figure_point(
    fig: str, series: str, row: dict, x_name: str, x: Any, y_name: str, y: Any
) -> dict:
    """One row of figures.csv: a plotted point, the model it belongs to, and the spread of the
    seeds it averages (std, min, max; empty for a single run)."""
    sp = spread(row, y_name)
    std, lo, hi = sp if sp is not None else (None, None, None)
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
        "y_std": std,
        "y_min": lo,
        "y_max": hi,
        "runs": row.get("runs", 1),
    }


def csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:
        return int(v)  # parameter counts and book sizes read better without ".0"
    return v


def write_figures_csv(pts: Sequence[dict], path: Path) -> None:
    """The numbers behind the synthetic-task figures, one row per plotted point."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIGURE_COLUMNS)
        writer.writeheader()
        for p in pts:
            writer.writerow({c: csv_value(p.get(c)) for c in FIGURE_COLUMNS})


# -- markdown -----------------------------------------------------------------------------


def fmt(v: Any, col: str) -> str:
    """One markdown cell: params as 45.3K, counts with separators, floats to 4 digits."""
    if v is None:
        return "-"
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:
        v = int(v)
    if isinstance(v, float) and "bits" in col and "per_param" not in col:
        return f"{v:,.0f}"  # bits stored: a count
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and col.endswith("_params"):
        from pretrain.model_info import human

        return human(v)
    if isinstance(v, int):
        return f"{v:,}"  # steps and book sizes: exact, with thousands separators
    return str(v)


def md_table(rows: Sequence[dict], cols: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c), c) for c in cols) + " |" for r in rows]
    return lines
