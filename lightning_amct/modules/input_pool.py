"""A 2-D max-pool that leaves itself, in training, to the compressed layer that reads its output.

A layer after ``nn.MaxPool2d`` (conv → ReLU → max-pool → conv, the classic CNN block) quantizes
the pool's output. On the CPU, torch's max-pool over channel-major images with small planes
costs many times a pass over its input (0.5 ms of a 9 ms training step of the bundled demo
model), and it keeps int64 indices for its backward. A layer that quantizes its input in its own
node can take the pool's input instead, find the maxima and their places in one pass and keep
those (int32 places, half the input for a 2x2 pool), with torch's values and gradients bit for bit
(:mod:`~lightning_amct.quant.functional.pool_passes`). The plan names such pools
(``CompressionPlan.input_pools``): an ``nn.MaxPool2d`` called once, whose output only that
layer reads.

An :class:`InputMaxPool2d` takes such a module's place (it has no state). In training, where the
reader will quantize in its own node, the input is ``N x C x H x W`` contiguous float32 on the CPU
and no indices are asked for, it hands its input on unchanged and the reader pools; elsewhere
(evaluation, ``torch.compile``, calibration, hooks on either, channels-last, CUDA) it is the
max-pool it replaced. :func:`restore_pools` puts the plain class back (the exported and frozen
models).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct import compress_model
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 2, 1))
    >>> model = compress_model(model, "retrain_data_quant_config { ulq_quantize {} }", torch.zeros(2, 1, 6, 6))
    >>> type(model[2]).__name__, restore_pools(model), type(model[2]).__name__
    ('InputMaxPool2d', {'2': '3'}, 'MaxPool2d')
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_amct.modules.compressed_layers import POOL_DEFERRED, instance_like
from lightning_amct.modules.input_relu import LAST_DEFERRED, DeferringModule, restore_deferring, scope_of
from lightning_amct.modules.replace import replace_module
from lightning_amct.quant.functional.pool_passes import MaxPoolInput
from lightning_amct.quant.recompute import recomputing


class InputMaxPool2d(DeferringModule, nn.MaxPool2d):
    """An ``nn.MaxPool2d`` whose output only ``reader`` reads (see the module docstring and
    :class:`~lightning_amct.modules.input_relu.DeferringModule`)."""

    pending_key = POOL_DEFERRED

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not torch.compiler.is_compiling() and self._deferred(x):
            return x
        return super().forward(x)

    def _deferred(self, x: torch.Tensor) -> bool:
        """Whether the reader pools ``x`` in this forward. Activation checkpointing's second run
        does what the first did (:class:`~lightning_amct.modules.input_relu.DeferringModule`)."""
        if recomputing():
            pool = MaxPoolInput.of(self, x) if self.__dict__.get(LAST_DEFERRED) else None
            return pool is not None and self.reader.defer_pool(pool, x, replay=True)
        pool = MaxPoolInput.of(self, x) if self._may_defer() else None
        deferred = pool is not None and self.reader.defer_pool(pool, x)
        if deferred:
            self._left()
        self.__dict__[LAST_DEFERRED] = deferred
        return deferred


def defer_pools(model: nn.Module, pools: dict[str, str]) -> None:
    """Replace each ``nn.MaxPool2d`` of ``pools`` (layer → the pool whose output it reads) by an
    :class:`InputMaxPool2d` that leaves itself to that layer."""
    for layer_name, pool_name in pools.items():
        pool = model.get_submodule(pool_name)
        if type(pool) is not nn.MaxPool2d:
            found = type(pool).__name__
            raise ValueError(f"the plan expects '{pool_name}' to be an nn.MaxPool2d, the model has a {found}")
        deferring = instance_like(pool, InputMaxPool2d)
        scope = scope_of(model, pool_name, layer_name)
        deferring.__dict__.update(reader=model.get_submodule(layer_name), scope=scope)
        replace_module(model, pool_name, deferring)


def restore_pools(model: nn.Module) -> dict[str, str]:
    """Put a plain ``nn.MaxPool2d`` in place of each :class:`InputMaxPool2d`; returns them as pool →
    reader name. The scope hooks stay (:func:`~lightning_amct.modules.input_relu.restore_relus`
    takes them off)."""
    return restore_deferring(model, InputMaxPool2d, lambda module: nn.MaxPool2d)
