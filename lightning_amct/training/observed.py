"""What the callback reads off a compressed model while it trains: clips and learned scales.

All values of one reading come back through a single device-to-host copy, so reading every
``log_every_n_steps`` costs one sync, and nothing is read in between.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lightning_amct.modules.compressed_layers import CompressedLayer
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


def observe(model: nn.Module) -> dict[str, float]:
    """``amct/<layer>/clip_max``, ``.../clip_min``, for learned scales ``.../scale_{min,mean,max}``
    and for output quantizers of their own ``amct/<module>/output_clip_max`` and ``.../output_clip_min``.

    Raises:
        FloatingPointError: a clip, a scale or a compressed layer's weight is not finite; the
            message names the layer.
    """
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    for layer_name, module in model.named_modules():
        if isinstance(module, CompressedLayer):
            names.append(f"weights/{layer_name}/finite")
            tensors.append(torch.isfinite(module.weight.detach()).all())
        act = getattr(module, "act_quant", None)
        if isinstance(act, ActivationQuantizer):
            names += [f"amct/{layer_name}/clip_max", f"amct/{layer_name}/clip_min"]
            tensors += [act.clip_max.detach().reshape(()), act.clip_min.detach().reshape(())]
        wq = getattr(module, "weight_quant", None)
        if isinstance(wq, UlqWeightQuantizer):
            scale = wq.scale.detach()
            names += [f"amct/{layer_name}/scale_{k}" for k in ("min", "mean", "max")]
            tensors += [scale.min(), scale.mean(), scale.max()]
    layer_quantizers = {id(getattr(m, "act_quant", None)) for m in model.modules()}
    for site, quantizer in output_quantizers(model).items():
        if isinstance(quantizer, ActivationQuantizer) and id(quantizer) not in layer_quantizers:
            names += [f"amct/{site}/output_clip_max", f"amct/{site}/output_clip_min"]
            tensors += [quantizer.clip_max.detach().reshape(()), quantizer.clip_min.detach().reshape(())]
    if not tensors:
        return {}
    values = torch.stack([t.float() for t in tensors]).cpu().tolist()
    for name, value in zip(names, values):
        _, layer, what = name.split("/")
        if what == "finite" and not value:
            raise FloatingPointError(f"the weights of layer '{layer}' hold non-finite values: training diverged")
        if not math.isfinite(value):
            raise FloatingPointError(f"{what} of layer '{layer}' is {value}: training diverged")
    return {name: value for name, value in zip(names, values) if name.startswith("amct/")}
