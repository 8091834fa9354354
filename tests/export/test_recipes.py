"""Every recipe, end to end on the demo: compress, train briefly, save, then compare four ways.

The trained fake-quant model (PyTorch, eval), ``load_compressed``, and ONNX Runtime on the
fake-quant and the deploy ONNX must agree on the digits test set:

* logits within one quantization step of the output: ``s_x * max_j sum_i |W_ji|`` of the head
  (its input scale times the largest row L1 norm of its weight), the change of a logit when every
  input of the head moves by one step. The paths differ only where a value lands within float
  rounding of a rounding boundary (folded BatchNorm, torch's ``x * (1/s)`` against ULQ's ``x/s``,
  ONNX Runtime's summation order, int32 bias), which moves that value by one step; a head that is
  not quantized leaves float rounding only (1e-4);
* top-1 predictions identical on every test image whose two largest logits lie more than twice
  that apart (a flip needs two logits closer than the differences above), and on at least 99 %
  of all (the differences are far below that bound, so a flip needs a near tie).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format

from lightning_amct import compress_model
from lightning_amct.demo import DemoClassifier, digits_tensors
from lightning_amct.export import FakeQuantLayer, load_compressed, save_compressed
from lightning_amct.export.checkpoint import decode_layer
from lightning_amct.prune import unpack_mask_bits
from lightning_amct.proto import scale_offset_record_pytorch_pb2 as record_pb2

RECIPES = Path(__file__).parents[2] / "recipes"
FLOAT_TOLERANCE = 1e-4
OUTPUTS = ("quant+outputs", "compressed1+outputs")
#: Where the demo's outputs are quantized with ``quantize_outputs`` (see ``plan.outputs``).
#: (The recipes leave the stem conv in float; its ReLU output, read by the quantized block.conv1
#: and by the residual add, is quantized once with block.conv1's quantizer. The residual add's
#: output, after the block's ReLU, and the global average pool's output are quantized with the
#: quantizers of the layers that read them through the max-pool and the flatten.)
EXPECTED_OUTPUTS = {"net.stem.relu", "net.block.bn2", "net.block.relu2", "net.pointwise.relu", "net.gap"}


@dataclass
class Export:
    recipe: str
    model: DemoClassifier
    paths: dict[str, Path]
    images: torch.Tensor
    reference: torch.Tensor

    def checkpoint(self) -> dict:
        return torch.load(self.paths["checkpoint"], weights_only=True)


def train_briefly(module: DemoClassifier, epochs: int = 2) -> None:
    """Two epochs of the digits training split (17 batches of 64 each), AdamW, in a plain loop.

    Enough for about 93% test accuracy.
    """
    images, labels = digits_tensors()["train"].tensors
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    module.train()
    for _ in range(epochs):
        for start in range(0, len(labels), 64):
            loss = module.loss(module(images[start : start + 64]), labels[start : start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    module.eval()


#: The recipes, and two with ``quantize_outputs`` (``+outputs``): INT8, and channel pruning + INT8.
VARIANTS = ["quant", "prune", "selective_prune", "compressed1", "compressed2", "a8w4", "quant+outputs",
            "compressed1+outputs"]  # fmt: skip


@pytest.fixture(scope="module", params=VARIANTS)
def export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Export:
    torch.manual_seed(0)
    module = DemoClassifier()
    recipe, _, outputs = request.param.partition("+")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # two recipes repeat a skip entry on purpose
        compress_model(module, RECIPES / f"{recipe}.cfg", module.example_input_array, quantize_outputs=bool(outputs))
    train_briefly(module)
    paths = save_compressed(module, tmp_path_factory.mktemp(recipe))
    images = digits_tensors()["test"].tensors[0]
    with torch.no_grad():
        reference = module(images)
    return Export(request.param, module, paths, images, reference)


def output_step(export: Export) -> float:
    """One quantization step of the output (see the module docstring), or float rounding."""
    head = decode_layer("net.fc", export.checkpoint()["layers"]["net.fc"]) if export.recipe != "prune" else None
    if head is None or head.activation is None:
        return FLOAT_TOLERANCE
    return head.activation.scale * float(head.weight().abs().sum(dim=1).max()) + FLOAT_TOLERANCE


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"input": images.numpy()})[0])


def test_pytorch_loaded_and_onnx_runtime_agree(export: Export) -> None:
    loaded = load_compressed(export.paths["checkpoint"], DemoClassifier())
    with torch.no_grad():
        outputs = {"load_compressed": loaded(export.images)}
    outputs["fake_quant_onnx"] = run_onnx(export.paths["fake_quant_onnx"], export.images)
    outputs["deploy_onnx"] = run_onnx(export.paths["deploy_onnx"], export.images)
    tolerance = output_step(export)
    top_two = export.reference.topk(2, dim=1).values
    decided = top_two[:, 0] - top_two[:, 1] > 2 * tolerance
    for name, logits in outputs.items():
        assert float((logits - export.reference).abs().max()) <= tolerance, name
        assert torch.equal(logits.argmax(1)[decided], export.reference.argmax(1)[decided]), name
        assert (logits.argmax(1) == export.reference.argmax(1)).float().mean() >= 0.99, name


def test_loaded_model_is_physically_pruned_and_frozen(export: Export) -> None:
    loaded = load_compressed(export.paths["checkpoint"], DemoClassifier())
    assert not loaded.training
    assert loaded.net.pointwise.conv.weight.shape == export.model.net.pointwise.conv.weight.shape
    if export.recipe.startswith(("prune", "compressed1")):
        assert loaded.net.pointwise.conv.weight.shape[0] < 128
    frozen = [m for m in loaded.modules() if isinstance(m, FakeQuantLayer)]
    assert len(frozen) == len(export.checkpoint()["layers"])
    assert not any(p.requires_grad for layer in frozen for p in layer.parameters())


def _plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, str, int, float, bool))


def test_checkpoint_is_plain_data_with_integer_weights(export: Export) -> None:
    checkpoint = export.checkpoint()  # weights_only=True: no pickled objects
    assert _plain(checkpoint)
    assert checkpoint["compression"]["plan"]["layers"] and checkpoint["compression"]["config_text"]
    for name, entry in checkpoint["layers"].items():
        weight = entry["weight"]
        expected = {8: torch.int8, 4: torch.uint8, None: torch.float32}[entry["weight_bits"]]
        assert weight["values"].dtype == expected, name
        if entry["activation"] is not None:
            assert isinstance(entry["activation"]["scale"], float) and isinstance(entry["activation"]["offset"], int)
    layouts = {entry["weight"]["layout"] for entry in checkpoint["layers"].values()}
    assert ("4:2" in layouts) == (export.recipe in ("selective_prune", "compressed2"))
    folded = checkpoint["folded_batchnorms"]
    assert bool(folded) == (export.recipe in ("quant", "compressed1", "compressed2", "a8w4", *OUTPUTS))
    assert set(checkpoint["outputs"]) == (EXPECTED_OUTPUTS if export.recipe in OUTPUTS else set())
    assert all(isinstance(grid["scale"], float) and grid["bits"] == 8 for grid in checkpoint["outputs"].values())
    assert not any(key.startswith(tuple(f"{bn}." for bn in folded)) for key in checkpoint["float_state"])


def optimized_graph(path: Path) -> onnx.GraphProto:
    """The graph ONNX Runtime runs for the model at ``path`` (written next to it, then read)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the warning that an optimized model is hardware specific
    options.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath).graph


