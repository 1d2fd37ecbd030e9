"""The training step reads the device once per step, not once per micro-batch (issue 14:
no host synchronisation inside the accumulation window), and logs the same loss values."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

from mop.config import load_config
from pretrain.config import TrainConfig, derived_sizes
from pretrain.data import Batch
from pretrain.launch import free_port
from pretrain.model.config import MoEConfig
from pretrain.model.moe import MoE
from pretrain.model.transformer import build_model, lm_loss
from pretrain.parallel import build_mesh
from pretrain.parallel.expert import EPInfo, ExpertParallelMoE
from pretrain.trainer import Trainer
from tests.pretrain.runs import TINY


class FakeEngine:
    """The parts of a DeepSpeed engine that Trainer.train_step uses, around a plain model."""

    device = torch.device("cpu")
    skipped_steps = 0

    def __init__(self, model):
        self.module = model

    def __call__(self, ids):
        return self.module(ids)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass

    def get_global_grad_norm(self):
        return None


class FixedData:
    labels = ["a"]

    def __init__(self, batches):
        self.batches = batches

    def micro_batches(self, first, global_batch, dp, rank, micro):
        return self.batches


def _step(grad_accum: int, monkeypatch, model: str) -> tuple[float, int, list[float]]:
    # MoE too: the torch backend's grouped GEMMs read no expert sizes (on CPU and CUDA bf16)
    over = [f"model=configs/model/{model}.yaml", f"batch.grad_accum={grad_accum}"]
    cfg = load_config(TrainConfig, TINY, [*over, "batch.micro_batch=2"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(grad_accum):
        ids = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=g)
        batches.append(Batch(ids[:, :-1], ids[:, 1:], torch.zeros(2, dtype=torch.int64), [0, 1]))
    with torch.no_grad():  # what the old per-micro-batch host reads summed
        ref = []
        for b in batches:
            out = model(b.input_ids)
            ref.append(float(lm_loss(out.logits, b.targets)) + float(out.aux_loss))
    trainer = Trainer(
        cfg, FakeEngine(model), FixedData(batches), None, derived_sizes(cfg, 1),
        build_mesh(cfg, 1, 0), "sha", [],
    )  # fmt: skip
    reads = []
    for name in ("__float__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    result = trainer.train_step()
    monkeypatch.undo()
    return result.loss, len(reads), ref


@pytest.mark.parametrize("model", ["tiny_dense", "tiny_moe"])
def test_device_reads_do_not_grow_with_the_micro_batches(monkeypatch, model):
    loss1, reads1, ref1 = _step(1, monkeypatch, model)
    loss4, reads4, ref4 = _step(4, monkeypatch, model)
    assert reads4 == reads1 == 1, (reads1, reads4)  # the one read after the optimizer step
    assert loss1 == pytest.approx(ref1[0], rel=1e-6)
    assert loss4 == pytest.approx(sum(ref4) / 4, rel=1e-6)


# Expert parallelism: one device-to-host read per MoE layer (issue 23 item 9) ----------------
HOST_READS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")


def _count_reads(fn) -> int:
    """How many times `fn()` reads a tensor to the host (each a device sync on CUDA)."""
    reads = []
    with pytest.MonkeyPatch.context() as m:
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *a, _original=original, _name=name, **k):
                reads.append(_name)
                return _original(self, *a, **k)

            m.setattr(torch.Tensor, name, counted)
        fn()
    return len(reads)


def _ep_reads_worker(rank: int, port: int, out: str, grouped_mm: bool, ckpt: bool) -> None:
    """Two MoE layers under EP=2 (2 experts per rank): host reads in forward and backward."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        layers = [MoE(16, MoEConfig(num_experts=4, grouped_mm=grouped_mm), 32) for _ in range(2)]
        group = dist.new_group([0, 1])
        ep = [ExpertParallelMoE(layer, EPInfo(2, rank, group, 2)) for layer in layers]
        for layer in ep:
            layer.reset_parameters(0.5, 0.5)
        x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(rank))

        def forward():
            h = x
            for layer in ep:
                h = checkpoint(layer, h, use_reentrant=False)[0] if ckpt else layer(h)[0]
            return h

        y = []
        fwd = _count_reads(lambda: y.append(forward()))
        bwd = _count_reads(lambda: y[0].sum().backward())
        Path(out, f"rank{rank}.json").write_text(json.dumps({"forward": fwd, "backward": bwd}))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("grouped_mm", "ckpt"), [(True, False), (False, False), (True, True)])
def test_expert_parallel_reads_the_host_once_per_moe_layer(tmp_path, grouped_mm, ckpt):
    """The exchange's send/receive splits and the local experts' group sizes come from ONE
    read per layer (there were three: two split lists and the local experts' sizes); under
    activation checkpointing the recomputed forward reads once more, in backward."""
    ctx = mp.spawn(
        _ep_reads_worker, args=(free_port(), str(tmp_path), grouped_mm, ckpt), nprocs=2, join=False
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1.0):  # raises if a worker failed; a hang fails the test
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("expert-parallel workers still running after 120 s (deadlock?)")
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"forward": 2, "backward": 2 if ckpt else 0}, (rank, got)
