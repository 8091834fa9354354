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

import sys
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

from lightning_amct.modules.compressed_layers import IN_NODE, RELU_DEFERRED, instance_like
from lightning_amct.modules.replace import replace_module
from lightning_amct.plan.relu_inputs import relu_call
from lightning_amct.quant.recompute import recomputing


#: Forwards of a scope module now running as the plan traced them (the counter its hooks keep in its ``__dict__``).
_RUNNING = "_lightning_amct_running"
#: Its forwards now running with other arguments than tensors (a flag: maybe another path than the traced one).
_ASIDE = "_lightning_amct_aside"
#: The deferring modules that left themselves to their readers in the scope's running forward.
_LEFT = "_lightning_amct_left"
#: Whether a deferring module left itself to its reader in the last training forward, in its ``__dict__``.
LAST_DEFERRED = "_lightning_amct_last_deferred"


class DeferringModule(nn.Module):
    """A module that may leave its work to ``reader``, the one compressed layer reading its output.

    It may only while ``scope``, the innermost module holding both, runs its forward (where the
    plan's graph fact holds: not a call from elsewhere, such as a slice of a Sequential ending
    at it), called with tensors alone as the plan traced it (a flag such as ``features=True`` may
    take another path, which returns this module's output, say), and only where no hook would see
    its output. Where a forward of the scope ends without the reader having applied what a module
    left to it, it raises a ``RuntimeError`` rather than go on with wrong values. The reader and
    the scope are held outside the module tree (not submodules): copies and pickles keep the
    links, ``state_dict`` and ``named_modules`` do not see them.

    Activation checkpointing runs a block's forward a second time in the backward pass
    (:func:`~lightning_amct.quant.recompute.recomputing`), where the scope may not be running:
    the module then does what it did in the first run (:data:`LAST_DEFERRED`), so that the
    second run saves the tensors the first saved (``torch.utils.checkpoint`` checks their number).
    """

    reader: nn.Module
    scope: nn.Module
    #: The record in the reader's ``__dict__`` that says what this module left to it, until it applies it.
    pending_key: str

    def _may_defer(self) -> bool:
        running = self.scope.__dict__
        if running.get(_RUNNING, 0) <= 0 or running.get(_ASIDE, 0) or self._forward_hooks or self._forward_pre_hooks:
            return False
        if self in running.get(_LEFT, ()) and self.reader.__dict__.get(self.pending_key):
            raise RuntimeError(
                f"an {type(self).__name__} was called again in this training forward before its reader applied "
                "its last call (a call from a hook, say), whose output was then its input: put the plain modules "
                "back (lightning_amct.modules.input_relu.restore_relus, input_norm.restore_norms, "
                "input_pool.restore_pools) to call it so"
            )
        return not (_module_hooks._global_forward_hooks or _module_hooks._global_forward_pre_hooks)

    def _left(self) -> None:
        """Note that this module left itself to its reader in the scope's running forward."""
        self.scope.__dict__.setdefault(_LEFT, []).append(self)


class InputReLU(DeferringModule, nn.ReLU):
    """An ``nn.ReLU`` whose output only ``reader`` reads (see the module docstring and :class:`DeferringModule`).

    A ReLU module called more than once (``only_after_norm``) leaves only the calls that a
    BatchNorm before it left to a reader (:mod:`~lightning_amct.modules.input_norm`): those are
    told apart by their input, which a reader of ``readers`` is waiting for.
    """

    pending_key = RELU_DEFERRED

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
            if deferred:
                self._left()
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
                for markers in (module._forward_hooks_always_called, module._forward_hooks_with_kwargs):
                    markers.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
        for key in (_RUNNING, _ASIDE, _LEFT):
            module.__dict__.pop(key, None)
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
        scope.register_forward_pre_hook(_enter_scope, with_kwargs=True)
        scope.register_forward_hook(_leave_scope, with_kwargs=True, always_call=True)
    return scope


def _enter_scope(module: nn.Module, args: tuple, kwargs: dict) -> None:
    counter = _counter(args, kwargs)
    module.__dict__[counter] = module.__dict__.get(counter, 0) + 1


def _leave_scope(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
    counter = _counter(args, kwargs)
    running = module.__dict__.get(counter, 1) - 1
    module.__dict__[counter] = running
    if counter == _RUNNING and running == 0:
        _check_applied(module, failed=sys.exc_info()[0] is not None)


def _counter(args: tuple, kwargs: dict) -> str:
    """The counter a scope's call raises: :data:`_RUNNING` for a call with tensors alone (as the plan
    traced the model, with its example inputs), else :data:`_ASIDE`."""
    traced = all(isinstance(a, torch.Tensor) for a in args)
    return _RUNNING if traced and all(v is None or isinstance(v, torch.Tensor) for v in kwargs.values()) else _ASIDE


def _check_applied(scope: nn.Module, failed: bool) -> None:
    """At the end of a scope's forward: every module left to a reader in it was applied by that
    reader, else a ``RuntimeError`` (not where the forward raised already); the records are cleared."""
    left = scope.__dict__.pop(_LEFT, [])
    for module in left:  # the reader's record of its own decision goes too: the next forward asks again
        module.reader.__dict__.pop(IN_NODE, None)
    unapplied = [module for module in left if module.reader.__dict__.pop(module.pending_key, None)]
    if unapplied and not failed:
        names = {id(module): name for name, module in scope.named_modules()}
        pairs = ", ".join(f"'{names.get(id(m), '?')}' to '{names.get(id(m.reader), '?')}'" for m in unapplied)
        raise RuntimeError(
            f"this training forward left {pairs} and ended without applying them: it took another path "
            "than the one the plan traced. Call the model's modules as its forward traced them, or put the "
            "plain modules back (lightning_amct.modules.input_relu.restore_relus, input_norm.restore_norms, "
            "input_pool.restore_pools)"
        )


def _common_prefix(*names: str) -> str:
    """The innermost module name that all names lie under (``""``: the model)."""
    common = []
    for parts in zip(*(name.split(".")[:-1] for name in names)):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)
