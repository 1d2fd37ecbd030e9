"""Megatron-style tensor parallel with sequence parallel, applied to the plain model from outside.

The model is built whole on every rank (same seed), then each tp rank keeps its shard of the
weights in place: parameter names do not change, so DeepSpeed's per-tp-rank checkpoint files
(`mp_rank_XX_model_states.pt`) hold the same names as a single-process one, and
`consolidate_tp_shards` rebuilds the full state dict for export/eval.

    embed          vocab-parallel rows [V/tp, d]; lookup of own ids, zeros elsewhere, then
                   reduce-scatter along the sequence (the sum over ranks is the full lookup)
    attn.wq/wk/wv  column parallel (rows = whole heads): rank r owns heads r*H/tp..; the
                   Attention instance is told n_heads/tp and n_kv_heads/tp (its forward reads
                   those attributes), and GQA groups stay on one rank since kv heads are split
                   the same way
    attn.wo        row parallel [d, H*hd/tp]
    ffn (dense)    w1/w3 column parallel, w2 row parallel
    ffn (MoE/PEER) replicated: each rank routes its own sequence slice through all experts;
                   grads are summed over tp (below). Routing is token-wise, so expert outputs
                   equal the single-process ones; z-loss is averaged over tp and the
                   load-balancing loss is rebuilt over the whole sequence from the slices'
                   routings (a forward hook on `ffn.router`), so both match one process too
    norms          replicated
    lm_head        column parallel over the vocab: logits stay vocab-sharded [B, T, V/tp] and
                   go to `vocab_parallel_lm_loss`

Sequence parallel: between the column/row pairs activations are [B, T/tp, d] (rank r holds
positions r*T/tp..); an all-gather precedes each column-parallel block and a reduce-scatter
follows each row-parallel one. Rotary tables are computed by the model from the full input_ids
length, and attention runs on the gathered full sequence, so positions are global.

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
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model.router import expert_load_stats, load_balancing_loss
from pretrain.model.transformer import LOSS_KEYS
from pretrain.parallel.mappings import (
    all_reduce_grad_hook,
    gather_seq,
    mean_over_tp,
    reduce_scatter_seq,
)
from pretrain.parallel.mesh import Mesh


def mark_tp(p: nn.Parameter, dim: int) -> None:
    """Megatron's attributes on a sharded parameter (DeepSpeed reads `tensor_model_parallel`)."""
    p.tensor_model_parallel = True
    p.partition_dim = dim
    p.partition_stride = 1


def _shard_param(p: Tensor, dim: int, rank: int, tp: int) -> nn.Parameter:
    shard = nn.Parameter(p.detach().chunk(tp, dim=dim)[rank].clone())
    mark_tp(shard, dim)
    return shard


def _shard_linear(lin: nn.Linear, dim: int, rank: int, tp: int) -> None:
    lin.weight = _shard_param(lin.weight, dim, rank, tp)
    if dim == 0:
        lin.out_features = lin.weight.shape[0]
    else:
        lin.in_features = lin.weight.shape[1]


def _column_row(module: nn.Module, group) -> None:
    """Wrap a column->row parallel pair: gather the sequence in, reduce-scatter partial sums out."""
    inner = module.forward

    def forward(x: Tensor, *args, _inner=inner):
        out = _inner(gather_seq(x, group), *args)
        if isinstance(out, tuple):  # FFN interface: (y, aux dict)
            return (reduce_scatter_seq(out[0], group), *out[1:])
        return reduce_scatter_seq(out, group)

    module.forward = forward


