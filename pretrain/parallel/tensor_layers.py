"""Tensor-parallel layer types, each built from the plain layer it replaces (Megatron's layers).

`apply_tensor_parallel` swaps them in for the plain model's layers under the same names, so
parameter names (and DeepSpeed's per-tp-rank checkpoint files) stay those of the plain model.
Each sharded parameter is this rank's contiguous chunk of the plain one and carries Megatron's
attributes (`mark_tp`), which DeepSpeed's grad-norm code reads.

    ColumnParallelLinear    rows [out/tp, in]: this rank's output features
    RowParallelLinear       columns [out, in/tp]: a partial sum over this rank's input features
    VocabParallelEmbedding  rows [V/tp, d]; returns this rank's sequence slice of the lookup
    VocabParallelHead       vocab rows [V/tp, d] (or the tied embedding's); logits [B, T, V/tp]
    TensorParallelBlock     a decoder block on the sequence slice [B, T/tp, d] (sequence parallel)

A column -> row pair (attention's wq/wk/wv -> wo, the dense FFN's w1/w3 -> w2) runs on the full
sequence: the block all-gathers the sequence before it and reduce-scatters the partial sums
after it, once per pair rather than once per linear layer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model.attention import Attention, LayerKV
from pretrain.model.mlp import SwiGLU
from pretrain.model.moe import MoE
from pretrain.model.router import Routing, expert_load_stats, load_balancing_loss
from pretrain.model.transformer import LOSS_KEYS, Block
from pretrain.parallel.mappings import gather_seq, mean_over_tp, reduce_scatter_seq


def mark_tp(p: nn.Parameter, dim: int) -> None:
    """Megatron's attributes on a sharded parameter (DeepSpeed reads `tensor_model_parallel`)."""
    p.tensor_model_parallel = True
    p.partition_dim = dim
    p.partition_stride = 1


def shard_parameter(p: Tensor, dim: int, rank: int, tp: int) -> nn.Parameter:
    shard = nn.Parameter(p.detach().chunk(tp, dim=dim)[rank].clone())
    mark_tp(shard, dim)
    return shard


