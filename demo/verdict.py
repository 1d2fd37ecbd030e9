"""The demo's verdicts: models trained on the same data with the same budget, side by side
(accuracy, active / total parameters), one line per half of the paper's claim.

The paper's claim (Jelassi et al. 2024): at equal active parameters, more experts raise
memorization (`memorization_verdict`: a dense model and an MoE with the same active
parameters on random labels) but not reasoning (`reasoning_verdict`: on the length-2-path
task, the dense model of the MoE's width, the MoE, and a wider dense model; accuracy on
held-out graphs). Each line names every number and parameter count and claims a difference
only where the gap clears `margin` (in accuracy points); otherwise it says the gap was small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mop.results import load_results
from pretrain.model_info import human

MARGIN = 0.05  # accuracy gap (fraction) the MoE must clear for the line to claim a separation
# Reasoning: an MoE gain past the margin is still "little" next to a width gain this many times
# larger (the demo's seeds 0-2: the MoE -3.4 to +5.05 points from its dense match, width +26
# to +33).
LITTLE = 3.0


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
        "width": model.get("d_model"),
        "vertices": doc["synthetic"][task].get("vertices"),
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


def _gap(points: float) -> str:
    return f"{100 * points:+.1f} points"


def reasoning_verdict(
    narrow: dict[str, Any], moe: dict[str, Any], wide: dict[str, Any], margin: float = MARGIN
) -> str:
    """One line: the dense model of the MoE's width, the MoE, a wider dense model (held-out
    accuracy, active / total parameters each), then what the two gaps show."""
    sides = [
        _side(f"dense m={narrow['width']}", narrow),
        _side(f"MoE {moe['experts']}x m={moe['width']}", moe),
        _side(f"dense m={wide['width']}", wide),
    ]
    line = f"reasoning, length-2 path |V|={narrow['vertices']}: " + " vs ".join(sides)
    experts = moe["accuracy"] - narrow["accuracy"]
    width = wide["accuracy"] - narrow["accuracy"]
    if width < margin and experts >= margin:
        return (
            f"{line}: the extra experts raised reasoning ({_gap(experts)}) and width did not "
            f"({_gap(width)}), unlike the paper"
        )
    if width < margin:
        return (
            f"{line}: extra experts did not buy reasoning ({_gap(experts)}); nor did width "
            f"({_gap(width)}, {100 * margin:.0f} needed): no separation at this size"
        )
    if experts < margin:
        said = f"extra experts did not buy reasoning ({_gap(experts)}); width did ({_gap(width)})"
    elif width >= LITTLE * experts:
        said = f"extra experts bought little reasoning ({_gap(experts)}); width far more ({_gap(width)})"
    elif width >= experts + margin:
        said = f"extra experts bought some reasoning ({_gap(experts)}); width more ({_gap(width)})"
    else:
        said = (
            f"the extra experts raised reasoning ({_gap(experts)}) as much as width did "
            f"({_gap(width)}), unlike the paper"
        )
    return f"{line}: {said}"
