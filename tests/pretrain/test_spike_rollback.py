"""Loss-spike rollback (pretrain/spike.py): the detector, the skipped sample ranges of the data
order, and whole runs through the real entry point with `fault.spike_at_step` (a damaging
update) or non-finite steps from the test wrapper: recovery, a clean run that never rolls
back, kill -9 after a rollback, two gloo processes, a rollback to the initial weights, and
exit 67 after too many rollbacks (also through slurm/train.sbatch, which must not requeue it)."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
from pathlib import Path

import pytest

from data_prep.manifest import load_manifest
from mop.config import load_config
from mop.errors import ConfigError
from pretrain.checkpoint import read_pointer, tag_of
from pretrain.config import DataConfig, SpikeConfig, TrainConfig
from pretrain.data import TrainData
from pretrain.spike import LEDGER, SPIKE_EXIT_CODE, SpikeDetector, StepRecord
from tests.pretrain.conftest import REPO, SEQ_LEN, run_trainer, train_overrides
from tests.pretrain.runs import RTOL, run_pretrain

TINY = REPO / "configs/train/tiny_cpu.yaml"


# The detector ------------------------------------------------------------------------------
def _feed(det: SpikeDetector, losses, norms=None, applied=None, start_step: int = 1):
    """Observe a sequence of steps (4 samples each); the list of (step, Spike) detections."""
    found = []
    for j, loss in enumerate(losses):
        step = start_step + j
        rec = StepRecord(
            step,
            4 * (step - 1),
            4 * step,
            loss,
            1.0 if norms is None else norms[j],
            True if applied is None else applied[j],
        )
        spike = det.observe(rec)
        if spike is not None:
            found.append((step, spike))
    return found


def _noisy_curve(n: int, seed: int, noise: float, floor: float = 2.0) -> list[float]:
    """A falling loss with multiplicative noise, heavy-tailed now and then (a clean run)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        level = floor + 6.0 * 0.995**i
        jolt = 1 + noise * rng.gauss(0, 1) + (0.15 if rng.random() < 0.02 else 0.0)
        out.append(level * jolt)
    return out


def test_one_noisy_step_is_not_an_alarm_a_sustained_jump_is():
    det = SpikeDetector(SpikeConfig(min_history=10))
    base = _noisy_curve(40, seed=0, noise=0.01)
    assert _feed(det, base) == []
    # three huge steps in a row, then normal again: fewer than min_suspicious=4 in the window
    assert _feed(det, [80.0, 90.0, 85.0], start_step=41) == []
    assert det.suspect  # a save now waits
    assert _feed(det, base[-8:], start_step=44) == []
    assert not det.suspect  # the window (8 steps) moved past them
    found = _feed(det, [60.0] * 4, start_step=52)
    assert [s for s, _ in found] == [55]
    spike = found[0][1]
    assert spike.first == 52 and spike.counts == {"loss": 4}
    # the batches from one step before the first suspicious one through the detection step
    assert spike.skip_steps == (51, 55) and spike.skip_samples == (4 * 50, 4 * 55)
    assert spike.latest_save_step == 50  # update 51 may have done the damage
    assert spike.reference_loss == pytest.approx(sorted(base)[20], rel=0.2)


def test_gradient_norm_explosion_and_non_finite_steps_count():
    det = SpikeDetector(SpikeConfig(min_history=10))
    losses = _noisy_curve(30, seed=1, noise=0.01)
    norms = [0.5 + 0.05 * (i % 3) for i in range(30)]
    assert _feed(det, losses, norms) == []
    # loss unchanged, norm x40 on two steps, two non-finite (skipped) steps: a spike
    found = _feed(
        det,
        losses[-4:],
        [20.0, 0.5, 22.0, 0.5],
        [True, False, True, False],
        start_step=31,
    )
    assert [s for s, _ in found] == [34]
    assert found[0][1].counts == {"grad_norm": 2, "non-finite": 2}


