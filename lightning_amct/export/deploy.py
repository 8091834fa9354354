"""The deploy ONNX model: the fake-quant graph in the form ONNX Runtime runs fastest, same values.

Integer weights for every quantized layer. From the fake-quant model
(:mod:`~lightning_amct.export.onnx_export`) these rewrites:

1. Each ``float initializer -> QuantizeLinear -> DequantizeLinear`` on a weight becomes
   ``integer initializer -> DequantizeLinear``: INT8, or INT4 (two per byte) for a 4-bit weight
   when the opset is 21 or more (else INT8, holding the same values). ONNX Runtime fuses the
   DequantizeLinear into the layer where it has an integer kernel for it (QLinearConv, QGemm,
   MatMulIntegerToFloat...); elsewhere (INT4 weights: no INT4 convolution kernel; a conv whose
   output goes on unquantized) it dequantizes the weight at every run and computes in float32.
   The report names those layers (:mod:`~lightning_amct.export.ort_kernels`).
2. Activation pairs ``QuantizeLinear -> DequantizeLinear`` with an INT8 zero point ``z`` become
   UINT8 with zero point ``z + 128``: the same grid and the same dequantized values, in the type
   of ONNX Runtime's x86 integer kernels.
3. A Relu whose readers all quantize with zero point 0 is removed (quantizing clamps negatives to
   0 anyway: ``Q(relu(x)) == Q(x)``), so the layer before it feeds QuantizeLinear directly.
4. A zero Pad in front of a conv's input quantize (TF-style "same" padding) goes into the conv's
   ``pads``: quantizing keeps 0 at 0, and QLinearConv pads with the zero point, so the values are
   the same and ONNX Runtime does not pad in float between a dequantize and a quantize.
5. A BatchNormalization that is an exact identity (mean 0, variance 1, epsilon 0, scale 1, bias 0:
   a BatchNorm subclass folded into its conv, see :mod:`~lightning_amct.export.fold`) is removed.
6. A Conv or Gemm with a float bias initializer and a dequantized input and weight gets an int32
   bias ``round(b / (s_x * s_w))`` behind a DequantizeLinear with that scale: the form ONNX
   Runtime's QDQ fusion needs. The frozen model's bias is on that grid already
   (:func:`~lightning_amct.export.integer.int32_bias`): the values do not change. The input may
   reach the layer through a Reshape (GPT-2's ``Conv1D`` flattens its input to 2-D for its Gemm):
   a tensor on a per-tensor grid stays on it.
7. The values between nodes get short names (``v0``, ``v1``...); nodes keep theirs.

The remaining activation QuantizeLinear/DequantizeLinear pairs stay: ONNX Runtime fuses them
with the layers around them where the pattern allows.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.export.integer import ActivationGrid, IntegerLayer
    >>> from lightning_amct.export.fake_quant_layer import FakeQuantLayer
    >>> from lightning_amct.export.onnx_export import export_onnx
    >>> data = IntegerLayer("fc", "Linear", 0, 1, 8, torch.ones(2, 4, dtype=torch.int8), torch.tensor([0.1, 0.2]),
    ...                     None, torch.zeros(2), ActivationGrid(8, 0.05, 0, 6.35, -6.4), None)
    >>> fake = export_onnx(FakeQuantLayer(nn.Linear(4, 2), data), torch.zeros(1, 4))
    >>> deploy = deploy_model(fake, weight_bits={})
    >>> sorted({i.data_type for i in deploy.graph.initializer} & {onnx.TensorProto.INT8, onnx.TensorProto.INT32})
    [3, 6]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from lightning_amct.export.integer import int32_bias
from lightning_amct.export.onnx_export import INT4_OPSET, convert_opset, opset_of
from lightning_amct.export.packing import pack_int4

#: Layers whose bias ONNX Runtime's QDQ fusion takes as int32.
_INT32_BIAS_TYPES = ("Conv", "Gemm")


def deploy_model(
    fake_quant: onnx.ModelProto, weight_bits: Mapping[str, int], opset_version: int | None = None
) -> onnx.ModelProto:
    """The deploy model derived from a fake-quant model (which is left unchanged).

    Args:
        fake_quant: the fake-quant ONNX model.
        weight_bits: bits of the weight initializers that are not INT8, by initializer name
            (``"net.fc.layer.weight": 4``); weights not named are INT8.
        opset_version: opset of the result; None: the fake-quant model's, raised to 21 when there
            are INT4 weights. Below 21, INT4 weights are stored as INT8.

    Returns:
        The rewritten model, checked with ``onnx.checker``.
    """
    if opset_version is None:
        opset_version = max(opset_of(fake_quant), INT4_OPSET if 4 in weight_bits.values() else 0)
    model = onnx.ModelProto()
    model.CopyFrom(convert_opset(fake_quant, opset_version))
    int4 = opset_version >= INT4_OPSET
    graph = _Graph(model.graph)
    for node in list(model.graph.node):
        if node.op_type == "QuantizeLinear" and graph.constant(node.input[0]) is not None:
            bits = weight_bits.get(node.input[0], weight_bits.get(graph.source(node.input[0]), 8))
            graph.store_weight_as_integers(node, int4 and bits == 4)
    for node in list(model.graph.node):
        if node.op_type == "QuantizeLinear" and graph.constant(node.input[0]) is None:
            graph.store_activation_as_uint8(node)
    for node in list(model.graph.node):
        if node.op_type == "Relu":
            graph.drop_relu_before_quantize(node)
    for node in list(model.graph.node):
        if node.op_type == "Pad":
            graph.fold_pad_into_conv(node)
        elif node.op_type == "BatchNormalization":
            graph.drop_identity_batchnorm(node)
    for node in list(model.graph.node):
        if node.op_type in _INT32_BIAS_TYPES and len(node.input) > 2:
            graph.quantize_bias(node)
    graph.drop_unused()
    graph.shorten_value_names()
    onnx.checker.check_model(model)
    return model


def integer_weight_name(weight_name: str) -> str:
    """The name of the integer initializer that replaces the float weight ``weight_name``."""
    return f"{weight_name}_quantized"


def producer_through(
    producers: Mapping[str, onnx.NodeProto], name: str, passing: Collection[str]
) -> onnx.NodeProto | None:
    """The node that makes ``name``, nodes of the ``passing`` types followed back through their
    first input (a Reshape before a Gemm, say); None for a graph input or an initializer."""
    node = producers.get(name)
    while node is not None and node.op_type in passing:
        node = producers.get(node.input[0])
    return node


class _Graph:
    """Lookups over one graph, and the rewrites."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.input:
                self.consumers[name].append(node)

    def source(self, name: str) -> str:
        """``name`` with Identity nodes followed back (the exporter shares equal initializers so)."""
        node = self.producers.get(name)
        while node is not None and node.op_type == "Identity":
            name = node.input[0]
            node = self.producers.get(name)
        return name

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output (through Identity), else None."""
        name = self.source(name)
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is not None and node.op_type == "Constant":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def store_weight_as_integers(self, quantize: onnx.NodeProto, as_int4: bool) -> None:
        """Replace ``weight -> QuantizeLinear -> DequantizeLinear`` by ``integers -> DequantizeLinear``."""
        dequantizers = self.consumers[quantize.output[0]]
        if not dequantizers or any(n.op_type != "DequantizeLinear" for n in dequantizers):
            return
        weight_name = quantize.input[0]
        weight = self.constant(weight_name).astype(np.float32)
        scale = self.constant(quantize.input[1]).astype(np.float32)
        zero_point = self.constant(quantize.input[2])
        axis = next((a.i for a in quantize.attribute if a.name == "axis"), 1)
        view = [1] * weight.ndim
        if scale.size > 1:
            view[axis] = scale.size
        # The weight lies on its grid: this division recovers its integers exactly.
        integers = np.clip(np.round(weight / scale.reshape(view)) + zero_point.reshape(view), -128, 127)
        integers = integers.astype(np.int8)
        quantized_name, zero_name = integer_weight_name(weight_name), f"{weight_name}_zero_point"
        self._add_initializer(_int_tensor(quantized_name, integers, as_int4))
        self._add_initializer(_int_tensor(zero_name, zero_point.astype(np.int8).reshape(zero_point.shape), as_int4))
        for node in dequantizers:
            node.input[0] = quantized_name
            if len(node.input) > 2:
                node.input[2] = zero_name
        self.graph.node.remove(quantize)

    def store_activation_as_uint8(self, quantize: onnx.NodeProto) -> None:
        """Give an INT8 activation pair ``QuantizeLinear -> DequantizeLinear`` the UINT8 type, zero
        point + 128: the same grid and the same dequantized values (``q - zero_point`` is unchanged),
        in the type ONNX Runtime's x86 integer kernels take (it converts INT8 pairs itself, but only a
        pair whose QuantizeLinear has a single reader)."""
        readers = self.consumers[quantize.output[0]]
        if len(quantize.input) < 3 or any(n.op_type != "DequantizeLinear" or len(n.input) < 3 for n in readers):
            return
        for node in (quantize, *readers):
            zero_point = self.constant(node.input[2])
            if zero_point is None or zero_point.dtype != np.int8:
                return
        for node in (quantize, *readers):
            name = f"{self.source(node.input[2])}_uint8"
            if name not in self.initializers:
                zero_point = self.constant(node.input[2]).astype(np.int16) + 128
                self._add_initializer(numpy_helper.from_array(zero_point.astype(np.uint8), name))
            node.input[2] = name
        for info in [v for v in self.graph.value_info if v.name == quantize.output[0]]:
            info.type.tensor_type.elem_type = TensorProto.UINT8

    def drop_relu_before_quantize(self, relu: onnx.NodeProto) -> None:
        """Remove a Relu whose readers are all QuantizeLinear with zero point 0 (UINT8): quantizing
        clamps negatives to 0 anyway, so ``Q(relu(x)) == Q(x)`` exactly, and the layer before it
        then feeds QuantizeLinear directly (ONNX Runtime's fusion pattern)."""
        readers = self.consumers[relu.output[0]]
        if not readers or relu.output[0] in {out.name for out in self.graph.output}:
            return
        for node in readers:
            quantizes = node.op_type == "QuantizeLinear" and len(node.input) > 2
            zero_point = self.constant(node.input[2]) if quantizes else None
            if zero_point is None or zero_point.dtype != np.uint8 or np.any(zero_point != 0):
                return
        self._bypass(relu)

    def fold_pad_into_conv(self, pad: onnx.NodeProto) -> None:
        """``Pad(x, zeros) -> QuantizeLinear -> DequantizeLinear -> Conv`` becomes
        ``QuantizeLinear -> DequantizeLinear -> Conv`` with the padding in the conv's ``pads``."""
        attributes = {a.name: helper.get_attribute_value(a) for a in pad.attribute}
        amounts = self.constant(pad.input[1]) if len(pad.input) > 1 else None
        value = self.constant(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        if attributes.get("mode", b"constant") != b"constant" or len(pad.input) > 3 or amounts is None:
            return
        if value is None or np.any(value != 0):
            return
        rank = amounts.size // 2
        begin, end = amounts[:rank], amounts[rank:]
        quantizes = self.consumers[pad.output[0]]
        if rank < 3 or np.any(begin[:2] != 0) or np.any(end[:2] != 0) or len(quantizes) != 1:
            return
        (quantize,) = quantizes
        dequantizes = self.consumers[quantize.output[0]]
        if quantize.op_type != "QuantizeLinear" or not dequantizes or any(not _is_dequantize(n) for n in dequantizes):
            return
        convs = [reader for node in dequantizes for reader in self.consumers[node.output[0]]]
        if not convs or any(c.op_type != "Conv" or c.input[0] not in {n.output[0] for n in dequantizes} for c in convs):
            return
        if any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for c in convs for a in c.attribute):
            return
        for conv in convs:
            old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0] * (2 * (rank - 2)))
            new = [int(p) for p in np.concatenate([begin[2:], end[2:]]) + np.array(old)]
            kept = [a for a in conv.attribute if a.name != "pads"]
            del conv.attribute[:]
            conv.attribute.extend([*kept, helper.make_attribute("pads", new)])
        quantize.input[0] = pad.input[0]
        self.consumers[pad.input[0]].remove(pad)
        self.consumers[pad.input[0]].append(quantize)
        self.graph.node.remove(pad)

    def drop_identity_batchnorm(self, bn: onnx.NodeProto) -> None:
        """Remove a BatchNormalization that computes ``(x - 0) / sqrt(1 + 0) * 1 + 0``: ``x`` exactly."""
        epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        params = [self.constant(name) for name in bn.input[1:5]]
        if epsilon != 0 or len(bn.output) != 1 or any(p is None for p in params):
            return
        scale, bias, mean, var = params
        if not (np.all(scale == 1) and np.all(bias == 0) and np.all(mean == 0) and np.all(var == 1)):
            return
        self._bypass(bn)

    def quantize_bias(self, layer: onnx.NodeProto) -> None:
        """Give ``layer`` an int32 bias behind DequantizeLinear, when input and weight are dequantized."""
        bias_name = layer.input[2]
        bias = self.constant(bias_name)
        x_dq = producer_through(self.producers, layer.input[0], ("Reshape",))
        w_dq = self.producers.get(layer.input[1])
        if bias is None or not _is_dequantize(x_dq) or not _is_dequantize(w_dq):
            return
        if self.constant(w_dq.input[0]) is None:
            return  # the weight is not stored as integers
        x_scale = self.constant(x_dq.input[1])
        w_scale = self.constant(w_dq.input[1])
        if x_scale is None or w_scale is None or x_scale.size != 1:
            return
        found = int32_bias(bias, float(x_scale.reshape(())), w_scale)
        if found is None:
            return  # an int32 bias cannot hold it: keep the float bias
        integers, scale = found
        names = {part: f"{bias_name}_{part}" for part in ("quantized", "scale", "dequantized")}
        if names["quantized"] in self.initializers:  # a layer called again: its bias, quantized already
            same = np.array_equal(self.constant(names["quantized"]), integers)
            if same and np.array_equal(self.constant(names["scale"]), scale):
                layer.input[2] = names["dequantized"]
                return
            names = {part: f"{bias_name}_{layer.name}_{part}" for part in names}  # on another grid
        self._add_initializer(numpy_helper.from_array(integers, names["quantized"]))
        self._add_initializer(numpy_helper.from_array(scale, names["scale"]))
        dequantize = helper.make_node(
            "DequantizeLinear",
            [names["quantized"], names["scale"]],  # no zero point: 0
            [names["dequantized"]],
            name=f"{layer.name}_bias_dequantize",
            axis=0,
        )
        position = list(self.graph.node).index(layer)
        self.graph.node.insert(position, dequantize)
        layer.input[2] = names["dequantized"]

    def drop_unused(self) -> None:
        """Remove nodes whose outputs nothing reads (e.g. Identity copies of replaced weights),
        then initializers nothing reads."""
        outputs = {out.name for out in self.graph.output}
        while True:
            used = outputs | {name for node in self.graph.node for name in node.input}
            dead = [node for node in self.graph.node if not used.intersection(node.output)]
            if not dead:
                break
            for node in dead:
                self.graph.node.remove(node)
        for init in list(self.graph.initializer):
            if init.name not in used:
                self.graph.initializer.remove(init)

    def shorten_value_names(self) -> None:
        """Name the values between nodes ``v0``, ``v1``... (nodes keep their names, which say the
        module they come from): in a model of small layers the long exporter names are several
        percent of the file."""
        if any(attribute.g.node or attribute.graphs for node in self.graph.node for attribute in node.attribute):
            return  # a subgraph may read values by name
        kept = {value.name for value in (*self.graph.input, *self.graph.output)} | set(self.initializers)
        names: dict[str, str] = {}
        for node in self.graph.node:
            for i, name in enumerate(node.output):
                if name and name not in kept:
                    names[name] = node.output[i] = f"v{len(names)}"
        for node in self.graph.node:
            for i, name in enumerate(node.input):
                node.input[i] = names.get(name, name)
        for info in self.graph.value_info:
            info.name = names.get(info.name, info.name)

    def _bypass(self, node: onnx.NodeProto) -> None:
        """Remove ``node`` (one input, one output, not a graph output); its readers read its input."""
        source, output = node.input[0], node.output[0]
        if output in {out.name for out in self.graph.output}:
            return
        for reader in self.consumers.pop(output, []):
            for i, name in enumerate(reader.input):
                if name == output:
                    reader.input[i] = source
            self.consumers[source].append(reader)
        self.consumers[source].remove(node)
        self.graph.node.remove(node)

    def _add_initializer(self, tensor: onnx.TensorProto) -> None:
        self.graph.initializer.append(tensor)
        self.initializers[tensor.name] = tensor


def _is_dequantize(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == "DequantizeLinear"


def _int_tensor(name: str, values: np.ndarray, as_int4: bool) -> onnx.TensorProto:
    """An INT8 initializer, or an INT4 one packed two per byte (low nibble first)."""
    if not as_int4:
        return numpy_helper.from_array(values.astype(np.int8), name)
    packed = pack_int4(torch.from_numpy(np.ascontiguousarray(values, dtype=np.int8))).numpy()
    return helper.make_tensor(name, TensorProto.INT4, list(values.shape), packed.tobytes(), raw=True)
