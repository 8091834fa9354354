"""A convolution over a quantized input that needs no gradient, with the quantizer's clip gradients.

The first layer of a network reads an input that needs no gradient, yet a learned activation
quantizer on that input needs ``dL/dy`` (``y`` the quantized input) for its two clip gradients,
and autograd computes it with the layer's backward-data pass. For a convolution over a few input
channels (grayscale or RGB images, raw audio) that pass is slow on the CPU: oneDNN's
backward-data kernel for one to three output channels takes 1.5-9x the time of the layer's
weight-gradient pass, about a tenth of the training step of a small CNN on 28x28 images.

Only two numbers are needed. With ``W`` the layer's (quantized) weight, ``A_W`` the layer as a
linear map of its input (without its bias), ``d_max = dy/dclip_max``, ``d_min = dy/dclip_min``
(element by element, :func:`~lightning_amct.quant.functional.ulq.ulq_clip_directions`) and
``g = dL/dout``, the layer being bilinear in its input and its weight gives::

    dL/dclip = <A_W^T g, d> = <g, A_W d> = <W, G(d, g)>

where ``G(d, g)`` is the layer's weight gradient for input ``d`` and output gradient ``g``: the
weight gradient of a convolution over ``d_max`` and ``d_min`` as ``2 * C_in`` input channels. Over
one input channel, the layer's own weight gradient ``G(y, g)`` comes from the same pass (three
input channels), which reads ``g`` once instead of twice; over more, oneDNN's kernel for ``3 * C_in``
channels costs more than the two passes. The sums are mathematically those of
:func:`~lightning_amct.quant.functional.ulq_fake_quant`'s backward, rounded differently; the weight
and bias gradients are those of the convolution.

The Function owns the convolution's backward, so under ``torch.compile`` too (the directions
then come from tensor operations) the compiled graph has no backward-data pass, and no copy of
``g`` into the memory layout of a weight the compiler laid out channels-last.

Example:
    >>> import torch
    >>> from lightning_amct.quant.functional import ulq_fake_quant
    >>> weight = torch.randn(4, 1, 3, requires_grad=True)
    >>> x = torch.rand(2, 1, 6)
    >>> clips = [torch.tensor([0.8], requires_grad=True), torch.tensor([-0.1], requires_grad=True)]
    >>> y = ulq_fake_quant(x, *clips, 8)
    >>> out = conv_with_clip_gradients(x, y.detach(), weight, None, *clips, 8, False, ((1,), (0,), (1,)))
    >>> out.sum().backward()
    >>> direct = torch.autograd.grad(torch.nn.functional.conv1d(y, weight).sum(), [*clips, weight])
    >>> all(torch.allclose(t.grad, expected, atol=1e-5) for t, expected in zip([*clips, weight], direct))
    True
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lightning_amct.quant.functional import cpu_kernels
from lightning_amct.quant.functional.arq import ArqSettings
from lightning_amct.quant.functional.node_weight import masked_gradient, node_weight
from lightning_amct.quant.functional.ulq import (
    Grid,
    as_clip_gradients,
    clip_meta,
    ulq_clip_directions,
    ulq_forward,
    ulq_grid,
)

#: ``(stride, padding, dilation)`` of a convolution, one entry per spatial axis each.
Geometry = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def conv_with_clip_gradients(
    x: Tensor,
    quantized: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    clip_max: Tensor,
    clip_min: Tensor,
    num_bits: int,
    force_fp16: bool,
    geometry: Geometry,
    grid: Grid | None = None,
    arq: ArqSettings | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """``conv(quantized, weight, bias)`` (one group, zero padding), with the weight, bias and clip gradients.

    ``quantized`` is ``ulq_fake_quant(x, clip_max, clip_min, num_bits, force_fp16)``, detached:
    neither it nor ``x`` gets a gradient. The clips must not change before backward.

    Args:
        x: the layer's input, before quantization.
        quantized: the quantized input, detached; None to quantize ``x`` here, on the host ``grid``.
        weight: the layer's (quantized) weight.
        bias: the layer's bias, or None.
        clip_max: upper clip of the quantizer, one element.
        clip_min: lower clip, one element.
        num_bits: bits of the grid.
        force_fp16: the quantizer rounds its scale to float16 precision.
        geometry: the convolution's stride, padding and dilation.
        grid: the clips' grid (:func:`~lightning_amct.quant.functional.ulq.ulq_grid`), or None to compute it here.
        arq: ``(num_bits, channel_axis)``: quantize ``weight`` here with ARQ, its gradient straight
            through (as :func:`~lightning_amct.quant.functional.ulq_layer.ulq_layer` does); None:
            ``weight`` is used as it is.
        mask: multiply ``weight`` by this 4:2 mask first
            (:mod:`~lightning_amct.quant.functional.node_weight`); None: no mask.
    """
    return _ConvWithClipGradients.apply(
        x, quantized, weight, bias, clip_max, clip_min, num_bits, force_fp16, geometry, grid, arq, mask
    )


class _ConvWithClipGradients(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        quantized: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        clip_max: Tensor,
        clip_min: Tensor,
        num_bits: int,
        force_fp16: bool,
        geometry: Geometry,
        grid: Grid | None,
        arq: ArqSettings | None,
        mask: Tensor | None,
    ) -> Tensor:
        weight = node_weight(weight, mask, arq)
        if grid is None:
            on_host = not torch.compiler.is_compiling() and cpu_kernels.applies(x, clip_max, clip_min)
            grid = ulq_grid(clip_max, clip_min, num_bits, force_fp16, on_host)
        if quantized is None:
            quantized, _ = ulq_forward(x, grid, num_bits, keep_codes=False)
        ctx.grid = grid
        ctx.num_bits = num_bits
        ctx.geometry = geometry
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.clip_meta = clip_meta(clip_max, clip_min)
        ctx.save_for_backward(x, quantized, weight, mask)
        spatial = [0] * (weight.dim() - 2)
        return torch.ops.aten.convolution(quantized, weight, bias, *geometry, False, spatial, 1)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, quantized, weight, mask = ctx.saved_tensors
        out_channels, channels = weight.shape[:2]
        # over one channel: [y, d_max, d_min] as the three input channels of one pass
        directions = ulq_clip_directions(x, ctx.grid, ctx.num_bits, quantized if channels == 1 else None)
        need_weight, need_bias = ctx.needs_input_grad[2:4]
        spatial = [0] * (weight.dim() - 2)

        def weight_gradient(inputs: Tensor, weights: Tensor, bias_sizes: list[int] | None, need_bias: bool) -> tuple:
            mask = [False, True, need_bias]
            _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad, inputs, weights, bias_sizes, *ctx.geometry, False, spatial, 1, mask
            )
            return grad_weight, grad_bias

        if channels == 1:  # the weight's values do not enter its gradient: a broadcast view has its shape
            wide = weight.expand(out_channels, 3, *weight.shape[2:])
            gradients, grad_bias = weight_gradient(directions.flatten(1, 2), wide, ctx.bias_sizes, need_bias)
            grad_weight, totals = _split(gradients, weight, ctx.grid)
        else:
            grad_weight, grad_bias = weight_gradient(quantized, weight, ctx.bias_sizes, need_bias)
            gradients, _ = weight_gradient(directions.flatten(1, 2), torch.cat((weight, weight), 1), None, False)
            _, totals = _split(gradients, weight, ctx.grid)
        return (
            None,
            None,
            masked_gradient(grad_weight, mask) if need_weight else None,
            grad_bias if need_bias else None,
            *as_clip_gradients(totals, ctx.clip_meta, ctx.needs_input_grad[4:6]),
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _split(gradients: Tensor, weight: Tensor, grid: Grid) -> tuple[Tensor | None, tuple]:
    """A weight gradient over ``[y, d_max, d_min]`` input channels (``[d_max, d_min]``), split.

    Returns the layer's own weight gradient (None without ``y``) and the clips' gradients
    ``<W, G(d_max, g)>`` and ``<W, G(d_min, g)>``: Python floats from one fused pass on a host
    grid, else 0-d tensors.
    """
    out_channels = weight.shape[0]
    slots = gradients.shape[1] // weight.shape[1]
    if isinstance(grid, tuple) and cpu_kernels.applies(gradients, weight):
        own = torch.empty_like(weight) if slots == 3 else None
        totals = cpu_kernels.split_weight_gradient_at(
            gradients.data_ptr(),
            weight.data_ptr(),
            0 if own is None else own.data_ptr(),
            out_channels,
            slots,
            weight.numel() // out_channels,
        )
        return own, totals
    flat = gradients.reshape(out_channels, slots, -1)
    own = flat[:, 0].reshape(weight.shape) if slots == 3 else None
    return own, (flat[:, -2:] * weight.reshape(out_channels, 1, -1)).sum((0, 2)).unbind()