INTEGER_KERNELS = ("QLinearConv", "QGemm")  # the demo's layers: convolutions and a 2-D Linear


def test_deploy_model_holds_the_checkpoint_integers(export: Export) -> None:
    """Integer weights for every quantized layer (INT4 kept packed), whether ONNX Runtime runs the
    layer with an integer kernel or dequantizes the weight for a float one; no float weight left."""
    deploy = onnx.load(export.paths["deploy_onnx"])
    initializers = {init.name: init for init in deploy.graph.initializer}
    for name, entry in export.checkpoint()["layers"].items():
        data = decode_layer(name, entry)
        if data.weight_int is None:
            continue
        stored = initializers[f"{name}.layer.weight_quantized"]
        assert stored.data_type == (onnx.TensorProto.INT4 if data.weight_bits == 4 else onnx.TensorProto.INT8)
        assert np.array_equal(onnx.numpy_helper.to_array(stored).astype(np.int8), data.weight_int.numpy()), name
        assert f"{name}.layer.weight" not in initializers, name
        if data.bias is not None and data.activation is not None:
            assert initializers[f"{name}.layer.bias_quantized"].data_type == onnx.TensorProto.INT32


def test_report_names_the_layers_onnx_runtime_runs_in_float(export: Export) -> None:
    """The report's kernels are ONNX Runtime's own: every quantized layer it reports integer runs
    with an integer kernel in the optimized graph, and the others are listed with their reason."""
    report = json.loads(export.paths["report_json"].read_text())
    kernels = {row["layer"]: row["ort_kernel"] for row in report["layers"] if row["weight_bits"] is not None}
    float_layers = {row["layer"]: row["reason"] for row in report["float_in_deployment"]}
    ops = [node.op_type for node in optimized_graph(export.paths["deploy_onnx"]).node]
    assert sum(op in INTEGER_KERNELS for op in ops) == len(kernels) - len(float_layers)
    assert all(kernels[layer] not in INTEGER_KERNELS for layer in float_layers)
    markdown = export.paths["report_md"].read_text()
    assert ("## Better left float in deployment" in markdown) == bool(float_layers)
    if export.recipe in OUTPUTS:  # with output quantizers every quantized layer runs with integer kernels
        assert not float_layers and {"QLinearConv", "QGemm"} <= set(ops)
    elif export.recipe == "a8w4":
        assert set(float_layers) == set(kernels)
        assert all(reason.startswith("INT4 weight") for reason in float_layers.values())
    elif export.recipe in ("quant", "compressed1", "compressed2"):
        # inputs only: the convs feeding the residual add and the pooling stay float
        assert set(float_layers) == {"net.block.conv2", "net.pointwise.conv"}
        assert float_layers["net.block.conv2"] == "its output goes on unquantized (into Add)"


