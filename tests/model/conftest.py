"""Tiny shapes shared by the model tests (fast on 2 CPU cores)."""

from __future__ import annotations

import pytest
import torch

from pretrain.model.config import ModelConfig, MoEConfig


def tiny_config(ffn: str = "dense", **kw) -> ModelConfig:
    base = dict(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=48,
        max_seq_len=32,
        ffn=ffn,
    )
    if ffn == "moe":
        base["moe"] = MoEConfig(num_experts=4, top_k=2)
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
