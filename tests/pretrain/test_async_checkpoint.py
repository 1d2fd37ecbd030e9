"""Background saves (checkpoint.async_save, the default for ZeRO 1/2): the loop waits only for
the host copy; the record and the pointer move once the write completed (every rank's: the
multi-process runs of test_reshard.py save in the background too); a kill during a
background write resumes from the previous save; a stop signal exits 75 only after the write
in flight; one save in flight (the next one waits). A slow disk is simulated by
fault_wrapper.py (MOP_TEST_SLOW_SAVE_S: each rank's DCP write first sleeps)."""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest

from pretrain.checkpoint import check_save, list_tags, read_pointer, tag_of
from tests.pretrain.conftest import run_trainer, train_overrides
from tests.pretrain.runs import metrics

SLOW = "1.5"  # seconds per DCP write: longer than the steps between two saves
CKPT_LINE = re.compile(
    r"^\[train\] checkpoint (step_\d+) saved in ([\d.]+)s \(.*, loop blocked ([\d.]+)s"
    r"(?:, ([\d.]+)s of it waiting for the previous save)?\)$",
    re.M,
)


def overrides(data_dir: Path, run: Path, **extra) -> list[str]:
    return train_overrides(data_dir, run, **{"max_steps": 8, "eval.interval": 0, **extra})


def check_ok(res, code: int = 0) -> None:
    assert res.returncode == code, (
        f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    )


def saves_logged(run: Path) -> dict[str, dict]:
    """metrics.jsonl's checkpoint records (two saves may complete at one step)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "checkpoint" in rec:
            out[rec["checkpoint"]] = {**rec, "logged_at": rec["step"]}
    return out


@pytest.fixture(scope="module")
def slow_run(data_dir, tmp_path_factory):
    """A run saving in the background on a slow disk (synchronous saves of the same format:
    tests/pretrain/test_reshard.py's serial dense run)."""
    run = tmp_path_factory.mktemp("async")
    res = run_trainer(overrides(data_dir, run), {"MOP_TEST_SLOW_SAVE_S": SLOW})
    check_ok(res)
    return run, res


def test_background_save_blocks_only_for_the_copy(slow_run):
    run, res = slow_run
    logged = saves_logged(run)
    assert {tag_of(3), tag_of(6), tag_of(8)} <= set(logged)
    for tag in (tag_of(3), tag_of(6)):
        rec = logged[tag]
        assert rec["checkpoint_total_s"] >= float(SLOW)  # written behind the loop's back
        assert rec["logged_at"] > int(tag[5:])  # reported at a later step: training went on
    # the save of step 6 came while step 3's was still being written: it waited for it
    lines = {m[1]: m for m in CKPT_LINE.finditer(res.stdout)}
    assert set(lines) >= {tag_of(3), tag_of(6), tag_of(8)}, res.stdout
    waited = [float(m[4]) for m in lines.values() if m[4]]
    assert waited, res.stdout  # one save in flight: the next one waited (said on its line)
    for tag, m in lines.items():
        assert float(m[3]) == pytest.approx(logged[tag]["checkpoint_blocking_s"], abs=0.01)
        assert float(m[2]) == pytest.approx(logged[tag]["checkpoint_total_s"], abs=0.06)
    # keep_last=2 kept the two newest complete saves, each intact, the pointer on the last
    ckpt = run / "checkpoints"
    assert list_tags(ckpt) == [tag_of(6), tag_of(8)] and read_pointer(ckpt) == tag_of(8)
    assert all(check_save(ckpt / t) for t in list_tags(ckpt))
    # the background saves blocked for the host copy, plus any wait for the save before
    copying = [r["checkpoint_blocking_s"] - r["checkpoint_waited_s"] for r in logged.values()]
    assert max(copying) < float(SLOW) / 3, copying


def test_kill_during_a_background_write_resumes_the_previous_save(slow_run, data_dir, tmp_path):
    """SIGKILL while step 6's files are written in the background (training is at step 7 or
    8 by then): no record, the pointer stays on step 3, and the rerun retrains 4..8 exactly."""
    over = overrides(data_dir, tmp_path)
    env = {"MOP_TEST_KILL_IN_SAVE_STEP": "6", "MOP_TEST_SLOW_SAVE_S": "0.5"}
    res = run_trainer(over, env)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    ckpt = tmp_path / "checkpoints"
    assert read_pointer(ckpt) == tag_of(3)
    assert not (ckpt / tag_of(6) / "integrity.json").exists()
    res = run_trainer(over)
    check_ok(res)
    assert f"resumed from {tag_of(3)}" in res.stdout and "damaged" not in res.stderr
    ref = metrics(slow_run[0])
    got = metrics(tmp_path)
    assert [got[s]["loss"] for s in range(4, 9)] == [ref[s]["loss"] for s in range(4, 9)]


def test_stop_signal_waits_for_the_write_in_flight_then_exits_75(data_dir, tmp_path):
    """SIGTERM during step 5 while step 3's save is still being written: the stop step's save
    waits for it, is written itself, and only then the run exits 75."""
    over = overrides(data_dir, tmp_path)
    env = {"MOP_TEST_SIGTERM_AT_STEP": "4", "MOP_TEST_SLOW_SAVE_S": SLOW}
    res = run_trainer(over, env)
    check_ok(res, 75)
    ckpt = tmp_path / "checkpoints"
    assert read_pointer(ckpt) == tag_of(5) and check_save(ckpt / tag_of(5))
    assert list_tags(ckpt) == [tag_of(3), tag_of(5)]
    logged = saves_logged(tmp_path)
    assert logged[tag_of(5)]["checkpoint_waited_s"] > 0  # it came while step 3's was written
