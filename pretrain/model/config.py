"""Model config: one `ModelConfig` per decoder, validated here and nowhere else.

Defaults (the paper leaves these open; each one is a config value):

- `n_heads`: d_model // 64 (head_dim 64), as in the OLMo/Llama small models.
- `n_kv_heads`: None = n_heads (plain multi-head attention); set it for GQA.
- `ffn_hidden`: None = round_up(8/3 * d_model, 128). SwiGLU has three matrices, so 8/3 * d keeps
  the parameter count of the classic 4d two-matrix MLP (Llama convention: d=4096 -> 11008).
  Multiples of 128 keep the grouped GEMMs aligned (megablocks' sparse path requires it).
- `moe.ffn_hidden`: None = the dense `ffn_hidden`, i.e. every expert is a full-size dense FFN
  (Mixtral convention), so a top-2 MoE has about twice the dense FFN's active FFN parameters.
  One summary of the paper says its FFN width is d (following OLMoE); set
  `moe.ffn_hidden=<d>` (and `ffn_hidden=<d>`) to reproduce that reading.
- `vocab_size`: 32000 (Mistral/Llama size; the tokenizer of `data_prep` may override it).
- `max_seq_len`: 2048, `rope_theta`: 10000, `norm_eps`: 1e-5, `init_std`: 0.02.

Unset sizes stay None in the saved config and are resolved by properties (`head_dim`,
`kv_heads`, `ffn_dim`, `expert_ffn_dim`), so that an override of `d_model` on the command line
recomputes them instead of keeping numbers derived from the old width.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mop.config import StrictModel

FFN_MULTIPLE = 128


def default_ffn_hidden(d_model: int) -> int:
    """round_up(8/3 * d, 128): SwiGLU width with the parameters of a 4d two-matrix MLP."""
    raw = (8 * d_model + 2) // 3
    return ((raw + FFN_MULTIPLE - 1) // FFN_MULTIPLE) * FFN_MULTIPLE


# The FFN alternatives' configs live here, not beside their layers, so that loading and
# validating a config never imports torch (a bad config is reported in well under a second).


class PEERConfig(StrictModel):
    """PEER FFN replacement. Paper defaults: N = 1024^2, 8 heads, top_k 16, key_dim 128, BN on."""

    num_experts: int = Field(
        1024**2, ge=4, description="N single-neuron experts; a perfect square n^2 (product keys)"
    )
    num_heads: int = Field(8, ge=1, description="independent retrieval heads sharing the pool")
    top_k: int = Field(16, ge=1, description="experts retrieved per head (and per sub-key table)")
    key_dim: int = Field(128, ge=2, description="query dim; each sub-key has key_dim/2")
    query_batchnorm: bool = Field(
        False,
        description="BatchNorm1d on queries as in the paper; couples tokens through batch "
        "statistics in training mode, so off by default (causal-safe)",
    )
    activation: Literal["gelu", "relu", "silu"] = Field("gelu", description="expert nonlinearity")

    @field_validator("num_experts")
    @classmethod
    def _perfect_square(cls, value: int) -> int:
        root = math.isqrt(value)
        if root * root != value:
            lo, hi = root * root, (root + 1) ** 2
            raise ValueError(
                f"PEER num_experts must be a perfect square n*n because product keys use two "
                f"sub-key tables of n = sqrt(N) keys each; {value} is not (nearest: {lo} = "
                f"{root}^2 or {hi} = {root + 1}^2)"
            )
        return value

    @field_validator("key_dim")
    @classmethod
    def _even_key_dim(cls, value: int) -> int:
        if value % 2:
            raise ValueError(f"PEER key_dim must be even (split into two halves), got {value}")
        return value

    @model_validator(mode="after")
    def _top_k_fits(self) -> PEERConfig:
        n = math.isqrt(self.num_experts)
        if self.top_k > n:
            raise ValueError(
                f"PEER top_k = {self.top_k} must be <= sqrt(num_experts) = {n}: each sub-key "
                f"table must supply top_k candidates"
            )
        return self

    @property
    def num_sub_keys(self) -> int:
        """n = sqrt(N): the size of each of the two sub-key tables."""
        return math.isqrt(self.num_experts)


class SoftMoEConfig(StrictModel):
    """Soft MoE FFN replacement: `num_experts` SwiGLU experts with `slots_per_expert` slots each."""

    num_experts: int = Field(8, ge=1, description="n: number of SwiGLU experts")
    slots_per_expert: int = Field(1, ge=1, description="p: slots per expert")
    ffn_hidden: int | None = Field(
        None, ge=1, description="hidden width of each expert; None = the model's ffn_hidden"
    )
    normalize: bool = Field(
        False,
        description="Puigcerver's l2-normalised inputs and slot embeddings times a learned "
        "scale (initialised to 1); keeps logits bounded when d_model is large",
    )
    init: Literal["fan_in", "normal"] = Field(
        "fan_in",
        description="fan_in: every matrix N(0, 1/fan_in) (phi is LeCun-normal as in the "
        "paper); normal: every matrix N(0, init_std^2)",
    )
    init_std: float = Field(0.02, gt=0, description="std for init='normal'")


class MoEConfig(StrictModel):
    """Token-choice top-k MoE (Mixtral/megablocks dMoE), dropless."""

    num_experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    # Mixtral renormalises the k selected probabilities to sum to 1; False keeps raw softmax.
    renormalize: bool = True
    lb_loss_weight: float = Field(0.01, ge=0)
    z_loss_weight: float = Field(0.001, ge=0)
    backend: Literal["torch", "megablocks"] = "torch"
    # Width of one expert; None = the model's dense ffn width (see module docstring).
    ffn_hidden: int | None = Field(None, ge=1)
    # `torch` backend on CUDA: use torch._grouped_mm when it works (falls back to a loop).
    grouped_mm: bool = True

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(
                f"moe.top_k={self.top_k} must be <= moe.num_experts={self.num_experts}"
            )
        return self


class ModelConfig(StrictModel):
    """A decoder: embeddings, n_layers x (attention + FFN-like layer), final norm, LM head."""

    vocab_size: int = Field(32000, ge=1)
    d_model: int = Field(512, ge=1)
    n_layers: int = Field(20, ge=1)
    n_heads: int | None = Field(None, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)
    ffn_hidden: int | None = Field(None, ge=1)
    max_seq_len: int = Field(2048, ge=1)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)
    causal: bool = True
    ffn: Literal["dense", "moe", "peer", "soft_moe"] = "dense"
    moe: MoEConfig | None = None
    peer: PEERConfig | None = None
    soft_moe: SoftMoEConfig | None = None

    # Resolved sizes -----------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.n_heads if self.n_heads is not None else max(1, self.d_model // 64)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.num_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def ffn_dim(self) -> int:
        return self.ffn_hidden if self.ffn_hidden is not None else default_ffn_hidden(self.d_model)

    @property
    def expert_ffn_dim(self) -> int:
        if self.moe is not None and self.moe.ffn_hidden is not None:
            return self.moe.ffn_hidden
        return self.ffn_dim

    # Validation ---------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _fill_selected_section(cls, data):
        # `ffn: moe` with no `moe:` section means "the default MoE"; same for peer/soft_moe.
        if isinstance(data, dict):
            kind = data.get("ffn")
            if kind in ("moe", "peer", "soft_moe") and data.get(kind) is None:
                data = {**data, kind: {}}
        return data

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"n_heads={self.num_heads} must divide d_model={self.d_model}")
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = d_model/n_heads = {self.head_dim} must be even for rotary positions"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.kv_heads} must divide n_heads={self.num_heads}")
        if self.ffn == "soft_moe" and self.causal:
            raise ValueError(
                "ffn='soft_moe' with causal=true: Soft MoE mixes tokens across the sequence "
                "(each slot averages all positions), so a token would see the future; it cannot "
                "serve a causal LM. Use it with causal=false (non-autoregressive synthetic tasks)"
            )
        return self


# Here, not beside the classifier module, so that reading a classifier config (and refusing a bad
# one) does not import torch: `python -m pretrain.memorization` checks its inputs first.
class ClassifierConfig(ModelConfig):
    """A `ModelConfig` read as a sequence classifier over `input_dim`-dimensional vectors."""

    input_dim: int = Field(32, ge=1)
    causal: bool = False
    # "zero": the attention query projection starts at zero, so every position gets the same
    # weight at step 0 (the length-2-path task needs an even sum over the edges; random
    # query/key products at a large init_std leave some seeds stuck below 61%).
    query_init: Literal["normal", "zero"] = "normal"


def is_classifier_yaml(data: dict) -> bool:
    """Whether a model YAML (as read) is a sequence classifier's: it sets a field only
    `ClassifierConfig` has (input_dim, query_init). One rule for pretrain.model_info and the
    config tests; `ModelConfig` would refuse such a file as an unknown field."""
    only_classifier = set(ClassifierConfig.model_fields) - set(ModelConfig.model_fields)
    return bool(only_classifier & set(data))
