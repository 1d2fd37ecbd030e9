"""The bf16 training path on CPU: the optimizer path a GPU run takes, checked where CI runs.

DeepSpeed's bf16 runs on the CPU accelerator with the same engine code as on a GPU: bf16
module weights and fp32 master partitions, saved as fp32 masters and moments (the
layout-free format, pretrain/checkpoint.py). These tests run what only the GPU default
(precision=bf16) exercises: resharding a bf16 checkpoint onto more data-parallel ranks, and
expert parallelism with the clipped update and resume, tensor parallelism.

Tolerance. bf16 rounds every activation and gradient, and a different process layout sums in
another order, so parallel and serial bf16 runs are not bitwise equal. Measured over 20 steps:
max relative loss difference 9e-6 (DP resize) and 3.6e-5 / 6.7e-5 (EP=2, ZeRO 1 / 2). LOSS_RTOL
= 1e-3 keeps a 15x margin while a lost expert shard, a wrong clip coefficient or a missing
optimizer moment moves the loss by 1e-3 or more within a few steps. A resume in the same
layout replays the same arithmetic, so it must be exact.
"""

from __future__ import annotations

import shutil

import pytest

from pretrain.checkpoint import POINTER, saved_layout, tag_of
from tests.pretrain.conftest import train_overrides
from tests.pretrain.runs import assert_same_run, metrics, run_pretrain

LOSS_RTOL = 1e-3
BF16 = {"model.n_kv_heads": 2, "checkpoint.interval": 10, "precision": "bf16"}


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_checkpoint_resumes_on_more_ranks(stage, data_dir, tmp_path):
    dense = {**BF16, "model.ffn": "dense", "zero_stage": stage}
    ref_run = tmp_path / "serial"
    run_pretrain(train_overrides(data_dir, ref_run, **dense), nproc=1)
    tag_dir = ref_run / "checkpoints" / tag_of(10)
    layout = saved_layout(tag_dir)  # the layout-free format holds the fp32 masters
    assert (layout["format"], layout["precision"], layout["dp"], layout["tp"]) == (2, "bf16", 1, 1)

    resumed = tmp_path / "dp2"
    shutil.copytree(tag_dir, resumed / "checkpoints" / tag_of(10))
    (resumed / "checkpoints" / POINTER).write_text(tag_of(10) + "\n")
    res = run_pretrain(train_overrides(data_dir, resumed, **dense, **{"batch.grad_accum": 1}), 2)
    assert f"resumed from {tag_of(10)}" in res.stdout and "dp 2" in res.stdout
    ref, got = metrics(ref_run), metrics(resumed)
    assert sorted(s for s in got if "loss" in got[s]) == list(range(11, 21))
    assert_same_run(ref, got, range(11, 21), rtol=LOSS_RTOL, grad_norm_rtol=LOSS_RTOL)


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_expert_parallel_matches_serial_and_resumes_exactly(stage, data_dir, tmp_path):
    # One sequence per micro-batch: see test_parallel_equivalence.test_ep2_moe_matches_serial.
    # grad_clip 0.3 is below every step's norm (~0.7), so every update is a clipped one.
    moe = {**BF16, "batch.micro_batch": 1, "optim.grad_clip": 0.3, "zero_stage": stage}
    ref_run, ep_run = tmp_path / "serial", tmp_path / "ep2"
    run_pretrain(train_overrides(data_dir, ref_run, **moe, **{"batch.grad_accum": 4}), 1)
    ep = {**moe, "batch.grad_accum": 2, "parallel.expert_parallel": 2}
    res = run_pretrain(train_overrides(data_dir, ep_run, **ep), 2)
    assert "ep 2" in res.stdout
    ref, got = metrics(ref_run), metrics(ep_run)
    assert all(ref[s]["grad_norm"] > 0.3 for s in range(1, 21))
    assert_same_run(ref, got, range(1, 21), rtol=LOSS_RTOL, grad_norm_rtol=LOSS_RTOL)

    # Resume from step 10 in the same layout: each rank must get its own experts back.
    first = metrics(ep_run)
    shutil.rmtree(ep_run / "checkpoints" / tag_of(20))
    (ep_run / "checkpoints" / POINTER).write_text(tag_of(10) + "\n")
    (ep_run / "metrics.jsonl").unlink()
    res = run_pretrain(train_overrides(data_dir, ep_run, **ep), 2)
    assert f"resumed from {tag_of(10)}" in res.stdout
    again = metrics(ep_run)
    for s in range(11, 21):
        assert again[s]["loss"] == first[s]["loss"], s
        assert again[s]["grad_norm"] == first[s]["grad_norm"], s


def test_bf16_tensor_parallel_moe_matches_serial(data_dir, tmp_path):
    # Measured: loss 3.4e-5, grad norm 5.1e-4 relative (bf16 gradients summed in another order).
    moe = {**BF16, "zero_stage": 1}
    ref_run, tp_run = tmp_path / "serial", tmp_path / "tp2"
    run_pretrain(train_overrides(data_dir, ref_run, **moe), 1)
    run_pretrain(train_overrides(data_dir, tp_run, **moe, **{"parallel.tensor_parallel": 2}), 2)
    assert saved_layout(tp_run / "checkpoints" / tag_of(20))["tp"] == 2
    ref, got = metrics(ref_run), metrics(tp_run)
    assert_same_run(ref, got, range(1, 21), rtol=LOSS_RTOL, grad_norm_rtol=5e-3)
