"""ULQ clip gradients of a layer's input without the gradient of the input itself.

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

where ``G(d, g)`` is the layer's weight gradient for input ``d`` and output gradient ``g``. The
caller supplies that last step (``correlate``): a convolution computes ``G`` for ``d_max`` and
``d_min`` at once, as the weight gradient of a convolution over ``2 * C_in`` input channels. The
sums are mathematically those of :func:`~lightning_amct.quant.functional.ulq_fake_quant`'s
backward, rounded differently. Under ``torch.compile`` the compiler traces the same Function
(the directions then come from tensor operations): the compiled graph skips the slow
backward-data pass too.

Example:
    >>> import torch
    >>> from lightning_amct.quant.functional import ulq_fake_quant
    >>> weight = torch.randn(4, 1, 3)
    >>> x = torch.rand(2, 1, 6)
    >>> clips = [torch.tensor([0.8], requires_grad=True), torch.tensor([-0.1], requires_grad=True)]
    >>> def correlate(directions, grad):  # <g, A_W d> for d_max and d_min, written out
    ...     responses = torch.nn.functional.conv1d(directions.flatten(0, 1), weight).unflatten(0, (2, 2))
    ...     return (responses * grad.unsqueeze(1)).sum((0, 2, 3))
    >>> out = torch.nn.functional.conv1d(ulq_fake_quant(x, *clips, 8).detach(), weight)
    >>> out = clip_gradients_by_adjoint(out, x, *clips, 8, False, correlate)
    >>> out.sum().backward()
    >>> direct = torch.autograd.grad(torch.nn.functional.conv1d(ulq_fake_quant(x, *clips, 8), weight).sum(), clips)
    >>> all(torch.allclose(clip.grad, expected, atol=1e-5) for clip, expected in zip(clips, direct))
    True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lightning_amct.quant.functional import cpu_kernels
from lightning_amct.quant.functional.ulq import ulq_clip_directions, ulq_grid


def clip_gradients_by_adjoint(
    out: Tensor,
    x: Tensor,
    clip_max: Tensor,
    clip_min: Tensor,
    num_bits: int,
    force_fp16: bool,
    correlate: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """``out`` unchanged, with the clip gradients of the ULQ of ``x`` computed by ``correlate``.

    ``out`` must have been computed from ``ulq_fake_quant(x, clip_max, clip_min, ...)`` by a map
    linear in it (plus a term without it, such as a bias), with the quantized input detached, so
    that autograd does not differentiate ``out`` with respect to it. The clips must not change
    before backward.

    Args:
        out: the layer's output.
        x: the layer's input, before quantization (no gradient of its own).
        clip_max: upper clip of the quantizer, one element.
        clip_min: lower clip, one element.
        num_bits: bits of the grid.
        force_fp16: the quantizer rounds its scale to float16 precision.
        correlate: ``(directions, g) -> [<g, A d_max>, <g, A d_min>]``, a float32 tensor of shape
            ``(2,)``, with ``directions`` of shape ``(batch, 2, *x.shape[1:])``
            (:func:`~lightning_amct.quant.functional.ulq.ulq_clip_directions`) and ``g = dL/dout``.
    """
    return _ClipGradientsByAdjoint.apply(out, clip_max, clip_min, x, num_bits, force_fp16, correlate)


class _ClipGradientsByAdjoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        out: Tensor,
        clip_max: Tensor,
        clip_min: Tensor,
        x: Tensor,
        num_bits: int,
        force_fp16: bool,
        correlate: Callable[[Tensor, Tensor], Tensor],
    ) -> Tensor:
        on_host = not torch.compiler.is_compiling() and cpu_kernels.applies(x, clip_max, clip_min)
        ctx.grid = ulq_grid(clip_max, clip_min, num_bits, force_fp16, on_host)
        ctx.num_bits = num_bits
        ctx.correlate = correlate
        ctx.clip_meta = ((clip_max.shape, clip_max.dtype), (clip_min.shape, clip_min.dtype))
        ctx.save_for_backward(x)
        return out.view_as(out)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        sums = ctx.correlate(ulq_clip_directions(x, ctx.grid, ctx.num_bits), grad)
        gradients = [
            total.reshape(shape).to(dtype) if needed else None
            for needed, total, (shape, dtype) in zip(ctx.needs_input_grad[1:3], sums.unbind(), ctx.clip_meta)
        ]
        return grad, *gradients, None, None, None, None
