"""Real SLURM on localhost: a training job signalled before its time limit checkpoints,
exits with the requeue code, is requeued by slurm/train.sbatch and resumes to the end.

Needs a running SLURM (`bash tests/slurm/slurm_localhost.sh up`, which .ci/run does). Without
one the test is skipped, unless MOP_REQUIRE_SLURM=1 says it must run (CI sets it once the
cluster is up), in which case a missing cluster is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.pretrain.conftest import REPO, make_data_dir, train_overrides


def _slurm_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    proc = subprocess.run(["sinfo", "-h"], capture_output=True, text=True)
    return proc.returncode == 0 and bool(proc.stdout.strip())


REQUIRED = os.environ.get("MOP_REQUIRE_SLURM") == "1"
pytestmark = pytest.mark.skipif(
    not REQUIRED and not _slurm_up(), reason="no SLURM cluster (tests/slurm/slurm_localhost.sh up)"
)


def _job_state(job: str) -> tuple[str, str]:
    got = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True)
    if got.returncode != 0 and "Invalid job id" not in got.stderr:
        # slurmctld busy (a socket timeout on a loaded machine) is not "the job ended"
        return ("UNKNOWN", got.stderr.strip())
    out = got.stdout.split()
    return (out[0], out[1]) if len(out) >= 2 else ("GONE", "")


def _wait(pred, timeout: float, what: str, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _trained_steps(run: Path) -> list[int]:
    """The steps of metrics.jsonl's training records (checkpoint and event records carry a
    step too, so counting lines is not counting steps)."""
    return [m["step"] for m in _metrics(run) if "loss" in m]


def test_usr1_checkpoints_requeues_and_resumes(tmp_path):
    assert _slurm_up(), "MOP_REQUIRE_SLURM=1 but no SLURM cluster answers"
    data = make_data_dir(tmp_path / "data")
    run = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    max_steps = 400
    overrides = train_overrides(
        data, run, max_steps=max_steps, **{"checkpoint.interval": 100, "eval.interval": 1000}
    )
    env = {
        **os.environ,
        "PY": str(REPO / ".venv/bin/python"),
        "MOP_SLURM_DIR": str(REPO / "slurm"),  # submitted from elsewhere than the repo
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    job = (
        subprocess.run(
            [
                "sbatch",
                "--parsable",
                "--ntasks-per-node=1",
                "--gpus-per-node=0",
                "--cpus-per-task=1",
                "--time=15",
                f"--output={logs}/%j.out",
                "--export=ALL",
                str(REPO / "slurm/train.sbatch"),
                str(REPO / "configs/train/tiny_cpu.yaml"),
                *overrides,
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .split(";")[0]
    )
    log = logs / f"{job}.out"
    try:
        _wait(lambda: len(_trained_steps(run)) >= 20, 180, "the first training steps")
        # what SLURM does before the time limit with --signal=USR1@300
        subprocess.run(["scancel", "-s", "USR1", job], check=True)
        _wait(lambda: _job_state(job) == ("PENDING", "BeginTime"), 120, "the requeue")
        text = log.read_text()
        assert "exit 75" in text and "requeueing" in text
        stopped_at = _trained_steps(run)[-1]
        assert stopped_at < max_steps
        # a requeued job is held ~2 minutes; release it now
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now+1"], check=True)
        _wait(lambda: _job_state(job)[0] == "GONE" or None, 240, "the resumed job to finish")
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    assert "restart 1" in text and f"resumed from step_{stopped_at:08d}" in text, text[-2000:]
    steps = _trained_steps(run)
    assert steps == list(range(1, max_steps + 1)) or steps == list(range(max_steps)), steps[:5]


def test_two_tasks_under_srun_form_one_job(tmp_path):
    """`srun` with two tasks (what a multi-GPU node runs): ranks come from SLURM_PROCID /
    SLURM_NTASKS / SLURM_LOCALID and the master address from train.sbatch; here with
    expert parallelism over the two ranks, so the all-to-all crosses processes."""
    assert _slurm_up(), "MOP_REQUIRE_SLURM=1 but no SLURM cluster answers"
    data = make_data_dir(tmp_path / "data")
    run = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    overrides = train_overrides(
        data,
        run,
        max_steps=10,
        **{"checkpoint.interval": 5, "batch.grad_accum": 1, "parallel.expert_parallel": 2},
    )
    env = {
        **os.environ,
        "PY": str(REPO / ".venv/bin/python"),
        "MOP_SLURM_DIR": str(REPO / "slurm"),  # submitted from elsewhere than the repo
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        # left over in the submitting shell (a torchrun session, a test's trainer): the job's
        # tasks must take their ranks from srun, not from these
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
    }
    cmd = ["sbatch", "--parsable", "--ntasks-per-node=2", "--gpus-per-node=0"]
    cmd += ["--cpus-per-task=1", "--time=15", f"--output={logs}/%j.out", "--export=ALL"]
    cmd += [str(REPO / "slurm/train.sbatch"), str(REPO / "configs/train/tiny_cpu.yaml")]
    job = subprocess.run(
        [*cmd, *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        _wait(lambda: _job_state(job)[0] == "GONE" or None, 300, "the two-task job")
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = (logs / f"{job}.out").read_text()
    assert "world 2 (dp 2, tp 1, ep 2)" in text, text[-3000:]
    assert _trained_steps(run) == list(range(1, 11)), text[-3000:]
    final = run / "checkpoints" / "step_00000010"
    # both ranks wrote their share of the layout-free save (pretrain/checkpoint_dcp.py)
    assert {p.name for p in (final / "dcp").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
