"""The fake-quant ops as ``torch.library`` custom operators, the form ``torch.compile`` sees them in.

Under ``torch.compile`` each quantizer is one node of the captured graph, for example
``torch.ops.lightning_amct.ulq_fake_quant``, with a fake kernel that gives its output's shape
and dtype, and its backward registered with it (``register_autograd``). The operator's own
function is also its ``CompositeImplicitAutograd`` kernel: when AOTAutograd lowers the captured
graph for a backend (inductor, ``aot_eager``), it replaces the node by the function's tensor
operations, forward and backward, and inductor fuses them with the BatchNorm and ReLU around
them. An opaque kernel would stay a call that nothing fuses with, which made the compiled INT8
step 1.3x compiled float instead of about 1.05x.

Eager training does not go through these operators: a custom operator's dispatch costs about
10 microseconds a call more than an autograd Function, so the eager activation and ARQ
quantizers call their fused kernels directly, and the others run the operator's functions as an
autograd Function (:class:`FakeQuantOperator`). Called eagerly, an operator runs its function,
the reference formulas.

Example:
    >>> import torch
    >>> from lightning_amct.quant.functional import ulq_fake_quant  # registers the operators
    >>> x = torch.tensor([-1.0, 0.3, 2.0])
    >>> torch.ops.lightning_amct.ulq_fake_quant(x, torch.tensor([1.0]), torch.tensor([-1.0]), 4, False)
    tensor([-0.9333,  0.2667,  1.0667])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.autograd.function import FunctionCtx, once_differentiable

#: The operators' namespace: ``torch.ops.lightning_amct``.
NAMESPACE = "lightning_amct"

_DECOMPOSITIONS = torch.library.Library(NAMESPACE, "FRAGMENT")


class FakeQuantOperator:
    """A fake-quant op as the custom operator ``lightning_amct::<name>`` under ``torch.compile``,
    and as an autograd Function of the same functions in eager mode (without the operator's dispatch).

    A fake-quant op's output has the shape and dtype of its first input, which is all that its fake
    kernel says.

    Args:
        name: the operator's name in :data:`NAMESPACE`.
        function: its kernel and its decomposition: tensor operations without side effects; the
            schema comes from its type annotations.
        backward: ``backward(ctx, grad)``, one gradient (or None) per input.
        setup_context: ``setup_context(ctx, inputs, output)``, what ``backward`` keeps.
    """

    def __init__(self, name: str, function: Callable, backward: Callable, setup_context: Callable) -> None:
        self.operator = torch.library.custom_op(f"{NAMESPACE}::{name}", function, mutates_args=())
        self.operator.register_fake(_like_first_input)
        self.operator.register_autograd(backward, setup_context=setup_context)
        _DECOMPOSITIONS.impl(name, function, "CompositeImplicitAutograd")

        def forward(ctx: FunctionCtx, *inputs: object) -> torch.Tensor:
            # the forward that keeps what it needs itself: a Function with a separate
            # setup_context costs about 9 microseconds a call more
            output = function(*inputs)
            setup_context(ctx, inputs, output)
            return output

        self.function = type(
            name,
            (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(once_differentiable(backward))},
        )

    def __call__(self, *inputs: object) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.operator(*inputs)
        return self.function.apply(*inputs)


def _like_first_input(x: torch.Tensor, *_: object) -> torch.Tensor:
    """The fake kernel: an output with ``x``'s shape, dtype and layout, no data read."""
    return torch.empty_like(x)
