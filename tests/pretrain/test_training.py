"""Single-process CPU training through the real entry point: loss falls, exact resume after
kill -9, a kill during a save, SIGTERM, non-finite steps. Faults come from fault_wrapper.py."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest

from pretrain.checkpoint import POINTER, read_pointer, tag_of
from pretrain.trainer import NONFINITE_EXIT_CODE, REQUEUE_EXIT_CODE
from tests.pretrain.conftest import run_trainer, train_overrides


def step_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def check_ok(res, code: int = 0) -> None:
    assert res.returncode == code, (
        f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    )


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> dict[int, float]:
    """An uninterrupted 20-step run (checkpoint every 3 steps)."""
    run = tmp_path_factory.mktemp("ref")
    check_ok(run_trainer(train_overrides(data_dir, run)))
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 21))
    return losses


def test_loss_falls_and_run_dir(reference, data_dir, tmp_path):
    first = sum(reference[s] for s in (1, 2, 3)) / 3
    last = sum(reference[s] for s in (18, 19, 20)) / 3
    assert last < first - 0.2, (first, last)


def test_kill9_resume_is_exact(reference, data_dir, tmp_path):
    kill_at = random.Random(1234).randint(7, 16)  # a step between checkpoints
    over = train_overrides(data_dir, tmp_path)
    res = run_trainer(over, {"MOP_TEST_KILL_AT_STEP": str(kill_at)})
    assert res.returncode == -signal.SIGKILL
    saved = read_pointer(tmp_path / "checkpoints")
    # The newest save before the kill, or the one before it when the kill came while the
    # newest was still being written in the background (checkpoint.async_save).
    assert saved in (tag_of(kill_at // 3 * 3), tag_of(kill_at // 3 * 3 - 3))
    check_ok(run_trainer(over))
    assert step_losses(tmp_path) == reference  # bit-identical, every step


def test_kill_during_save_resumes_previous_complete(reference, data_dir, tmp_path):
    over = train_overrides(data_dir, tmp_path)
    res = run_trainer(over, {"MOP_TEST_KILL_IN_SAVE_STEP": "9"})
    assert res.returncode == -signal.SIGKILL
    ckpt = tmp_path / "checkpoints"
    assert read_pointer(ckpt) == tag_of(6)  # the half-written step 9 is not pointed at
    assert (ckpt / tag_of(9)).is_dir()
    res = run_trainer(over)
    check_ok(res)
    assert f"resumed from {tag_of(6)}" in res.stdout
    assert step_losses(tmp_path) == reference
    # keep_last=2: only the two newest complete saves remain, the half-written one is gone
    assert sorted(p.name for p in ckpt.glob("step_*")) == [tag_of(18), tag_of(20)]


def test_sigterm_saves_and_exits_with_requeue_code(data_dir, tmp_path):
    res = run_trainer(train_overrides(data_dir, tmp_path), {"MOP_TEST_SIGTERM_AT_STEP": "4"})
    check_ok(res, REQUEUE_EXIT_CODE)
    # the step in flight (the 5th) finished, then a checkpoint of it was written
    assert (tmp_path / "checkpoints" / POINTER).read_text().strip() == tag_of(5)
    assert max(step_losses(tmp_path)) == 5


@pytest.mark.parametrize(
    "zero_stage,precision", [(1, "fp32"), (0, "fp32"), (1, "bf16"), (2, "bf16"), (0, "bf16")]
)
def test_nonfinite_step_is_skipped_and_counted(data_dir, tmp_path, zero_stage, precision):
    # bf16: the GPU's path (DeepSpeed's bf16 overflow check; stage 0 wraps the optimizer).
    over = train_overrides(
        data_dir, tmp_path, max_steps=8, zero_stage=zero_stage, precision=precision
    )
    res = run_trainer(over, {"MOP_TEST_NAN_STEPS": "4"})
    check_ok(res)
    recs = {
        r["step"]: r
        for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    }
    assert recs[5]["step_applied"] is False and recs[5]["skipped_steps"] == 1
    assert recs[4]["lr"] == recs[5]["lr"]  # no update, so the schedule did not advance
    # the NaN never reached the weights: every later loss is finite
    assert all(isinstance(recs[s]["loss"], float) for s in (6, 7, 8))
    # every path logs the global gradient norm of its applied steps (fp32 stage 0 too)
    assert all(isinstance(recs[s]["grad_norm"], float) for s in (1, 2, 6, 8))
    assert recs[8]["skipped_steps"] == 1


def test_nonfinite_in_a_row_stops_keeping_last_good(data_dir, tmp_path):
    over = train_overrides(
        data_dir, tmp_path, max_nonfinite_in_a_row=3, **{"checkpoint.interval": 2}
    )
    res = run_trainer(over, {"MOP_TEST_NAN_STEPS": "4,5,6,7,8"})
    check_ok(res, NONFINITE_EXIT_CODE)
    assert read_pointer(tmp_path / "checkpoints") == tag_of(4)
    assert max(step_losses(tmp_path)) == 7


def test_stop_signal_during_startup_still_requeues(data_dir, tmp_path):
    """SIGTERM while `python -m pretrain` is still importing torch / DeepSpeed (preemption
    right after the job starts): the handler is already in place, so the run takes one step,
    saves it and exits with the requeue code instead of dying with a code SLURM would not
    requeue."""
    import subprocess
    import sys
    import time

    from tests.pretrain.conftest import REPO, subprocess_env

    env = subprocess_env()
    cmd = [sys.executable, "-m", "pretrain", "--config", "configs/train/tiny_cpu.yaml"]
    proc = subprocess.Popen(
        [*cmd, *train_overrides(data_dir, tmp_path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)  # the handler is installed within ~0.1 s; torch alone takes longer to import
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == REQUEUE_EXIT_CODE, out[-2000:] + err[-3000:]
    assert "fresh start" in out  # the signal arrived before training started
    steps = sorted(step_losses(tmp_path))
    assert steps and steps == list(range(1, len(steps) + 1))
    assert read_pointer(tmp_path / "checkpoints") == tag_of(steps[-1])
