"""A layer over its ULQ-quantized input as one autograd node, for training on the CPU.

A compressed layer computes ``op(Qa(x), W, b)``. As two autograd nodes, the quantizer's and the
layer's, the layer keeps ``y = Qa(x)`` for its weight gradient (as integer codes,
:mod:`~lightning_amct.quant.functional.saved_codes`, to save memory), and a training step pays
for both nodes, the codes in the forward pass and rebuilding ``y`` from them in the backward. One
node does less:

* forward: ``y`` from one fused pass (no codes), then the layer; it keeps ``x``, which the
  quantizer's backward needs anyway (and a ReLU before the layer keeps already), and ``W``;
* backward: ``dL/dy`` from the layer's backward-data pass, then one fused pass over ``x`` and
  ``dL/dy`` writes ``dL/dx`` over ``dL/dy``, the clip-gradient sums and ``y`` again
  (:func:`~lightning_amct.quant.functional.ulq.ulq_backward_rebuilding`); the weight and bias
  gradients come last, from that ``y``.

The kernels and the torch operations (:mod:`~lightning_amct.modules.layer_ops`) are those of the
two nodes, so every output and gradient is theirs bit for bit, the clip gradients included. The
grid must be a host grid (:func:`~lightning_amct.quant.functional.ulq.ulq_grid` with
``on_host``), and ``x`` float32 CPU data in contiguous or channels-last order, the fused kernels'
domain (:func:`~lightning_amct.quant.functional.cpu_kernels.applies_elementwise`).

With a :class:`BatchNormInput`, the node takes the input of a training-mode BatchNorm and the
ReLU after it and applies both too (:mod:`~lightning_amct.quant.functional.norm_passes`): it
keeps that input instead of the BatchNorm's output, and its backward gives the BatchNorm's input
and parameter gradients. The BatchNorm's values are torch's within float32 rounding, not bit for bit.
With a :class:`~lightning_amct.quant.functional.pool_passes.MaxPoolInput`, the node takes the input
of a 2-D max-pool and pools it first (:mod:`~lightning_amct.quant.functional.pool_passes`): it
quantizes the maxima as its ``x``, keeps them and their places instead of the pool's input, and its
backward adds ``dL/dx`` of the maxima at their places. Every output and gradient is that of
torch's pool followed by the two nodes, bit for bit.

Example:
    >>> import torch
    >>> from lightning_amct.modules.layer_ops import Affine
    >>> from lightning_amct.quant.functional.ulq import ulq_grid
    >>> x = torch.tensor([[0.2, -1.5, 3.0]], requires_grad=True)
    >>> weight = torch.ones(2, 3, requires_grad=True)
    >>> clips = torch.tensor([2.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    >>> grid = ulq_grid(*clips, 8, False, on_host=True)
    >>> out = ulq_layer(Affine(transposed=False), x, weight, None, *clips, grid, 8)
    >>> out.sum().backward()
    >>> x.grad
    tensor([[2., 0., 0.]])
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from lightning_amct.modules.layer_ops import LayerOp
from lightning_amct.quant.functional import cpu_kernels, norm_passes, pool_passes
from lightning_amct.quant.functional.arq import ArqSettings
from lightning_amct.quant.functional.node_weight import masked_gradient, node_weight
from lightning_amct.quant.functional.pool_passes import MaxPoolInput
from lightning_amct.quant.functional.precision import int_range
from lightning_amct.quant.functional.ulq import (
    as_clip_gradients,
    clip_meta,
    ulq_backward_rebuilding,
    ulq_clip_gradients,
    ulq_forward,
)


@dataclass(frozen=True)
class BatchNormInput:
    """A training-mode BatchNorm (then a ReLU) before the layer, applied in the layer's node.

    The node's ``x`` is then the BatchNorm's input (``z`` of
    :mod:`~lightning_amct.quant.functional.norm_passes`, in the layer's input shape: a view of
    ``(N, C, ...)`` contiguous float32 values) and it quantizes ``relu(batch_norm(z))``.

    Attributes:
        weight, bias: the BatchNorm's affine parameters (None without them).
        running_mean, running_var: its running statistics, updated in the forward (None: not tracked).
        batches: its ``num_batches_tracked``, counted up with that update (None: none kept).
        factor: the running statistics' update factor (``momentum``, or the cumulative average's).
        eps: added to the variance.
        shape: ``z``'s shape, ``(N, C, ...)``.
    """

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    batches: Tensor | None
    factor: float
    eps: float
    shape: torch.Size

    def apply(self, x: Tensor) -> Tensor:
        """The BatchNorm as torch computes it, on ``x`` (a view of its input), for a layer that
        does not quantize in its node after all."""
        self.count_batch()
        stats = (self.running_mean, self.running_var, self.weight, self.bias, True, self.factor, self.eps)
        return torch.nn.functional.batch_norm(x.view(self.shape), *stats).view(x.shape)

    def count_batch(self) -> None:
        """``num_batches_tracked += 1``, where the running statistics are updated (a buffer: as
        ``nn.BatchNorm`` counts, without a ``no_grad`` block)."""
        if self.batches is not None and self.running_mean is not None:
            self.batches.add_(1)

    def replayed(self) -> BatchNormInput:
        """The same BatchNorm for a second run of its batch: no running statistics to update."""
        return replace(self, running_mean=None, running_var=None, batches=None)


def ulq_layer(
    op: LayerOp,
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    clip_max: Tensor,
    clip_min: Tensor,
    grid: tuple[float, ...],
    num_bits: int,
    relu: bool = False,
    arq: ArqSettings | None = None,
    mask: Tensor | None = None,
    norm: BatchNormInput | None = None,
    pool: MaxPoolInput | None = None,
) -> Tensor:
    """``op.forward(ulq_fake_quant(x, clip_max, clip_min, num_bits), weight, bias)`` as one autograd node.

    With ``arq``, ``(num_bits, channel_axis)`` of an ARQ weight quantizer, and with ``mask``, a 4:2
    mask, the node applies them to the weight too, ``Qw(weight ⊙ mask)``, and gives the gradient
    that their own nodes would give (:mod:`~lightning_amct.quant.functional.node_weight`).

    With ``relu``, of ``relu(x)`` instead: the ReLU before the layer is applied here, at no cost
    (:mod:`~lightning_amct.modules.input_relu`). The forward pass needs no change for it where
    the grid's lower bound is 0 (``fixed_min``), which maps every ``x <= 0`` to 0 as ReLU does;
    the backward pass computes ReLU's gradient on the way.

    Args:
        op: the layer's operation.
        x: the layer's input, float32 on the CPU, contiguous or channels-last.
        weight: the layer's (compressed) weight.
        bias: the layer's bias, or None.
        clip_max: upper clip of the quantizer, one element.
        clip_min: lower clip, one element.
        grid: the host grid of the clips (the clips must not change before backward).
        num_bits: bits of the grid.
        relu: quantize ``relu(x)``.
        arq: quantize the weight with ARQ here: ``(num_bits, channel_axis)``; None: ``weight`` is used as it is.
        mask: multiply the weight by this mask (of its shape) first; None: no mask.
        norm: quantize ``relu(batch_norm(x))`` (``relu`` must be set): the BatchNorm before the
            ReLU, in training mode, applied here too (:mod:`~lightning_amct.quant.functional.norm_passes`).
        pool: quantize ``max_pool2d(x)`` (``max_pool2d(relu(x))`` with ``relu``): the max-pool
            before the layer applied here too (:mod:`~lightning_amct.quant.functional.pool_passes`);
            ``x`` contiguous, no ``norm``.

    Raises:
        ValueError: ``relu`` on a grid whose lower bound is not 0; ``norm`` without ``relu``; ``norm``
            and ``pool``.
    """
    if relu and grid[2] != 0.0 and grid[2] == grid[2]:
        raise ValueError(f"a ReLU applied in the layer needs a grid from 0 (fixed_min), got the lower bound {grid[2]}")
    if norm is not None and not relu:
        raise ValueError("a BatchNorm applied in the layer needs the ReLU after it applied there too")
    if norm is not None and pool is not None:
        raise ValueError("a layer applies a BatchNorm or a max-pool before it, not both")
    norm_parameters = (None, None) if norm is None else (norm.weight, norm.bias)
    # the settings as one argument: autograd.Function.apply looks at every argument it is given
    settings = (op, grid, num_bits, relu, arq, mask, norm, pool)
    out = _UlqLayer.apply(x, weight, bias, clip_max, clip_min, *norm_parameters, settings)
    shape = x.shape if pool is None else pool.output_shape(x)
    return out if out.dim() == len(shape) else out.view(*shape[:-1], out.shape[-1])


class _UlqLayer(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        clip_max: Tensor,
        clip_min: Tensor,
        norm_weight: Tensor | None,
        norm_bias: Tensor | None,
        settings: tuple,
    ) -> Tensor:
        op, grid, num_bits, relu, arq, mask, norm, pool = settings
        weight = node_weight(weight, mask, arq)
        ctx.op, ctx.grid, ctx.num_bits, ctx.relu, ctx.pool = op, grid, num_bits, relu, pool
        ctx.bias_shape = None if bias is None else tuple(bias.shape)
        ctx.clip_meta = clip_meta(clip_max, clip_min)
        ctx.norm_table, places = None, None
        if pool is not None:  # the node quantizes the maxima and keeps them instead of x
            ctx.pool_input_shape = x.shape
            x, places = pool_passes.maxima(x, pool)
        if norm is None:
            y, _ = ulq_forward(x, grid, num_bits, keep_codes=False)
        else:
            z = x.view(norm.shape)
            stats = (norm.running_mean, norm.running_var, norm.factor, norm.eps)
            ctx.norm_table = norm_passes.statistics(z, norm_weight, norm_bias, *stats)
            norm.count_batch()
            y = norm_passes.forward(z, ctx.norm_table, grid, int_range(num_bits)).view(x.shape)
            ctx.norm_shape = norm.shape
            ctx.norm_parameter_shapes = [None if t is None else t.shape for t in (norm_weight, norm_bias)]
        ctx.save_for_backward(x, weight, mask, places)
        out = op.forward(y, weight, bias)
        # F.linear views its flat product for an input of three dimensions or more, and a view
        # that an autograd Function returns cannot be modified in place (wav2vec2 writes over
        # masked time steps of a Linear's output): the node returns the product, ulq_layer views it
        return out if out._base is None else out._base

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mask, places = ctx.saved_tensors
        need_x, need_weight, need_bias, need_max, need_min, need_gamma, need_beta = ctx.needs_input_grad[:7]
        op, grid = ctx.op, ctx.grid
        grad_x, sums, norm_gradients = None, None, [None, None]
        if need_x or need_max or need_min or ctx.norm_table is not None:
            # a new buffer in x's layout: dL/dx goes over it
            grad_y = cpu_kernels.in_layout_of(op.input_gradient(grad, x, weight), x)
            if ctx.norm_table is None:
                grad_x, y, sums = ulq_backward_rebuilding(x, grad_y, grid, ctx.num_bits, ctx.relu)
            else:  # BatchNorm's parameter gradients need dL/du: the passes run whatever else is needed
                grad_x, y, sums, norm_gradients = _norm_backward(ctx, x, grad_y, need_x, (need_gamma, need_beta))
        else:
            y, _ = ulq_forward(x, grid, ctx.num_bits, keep_codes=False)
        clip_gradients = [None, None]
        if sums is not None:
            totals = ulq_clip_gradients(sums, grid, ctx.num_bits)
            clip_gradients = as_clip_gradients(totals, ctx.clip_meta, (need_max, need_min))
        grad_weight, grad_bias = op.parameter_gradients(grad, y, weight, ctx.bias_shape, (need_weight, need_bias))
        grad_weight = masked_gradient(grad_weight, mask)
        if not need_x:
            grad_x = None
        elif ctx.pool is not None:
            grad_x = pool_passes.scatter(grad_x, places, ctx.pool, ctx.pool_input_shape)
        return grad_x, grad_weight, grad_bias, *clip_gradients, *norm_gradients, None


def _norm_backward(ctx: FunctionCtx, x: Tensor, grad_y: Tensor, need_x: bool, needed: tuple[bool, bool]) -> tuple:
    """The fused passes' backward (:func:`~lightning_amct.quant.functional.norm_passes.backward`) in
    ``x``'s shape: ``(dL/dx, y, clip sums, [dL/dgamma, dL/dbeta])``, a gradient None where not ``needed``."""
    z = x.view(ctx.norm_shape)
    passes = (ctx.norm_table, ctx.grid, int_range(ctx.num_bits), need_x)
    grad_z, y, sums, parameters = norm_passes.backward(z, grad_y.view(z.shape), *passes)
    gradients = [
        gradient.view(shape) if need and shape is not None else None
        for gradient, shape, need in zip(parameters.unbind(0), ctx.norm_parameter_shapes, needed)
    ]
    return grad_z.view(x.shape), y.view(x.shape), sums, gradients
