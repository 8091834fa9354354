"""Which layer types each feature can compress, and the defaults that depend on the type."""

from __future__ import annotations

from torch import nn

#: Layer classes (by torch class name) that can be quantized and 4:2-pruned.
QUANTIZABLE_TYPES: tuple[str, ...] = (
    "Linear",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "ConvTranspose1d",
    "ConvTranspose2d",
)

#: Layer classes whose output channels filter pruning (BCP) can remove.
FILTER_PRUNABLE_TYPES: tuple[str, ...] = ("Conv2d", "Linear")


def layer_type(module: nn.Module) -> str:
    """The name a config uses for ``module``'s type: its class name (``Conv2d``)."""
    return type(module).__name__


def is_quantizable(module: nn.Module) -> bool:
    """True for the plain torch layers of :data:`QUANTIZABLE_TYPES` (exact class, zero padding)."""
    if layer_type(module) not in QUANTIZABLE_TYPES or type(module).__module__.split(".")[0] != "torch":
        return False
    return getattr(module, "padding_mode", "zeros") == "zeros"


def filter_prune_obstacle(module: nn.Module) -> str | None:
    """Why filter pruning cannot remove ``module``'s output channels, or None when it can."""
    kind = layer_type(module)
    if kind not in FILTER_PRUNABLE_TYPES:
        return f"filter pruning removes output channels of {' and '.join(FILTER_PRUNABLE_TYPES)} only"
    groups = getattr(module, "groups", 1)
    if kind == "Conv2d" and groups > 1 and groups == module.in_channels:
        return "a depthwise conv is not a producer: it shrinks in step with its input"
    return None


def default_channel_wise(kind: str) -> bool:
    """Schema default of ``channel_wise``: per-channel scales for convolutions, per-tensor for Linear."""
    return kind != "Linear"
