"""Deploy models of the zoo in ONNX Runtime: our INT8 model against ONNX Runtime's own quantization.

For each zoo model (``zoo.build(name, "bench")``: ResNet-18, RegNetY-200MF, ConvNeXt-atto,
EfficientNet-B0, MobileNetV2, MobileNetV3-small, ViT-Ti, BERT-tiny, a 2-block GPT-2 and Llama), in
one run:

* float: the float model exported as it is (:func:`lightning_amct.export.export_onnx`);
* ours: INT8 activations (``ulq_quantize``) and per-channel INT8 weights (``arq_retrain``) on every
  layer, ``quantize_outputs=True``, clips calibrated (IFMR) on ``--calibration-batches`` batches
  (BatchNorm statistics left as they are), then ``save_compressed``'s deploy model;
* quantize_static: ONNX Runtime's own post-training static quantization of the same float ONNX
  model (``quant_pre_process``, then ``quantize_static``: QDQ, per-channel INT8 weights, UINT8
  activations), calibrated on the same batches.

Each is timed in ONNX Runtime's CPU provider with ``--threads`` threads at batch 1 and 32 (warm-up,
then the median of ``--repeats`` runs, the models taking turns run by run (in balanced orders:
``onnx_latency.balanced_orders``), so that a change in
machine load hits all of them alike). A second session of the quantize_static model takes its
turns too: how far two sessions of one model differ is the noise in these comparisons. Then, per model: file sizes against the float ONNX file,
the quantized layers ONNX Runtime runs with integer kernels, the BatchNormalization nodes left in
our deploy model, and how far ours is from the PyTorch fake-quant model (largest logit difference
in output steps, ``s_x * max_j sum_i |W_ji|`` of the head, and top-1 agreement, also counted where
no near tie lets a one-step difference flip it) on a batch of fresh inputs, next to how far
PyTorch is from itself when it runs the same inputs one at a time (rounding alone). The targets of the
deploy work are checked at the end; for the transformers, which keep their embedding tables and
norms in float (the config quantizes convolutions and Linear layers; quantize_static quantizes the
tables too), the size target does not apply, and ours must not be slower than float.

Writes its section of ``bench/results.md`` (``--results`` elsewhere).

Usage (from the repository root)::

    python bench/deploy_zoo.py [--models resnet mobilenet_v3] [--threads 2] [--repeats 120]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx_latency import median_latencies
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from results_file import write_section
from torch import nn

from lightning_amct import compress_model, zoo
from lightning_amct.export import export_onnx, freeze_model, save_compressed

BENCH = Path(__file__).parent
INT8 = """
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT8 } }
"""
MODELS = ["resnet", "regnet", "convnext", "efficientnet", "mobilenet_v2", "mobilenet_v3", "vit", "bert", "gpt2", "llama"]
TRANSFORMERS = ("vit", "bert", "gpt2", "llama")
BATCHES = (1, 32)
CALIBRATION_BATCH = 8
SECTION = "# Deploy models of the zoo"
SECOND_SESSION = "quantize_static, second session"


@dataclass
class Measured:
    """What one model measured (latencies in seconds, by variant and batch size)."""

    name: str
    sizes: dict[str, int]
    latency: dict[int, dict[str, float]] = field(default_factory=dict)
    integer_layers: int = 0
    quantized_layers: int = 0
    static_integer_layers: int = 0
    batchnorms_left: int = 0
    max_steps: float = 0.0
    top1: float = 0.0
    top1_decisive: float | None = None  # None: every input a near tie
    pytorch_spread: float = 0.0  # PyTorch against itself, batch against one input at a time
    float_layers: list[str] = field(default_factory=list)
    #: why quantize_static read the float model without ORT's pre-processing ("" where it did not)
    unprocessed: str = ""


class _Batches(CalibrationDataReader):
    """The calibration batches, as ``quantize_static`` reads them."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = iter([{"input": batch.numpy()} for batch in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)


def calibrate(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Training-mode forwards (they set the clips) with BatchNorm statistics left as they are.

    Only the BatchNorm itself goes to eval mode: the output quantizer attached to it must not.
    """
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.training = False
    with torch.no_grad():
        for batch in batches:
            model(batch)
    model.eval()


def integer_kernels(path: Path) -> int:
    """How many layers ONNX Runtime runs with integer kernels in the model at ``path``."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    return sum(op in ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat") for op in ops)


