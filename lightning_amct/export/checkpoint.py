"""The compressed checkpoint's layout: plain dicts of tensors, readable with ``weights_only=True``.

One file holds everything a loader needs and nothing executable::

    {
      "format": "lightning-amct-compressed", "version": 1,
      "model_class": "lightning_amct.demo.module.DemoClassifier",
      "example_inputs": [{"shape": [1, 1, 8, 8], "dtype": "float32"}],
      "compression": {...},            # CompressionState.to_record(): plan, kept channels, config text
      "layers": {name: layer entry},   # the compressed layers, below
      "folded_batchnorms": [names],    # BatchNorms folded into the layer before them
      "outputs": {module: grid},       # output quantizers' grids, by the module they follow
      "float_state": {key: tensor},    # every other tensor of the model, float
      "sha256": "...",                 # of everything above (content_digest)
    }

``torch.load`` checks a file's structure, not its data: a flipped bit in a weight loads as a
different weight. :func:`content_digest` lets the loader tell a damaged file from a good one
(checkpoints written before it was added have no digest and load unchecked).

A layer entry (:func:`encode_layer`) stores the weight as integers (``"int8"``, or ``"int4"``:
two per byte, see :mod:`~lightning_amct.export.packing`) with float32 scales, or as float32 for a
layer that is only 4:2-pruned; in ``"dense"`` layout (flat, row-major) or ``"4:2"`` layout (kept
values plus 2-bit positions, see :mod:`~lightning_amct.export.sparse`); plus the activation grid,
the bias (float32, BatchNorm folded in) and the name of the folded BatchNorm.

Example:
    >>> import torch
    >>> from lightning_amct.export.integer import IntegerLayer
    >>> data = IntegerLayer("fc", "Linear", 0, 1, 4, torch.tensor([[-8, 7, 0, 1]], dtype=torch.int8),
    ...                     torch.tensor([0.5]), None, None, None, None)
    >>> entry = encode_layer(data)
    >>> entry["weight"]["encoding"], entry["weight"]["values"].dtype
    ('int4', torch.uint8)
    >>> torch.equal(decode_layer("fc", entry).weight_int, data.weight_int)
    True
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict
from typing import Any

import torch

from lightning_amct.export.integer import ActivationGrid, IntegerLayer
from lightning_amct.export.packing import pack_2bit, pack_int4, unpack_2bit, unpack_int4
from lightning_amct.export.sparse import KEPT, RUN, compress_4_2, decompress_4_2

FORMAT = "lightning-amct-compressed"
VERSION = 1
#: The checkpoint's key for the :func:`content_digest` of everything else in it.
DIGEST = "sha256"


def encode_layer(data: IntegerLayer) -> dict[str, Any]:
    """A layer's integer form as plain data (tensors, str, int, float, lists, dicts)."""
    values = data.weight_int if data.weight_int is not None else data.weight_float
    weight: dict[str, Any] = {"shape": list(data.weight_shape), "layout": "dense", "positions": None}
    if data.mask is not None:
        kept, positions = compress_4_2(values, data.mask, data.in_axis)
        weight.update(layout="4:2", positions=pack_2bit(positions))
        values = kept
    if data.weight_int is None:
        weight.update(encoding="float32", values=values.reshape(-1).float().clone())
    elif data.weight_bits <= 4:
        weight.update(encoding="int4", values=pack_int4(values))
    else:
        weight.update(encoding="int8", values=values.reshape(-1).to(torch.int8).clone())
    weight["scale"] = None if data.weight_scale is None else data.weight_scale.float().clone()
    return {
        "type": data.layer_type,
        "out_axis": data.out_axis,
        "in_axis": data.in_axis,
        "weight_bits": data.weight_bits,
        "weight": weight,
        "bias": None if data.bias is None else data.bias.float().clone(),
        "activation": None if data.activation is None else asdict(data.activation),
        "folded_batchnorm": data.folded_batchnorm,
        "notes": list(data.notes),
    }


