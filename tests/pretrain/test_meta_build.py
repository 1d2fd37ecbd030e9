"""The parallel model built on the meta device holds only this rank's shards, and they are bit
for bit the slices of the plain model built from the same seed (issue 23 item 10): what the
serial/parallel equivalence runs rely on, now without the full fp32 model on every GPU while
it is built (~44 GB for the E=64 configs). One process builds every rank's model in turn (the
layer swaps need a group object, not a live one)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mop.config import load_config
from pretrain.config import TrainConfig
from pretrain.model.transformer import build_model
from pretrain.parallel import build_mesh
from pretrain.parallel import meta_build as mb
from pretrain.parallel.tensor import consolidate_tp_shards
from tests.pretrain.runs import TINY

CPU = torch.device("cpu")


class LiveBytes(TorchDispatchMode):
    """Peak bytes of real (non-meta) storages alive at once while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor) and not t.is_meta:
                st = t.untyped_storage()
                self.refs.setdefault(st._cdata, (StorageWeakRef(st), st.nbytes()))
        self.refs = {k: v for k, v in self.refs.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.refs.values()))
        return out


def _cfg(*over: str) -> TrainConfig:
    return load_config(TrainConfig, TINY, ["batch.grad_accum=1", *over])


def _mesh(cfg: TrainConfig, world: int, rank: int):
    group = SimpleNamespace()  # construction only: no collective runs here
    mesh = build_mesh(cfg, world, rank)
    return SimpleNamespace(
        **{k: getattr(mesh, k) for k in ("world_size", "rank", "dp", "tp", "ep")},
        dp_rank=mesh.dp_rank, tp_rank=mesh.tp_rank, ep_rank=mesh.ep_rank,
        tp_group=group, dp_group=group, ep_group=group, expert_dp_group=group,
    )  # fmt: skip


MOE = ("model.ffn=moe", "model.moe.num_experts=4")
LAYOUTS = {
    "tp2 dense": (2, ("model.ffn=dense", "parallel.tensor_parallel=2")),
    "tp2 dense tied": (
        2,
        ("model.ffn=dense", "model.tie_embeddings=true", "parallel.tensor_parallel=2"),
    ),  # fmt: skip
    "tp2 moe": (2, (*MOE, "parallel.tensor_parallel=2")),
    "ep2 moe": (2, (*MOE, "parallel.expert_parallel=2")),
    "tp2 ep2 moe": (4, (*MOE, "parallel.tensor_parallel=2", "parallel.expert_parallel=2")),
    "tp2 peer": (
        2,
        (
            "model.ffn=peer",
            "model.peer.num_experts=256",
            "model.peer.query_batchnorm=true",
            "parallel.tensor_parallel=2",
        ),
    ),  # fmt: skip
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_meta_built_shards_are_the_slices_of_the_plain_model(layout, capsys):
    world, over = LAYOUTS[layout]
    cfg = _cfg(*over)
    torch.manual_seed(3)
    plain = build_model(cfg.model)
    full = {n: p.detach() for n, p in plain.named_parameters()}
    full_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
    largest = max(p.numel() * p.element_size() for p in plain.parameters())
    ranks = {}
    for rank in range(world):
        mesh = _mesh(cfg, world, rank)
        torch.manual_seed(3)
        with LiveBytes() as live:
            model = mb.build_parallel_model(cfg, mesh, CPU)
        assert "building the full model" not in capsys.readouterr().out
        local = sum(p.numel() * p.element_size() for p in model.parameters())
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        # never the whole model: this rank's shards and one full parameter being drawn
        assert live.peak <= local + largest + buffers + 4096, (live.peak, local, largest)
        assert live.peak < full_bytes
        assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
        ranks[rank] = (mesh, {n: p.detach() for n, p in model.named_parameters()})
        experts = {n for n, p in model.named_parameters() if getattr(p, "allreduce", 1) is False}
        for name, b in model.named_buffers():  # buffers (rotary, batch norm) as built plainly
            assert torch.equal(b, dict(plain.named_buffers())[name]), name
    # put the shards back together: experts over the ep ranks, the rest over the tp ranks
    shapes = {n: p.shape for n, p in full.items()}
    for name, ref in full.items():
        if name in experts:
            by_ep = {m.ep_rank: sd[name] for m, sd in ranks.values() if m.tp_rank == 0}
            got = torch.cat([by_ep[e] for e in sorted(by_ep)])
        else:
            by_tp = {m.tp_rank: sd for m, sd in ranks.values() if m.ep_rank == 0}
            got = consolidate_tp_shards([by_tp[t] for t in sorted(by_tp)], shapes)[name]
        assert torch.equal(got, ref), name  # bit for bit, not merely close


def test_attributes_survive_and_gradient_hooks_go_on_the_real_parameters():
    cfg = _cfg(*MOE, "parallel.tensor_parallel=2", "parallel.expert_parallel=2")
    torch.manual_seed(0)
    model = mb.build_parallel_model(cfg, _mesh(cfg, 4, 1), CPU)
    w1 = model.blocks[0].ffn.w1
    assert w1.allreduce is False and w1.group_name == "ep_size_2"
    wq = model.blocks[0].attn.wq.weight
    assert wq.tensor_model_parallel and wq.partition_dim == 0
    # the replicated norm's tp hook is registered on the Parameter that trains
    assert model.blocks[0].attn_norm.weight._backward_hooks


def test_an_init_the_replay_cannot_follow_falls_back_to_the_full_build(monkeypatch, capsys):
    cfg = _cfg("model.ffn=dense", "parallel.tensor_parallel=2")
    real_build = build_model

    def reads_a_weight(model_cfg):  # e.g. an init that scales one weight by another's norm
        model = real_build(model_cfg)
        with torch.no_grad():
            model.norm.weight.mul_(model.embed.weight.abs().max())
        return model

    import pretrain.model.transformer as transformer

    monkeypatch.setattr(transformer, "build_model", reads_a_weight)
    torch.manual_seed(5)
    plain = reads_a_weight(cfg.model)
    torch.manual_seed(5)
    model = mb.build_parallel_model(cfg, _mesh(cfg, 2, 0), CPU)
    assert "building the full model on every GPU, then slicing it" in capsys.readouterr().out
    # from the seed again, not from where the abandoned replay left the generator
    assert torch.equal(model.norm.weight, plain.norm.weight)
    assert torch.equal(model.blocks[0].attn.wq.weight, plain.blocks[0].attn.wq.weight.chunk(2)[0])


def test_without_tp_or_ep_the_model_is_built_whole_as_before():
    cfg = _cfg()
    torch.manual_seed(1)
    plain = build_model(cfg.model)
    torch.manual_seed(1)
    model = mb.build_parallel_model(cfg, build_mesh(cfg, 1, 0), CPU)
    for (n, a), b in zip(plain.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
