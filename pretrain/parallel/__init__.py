"""Parallelism applied to a plain single-device model, in one ordered function.

Order (torchtitan `parallelize.py`): tensor/sequence parallel -> expert parallel ->
activation checkpointing -> compile -> the DeepSpeed engine (built by the trainer, last).
Tensor and expert parallelism are not implemented yet: `parallelize` refuses degrees > 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.utils.checkpoint import checkpoint

from mop.errors import ConfigError
from pretrain.config import TrainConfig


@dataclass(frozen=True)
class Mesh:
    """Where this process sits: world = tp x dp; expert parallel lives inside dp."""

    world_size: int
    rank: int
    dp: int
    tp: int
    ep: int

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp


def build_mesh(cfg: TrainConfig, world_size: int, rank: int) -> Mesh:
    tp, ep = cfg.parallel.tensor_parallel, cfg.parallel.expert_parallel
    if world_size % tp:
        raise ConfigError(
            f"tensor_parallel={tp} must divide the world size {world_size} (tp x dp = world)"
        )
    dp = world_size // tp
    if dp % ep:
        raise ConfigError(f"expert_parallel={ep} must divide the data-parallel size {dp}")
    if cfg.model.ffn == "moe" and cfg.model.moe.num_experts % ep:
        raise ConfigError(
            f"expert_parallel={ep} must divide moe.num_experts={cfg.model.moe.num_experts}"
        )
    return Mesh(world_size=world_size, rank=rank, dp=dp, tp=tp, ep=ep)


def parallelize(model: nn.Module, cfg: TrainConfig, mesh: Mesh) -> nn.Module:
    if mesh.tp != 1 or mesh.ep != 1:
        raise ConfigError(
            f"tensor_parallel={mesh.tp}, expert_parallel={mesh.ep}: only 1 is supported so far "
            "(data parallel via DeepSpeed ZeRO)"
        )
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    return model


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward. The forward is replaced on the instance, so parameter
    names (and checkpoints) are the same with and without it."""
    for block in model.blocks:
        inner = block.forward

        def forward(*args, _inner=inner):
            return checkpoint(_inner, *args, use_reentrant=False)

        block.forward = forward
