"""BatchNorm folding at export: a quantized conv absorbs the BatchNorm right after it.

Training keeps a conv's BatchNorm separate (as the reference does); deployment wants one conv. In
eval mode ``BN(y) = k*y + (beta - k*mean)`` per output channel, with ``k = gamma / sqrt(var + eps)``.
With ``y = conv(x, q * s) + b`` (integers ``q``, scale ``s`` per channel)::

    k * q * s = (sign(k) * q) * (s * |k|)

so the folded conv keeps the **same integers** up to sign, its scale becomes ``s * |k|`` (the
reference's rule), and its bias ``beta + k * (b - mean)``. The folded layer computes the same
function up to float rounding.

A pair is folded only when that is exact in integers and safe in the graph: the conv is quantized
(its weight has integers and scales), called once, its output goes only into the BatchNorm, which
is called once, in eval mode with running statistics, with one feature per output channel. The
BatchNorm may be a subclass (model libraries have their own, e.g. one that applies an activation
after ``F.batch_norm``); :func:`neutralize_batchnorm` then leaves it in place as an exact identity
of its normalization, so whatever else its ``forward`` does still happens. A channel with ``k = 0``
stays unfolded, with a note.

A channel with ``k < 0`` whose integers reach ``-2^(n-1)`` cannot be negated exactly on the grid
(``2^(n-1)`` does not fit): those integers become ``2^(n-1) - 1``, as the reference does, one step
of that channel smaller. :func:`clamped_by_folding` counts them and the export notes it; the
frozen model computes with the folded weight, so every artifact agrees with it. Left unfolded, the
BatchNorm would run in float between the conv and its output quantizer, and ONNX Runtime would run
the conv in float too.

Example:
    >>> import torch
    >>> from lightning_amct.export.integer import IntegerLayer
    >>> bn = torch.nn.BatchNorm2d(2, eps=0.0).eval()
    >>> _ = bn.weight.data.copy_(torch.tensor([-2.0, 1.0]))
    >>> ints = torch.tensor([3, -5], dtype=torch.int8).reshape(2, 1, 1, 1)
    >>> conv = IntegerLayer("conv", "Conv2d", 0, 1, 8, ints, torch.tensor([0.5, 0.25]), None, None, None, None)
    >>> folded = fold_batchnorm(conv, "bn", bn)
    >>> folded.weight_int.flatten().tolist(), folded.weight_scale.tolist()
    ([-3, -5], [1.0, 0.25])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import torch
from torch import nn

from lightning_amct.export.integer import IntegerLayer
from lightning_amct.graph import ModelGraph, ModuleCall
from lightning_amct.quant.functional import int_range

_FOLDABLE_TYPES = {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d"}


def batchnorm_successors(graph: ModelGraph, layer_names: Collection[str]) -> dict[str, str]:
    """Layer name -> the BatchNorm that alone reads its output, for the named layers.

    Args:
        graph: the captured graph of the model in plain layers (``float_copy``: the same module names).
        layer_names: the quantized layers.
    """
    pairs = {}
    for name in layer_names:
        calls = graph.calls(name)
        if len(calls) != 1 or len(calls[0].outputs) != 1:
            continue
        readers = graph.readers(calls[0].outputs[0])
        if len(readers) != 1 or not isinstance(readers[0], ModuleCall):
            continue
        bn = readers[0]
        is_batchnorm = isinstance(graph.modules[bn.module], nn.modules.batchnorm._BatchNorm)
        if is_batchnorm and len(graph.calls(bn.module)) == 1 and bn.inputs[:1] == calls[0].outputs:
            pairs[name] = bn.module
    return pairs


def fold_problem(layer: IntegerLayer, bn: nn.modules.batchnorm._BatchNorm) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` exactly, or None if it can."""
    if layer.weight_int is None:
        return "its weight is not quantized"
    if layer.layer_type not in _FOLDABLE_TYPES:
        return f"{layer.layer_type} is not a convolution"
    if bn.running_mean is None or bn.running_var is None:
        return "the BatchNorm keeps no running statistics"
    channels = layer.weight_shape[layer.out_axis]
    if bn.num_features != channels:
        return f"the BatchNorm has {bn.num_features} features for {channels} weight output channels"
    factor = _factor(bn)
    if not bool(torch.isfinite(factor).all()) or bool((factor == 0).any()):
        return "a channel has gamma/sqrt(var+eps) zero or not finite"
    return None


