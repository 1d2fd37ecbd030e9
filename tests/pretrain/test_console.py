"""The training console: what `python -m pretrain` prints to a log (a pipe here, not a tty),
read from a tiny real run; the bar mode, the chatter filter and the formatters in-process."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pretrain.console import Console, filter_known_chatter, model_label, quiet_third_party
from tests.pretrain.conftest import REPO, subprocess_env, train_overrides

TINY = str(REPO / "configs/train/tiny_cpu.yaml")
STEP_LINE = re.compile(
    r"^\[train\] step (\d+)/(\d+) \| loss (\d+\.\d{4}) \| lr \S+ \| grad norm \d+\.\d+ \| "
    r"\S+ tok/s \| MFU \S+ \| peak RSS [\d.]+ [KMG]?B \| ETA \S+$"
)


def run_pretrain_cli(overrides: list[str]) -> subprocess.CompletedProcess:
    """`python -m pretrain` exactly as a user types it (no test wrapper: the wrapper imports
    DeepSpeed before the entry point does), output through pipes as in a SLURM log."""
    cmd = [sys.executable, "-m", "pretrain", "--config", "configs/train/tiny_cpu.yaml"]
    res = subprocess.run(
        [*cmd, *overrides],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def metrics_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """A fresh 6-step run (a step line every 2 steps, checkpoints at 3 and 6, validation at 5),
    then the same run extended to 8 steps (a resume)."""
    run = tmp_path_factory.mktemp("console_run")
    over = {"max_steps": 6, "logging.log_interval": 2}
    first = run_pretrain_cli(train_overrides(data_dir, run, **over))
    # the resumed run knows its device's peak: MFU is shown
    more = {**over, "max_steps": 8, "logging.peak_tflops": 0.001}
    second = run_pretrain_cli(train_overrides(data_dir, run, **more))
    return run, first, second


def test_banner_startup_phases_and_no_chatter(runs):
    run, res, _ = runs
    out = res.stdout
    lines = out.splitlines()
    assert lines[0].startswith("[train] starting: importing torch")
    for phase in ("importing DeepSpeed", "building the model", "building the DeepSpeed engine"):
        assert any(ln.startswith(f"[train] {phase} ... (+") for ln in lines), phase
    banner = re.search(
        r"^\[train\] model tiny_moe: ([\d.]+)K params, ([\d.]+)K active per token "
        r"\(moe 4/top2, 1 layers, d 32\)$",
        out,
        re.M,
    )
    assert banner, out
    total, active = float(banner[1]), float(banner[2])
    assert active < total  # top-2 of 4 experts
    assert "[train] layout: world 1 (dp 1, tp 1, ep 1), ZeRO-1, fp32, global batch 4 x 32" in out
    assert "[train] plan: 6 steps x 128 tokens = 768 tokens" in out
    assert f"[train] run dir: {run} (checkpoints: {run / 'checkpoints'})" in out
    assert "[train] fresh start" in out
    assert "[train] MFU: not shown; set logging.peak_tflops" in out
    # Third-party start-up chatter: DeepSpeed's op-build print, its logger, a bar in a log.
    assert "built successfully" not in out + res.stderr
    assert "[WARNING]" not in res.stderr and "[INFO]" not in out + res.stderr
    assert "\r" not in out and "\r" not in res.stderr


def test_step_checkpoint_eval_lines_and_summary(runs):
    run, res, _ = runs
    out = res.stdout
    steps = [m for ln in out.splitlines() if (m := STEP_LINE.match(ln))]
    assert [int(m[1]) for m in steps] == [2, 4, 6]  # every logging.log_interval steps
    assert all(m[2] == "6" for m in steps)
    losses = metrics_losses(run)
    for m in steps:  # the console shows what metrics.jsonl holds
        assert m[3] == f"{losses[int(m[1])]:.4f}"
    for step in (3, 6):
        assert re.search(
            rf"^\[train\] checkpoint step_{step:08d} saved in [\d.]+s \([\d.]+ [KM]B, loop "
            r"blocked [\d.]+s(, [\d.]+s of it waiting for the previous save)?\)$",
            out,
            re.M,
        ), out
    assert re.search(r"^\[train\] eval step 5: val loss \d+\.\d{4}, ppl [\d.]+$", out, re.M)
    assert re.search(r"^\[train\] done: step 6/6 \(6 this run, 0 skipped\), 768 tokens;", out, re.M)
    assert f"[train] final loss {losses[6]:.4f}, val loss " in out
    assert f"last checkpoint {run / 'checkpoints' / 'step_00000006'}" in out
    # the summary comes last
    assert out.splitlines()[-1].startswith("[train] outputs: ")


def test_doctor_checkpoint_estimate_matches_the_real_checkpoint(runs, data_dir):
    """pretrain.doctor's disk check sizes checkpoints from the parameter count: compare it
    with the size of the checkpoint this run wrote (fp32, ZeRO-1)."""
    from mop.config import load_config
    from pretrain.config import TrainConfig
    from pretrain.doctor_job import checkpoint_bytes

    run, _, _ = runs
    cfg = load_config(
        TrainConfig, str(REPO / "configs/train/tiny_cpu.yaml"), train_overrides(data_dir, run)
    )
    real = sum(
        f.stat().st_size for f in (run / "checkpoints/step_00000006").rglob("*") if f.is_file()
    )
    estimate = checkpoint_bytes(cfg, "fp32")
    assert real <= estimate <= 1.3 * real, (real, estimate)


def test_resume_banner(runs):
    run, _, res = runs
    out = res.stdout
    assert "[train] resumed from step_00000006 (step 6, 768 tokens seen); 2 steps to go" in out
    assert "fresh start" not in out
    steps = [int(m[1]) for ln in out.splitlines() if (m := STEP_LINE.match(ln))]
    assert steps == [8]
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    mfu = [r for r in records if "loss" in r][-1]["mfu"]  # checkpoint records follow it
    assert f"| MFU {100 * mfu:.1f}% |" in out
    assert "MFU: not shown" not in out
    assert "[train] done: step 8/8 (2 this run, 0 skipped), 1.02K tokens;" in out


def _fake_trainer(step: int, max_steps: int = 10):
    return SimpleNamespace(
        state=SimpleNamespace(step=step), cfg=SimpleNamespace(max_steps=max_steps)
    )


def test_interactive_bar_and_plain_log():
    values = {"loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0}
    outputs = {}
    for bar in (True, False):
        stream = io.StringIO()
        con = Console(rank=0, stream=stream, bar=bar)
        con.max_steps = 10
        for step in (1, 2):
            con.on_step_end(_fake_trainer(step), SimpleNamespace(seconds=0.1, loss=2.5))
        con.on_metrics(2, values)
        con._bar and con._bar.close()
        outputs[bar] = stream.getvalue()
    assert "\r" in outputs[True] and "train" in outputs[True]  # a live bar redraws in place
    assert "\r" not in outputs[False]
    assert outputs[False].startswith("[train] step 2/10 | loss 2.5000 | lr 1.00e-03")
    assert "[train] step 2/10" in outputs[True]


def test_other_ranks_print_nothing():
    stream = io.StringIO()
    con = Console(rank=1, stream=stream, bar=False)
    con.line("x")
    con.on_metrics(1, {"loss": 1.0, "lr": 1.0})
    con.on_step_end(_fake_trainer(1), SimpleNamespace(seconds=0.1, loss=1.0))
    con.on_some_future_hook(1, 2)  # hooks the console does not use are no-ops
    assert stream.getvalue() == ""


def test_filter_known_chatter_keeps_other_lines(capsys):
    with filter_known_chatter():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something a user must see")
        # shown while the block still runs (a start-up phase may hang)
        assert capsys.readouterr().out == "something a user must see\n"
        print("a line", end="")
        print(" in two writes")
        print("no newline yet", end="")
    assert capsys.readouterr().out == "a line in two writes\nno newline yet"


def test_model_label(tmp_path):
    cfg = tmp_path / "t.yaml"
    cfg.write_text("model: configs/model/tiny_moe.yaml\n")
    assert model_label(str(cfg), []) == "tiny_moe"
    assert model_label(str(cfg), ["model=configs/model/moe_d512_e8.yaml"]) == "moe_d512_e8"
    cfg.write_text("model:\n  d_model: 8\n")
    assert model_label(str(cfg), []) == "inline"


def test_known_third_party_warning_is_ignored_others_shown():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        warnings.warn(
            "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
            "`torch.distributed.all_gather_single` instead.",
            FutureWarning,
            stacklevel=1,
        )
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_two_processes_print_once_and_no_warnings(data_dir, tmp_path):
    """Under torchrun only rank 0 prints, and a normal multi-process start shows no
    third-party warnings (DeepSpeed's ZeRO triggers a torch FutureWarning on each rank)."""
    from pretrain.launch import free_port

    over = train_overrides(
        data_dir,
        tmp_path,
        max_steps=2,
        **{"parallel.expert_parallel": 2, "eval.interval": 0, "schedule.warmup_steps": 1},
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd = [*torchrun, f"--master_port={free_port()}", "-m", "pretrain", "--config", TINY]
    res = subprocess.run(
        [*cmd, *over], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert res.stdout.count("[train] fresh start") == 1
    assert res.stdout.count("[train] starting: importing torch") == 1
    assert "[train] layout: world 2 (dp 2, tp 1, ep 2)" in res.stdout
    assert [int(m[1]) for ln in res.stdout.splitlines() if (m := STEP_LINE.match(ln))] == [1, 2]
    assert "Warning" not in res.stderr and "[WARNING]" not in res.stdout + res.stderr, res.stderr
