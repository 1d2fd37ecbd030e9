"""Token-choice top-k MoE layer (dropless): router + experts in megablocks' GLU layout."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.model.config import MoEConfig
from pretrain.model.moe_backends import MegablocksExperts, torch_dropless_experts
from pretrain.model.router import (
    Routing,
    TopKRouter,
    expert_counts_per_row,
    expert_load_stats,
    load_balancing_loss,
    router_z_loss,
)


class MoE(nn.Module):
    """`forward(x[B,T,d]) -> (y[B,T,d], {'lb_loss', 'z_loss', load stats...})`.

    Parameters: `router.weight [E, d]`, `w1`, `v1`, `w2` each `[E*f, d]` (see moe_backends).
    """

    def __init__(self, d_model: int, cfg: MoEConfig, ffn_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.ffn_hidden = ffn_hidden
        self.router = TopKRouter(d_model, cfg.num_experts, cfg.top_k, cfg.renormalize)
        rows = cfg.num_experts * ffn_hidden
        self.w1 = nn.Parameter(torch.empty(rows, d_model))
        self.v1 = nn.Parameter(torch.empty(rows, d_model))
        self.w2 = nn.Parameter(torch.empty(rows, d_model))
        self._megablocks: MegablocksExperts | None = None
        if cfg.backend == "megablocks":
            # Built now so a missing install fails at model construction, not mid-step.
            self._megablocks = MegablocksExperts(d_model, ffn_hidden, cfg.num_experts, cfg.top_k)

    def reset_parameters(self, std: float, out_std: float) -> None:
        for w in (self.router.weight, self.w1, self.v1):
            nn.init.normal_(w, std=std)
        nn.init.normal_(self.w2, std=out_std)

    def expert_weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """Views [E, f, d] of w1 (gate), v1 (up), w2 (down, h @ w2[e])."""
        shape = (self.num_experts, self.ffn_hidden, self.d_model)
        return self.w1.view(shape), self.v1.view(shape), self.w2.view(shape)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        y, routing = self.forward_with_routing(x)
        return y, self.aux_outputs(routing, x.shape)

    def forward_with_routing(self, x: Tensor) -> tuple[Tensor, Routing]:
        """The one routing path of every MoE layer: x [B, T, d] -> (y, the Routing behind it).
        Tensor parallel computes its own aux outputs from the Routing (over the sequence)."""
        flat = x.reshape(-1, self.d_model)
        routing = self.router(flat)
        return self.run_experts(flat, routing).view(x.shape), routing

    def run_experts(self, flat: Tensor, routing: Routing) -> Tensor:
        """[N, d] -> [N, d]: each token's weighted k experts, on this process's experts
        (`ExpertParallelMoE` overrides this with the all-to-all exchange)."""
        if self._megablocks is not None:
            return self._megablocks(flat, routing, self.w1, self.v1, self.w2)
        return torch_dropless_experts(
            flat, routing, self.w1, self.v1, self.w2, use_grouped_mm=self.cfg.grouped_mm
        )

    def aux_outputs(self, routing: Routing, shape: torch.Size) -> dict[str, Tensor]:
        """Aux losses and load statistics of one routing of `shape` ([B, T, d]) inputs; the
        same for every way of running the experts (expert parallel included)."""
        return {
            "lb_loss": load_balancing_loss(routing.probs, routing.tokens_per_expert, self.top_k),
            "z_loss": router_z_loss(routing.logits),
            **expert_load_stats(routing.tokens_per_expert),
            "expert_counts_per_row": expert_counts_per_row(
                routing.experts, shape[0] if len(shape) == 3 else 1, self.num_experts
            ),
        }

    @staticmethod
    def num_params(d_model: int, cfg: MoEConfig, ffn_hidden: int) -> int:
        """Router d*E + E experts x 3*d*f."""
        return d_model * cfg.num_experts + 3 * cfg.num_experts * d_model * ffn_hidden

    @staticmethod
    def active_params_per_token(d_model: int, cfg: MoEConfig, ffn_hidden: int) -> int:
        """Router d*E + k experts x 3*d*f."""
        return d_model * cfg.num_experts + 3 * cfg.top_k * d_model * ffn_hidden

    @staticmethod
    def flops_per_token(d_model: int, cfg: MoEConfig, ffn_hidden: int, seq_len: int) -> int:
        """Forward matmul FLOPs per token: 2 x active params (router + k SwiGLU experts)."""
        del seq_len  # token-wise layer
        return 2 * MoE.active_params_per_token(d_model, cfg, ffn_hidden)
