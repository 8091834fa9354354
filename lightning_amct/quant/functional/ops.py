"""The fake-quant ops as ``torch.library`` custom operators, for ``torch.compile``.

``torch.compile`` cannot trace into the fused CPU kernels (numba) nor into an autograd Function
that reads its clips as Python floats: each quantizer would break the graph in two. As custom
operators with fake (meta) kernels, the compiler sees each quantizer as one opaque node of known
output shape, and the whole model stays one graph:

* ``lightning_amct::ulq_fake_quant(x, clip_max, clip_min, num_bits, force_fp16) -> (y, grid)``,
  whose backward is ``lightning_amct::ulq_fake_quant_backward(grad, x, grid, num_bits) ->
  (grad_x, sums)`` and a few scalar operations for the clip gradients;
* ``lightning_amct::arq_fake_quant(w, num_bits, channel_axis) -> w_q``, straight through.

Each has a CPU kernel (the fused numba kernels where they apply, else tensor operations) and a
CUDA kernel (tensor operations, no host synchronisation); both are the eager code of
:mod:`.ulq` and :mod:`.arq`, so compiled and eager training compute the same values. Eager
calls do not go through these operators: :func:`~lightning_amct.quant.functional.ulq_fake_quant`
and :func:`~lightning_amct.quant.functional.arq_fake_quant` switch to them only while compiling,
since the operator dispatch costs more than the op itself on a small activation.

Example:
    >>> import torch
    >>> y, grid = torch.ops.lightning_amct.ulq_fake_quant(
    ...     torch.tensor([0.3, 2.0]), torch.tensor([1.0]), torch.tensor([0.0]), 8, False)
    >>> y
    tensor([0.2980, 1.0000])
"""

import torch
from torch import Tensor

from lightning_amct.quant.functional import arq, cpu_kernels, ulq

_DEVICES = ("cpu", "cuda")


@torch.library.custom_op(
    "lightning_amct::ulq_fake_quant",
    mutates_args=(),
    device_types=_DEVICES,
    schema="(Tensor x, Tensor clip_max, Tensor clip_min, int num_bits, bool force_fp16) -> (Tensor, Tensor)",
)
def ulq_fake_quant(x: Tensor, clip_max: Tensor, clip_min: Tensor, num_bits: int, force_fp16: bool):
    """``(y, grid)``: :func:`~.ulq.ulq_fake_quant`'s output and its grid as a ``(6,)`` float32 tensor."""
    grid = ulq.ulq_grid(clip_max, clip_min, num_bits, force_fp16, cpu_kernels.applies(x, clip_max, clip_min))
    y, _ = ulq.ulq_forward(x, grid, num_bits, keep_codes=False)
    return y, _grid_tensor(grid)


@ulq_fake_quant.register_fake
def _(x: Tensor, clip_max: Tensor, clip_min: Tensor, num_bits: int, force_fp16: bool):
    return torch.empty_like(x), clip_max.new_empty(6, dtype=torch.float32)


@torch.library.custom_op(
    "lightning_amct::ulq_fake_quant_backward",
    mutates_args=(),
    device_types=_DEVICES,
    schema="(Tensor grad, Tensor x, Tensor grid, int num_bits) -> (Tensor, Tensor)",
)
def ulq_fake_quant_backward(grad: Tensor, x: Tensor, grid: Tensor, num_bits: int):
    """``(grad_x, sums)``: ``dL/dx`` and ``[sum_U g, sum_L g, sum_inside g*r]`` as a float32 tensor."""
    if grid.device.type == "cpu" and cpu_kernels.applies(x):
        grad_x, sums = ulq.ulq_backward(x, grad, tuple(grid.tolist()), need_sums=True)
        return grad_x.to(grad.dtype), torch.tensor(sums, dtype=torch.float32)
    grad_x, sums = ulq.ulq_backward(x, grad, grid, need_sums=True)
    return grad_x.to(grad.dtype), torch.stack(sums).float()


@ulq_fake_quant_backward.register_fake
def _(grad: Tensor, x: Tensor, grid: Tensor, num_bits: int):
    return torch.empty_like(x, dtype=grad.dtype), grid.new_empty(3)


def _ulq_setup_context(ctx, inputs: tuple, output: tuple) -> None:
    x, clip_max, clip_min, num_bits, _ = inputs
    ctx.save_for_backward(x, output[1])
    ctx.num_bits = num_bits
    ctx.clip_meta = ((clip_max.shape, clip_max.dtype), (clip_min.shape, clip_min.dtype))


def _ulq_backward(ctx, grad: Tensor, grad_grid: Tensor):
    x, grid = ctx.saved_tensors
    grad_x, sums = torch.ops.lightning_amct.ulq_fake_quant_backward(grad, x, grid, ctx.num_bits)
    grad_max, grad_min = ulq.ulq_clip_gradients(sums.unbind(), grid, ctx.num_bits)
    (max_shape, max_dtype), (min_shape, min_dtype) = ctx.clip_meta
    return grad_x, grad_max.reshape(max_shape).to(max_dtype), grad_min.reshape(min_shape).to(min_dtype), None, None


ulq_fake_quant.register_autograd(_ulq_backward, setup_context=_ulq_setup_context)


@torch.library.custom_op(
    "lightning_amct::arq_fake_quant",
    mutates_args=(),
    device_types=_DEVICES,
    schema="(Tensor w, int num_bits, int? channel_axis) -> Tensor",
)
def arq_fake_quant(w: Tensor, num_bits: int, channel_axis: int | None) -> Tensor:
    """:func:`~.arq.arq_fake_quant`'s values (:func:`~.arq.arq_quantized`)."""
    return arq.arq_quantized(w, num_bits, channel_axis)


@arq_fake_quant.register_fake
def _(w: Tensor, num_bits: int, channel_axis: int | None) -> Tensor:
    return torch.empty_like(w)


def _arq_backward(ctx, grad: Tensor):
    return grad, None, None


arq_fake_quant.register_autograd(_arq_backward)


def _grid_tensor(grid: ulq.Grid) -> Tensor:
    """A host grid as a new ``(6,)`` float32 CPU tensor; a tensor grid as it is."""
    return torch.tensor(grid, dtype=torch.float32) if isinstance(grid, tuple) else grid
