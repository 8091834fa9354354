"""What the summary compares: parameters, non-zero weights, FLOPs, bytes and ONNX Runtime latency.

Parameters and FLOPs come from :func:`lightning_amct.prune.report.model_stats` (FLOPs as
``torch.utils.flop_counter`` counts them for one forward of the example input: dense, so 4:2
sparsity shows in the non-zero weights, not in the FLOPs). Latency is the median wall time of
ONNX Runtime's CPU provider on one batch, after warm-up runs, with the same session options for
every model, so the float and the deployed ONNX compare fairly.

Example:
    >>> import torch
    >>> numbers = measure_model(torch.nn.Linear(4, 2), torch.zeros(1, 4))
    >>> numbers.params, numbers.nonzero_weights, numbers.flops
    (10, 8, 16)
"""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from lightning_amct.export.onnx_export import export_onnx
from lightning_amct.graph import as_input_tuple
from lightning_amct.modules.compressed_layers import CompressedLayer
from lightning_amct.prune.report import model_stats

WARMUP_RUNS = 5


@dataclass(frozen=True)
class ModelNumbers:
    """Size and cost of a model as it is now.

    Attributes:
        params: all parameters (dense count).
        nonzero_weights: non-zero entries of the layers' weights, 4:2 masks applied.
        flops: FLOPs of one forward of the example input.
        stats: the per-layer figures of :func:`~lightning_amct.prune.report.model_stats`.
    """

    params: int
    nonzero_weights: int
    flops: int
    stats: dict[str, Any]


def measure_model(model: nn.Module, example_inputs: object) -> ModelNumbers:
    """Count ``model``'s parameters, non-zero weights and FLOPs (one eval forward, no gradients)."""
    masks = {
        name: module.weight_mask
        for name, module in model.named_modules()
        if isinstance(module, CompressedLayer) and module.weight_mask is not None
    }
    stats = model_stats(model, example_inputs, masks)
    layers = stats["layers"].values()
    nonzero = sum(layer["weights"] - layer["zeros"] for layer in layers)
    return ModelNumbers(stats["params"], nonzero, stats["flops"], stats)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the float weights as PyTorch stores them."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def save_float_onnx(model: nn.Module, example_inputs: object, path: Path) -> Path:
    """Export the float ``model`` to ``path`` with the exporter the compressed models use."""
    was_training = model.training
    model.eval()
    try:
        onnx.save(export_onnx(model, example_inputs), str(path))
    finally:
        model.train(was_training)
    return path


def onnx_latency(path: Path, example_inputs: object, batch_size: int, runs: int) -> float:
    """Median seconds of one ONNX Runtime CPU run on a batch of ``batch_size`` random inputs.

    Args:
        path: the ONNX model (its inputs in the order of ``example_inputs``, batch axis dynamic).
        example_inputs: a tensor or tuple of tensors; their shapes past the batch axis and their
            dtypes shape the random batch.
        batch_size: samples per run.
        runs: timed runs (after :data:`WARMUP_RUNS` untimed ones).
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {
        spec.name: rng.random((batch_size, *tensor.shape[1:])).astype(tensor.detach().cpu().numpy().dtype)
        for spec, tensor in zip(session.get_inputs(), as_input_tuple(example_inputs))
    }
    for _ in range(WARMUP_RUNS):
        session.run(None, feed)
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)
