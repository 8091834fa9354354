"""Gate quantizers: a gate site's gate value put on the fixed grid by a forward hook.

The plan's gate sites (:mod:`~lightning_amct.plan.gates`) are activation modules of the user's
model, not replaced: the :class:`~lightning_amct.quant.GateQuantizer` becomes the module's child
``gate_quant`` (it has no state) and a forward hook applies it. The hook computes the gate value
from the module's input and returns ``Q(sigmoid(x))``, ``Q(hardsigmoid(x))`` or ``x * Q(sigmoid(x))``
in place of the module's output (an in-place module is no gate site:
its input is gone). The hard sigmoid is computed as ONNX Runtime computes it,
``clamp(x * (1/6) + 0.5, 0, 1)`` in float32, not as torch's ``hardsigmoid``, which differs from it
in the last bit for about a quarter of all inputs: a last bit that moves a gate value across a
rounding boundary of the gate grid is one step of difference between PyTorch and the deploy
model. Attached before any output quantizer of the same module, the gate runs first: the output
quantizer then quantizes the gated product. The hook is a module-level function: models with
gates deep-copy and pickle (the hook is a ``functools.partial`` of it).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.quant import GateQuantizer
    >>> silu = nn.SiLU()
    >>> attach_gate_quantizer(silu, GateQuantizer())
    >>> silu(torch.tensor([1.0])), torch.sigmoid(torch.tensor([1.0]))
    (tensor([0.7294]), tensor([0.7311]))
    >>> sorted(detach_gate_quantizers(nn.Sequential(silu))), silu(torch.tensor([1.0]))
    (['0'], tensor([0.7311]))
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from lightning_amct.plan.gates import VALUE_GATES, gate_function

GATE_QUANT = "gate_quant"
#: The hard sigmoid's slope and offset, ONNX's HardSigmoid ``alpha`` and ``beta``.
_HARDSIGMOID = (1 / 6, 0.5)


def attach_gate_quantizer(module: nn.Module, quantizer: nn.Module) -> None:
    """Make ``quantizer`` ``module.gate_quant`` and apply it to ``module``'s gate value.

    Raises:
        ValueError: ``module`` is no gate (see :func:`~lightning_amct.plan.gates.gate_function`),
            or already has an attribute ``gate_quant``.
    """
    if gate_function(module) is None:
        raise ValueError(f"{type(module).__name__} is no gate: a sigmoid, SiLU or hard sigmoid, not in place")
    if hasattr(module, GATE_QUANT):
        raise ValueError(f"{type(module).__name__} already has an attribute '{GATE_QUANT}'")
    module.add_module(GATE_QUANT, quantizer)
    module.register_forward_hook(functools.partial(_quantize_gate, gate_function(module)))


def detach_gate_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Remove every gate quantizer of ``model``'s modules (and their hooks); return them by module name."""
    found = {}
    for name, module in model.named_modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "func", None) is _quantize_gate:
                del module._forward_hooks[key]
                found[name] = module._modules.pop(GATE_QUANT)
    return found


def _quantize_gate(function: str, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    """The hook, with the module's kind of gate bound: a sigmoid's output is its gate value; a hard
    sigmoid's is recomputed as ONNX Runtime computes it, a SiLU's from its input."""
    x = inputs[0]
    if function == "sigmoid":
        value = output
    else:
        value = _hardsigmoid(x) if function == "hardsigmoid" else torch.sigmoid(x)
    gate = module._modules[GATE_QUANT](value)
    return gate if function in VALUE_GATES else x * gate


def _hardsigmoid(x: Tensor) -> Tensor:
    """``clamp(x * alpha + beta, 0, 1)`` as ONNX Runtime's HardSigmoid computes it (no fused
    multiply-add); under an ONNX export torch's ``hardsigmoid``, which exports as that HardSigmoid."""
    if torch.onnx.is_in_onnx_export():
        return nn.functional.hardsigmoid(x)
    alpha, beta = _HARDSIGMOID
    return torch.clamp(x * alpha + beta, 0.0, 1.0)
