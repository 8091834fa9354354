"""The gate grid: the ULQ formula of ``clip_min = 0``, ``clip_max = 1``, INT8, against independent
formulas, with its straight-through gradient, and the values ONNX Runtime computes for it."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from lightning_amct.quant import GateQuantizer
from lightning_amct.quant.functional import ulq_fake_quant


def _inputs() -> torch.Tensor:
    """Sigmoids of random logits, the grid's ends and values outside it."""
    return torch.cat([torch.sigmoid(torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 4),
                      torch.tensor([0.0, 1.0, -0.3, 1.7, 0.5])])  # fmt: skip


def test_the_gate_grid_is_the_ulq_grid_of_zero_to_one_with_its_gradient() -> None:
    x = _inputs().requires_grad_(True)
    y = GateQuantizer()(x)
    g = torch.randn(len(x))
    y.backward(g)
    # ULQ with clips [0, 1], INT8, in float64: s = 1/255, o = round(-128 - 0/s) = -128
    s = np.float64(np.float32(1 / 255))
    xs = x.detach().double().numpy()
    expected = (np.clip(np.round(xs / s - 128), -128, 127) + 128) * s
    assert np.allclose(y.detach().double().numpy(), expected, atol=1e-7, rtol=0)
    inside = (xs >= 0) & (xs <= 255 * s)
    assert torch.equal(x.grad, g * torch.from_numpy(inside))
    # and ulq_fake_quant with those clips, gradient for gradient
    x2 = x.detach().clone().requires_grad_(True)
    ulq = ulq_fake_quant(x2, torch.tensor([1.0]), torch.tensor([0.0]), 8)
    ulq.backward(g)
    assert torch.allclose(y, ulq, atol=1e-7, rtol=0) and torch.equal(x.grad, x2.grad)


def test_onnx_runtime_computes_the_same_values_as_uint8_with_zero_point_zero() -> None:
    x = _inputs()
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    scale = numpy_helper.from_array(np.array(1 / 255, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "z")
    graph = helper.make_graph(nodes, "gate", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [len(x)])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [len(x)])], [scale, zero])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"x": x.numpy()})[0])
    assert torch.equal(got, GateQuantizer()(x))
