"""The decoder: a plain single-device nn.Module built from `ModelConfig` alone.

Module names are a contract (parallel wrappers and the HF export rely on them):
`embed`, `blocks[i].attn.{wq,wk,wv,wo}`, `blocks[i].attn_norm`, `blocks[i].ffn_norm`,
`blocks[i].ffn` (dense: `ffn.{w1,w2,w3}`; MoE: `ffn.router.weight`, `ffn.{w1,v1,w2}`),
`norm`, `lm_head` (absent weight of its own when embeddings are tied: it shares `embed.weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model.attention import Attention, KVCache, LayerKV
from pretrain.model.config import ModelConfig
from pretrain.model.ffn import build_ffn, init_ffn
from pretrain.model.norm import RMSNorm
from pretrain.model.rotary import RotaryEmbedding

LOSS_KEYS = ("lb_loss", "z_loss")


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]
    # Weighted sum over layers of lb and z losses (0 for dense): add it to the LM loss.
    aux_loss: Tensor
    # Unweighted sums over layers of each aux loss, for logging.
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    # One dict of detached statistics per layer whose FFN reports any (MoE: expert load).
    expert_stats: list[dict[str, Tensor]] = field(default_factory=list)
    hidden: Tensor | None = None  # final normed hidden states [B, T, d] if asked for


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.causal)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(cfg)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: LayerKV | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, mask)
        y, aux = self.ffn(self.ffn_norm(x))
        return x + y, aux


@torch.no_grad()
def init_blocks(blocks: nn.ModuleList, std: float, n_layers: int) -> None:
    """N(0, std) for the block's input projections; output projections (wo, FFN down) get
    std / sqrt(2 * n_layers) because each block adds two residual branches (GPT-2)."""
    out_std = std / math.sqrt(2 * n_layers)
    for block in blocks:
        for lin in (block.attn.wq, block.attn.wk, block.attn.wv):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(block.attn.wo.weight, std=out_std)
        block.attn_norm.weight.fill_(1.0)
        block.ffn_norm.weight.fill_(1.0)
        init_ffn(block.ffn, std, out_std)


def run_blocks(
    blocks: nn.ModuleList,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    kv_cache: KVCache | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor], list[dict[str, Tensor]]]:
    """The block loop of every model built from `Block`s (the decoder and the classifier).

    Returns (hidden states, the aux losses summed over layers, one dict of detached statistics
    per layer that reports any). `kv_cache` and `mask` are generation only (Transformer.forward).
    """
    caches = kv_cache.layers if kv_cache is not None else [None] * len(blocks)
    sums: dict[str, Tensor] = {}
    stats: list[dict[str, Tensor]] = []
    for block, cache in zip(blocks, caches):
        # Training calls (x, cos, sin): activation checkpointing wraps block.forward that way.
        x, aux = block(x, cos, sin) if mask is None else block(x, cos, sin, cache, mask)
        for key in LOSS_KEYS:
            if key in aux:
                sums[key] = sums.get(key, 0.0) + aux[key]
        layer_stats = {k: v.detach() for k, v in aux.items() if k not in LOSS_KEYS}
        if layer_stats:
            stats.append(layer_stats)
    return x, sums, stats


def weighted_aux_loss(cfg: ModelConfig, sums: dict[str, Tensor], like: Tensor) -> Tensor:
    """The aux loss to add to the task loss: the MoE weights times the summed lb and z losses
    (0 for layers that report none: dense, PEER, Soft MoE)."""
    total = like.new_zeros((), dtype=torch.float32)
    moe = cfg.moe
    if moe is not None:
        if "lb_loss" in sums and moe.lb_loss_weight:
            total = total + moe.lb_loss_weight * sums["lb_loss"]
        if "z_loss" in sums and moe.z_loss_weight:
            total = total + moe.z_loss_weight * sums["z_loss"]
    return total


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; output projections (wo, FFN down) get
        init_std / sqrt(2 * n_layers) because each block adds two residual branches (GPT-2)."""
        std = self.cfg.init_std
        nn.init.normal_(self.embed.weight, std=std)
        init_blocks(self.blocks, std, self.cfg.n_layers)
        self.norm.weight.fill_(1.0)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def forward(
        self,
        input_ids: Tensor,
        return_hidden: bool = False,
        positions: Tensor | None = None,
        kv_cache: KVCache | None = None,
        attention_mask: Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, T] -> ModelOutput. `positions` [T] defaults to 0..T-1.

        Generation only (training passes neither):
        - `kv_cache` (from `new_kv_cache()`): the new tokens continue the cached ones; their
          positions default to cache.length + 0..T-1, they attend to every cached token, and
          their keys/values are appended to the cache.
        - `attention_mask` [B, T] (1 = real token, 0 = padding) of the new tokens: padded keys are
          never attended to (left padding for batched generation). Rotary scores depend only on
          the distance between tokens, so a left-padded row scores as it would unpadded.
        """
        t = input_ids.shape[1]
        past = 0 if kv_cache is None else kv_cache.length
        if positions is None:
            if past + t > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {past + t} > max_seq_len={self.cfg.max_seq_len}")
            positions = torch.arange(past, past + t, device=input_ids.device)
        mask = None
        if kv_cache is not None or attention_mask is not None:
            mask = self._attention_mask(input_ids, past, kv_cache, attention_mask)
        cos, sin = self.rotary(positions)
        x, aux_sums, stats = run_blocks(
            self.blocks, self.embed(input_ids), cos, sin, kv_cache, mask
        )
        h = self.norm(x)
        logits = self.lm_head(h)
        return ModelOutput(
            logits=logits,
            aux_loss=weighted_aux_loss(self.cfg, aux_sums, logits),
            aux_losses=aux_sums,
            expert_stats=stats,
            hidden=h if return_hidden else None,
        )

    def _attention_mask(
        self, input_ids: Tensor, past: int, cache: KVCache | None, attention_mask: Tensor | None
    ) -> Tensor:
        """Boolean [B or 1, 1, T, past + T]: causal with the new tokens offset by `past`, padded
        keys excluded. A token always sees itself, so a padding query row is never empty (an
        all-masked row would give NaN that then leaks into real rows through the residual)."""
        if not self.cfg.causal:
            raise ValueError("a KV cache or padding mask needs a causal model (causal=true)")
        b, t = input_ids.shape
        dev = input_ids.device
        q_pos = torch.arange(past, past + t, device=dev)[:, None]
        k_pos = torch.arange(past + t, device=dev)[None, :]
        mask = (k_pos <= q_pos)[None]  # [1, T, S]
        key_mask = cache.key_mask if cache is not None else None
        if attention_mask is not None or key_mask is not None:
            new = (
                attention_mask.to(device=dev, dtype=torch.bool)
                if attention_mask is not None
                else torch.ones(b, t, dtype=torch.bool, device=dev)
            )
            old = (
                key_mask
                if key_mask is not None
                else torch.ones(b, past, dtype=torch.bool, device=dev)
            )
            key_mask = torch.cat((old, new), dim=1)  # [B, S]
            if cache is not None:
                cache.key_mask = key_mask
            mask = (mask & key_mask[:, None, :]) | (k_pos == q_pos)[None]
        return mask[:, None]


def lm_loss(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy in fp32 over positions whose target != ignore_index.

    `targets` are already shifted (targets[:, t] is the token after input t)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=ignore_index,
    )


def build_model(cfg: ModelConfig) -> Transformer:
    return Transformer(cfg)
