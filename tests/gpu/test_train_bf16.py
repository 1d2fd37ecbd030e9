"""Issue 4 point 10 on a GPU: a bf16 run of a 20-layer MoE (d=512, E=8) with the megablocks
backend over a few hundred steps on generated shards; the loss falls, and a run stopped by
SIGTERM (exit 75) resumes from its checkpoint under NCCL and finishes.

Skips cleanly without CUDA or without megablocks. Writes metrics under $OUT when set.
Run: `OUT=/tmp/out python -m pytest tests/gpu/test_train_bf16.py -s`
(tests/gpu/run_device_checks.sh runs it on the lent GPU).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gpu.test_moe_backends import megablocks_usable
from tests.pretrain.conftest import REPO, make_data_dir

pytestmark = pytest.mark.gpu
USABLE, WHY = megablocks_usable()
STEPS = int(os.environ.get("MOP_GPU_TRAIN_STEPS", "300"))


def _overrides(data: Path, run: Path) -> list[str]:
    return [
        "model=configs/model/moe_d512_e8.yaml",
        "model.vocab_size=512",  # the generated shards use 512 token ids
        "model.moe.backend=megablocks",
        f"data.data_dir={data}",
        "data.seq_len=32",
        f"run_dir={run}",
        "precision=bf16",
        "zero_stage=1",
        "batch.micro_batch=16",
        "batch.grad_accum=1",
        "optim.lr=1e-3",
        "schedule.warmup_steps=20",
        f"max_steps={STEPS}",
        "checkpoint.interval=50",
        "eval.interval=100",
        "logging.wandb_mode=disabled",
        "logging.log_interval=1",
        "logging.peak_tflops=989",
    ]


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.mark.skipif(not USABLE, reason=WHY)
def test_bf16_megablocks_moe_trains_and_resumes(tmp_path):
    data = make_data_dir(tmp_path / "data")
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "pretrain",
        "--config",
        str(REPO / "configs/train/tiny_cpu.yaml"),
        *_overrides(data, run),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    # stop it once it is past its first checkpoint, as SLURM would before a time limit
    deadline = time.time() + 900
    while proc.poll() is None and time.time() < deadline:
        if (run / "metrics.jsonl").is_file() and len(_losses(run)) >= STEPS // 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75, out[-3000:]
    stopped = max(_losses(run))
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resumed from step_{stopped:08d}" in res.stdout
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = sum(losses[s] for s in range(1, 11)) / 10
    last = sum(losses[s] for s in range(STEPS - 9, STEPS + 1)) / 10
    assert last < 0.7 * first, (first, last)
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"])
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(run / "metrics.jsonl", dest / "train_bf16_metrics.jsonl")
        print(
            f"[gpu] bf16 megablocks MoE: loss {first:.3f} -> {last:.3f}, stopped at {stopped}, resumed"
        )
