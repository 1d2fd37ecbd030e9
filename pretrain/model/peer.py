"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts").

A pool of N single-neuron experts, e_i(x) = act(u_i . x) * v_i with u_i, v_i in R^d, stored as
two `nn.Embedding(N, d)` tables. Each of `num_heads` heads computes a query, retrieves its
`top_k` experts by product keys and mixes them with softmax weights (the paper's Eq. 1-3):

    y(x) = sum_heads sum_{i in top_k} softmax(scores)_i * act(u_i . x) * v_i

Product keys (Lample et al. 2019) make retrieval over N = n^2 experts cost O(n) per query: the
query is split in halves, each half is scored against its own table of n sub-keys, the top k of
each table form k*k candidates whose score is the sum of the two halves, and the top k of those
are exactly the top k over all N full keys [k_1[i]; k_2[j]] (see `product_key_topk`). Heads
share the expert pool and the sub-keys, as in the paper.

Every step is per token (no mixing along the sequence), so the layer is causal-safe and usable
as the FFN of a decoder LM. The optional batch-norm on queries (used in the paper) computes batch
statistics in training mode, which couples tokens of a batch; it is therefore off by default.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model.config import PEERConfig  # noqa: F401  (its home: torch-free config)

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def product_key_topk(s1: Tensor, s2: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of `s1[..., i] + s2[..., j]` over all (i, j) pairs, in O(n + k^2) per row.

    Correct because if (i, j) is in the global top k then i is in the top k of s1 (otherwise k
    better pairs (i', j) exist) and likewise j for s2. Returns `(scores, index)`, both
    `[..., k]`, sorted descending, with `index = i * n + j` where n = `s2.shape[-1]`. Scores
    stay differentiable with respect to s1 and s2.
    """
    n = s2.shape[-1]
    v1, i1 = s1.topk(k, dim=-1)
    v2, i2 = s2.topk(k, dim=-1)
    cand = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)  # [..., k*k]
    scores, flat = cand.topk(k, dim=-1)
    index = i1.gather(-1, flat // k) * n + i2.gather(-1, flat % k)
    return scores, index


class PEER(nn.Module):
    """PEER layer: `forward(x[..., d]) -> (y[..., d], stats)`.

    Parameters: `query.weight [H*key_dim, d]` (no bias), `sub_keys [2, n, key_dim/2]`,
    `down.weight [N, d]` (u_i), `up.weight [N, d]` (v_i), plus BN affine `[H*key_dim]` x 2 when
    `query_batchnorm`. The expert tables are only gathered (no dense N x d matmul); their
    gradients are dense tensors with non-zero rows only for retrieved experts.
    """

    causal: ClassVar[bool] = True

    def __init__(self, d_model: int, cfg: PEERConfig) -> None:
        super().__init__()
        self.d_model = d_model
        self.cfg = cfg
        self.num_heads, self.top_k, self.key_dim = cfg.num_heads, cfg.top_k, cfg.key_dim
        self.num_sub_keys = cfg.num_sub_keys
        self.act = _ACTIVATIONS[cfg.activation]
        self.query = nn.Linear(d_model, cfg.num_heads * cfg.key_dim, bias=False)
        self.query_norm = (
            nn.BatchNorm1d(cfg.num_heads * cfg.key_dim) if cfg.query_batchnorm else None
        )
        self.sub_keys = nn.Parameter(torch.empty(2, self.num_sub_keys, cfg.key_dim // 2))
        self.down = nn.Embedding(cfg.num_experts, d_model)
        self.up = nn.Embedding(cfg.num_experts, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """u_i, v_i ~ N(0, 1/d) so u_i . x is O(|x|/sqrt(d)); sub-keys N(0, 2/key_dim) so each
        half-score is O(|q|). nn.Embedding's default N(0, 1) would make pre-activations
        O(sqrt(d)) times too large."""
        nn.init.normal_(self.query.weight, std=self.d_model**-0.5)
        nn.init.normal_(self.sub_keys, std=(self.key_dim // 2) ** -0.5)
        nn.init.normal_(self.down.weight, std=self.d_model**-0.5)
        nn.init.normal_(self.up.weight, std=self.d_model**-0.5)
        if self.query_norm is not None:
            self.query_norm.reset_parameters()

    def retrieve(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head top-k expert retrieval for tokens `x[M, d]`: `(scores, index)`, `[M, H, k]`.

        Scores are unnormalised (query . key); `forward` applies the softmax over each head's k.
        """
        m = x.shape[0]
        q = self.query(x)
        if self.query_norm is not None:
            q = self.query_norm(q)
        q = q.view(m, self.num_heads, 2, self.key_dim // 2)
        sub = torch.einsum("mhcd,cnd->mhcn", q, self.sub_keys.to(q.dtype))
        return product_key_topk(sub[:, :, 0], sub[:, :, 1], self.top_k)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Retrieve, weight and apply the experts. Stats: `expert_usage`, the (detached)
        fraction of the N experts retrieved at least once in this batch (dead-expert monitor;
        no host sync, costs an N-float buffer)."""
        shape = x.shape
        xf = x.reshape(-1, self.d_model)
        m, hk = xf.shape[0], self.num_heads * self.top_k
        scores, index = self.retrieve(xf)
        weights = scores.float().softmax(dim=-1)  # over each head's k experts
        u = self.down(index)  # [M, H, k, d] gather, never a dense N x d product
        pre = torch.einsum("mhkd,md->mhk", u, xf.to(u.dtype))
        gates = (weights * self.act(pre.float())).reshape(m, hk)
        # sum_{h,k} gate * v_i as one weighted bag-sum: no [M, H, k, d] tensor for the up side.
        y = F.embedding_bag(
            index.reshape(m, hk),
            self.up.weight,
            per_sample_weights=gates.to(self.up.weight.dtype),
            mode="sum",
        )
        with torch.no_grad():
            used = torch.zeros(self.cfg.num_experts, device=x.device)
            used.index_fill_(0, index.reshape(-1), 1.0)
            stats = {"expert_usage": used.mean()}
        return y.to(x.dtype).reshape(shape), stats

    @staticmethod
    def num_params(d_model: int, cfg: PEERConfig) -> int:
        """`d*H*kd` (query) + `n*kd` (2 sub-key tables of n x kd/2) + `2*N*d` (u, v)
        + `2*H*kd` (BN affine, if query_batchnorm). kd = key_dim, n = sqrt(N)."""
        h, kd = cfg.num_heads, cfg.key_dim
        bn = 2 * h * kd if cfg.query_batchnorm else 0
        return d_model * h * kd + cfg.num_sub_keys * kd + 2 * cfg.num_experts * d_model + bn

    @staticmethod
    def active_params_per_token(d_model: int, cfg: PEERConfig) -> int:
        """Parameters a token touches: query + all sub-keys (every key is scored) + the
        `H*k` retrieved experts' u and v (`2*H*k*d`) + BN affine if used. The paper's
        "active parameters" counts only the experts; add the rest as routing overhead."""
        h, kd = cfg.num_heads, cfg.key_dim
        bn = 2 * h * kd if cfg.query_batchnorm else 0
        return d_model * h * kd + cfg.num_sub_keys * kd + 2 * h * cfg.top_k * d_model + bn

    @staticmethod
    def flops_per_token(d_model: int, cfg: PEERConfig) -> float:
        """Forward matmul FLOPs per token (2 per multiply-add).

        With d = d_model, H heads, kd = key_dim, n = sqrt(N), k = top_k:
          query x -> H*kd          2*d*H*kd
          sub-key scores           2*H*n*kd    (2 tables x n keys x kd/2 per head)
          expert down u_i . x      2*H*k*d
          expert up sum g_i v_i    2*H*k*d
        total = 2*d*H*kd + 2*H*n*kd + 4*H*k*d. Top-k, the k*k candidate sums, softmax and the
        activation are not counted. Independent of N except through n = sqrt(N).
        """
        d, h, kd, k = d_model, cfg.num_heads, cfg.key_dim, cfg.top_k
        return float(2 * d * h * kd + 2 * h * cfg.num_sub_keys * kd + 4 * h * k * d)