def clamped_by_folding(layer: IntegerLayer, bn: nn.modules.batchnorm._BatchNorm) -> int:
    """How many integers of ``layer`` folding ``bn`` moves by one step: ``-2^(n-1)`` in a channel
    with ``gamma < 0``, whose negation ``2^(n-1)`` does not fit and becomes ``2^(n-1) - 1``."""
    q_lo, _ = int_range(layer.weight_bits)
    negative = (_factor(bn) < 0).reshape(_channel_view(layer))
    return int(((layer.weight_int == q_lo) & negative).sum())


@torch.no_grad()
def fold_batchnorm(layer: IntegerLayer, bn_name: str, bn: nn.modules.batchnorm._BatchNorm) -> IntegerLayer:
    """``layer`` with ``bn`` folded in: integers negated where ``k < 0`` (``-2^(n-1)`` to
    ``2^(n-1) - 1``), scale ``s*|k|``, bias folded.

    Raises:
        ValueError: the pair cannot be folded exactly (:func:`fold_problem` says why).
    """
    problem = fold_problem(layer, bn)
    if problem is not None:
        raise ValueError(f"cannot fold {bn_name} into {layer.name}: {problem}")
    factor = _factor(bn)
    channels = factor.numel()
    sign = torch.where(factor < 0, -1, 1).to(torch.int16).reshape(_channel_view(layer))
    _, q_hi = int_range(layer.weight_bits)
    integers = torch.clamp(layer.weight_int.to(torch.int16) * sign, max=q_hi).to(torch.int8)
    scale = (layer.weight_scale.double().expand(channels) * factor.abs()).float()
    bias = layer.bias.double() if layer.bias is not None else torch.zeros(channels, dtype=torch.float64)
    beta = bn.bias.detach().double().cpu() if bn.bias is not None else torch.zeros(channels, dtype=torch.float64)
    folded_bias = beta + factor * (bias - bn.running_mean.detach().double().cpu())
    return dataclasses.replace(
        layer,
        weight_int=integers,
        weight_scale=scale.contiguous(),
        bias=folded_bias.float(),
        folded_batchnorm=bn_name,
    )


def has_plain_forward(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    """Whether ``bn`` computes torch's batch norm and nothing else (its class keeps torch's ``forward``)."""
    return type(bn).forward in (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


@torch.no_grad()
def neutralize_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Make ``bn``'s normalization an exact identity: mean 0, variance 1, epsilon 0, gamma 1, beta 0.

    Then ``(x - 0) / sqrt(1 + 0) * 1 + 0`` is ``x`` bit for bit, in torch and in ONNX Runtime, and
    the deploy model drops the BatchNormalization node that this exports to.
    """
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0)
    bn.eps = 0.0
    if bn.weight is not None:
        bn.weight.fill_(1.0)
    if bn.bias is not None:
        bn.bias.zero_()


def _factor(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``k = gamma / sqrt(var + eps)`` per channel, float64."""
    var = bn.running_var.detach().double().cpu()
    gamma = bn.weight.detach().double().cpu() if bn.weight is not None else torch.ones_like(var)
    return gamma / torch.sqrt(var + bn.eps)


def _channel_view(layer: IntegerLayer) -> tuple[int, ...]:
    shape = [1] * len(layer.weight_shape)
    shape[layer.out_axis] = layer.weight_shape[layer.out_axis]
    return tuple(shape)
