"""The demo's verdict: a dense model and an MoE with the same ACTIVE parameters, trained on the
same data with the same budget, side by side (accuracy, active / total parameters).

The paper's claim (Jelassi et al. 2024): at equal active parameters, more experts raise
memorization. The line names both numbers and both parameter counts, and only says the MoE
memorized more when the gap clears `margin` (in accuracy points); otherwise it says there
was no separation at this size rather than claiming one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mop.results import load_results
from pretrain.model_info import human

MARGIN = 0.05  # accuracy gap (fraction) the MoE must clear for the line to claim a separation


def run_summary(run_dir: str | Path, task: str) -> dict[str, Any]:
    """Accuracy and parameter counts of a finished run (its results.json)."""
    doc = load_results(Path(run_dir))
    model = doc["model"]
    return {
        "accuracy": float(doc["synthetic"][task]["accuracy"]),
        "n": int(doc["synthetic"][task]["n"]),
        "active": int(model["active_params"]),
        "total": int(model["total_params"]),
        "experts": model.get("num_experts"),
    }


def _side(label: str, run: dict[str, Any]) -> str:
    return (
        f"{label} {100 * run['accuracy']:.1f}% "
        f"({human(run['active'])} active / {human(run['total'])} total)"
    )


def memorization_verdict(dense: dict[str, Any], moe: dict[str, Any], margin: float = MARGIN) -> str:
    """One line: both accuracies and parameter counts, then what they show."""
    moe_label = f"MoE {moe['experts']}x"
    line = f"memorization, n={dense['n']}: {_side('dense', dense)} vs {_side(moe_label, moe)}"
    gap = moe["accuracy"] - dense["accuracy"]
    if gap >= margin:
        return (
            f"{line}: at equal active parameters the MoE memorizes more (+{100 * gap:.1f} points)"
        )
    return (
        f"{line}: no separation at this size (gap {100 * gap:+.1f} points, "
        f"{100 * margin:.0f} needed)"
    )
