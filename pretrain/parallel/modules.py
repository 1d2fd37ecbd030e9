"""Swapping a submodule of a built model for its parallel counterpart."""

from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where `model.get_submodule(name)` is. Same name, so the parameter names (the
    checkpoint contract) stay those of the plain model."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)