def agreement(name: str, model: nn.Module, example: tuple, deploy: Path) -> tuple[float, float, float | None, float]:
    """Largest logit difference between ONNX Runtime on ``deploy`` and the PyTorch fake-quant model,
    in output steps; the fraction of equal top-1 predictions on 32 fresh inputs; and that fraction
    among the inputs whose two largest PyTorch logits are more than two output steps apart (logits
    within one step of PyTorch's cannot change those; a random-init model has near ties), None when
    there are none.

    Last, the baseline: the largest difference between PyTorch's own outputs for the batch and for
    its inputs run one at a time, in output steps. Only the order of float additions differs
    there, so this is how far rounding alone moves the logits of this model; in a deep
    random-init network a one-code flip at a rounding boundary grows layer by layer, and on
    RegNet or MobileNetV2 it grows past one output step in PyTorch itself.
    """
    frozen = freeze_model(model, example)
    head = frozen.layers[zoo.ZOO[name].output_layer]
    step = head.activation.scale * float(head.weight().abs().sum(dim=1).max())
    (inputs,) = zoo.example_inputs(name, 32, seed=1)
    with torch.no_grad():
        expected = frozen.module(inputs).numpy()
        one_at_a_time = torch.cat([frozen.module(row[None]) for row in inputs]).numpy()
    session = ort.InferenceSession(str(deploy), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": inputs.numpy()})[0]
    same = got.argmax(1) == expected.argmax(1)
    top_two = np.sort(expected, axis=1)[:, -2:]
    decisive = top_two[:, 1] - top_two[:, 0] > 2 * step
    decisive_same = float(same[decisive].mean()) if decisive.any() else None
    pytorch_spread = float(np.abs(one_at_a_time - expected).max() / step)
    return float(np.abs(got - expected).max() / step), float(same.mean()), decisive_same, pytorch_spread


def measure(name: str, folder: Path, args: argparse.Namespace) -> Measured:
    model, example = zoo.build(name, "bench", batch=1)
    batches = [zoo.example_inputs(name, CALIBRATION_BATCH, seed=10 + i)[0] for i in range(args.calibration_batches)]
    paths = {"float": folder / "float.onnx", "quantize_static": folder / "quantize_static.onnx"}
    onnx.save(export_onnx(model, example), str(paths["float"]))
    unprocessed, static_input = "", folder / "preprocessed.onnx"
    try:
        with contextlib.chdir(folder):  # it leaves files in the working directory where it fails
            quant_pre_process(str(paths["float"]), str(static_input))
    except Exception as exc:  # its symbolic shape inference gives up on some models (MobileViT's reshapes)
        unprocessed, static_input = f"{type(exc).__name__}: {exc}", paths["float"]
    quantize_static(
        str(static_input), str(paths["quantize_static"]), _Batches(batches),
        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_model(model, INT8, example, quantize_outputs=True)
    calibrate(model, batches)
    artifacts = save_compressed(model, folder / "ours", example)
    paths["ours"] = artifacts["deploy_onnx"]
    report = json.loads(artifacts["report_json"].read_text())
    result = Measured(name, {variant: path.stat().st_size for variant, path in paths.items()}, unprocessed=unprocessed)
    result.quantized_layers = sum(row["weight_bits"] is not None for row in report["layers"])
    result.float_layers = [f"{row['layer']}: {row['reason']}" for row in report["float_in_deployment"]]
    result.integer_layers = integer_kernels(paths["ours"])
    result.static_integer_layers = integer_kernels(paths["quantize_static"])
    result.batchnorms_left = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(paths["ours"])).graph.node)
    result.max_steps, result.top1, result.top1_decisive, result.pytorch_spread = agreement(
        name, model, example, paths["ours"]
    )
    variants = {key: paths[key] for key in ("float", "ours", "quantize_static")}
    variants[SECOND_SESSION] = paths["quantize_static"]  # the control: how far two sessions of one model differ
    for batch_size in BATCHES:
        (inputs,) = zoo.example_inputs(name, batch_size, seed=2)
        result.latency[batch_size] = median_latencies(variants, inputs.numpy(), args.threads, args.repeats)
    return result


