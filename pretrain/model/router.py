"""Token-choice top-k router with Switch/Mixtral load-balancing loss and router z-loss.

Computed in fp32 whatever the activation dtype (as Mixtral does): softmax and logsumexp are
the numerically fragile part of an MoE layer, and routing decisions must not flip between
backends or precisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Routing:
    """Routing of N tokens: what both MoE backends consume, plus the raw pieces for the losses."""

    logits: Tensor  # [N, E] fp32
    probs: Tensor  # [N, E] fp32 softmax
    weights: Tensor  # [N, k] fp32 combine weights (renormalised or not)
    experts: Tensor  # [N, k] int64 expert ids
    tokens_per_expert: Tensor  # [E] int64 count of assignments (N*k in total)


class TopKRouter(nn.Module):
    """Linear router without bias: logits = x W^T, W of shape [E, d] (Mixtral `gate.weight`)."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, renormalize: bool) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))

    def forward(self, x: Tensor) -> Routing:
        """x: [N, d] -> Routing."""
        logits = F.linear(x.float(), self.weight.float())
        probs = logits.softmax(dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = count_ids(experts.flatten(), self.num_experts)
        return Routing(logits, probs, weights, experts, counts)


def count_ids(ids: Tensor, n: int) -> Tensor:
    """[n] int64: how often each of 0..n-1 occurs in `ids` (all < n). torch.bincount's result,
    with a shape that does not depend on the values (bincount's does, so torch.compile breaks
    its graph there); integer sums, so exact and deterministic on every device."""
    return torch.zeros(n, dtype=torch.int64, device=ids.device).scatter_add_(
        0, ids, torch.ones_like(ids, dtype=torch.int64)
    )


def load_balancing_loss(probs: Tensor, tokens_per_expert: Tensor, top_k: int) -> Tensor:
    """Switch/Mixtral auxiliary loss E * sum_e f_e * P_e.

    f_e = fraction of the N*k token-assignments that went to e (so f sums to 1: the Switch form
    averaged over the k choices), P_e = mean router probability of e over the N tokens. Equals 1
    for a perfectly uniform router; E*max when all mass is on one expert.
    """
    n_tokens, num_experts = probs.shape
    f = tokens_per_expert.to(probs.dtype) / max(1, n_tokens * top_k)
    p = probs.mean(dim=0)
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


@torch.no_grad()
def expert_counts_per_row(experts: Tensor, rows: int, num_experts: int) -> Tensor:
    """[rows, E] int64: how many of each row's (sequence's) token-assignments went to each
    expert. `experts` is the [N, k] routing of N = rows x t tokens in row-major order. The
    trainer sums these per data source (exact per-source load, no extra forward)."""
    n = experts.shape[0]
    row = torch.arange(n, device=experts.device) // max(1, n // max(1, rows))
    flat = (row[:, None] * num_experts + experts).flatten()
    return count_ids(flat, rows * num_experts).view(rows, num_experts)


@torch.no_grad()
def expert_load_stats(tokens_per_expert: Tensor) -> dict[str, Tensor]:
    """Detached load statistics of one layer for logging.

    - tokens_per_expert_frac [E]: share of the token-assignments each expert got (sums to 1)
    - max_imbalance: max share / mean share (1 = perfectly balanced, E = all on one expert)
    - min_imbalance: min share / mean share
    - dead_experts: number of experts that got no token
    """
    counts = tokens_per_expert.float()
    frac = counts / counts.sum().clamp_min(1.0)
    mean = 1.0 / counts.numel()
    return {
        "tokens_per_expert_frac": frac,
        "max_imbalance": frac.max() / mean,
        "min_imbalance": frac.min() / mean,
        "dead_experts": (counts == 0).sum(),
    }
