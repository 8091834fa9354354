"""What the callback reads off a compressed model while it trains: clips and learned scales.

All values of one reading come back through a single device-to-host copy, so reading every
``log_every_n_steps`` costs one sync, and nothing is read in between. A parameter sharded across
ranks (FSDP2) is read whole (an all-gather of its parts): every rank must read, in the same order.
Whether the values are finite is :mod:`~lightning_amct.training.divergence`'s concern, every step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_amct.modules.output_quant import output_quantizers
from lightning_amct.quant import ActivationQuantizer, UlqWeightQuantizer


def compression_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The clip and learned-scale Parameters of ``model`` (each once, even when shared)."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, (ActivationQuantizer, UlqWeightQuantizer)):
            for param in module.parameters(recurse=False):
                seen.setdefault(id(param), param)
    return list(seen.values())


def pinned_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The clips that ``fixed_min`` pins at 0 (no gradient): each activation quantizer's ``clip_min`` with it."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, ActivationQuantizer) and module.fixed_min:
            seen.setdefault(id(module.clip_min), module.clip_min)
    return list(seen.values())


def observe(model: nn.Module) -> dict[str, float]:
    """``amct/<layer>/clip_max``, ``.../clip_min``, for learned scales ``.../scale_{min,mean,max}``
    and for output quantizers of their own ``amct/<module>/output_clip_max`` and ``.../output_clip_min``.
    """
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for layer_name, module in model.named_modules():
        act = getattr(module, "act_quant", None)
        if isinstance(act, ActivationQuantizer):
            names += [f"amct/{layer_name}/clip_max", f"amct/{layer_name}/clip_min"]
            tensors += [_whole(act.clip_max).reshape(()), _whole(act.clip_min).reshape(())]
        wq = getattr(module, "weight_quant", None)
        if isinstance(wq, UlqWeightQuantizer):
            scale = _whole(wq.scale)
            names += [f"amct/{layer_name}/scale_{k}" for k in ("min", "mean", "max")]
            tensors += [scale.min(), scale.mean(), scale.max()]
    layer_quantizers = {id(getattr(m, "act_quant", None)) for m in model.modules()}
    for site, quantizer in output_quantizers(model).items():
        if isinstance(quantizer, ActivationQuantizer) and id(quantizer) not in layer_quantizers:
            names += [f"amct/{site}/output_clip_max", f"amct/{site}/output_clip_min"]
            tensors += [_whole(quantizer.clip_max).reshape(()), _whole(quantizer.clip_min).reshape(())]
    if not tensors:
        return {}
    return dict(zip(names, torch.stack([t.float() for t in tensors]).cpu().tolist()))


def _whole(param: torch.Tensor) -> torch.Tensor:
    """``param``'s values, detached; a sharded parameter (DTensor) gathered from every rank."""
    param = param.detach()
    return param.full_tensor() if isinstance(param, DTensor) else param
