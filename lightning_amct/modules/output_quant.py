"""Output quantizers: a quantizer applied to a module's output by a forward hook.

The plan's output quantizers (``quantize_outputs``, see :mod:`~lightning_amct.plan.outputs`) sit
on modules of the user's model (a BatchNorm, a ReLU) that are not replaced: the quantizer becomes
the module's child ``output_quant`` (so its clips are in the ``state_dict`` under the module's
name, e.g. ``block.bn2.output_quant.clip_max``) and a forward hook passes the module's output
through it. The hook is a module-level function: models with output quantizers deep-copy and
pickle (``ddp_spawn``) like any other.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.quant import ActivationQuantizer
    >>> relu = nn.ReLU()
    >>> attach_output_quantizer(relu, ActivationQuantizer(8, fixed_min=True, init_clip=(1.0, 0.0)))
    >>> relu(torch.tensor([0.5, 2.0]))
    tensor([0.4980, 1.0000], grad_fn=<_UlqFakeQuantBackward>)
    >>> detach_output_quantizer(relu) is not None, relu(torch.tensor([2.0]))
    (True, tensor([2.]))
"""

from __future__ import annotations

from torch import Tensor, nn

OUTPUT_QUANT = "output_quant"


def attach_output_quantizer(module: nn.Module, quantizer: nn.Module) -> None:
    """Make ``quantizer`` ``module.output_quant`` and apply it to every output of ``module``.

    Raises:
        ValueError: ``module`` already has an attribute ``output_quant``.
    """
    if hasattr(module, OUTPUT_QUANT):
        raise ValueError(f"{type(module).__name__} already has an attribute '{OUTPUT_QUANT}'")
    module.add_module(OUTPUT_QUANT, quantizer)
    module.register_forward_hook(_quantize_output)


def detach_output_quantizer(module: nn.Module) -> nn.Module | None:
    """Remove the output quantizer of ``module`` (and its hook); return it, or None if there is none."""
    quantizer = module._modules.pop(OUTPUT_QUANT, None)
    for key, hook in list(module._forward_hooks.items()):
        if hook is _quantize_output:
            del module._forward_hooks[key]
    return quantizer


def detach_output_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """Remove every output quantizer of ``model``'s modules; return them by module name."""
    quantizers = output_quantizers(model)
    for site in quantizers:
        detach_output_quantizer(model.get_submodule(site))
    return quantizers


def restore_output_hooks(model: nn.Module) -> list[str]:
    """Give the hook back to each module that holds an output quantizer without it; return their names.

    A strategy that replaces modules by converted copies keeps their children, not their hooks:
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` (Lightning's ``sync_batchnorm=True``, after
    the callbacks' ``setup``) copies a BatchNorm's ``output_quant`` into the new module, which then
    never calls it.
    """
    restored = []
    for name, module in model.named_modules():
        if OUTPUT_QUANT in module._modules and _quantize_output not in module._forward_hooks.values():
            module.register_forward_hook(_quantize_output)
            restored.append(name)
    return restored


def output_quantizers(model: nn.Module) -> dict[str, nn.Module]:
    """The output quantizers of ``model``'s modules, by the name of the module they follow."""
    return {
        name: module._modules[OUTPUT_QUANT]
        for name, module in model.named_modules()
        if _quantize_output in module._forward_hooks.values() and OUTPUT_QUANT in module._modules
    }


def _quantize_output(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    return module._modules[OUTPUT_QUANT](output)