def _replicated_ffn(ffn: nn.Module, group) -> None:
    """MoE/PEER under tp: own sequence slice, replicated experts; aux losses over the sequence."""
    inner = ffn.forward
    routed: dict = {}
    router = getattr(ffn, "router", None)
    if isinstance(router, nn.Module):
        # The Routing of this slice, to rebuild the load-balancing loss over the whole sequence.
        router.register_forward_hook(lambda _m, _args, out: routed.__setitem__("r", out))

    def forward(x: Tensor, _inner=inner):
        routed.clear()
        y, aux = _inner(x)
        aux = dict(aux)
        for key in LOSS_KEYS:
            if key in aux:  # z-loss: a mean over tokens, so the mean over equal slices is exact
                aux[key] = mean_over_tp(aux[key], group)
        r = routed.get("r")
        if "lb_loss" in aux and r is not None:
            aux["lb_loss"] = _sequence_lb_loss(r, ffn.top_k, group)
        if "tokens_per_expert_frac" in aux:
            # Equal slices, so the mean of per-slice shares is the share over the sequence.
            frac = aux["tokens_per_expert_frac"].detach().float().clone()
            dist.all_reduce(frac, group=group)
            aux.update(expert_load_stats(frac / dist.get_world_size(group)))
        if "expert_counts_per_row" in aux:
            # Each rank counted its slice of every row: the sum is the whole sequence's.
            counts = aux["expert_counts_per_row"].clone()
            dist.all_reduce(counts, group=group)
            aux["expert_counts_per_row"] = counts
        return y, aux

    ffn.forward = forward


def _sequence_lb_loss(r, top_k: int, group) -> Tensor:
    """The load-balancing loss of the full sequence from the slices' routings: it is not linear
    in the tokens (E * sum_e f_e P_e), so it is rebuilt from the global f (token shares, no
    gradient) and the global P (mean router probabilities, averaged over tp with autograd)."""
    n = r.probs.shape[0] * dist.get_world_size(group)
    counts = r.tokens_per_expert.to(torch.float32)
    dist.all_reduce(counts, group=group)
    p_mean = mean_over_tp(r.probs.mean(dim=0), group)
    # One "token" whose probabilities are the sequence means and whose counts are per token.
    return load_balancing_loss(p_mean.unsqueeze(0), counts / n, top_k)


def _vocab_parallel_embedding(embed: nn.Embedding, group, rank: int, tp: int) -> None:
    local_vocab = embed.num_embeddings // tp
    start = rank * local_vocab
    embed.weight = _shard_param(embed.weight, 0, rank, tp)
    embed.num_embeddings = local_vocab

    def forward(ids: Tensor) -> Tensor:
        local = ids - start
        outside = (local < 0) | (local >= local_vocab)
        out = F.embedding(local.masked_fill(outside, 0), embed.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_seq(out, group)  # sum of the rank lookups, sequence-sharded

    embed.forward = forward


def _vocab_parallel_head(lm_head: nn.Linear, group) -> None:
    def forward(h: Tensor) -> Tensor:
        return F.linear(gather_seq(h, group), lm_head.weight)

    lm_head.forward = forward


def apply_tensor_parallel(model: nn.Module, mesh: Mesh) -> None:
    """Shard `model` in place for this tp rank (see the module docstring). Needs mesh groups."""
    tp, rank, group = mesh.tp, mesh.tp_rank, mesh.tp_group
    if tp == 1:
        return
    if group is None:
        raise RuntimeError("apply_tensor_parallel needs init_process_groups(mesh) first")
    tied = model.lm_head.weight is model.embed.weight
    _vocab_parallel_embedding(model.embed, group, rank, tp)
    if tied:
        model.lm_head.weight = model.embed.weight
    else:
        _shard_linear(model.lm_head, 0, rank, tp)
    model.lm_head.out_features = model.lm_head.weight.shape[0]
    _vocab_parallel_head(model.lm_head, group)
    for block in model.blocks:
        attn = block.attn
        for lin in (attn.wq, attn.wk, attn.wv):
            _shard_linear(lin, 0, rank, tp)
        _shard_linear(attn.wo, 1, rank, tp)
        attn.n_heads //= tp
        attn.n_kv_heads //= tp
        _column_row(attn, group)
        ffn = block.ffn
        if all(hasattr(ffn, n) and isinstance(getattr(ffn, n), nn.Linear) for n in ("w1", "w3")):
            _shard_linear(ffn.w1, 0, rank, tp)
            _shard_linear(ffn.w3, 0, rank, tp)
            _shard_linear(ffn.w2, 1, rank, tp)
            _column_row(ffn, group)
        else:
            _replicated_ffn(ffn, group)
    hook = all_reduce_grad_hook(group)
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