def tables(results: list[Measured], args: argparse.Namespace) -> str:
    lines = [
        SECTION,
        "",
        f"`{' '.join(['python bench/deploy_zoo.py', *sys.argv[1:]])}`",
        "",
        f"- zoo models at their bench sizes (images 3x64x64, token ids 1x16); ours: INT8 ulq_quantize + "
        f"arq_retrain per channel, quantize_outputs, {args.calibration_batches} calibration batches of "
        f"{CALIBRATION_BATCH}; quantize_static: QDQ, per-channel INT8 weights, UINT8 activations, the same batches",
        f"- ONNX Runtime {ort.__version__}, CPU provider, {args.threads} threads, {os.cpu_count()} CPUs; median of "
        f"{args.repeats} runs, the models taking turns in balanced orders (and a second session of the quantize_static model, the control); speed-up = float ms / model ms",
        f"- noise: two sessions of one model came out up to {noise(results):.1%} apart in this run; 'at least as fast as "
        "quantize_static' counts a smaller slowdown as parity",
        *(
            f"- {r.name}: quantize_static read the float model as it is, ORT's quant_pre_process failed "
            f"({r.unprocessed})"
            for r in results
            if r.unprocessed
        ),
        "",
        "| model | batch | float ms | ours ms | ours speed-up | quantize_static ms | quantize_static speed-up "
        "| ours vs quantize_static | quantize_static vs its second session |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for batch_size, ms in result.latency.items():
            f, o, s, again = (ms[key] * 1e3 for key in ("float", "ours", "quantize_static", SECOND_SESSION))
            lines.append(
                f"| {result.name} | {batch_size} | {f:.2f} | {o:.2f} | {f / o:.2f}x | {s:.2f} | {f / s:.2f}x "
                f"| {s / o:.2f}x | {again / s:.2f}x |"
            )
    lines += [
        "",
        "| model | float ONNX | ours (of float) | quantize_static (of float) | ours: integer layers / quantized "
        "| quantize_static: integer layers | ours: BatchNorm left | ours vs PyTorch: max diff (output steps), top-1 (where not a near tie) "
        "| PyTorch vs itself, one input at a time: max diff (output steps) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fl, o, s = (r.sizes[key] for key in ("float", "ours", "quantize_static"))
        lines.append(
            f"| {r.name} | {fl:,} B | {o:,} B ({o / fl:.0%}) | {s:,} B ({s / fl:.0%}) "
            f"| {r.integer_layers} / {r.quantized_layers} | {r.static_integer_layers} | {r.batchnorms_left} "
            f"| {r.max_steps:.2f}, {r.top1:.0%} ({'all near ties' if r.top1_decisive is None else f'{r.top1_decisive:.0%}'}) "
            f"| {r.pytorch_spread:.2f} |"
        )
    lines += ["", "Targets:", ""] + [f"- {line}" for line in verdicts(results)]
    floats = [f"- {r.name}: {layer}" for r in results for layer in r.float_layers]
    if floats:
        lines += ["", "Quantized layers ONNX Runtime runs in float (from each report):", "", *floats]
    return "\n".join(lines) + "\n"


def noise(results: list[Measured]) -> float:
    """How far apart two sessions of one model came out in this run: the largest relative
    difference between the quantize_static model and its second session, over every model and
    batch size. A difference between two models smaller than this is not measured."""
    return max(abs(ms[SECOND_SESSION] / ms["quantize_static"] - 1) for r in results for ms in r.latency.values())


def verdicts(results: list[Measured]) -> list[str]:
    """The targets, model by model: size, speed against quantize_static and float, agreement.

    "At least as fast as quantize_static" is met where ours is faster, or slower by less than
    :func:`noise`: the two graphs run the same kernels (see the op counts), and a smaller
    difference is one the run cannot tell from two sessions of one model. Ours must be faster than
    float where quantize_static is faster by more than that.
    """
    lines = []
    spread = noise(results)
    for r in results:
        checks = []
        for batch_size, ms in r.latency.items():
            ours, static, fl = ms["ours"], ms["quantize_static"], ms["float"]
            if r.name in TRANSFORMERS:
                checks.append(f"batch {batch_size} not slower than float: {_verdict(ours <= fl)}")
            else:
                slower = ours / static - 1
                check = f"batch {batch_size} at least as fast as quantize_static: {_verdict(slower < spread)}"
                if slower > 0:
                    check += (
                        f" ({'parity: ' if slower < spread else ''}{slower:.1%} slower; two sessions of one model: "
                        f"up to {spread:.1%} apart in this run)"
                    )
                checks.append(check)
                if static < fl * (1 - spread):  # quantize_static measurably faster than float
                    checks.append(f"batch {batch_size} faster than float: {_verdict(ours < fl)}")
        if r.name not in TRANSFORMERS:
            checks.append(f"size <= 30% of float: {_verdict(r.sizes['ours'] <= 0.3 * r.sizes['float'])}")
            checks.append(f"every quantized layer integer: {_verdict(r.integer_layers == r.quantized_layers)}")
            checks.append(f"BatchNorm folded: {_verdict(r.batchnorms_left == 0)}")
        top1 = r.top1_decisive in (None, 1)
        checks.append(f"agrees with PyTorch within one output step: {_verdict(r.max_steps <= 1 and top1)}")
        if r.max_steps > 1:
            checks.append(f"(PyTorch against itself: {r.pytorch_spread:.2f} steps)")
        lines.append(f"{r.name}: " + "; ".join(checks))
    return lines


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(zoo.ZOO), default=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=120)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--results", default=str(BENCH / "results.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as root:
        for name in args.models:
            folder = Path(root) / name
            folder.mkdir()
            results.append(measure(name, folder, args))
            print(f"{name}: measured ({time.perf_counter() - start:.0f} s)", flush=True)
    section = tables(results, args)
    write_section(Path(args.results), "deploy_zoo", section)
    print(section)
    print(f"written to {args.results}; total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
