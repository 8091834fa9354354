"""The fake-quant ONNX model: a frozen model exported with QuantizeLinear/DequantizeLinear pairs.

The frozen model's layers compute with ``torch.fake_quantize_per_tensor_affine`` and
``..._per_channel_affine``, which both of torch's ONNX exporters write as QuantizeLinear/
DequantizeLinear pairs on each quantized layer's input and weight (float weights stored). Opset 13
is the least that carries per-channel weight scales; INT4 weight initializers in the deploy model
need opset 21. The batch axis of every input and output is dynamic.

Two exporters, chosen by ``exporter``:

* ``"torchscript"`` (``dynamo=False``) traces the model: fast (a tenth of a second for a small
  CNN), and it writes ``GlobalAveragePool`` for an adaptive average pool to one pixel, which ONNX
  Runtime runs in integers. It refuses some model code: ``aten::diff`` in GPT-2's position ids, say.
* ``"dynamo"`` captures the graph with ``torch.export`` (non-strict) first: it takes what model
  libraries write today, and a few seconds per model. torch has no shape functions for the
  fake-quant operators under a symbolic batch size; :func:`export_onnx` registers them (they only
  say that the output has the input's shape) before the first such export.
* ``"auto"`` (the default): TorchScript, and the dynamo-based exporter where TorchScript refuses
  the model (without the dump of the whole graph that torch prints on a refusal) or writes one
  that ONNX Runtime cannot load or run on the example inputs.

The dynamo-based exporter's debugging metadata on every node (stack traces, module paths) is left
out of the model.

What the graph computes from sizes that do not change (TF-style pad amounts) is written down as
constants, and an average pool over its whole input as a global one
(:mod:`~lightning_amct.export.static_shapes`).

The model is serialised in memory, so it must stay below protobuf's 2 GiB.

Example:
    >>> import torch
    >>> from torch import nn
    >>> proto = export_onnx(nn.Sequential(nn.Linear(4, 2)), torch.zeros(1, 4), opset_version=17)
    >>> [n.op_type for n in proto.graph.node], proto.graph.input[0].name
    (['Gemm'], 'input')
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Literal

import onnx
import onnxruntime as ort
import torch
from onnx import version_converter
from torch import nn

from lightning_amct.export.flat_io import flat_io
from lightning_amct.export.static_shapes import settle_static_shapes
from lightning_amct.graph import as_input_tuple

#: Opset of the exported models unless asked otherwise: per-channel Q/DQ (13) and current ops.
DEFAULT_OPSET = 17
#: First opset with INT4 tensors (QuantizeLinear/DequantizeLinear on INT4).
INT4_OPSET = 21
#: Newest opset the TorchScript-based exporter writes; newer ones are reached with onnx's converter.
_TORCHSCRIPT_MAX_OPSET = 20
#: Oldest opset the dynamo-based exporter writes.
_DYNAMO_MIN_OPSET = 18

Exporter = Literal["auto", "torchscript", "dynamo"]
EXPORTERS = ("auto", "torchscript", "dynamo")


class OnnxExportError(RuntimeError):
    """No exporter could export the model (the message gives each one's reason)."""


def export_onnx(
    module: nn.Module, example_inputs: object, opset_version: int = DEFAULT_OPSET, exporter: Exporter = "auto"
) -> onnx.ModelProto:
    """Export ``module`` (eval mode, CPU) to an ONNX model with a dynamic batch axis.

    Args:
        module: the model to export (a frozen model for the fake-quant ONNX).
        example_inputs: a tensor or a tuple of inputs for tracing, each a tensor or a dict, list
            or tuple of tensors (:mod:`~lightning_amct.export.flat_io`).
        opset_version: ONNX opset, at least 13; the dynamo-based exporter writes 18 at least (onnx's
            converter cannot take every operator it writes down to 17). Opsets above 20 are reached
            with ``onnx.version_converter``.
        exporter: ``"auto"``, ``"torchscript"`` or ``"dynamo"`` (see the module's description).

    Returns:
        The ONNX model; inputs are named ``input`` (``input_0``, ``input_1``... when several),
        outputs ``output`` (or ``output_0``...); the tensors of a dict by its keys
        (:mod:`~lightning_amct.export.flat_io`).

    Raises:
        ValueError: ``opset_version`` below 13, an unknown ``exporter``, or an input or output
            that is not a tensor.
        OnnxExportError: the exporter (with ``"auto"``: both) refused the model.
    """
    if opset_version < 13:
        raise ValueError(f"opset_version must be >= 13 for per-channel QuantizeLinear, got {opset_version}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    refusals = []
    with flat_io(module, as_input_tuple(example_inputs)) as (inputs, names):
        for name, export in (("torchscript", _export_torchscript), ("dynamo", _export_dynamo)):
            if exporter not in ("auto", name):
                continue
            try:
                model = export(module, inputs, opset_version, names)
                settle_static_shapes(model, inputs)
                if exporter == "auto" and name == "torchscript":
                    _check_runs(model, inputs)
            except Exception as exc:  # the exporters raise many types; the message keeps each reason
                refusals.append(f"{name} exporter: {_reason(exc)}")
                continue
            return model if opset_of(model) >= opset_version else convert_opset(model, opset_version)
    raise OnnxExportError(f"cannot export {type(module).__name__} to ONNX ({'; '.join(refusals)})")


def _export_torchscript(module: nn.Module, inputs: tuple, opset_version: int, names: dict) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with _without_graph_dump(), warnings.catch_warnings():
        # The TorchScript-based exporter announces its deprecation, and warns of Python values
        # it records as constants (shapes other than the batch size: fixed in the model anyway).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            inputs,
            buffer,
            dynamo=False,
            opset_version=min(opset_version, _TORCHSCRIPT_MAX_OPSET),
            dynamic_axes={name: {0: "batch"} for name in (*names["input_names"], *names["output_names"])},
            **names,
        )
    return onnx.load_model_from_string(buffer.getvalue())


def _export_dynamo(module: nn.Module, inputs: tuple, opset_version: int, names: dict) -> onnx.ModelProto:
    _fake_quant_shape_functions()
    # torch.export specialises a batch size of 1 to a constant: trace with two samples.
    inputs = tuple(x.expand(2, *x.shape[1:]).contiguous() if x.ndim and x.shape[0] == 1 else x for x in inputs)
    batch = torch.export.Dim("batch")
    with _quiet_loggers("torch.onnx", "onnxscript"), warnings.catch_warnings(), torch.no_grad():
        # not their notes on torchvision's operators and on constants they could not fold
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            inputs,
            dynamo=True,
            opset_version=max(opset_version, _DYNAMO_MIN_OPSET),
            dynamic_shapes=_batch_axes(module, len(inputs), batch),
            verbose=False,
            **names,
        )
    return _without_debug_metadata(program.model_proto)


