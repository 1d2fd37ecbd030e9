"""Megatron-style tensor parallel with sequence parallel, applied to the plain model from outside.

The model is built whole on every rank (same seed), then `apply_tensor_parallel` swaps its
layers for the tensor-parallel types of `pretrain.parallel.tensor_layers`, each holding this tp
rank's shard of the plain layer's weights. Parameter names do not change, so DeepSpeed's
per-tp-rank checkpoint files (`mp_rank_XX_model_states.pt`) hold the same names as a
single-process one, and `consolidate_tp_shards` rebuilds the full state dict for export/eval.

    embed          VocabParallelEmbedding: rows [V/tp, d]; lookup of own ids, zeros elsewhere,
                   then reduce-scatter along the sequence (the sum over ranks is the full lookup)
    blocks[i]      TensorParallelBlock, same submodule names:
      attn.wq/wk/wv  ColumnParallelLinear (rows = whole heads): rank r owns heads r*H/tp..; the
                     Attention has n_heads/tp and n_kv_heads/tp heads, and GQA groups stay on
                     one rank since kv heads are split the same way
      attn.wo        RowParallelLinear [d, H*hd/tp]
      ffn (dense)    w1/w3 ColumnParallelLinear, w2 RowParallelLinear
      ffn (MoE/PEER) replicated: each rank routes its own sequence slice through all experts;
                     grads are summed over tp (below). Routing is token-wise, so expert outputs
                     equal the single-process ones; z-loss is averaged over tp and the
                     load-balancing loss is rebuilt over the whole sequence from the slices'
                     routings (`MoE.forward_with_routing`), so both match one process too
      norms          replicated
    lm_head        VocabParallelHead: column parallel over the vocab; logits stay vocab-sharded
                   [B, T, V/tp] and go to `vocab_parallel_lm_loss`

Sequence parallel: between the column/row pairs activations are [B, T/tp, d] (rank r holds
positions r*T/tp..); an all-gather precedes each column-parallel pair and a reduce-scatter
follows it. Rotary tables are computed by the model from the full input_ids length, and
attention runs on the gathered full sequence, so positions are global.

Every parameter that is not sharded sees only this rank's slice of the sequence, so its
gradient is summed over the tp group by a hook before DeepSpeed reads it. Sharded parameters
carry `tensor_model_parallel = True` (+ `partition_dim`, `partition_stride`), which DeepSpeed's
grad-norm code (`is_model_parallel_parameter`) counts on every tp rank while it counts
replicated ones on tp rank 0 only.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pretrain.parallel.mappings import all_reduce_grad_hook
from pretrain.parallel.mesh import Mesh
from pretrain.parallel.tensor_layers import (
    TensorParallelBlock,
    VocabParallelEmbedding,
    VocabParallelHead,
)


def apply_tensor_parallel(model: nn.Module, mesh: Mesh) -> None:
    """Swap `model`'s layers for their tensor-parallel types for this tp rank, in place (see
    the module docstring). Needs the mesh's process groups. The replicated weights' gradients
    are summed by `hook_replicated_gradients`, once the weights are real (pretrain.parallel)."""
    tp, rank, group = mesh.tp, mesh.tp_rank, mesh.tp_group
    if tp == 1:
        return
    if group is None:
        raise RuntimeError("apply_tensor_parallel needs init_process_groups(mesh) first")
    tied = model.lm_head.weight is model.embed.weight
    model.embed = VocabParallelEmbedding(model.embed, rank, tp, group)
    model.lm_head = VocabParallelHead(
        model.lm_head, rank, tp, group, tied_to=model.embed if tied else None
    )
    for i, block in enumerate(model.blocks):
        model.blocks[i] = TensorParallelBlock(block, rank, tp, group)


def hook_replicated_gradients(model: nn.Module, mesh: Mesh) -> None:
    """Sum each replicated (not tp-sharded) weight's gradient over the tp group (a hook on the
    Parameter: register it on the final, materialised one)."""
    if mesh.tp == 1:
        return
    hook = all_reduce_grad_hook(mesh.tp_group)
    for p in model.parameters():
        if p.requires_grad and not getattr(p, "tensor_model_parallel", False):
            p.register_hook(hook)


# Loss ----------------------------------------------------------------------------------------


class _VocabParallelCE(torch.autograd.Function):
    """Per-token cross-entropy of vocab-sharded fp32 logits [N, V/tp]; targets are global ids."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, group, ignore_index: int) -> Tensor:
        local_vocab = logits.shape[-1]
        start = dist.get_rank(group) * local_vocab
        logits_max = logits.max(dim=-1).values
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - logits_max.unsqueeze(-1)
        valid = targets != ignore_index
        local = targets - start
        inside = (local >= 0) & (local < local_vocab) & valid
        idx = local.clamp(0, local_vocab - 1)
        target_logit = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * inside
        dist.all_reduce(target_logit, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        loss = (sum_exp.log() - target_logit) * valid
        ctx.save_for_backward(exp / sum_exp.unsqueeze(-1), idx, inside, valid)
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor):
        softmax, idx, inside, valid = ctx.saved_tensors
        g = softmax.clone()
        rows = torch.arange(g.shape[0], device=g.device)
        g[rows, idx] -= inside.to(g.dtype)
        g *= (grad * valid).unsqueeze(-1)
        return g, None, None, None


def vocab_parallel_cross_entropy(
    logits: Tensor, targets: Tensor, group, ignore_index: int = -100
) -> Tensor:
    """Per-token loss [N] of logits [N, V/tp] sharded over `group`; no full-vocab tensor is
    ever built (Megatron `vocab_parallel_cross_entropy`)."""
    return _VocabParallelCE.apply(logits.float(), targets, group, ignore_index)


def vocab_parallel_lm_loss(
    logits: Tensor, targets: Tensor, group, ignore_index: int = -100
) -> Tensor:
    """`lm_loss` for vocab-sharded logits [B, T, V/tp]: the same value on every tp rank."""
    flat_t = targets.reshape(-1)
    per_token = vocab_parallel_cross_entropy(
        logits.reshape(-1, logits.shape[-1]), flat_t, group, ignore_index
    )
    return per_token.sum() / (flat_t != ignore_index).sum()


# Export --------------------------------------------------------------------------------------


def consolidate_tp_shards(
    shards: list[dict[str, Tensor]], full_shapes: dict[str, torch.Size]
) -> dict[str, Tensor]:
    """Full state dict from the tp ranks' state dicts (in tp-rank order): a tensor whose shape
    differs from the plain model's is concatenated along the dim that differs, others
    (replicated) are taken from rank 0."""
    out = {}
    for name, first in shards[0].items():
        full = full_shapes.get(name)
        if full is None or tuple(first.shape) == tuple(full):
            out[name] = first
            continue
        dim = next(i for i, (a, b) in enumerate(zip(first.shape, full)) if a != b)
        out[name] = torch.cat([s[name] for s in shards], dim=dim)
    return out


def load_consolidated(tag_dir: str | Path, model: nn.Module) -> dict[str, Tensor]:
    """The full model state dict of a DeepSpeed checkpoint directory saved with any tp:
    reads `mp_rank_*_model_states.pt` and merges them for `model` (a plain, unsharded model)."""
    files = sorted(Path(tag_dir).glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no mp_rank_*_model_states.pt in {tag_dir}")
    shards = [torch.load(f, map_location="cpu", weights_only=False)["module"] for f in files]
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return consolidate_tp_shards(shards, shapes)
