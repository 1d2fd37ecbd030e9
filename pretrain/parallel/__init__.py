"""Parallelism applied to a plain single-device model, in one ordered function.

Order: expert parallel -> tensor/sequence parallel (it wraps the expert-parallel layer) ->
activation checkpointing -> compile -> the DeepSpeed engine (built by the entry point, last,
with `build_mpu(mesh)` so ZeRO works over the data-parallel group only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pretrain.config import TrainConfig
from pretrain.parallel.mesh import Mesh, build_mesh, init_process_groups
from pretrain.parallel.mpu import build_mpu
from pretrain.parallel.tensor import apply_tensor_parallel, hook_replicated_gradients

__all__ = [
    "Mesh",
    "apply_activation_checkpointing",
    "apply_compile",
    "build_mesh",
    "build_mpu",
    "init_process_groups",
    "parallelize",
]


def parallelize(
    model: nn.Module,
    cfg: TrainConfig,
    mesh: Mesh,
    materialize: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Apply tp/sp, ep, activation checkpointing and compile in place; the mesh must have its
    groups. `materialize`: for a model built on the meta device, called once the parallel
    layers are in, to give it this rank's real weights (pretrain.parallel.meta_build)."""
    if mesh.ep > 1:
        from pretrain.parallel.expert import apply_expert_parallel

        # Before tp: the tensor-parallel block adopts each block's MoE layer as it finds it
        # (routing its sequence slice, the aux losses over the whole sequence) and hooks the
        # gradients of the replicated weights, so it must find the expert-parallel layer.
        model = apply_expert_parallel(model, mesh)
    if mesh.tp > 1:
        apply_tensor_parallel(model, mesh)
    if materialize is not None:
        materialize(model)  # before any hook: it replaces the Parameters
    hook_replicated_gradients(model, mesh)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)
    return model


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block in backward. The forward is replaced on the instance, so parameter
    names (and checkpoints) are the same with and without it."""
    for block in model.blocks:
        _checkpoint_block(block, block.forward)


def _checkpoint_block(block: nn.Module, inner: Callable) -> None:
    def forward(*args, _inner=inner):
        return checkpoint(_inner, *args, use_reentrant=False)

    forward.checkpointed = inner  # the region's body, for apply_compile
    block.forward = forward


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each block in place (`nn.Module.compile`: parameter names, state dicts and
    checkpoints stay those of the plain model). Blocks, not the whole model: every block runs
    the same code, so one compiled graph serves all of them, and a graph break inside one
    (e.g. expert parallelism's host-side split sizes) stays inside it.

    A checkpointed block is compiled inside its checkpoint: its body is compiled and the
    compiled function checkpointed (the recompute in backward reruns the compiled code).
    Compiling the checkpointed forward instead makes dynamo trace each checkpoint() region as
    one graph or not at all, so any graph break in an MoE block (expert parallelism's
    all-to-all sizes, the megablocks kernels, the per-expert loop) ran the whole block eagerly."""
    for block in model.blocks:
        inner = getattr(block.forward, "checkpointed", None)
        if inner is None:
            block.compile(backend=backend)
        else:
            _checkpoint_block(block, torch.compile(inner, backend=backend))
