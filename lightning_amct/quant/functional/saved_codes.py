"""Layers save the integer codes of their fake-quantized input for backward, not the float values.

A convolution or Linear layer keeps its input for the weight gradient. After fake quantization
that input is a new float tensor ``y`` next to the activation ``x`` it came from (which the
quantizer's own backward and the layer before keep anyway): one more activation-sized tensor per
layer, which made a QAT step's peak memory 1.3-1.6x float. Every value of ``y`` is
``(code - o) * s`` for an integer code, so one byte an element (two above 8 bits) holds it.

:func:`attach_codes` leaves the codes on ``y`` (the fake-quant op that makes ``y`` calls it);
inside :func:`saving_codes` autograd saves those codes wherever it would save ``y`` and rebuilds
``y`` bit for bit when the backward needs it: one pass over the codes instead of keeping four
bytes an element from forward to backward. A ``y`` modified in place after it was made, and any
other tensor, are saved as they are.

:func:`saving_codes` leaves things alone where they would interfere: without gradient recording,
under ``torch.compile`` (the compiler plans what to save) and inside other saved-tensor hooks
(activation checkpointing or offloading, ``torch.func`` transforms), which must see every tensor.

Example:
    >>> import torch
    >>> codes = torch.tensor([[1, -2], [3, 0]], dtype=torch.int8)
    >>> y = codes * 0.5
    >>> attach_codes(y, CodeStorage(codes, 0.5, lambda codes, scale, dtype: codes.to(dtype) * scale))
    >>> w = torch.ones(2, 1, requires_grad=True)
    >>> with saving_codes():
    ...     out = y @ w  # autograd keeps the int8 codes for w's gradient
    >>> out.sum().backward()
    >>> w.grad
    tensor([[ 2.],
            [-1.]])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_ATTRIBUTE = "_lightning_amct_codes"


class CodeStorage:
    """The codes of a fake-quantized tensor with what rebuilds it: ``dequantize(codes, grid, dtype)``.

    The first :meth:`restore` rebuilds the tensor and keeps it in place of the codes: the layers
    that saved it (several, when they share an input) get the same tensor, and the codes are gone
    by the time the backward needs the float values, where a step's memory peaks.

    Args:
        codes: the integer codes (any dtype that holds them exactly), in the tensor's shape.
        grid: the quantization grid, passed to ``dequantize`` as it is.
        dequantize: rebuilds the tensor, bit for bit, from the codes.

    :func:`attach_codes` records the tensor's dtype and version.
    """

    __slots__ = ("codes", "grid", "dequantize", "dtype", "version", "restored")

    def __init__(self, codes: Tensor, grid: Any, dequantize: Callable[[Tensor, Any, torch.dtype], Tensor]) -> None:
        self.codes = codes
        self.grid = grid
        self.dequantize = dequantize
        self.dtype = torch.float32
        self.version = -1
        self.restored: Tensor | None = None

    def restore(self) -> Tensor:
        if self.restored is None:
            self.restored = self.dequantize(self.codes, self.grid, self.dtype)
            self.codes = None
        return self.restored


@torch.compiler.disable
def attach_codes(y: Tensor, storage: CodeStorage) -> None:
    """Leave ``storage`` on ``y`` for :func:`saving_codes`, valid while ``y`` is not modified in place.

    Eager only, and run as such where eager code runs inside a compiled model's call (after a graph
    break, such as calibration's): the compiler, which would compile it as a frame of its own,
    cannot trace a write to a tensor's ``__dict__``.
    """
    storage.dtype = y.dtype
    storage.version = y._version
    y.__dict__[_ATTRIBUTE] = storage


def saving_codes() -> contextlib.AbstractContextManager:
    """A context in which autograd saves the codes of a fake-quantized tensor instead of the tensor.

    A no-op context without gradient recording, under ``torch.compile``, and inside other
    saved-tensor hooks (which must see every tensor; the codes are then kept only as far as those
    hooks keep ``y``).
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling() or _other_hooks_apply():
        return _NO_HOOKS
    return _HOOKS


def _other_hooks_apply() -> bool:
    """Whether saved-tensor hooks are already active, or disabled (``torch.func`` transforms)."""
    autograd = torch._C._autograd
    if not autograd._saved_tensors_hooks_is_enabled():
        return True
    return autograd._top_saved_tensors_default_hooks(False) is not None


def _pack(t: Tensor) -> Tensor | CodeStorage | tuple[CodeStorage, torch.Size]:
    storage = t.__dict__.get(_ATTRIBUTE)
    if storage is not None:
        return storage if t._version == storage.version else t
    base = t._base  # a layer may save a view of y (a Linear on 3-D input saves it flattened)
    if base is None:
        return t
    storage = base.__dict__.get(_ATTRIBUTE)
    if (
        storage is None
        or base._version != storage.version
        or t.data_ptr() != base.data_ptr()
        or t.numel() != base.numel()
        or not t.is_contiguous()
    ):
        return t
    return storage, t.shape


def _unpack(saved: Tensor | CodeStorage | tuple[CodeStorage, torch.Size]) -> Tensor:
    if isinstance(saved, Tensor):
        return saved
    if isinstance(saved, CodeStorage):
        return saved.restore()
    storage, shape = saved
    return storage.restore().view(shape)


_HOOKS = torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)  # stateless: one instance serves every use
_NO_HOOKS = contextlib.nullcontext()