def test_record_matches_the_checkpoint(export: Export) -> None:
    record = text_format.Parse(export.paths["record"].read_text(), record_pb2.ScaleOffsetRecord())
    entries = {entry.key: entry for entry in record.record}
    checkpoint = export.checkpoint()
    for name, encoded in checkpoint["layers"].items():
        data = decode_layer(name, encoded)
        entry = entries[name]
        if data.weight_int is not None:
            assert list(entry.value.scale_w) == data.weight_scale.tolist()
            assert list(entry.value.offset_w) == [0] * data.weight_scale.numel()
            assert entry.value.wts_type == f"INT{data.weight_bits}"
        if data.activation is not None:
            assert entry.value.scale_d == np.float32(data.activation.scale)
            assert entry.value.offset_d == data.activation.offset
        if data.mask is not None:
            assert entry.prune.prune_type == record_pb2.PruneRecord.SELECTIVE_PRUNE
            mask = unpack_mask_bits(torch.frombuffer(bytearray(entry.prune.mask), dtype=torch.uint8), data.weight_shape)
            assert torch.equal(mask, data.mask)
    filter_pruned = [e for e in record.record if e.prune.prune_type == record_pb2.PruneRecord.FILTER_PRUNE
                     and e.HasField("prune")]  # fmt: skip
    if export.recipe.startswith(("prune", "compressed1")):
        kept = checkpoint["compression"]["kept_channels"]
        assert filter_pruned
        assert {tuple(e.prune.kept_channels) for e in filter_pruned} <= {tuple(v) for v in kept.values()}
        assert all(e.prune.original_channels > len(e.prune.kept_channels) for e in filter_pruned)
    else:
        assert not filter_pruned


def test_report_lists_layers_and_true_file_sizes(export: Export) -> None:
    report = json.loads(export.paths["report_json"].read_text())
    for file_name, size in report["files"].items():
        assert (export.paths["checkpoint"].parent / file_name).stat().st_size == size["bytes"]
    rows = {row["layer"]: row for row in report["layers"]}
    quantized = export.recipe not in ("prune", "selective_prune")
    assert (rows["net.block.conv1"]["weight_bits"] is not None) == quantized
    assert rows["net.block.conv1"]["flops"] > 0 and rows["net.block.conv1"]["params"] > 0
    markdown = export.paths["report_md"].read_text()
    assert all(f"`{name}`" in markdown for name in report["files"])
    assert {row["module"] for row in report["outputs"]} == (EXPECTED_OUTPUTS if export.recipe in OUTPUTS else set())
    assert ("## Output quantizers" in markdown) == (export.recipe in OUTPUTS)
    # INT4 saves size, not time, in ONNX Runtime: the report says so next to the file sizes
    assert ("ONNX Runtime has no INT4 convolution kernel" in markdown) == (export.recipe == "a8w4")


def test_saving_the_loaded_model_again_gives_the_same_integers(export: Export, tmp_path: Path) -> None:
    loaded = load_compressed(export.paths["checkpoint"], DemoClassifier())
    again = torch.load(save_compressed(loaded, tmp_path)["checkpoint"], weights_only=True)
    first = export.checkpoint()
    assert again["folded_batchnorms"] == first["folded_batchnorms"]
    assert again["outputs"] == first["outputs"]
    for name, entry in first["layers"].items():
        for key in ("values", "scale"):
            a, b = entry["weight"][key], again["layers"][name]["weight"][key]
            assert (a is None and b is None) or torch.equal(a, b), (name, key)
