"""Soft Mixture of Experts (Puigcerver et al. 2023; studied by Chung et al. 2024).

Each of `n` experts owns `p` slots. A slot is a convex combination of *all* tokens of the
sequence (dispatch weights: softmax over the token axis of `x @ phi`), every expert (a SwiGLU)
processes its `p` slots, and each token reads back a convex combination of all slot outputs
(combine weights: softmax over the slot axis of the same logits). No token is dropped and no
routing is discrete, so the layer is fully differentiable and load balance is not a concern.

NOT CAUSAL: a slot mixes every token of the sequence, so the output at position t depends on
tokens after t. The layer therefore serves the non-autoregressive synthetic tasks; a causal LM
must not use it (`SoftMoE.causal` is False so a block factory can refuse it with a clear error).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model.config import SoftMoEConfig  # noqa: F401  (its home: torch-free config)


def _entropy(probs: Tensor, dim: int) -> Tensor:
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim)


class SoftMoE(nn.Module):
    """Soft MoE layer: `forward(x[B,T,d]) -> (y[B,T,d], stats)`.

    Parameters: `phi[d, n*p]` (slot embeddings), `w1, w3 [n, d, h]` (gate, up) and
    `w2 [n, h, d]` (down), plus `scale` (a scalar) when `cfg.normalize`.
    """

    causal: ClassVar[bool] = False

    def __init__(self, d_model: int, cfg: SoftMoEConfig, ffn_hidden: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.slots_per_expert = cfg.slots_per_expert
        self.hidden = cfg.ffn_hidden if cfg.ffn_hidden is not None else ffn_hidden
        n, h = cfg.num_experts, self.hidden
        self.num_slots = n * cfg.slots_per_expert
        self.phi = nn.Parameter(torch.empty(d_model, self.num_slots))
        self.w1 = nn.Parameter(torch.empty(n, d_model, h))
        self.w3 = nn.Parameter(torch.empty(n, d_model, h))
        self.w2 = nn.Parameter(torch.empty(n, h, d_model))
        self.scale = nn.Parameter(torch.ones(())) if cfg.normalize else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as `cfg.init` says; `scale` starts at 1 so normalised logits are cosines."""
        if self.cfg.init == "normal":
            for w in (self.phi, self.w1, self.w3, self.w2):
                nn.init.normal_(w, std=self.cfg.init_std)
        else:
            nn.init.normal_(self.phi, std=self.d_model**-0.5)
            nn.init.normal_(self.w1, std=self.d_model**-0.5)
            nn.init.normal_(self.w3, std=self.d_model**-0.5)
            nn.init.normal_(self.w2, std=self.hidden**-0.5)
        if self.scale is not None:
            nn.init.ones_(self.scale)

    def routing_weights(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Return `(dispatch, combine)`, both `[B, T, n*p]` in float32.

        `dispatch[b, :, s]` sums to 1 over tokens (slot s is a convex mix of the valid tokens);
        `combine[b, t, :]` sums to 1 over slots. `mask[B, T]` (True = real token) gives padded
        tokens zero dispatch weight, so padding never leaks into a slot; a sequence with no
        valid token gets all-zero dispatch weights instead of NaN. Slot index s = expert*p + j.
        """
        xf, phi = x.float(), self.phi.float()
        # Routing in float32 even under autocast: bf16 logits blur the softmax over long T.
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.scale is not None:
                # Puigcerver et al. Sec. 2.3: l2-normalise tokens and slot embeddings, with a
                # learned scale.
                xn, phin = F.normalize(xf, dim=-1), F.normalize(phi, dim=0)
                logits = self.scale.float() * (xn @ phin)
            else:
                logits = xf @ phi
        combine = logits.softmax(dim=-1)
        if mask is None:
            dispatch = logits.softmax(dim=1)
        else:
            keep = mask.to(torch.bool).unsqueeze(-1)
            masked = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
            dispatch = masked.softmax(dim=1) * keep
        return dispatch, combine

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Mix tokens into slots, run each expert on its slots, mix slot outputs back.

        Outputs at padded positions are still computed (they read the slots) but padding
        contributes nothing to any valid position. Stats (detached, nats): mean entropy of the
        dispatch distribution over tokens and of the combine distribution over slots.
        """
        b, t, d = x.shape
        dispatch, combine = self.routing_weights(x, mask)
        n, p = self.num_experts, self.slots_per_expert
        slots = torch.einsum("bts,btd->bsd", dispatch.to(x.dtype), x).reshape(b, n, p, d)
        gate = torch.einsum("bnpd,ndh->bnph", slots, self.w1)
        up = torch.einsum("bnpd,ndh->bnph", slots, self.w3)
        out = torch.einsum("bnph,nhd->bnpd", F.silu(gate) * up, self.w2)
        y = torch.einsum("bts,bsd->btd", combine.to(x.dtype), out.reshape(b, n * p, d))
        with torch.no_grad():
            stats = {
                "dispatch_entropy": _entropy(dispatch, dim=1).mean(),
                "combine_entropy": _entropy(combine, dim=-1).mean(),
            }
        return y, stats

    @staticmethod
    def num_params(d_model: int, cfg: SoftMoEConfig, ffn_hidden: int) -> int:
        """`d*n*p` (phi) + `3*n*d*h` (experts) + 1 (scale, if normalize); h = cfg or model."""
        h = cfg.ffn_hidden if cfg.ffn_hidden is not None else ffn_hidden
        n, p = cfg.num_experts, cfg.slots_per_expert
        return d_model * n * p + 3 * n * d_model * h + (1 if cfg.normalize else 0)

    @staticmethod
    def active_params_per_token(d_model: int, cfg: SoftMoEConfig, ffn_hidden: int) -> int:
        """All parameters: every token feeds every slot and reads every expert's output."""
        return SoftMoE.num_params(d_model, cfg, ffn_hidden)

    @staticmethod
    def flops_per_token(d_model: int, cfg: SoftMoEConfig, ffn_hidden: int, seq_len: int) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add), averaged over a sequence.

        With S = n*p slots, d = d_model, h = expert hidden, T = seq_len:
          logits x@phi       2*d*S
          dispatch (slots)   2*d*S      (2*T*S*d per sequence / T)
          combine (outputs)  2*d*S
          experts (SwiGLU)   6*d*h*S/T  (S slots * 3 matmuls * 2*d*h per sequence / T)
        total = 6*d*S + 6*d*h*S/T. Softmaxes, norms and the SiLU are not counted. Expert cost
        per token falls as T grows because the number of slots is fixed per sequence, hence a
        float.
        """
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        h = cfg.ffn_hidden if cfg.ffn_hidden is not None else ffn_hidden
        s = cfg.num_experts * cfg.slots_per_expert
        return 6 * d_model * s + 6 * d_model * h * s / seq_len
