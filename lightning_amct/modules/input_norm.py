"""A BatchNorm that leaves itself, in training, to the compressed layer that reads its ReLU's output.

In a Conv-BN-ReLU block before a quantized layer whose ReLU the layer applies
(:mod:`~lightning_amct.modules.input_relu`), the BatchNorm's training forward costs a statistics
pass and an output pass over the activation, and the layer's quantizer then reads that output
again; torch's CPU BatchNorm computes its statistics slowly besides (0.5 ms of a 7 ms training
step of the benchmarks' small CNN). The layer can take the BatchNorm's input instead and do all
three in its own node, in one statistics pass and one output pass, without the BatchNorm's
output ever being stored (:mod:`~lightning_amct.quant.functional.norm_passes`). The plan names such
BatchNorms (``CompressionPlan.input_norms``): an ``nn.BatchNorm1d``/``2d``/``3d`` called once,
whose output only such a ReLU reads.

An :class:`InputBatchNorm2d` (``1d``, ``3d``) takes such a module's place: the same Parameters
and buffers, the same ``state_dict``. In training, with batch statistics, where the reader will
quantize in its own node, the ReLU leaves itself to the reader too, the planes hold at least
:data:`MIN_PLANE_SIZE` values and the tensors are the kernels' (float32, contiguous, on the CPU),
it hands its input on unchanged, and the reader normalises, updates the running statistics and
counts the batch; elsewhere (evaluation, frozen statistics, ``torch.compile``, calibration,
hooks on any of the three, channels-last, CUDA) it is the BatchNorm it replaced. Values match
torch's BatchNorm within float32 rounding, running statistics included. :func:`restore_norms`
puts the plain classes back.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct import compress_model
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    >>> model = compress_model(model, "retrain_data_quant_config { ulq_quantize {} }", torch.zeros(2, 1, 4, 4))
    >>> type(model[1]).__name__, restore_norms(model), type(model[1]).__name__
    ('InputBatchNorm2d', {'1': '3'}, 'BatchNorm2d')
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_amct.modules.compressed_layers import NORM_DEFERRED, instance_like
from lightning_amct.modules.input_relu import LAST_DEFERRED, DeferringModule, InputReLU, restore_deferring, scope_of
from lightning_amct.modules.replace import replace_module
from lightning_amct.plan.relu_inputs import relu_call
from lightning_amct.quant.functional import cpu_kernels
from lightning_amct.quant.functional.ulq_layer import BatchNormInput
from lightning_amct.quant.recompute import recomputing


#: The fewest values a channel of one sample must hold for the layer to apply the BatchNorm: the
#: fused passes go plane by plane, and a plane's loop has a fixed cost (measured on two cores,
#: batch 64 of 64 channels, forward and backward: 4x4 planes 1.4x slower than torch's BatchNorm
#: and ULQ's passes, 4x8 planes 1.4x faster, 8x8 1.9x).
MIN_PLANE_SIZE = 32


class InputBatchNorm(DeferringModule):
    """The deferring forward of the BatchNorm classes below (see the module docstring).

    ``relu`` is the :class:`~lightning_amct.modules.input_relu.InputReLU` between the BatchNorm
    and its reader: the BatchNorm defers only where the ReLU will too.
    """

    relu: InputReLU
    float_class: type[nn.modules.batchnorm._BatchNorm]
    pending_key = NORM_DEFERRED

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not torch.compiler.is_compiling():
            if (self._replayed(x) if recomputing() else self._deferred(x)) is not None:
                return x
        return super().forward(x)

    def _deferred(self, x: torch.Tensor) -> BatchNormInput | None:
        """The BatchNorm left to the reader in this forward (which counts the batch where it updates
        the running statistics); None: applied here. The choice is kept for a second run of the
        forward under activation checkpointing."""
        norm = None
        if self._may_defer() and self.relu._may_defer():
            norm = self._batch_norm_input(x)
            if norm is not None and not self.reader.defer_norm(norm, x):
                norm = None
        if norm is not None:
            self._left()
        self.__dict__[LAST_DEFERRED] = norm is not None
        return norm

    def _replayed(self, x: torch.Tensor) -> BatchNormInput | None:
        """Activation checkpointing's second run of the forward: what the first run did
        (:class:`~lightning_amct.modules.input_relu.DeferringModule`). Where it left the BatchNorm
        to the reader, so again: the reader, if it runs again, normalises ``x`` again."""
        norm = self._batch_norm_input(x) if self.__dict__.get(LAST_DEFERRED) else None
        if norm is not None:  # a second run is no new batch: the running statistics stay as they are
            norm = norm.replayed()
            self.reader.defer_norm(norm, x, replay=True)
        return norm

    def _batch_norm_input(self, x: torch.Tensor) -> BatchNormInput | None:
        """What the reader needs to apply this BatchNorm to ``x``; None where the kernels cannot, where
        its planes are short (:data:`MIN_PLANE_SIZE`), or where torch's forward should raise (a wrong
        shape, one value per channel, ``eps <= 0``)."""
        tracked = self.track_running_stats and self.running_mean is not None
        stats = (self.running_mean, self.running_var) if tracked else (None, None)
        tensors = [t for t in (self.weight, self.bias, *stats) if t is not None]
        if x.dim() < 2 or x.shape[1] != self.num_features or x.numel() <= self.num_features or self.eps <= 0:
            return None
        if x.numel() // (x.shape[0] * self.num_features) < MIN_PLANE_SIZE or not cpu_kernels.applies(x, *tensors):
            return None
        batches = self.num_batches_tracked if tracked else None
        factor = 0.0  # as torch's: no momentum and no count (a state dict without it) update nothing
        if tracked and self.momentum is not None:
            factor = self.momentum
        elif batches is not None:
            factor = 1.0 / float(batches + 1)
        return BatchNormInput(self.weight, self.bias, *stats, batches, factor, self.eps, x.shape)


class InputBatchNorm1d(InputBatchNorm, nn.BatchNorm1d):
    float_class = nn.BatchNorm1d


class InputBatchNorm2d(InputBatchNorm, nn.BatchNorm2d):
    float_class = nn.BatchNorm2d


class InputBatchNorm3d(InputBatchNorm, nn.BatchNorm3d):
    float_class = nn.BatchNorm3d


_DEFERRING = {cls.float_class: cls for cls in (InputBatchNorm1d, InputBatchNorm2d, InputBatchNorm3d)}


def defer_norms(model: nn.Module, norms: dict[str, str], relus: dict[str, str]) -> None:
    """Replace each BatchNorm named in ``norms`` (BatchNorm → the layer reading its ReLU) by its
    deferring class; ``relus``: layer → its input ReLU (already an ``InputReLU``)."""
    for norm_name, layer_name in norms.items():
        norm = model.get_submodule(norm_name)
        if type(norm) not in _DEFERRING:
            raise ValueError(f"the plan expects '{norm_name}' to be a BatchNorm, the model has a {type(norm).__name__}")
        relu_name = relu_call(relus[layer_name])[0]
        relu = model.get_submodule(relu_name)
        if not isinstance(relu, InputReLU):
            raise ValueError(f"the plan expects '{relu_name}' to be a ReLU its reader applies")
        deferring = instance_like(norm, _DEFERRING[type(norm)])
        scope = scope_of(model, norm_name, relu_name, layer_name)
        deferring.__dict__.update(reader=model.get_submodule(layer_name), relu=relu, scope=scope)
        replace_module(model, norm_name, deferring)


def restore_norms(model: nn.Module) -> dict[str, str]:
    """Put the plain BatchNorm class back in place of each deferring one; returns them as
    BatchNorm → reader name. The scope hooks stay (:func:`~lightning_amct.modules.input_relu.restore_relus`
    takes them off)."""
    return restore_deferring(model, InputBatchNorm, lambda module: module.float_class)
