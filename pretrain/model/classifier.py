"""Sequence classifier for the memorization (theory) task: real-valued inputs, one logit.

The task's sequences are N Gaussian vectors in R^m with a +-1 label, so there are no tokens:
an input Linear(m -> d) replaces the embedding, then the decoder's own `Block`s (attention +
dense / MoE / Soft MoE / PEER FFN), the final RMSNorm, and a Linear(d -> 1) read at the LAST
position (the paper predicts at the last token). `ClassifierConfig` is a `ModelConfig` plus
`input_dim`, so every model YAML loads as one; `vocab_size` and `tie_embeddings` are unused.
`causal` defaults to False here: the last position sees the whole sequence either way, and
Soft MoE (which mixes all positions) needs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pretrain.model.accounting import model_size
from pretrain.model.config import ClassifierConfig, ModelConfig  # noqa: F401 (re-export)
from pretrain.model.norm import RMSNorm
from pretrain.model.rotary import RotaryEmbedding
from pretrain.model.transformer import Block, init_blocks, run_blocks, weighted_aux_loss


@dataclass
class ClassifierOutput:
    logits: Tensor  # [B]: logit of the label being +1
    aux_loss: Tensor  # weighted MoE lb + z losses (0 without a routed MoE)
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    expert_stats: list[dict[str, Tensor]] = field(default_factory=list)


class SequenceClassifier(nn.Module):
    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_proj = nn.Linear(cfg.input_dim, cfg.d_model)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, 1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The decoder's scheme (N(0, init_std), residual outputs scaled by 1/sqrt(2L));
        the input projection is N(0, 1/m) so that unit-variance inputs give unit-scale
        hidden states, and the head starts at zero (logit 0: no initial label preference).
        `query_init: zero` zeroes the query projections: attention starts uniform."""
        nn.init.normal_(self.input_proj.weight, std=self.cfg.input_dim**-0.5)
        nn.init.zeros_(self.input_proj.bias)
        init_blocks(self.blocks, self.cfg.init_std, self.cfg.n_layers)
        if self.cfg.query_init == "zero":
            for block in self.blocks:
                nn.init.zeros_(block.attn.wq.weight)
        self.norm.weight.fill_(1.0)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> ClassifierOutput:
        """x [B, N, input_dim] float -> ClassifierOutput with logits [B]."""
        t = x.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} > max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rotary(torch.arange(t, device=x.device))
        h, sums, stats = run_blocks(self.blocks, self.input_proj(x), cos, sin)
        logits = self.head(self.norm(h[:, -1])).squeeze(-1)
        return ClassifierOutput(logits, weighted_aux_loss(self.cfg, sums, logits), sums, stats)


def classifier_size(cfg: ClassifierConfig) -> tuple[int, int]:
    """(total params, active params per token) from the config alone: `model_size`'s count
    of the classifier (what `python -m pretrain.model_info --classifier` prints too)."""
    size = model_size(cfg)
    return size.total_params, size.active_params


def build_classifier(cfg: ClassifierConfig) -> SequenceClassifier:
    return SequenceClassifier(cfg)
