"""The demo's verdict lines and the run summaries they are made from. The findings themselves
(the memorization pair, the reasoning trio) are checked on the demo's own runs in
tests/test_demo.py."""

from __future__ import annotations

from demo.verdict import memorization_verdict, reasoning_verdict, run_summary
from mop.results import update_results
from pretrain.memorization import (
    load_classifier_config,
    model_header,
)
from tests.pretrain.conftest import REPO


def _run(acc: float, active: int, total: int, experts: int | None) -> dict:
    return {"accuracy": acc, "n": 8192, "active": active, "total": total, "experts": experts}


def test_verdict_names_both_accuracies_and_counts_and_claims_only_a_clear_gap():
    dense, moe = _run(0.741, 18_700, 18_700, None), _run(0.96, 19_000, 29_700, 16)
    line = memorization_verdict(dense, moe)
    assert line.startswith(
        "memorization, n=8192: dense 74.1% (18.70K active / 18.70K total) vs "
        "MoE 16x 96.0% (19.00K active / 29.70K total)"
    )
    assert "the MoE memorizes more (+21.9 points)" in line
    close = memorization_verdict(dense, _run(0.76, 19_000, 29_700, 16))
    assert "no separation at this size (gap +1.9 points, 5 needed)" in close
    assert "memorizes more" not in close


def test_run_summary_reads_results_json(tmp_path):
    cfg = load_classifier_config(str(REPO / "configs/model/demo_mem_moe16.yaml"), [], 32, 8)
    header = {"checkpoint": str(tmp_path), "model": model_header(cfg, "memorization_moe16")}
    update_results(tmp_path, header, "synthetic", {"memorization": {"accuracy": 0.5, "n": 10}})
    got = run_summary(tmp_path, "memorization")
    assert got["experts"] == 16 and got["accuracy"] == 0.5 and got["n"] == 10
    assert got["total"] > 4 * got["active"] > 0


# -- the reasoning trio (length-2 path) ----------------------------------------------------------


def _trio_run(acc: float, width: int, active: int, total: int, experts: int | None) -> dict:
    return {"accuracy": acc, "n": 20000, "active": active, "total": total, "experts": experts,
            "width": width, "vertices": 16}  # fmt: skip


def test_reasoning_verdict_names_the_trio_in_order_and_claims_only_clear_gaps():
    narrow = _trio_run(0.712, 8, 817, 817, None)
    moe = _trio_run(0.725, 8, 945, 3633, 16)
    wide = _trio_run(1.0, 32, 10945, 10945, None)
    line = reasoning_verdict(narrow, moe, wide)
    assert line == (
        "reasoning, length-2 path |V|=16: dense m=8 71.2% (817 active / 817 total) vs "
        "MoE 16x m=8 72.5% (945 active / 3.63K total) vs dense m=32 100.0% (10.95K active / "
        "10.95K total): extra experts did not buy reasoning (+1.3 points); width did (+28.8 points)"
    )
    # an MoE past the margin: said, and set against what width bought (little: under a third)
    little = reasoning_verdict(narrow, _trio_run(0.77, 8, 945, 3633, 16), wide)
    assert little.endswith(
        "extra experts bought little reasoning (+5.8 points); width far more (+28.8 points)"
    )
    some = reasoning_verdict(narrow, _trio_run(0.85, 8, 945, 3633, 16), wide)
    assert some.endswith(
        "extra experts bought some reasoning (+13.8 points); width more (+28.8 points)"
    )
    # an MoE that gains as much as the wider model would contradict the paper: said plainly
    same = reasoning_verdict(narrow, _trio_run(0.97, 8, 945, 3633, 16), wide)
    assert same.endswith(
        "the extra experts raised reasoning (+25.8 points) as much as width did (+28.8 points), "
        "unlike the paper"
    )
    # a wider model that is not clearly better: no claim either way
    flat = reasoning_verdict(narrow, moe, _trio_run(0.74, 32, 10945, 10945, None))
    assert flat.endswith(
        "extra experts did not buy reasoning (+1.3 points); nor did width (+2.8 points, "
        "5 needed): no separation at this size"
    )


def test_run_summary_reads_width_and_graph_size(tmp_path):
    cfg = load_classifier_config(str(REPO / "configs/model/demo_l2p_moe16_d8.yaml"), [], 17, 9)
    header = {"checkpoint": str(tmp_path), "model": model_header(cfg, "length2_path_moe16_d8")}
    section = {"length2_path": {"accuracy": 0.7, "n": 100, "vertices": 16}}
    update_results(tmp_path, header, "synthetic", section)
    got = run_summary(tmp_path, "length2_path")
    assert (got["width"], got["vertices"], got["experts"]) == (8, 16, 16)
