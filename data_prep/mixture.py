"""Mixture plan: how many training tokens each source contributes to the token budget.

Weights are normalised; a source with fewer tokens than its share is repeated (epochs > 1)
with a warning, never silently truncated or up-weighted elsewhere.
"""

from __future__ import annotations

import warnings

from data_prep.config import DataPrepConfig
from mop.errors import ConfigError, DataError


def plan_mixture(cfg: DataPrepConfig, available_tokens: dict[str, int]) -> dict:
    weights = {src.label: src.weight for src in cfg.sources}
    return plan_shares(weights, available_tokens, int(cfg.mixture.total_tokens), cfg.mixture.seed)


def plan_shares(
    weights: dict[str, float], available_tokens: dict[str, int], budget: int, seed: int = 0
) -> dict:
    """The plan for sources `weights` (label -> weight) over a budget of training tokens."""
    total_weight = sum(weights.values())
    if total_weight <= 0:
        raise ConfigError("at least one source needs a positive weight (sources.N.weight)")
    sources = {}
    for label, weight in weights.items():
        share = weight / total_weight
        planned = int(round(budget * share))
        available = int(available_tokens.get(label, 0))
        epochs = planned / available if available else (0.0 if planned == 0 else float("inf"))
        if planned and not available:
            raise DataError(
                f"source {label!r} has weight {weight} but no training tokens: its files "
                "hold no usable rows (every row skipped? see rows_skipped in the manifest's "
                "sources or logs/tokenize-*.json), or set its weight to 0"
            )
        if epochs > 1.0:
            warnings.warn(
                f"source {label!r}: {available:,} tokens available for a planned {planned:,}; "
                f"it will be repeated {epochs:.2f} times",
                stacklevel=2,
            )
        sources[label] = {
            "weight": weight,
            "share": share,
            "planned_tokens": planned,
            "available_tokens": available,
            "epochs": epochs,
        }
    return {"total_tokens": budget, "seed": seed, "sources": sources}
