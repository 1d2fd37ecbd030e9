"""Parallel runs against the serial run on CPU with gloo, 2 processes (DESIGN principle 6).

- TP=2 with sequence parallel: every parameter gradient of one step equals the single-process
  one (dense with tied embeddings, MoE with the load-balancing loss rebuilt over the sequence).
- Through the real entry point under torchrun, 20 steps: TP=2 (dense and MoE) and ZeRO-2 DP=2
  reproduce the serial per-step losses, grad norms and validation losses.
- EP=2 (experts sharded over the two data-parallel ranks, all-to-all dispatch) reproduces
  the serial losses, and resumes from its own checkpoint with each rank's experts restored.
- A DP=1 checkpoint resumed on DP=2 (ZeRO optimizer partitions resharded) sees the same samples
  and continues with the serial losses.

Tolerance: fp32 runs differ only in reduction order (all-reduce/reduce-scatter sums, split
matmuls); measured max relative difference over 20 steps is ~1.2e-7 for every comparison
below. RTOL = 1e-5 leaves two orders of magnitude of margin while still catching any real
error (a wrong scale, a missing all-reduce or a lost optimizer moment shows up at 1e-3 or
more after a step, e.g. a wrong lr on the first resumed step gave 2e-3).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mop.config import load_config
from pretrain.checkpoint import POINTER, saved_layout, tag_of
from pretrain.config import TrainConfig
from pretrain.data import TrainData, open_manifest
from pretrain.launch import free_port
from pretrain.model.transformer import build_model, lm_loss
from pretrain.parallel import build_mesh, init_process_groups, parallelize
from pretrain.parallel.tensor import consolidate_tp_shards
from pretrain.trainer import batch_lm_loss
from tests.pretrain.conftest import train_overrides
from tests.pretrain.runs import (
    TINY,
    assert_same_expert_load,
    assert_same_run,
    metrics,
    run_pretrain,
    saved_weights,
)

RTOL = 1e-5
# n_kv_heads=2 so that kv heads split over tp=2; checkpoints at 10 and 20 for the resize test.
MODEL = {"model.n_kv_heads": 2, "checkpoint.interval": 10, "zero_stage": 2}
DENSE = {**MODEL, "model.ffn": "dense"}


def serial(data_dir, tmp_path_factory, name: str, extra: dict) -> Path:
    run = tmp_path_factory.mktemp(name)
    run_pretrain(train_overrides(data_dir, run, **extra), nproc=1)
    return run


@pytest.fixture(scope="module")
def serial_dense(data_dir, tmp_path_factory) -> Path:
    return serial(data_dir, tmp_path_factory, "serial_dense", DENSE)


@pytest.fixture(scope="module")
def serial_moe(data_dir, tmp_path_factory) -> Path:
    return serial(data_dir, tmp_path_factory, "serial_moe", MODEL)


# One step, every gradient ----------------------------------------------------------------------


def _tp_grad_worker(rank: int, port: int, ffn: str, tied: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    over = [
        "data.data_dir=unused",
        "run_dir=unused",
        "data.seq_len=8",
        "batch.micro_batch=2",
        "model.n_layers=2",
        "model.d_model=32",
        "model.ffn_hidden=32",
        f"model.ffn={ffn}",
        f"model.tie_embeddings={tied}",
        "parallel.tensor_parallel=2",
    ]
    cfg = load_config(TrainConfig, TINY, over)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    ref = build_model(cfg.model)
    o = ref(ids[:, :-1])
    ref_loss = lm_loss(o.logits, ids[:, 1:]) + o.aux_loss
    ref_loss.backward()
    mesh = init_process_groups(build_mesh(cfg, 2, rank))
    torch.manual_seed(0)
    model = parallelize(build_model(cfg.model), cfg, mesh)
    o = model(ids[:, :-1])
    loss = batch_lm_loss(o.logits, ids[:, 1:], mesh) + o.aux_loss
    loss.backward()
    shards = [None, None]
    dist.all_gather_object(shards, {n: p.grad for n, p in model.named_parameters()})
    if rank == 0:
        full = consolidate_tp_shards(shards, {n: p.shape for n, p in ref.named_parameters()})
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        torch.save({"loss": (float(ref_loss), float(loss)), "ref": ref_grads, "tp": full}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("ffn,tied", [("dense", True), ("moe", False)])
def test_tp2_gradients_match_single_process(ffn, tied, tmp_path):
    out = tmp_path / "grads.pt"
    mp.start_processes(
        _tp_grad_worker, args=(free_port(), ffn, tied, str(out)), nprocs=2, start_method="spawn"
    )
    res = torch.load(out, weights_only=False)
    assert res["loss"][1] == pytest.approx(res["loss"][0], rel=1e-6)
    assert res["ref"].keys() == res["tp"].keys()
    for name, g in res["ref"].items():
        torch.testing.assert_close(res["tp"][name], g, rtol=1e-5, atol=1e-7, msg=name)


# 20 steps through the entry point ----------------------------------------------------------------


def test_tp2_dense_matches_serial(serial_dense, data_dir, tmp_path):
    run_pretrain(train_overrides(data_dir, tmp_path, **DENSE, **{"parallel.tensor_parallel": 2}), 2)
    assert saved_layout(tmp_path / "checkpoints" / tag_of(20))["tp"] == 2
    assert_same_run(metrics(serial_dense), metrics(tmp_path), range(1, 21))
    # what eval loads: the tp=2 save's weights equal the serial run's at the same step
    merged = saved_weights(tmp_path / "checkpoints" / tag_of(20))
    serial_states = saved_weights(serial_dense / "checkpoints" / tag_of(20))
    assert merged.keys() == serial_states.keys()
    for name, w in serial_states.items():
        torch.testing.assert_close(merged[name], w, rtol=1e-4, atol=1e-6, msg=name)


def test_tp2_moe_matches_serial(serial_moe, data_dir, tmp_path):
    run_pretrain(train_overrides(data_dir, tmp_path, **MODEL, **{"parallel.tensor_parallel": 2}), 2)
    ref, got = metrics(serial_moe), metrics(tmp_path)
    assert_same_run(ref, got, range(1, 21))
    assert_same_expert_load(ref, got, (1, 10, 20))
    assert got[20]["aux_loss"] == pytest.approx(ref[20]["aux_loss"], rel=RTOL)


def test_zero2_dp2_matches_serial(serial_dense, data_dir, tmp_path):
    # Same global batch (2 x 2 accumulation x dp 1 = 2 x 1 x dp 2).
    run_pretrain(train_overrides(data_dir, tmp_path, **DENSE, **{"batch.grad_accum": 1}), 2)
    assert_same_run(metrics(serial_dense), metrics(tmp_path), range(1, 21))


def test_ep2_moe_matches_serial(data_dir, tmp_path_factory, tmp_path):
    """EP=2 inside DP=2: each rank owns half the experts and tokens travel by all-to-all.

    The load-balancing loss is not linear in the tokens, and dp rank r takes samples
    i % dp == r of a global batch, so the serial reference uses one-sequence micro-batches:
    then both runs sum the same per-sequence terms (serial: accumulation 4; EP: 2 per rank).
    """
    # grad_clip 0.3 sits below every step's norm (~0.7): the clipped update is compared too,
    # so the global norm must count every rank's expert shard exactly once.
    one_seq = {**MODEL, "batch.micro_batch": 1, "optim.grad_clip": 0.3}
    ref_run = serial(
        data_dir, tmp_path_factory, "serial_moe_micro1", {**one_seq, "batch.grad_accum": 4}
    )
    over = {**one_seq, "batch.grad_accum": 2, "parallel.expert_parallel": 2}
    res = run_pretrain(train_overrides(data_dir, tmp_path, **over), 2)
    assert "ep 2" in res.stdout
    ref, got = metrics(ref_run), metrics(tmp_path)
    assert all(ref[s]["grad_norm"] > 0.3 for s in range(1, 21))
    assert_same_run(ref, got, range(1, 21))
    assert_same_expert_load(ref, got, (1, 10, 20))
    assert got[20]["aux_loss"] == pytest.approx(ref[20]["aux_loss"], rel=RTOL)
    # resume: each rank gets its own expert shard back (DeepSpeed saves the module from rank 0)
    shutil.rmtree(tmp_path / "checkpoints" / tag_of(20))
    (tmp_path / "checkpoints" / POINTER).write_text(tag_of(10) + "\n")
    res = run_pretrain(train_overrides(data_dir, tmp_path, **over), 2)
    assert f"resumed from {tag_of(10)}" in res.stdout
    assert_same_run(ref, metrics(tmp_path), range(11, 21))
    # what eval loads: every rank's experts, put together = the serial weights
    weights = saved_weights(tmp_path / "checkpoints" / tag_of(20))
    serial_states = saved_weights(ref_run / "checkpoints" / tag_of(20))
    experts = {n: w for n, w in weights.items() if n.endswith(("ffn.w1", "ffn.v1", "ffn.w2"))}
    assert experts and all(".ffn." in n for n in experts)
    for name, w in experts.items():
        assert w.shape == serial_states[name].shape
        torch.testing.assert_close(w, serial_states[name], rtol=1e-3, atol=1e-4, msg=name)


def test_tp2_ep2_moe_matches_serial(data_dir, tmp_path):
    """TP=2 x EP=2 on 4 ranks (dp 2): each tp rank routes its sequence slice through the
    all-to-all of its own ep group; expert gradients are summed over tp, then reduced over
    the expert-data-parallel group. Losses, clipped grad norms and expert loads equal the
    serial run's; eval merges tp shards and expert shards back into the serial weights."""
    one_seq = {**MODEL, "batch.micro_batch": 1, "optim.grad_clip": 0.3}
    ref_run, run = tmp_path / "serial", tmp_path / "tp2ep2"
    run_pretrain(train_overrides(data_dir, ref_run, **one_seq, **{"batch.grad_accum": 4}), 1)
    over = {
        **one_seq,
        "batch.grad_accum": 2,
        "parallel.tensor_parallel": 2,
        "parallel.expert_parallel": 2,
    }
    res = run_pretrain(train_overrides(data_dir, run, **over), 4)
    assert "dp 2, tp 2, ep 2" in res.stdout
    ref, got = metrics(ref_run), metrics(run)
    assert all(ref[s]["grad_norm"] > 0.3 for s in range(1, 21))
    assert_same_run(ref, got, range(1, 21))
    assert got[20]["aux_loss"] == pytest.approx(ref[20]["aux_loss"], rel=RTOL)
    assert_same_expert_load(ref, got, (1, 10, 20))
    # resume in the same layout: exact
    shutil.rmtree(run / "checkpoints" / tag_of(20))
    (run / "checkpoints" / POINTER).write_text(tag_of(10) + "\n")
    run_pretrain(train_overrides(data_dir, run, **over), 4)
    assert_same_run(ref, metrics(run), range(11, 21))

    from eval.checkpoint import _read_states, deepspeed_state_dict

    step_dir = run / "checkpoints" / tag_of(20)
    cfg = load_config(TrainConfig, TINY, train_overrides(data_dir, run, **over))
    model = build_model(cfg.model)
    model.load_state_dict(deepspeed_state_dict(step_dir, _read_states(step_dir)[0], cfg, model))
    serial_states = saved_weights(ref_run / "checkpoints" / tag_of(20))
    assert set(serial_states) <= set(model.state_dict())
    for name, w in model.state_dict().items():
        if name in serial_states:
            torch.testing.assert_close(w, serial_states[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("stage", [1, 2])
def test_ep_checkpoint_resumes_on_another_dp_size(stage, data_dir, tmp_path):
    """EP=2 on 4 ranks (two replicas of each expert shard: ZeRO partitions every shard over
    its expert-data-parallel pair), then its step-10 save resumed on 2 ranks (one replica):
    the expert groups' optimizer state is regathered per shard, the dense one over all ranks.
    Both runs reproduce the serial per-step losses and (clipped) grad norms."""
    one_seq = {**MODEL, "batch.micro_batch": 1, "optim.grad_clip": 0.3, "zero_stage": stage}
    ref_run, dp4, dp2 = tmp_path / "serial", tmp_path / "dp4", tmp_path / "dp2"
    run_pretrain(train_overrides(data_dir, ref_run, **one_seq, **{"batch.grad_accum": 4}), 1)
    ep = {**one_seq, "parallel.expert_parallel": 2}
    run_pretrain(train_overrides(data_dir, dp4, **ep, **{"batch.grad_accum": 1}), 4)
    ref = metrics(ref_run)
    assert_same_run(ref, metrics(dp4), range(1, 21))

    shutil.copytree(dp4 / "checkpoints" / tag_of(10), dp2 / "checkpoints" / tag_of(10))
    (dp2 / "checkpoints" / POINTER).write_text(tag_of(10) + "\n")
    res = run_pretrain(train_overrides(data_dir, dp2, **ep, **{"batch.grad_accum": 2}), 2)
    assert f"resumed from {tag_of(10)}" in res.stdout and "dp 2" in res.stdout
    got = metrics(dp2)
    assert sorted(s for s in got if "loss" in got[s]) == list(range(11, 21))
    assert_same_run(ref, got, range(11, 21))
    # (another expert_parallel size resumes too: tests/pretrain/test_reshard.py)


def test_resume_dp1_checkpoint_on_dp2(serial_dense, data_dir, tmp_path):
    # The serial run's step-10 save, as if the job had stopped there.
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(serial_dense / "checkpoints" / tag_of(10), ckpt / tag_of(10))
    (ckpt / POINTER).write_text(tag_of(10) + "\n")
    res = run_pretrain(train_overrides(data_dir, tmp_path, **DENSE, **{"batch.grad_accum": 1}), 2)
    assert f"resumed from {tag_of(10)}" in res.stdout and "dp 2" in res.stdout
    ref, got = metrics(serial_dense), metrics(tmp_path)
    assert sorted(s for s in got if "loss" in got[s]) == list(range(11, 21))
    assert_same_run(ref, got, range(11, 21))  # includes `samples`: the same position
    # ... and the same samples: the dp=2 ranks' shares of each global batch are the dp=1 batch.
    cfg = load_config(TrainConfig, TINY, train_overrides(data_dir, tmp_path, **DENSE))
    data = TrainData(data_dir, open_manifest(cfg.data, cfg.model.vocab_size), cfg.data)
    for first in range(40, 80, 4):
        ranks = [data.rank_samples(first, 4, 2, r) for r in (0, 1)]
        assert sorted(ranks[0] + ranks[1]) == data.rank_samples(first, 4, 1, 0)
