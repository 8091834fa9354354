"""A model's inputs and outputs as flat tuples of named tensors, as an ONNX model has them.

An ONNX model takes and returns tensors. A model whose forward takes a dict of tensors (a batch
of ``{"image": ..., "features": ...}``) or returns one (``{"logits": ..., "boxes": ...}``, a
``transformers`` ``ModelOutput``, a tuple holding a list) is exported with its tensors in the
order ``torch.utils._pytree`` flattens them (a dict's in insertion order), each named by where it
sits: ``image``, ``features``; ``logits``, ``hidden_states.0``. A model of tensors in and a tensor
or a tuple of tensors out keeps the plain names: ``input`` (``input_0``, ``input_1``...),
``output`` (``output_0``...).

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Heads(nn.Module):
    ...     def forward(self, batch):
    ...         return {"logits": batch["image"].sum(1), "mean": batch["image"].mean()}
    >>> model, inputs = Heads(), ({"image": torch.ones(2, 3)},)
    >>> with flat_io(model, inputs) as (flat_inputs, names):
    ...     names["input_names"], names["output_names"], len(model(*flat_inputs))
    (['image'], ['logits', 'mean'], 2)
    >>> model(*inputs)["mean"]  # its own forward again
    tensor(1.)
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree


@contextlib.contextmanager
def flat_io(module: nn.Module, inputs: tuple) -> Iterator[tuple[tuple[Tensor, ...], dict[str, list[str]]]]:
    """Within the block, ``module`` takes and returns flat tuples of tensors, where it does not already.

    Yields ``(flat inputs, names)``: the tensors of ``inputs`` in order, and ``{"input_names":
    [...], "output_names": [...]}`` for them and the outputs. The module's forward is its own
    again after the block.

    An output that is not a tensor (a ``transformers`` cache object, a number), which an ONNX
    model cannot return, is left out, with a warning naming it.

    Raises:
        ValueError: an input that is not a tensor (a ``None``, a number), which an ONNX model
            cannot take: the message names where it sits.
    """
    in_leaves, in_spec = pytree.tree_flatten_with_path(inputs)
    with torch.no_grad():
        outputs = module(*inputs)
    out_leaves, _ = pytree.tree_flatten_with_path(outputs)
    kept = [isinstance(leaf, Tensor) for _, leaf in out_leaves]
    names = {
        "input_names": [_input_name(path, len(inputs)) for path, _ in in_leaves],
        "output_names": [_output_name(path, outputs) for (path, _), keep in zip(out_leaves, kept) if keep],
    }
    flat_inputs = tuple(_input_tensor(leaf, name) for (_, leaf), name in zip(in_leaves, names["input_names"]))
    left_out = [(path, leaf) for (path, leaf), keep in zip(out_leaves, kept) if not keep]
    if left_out:
        listed = ", ".join(f"'{_joined(path)}' ({type(leaf).__name__})" for path, leaf in left_out)
        warnings.warn(f"the ONNX model leaves out the outputs that are not tensors: {listed}", stacklevel=3)
    if all(isinstance(x, Tensor) for x in inputs) and _is_flat(outputs):
        yield flat_inputs, names
        return
    forward, own = module.forward, module.__dict__.get("forward")  # an instance's own forward, if any

    def flat_forward(*tensors: Tensor) -> tuple[Tensor, ...]:
        leaves = pytree.tree_leaves(forward(*pytree.tree_unflatten(list(tensors), in_spec)))
        return tuple(leaf for leaf in leaves if isinstance(leaf, Tensor))

    module.forward = flat_forward
    try:
        yield flat_inputs, names
    finally:
        if own is None:
            del module.forward  # the class's forward again
        else:
            module.forward = own


def _is_flat(outputs: object) -> bool:
    return isinstance(outputs, Tensor) or (
        isinstance(outputs, (tuple, list)) and all(isinstance(o, Tensor) for o in outputs)
    )


def _input_tensor(leaf: object, name: str) -> Tensor:
    if not isinstance(leaf, Tensor):
        raise ValueError(f"ONNX export takes tensors, but the model's input '{name}' is {type(leaf).__name__}")
    return leaf


def _input_name(path: tuple, count: int) -> str:
    """``input`` for a lone tensor, ``input_i`` for one of several, else its keys: ``image``,
    ``input_1.image`` (a dict as the second of several inputs)."""
    position, rest = path[0].idx, path[1:]
    if not rest:
        return "input" if count == 1 else f"input_{position}"
    inner = _joined(rest)
    return inner if count == 1 else f"input_{position}.{inner}"


def _output_name(path: tuple, outputs: object) -> str:
    """``output`` for a lone tensor, ``output_i`` in a tuple of tensors, else its keys: ``logits``."""
    if isinstance(outputs, Tensor):
        return "output"
    if _is_flat(outputs):
        return "output" if len(outputs) == 1 else f"output_{path[0].idx}"
    return _joined(path)


def _joined(path: Sequence) -> str:
    parts = []
    for key in path:
        if isinstance(key, pytree.MappingKey):
            parts.append(str(key.key))
        elif isinstance(key, pytree.SequenceKey):
            parts.append(str(key.idx))
        else:  # an attribute of a registered type
            parts.append(str(getattr(key, "name", key)))
    return ".".join(parts)
