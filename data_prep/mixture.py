"""Mixture plan: how many training tokens each source contributes to the token budget.

Weights are normalised; a source with fewer tokens than its share is repeated (epochs > 1)
with a warning, never silently truncated or up-weighted elsewhere.
"""

from __future__ import annotations

import warnings

from data_prep.config import DataPrepConfig
from mop.errors import ConfigError, DataError


def plan_mixture(cfg: DataPrepConfig, available_tokens: dict[str, int]) -> dict:
    total_weight = sum(s.weight for s in cfg.sources)
    if total_weight <= 0:
        raise ConfigError("at least one source needs a positive weight (sources.N.weight)")
    budget = int(cfg.mixture.total_tokens)
    sources = {}
    for src in cfg.sources:
        share = src.weight / total_weight
        planned = int(round(budget * share))
        available = int(available_tokens.get(src.label, 0))
        epochs = planned / available if available else (0.0 if planned == 0 else float("inf"))
        if planned and not available:
            raise DataError(
                f"source {src.label!r} has weight {src.weight} but no training tokens: its files "
                "hold no usable rows (every row skipped? see rows_skipped in the manifest's "
                "sources or logs/tokenize-*.json), or set its weight to 0"
            )
        if epochs > 1.0:
            warnings.warn(
                f"source {src.label!r}: {available:,} tokens available for a planned {planned:,}; "
                f"it will be repeated {epochs:.2f} times",
                stacklevel=2,
            )
        sources[src.label] = {
            "weight": src.weight,
            "share": share,
            "planned_tokens": planned,
            "available_tokens": available,
            "epochs": epochs,
        }
    return {"total_tokens": budget, "seed": cfg.mixture.seed, "sources": sources}