def test_a_model_leaving_a_plateau_is_not_a_spike():
    """A synthetic task's loss sits at chance with a tiny gradient, then the model starts to
    memorize: the gradient norm grows 30-fold for hundreds of steps while the loss holds, rises
    by 10% and then falls (a phone-book run at lr 1e-2 rolled back twice on this). Gradient-norm
    alarms alone neither roll back nor hold saves back, and the new level becomes the reference;
    a loss spike afterwards is still caught."""
    det = SpikeDetector(SpikeConfig())
    rng = random.Random(3)
    plateau = [2.30 * (1 + 0.005 * rng.gauss(0, 1)) for _ in range(110)]
    tiny = [0.02 * (1 + 0.1 * rng.gauss(0, 1)) for _ in range(110)]
    assert _feed(det, plateau, tiny) == []
    escape = [2.30 * (1.1 - 0.6 * i / 400) * (1 + 0.01 * rng.gauss(0, 1)) for i in range(400)]
    big = [0.6 * (1 + 0.2 * rng.gauss(0, 1)) for _ in range(400)]
    assert _feed(det, escape, big, start_step=111) == []
    kinds = [r.why for r in det.recent]
    assert "loss" not in kinds and "non-finite" not in kinds and not det.suspect
    # the reference moved to the new gradient level: these steps are normal again
    assert det.classify(escape[-1], 0.6, True) == ""
    found = _feed(det, [escape[-1] * 3] * 4, [0.6] * 4, start_step=511)
    assert [s for s, _ in found] == [514] and found[0][1].counts == {"loss": 4}


def test_gradient_norm_alarms_alone_are_not_a_spike_but_count_towards_one():
    det = SpikeDetector(SpikeConfig(min_history=10))
    losses = _noisy_curve(30, seed=1, noise=0.01)
    norms = [0.5 + 0.05 * (i % 3) for i in range(30)]
    assert _feed(det, losses, norms) == []
    assert _feed(det, losses[-6:], [25.0] * 6, start_step=31) == []  # 6 of 8: norm only
    assert not det.suspect
    # one loss alarm joins the norm alarms in the window: a spike, from the first norm alarm
    found = _feed(det, [40.0], [25.0], start_step=37)
    assert [s for s, _ in found] == [37]
    assert found[0][1].counts == {"grad_norm": 6, "loss": 1} and found[0][1].first == 31


def test_a_clean_noisy_run_never_alarms_with_the_defaults():
    """Thousands of steps of realistic curves (3% noise, 2% of steps jolted by +15%, a small
    loss near zero with 30% noise): no spike, and no step even looks suspicious."""
    for seed in range(5):
        det = SpikeDetector(SpikeConfig())
        assert _feed(det, _noisy_curve(3000, seed=seed, noise=0.03)) == []
        assert not any(r.why for r in det.recent)
    det = SpikeDetector(SpikeConfig())
    rng = random.Random(7)
    small = [max(1e-4, 0.02 * (1 + 0.3 * rng.gauss(0, 1))) for _ in range(3000)]
    assert _feed(det, small) == []


def test_detector_state_round_trips_through_json():
    det = SpikeDetector(SpikeConfig(min_history=5))
    _feed(det, _noisy_curve(12, seed=2, noise=0.01) + [50.0, 50.0])
    again = SpikeDetector(SpikeConfig(min_history=5))
    again.load_state_dict(json.loads(json.dumps(det.state_dict())))
    assert again.state_dict() == det.state_dict() and again.suspect
    assert _feed(again, [50.0, 50.0], start_step=15)[0][0] == 16  # picks up where it was


def test_lr_cool_down_after_a_rollback_and_the_fault_factor():
    """spike.lr_factor for spike.lr_steps steps after the save returned to; the schedule's
    own value is the base, so applying it twice never compounds; back to the schedule after."""
    import torch

    from pretrain.config import FaultConfig
    from pretrain.spike import SpikeGuard, set_lr_factor

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param, torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 2.0})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    engine = type("Engine", (), {"lr_scheduler": sched})()
    for _ in range(3):
        opt.step()
        sched.step()
    base = [g["lr"] for g in opt.param_groups]
    set_lr_factor(engine, 0.1)
    set_lr_factor(engine, 0.1)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * 0.1 for b in base])
    set_lr_factor(engine, 1.0)
    assert [g["lr"] for g in opt.param_groups] == base

    guard = SpikeGuard(
        SpikeConfig(lr_factor=0.5, lr_steps=3), FaultConfig(), None, "/nonexistent", 0
    )
    guard.rollbacks = [{"to_step": 10, "lr_factor": 0.5, "lr_until_step": 13, "stopped": False}]
    assert [guard.lr_factor(s) for s in (10, 11, 13, 14)] == [1.0, 0.5, 0.5, 1.0]
    guard.rollbacks.append({"to_step": 10, "lr_factor": 0.5, "lr_until_step": 13, "stopped": True})
    assert guard.lr_factor(11) == 0.5  # a stopping spike is not a rollback: the cool-down holds


