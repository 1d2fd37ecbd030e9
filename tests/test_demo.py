"""`python -m demo` (the README's first command, `make demo`) end to end, as a user runs
it: every stage's real CLI on generated data, and the verdict lines of the memorization pair
and the reasoning trio.
A few minutes on 2 CPU cores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from demo.__main__ import L2P_MODELS, MEM_MODELS
from demo.verdict import MARGIN, run_summary

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "demo", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # the MoE run was stopped by SIGTERM (exit 75, checkpoint) and resumed to the end
    assert "[demo] stopped with exit 75" in res.stdout
    assert "[train] resumed from step_" in res.stdout
    moe = [json.loads(x) for x in (out / "runs/tiny_moe/metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in moe if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # each step once after the resume
    last = next(r for r in reversed(moe) if "loss" in r)
    assert any(k.startswith("expert_load_by_source/") for k in last)
    # eval results for both runs and the memorization classifier, then the report over them
    for run in ("tiny_dense", "tiny_moe"):
        tags = sorted((out / "runs" / run / "checkpoints").glob("step_*"))
        assert (tags[-1] / "results.json").is_file(), run
    # the paper's two findings: one verdict line each (memorization, then reasoning)
    verdict, reasoning = [x for x in res.stdout.splitlines() if x.startswith("[demo] verdict: ")]
    assert re.search(
        r"memorization, n=8192: dense [\d.]+% \([\d.]+K active / [\d.]+K total\) vs "
        r"MoE 16x [\d.]+% \([\d.]+K active / [\d.]+K total\): at equal active parameters "
        r"the MoE memorizes more \(\+[\d.]+ points\)",
        verdict,
    ), verdict
    side = r"[\d.]+% \([\d.]+K? active / [\d.]+K? total\)"
    assert re.search(
        rf"reasoning, length-2 path \|V\|=16: dense m=8 {side} vs MoE 16x m=8 {side} vs "
        rf"dense m=32 {side}: extra experts (did not buy reasoning \([+-][\d.]+ points\); "
        r"width did|bought little reasoning \(\+[\d.]+ points\); width far more) "
        r"\(\+[\d.]+ points\)",
        reasoning,
    ), reasoning
    # ... and the findings themselves, on the demo's own runs (seed 0, measured on 2 CPU
    # cores: dense 79.8% vs MoE 95.3%; dense m=8 73.6%, MoE m=8 70.2%, dense m=32 100.0%)
    mem = {name: run_summary(out / f"runs/memorization_{name}", "memorization")
           for name in MEM_MODELS}  # fmt: skip
    # the pair is matched on ACTIVE parameters (within the router's 8%), not on total
    assert abs(mem["moe16"]["active"] / mem["dense"]["active"] - 1) < 0.1, mem
    assert mem["moe16"]["total"] > 4 * mem["dense"]["total"], mem
    assert mem["moe16"]["accuracy"] - mem["dense"]["accuracy"] >= 0.10, mem
    l2p = {name: run_summary(out / f"runs/length2_path_{name}", "length2_path")["accuracy"]
           for name in L2P_MODELS}  # fmt: skip
    # the MoE of width 8 is no better than the dense model of its active width (by the
    # verdict's own margin: what "did not buy reasoning" means); the dense model of width 32
    # is far better than both. One-sided: the MoE scoring BELOW its active width is the claim
    # too, and how far below moves with the CPU's kernels (seed 0, one thread, at ba1277f and
    # after alike: 70.2% where the figures above were measured, 67.8% on the AVX2 EPYC VM of
    # 2026-12-02, against dense 73.6% on both)
    assert l2p["moe16_d8"] - l2p["dense_d8"] < MARGIN, l2p
    assert l2p["moe16_d8"] >= 0.6, l2p  # it learned the task (chance is 0.5), not a broken run
    assert l2p["dense_d32"] - max(l2p["dense_d8"], l2p["moe16_d8"]) >= 0.15, l2p
    assert l2p["dense_d32"] >= 0.95, l2p
    book = json.loads(
        (out / "runs/phonebook_tiny_dense/checkpoints/step_00000060/results.json").read_text()
    )
    assert book["synthetic"]["phonebook"]["book_size"] == 2000
    report = (out / "report/report.md").read_text()
    assert "8 checkpoint(s)" in report and (out / "report/results.csv").is_file()
    assert "| memorization_dense |" in report and "| memorization_moe16 |" in report
    assert "## Length-2 path (reasoning, theory task)" in report
