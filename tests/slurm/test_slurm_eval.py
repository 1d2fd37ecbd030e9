"""Real SLURM on localhost: slurm/eval.sbatch evaluates a run, and the same job submitted
again (what a requeue after preemption does) skips the benchmark tasks already scored.

Needs a running SLURM, as tests/slurm/test_slurm_requeue.py (same skip rule)."""

from __future__ import annotations

import json
import os
import subprocess

from demo.fixtures import write_fixtures
from tests.eval.conftest import make_eval_data_dir, train_tiny
from tests.pretrain.conftest import REPO
from tests.slurm.test_slurm_requeue import _job_state, _slurm_up, _wait, pytestmark  # noqa: F401


def _submit(args: list[str], logs, env, cwd) -> str:
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
    cmd += [f"--output={logs}/%j.out", "--export=ALL", str(REPO / "slurm/eval.sbatch"), *args]
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().split(";")[0]


def test_eval_job_scores_a_run_and_a_resubmission_skips_what_is_done(tmp_path):
    assert _slurm_up(), "MOP_REQUIRE_SLURM=1 but no SLURM cluster answers"
    data = make_eval_data_dir(tmp_path / "data")
    run = tmp_path / "run"
    proc = train_tiny(data, run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = write_fixtures(tmp_path / "bench", ["triviaqa", "nq_open"])
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {
        **os.environ,
        "PY": str(REPO / ".venv/bin/python"),
        "MOP_SLURM_DIR": str(REPO / "slurm"),  # submitted from elsewhere than the repo
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    args = [str(run), "--suite", "ppl,triviaqa,nq_open", "--limit", "2"]
    args += ["--benchmark-dir", str(bench)]
    logs_of = []
    for _ in range(2):
        job = _submit(args, logs, env, tmp_path)
        try:
            _wait(lambda job=job: _job_state(job)[0] == "GONE" or None, 300, f"eval job {job}")
        finally:
            subprocess.run(["scancel", job], capture_output=True)
        logs_of.append((logs / f"{job}.out").read_text())
    first, second = logs_of
    assert "on 0 GPU(s)" in first and "[eval] wrote" in first, first[-3000:]
    results = json.loads((run / "checkpoints/step_00000004/results.json").read_text())
    assert set(results["tasks"]) == {"triviaqa", "nq_open"} and results["ppl"]["loss"] > 0
    assert "[eval] triviaqa: f1 " in first and "already in results.json" not in first
    assert second.count("already in results.json") == 2 and "[eval] triviaqa: f1 " not in second


REQUEUES_ONCE = """#!/usr/bin/env bash
#SBATCH --requeue
#SBATCH --open-mode=append
echo "run ${SLURM_RESTART_COUNT:-0}"
if [ "${SLURM_RESTART_COUNT:-0}" -eq 0 ]; then scontrol requeue "$SLURM_JOB_ID"; exit 0; fi
echo finished
"""


def test_afterok_waits_through_a_requeue(tmp_path):
    """`sweep --eval` relies on this: train.sbatch requeues itself (`scontrol requeue`, then
    exit 0), and the afterok evaluation must wait for the resumed run, not start after the
    first, interrupted one."""
    assert _slurm_up(), "MOP_REQUIRE_SLURM=1 but no SLURM cluster answers"
    script, marker = tmp_path / "train_like.sh", tmp_path / "dependent.out"
    script.write_text(REQUEUES_ONCE)
    common = ["sbatch", "--parsable", "--cpus-per-task=1", "--time=5"]
    train = subprocess.run(
        [*common, f"--output={tmp_path}/train.out", str(script)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dependent = subprocess.run(
        [*common, f"--dependency=afterok:{train}", f"--output={marker}", "--wrap", "echo ran"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        _wait(lambda: _job_state(train) == ("PENDING", "BeginTime"), 60, "the requeue")
        assert _job_state(dependent) == ("PENDING", "Dependency")
        # a requeued job is held ~2 minutes; release it now
        subprocess.run(["scontrol", "update", f"jobid={train}", "StartTime=now+1"], check=True)
        _wait(lambda: _job_state(dependent)[0] == "GONE" or None, 120, "the dependent job")
    finally:
        subprocess.run(["scancel", train, dependent], capture_output=True)
    log = (tmp_path / "train.out").read_text()
    assert "run 1" in log and "finished" in log and marker.read_text().strip() == "ran"
