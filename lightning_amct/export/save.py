"""``save_compressed``: finalize a compressed model and write every deployment artifact.

Call it once training is over, on the model ``compress_model`` or ``CompressionCallback``
compressed (it works on an untrained one too, and on a model ``load_compressed`` returned). The
model itself is not changed: a frozen copy is made (BatchNorm folded, masks baked in, weights in
integers), every artifact is built from that copy in memory, and then all files are written
together, all or nothing (:mod:`~lightning_amct.export.atomic`). Under DDP, call it on rank zero
only: it writes files and needs no other rank.

Example::

    model = DemoClassifier()
    compress_model(model, "recipes/quant.cfg", model.example_input_array)
    ...  # train
    paths = save_compressed(model, "export/")
    paths["deploy_onnx"]   # export/model_deploy_model.onnx
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from lightning_amct.export.atomic import ArtifactWriteError, directory_obstacle, write_files_atomically
from lightning_amct.export.checkpoint import DIGEST, FORMAT, VERSION, content_digest, encode_layer, input_specs
from lightning_amct.export.deploy import deploy_model
from lightning_amct.export.fake_quant_layer import FakeQuantLayer
from lightning_amct.export.freeze import FrozenModel, float_copy, freeze_model
from lightning_amct.export.onnx_export import DEFAULT_OPSET, INT4_OPSET, Exporter, export_onnx
from lightning_amct.export.ort_kernels import layer_kernels
from lightning_amct.export.record import build_record, original_out_channels
from lightning_amct.export.report import build_report, format_markdown
from lightning_amct.export.uncompiled import compiled_modules_unwrapped
from lightning_amct.graph import as_input_tuple, cpu_inputs
from lightning_amct.modules.apply import CompressionState, compression_state
from lightning_amct.training.divergence import check_finite, written_state

#: The artifacts, by key of the returned mapping, and their file name after the prefix.
ARTIFACTS = {
    "checkpoint": "_compressed.pt",
    "fake_quant_onnx": "_fake_quant_model.onnx",
    "deploy_onnx": "_deploy_model.onnx",
    "record": "_record.txt",
    "report_md": "_report.md",
    "report_json": "_report.json",
}


def save_compressed(
    model: nn.Module,
    output_dir: str | Path,
    example_inputs: object = None,
    prefix: str = "model",
    *,
    opset_version: int | None = None,
    exporter: Exporter = "auto",
) -> dict[str, Path]:
    """Write the compressed checkpoint, both ONNX models, the AMCT record and the report.

    Files, in ``output_dir`` (created if missing): ``<prefix>_compressed.pt``,
    ``<prefix>_fake_quant_model.onnx``, ``<prefix>_deploy_model.onnx``, ``<prefix>_record.txt``,
    ``<prefix>_report.md``, ``<prefix>_report.json``. Existing files of those names are replaced
    only when every new file has been written.

    Args:
        model: a compressed model (``compress_model``, ``CompressionCallback``, ``load_compressed``).
        output_dir: where to write.
        example_inputs: a tensor or tuple of tensors for the ONNX export and the FLOP count;
            default: the model's ``example_input_array``.
        prefix: file name prefix.
        opset_version: ONNX opset (at least 13). Default: 17, and 21 for a deploy model with INT4
            weights (the first opset with INT4 tensors); below 21 INT4 weights are stored as INT8.
            The dynamo-based exporter writes 18 at least.
        exporter: which of torch's ONNX exporters writes the models: ``"auto"`` (TorchScript, and
            the dynamo-based exporter for models TorchScript refuses), ``"torchscript"`` or
            ``"dynamo"`` (see :func:`~lightning_amct.export.export_onnx`).

    Returns:
        The paths written, by key: ``checkpoint``, ``fake_quant_onnx``, ``deploy_onnx``,
        ``record``, ``report_md``, ``report_json``.

    Raises:
        ValueError: the model is not compressed, or there are no example inputs.
        FloatingPointError: a weight, clip, scale or norm statistic is not finite (nan or inf).
        OnnxExportError: torch's exporters refused the model (the message gives their reasons).
        ArtifactWriteError: a file could not be written (the message names it); no file under a
            final name was changed.
    """
    check_prefix(prefix)
    with compiled_modules_unwrapped(model) as uncompiled:
        return _save(uncompiled, output_dir, example_inputs, prefix, opset_version, exporter)


def check_prefix(prefix: str) -> None:
    """Refuse an artifact file name prefix that is empty or holds a path separator (``a/b``
    would write into a folder of ``output_dir``).

    Raises:
        ValueError: says so.
    """
    if not prefix or any(sep in prefix for sep in ("/", "\\")):
        raise ValueError(f"prefix must be a non-empty file name part without path separators, got {prefix!r}")


def _save(
    model: nn.Module,
    output_dir: str | Path,
    example_inputs: object,
    prefix: str,
    opset_version: int | None,
    exporter: Exporter,
) -> dict[str, Path]:
    state = compression_state(model)
    if state is None:
        raise ValueError(
            f"{type(model).__name__} is not compressed: compress it with compress_model(...) or "
            "CompressionCallback before save_compressed"
        )
    check_finite(written_state(model), "the artifacts", None)
    obstacle = directory_obstacle(output_dir)
    if obstacle is not None:  # before the exports, not after them
        raise ArtifactWriteError(f"cannot write into {output_dir}: {obstacle}")
    inputs = _example_inputs(model, example_inputs)
    frozen = freeze_model(model, inputs)
    plain = float_copy(model)
    notes = list(frozen.notes)
    if frozen.outputs:
        notes.append(
            "the output quantizers are in the checkpoint and the ONNX models, not in the AMCT record "
            "(its schema records layer inputs only)"
        )

    weight_bits = {f"{name}.layer.weight": d.weight_bits for name, d in frozen.layers.items() if d.weight_bits}
    fake_quant = export_onnx(frozen.module, inputs, opset_version or DEFAULT_OPSET, exporter)
    deploy = deploy_model(fake_quant, weight_bits, opset_version)
    weights = {f"{name}.layer.weight": name for name, data in frozen.layers.items() if data.weight_int is not None}
    kernels = layer_kernels(deploy, weights)
    if 4 in weight_bits.values() and opset_version is not None and opset_version < INT4_OPSET:
        notes.append(f"opset {opset_version} has no INT4 tensors: INT4 weights are stored as INT8 in the deploy model")

    kept = state.kept_rows
    contents = {
        "checkpoint": _serialize(_checkpoint(model, state, frozen, inputs)),
        "fake_quant_onnx": fake_quant.SerializeToString(),
        "deploy_onnx": deploy.SerializeToString(),
        "record": build_record(frozen.layers, kept, original_out_channels(state.prune_report)).encode(),
    }
    directory = Path(output_dir)
    paths = {key: directory / f"{prefix}{suffix}" for key, suffix in ARTIFACTS.items()}
    sizes = {paths[key].name: len(data) for key, data in contents.items()}
    float_bytes = _float_bytes(plain)
    if 4 in weight_bits.values():
        share = sizes[paths["deploy_onnx"].name] / float_bytes
        notes.append(
            f"INT4 weights make the deploy model {share:.0%} of the float state_dict, but ONNX Runtime has no INT4 "
            "convolution kernel: it runs those layers on dequantized float weights, slower than the float model"
        )
    report = build_report(
        plain, inputs, frozen.layers, state.prune_report, sizes, float_bytes, notes, frozen.outputs, kernels,
        state.plan.gates,
    )
    contents["report_json"] = json.dumps(report, indent=2).encode()
    contents["report_md"] = format_markdown(report, f"Compressed {type(model).__name__}").encode()
    write_files_atomically({paths[key]: data for key, data in contents.items()})
    return paths


def _example_inputs(model: nn.Module, example_inputs: object) -> tuple:
    if example_inputs is None:
        example_inputs = getattr(model, "example_input_array", None)
    inputs = as_input_tuple(example_inputs)
    if not inputs:
        raise ValueError(
            "save_compressed needs example inputs for the ONNX export: pass example_inputs or set "
            "the model's example_input_array"
        )
    return cpu_inputs(inputs)


def _checkpoint(model: nn.Module, state: CompressionState, frozen: FrozenModel, inputs: tuple) -> dict:
    """The checkpoint's plain data (see :mod:`~lightning_amct.export.checkpoint`)."""
    frozen_prefixes = tuple(f"{name}." for name, m in frozen.module.named_modules() if isinstance(m, FakeQuantLayer))
    float_state = {k: v for k, v in frozen.module.state_dict().items() if not k.startswith(frozen_prefixes)}
    checkpoint = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "example_inputs": input_specs(inputs),
        "compression": state.to_record(),
        "layers": {name: encode_layer(data) for name, data in frozen.layers.items()},
        "folded_batchnorms": frozen.folded_batchnorms,
        "outputs": {site: asdict(grid) for site, grid in frozen.outputs.items()},
        "float_state": float_state,
    }
    checkpoint[DIGEST] = content_digest(checkpoint)
    return checkpoint


def _serialize(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _float_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())``: the float baseline of the size ratios."""
    return len(_serialize(model.state_dict()))
