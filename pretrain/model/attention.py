"""Multi-head (optionally grouped-query) causal self-attention, with an optional KV cache.

Kept small on purpose: projections + rotary + one SDPA call. Training calls it with (x, cos,
sin) only; generation passes a `LayerKV` (this layer's slot of a `KVCache`) that keeps the
rotated keys and values of earlier tokens, and an explicit boolean mask built once per forward
by the Transformer (causal offset by the cached length, plus padded keys left out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model.rotary import apply_rotary


class LayerKV:
    """Keys and values [B, Hkv, S, hd] of the tokens one layer has seen so far."""

    def __init__(self) -> None:
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new tokens' k/v after the cached ones; returns all of them."""
        # Concatenation copies O(S) per step: fine for the short generations of evals, and it
        # keeps the cache a plain pair of tensors (no preallocated maximum length).
        self.k = k if self.k is None else torch.cat((self.k, k), dim=2)
        self.v = v if self.v is None else torch.cat((self.v, v), dim=2)
        return self.k, self.v

    def select(self, rows: Tensor) -> None:
        """Keep only batch rows `rows` (e.g. drop finished sequences)."""
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


class KVCache:
    """Per-layer k/v plus which cached key positions are real (False = left padding)."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(n_layers)]
        self.key_mask: Tensor | None = None  # [B, S] bool; None = every key is real

    @property
    def length(self) -> int:
        return self.layers[0].length

    def select(self, rows: Tensor) -> None:
        for layer in self.layers:
            layer.select(rows)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows]


class Attention(nn.Module):
    def __init__(
        self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, causal: bool = True
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.causal = causal
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cache: LayerKV | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """`mask` [B or 1, 1, T, S] bool (True = may attend) replaces the built-in causal mask."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # rotated keys are cached: positions never change
        out = self._attend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        # One SDPA call on every path (causal training, masked generation). Grouped-query
        # heads go to SDPA as they are (query head h reads kv head h // n_rep, the transformers
        # `repeat_kv` layout) instead of copying k and v n_rep times first.
        gqa = {"enable_gqa": True} if self.n_kv_heads != self.n_heads else {}
        if mask is not None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, **gqa)