def decode_layer(name: str, entry: dict[str, Any]) -> IntegerLayer:
    """Inverse of :func:`encode_layer`."""
    weight = entry["weight"]
    shape = tuple(weight["shape"])
    in_axis = entry["in_axis"]
    count = math.prod(shape)
    if weight["layout"] == "4:2":
        channels = shape[in_axis]
        count = count // channels * -(-channels // RUN) * KEPT
    if weight["encoding"] == "int4":
        values = unpack_int4(weight["values"], count)
    else:
        values = weight["values"]
    mask = None
    if weight["layout"] == "4:2":
        positions = unpack_2bit(weight["positions"], count)
        mask = decompress_4_2(torch.ones(count, dtype=torch.bool), positions, shape, in_axis)
        dense = decompress_4_2(values, positions, shape, in_axis)
    else:
        dense = values.reshape(shape)
    quantized = weight["encoding"] != "float32"
    activation = entry["activation"]
    return IntegerLayer(
        name=name,
        layer_type=entry["type"],
        out_axis=entry["out_axis"],
        in_axis=in_axis,
        weight_bits=entry["weight_bits"],
        weight_int=dense.to(torch.int8) if quantized else None,
        weight_scale=weight["scale"],
        weight_float=None if quantized else dense.float(),
        bias=entry["bias"],
        activation=None if activation is None else ActivationGrid(**activation),
        mask=mask,
        folded_batchnorm=entry["folded_batchnorm"],
        notes=tuple(entry["notes"]),
    )


def content_digest(checkpoint: dict[str, Any]) -> str:
    """The SHA-256 (hex) of a checkpoint's contents, all but its own :data:`DIGEST` entry: every
    key, value, tensor dtype, shape and data byte, in order.

    Example:
        >>> a = {"format": FORMAT, "w": torch.tensor([1.0, 2.0])}
        >>> b = {"format": FORMAT, "w": torch.tensor([1.0, 2.5])}
        >>> content_digest(a) == content_digest({**a, DIGEST: "any"}), content_digest(a) == content_digest(b)
        (True, False)
    """
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in checkpoint.items() if key != DIGEST})
    return digest.hexdigest()


def _feed(digest: Any, value: object) -> None:
    """Add ``value`` (plain data and tensors, nested) to ``digest``, each part with its type and size."""
    if isinstance(value, torch.Tensor):
        digest.update(f"tensor {value.dtype} {list(value.shape)};".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _feed(digest, item)
    else:  # str, int, float (its repr is exact), bool, None
        digest.update(f"{type(value).__name__} {value!r};".encode())


def input_specs(inputs: tuple) -> list[dict[str, Any]]:
    """Shapes and dtypes of example inputs, to rebuild stand-ins with :func:`inputs_from_specs`:
    ``{"shape", "dtype"}`` for a tensor, ``{"dict": {key: spec}}``, ``{"list": [spec]}`` or
    ``{"tuple": [spec]}`` for an input of tensors in such a container."""
    return [_spec(x) for x in inputs]


def inputs_from_specs(specs: list[dict[str, Any]]) -> tuple:
    """Zero tensors of the recorded shapes and dtypes (what tracing and shape checks need), in the
    recorded containers."""
    return tuple(_stand_in(spec) for spec in specs)


def _spec(x: object) -> dict[str, Any]:
    if isinstance(x, dict):
        return {"dict": {key: _spec(value) for key, value in x.items()}}
    if isinstance(x, (list, tuple)):
        return {"list" if isinstance(x, list) else "tuple": [_spec(value) for value in x]}
    return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch.")}


def _stand_in(spec: dict[str, Any]) -> object:
    if "dict" in spec:
        return {key: _stand_in(value) for key, value in spec["dict"].items()}
    if "list" in spec or "tuple" in spec:
        values = [_stand_in(value) for value in spec.get("list", spec.get("tuple"))]
        return values if "list" in spec else tuple(values)
    return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]))
