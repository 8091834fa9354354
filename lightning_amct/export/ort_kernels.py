"""Which kernel ONNX Runtime runs each quantized layer of a deploy model with, and why not an integer one.

ONNX Runtime's CPU provider fuses a layer with the DequantizeLinear/QuantizeLinear nodes around it
into an integer kernel where it has one for the pattern: a Conv whose input and weight are
dequantized and whose output goes only into QuantizeLinear becomes QLinearConv; a Gemm becomes
QGemm, a MatMul MatMulIntegerToFloat or QLinearMatMul. Any other quantized layer computes in
float32 on dequantized values: its quantization costs accuracy and a dequantize of the weight at
every run, and saves only file size. Such a layer is better left float in deployment, unless file
size is what matters, and the report says so.

:func:`layer_kernels` asks ONNX Runtime itself rather than predicting its rules: it optimizes the
model at the level that does the QDQ fusions and keeps node names (``extended``; the layout
changes of the next level do not change which kernels are integer), then reads which operator took
the place of each layer's node, and for a layer left in float, why it did not fuse.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.export.deploy import deploy_model
    >>> from lightning_amct.export.fake_quant_layer import FakeQuantLayer
    >>> from lightning_amct.export.integer import ActivationGrid, IntegerLayer
    >>> from lightning_amct.export.onnx_export import export_onnx
    >>> data = IntegerLayer("fc", "Linear", 0, 1, 8, torch.ones(2, 4, dtype=torch.int8), torch.tensor([0.1, 0.2]),
    ...                     None, torch.zeros(2), ActivationGrid(8, 0.05, 0, 6.35, -6.4), None)
    >>> deploy = deploy_model(export_onnx(FakeQuantLayer(nn.Linear(4, 2), data), torch.zeros(1, 4)), {})
    >>> layer_kernels(deploy, {"layer.weight": "fc"})
    {'fc': LayerKernel(operator='QGemm', float_reason=None)}
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import TensorProto

from lightning_amct.export.deploy import integer_weight_name, producer_through

#: ONNX Runtime operators that compute a layer on integers.
INTEGER_KERNELS = frozenset(
    {"QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger"}
)
#: Nodes between a weight's DequantizeLinear and its layer that ONNX Runtime folds into the weight.
_WEIGHT_PASSTHROUGH = ("Transpose", "Identity", "Reshape")


@dataclass(frozen=True)
class LayerKernel:
    """How ONNX Runtime runs one quantized layer.

    Attributes:
        operator: the operator that computes the layer (``"QLinearConv"``, ``"FusedConv"``...).
        float_reason: why it computes in float, or None for an integer kernel.
    """

    operator: str
    float_reason: str | None

    @property
    def integer(self) -> bool:
        return self.float_reason is None


def layer_kernels(model: onnx.ModelProto, weights: Mapping[str, str]) -> dict[str, LayerKernel]:
    """How ONNX Runtime's CPU provider runs each layer, for every layer found.

    Args:
        model: a deploy model (:func:`~lightning_amct.export.deploy_model`).
        weights: float weight initializer name in the fake-quant model -> layer name.

    Returns:
        Layer name -> its kernel, for the layers whose integer weight feeds a node of the model,
        in the order of ``weights``.
    """
    nodes = layer_nodes(model.graph, weights)
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = {node.name: node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}
    kernels = {}
    for layer in weights.values():
        if layer in nodes:
            operator = optimized.get(nodes[layer].name, nodes[layer].op_type)
            reason = None if operator in INTEGER_KERNELS else _float_reason(model.graph, nodes[layer])
            kernels[layer] = LayerKernel(operator, reason)
    return kernels


def layer_nodes(graph: onnx.GraphProto, weights: Mapping[str, str]) -> dict[str, onnx.NodeProto]:
    """Layer -> the node of ``graph`` that computes with the layer's integer weight."""
    by_integers = {integer_weight_name(weight): layer for weight, layer in weights.items()}
    readers = _readers(graph)
    nodes = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in by_integers:
            continue
        reader = node
        while len(readers[reader.output[0]]) == 1:
            reader = readers[reader.output[0]][0]
            if reader.op_type not in _WEIGHT_PASSTHROUGH:
                nodes[by_integers[node.input[0]]] = reader
                break
    return nodes


def _float_reason(graph: onnx.GraphProto, node: onnx.NodeProto) -> str:
    """Why ONNX Runtime computes ``node`` (a layer of a deploy model) in float, in a few words."""
    producers = {out: n for n in graph.node for out in n.output}
    initializers = {init.name: init for init in graph.initializer}
    weight = producer_through(producers, node.input[1], _WEIGHT_PASSTHROUGH)
    integers = initializers.get(weight.input[0]) if weight is not None else None
    if integers is not None and integers.data_type == TensorProto.INT4:
        return "INT4 weight: ONNX Runtime has no INT4 kernel for it"
    source = producer_through(producers, node.input[0], ("Reshape",))  # GPT-2's Conv1D flattens its input
    if source is None or source.op_type != "DequantizeLinear":
        return "its input is not quantized"
    readers = _readers(graph)[node.output[0]]
    unquantized = sorted({reader.op_type for reader in readers if reader.op_type != "QuantizeLinear"})
    graph_outputs = {out.name for out in graph.output}
    if node.op_type == "Conv" and (unquantized or node.output[0] in graph_outputs):
        into = ", ".join(unquantized) if unquantized else "the model's output"
        return f"its output goes on unquantized (into {into})"
    return f"ONNX Runtime has no integer kernel for this {node.op_type}"


def _readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    return readers
