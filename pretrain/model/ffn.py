"""Factory for the FFN-like layer of a block (dense SwiGLU, MoE, PEER, Soft MoE).

Every layer follows one interface: `forward(x[B,T,d]) -> (y[B,T,d], dict[str, Tensor])`, the dict
holding optional unweighted 'lb_loss'/'z_loss' scalars and detached statistics.
"""

from __future__ import annotations

from torch import nn

from pretrain.model.config import ModelConfig
from pretrain.model.mlp import SwiGLU
from pretrain.model.moe import MoE
from pretrain.model.peer import PEER
from pretrain.model.soft_moe import SoftMoE


def build_ffn(cfg: ModelConfig) -> nn.Module:
    if cfg.ffn == "dense":
        return SwiGLU(cfg.d_model, cfg.ffn_dim)
    if cfg.ffn == "moe":
        return MoE(cfg.d_model, cfg.moe, cfg.expert_ffn_dim)
    if cfg.ffn == "peer":
        return PEER(cfg.d_model, cfg.peer)
    if cfg.ffn == "soft_moe":
        return SoftMoE(cfg.d_model, cfg.soft_moe, cfg.ffn_dim)
    raise ValueError(f"unknown ffn kind {cfg.ffn!r}")  # unreachable: the config validates it


def init_ffn(ffn: nn.Module, std: float, out_std: float) -> None:
    """Dense/MoE: N(0, std) in, N(0, out_std) for the output projection. PEER and Soft MoE
    follow their papers' own initialisation (their `reset_parameters()`)."""
    if isinstance(ffn, (SwiGLU, MoE)):
        ffn.reset_parameters(std, out_std)
    elif isinstance(ffn, (PEER, SoftMoE)):
        ffn.reset_parameters()
