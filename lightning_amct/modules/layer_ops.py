"""A layer's operation in three parts: forward, backward-data and parameter gradients.

:mod:`~lightning_amct.quant.functional.ulq_layer` runs a compressed layer and its input quantizer
as one autograd node, so it computes the layer's backward itself, in two steps with the
quantizer's pass between them: ``dL/dx`` first (which the quantizer's backward needs), the weight
and bias gradients last (from the quantized input, which that pass writes again). Each part calls
the torch operations that autograd calls for the layer, with the same arguments, so the results
are those of autograd bit for bit:

* :class:`Convolution`: ``aten.convolution`` (as ``torch.convolution``) and ``aten.convolution_backward``
  (Conv1d/2d/3d with zero padding given as numbers);
* :class:`Affine`: a Linear layer (``F.linear``: ``addmm`` or ``matmul`` over the flattened input,
  whose backward multiplies ``g @ W`` and ``g^T @ x``), or GPT-2's ``Conv1D`` with its weight
  stored transposed (``addmm(b, x, W)``: ``g @ W^T`` and ``x^T @ g``); the bias gradient sums
  ``g`` over the flattened rows.

Example:
    >>> import torch
    >>> x, weight, bias = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4)
    >>> op, grad = Affine(transposed=False), torch.ones(2, 4)
    >>> torch.equal(op.forward(x, weight, bias), torch.nn.functional.linear(x, weight, bias))
    True
    >>> op.input_gradient(grad, x, weight).shape, op.parameter_gradients(grad, x, weight, (4,), (True, True))[1]
    (torch.Size([2, 3]), tensor([2., 2., 2., 2.]))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

#: Which parameter gradients a backward wants: ``(weight, bias)``.
Needed = tuple[bool, bool]


class LayerOp(Protocol):
    """The three parts of a layer's operation (see the module docstring)."""

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The layer's output."""

    def input_gradient(self, grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        """``dL/dx`` for the output gradient ``grad`` (``x`` gives the shape only)."""

    def parameter_gradients(
        self, grad: Tensor, x: Tensor, weight: Tensor, bias_shape: tuple[int, ...] | None, needed: Needed
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(dL/dW, dL/db)``, each None where not ``needed`` (the bias's also without a bias)."""


@dataclass(frozen=True)
class Convolution:
    """A convolution with zero padding of ``padding`` elements on each side of each spatial axis."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        geometry = (self.stride, self.padding, self.dilation)
        return torch.convolution(x, weight, bias, *geometry, False, self._no_padding, self.groups)

    def input_gradient(self, grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        return self._backward(grad, x, weight, None, (True, False, False))[0]

    def parameter_gradients(
        self, grad: Tensor, x: Tensor, weight: Tensor, bias_shape: tuple[int, ...] | None, needed: Needed
    ) -> tuple[Tensor | None, Tensor | None]:
        need_weight, need_bias = needed[0], needed[1] and bias_shape is not None
        if not (need_weight or need_bias):
            return None, None
        _, grad_weight, grad_bias = self._backward(grad, x, weight, bias_shape, (False, need_weight, need_bias))
        return grad_weight, grad_bias

    def _backward(
        self, grad: Tensor, x: Tensor, weight: Tensor, bias_shape: tuple[int, ...] | None, mask: tuple[bool, ...]
    ) -> tuple:
        bias_sizes = None if bias_shape is None else list(bias_shape)
        return torch.ops.aten.convolution_backward.default(
            grad, x, weight, bias_sizes, self.stride, self.padding, self.dilation, False, self._no_padding,
            self.groups, list(mask),
        )  # fmt: skip

    @functools.cached_property
    def _no_padding(self) -> list[int]:
        """The output padding: none (a list, as the operators take it)."""
        return [0] * len(self.stride)


@dataclass(frozen=True)
class Affine:
    """``x @ W^T + b`` over the last axis of ``x`` (a Linear layer), or ``x @ W + b`` when ``transposed``.

    ``x`` has two dimensions or more and is contiguous.
    """

    transposed: bool

    def forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if not self.transposed:
            return F.linear(x, weight, bias)
        rows = x.view(-1, x.size(-1))
        flat = rows.mm(weight) if bias is None else torch.addmm(bias, rows, weight)
        return flat.view(*x.shape[:-1], weight.shape[1])

    def input_gradient(self, grad: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        rows = _rows(grad)
        return rows.mm(weight.t() if self.transposed else weight).view(x.shape)

    def parameter_gradients(
        self, grad: Tensor, x: Tensor, weight: Tensor, bias_shape: tuple[int, ...] | None, needed: Needed
    ) -> tuple[Tensor | None, Tensor | None]:
        rows, inputs = _rows(grad), _rows(x)
        grad_weight = None
        if needed[0]:
            grad_weight = inputs.t().mm(rows) if self.transposed else rows.t().mm(inputs)
        grad_bias = rows.sum(0) if needed[1] and bias_shape is not None else None
        return grad_weight, grad_bias


def _rows(t: Tensor) -> Tensor:
    """``t`` as a matrix of its last axis: ``(-1, t.shape[-1])``."""
    return t.reshape(-1, t.shape[-1])
