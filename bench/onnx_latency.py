"""Is the deploy ONNX faster? ONNX Runtime CPU latency of float, INT8 and channel-pruned + INT8.

For the demo model (1x8x8 digits) and :func:`models.resnet_style` (3x32x32), in one run:

* float: the model exported as it is;
* INT8: compressed with INT8 activations and per-channel INT8 weights on every conv and Linear,
  clips calibrated (IFMR) on two batches, then ``save_compressed``'s deploy model;
* pruned + INT8: the same after channel pruning (BCP, ``prune_ratio``, ``ascend_optimized``).

Each is timed in ONNX Runtime's CPU provider with ``intra_op_num_threads`` threads (not spinning
while idle) at batch 1 and batch 64: warm-up runs, then the median of timed runs, the models taking
turns run by run (in balanced orders, see :func:`balanced_orders`) so that a change in machine
load hits all of them alike. Prints milliseconds and
speedups over float, then how many layers ONNX Runtime runs with integer kernels.

Usage (from the repository root)::

    python bench/onnx_latency.py [--threads 2] [--repeats 30] [--prune-ratio 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from models import resnet_style
from torch import nn

from lightning_amct import compress_model
from lightning_amct.demo import DemoNet
from lightning_amct.export import export_onnx, save_compressed

INT8 = """
retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
retrain_weight_quant_config { arq_retrain { channel_wise: true dst_type: INT8 } }
"""
PRUNE = (
    "prune_config {{ filter_pruner {{ balanced_l2_norm_filter_prune {{ "
    "prune_ratio: {ratio} ascend_optimized: true }} }} }}"
)
BATCHES = (1, 64)
_LABELS = {"int8": "INT8 ms", "inputs only": "INT8 inputs-only ms", "pruned": "pruned+INT8 ms"}


def deploy_onnx(
    make: Callable[[], nn.Module], shape: tuple[int, ...], config: str, folder: Path, quantize_outputs: bool
) -> Path:
    """Compress a fresh model, calibrate its clips on two random batches, return its deploy ONNX."""
    torch.manual_seed(0)
    model = make()
    example = torch.randn(1, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_model(model, config, example, quantize_outputs=quantize_outputs)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(64, *shape).relu())
    return save_compressed(model.eval(), folder, example)["deploy_onnx"]


def float_onnx(make: Callable[[], nn.Module], shape: tuple[int, ...], folder: Path) -> Path:
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "float.onnx"
    onnx.save(export_onnx(make().eval(), torch.randn(1, *shape)), str(path))
    return path


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle threads must not spin: the sessions take turns, and a spinning pool would slow the next one.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def balanced_orders(count: int) -> list[list[int]]:
    """Orders of ``count`` models in which each model follows every other equally often.

    The model that runs right after another one starts slower, and more so after a large one:
    here a float model's 44 MB of weights leave the next model up to 10 % slower for several
    runs. With one fixed order, the model after the float one would pay that every time. These
    rows are a Williams design (for an odd count, each row and its reverse).

    Example:
        >>> balanced_orders(4)
        [[0, 1, 3, 2], [1, 2, 0, 3], [2, 3, 1, 0], [3, 0, 2, 1]]
    """
    first = [0]
    for step in range(1, count):
        first.append((step + 1) // 2 if step % 2 else count - step // 2)
    rows = [[(index + shift) % count for index in first] for shift in range(count)]
    return rows if count % 2 == 0 else rows + [row[::-1] for row in rows]


def median_latencies(paths: dict[str, Path], batch: np.ndarray, threads: int, repeats: int) -> dict[str, float]:
    """Median seconds of one run per model, after warm-up, models taking turns in balanced orders.

    ``repeats`` is rounded up to a multiple of the number of orders.
    """
    sessions = {name: session(path, threads) for name, path in paths.items()}
    names = list(sessions)
    orders = balanced_orders(len(names))
    times: dict[str, list[float]] = {name: [] for name in paths}
    warmup = 5
    rounds = -(-repeats // len(orders)) * len(orders)  # every order equally often
    for step in range(-warmup, rounds):
        for index in orders[step % len(orders)]:
            name = names[index]
            start = time.perf_counter()
            sessions[name].run(None, {"input": batch})
            if step >= 0:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def fused_kernels(path: Path, threads: int) -> str:
    """How many layers ONNX Runtime runs with integer kernels (QLinearConv, QGemm...) vs float."""
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # not the warning that an optimized model is hardware specific
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    integer = sum(op in ("QLinearConv", "QGemm", "QLinearMatMul") for op in ops)
    floating = sum(op in ("Conv", "FusedConv", "Gemm", "MatMul", "FusedGemm") for op in ops)
    return f"{integer} integer / {floating} float layers"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--prune-ratio", type=float, default=0.5)
    args = parser.parse_args()
    models = {
        "demo (1x8x8)": (DemoNet, (1, 8, 8)),
        "resnet_style (3x32x32)": (resnet_style, (3, 32, 32)),
    }
    prune_int8 = PRUNE.format(ratio=args.prune_ratio) + INT8
    # name: (config, quantize_outputs)
    variants = {"int8": (INT8, True), "inputs only": (INT8, False), "pruned": (prune_int8, True)}
    print(f"ONNX Runtime {ort.__version__}, CPU, intra_op_num_threads={args.threads}, median of {args.repeats} runs")
    header = f"{'model':24} {'batch':>5} {'float ms':>9}" + "".join(f" {_LABELS[name]:>22}" for name in variants)
    print(header)
    print("-" * len(header))
    notes = []
    speedups = {}
    with tempfile.TemporaryDirectory() as root:
        for label, (make, shape) in models.items():
            folder = Path(root) / label.split()[0]
            paths = {"float": float_onnx(make, shape, folder)}
            for name, (config, outputs) in variants.items():
                paths[name] = deploy_onnx(make, shape, config, folder / name.replace(" ", "_"), outputs)
                notes.append(f"{label} {_LABELS[name]}: {fused_kernels(paths[name], args.threads)}")
            for batch_size in BATCHES:
                batch = np.random.default_rng(0).standard_normal((batch_size, *shape), dtype=np.float32)
                ms = {k: v * 1e3 for k, v in median_latencies(paths, batch, args.threads, args.repeats).items()}
                cells = "".join(f" {ms[name]:>12.3f} ({ms['float'] / ms[name]:.2f}x)" for name in variants)
                print(f"{label:24} {batch_size:>5} {ms['float']:>9.3f}{cells}")
                speedups[label, batch_size] = {name: ms["float"] / ms[name] for name in variants}
    print()
    print("\n".join(notes))
    print()
    print("targets (batch 64): INT8 deploy >= 1.5x float, pruned+INT8 faster again")
    for (label, batch_size), speedup in speedups.items():
        if batch_size != 64:
            continue
        int8_met = speedup["int8"] >= 1.5
        pruned_met = speedup["pruned"] > speedup["int8"]
        print(f"{label}: INT8 {speedup['int8']:.2f}x: {'met' if int8_met else 'MISSED'}; "
              f"pruned+INT8 {speedup['pruned']:.2f}x: {'met' if pruned_met else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
