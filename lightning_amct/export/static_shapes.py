"""What an exported graph computes from shapes that do not change, written down as constants.

Only the batch axis of an exported model is dynamic; every other size is fixed when it is traced.
Some model code still computes from shapes at run time, and the exported graph with it: TF-style
"same" padding (MobileNetV2, EfficientNet in ``transformers``) works out its pad amounts from the
input's height and width with Shape, Slice, Concat and Cast nodes. ONNX Runtime folds those into
constants itself, but only after the point where a Pad between a DequantizeLinear and a conv
could be taken into the conv, so the deploy model would pad in float between a dequantize and a
quantize. :func:`settle_static_shapes` runs the model once on the example inputs (no graph
optimization) and writes down:

* the pad amounts of each Pad as an initializer (the nodes that computed them are dropped);
* each AveragePool whose single window covers its whole input (EfficientNet's pooler is an
  ``AvgPool2d`` with a kernel larger than the feature map and ``ceil_mode``) as GlobalAveragePool:
  the same average, and ONNX Runtime 1.31's integer kernel for the other form
  (QLinearAveragePool) returns zeros when the kernel is larger than the input.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.export.onnx_export import export_onnx
    >>> model = export_onnx(nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(8, ceil_mode=True)), torch.zeros(1, 1, 5, 5))
    >>> [node.op_type for node in model.graph.node]
    ['Conv', 'GlobalAveragePool']
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper


def settle_static_shapes(model: onnx.ModelProto, inputs: tuple) -> None:
    """Pad amounts as constants, whole-input average pools as global ones (in place).

    Args:
        model: an exported model whose inputs are named as its graph inputs, in order.
        inputs: the example inputs it was exported with.
    """
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    pads = [node for node in model.graph.node if node.op_type == "Pad" and node.input[1] not in constants]
    pools = [node for node in model.graph.node if node.op_type == "AveragePool"]
    if not pads and not pools:
        return
    values = _probe(model, inputs, [node.input[1] for node in pads] + [node.input[0] for node in pools])
    for node in pads:
        name = f"{node.name}_pads"
        model.graph.initializer.append(numpy_helper.from_array(values[node.input[1]].astype(np.int64), name))
        node.input[1] = name
    for node in pools:
        if _covers_whole_input(node, values[node.input[0]].shape[2:]):
            node.op_type = "GlobalAveragePool"
            del node.attribute[:]
    _drop_dead_nodes(model.graph)


def _probe(model: onnx.ModelProto, inputs: tuple, names: list[str]) -> dict[str, np.ndarray]:
    """The values ``names`` take in one run of ``model`` on ``inputs``, without graph optimization."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = list(dict.fromkeys(names))
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {value.name: x.numpy() for value, x in zip(model.graph.input, inputs)}
    return dict(zip(outputs, session.run(outputs, feeds)))


def _covers_whole_input(pool: onnx.NodeProto, spatial: tuple[int, ...]) -> bool:
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in pool.attribute}
    if any(attributes.get("pads", [])) or attributes.get("auto_pad", b"NOTSET") != b"NOTSET":
        return False
    if any(d != 1 for d in attributes.get("dilations", [])):
        return False
    kernel, spatial = list(attributes["kernel_shape"]), list(spatial)
    # one window over everything: the kernel is the input's size, or larger with ceil_mode
    return kernel == spatial or bool(attributes.get("ceil_mode", 0)) and all(k >= d for k, d in zip(kernel, spatial))


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    """Remove the nodes whose outputs nothing reads any more."""
    outputs = {out.name for out in graph.output}
    while True:
        used = outputs | {name for node in graph.node for name in node.input}
        dead = [node for node in graph.node if not used.intersection(node.output)]
        if not dead:
            return
        for node in dead:
            graph.node.remove(node)
