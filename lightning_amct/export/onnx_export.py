"""The fake-quant ONNX model: a frozen model exported with QuantizeLinear/DequantizeLinear pairs.

The frozen model's layers compute with ``torch.fake_quantize_per_tensor_affine`` and
``..._per_channel_affine``, which the TorchScript-based exporter (``dynamo=False``) writes as
QuantizeLinear/DequantizeLinear pairs on each quantized layer's input and weight (float weights
stored). Opset 13 is the least that carries per-channel weight scales; INT4 weight initializers
in the deploy model need opset 21. The batch axis of every input and output is dynamic.

The model is serialised in memory, so it must stay below protobuf's 2 GiB.

Example:
    >>> import torch
    >>> from torch import nn
    >>> proto = export_onnx(nn.Sequential(nn.Linear(4, 2)), torch.zeros(1, 4), opset_version=17)
    >>> [n.op_type for n in proto.graph.node], proto.graph.input[0].name
    (['Gemm'], 'input')
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
from onnx import version_converter
from torch import nn

from lightning_amct.graph import as_input_tuple

#: Opset of the exported models unless asked otherwise: per-channel Q/DQ (13) and current ops.
DEFAULT_OPSET = 17
#: First opset with INT4 tensors (QuantizeLinear/DequantizeLinear on INT4).
INT4_OPSET = 21
#: Newest opset the TorchScript-based exporter writes; newer ones are reached with onnx's converter.
_EXPORTER_MAX_OPSET = 20


def export_onnx(module: nn.Module, example_inputs: object, opset_version: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``module`` (eval mode, CPU) to an ONNX model with a dynamic batch axis.

    Args:
        module: the model to export (a frozen model for the fake-quant ONNX).
        example_inputs: a tensor or tuple of tensors for tracing.
        opset_version: ONNX opset, at least 13 (above 20, the model is exported at 20 and
            converted by ``onnx.version_converter``).

    Returns:
        The ONNX model; inputs are named ``input`` (``input_0``, ``input_1``... when several),
        outputs ``output`` (or ``output_0``...).

    Raises:
        ValueError: ``opset_version`` below 13, or outputs other than tensors.
    """
    if opset_version < 13:
        raise ValueError(f"opset_version must be >= 13 for per-channel QuantizeLinear, got {opset_version}")
    inputs = as_input_tuple(example_inputs)
    with torch.no_grad():
        outputs = module(*inputs)
    input_names = _names("input", len(inputs))
    output_names = _names("output", _count_outputs(outputs))
    dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript-based exporter announces its deprecation; it is the one that maps
        # fake_quantize_* onto QuantizeLinear/DequantizeLinear in every supported torch version.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            module,
            inputs,
            buffer,
            dynamo=False,
            opset_version=min(opset_version, _EXPORTER_MAX_OPSET),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
    model = onnx.load_model_from_string(buffer.getvalue())
    return convert_opset(model, opset_version)


def convert_opset(model: onnx.ModelProto, opset_version: int) -> onnx.ModelProto:
    """``model`` at ``opset_version`` (unchanged if it is there already)."""
    if opset_of(model) == opset_version:
        return model
    return version_converter.convert_version(model, opset_version)


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset of ``model``."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _names(stem: str, count: int) -> list[str]:
    return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]


def _count_outputs(outputs: object) -> int:
    if isinstance(outputs, torch.Tensor):
        return 1
    if isinstance(outputs, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in outputs):
        return len(outputs)
    raise ValueError(f"ONNX export supports a tensor or a tuple of tensors as output, got {type(outputs).__name__}")
