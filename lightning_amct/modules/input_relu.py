"""A ReLU that leaves itself to the one compressed layer reading its output, where that layer can apply it.

In a Conv-BN-ReLU block before a quantized layer, the ReLU costs a pass over the activation in
the forward (``relu_``) and one in the backward (``threshold_backward``), about 3 % of a training
step of a small CNN on the CPU. A layer that quantizes its input inside its own autograd node
(:mod:`~lightning_amct.quant.functional.ulq_layer`) with ``fixed_min`` needs neither: its
quantizer maps every ``x <= 0`` to 0 as ReLU does, and its backward pass computes ReLU's
gradient on the way. The plan names such ReLUs (``CompressionPlan.input_relus``): ``nn.ReLU``
modules called once, whose output only that layer reads (reshapes aside).

:class:`InputReLU` takes such a module's place. Before each forward it asks its reader
(:meth:`~lightning_amct.modules.compressed_layers.CompressedLayer.defer_relu`): where the reader
will quantize in its own node, the module hands its input on unchanged and the reader applies
ReLU; elsewhere (evaluation, ``torch.compile``, calibration, CUDA) it is a ReLU. The graph fact
holds inside a forward of the innermost module that holds both, so it asks only there, and only
where no hook would see its output: called on its own, or as the end of a slice of a Sequential
(a feature extractor), it is a ReLU too. A reader told to
apply ReLU that then cannot quantize in its node applies ``torch.relu`` first: values and
gradients never depend on the choice. :func:`restore_relus` puts plain ``nn.ReLU`` modules back
(the exported and frozen models).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct import compress_model
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> model = compress_model(model, "retrain_data_quant_config { ulq_quantize {} }", torch.zeros(1, 4))
    >>> type(model[1]).__name__, dict(restore_relus(model)), type(model[1]).__name__
    ('InputReLU', {'1': '2'}, 'ReLU')
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

from lightning_amct.modules.compressed_layers import instance_like
from lightning_amct.modules.replace import replace_module
from lightning_amct.plan.relu_inputs import relu_call
from lightning_amct.quant.recompute import recomputing


#: Forwards of a scope module now running (the counter its hooks keep in its ``__dict__``).
_RUNNING = "_lightning_amct_running"
#: Whether a deferring module left itself to its reader in the last training forward, in its ``__dict__``.
LAST_DEFERRED = "_lightning_amct_last_deferred"


class DeferringModule(nn.Module):
    """A module that may leave its work to ``reader``, the one compressed layer reading its output.

    It may only while ``scope``, the innermost module holding both, runs its forward (where the
    plan's graph fact holds: not a call from elsewhere, such as a slice of a Sequential ending
    at it), and only where no hook would see its output. The reader and the scope are held
    outside the module tree (not submodules): copies and pickles keep the links,
    ``state_dict`` and ``named_modules`` do not see them.

    Activation checkpointing runs a block's forward a second time in the backward pass
    (:func:`~lightning_amct.quant.recompute.recomputing`), where the scope may not be running:
    the module then does what it did in the first run (:data:`LAST_DEFERRED`), so that the
    second run saves the tensors the first saved (``torch.utils.checkpoint`` checks their number).
    """

    reader: nn.Module
    scope: nn.Module

    def _may_defer(self) -> bool:
        if self.scope.__dict__.get(_RUNNING, 0) <= 0 or self._forward_hooks or self._forward_pre_hooks:
            return False
        return not (_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks)


class InputReLU(DeferringModule, nn.ReLU):
    """An ``nn.ReLU`` whose output only ``reader`` reads (see the module docstring and :class:`DeferringModule`).

    A ReLU module called more than once (``only_after_norm``) leaves only the calls that a
    BatchNorm before it left to a reader (:mod:`~lightning_amct.modules.input_norm`): those are
    told apart by their input, which a reader of ``readers`` is waiting for.
    """

    def __init__(
        self, readers: list[nn.Module], scope: nn.Module, inplace: bool = False, only_after_norm: bool = False
    ) -> None:
        super().__init__(inplace)
        self.__dict__.update(readers=readers, scope=scope, only_after_norm=only_after_norm)

    @property
    def reader(self) -> nn.Module:
        """The layer a ReLU called once leaves itself to (its only reader)."""
        return self.readers[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # the reader quantizes through its quantizer module there
            return super().forward(x)
        if any(reader.normalizes(x) for reader in self.readers):
            return x
        if self.only_after_norm:
            return super().forward(x)
        if recomputing():
            deferred = self.__dict__.get(LAST_DEFERRED, False) and self.reader.defer_relu(x, replay=True)
        else:
            deferred = self._may_defer() and self.reader.defer_relu(x)
            self.__dict__[LAST_DEFERRED] = deferred
        return x if deferred else super().forward(x)


def defer_relus(model: nn.Module, relus: dict[str, str]) -> None:
    """Replace each ``nn.ReLU`` of ``relus`` (layer → the ReLU entry of
    :func:`~lightning_amct.plan.relu_inputs.relus_read_only_by` whose output it reads) by an
    :class:`InputReLU`.

    The innermost module holding the ReLU and its readers gets hooks that count its running
    forwards (the ReLU's scope).
    """
    readers: dict[str, list[str]] = {}
    called_more_than_once = set()
    for layer_name, entry in relus.items():
        relu_name, index = relu_call(entry)
        readers.setdefault(relu_name, []).append(layer_name)
        if index is not None:
            called_more_than_once.add(relu_name)
    for relu_name, layer_names in readers.items():
        relu = model.get_submodule(relu_name)
        if type(relu) is not nn.ReLU:
            raise ValueError(f"the plan expects '{relu_name}' to be an nn.ReLU, the model has a {type(relu).__name__}")
        scope = scope_of(model, relu_name, *layer_names)
        layers = [model.get_submodule(name) for name in layer_names]
        only_after_norm = relu_name in called_more_than_once
        replace_module(model, relu_name, InputReLU(layers, scope, relu.inplace, only_after_norm=only_after_norm))
        for layer in layers:
            # its input has no other reader: under torch.compile, keeping the quantized output costs less
            layer.act_quant.checkpointed = False


def restore_relus(model: nn.Module) -> dict[str, str]:
    """Put a plain ``nn.ReLU`` in place of each :class:`InputReLU` and take the scope hooks off;
    returns the ReLUs as ReLU → reader name."""
    names = {id(module): name for name, module in model.named_modules()}
    restored = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, InputReLU):
            restored[name] = ", ".join(names.get(id(reader), "") for reader in module.readers)
            replace_module(model, name, nn.ReLU(module.inplace))
            for reader in module.readers:
                reader.act_quant.checkpointed = True
    for module in model.modules():
        for hooks, hook in ((module._forward_pre_hooks, _enter_scope), (module._forward_hooks, _leave_scope)):
            for key in [key for key, value in hooks.items() if value is hook]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
        module.__dict__.pop(_RUNNING, None)
    return restored


def restore_deferring(
    model: nn.Module, deferring: type[DeferringModule], plain_class: Callable[[nn.Module], type[nn.Module]]
) -> dict[str, str]:
    """Put a module of ``plain_class(module)`` in place of each ``deferring`` module, with its
    attributes but without the links to its reader; returns them as module → reader name (the
    restore functions of the deferring classes)."""
    names = {id(module): name for name, module in model.named_modules()}
    restored = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, deferring):
            restored[name] = names.get(id(module.reader), "")
            plain = instance_like(module, plain_class(module))
            for link in ("reader", "relu", "scope", LAST_DEFERRED):
                plain.__dict__.pop(link, None)
            replace_module(model, name, plain)
    return restored


def scope_of(model: nn.Module, *names: str) -> nn.Module:
    """The innermost module holding the named modules, with the hooks that count its running forwards."""
    scope = model.get_submodule(_common_prefix(*names))
    if _enter_scope not in scope._forward_pre_hooks.values():
        scope.register_forward_pre_hook(_enter_scope)
        scope.register_forward_hook(_leave_scope, always_call=True)
    return scope


def _enter_scope(module: nn.Module, args: tuple) -> None:
    module.__dict__[_RUNNING] = module.__dict__.get(_RUNNING, 0) + 1


def _leave_scope(module: nn.Module, args: tuple, output: object) -> None:
    module.__dict__[_RUNNING] = module.__dict__.get(_RUNNING, 1) - 1


def _common_prefix(*names: str) -> str:
    """The innermost module name that all names lie under (``""``: the model)."""
    common = []
    for parts in zip(*(name.split(".")[:-1] for name in names)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)
