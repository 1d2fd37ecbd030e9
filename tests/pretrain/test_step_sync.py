"""The training step reads the device once per step, not once per micro-batch (issue 14:
no host synchronisation inside the accumulation window), and logs the same loss values."""

from __future__ import annotations

import pytest
import torch

from mop.config import load_config
from pretrain.config import TrainConfig, derived_sizes
from pretrain.data import Batch
from pretrain.model.transformer import build_model, lm_loss
from pretrain.parallel import build_mesh
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


def _step(grad_accum: int, monkeypatch) -> tuple[float, int, list[float]]:
    # dense: the MoE torch backend reads expert sizes on a CPU (its CUDA grouped GEMM does not)
    over = ["model=configs/model/tiny_dense.yaml", f"batch.grad_accum={grad_accum}"]
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


def test_device_reads_do_not_grow_with_the_micro_batches(monkeypatch):
    loss1, reads1, ref1 = _step(1, monkeypatch)
    loss4, reads4, ref4 = _step(4, monkeypatch)
    assert reads4 == reads1 == 1, (reads1, reads4)  # the one read after the optimizer step
    assert loss1 == pytest.approx(ref1[0], rel=1e-6)
    assert loss4 == pytest.approx(sum(ref4) / 4, rel=1e-6)
