"""What the summary compares: parameters, non-zero weights, FLOPs, bytes and ONNX Runtime latency.

Parameters and FLOPs come from :func:`lightning_amct.prune.report.model_stats` (FLOPs as
``torch.utils.flop_counter`` counts them for one forward of the example input: dense, so 4:2
sparsity shows in the non-zero weights, not in the FLOPs). Latency is the median time of ONNX
Runtime's CPU provider on one batch, after warm-up runs, with the same session options for every
model, the models taking turns run by run and their idle threads not spinning. With one intra-op
thread (the recipes' default) ONNX Runtime computes on the calling thread, and the time is that
thread's CPU time: what a run costs on a core of its own, whatever else the machine runs (wall
time would add the time other processes hold the core, and on a busy machine shrink the ratio
towards 1). With more threads it is wall time.

Example:
    >>> import torch
    >>> numbers = measure_model(torch.nn.Linear(4, 2), torch.zeros(1, 4))
    >>> numbers.params, numbers.nonzero_weights, numbers.flops_per_sample
    (10, 8, 16.0)
"""

from __future__ import annotations

import functools
import io
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from torch.utils import _pytree as pytree

from lightning_amct.export.atomic import write_files_atomically
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
        flops_per_sample: FLOPs of one forward of the example input, per sample of its batch.
        stats: the per-layer figures of :func:`~lightning_amct.prune.report.model_stats`.
    """

    params: int
    nonzero_weights: int
    flops_per_sample: float
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
    samples = pytree.tree_leaves(as_input_tuple(example_inputs))[0].shape[0]
    return ModelNumbers(stats["params"], nonzero, stats["flops"] / samples, stats)


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
        write_files_atomically({Path(path): export_onnx(model, example_inputs).SerializeToString()})
    finally:
        model.train(was_training)
    return path


def onnx_latencies(
    paths: Mapping[str, Path], example_inputs: object, batch_size: int, runs: int, threads: int = 1
) -> dict[str, float]:
    """Median seconds of one ONNX Runtime CPU run of each model on the same random batch.

    The models take turns run by run (:func:`medians_in_turns`). One thread is timed by its CPU
    time, more threads by wall time (see the module docstring).

    Args:
        paths: name → ONNX model (inputs: the tensors of ``example_inputs`` in order, batch axis
            dynamic; see :mod:`~lightning_amct.export.flat_io`).
        example_inputs: a tensor or tuple of inputs (a dict of tensors too); the tensors' shapes
            past the batch axis and their dtypes shape the random batch.
        batch_size: samples per run.
        runs: timed runs of each model (after :data:`WARMUP_RUNS` untimed ones).
        threads: intra-op threads of every session; 0 for ONNX Runtime's default (one per core).
    """
    rng = np.random.default_rng(0)
    batch = [
        rng.random((batch_size, *tensor.shape[1:])).astype(tensor.detach().cpu().numpy().dtype)
        for tensor in pytree.tree_leaves(as_input_tuple(example_inputs))
    ]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    clock = time.thread_time if threads == 1 else time.perf_counter
    # Idle threads of one session must not spin while the next one runs: they would slow it down.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in paths.items()
    }
    feeds = {name: {spec.name: x for spec, x in zip(s.get_inputs(), batch)} for name, s in sessions.items()}
    calls = {name: functools.partial(session.run, None, feeds[name]) for name, session in sessions.items()}
    return medians_in_turns(calls, WARMUP_RUNS, runs, clock)


def medians_in_turns(
    calls: Mapping[str, Callable[[], object]], warmup: int, repeats: int, clock: Callable[[], float] = time.perf_counter
) -> dict[str, float]:
    """Median seconds of each call, the calls taking turns call by call.

    The order reverses every round, so a change in machine load, and whatever one call leaves in
    the caches for the next, hits all of them alike; ``warmup`` rounds come first, untimed.
    """
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for index in range(warmup + repeats):
        for name in order if index % 2 else reversed(order):
            start = clock()
            calls[name]()
            if index >= warmup:
                seconds[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}