@pytest.mark.parametrize(
    "override, match",
    [
        ("spike.min_suspicious=9", "spike.min_suspicious=9 > spike.window=8"),
        ("spike.min_history=200", "spike.min_history=200 > spike.history=100"),
        ("spike.loss_ratio=1.0", "loss_ratio"),
        ("fault.spike_at_step=41", "fault.spike_at_step=41 > max_steps=40"),
    ],
)
def test_bad_spike_settings_are_clear_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, TINY, [override])


# Skipped samples in the data order -----------------------------------------------------------
def _train_data(data_dir: Path) -> TrainData:
    cfg = DataConfig(data_dir=str(data_dir), seq_len=SEQ_LEN)
    return TrainData(data_dir, load_manifest(data_dir), cfg)


def test_skipped_ranges_are_never_sampled_and_same_for_any_dp(data_dir):
    d = _train_data(data_dir)
    d.set_skipped([(10, 14), (30, 31), (12, 20), (31, 33)])  # overlapping, touching
    assert d.skipped == [(10, 20), (30, 33)]
    assert d.batch_samples(4, 8) == [4, 5, 6, 7, 8, 9, 20, 21]
    assert d.batch_end(4, 8) == 22
    assert d.batch_samples(12, 4) == [20, 21, 22, 23]  # a position inside a range
    pos, seen = 0, []
    for _ in range(10):
        ids = d.batch_samples(pos, 8)
        for dp in (1, 2, 4):
            assert sorted(i for r in range(dp) for i in d.rank_samples(pos, 8, dp, r)) == ids
        seen += ids
        pos = d.batch_end(pos, 8)
    assert seen == [i for i in range(seen[-1] + 1) if not (10 <= i < 20 or 30 <= i < 33)]
    d.set_skipped([])
    assert d.batch_samples(4, 8) == list(range(4, 12))  # no ranges: the plain order


# Whole runs ----------------------------------------------------------------------------------
# Small enough to judge a 20-step run: the reference holds 4 steps before judging starts.
# One-sequence micro-batches (x4 accumulation): the MoE's load-balancing loss then sums the
# same per-sequence terms on one process and on two (1 x 2 accumulation x dp 2).
ARM = {"spike.min_history": 4, "batch.micro_batch": 1, "batch.grad_accum": 4}
# The update of step 9 is damaged; the save of step 9, taken before anything shows, holds it;
# steps 10.. show it. Saves every 3 steps.
FAULT_AT = 9


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _steps(run_dir: Path) -> dict[int, dict]:
    """The last record of each step (a rollback logs the replayed steps again)."""
    out: dict[int, dict] = {}
    for rec in _records(run_dir):
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def _rollbacks(run_dir: Path) -> list[dict]:
    return [r for r in _records(run_dir) if r.get("event") == "rollback"]


def _final_loss(run_dir: Path) -> float:
    """The training loss of the last 3 steps (4 sequences a step: noisy)."""
    steps = _steps(run_dir)
    last = max(steps)
    return sum(steps[s]["loss"] for s in range(last - 2, last + 1)) / 3


def _final_val_loss(run_dir: Path) -> float:
    """The validation loss of the last step (the same held-out sequences in every run)."""
    val = {r["step"]: r["val_loss"] for r in _records(run_dir) if "val_loss" in r}
    return val[max(val)]


def _ok(res, code: int = 0) -> None:
    assert res.returncode == code, (
        f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )


