"""Swapping one module of a model for another, by its name in ``model.named_modules()``."""

from __future__ import annotations

from torch import nn


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``model.get_submodule(name)`` is.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> replace_module(model, "1", nn.Identity())
        >>> model
        Sequential(
          (0): Linear(in_features=2, out_features=2, bias=True)
          (1): Identity()
        )
    """
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
