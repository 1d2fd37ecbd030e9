"""Dense SwiGLU MLP: w2(silu(w1 x) * w3 x); w1 gate, w3 up, w2 down (Llama/Mistral names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), {}

    def reset_parameters(self, std: float, out_std: float) -> None:
        for w in (self.w1.weight, self.w3.weight):
            torch.nn.init.normal_(w, std=std)
        torch.nn.init.normal_(self.w2.weight, std=out_std)

    @staticmethod
    def num_params(d_model: int, hidden: int) -> int:
        return 3 * d_model * hidden

    @staticmethod
    def flops_per_token(d_model: int, hidden: int) -> int:
        """Forward matmul FLOPs per token: 3 matmuls x 2*d*h."""
        return 6 * d_model * hidden
