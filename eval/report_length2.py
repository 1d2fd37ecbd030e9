"""The length-2-path task (the paper's reasoning theory task) in `python -m eval.report`.

One figure per graph size |V|: held-out accuracy against total and against active parameters
(dense models one line, each MoE expert count its own series; seed means with their range
as error bars), and one table per |V|. The paper's prediction: the MoE sits where the dense
model of its width (its active parameters) sits, not where its total parameters would put
it, and a dense model of width about |V| solves the task.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from eval.report_render import fmt, plot_vs_params, row_model

ACCURACY = "length2_path_accuracy"  # held-out graphs
TRAIN_ACCURACY = "length2_path_train_accuracy"
VERTICES = "length2_path_vertices"
FIELDS = {  # results.csv column -> (section, key) of results.json's `synthetic` part
    ACCURACY: ("length2_path", "accuracy"),
    TRAIN_ACCURACY: ("length2_path", "train_accuracy"),
    VERTICES: ("length2_path", "vertices"),
}

Attempt = tuple[str, bool, str]


def _sizes(rows: Sequence[dict]) -> list[int]:
    return sorted({int(r[VERTICES]) for r in rows if r.get(VERTICES) is not None})


def _means(rows: Sequence[dict], vertices: int, y: str) -> list[dict]:
    from eval.report_synthetic import seed_means  # the report's one averaging over seeds

    return seed_means([r for r in rows if r.get(VERTICES) == vertices], y)


def length2_figures(
    rows: Sequence[dict], out: Path, threshold: float, record: list[dict]
) -> list[Attempt]:
    """`length2_path_v<|V|>.png` per graph size."""
    attempts: list[Attempt] = []
    for v in _sizes(rows):
        name = f"length2_path_v{v}.png"
        ok = plot_vs_params(
            _means(rows, v, ACCURACY),
            ACCURACY,
            "accuracy on held-out graphs",
            f"length-2 path, |V|={v}: held-out accuracy vs parameters",
            out / name,
            record=record,
        )
        attempts.append((name, ok, f"no length-2-path results with parameter counts at |V|={v}"))
    return attempts


def length2_markdown(rows: Sequence[dict], threshold: float) -> list[str]:
    """Per graph size: held-out and training accuracy per model, mean over seeds [min, max]."""
    from eval.report_synthetic import _mean_range as mean_range  # the report's one format

    sizes = _sizes(rows)
    if not sizes:
        return []
    lines = ["", "## Length-2 path (reasoning, theory task)"]
    head = ["model", "ffn", "num_experts", "d_model", "total_params", "active_params"]
    for v in sizes:
        train = {row_model(r): r for r in _means(rows, v, TRAIN_ACCURACY)}
        lines += ["", f"|V| = {v}: accuracy on held-out graphs (and on the training graphs),"]
        lines += ["mean over seeds [min, max]:", ""]
        lines += ["| " + " | ".join([*head, "held-out accuracy", "train accuracy", "runs"]) + " |"]
        lines.append("|" + "---|" * (len(head) + 3))
        order = sorted(
            _means(rows, v, ACCURACY),
            key=lambda r: (r.get("ffn") != "dense", r.get("d_model") or 0, r.get("total_params")),
        )
        for r in order:
            cells = [fmt(r.get(c), c) for c in head]
            cells.append(mean_range(r, ACCURACY, ".3f"))
            tr = train.get(row_model(r))
            cells.append(mean_range(tr, TRAIN_ACCURACY, ".3f") if tr else "-")
            cells.append(str(r["runs"]))
            lines.append("| " + " | ".join(cells) + " |")
    return lines
