"""MegaBlocks under expert parallelism on one GPU (issue 14 item 6): an MoE layer with
moe.backend=megablocks converted to the expert-parallel layer (EP=1, so the same all-to-all
path runs in a world of one) runs its local experts through grouped_gemm's gmm, and agrees
with the torch backend's layer in bf16 (outputs and every gradient). Skips without CUDA or
megablocks."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from pretrain.launch import free_port
from pretrain.model.config import MoEConfig
from pretrain.model.moe import MoE
from pretrain.parallel import expert
from tests.gpu.test_moe_backends import GRAD_NAMES, REL_TOL, _fwd_bwd, _rel, megablocks_usable

pytestmark = pytest.mark.gpu
USABLE, WHY = megablocks_usable()


def _to_ep1(layer: MoE, group) -> MoE:
    """What apply_expert_parallel does for ep ranks of one (it returns early for ep=1)."""
    return expert.ExpertParallelMoE(layer, expert.EPInfo(1, 0, group, layer.num_experts))


@pytest.mark.skipif(not USABLE, reason=WHY)
@pytest.mark.parametrize("num_experts", [8, 64])
def test_megablocks_expert_parallel_path_matches_torch_backend(num_experts, monkeypatch):
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1)
    torch.manual_seed(0)
    dev, d, f, tokens = torch.device("cuda"), 512, 1408, 4096
    base = MoE(d, MoEConfig(num_experts=num_experts, backend="torch"), f)
    base.reset_parameters(std=0.02, out_std=0.02)
    ref = copy.deepcopy(base).to(dev, torch.bfloat16)
    mb = MoE(d, MoEConfig(num_experts=num_experts, backend="megablocks"), f)
    mb.load_state_dict(base.state_dict())
    mb = _to_ep1(mb.to(dev, torch.bfloat16), dist.group.WORLD)
    used = []
    gmm_experts = expert._gmm_experts
    monkeypatch.setattr(expert, "_gmm_experts", lambda *a: used.append(1) or gmm_experts(*a))
    x = torch.randn(tokens, d, device=dev).to(torch.bfloat16)
    g = torch.randn(tokens, d, device=dev)
    y_ref, g_ref, _ = _fwd_bwd(ref, x, g)
    y_mb, g_mb, _ = _fwd_bwd(mb, x, g)
    assert used, "the expert-parallel layer did not run grouped_gemm's gmm"
    assert _rel(y_mb, y_ref)[1] < REL_TOL
    for name, a, b in zip(GRAD_NAMES, g_mb, g_ref):
        assert _rel(a, b)[1] < REL_TOL, name