@pytest.fixture(scope="module")
def clean(data_dir, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("clean")
    _ok(run_trainer(train_overrides(data_dir, run, **ARM)))
    return run


@pytest.fixture(scope="module")
def spiked(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("spiked")
    res = run_trainer(train_overrides(data_dir, run, **ARM, **{"fault.spike_at_step": FAULT_AT}))
    _ok(res)
    return run, res


def test_clean_run_never_rolls_back(clean):
    assert _rollbacks(clean) == []
    assert all(r["rollbacks"] == 0 for r in _steps(clean).values())
    assert not (clean / "checkpoints" / LEDGER).exists()


def test_damaging_update_is_rolled_back_and_the_run_recovers(clean, spiked):
    run, res = spiked
    [event] = _rollbacks(run)
    # step 10 is the first to show the damage; 4 of 8 suspicious steps: declared at step 13;
    # back to the save of step 6: the save of step 9 holds the damaging update (set aside,
    # kept), the one of step 12 was not taken (its window held suspicious steps)
    assert (event["first_step"], event["at_step"], event["to_step"]) == (10, 13, 6)
    assert event["to_tag"] == tag_of(6) and event["skip_steps"] == [9, 13]
    assert event["skip_samples"] == [4 * 8, 4 * 13] and not event["stopped"]
    assert min(event["losses"][-4:]) > 3 * event["reference_loss"]
    assert "ROLLBACK 1: LOSS SPIKE at step 13" in res.stdout
    assert f"back to {tag_of(6)}, skipping samples 32-51 (the batches of steps 9-13)" in res.stdout
    assert "checkpoint of step 12 not taken: steps [10, 11, 12]" in res.stdout
    ckpt = run / "checkpoints"
    assert (ckpt / f"{tag_of(9)}.spike-1").is_dir()  # set aside, not deleted (nor pruned)
    assert res.stdout.count("fault.spike_at_step=9: the update") == 1  # once, not on the replay
    steps = _steps(run)
    assert sorted(steps) == list(range(1, 21))
    # the replay took the same data up to step 8, then the samples after the skipped window
    assert steps[8]["samples"] == 32 and steps[9]["samples"] == 4 * 13 + 4
    assert steps[20]["samples"] == 4 * 13 + 4 * 12
    assert all(steps[s]["rollbacks"] == 1 for s in range(7, 21))
    assert steps[20]["loss"] < 7  # the damage is gone (the spike was ~50)
    ref, got = _final_val_loss(clean), _final_val_loss(run)
    assert got == pytest.approx(ref, rel=0.03), (got, ref)
    ref, got = _final_loss(clean), _final_loss(run)
    assert got == pytest.approx(ref, rel=0.05), (got, ref)
    ledger = json.loads((ckpt / LEDGER).read_text())
    assert ledger["fault_fired_at"] == [FAULT_AT]
    assert [e["skip_samples"] for e in ledger["rollbacks"]] == [[32, 52]]


def test_kill9_after_a_rollback_resumes_with_the_same_skip_list(data_dir, spiked, tmp_path):
    ref_run, _ = spiked
    over = train_overrides(data_dir, tmp_path, **ARM, **{"fault.spike_at_step": FAULT_AT})
    # calls 1-13 are steps 1-13, then the replay from step 6: call 16 would be step 9 again,
    # whose save would be the first after the rollback. Killed before it: only rollbacks.json
    # and the checkpoint pointer (moved back to step 6) know of the rollback.
    res = run_trainer(over, {"MOP_TEST_KILL_AT_CALL": "16"})
    assert res.returncode == -signal.SIGKILL
    ckpt = tmp_path / "checkpoints"
    assert read_pointer(ckpt) == tag_of(6)
    assert json.loads((ckpt / LEDGER).read_text())["rollbacks"][0]["skip_samples"] == [32, 52]
    res = run_trainer(over)
    _ok(res)
    assert f"resumed from {tag_of(6)}" in res.stdout
    assert "fault.spike_at_step=9 already fired in this run" in res.stdout  # once per run
    assert "the update of step" not in res.stdout and "ROLLBACK" not in res.stdout
    ref, got = _steps(ref_run), _steps(tmp_path)
    for s in range(7, 21):  # bit-identical to the uninterrupted run: same skip, same state
        assert (got[s]["loss"], got[s]["samples"]) == (ref[s]["loss"], ref[s]["samples"]), s
    assert len(_rollbacks(tmp_path)) == 1  # the event record survived the resume


def test_rollback_under_two_gloo_processes_matches_one(data_dir, spiked, tmp_path):
    """The same rollback on dp=2 (micro 1 x accum 2 x dp 2: the same global batch of 4 as the
    single-process run): same decision, same skip, same losses."""
    one, _ = spiked
    two = tmp_path / "two"
    fault = {**ARM, "fault.spike_at_step": FAULT_AT, "batch.grad_accum": 2}
    res = run_pretrain(train_overrides(data_dir, two, **fault), nproc=2)
    [e1], [e2] = _rollbacks(one), _rollbacks(two)
    keys = ("at_step", "first_step", "to_step", "skip_samples")
    assert [e2[k] for k in keys] == [e1[k] for k in keys] == [13, 10, 6, [32, 52]]
    assert res.stdout.count("ROLLBACK 1") == 1  # rank 0 only
    a, b = _steps(one), _steps(two)
    for s in range(1, 21):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=RTOL), s
        assert b[s]["samples"] == a[s]["samples"]


def test_non_finite_spike_before_any_interval_save_rolls_back_to_init_then_stops(
    clean, data_dir, tmp_path
):
    """No save but the initial one (checkpoint.interval=100): the rollback restarts from the
    initial weights, whose replay reproduces the clean run exactly. Non-finite steps count as
    suspicious (a rollback, not exit 65). The same steps fail on every replay (the wrapper
    keys them on the step number): the second spike stops with exit 67, not requeued."""
    over = train_overrides(
        data_dir,
        tmp_path,
        **ARM,
        **{"checkpoint.interval": 100, "spike.max_rollbacks": 1, "eval.interval": 0},
    )
    res = run_trainer(over, {"MOP_TEST_NAN_STEPS": "10,11,12,13"})  # steps 11-14
    _ok(res, SPIKE_EXIT_CODE)
    events = _rollbacks(tmp_path)
    assert [(e["at_step"], e["to_step"], e["stopped"]) for e in events] == [
        (14, 0, False),
        (14, 0, True),
    ]
    assert events[0]["why"] == "4 of the last 8 steps suspicious: non-finite 4"
    assert f"back to {tag_of(0)}" in res.stdout
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "2 loss spikes within 1000 steps" in err[0]
    assert "spike.max_rollbacks=1" in err[0] and "rerun the same command" in err[0]
    assert "stopped: repeated loss spikes (exit 67)" in res.stdout
    # the replay from the initial weights: steps 1-9 exactly as the clean run
    records = [r for r in _records(tmp_path) if "loss" in r]
    replay = records[records.index(next(r for r in records if r["step"] == 14)) + 1 :]
    ref = _steps(clean)
    assert [r["step"] for r in replay[:9]] == list(range(1, 10))
    assert all(r["loss"] == ref[r["step"]]["loss"] for r in replay[:9])
    assert read_pointer(tmp_path / "checkpoints") == tag_of(0)
    ledger = json.loads((tmp_path / "checkpoints" / LEDGER).read_text())
    assert len(ledger["rollbacks"]) == 2


def test_train_sbatch_does_not_requeue_exit_67(tmp_path):
    """slurm/train.sbatch with stand-ins: the trainer (under srun) exits 67; the job exits 67,
    says what to do, and never calls `scontrol requeue`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": 'while [ "${1#--}" != "$1" ]; do shift; done; exec "$@"\n',
        "scontrol": 'echo "scontrol $*" >> "$CALLS"; [ "$1" = show ] && echo localhost; exit 0\n',
        "fakepy": '[ "$2" = pretrain ] && exit 67; exit 0\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    calls = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MOP_"))}
    env.update(
        PATH=f"{bin_dir}:{env['PATH']}",
        CALLS=str(calls),
        SLURM_SUBMIT_DIR=str(tmp_path),
        SLURM_JOB_ID="7",
        MOP_SLURM_DIR=str(REPO / "slurm"),
        PY=str(bin_dir / "fakepy"),
    )
    proc = subprocess.run(
        ["bash", str(REPO / "slurm/train.sbatch"), "t.yaml"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == SPIKE_EXIT_CODE, proc.stdout + proc.stderr
    assert "requeue" not in (calls.read_text() if calls.exists() else "")
    assert "exit 67" in proc.stdout and "not requeued" in proc.stdout