class ColumnParallelLinear(nn.Linear):
    """This rank's output features of a bias-free Linear; its input is the full sequence."""

    def __init__(self, linear: nn.Linear, rank: int, tp: int) -> None:
        super().__init__(linear.in_features, linear.out_features // tp, bias=False, device="meta")
        self.weight = shard_parameter(linear.weight, 0, rank, tp)


class RowParallelLinear(nn.Linear):
    """This rank's input features of a bias-free Linear: its output is this rank's partial sum
    (the block reduce-scatters the sum over ranks)."""

    def __init__(self, linear: nn.Linear, rank: int, tp: int) -> None:
        super().__init__(linear.in_features // tp, linear.out_features, bias=False, device="meta")
        self.weight = shard_parameter(linear.weight, 1, rank, tp)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [V/tp, d]: lookup of this rank's ids, zeros elsewhere; the reduce-scatter along the
    sequence sums the ranks' lookups and leaves each rank its sequence slice."""

    def __init__(self, embed: nn.Embedding, rank: int, tp: int, group) -> None:
        super().__init__(embed.num_embeddings // tp, embed.embedding_dim, device="meta")
        self.weight = shard_parameter(embed.weight, 0, rank, tp)
        self.vocab_start = rank * self.num_embeddings
        self.group = group

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_seq(out, self.group)


class VocabParallelHead(nn.Linear):
    """Column parallel over the vocabulary on the gathered sequence: logits [B, T, V/tp] stay
    vocab-sharded for `vocab_parallel_lm_loss`. Tied embeddings share the embedding's shard."""

    def __init__(
        self,
        head: nn.Linear,
        rank: int,
        tp: int,
        group,
        tied_to: VocabParallelEmbedding | None = None,
    ) -> None:
        super().__init__(head.in_features, head.out_features // tp, bias=False, device="meta")
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = shard_parameter(head.weight, 0, rank, tp)
        self.group = group

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(gather_seq(h, self.group), self.weight)


def sharded_attention(attn: Attention, rank: int, tp: int) -> Attention:
    """This rank's heads (whole heads; kv heads split the same way, so GQA groups stay on one
    rank): an Attention of n_heads/tp heads whose projections are column/row parallel."""
    with torch.device("meta"):  # the structure only: the weights are the shards below
        out = Attention(
            attn.wq.in_features,
            attn.n_heads // tp,
            attn.n_kv_heads // tp,
            attn.head_dim,
            attn.causal,
        )
    out.wq = ColumnParallelLinear(attn.wq, rank, tp)
    out.wk = ColumnParallelLinear(attn.wk, rank, tp)
    out.wv = ColumnParallelLinear(attn.wv, rank, tp)
    out.wo = RowParallelLinear(attn.wo, rank, tp)
    return out.train(attn.training)


def sharded_swiglu(ffn: SwiGLU, rank: int, tp: int) -> SwiGLU:
    """w1/w3 column parallel, w2 row parallel: this rank's slice of the hidden width."""
    with torch.device("meta"):
        out = SwiGLU(ffn.w1.in_features, ffn.w1.out_features // tp)
    out.w1 = ColumnParallelLinear(ffn.w1, rank, tp)
    out.w3 = ColumnParallelLinear(ffn.w3, rank, tp)
    out.w2 = RowParallelLinear(ffn.w2, rank, tp)
    return out.train(ffn.training)


class TensorParallelBlock(nn.Module):
    """A decoder `Block` (same submodule names) on this rank's sequence slice [B, T/tp, d].

    Attention and the dense FFN are sharded column -> row pairs on the gathered sequence. MoE
    and PEER stay replicated: each rank routes its own slice through all experts (routing is
    token-wise, so outputs equal the single-process ones); their aux outputs are then made
    those of the whole sequence (`_over_sequence`).
    """

    def __init__(self, block: Block, rank: int, tp: int, group) -> None:
        super().__init__()  # adopts the block's norms (and replicated FFN), shards the rest
        self.attn_norm = block.attn_norm
        self.attn = sharded_attention(block.attn, rank, tp)
        self.ffn_norm = block.ffn_norm
        ffn = block.ffn
        self.ffn = sharded_swiglu(ffn, rank, tp) if isinstance(ffn, SwiGLU) else ffn
        self.group = group
        self.train(block.training)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, *attn_args: Tensor | LayerKV | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """As `Block.forward`; `attn_args` (generation's cache and mask) go to attention."""
        g = self.group
        x = x + reduce_scatter_seq(
            self.attn(gather_seq(self.attn_norm(x), g), cos, sin, *attn_args), g
        )
        y, aux = self._ffn(self.ffn_norm(x))
        return x + y, aux

    def _ffn(self, h: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if isinstance(self.ffn, SwiGLU):
            y, aux = self.ffn(gather_seq(h, self.group))
            return reduce_scatter_seq(y, self.group), aux
        if isinstance(self.ffn, MoE):
            y, routing = self.ffn.forward_with_routing(h)
            aux = self.ffn.aux_outputs(routing, h.shape)
            # Not linear in the tokens: rebuilt from the whole sequence's routing statistics.
            aux["lb_loss"] = _sequence_lb_loss(routing, self.ffn.top_k, self.group)
            return y, _over_sequence(aux, self.group, skip=("lb_loss",))
        y, aux = self.ffn(h)
        return y, _over_sequence(aux, self.group)


def _over_sequence(aux: dict[str, Tensor], group, skip: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Aux outputs of a sequence slice -> those of the whole sequence (slices are equal)."""
    aux = dict(aux)
    for key in LOSS_KEYS:
        if key in aux and key not in skip:  # a mean over tokens: the mean over slices is exact
            aux[key] = mean_over_tp(aux[key], group)
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
    return aux


def _sequence_lb_loss(r: Routing, top_k: int, group) -> Tensor:
    """The load-balancing loss of the full sequence from the slices' routings: it is not linear
    in the tokens (E * sum_e f_e P_e), so it is rebuilt from the global f (token shares, no
    gradient) and the global P (mean router probabilities, averaged over tp with autograd)."""
    n = r.probs.shape[0] * dist.get_world_size(group)
    counts = r.tokens_per_expert.to(torch.float32)
    dist.all_reduce(counts, group=group)
    p_mean = mean_over_tp(r.probs.mean(dim=0), group)
    # One "token" whose probabilities are the sequence means and whose counts are per token.
    return load_balancing_loss(p_mean.unsqueeze(0), counts / n, top_k)
