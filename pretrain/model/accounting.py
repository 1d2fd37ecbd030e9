"""Parameter and FLOP accounting from the config alone (no weights built).

Notation: V vocab, d d_model, L layers, H heads, Hkv kv heads, hd head dim, T seq_len,
E experts, k top-k, f (expert) FFN width.

Parameters
  attention per layer  A = d*H*hd (wq) + 2*d*Hkv*hd (wk, wv) + H*hd*d (wo)
  norms                2*d per layer + d (final)
  FFN per layer        dense 3*d*f;  MoE d*E (router) + 3*E*d*f;  PEER/SoftMoE: their num_params
  embeddings           V*d, plus V*d for an untied lm_head
                       (a ClassifierConfig, pretrain.memorization's sequence classifier over
                       m-dim vectors: input projection m*d + d and one-logit head d + 1 instead)
  total                sum of the above
  active per token     total with each MoE layer counted as d*E + 3*k*d*f (k experts, not E);
                       PEER/SoftMoE: their active_params_per_token

Training FLOPs per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add):
  6 * (L*(A + ffn_active_matmul) + V*d)           every weight matmul, LM head included
                                                 (the embedding lookup is not a matmul)
  + 3 * L * 4 * T * H*hd                          attention scores QK^T and AV: 2 matmuls of
                                                 2*T*H*hd FLOPs per query token each
So attention adds 12*L*T*d when H*hd = d, the full-matrix (PaLM/Chinchilla) convention that MFU
numbers usually use, although causal attention only needs half: pass attention="causal" to count
the average (T+1)/2 keys per query instead. Norms, softmax, SiLU, rotary and routing top-k are not
counted. PEER and Soft MoE report their own forward FLOPs (x3 for training) via `flops_per_token`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from pretrain.model.config import ClassifierConfig, ModelConfig
from pretrain.model.mlp import SwiGLU
from pretrain.model.moe import MoE


@dataclass(frozen=True)
class ModelSize:
    total_params: int
    active_params: int  # per token
    embedding_params: int  # embed (+ untied lm_head); a classifier's input projection + head
    flops_per_token: float  # training (fwd + bwd) FLOPs per token at seq_len
    seq_len: int

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params

    def as_dict(self) -> dict:
        return {**asdict(self), "non_embedding_params": self.non_embedding_params}


def attention_params(cfg: ModelConfig) -> int:
    d, hd = cfg.d_model, cfg.head_dim
    return 2 * d * cfg.num_heads * hd + 2 * d * cfg.kv_heads * hd


def ffn_accounting(cfg: ModelConfig, seq_len: int) -> tuple[int, int, float]:
    """(total params, active params per token, forward matmul FLOPs per token) of one FFN."""
    d = cfg.d_model
    if cfg.ffn == "dense":
        n = SwiGLU.num_params(d, cfg.ffn_dim)
        return n, n, float(SwiGLU.flops_per_token(d, cfg.ffn_dim))
    if cfg.ffn == "moe":
        f = cfg.expert_ffn_dim
        return (
            MoE.num_params(d, cfg.moe, f),
            MoE.active_params_per_token(d, cfg.moe, f),
            float(MoE.flops_per_token(d, cfg.moe, f, seq_len)),
        )
    if cfg.ffn == "peer":
        from pretrain.model.peer import PEER

        return (
            PEER.num_params(d, cfg.peer),
            PEER.active_params_per_token(d, cfg.peer),
            float(PEER.flops_per_token(d, cfg.peer)),
        )
    from pretrain.model.soft_moe import SoftMoE

    f = cfg.ffn_dim
    return (
        SoftMoE.num_params(d, cfg.soft_moe, f),
        SoftMoE.active_params_per_token(d, cfg.soft_moe, f),
        float(SoftMoE.flops_per_token(d, cfg.soft_moe, f, seq_len)),
    )


def model_size(
    cfg: ModelConfig,
    seq_len: int | None = None,
    attention: Literal["full", "causal"] = "full",
) -> ModelSize:
    """Total params, active params per token and training FLOPs per token (formula above), of
    the decoder LM or, for a ClassifierConfig, of the sequence classifier (same blocks)."""
    t = seq_len if seq_len is not None else cfg.max_seq_len
    d, v, n_layers = cfg.d_model, cfg.vocab_size, cfg.n_layers
    attn = attention_params(cfg)
    ffn_total, ffn_active, ffn_fwd = ffn_accounting(cfg, t)
    if isinstance(cfg, ClassifierConfig):  # input Linear(m, d) and head Linear(d, 1), biased
        embedding = cfg.input_dim * d + d + d + 1
        io_fwd = 2 * cfg.input_dim * d + 2 * d / t  # the head reads the last position only
    else:
        embedding = v * d * (1 if cfg.tie_embeddings else 2)
        io_fwd = 2 * v * d
    per_layer_norms = 2 * d
    total = embedding + n_layers * (attn + per_layer_norms + ffn_total) + d
    active = total - n_layers * (ffn_total - ffn_active)

    weight_fwd = n_layers * (2 * attn + ffn_fwd) + io_fwd
    keys_per_query = t if attention == "full" else (t + 1) / 2
    attn_fwd = n_layers * 2 * 2 * keys_per_query * cfg.num_heads * cfg.head_dim
    return ModelSize(
        total_params=total,
        active_params=active,
        embedding_params=embedding,
        flops_per_token=3.0 * (weight_fwd + attn_fwd),
        seq_len=t,
    )
