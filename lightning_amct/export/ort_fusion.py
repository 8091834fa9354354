"""Which layers of a QDQ graph ONNX Runtime's CPU provider runs with integer kernels.

ONNX Runtime fuses a Conv into QLinearConv when its input and weight come out of
DequantizeLinear (an INT8 weight) and every reader of its output is a QuantizeLinear; a Gemm
becomes QGemm on the same inputs when its output goes only into QuantizeLinear or only into float
operations. Any other layer computes in float32 on its dequantized inputs, and a weight behind a
DequantizeLinear is then dequantized at every run instead of being prepacked once.
:func:`integer_kernel_layers` applies that rule to a graph, so the deploy model can store integer
weights exactly where they are used as integers.

Example:
    >>> from onnx import helper
    >>> nodes = [helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["x"]),
    ...          helper.make_node("DequantizeLinear", ["wq", "sw"], ["w"]),
    ...          helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["out"])]
    >>> graph = helper.make_graph(nodes, "g", [], [], [helper.make_tensor("wq", 3, [1, 1, 1, 1], [1])])
    >>> integer_kernel_layers(graph)  # the Conv's output goes into a float Relu
    set()
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import TensorProto

#: Layer types ONNX Runtime fuses with their DequantizeLinear/QuantizeLinear neighbours.
FUSABLE_TYPES = ("Conv", "Gemm")


def integer_kernel_layers(graph: onnx.GraphProto) -> set[str]:
    """Names of the Conv and Gemm nodes ONNX Runtime turns into QLinearConv / QGemm."""
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    graph_outputs = {out.name for out in graph.output}

    def dequantized(name: str) -> onnx.NodeProto | None:
        node = producers.get(name)
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    fused = set()
    for node in graph.node:
        if node.op_type not in FUSABLE_TYPES:
            continue
        x_dq, w_dq = dequantized(node.input[0]), dequantized(node.input[1])
        if x_dq is None or w_dq is None:
            continue
        weight = initializers.get(w_dq.input[0])
        if weight is None or weight.data_type != TensorProto.INT8:
            continue  # an INT4 or a computed weight: no integer kernel
        readers = consumers[node.output[0]]
        quantized = [reader.op_type == "QuantizeLinear" for reader in readers]
        if node.op_type == "Conv":
            ok = bool(readers) and all(quantized) and node.output[0] not in graph_outputs
        else:  # QGemm writes a quantized or a float output, not both
            ok = all(quantized) or not any(quantized)
        if ok:
            fused.add(node.name)
    return fused