def _without_debug_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the metadata the dynamo-based exporter writes on every node.

    Each node carries its Python stack trace, module path and FX node (about 1 KB a node, with
    the exporting machine's source paths): 45 % of a Llama's INT8 deploy model. ONNX Runtime
    reads none of it, so the artifacts leave it out.
    """
    pending = [model.graph.node, *(function.node for function in model.functions)]
    while pending:
        for node in pending.pop():
            del node.metadata_props[:]
            for attribute in node.attribute:  # the bodies of If, Loop and Scan
                pending += [graph.node for graph in (*attribute.graphs, attribute.g) if graph.node]
    return model


def _batch_axes(module: nn.Module, count: int, batch: torch.export.Dim) -> tuple:
    """``dynamic_shapes`` for ``count`` positional inputs, each with ``batch`` as its first axis, in
    the structure of ``module.forward``'s parameters: the inputs that a ``*args`` parameter takes
    are one tuple there."""
    axes: list = [{0: batch}] * count
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for index, parameter in enumerate(inspect.signature(module.forward).parameters.values()):
        if parameter.kind == inspect.Parameter.VAR_POSITIONAL:
            return (*axes[:index], tuple(axes[index:]))
        if parameter.kind not in positional or index >= count:
            break
    return tuple(axes)


#: How torch's TorchScript-based exporter starts the graph it prints when it refuses a model.
_GRAPH_DUMP = b"Torch IR graph at exception:"


@contextlib.contextmanager
def _without_graph_dump() -> Iterator[None]:
    """The process's standard output (file descriptor 1) as the block wrote it, less the graph dump
    of a refused TorchScript export.

    When the TorchScript-based exporter refuses a model, torch prints the whole TorchScript graph
    to the native standard output before raising (some 270 lines for GPT-2; torch leaves its ONNX
    log switched on after its first export). :func:`export_onnx` keeps the refusal's reason in one
    line and tries the dynamo-based exporter, so the dump is only noise in a training log. The
    output is held in a temporary file while the block runs and written out afterwards, cut where
    the dump begins; where file descriptor 1 cannot be duplicated, nothing is held.
    """
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            held.seek(0)
            text = held.read().partition(_GRAPH_DUMP)[0]
            while text:
                text = text[os.write(1, text) :]


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from the named loggers (and their children) while the block runs."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@functools.cache
def _fake_quant_shape_functions() -> torch.library.Library:
    """Give torch's fake-quant operators the shape functions ``torch.export`` needs for a symbolic
    batch size (without them it runs the operator on concrete tensors, which a symbolic shape has not).

    Each says only that the output, and the mask of values inside the range, have the input's shape.
    An operator torch already gives one keeps its own.
    """
    library = torch.library.Library("aten", "IMPL")
    for name in (
        "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
        "fake_quantize_per_tensor_affine_cachemask",
        "fake_quantize_per_channel_affine_cachemask",
    ):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{name}", "Meta"):
            library.impl(name, _output_and_mask_like_input, "Meta")
    return library  # the registrations last as long as the library object: the cache keeps it


def _output_and_mask_like_input(x: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def _check_runs(model: onnx.ModelProto, inputs: tuple) -> None:
    """Raise where ONNX Runtime cannot load ``model`` or run it on ``inputs``: the TorchScript-based
    exporter writes some models that way without a word (PatchTST's positional encoding fails
    ONNX Runtime's shape inference; Mamba's ``Tile`` fails when it runs)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: its report of a failure is the exception
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.run(None, {value.name: x.detach().cpu().numpy() for value, x in zip(session.get_inputs(), inputs)})


#: Terminal colour codes, which the dynamo-based exporter's messages carry.
_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def _reason(exc: BaseException) -> str:
    """``"Type: first line"`` of the innermost exception that ``exc`` was raised from: the
    dynamo-based exporter wraps the operator it has no function for in a page of advice."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in _COLOURS.sub("", str(exc)).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else '(no message)'}"


def convert_opset(model: onnx.ModelProto, opset_version: int) -> onnx.ModelProto:
    """``model`` at ``opset_version`` (unchanged if it is there already)."""
    if opset_of(model) == opset_version:
        return model
    return version_converter.convert_version(model, opset_version)


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset of ``model``."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
