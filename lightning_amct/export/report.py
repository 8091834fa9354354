"""The export report: what each layer became, and what the artifacts weigh against float.

:func:`build_report` gathers plain data (written as ``<prefix>_report.json``);
:func:`format_markdown` renders it (``<prefix>_report.md``). Per layer with parameters: type,
output/input channels (and the output channels before channel pruning), parameters and FLOPs (of
one forward on the example inputs, as :func:`lightning_amct.prune.model_stats` counts them),
activation bits with the final clips and grid, weight bits, the folded BatchNorm, the share of
stored weights that are zero (``sparsity``: 4:2-masked, or integer weights that round to 0); the
output quantizers (``quantize_outputs``) with their clips, and the gates on the fixed grid of
``[0, 1]``; the kernel ONNX Runtime runs each
quantized layer of the deploy model with, and the layers better left float in deployment (those
it computes in float anyway, see :mod:`~lightning_amct.export.ort_kernels`). Then the file sizes
of the artifacts next to the float ``state_dict`` of the same architecture, and the notes gathered
on the way (BatchNorms left unfolded and why, layers stored dense...).

Example:
    >>> import torch
    >>> from torch import nn
    >>> report = build_report(nn.Sequential(nn.Linear(4, 2)), torch.zeros(1, 4), {}, None, {"model.pt": 100}, 400, [])
    >>> report["layers"][0]["params"], report["files"]["model.pt"]["ratio_to_float"]
    (10, 0.25)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from torch import nn

from lightning_amct.export.integer import ActivationGrid, IntegerLayer
from lightning_amct.export.ort_kernels import LayerKernel
from lightning_amct.export.record import original_out_channels
from lightning_amct.prune import model_stats


def build_report(
    float_model: nn.Module,
    example_inputs: object,
    layers: Mapping[str, IntegerLayer],
    prune_report: list[Mapping[str, Any]] | None,
    file_sizes: Mapping[str, int],
    float_state_dict_bytes: int,
    notes: list[str],
    outputs: Mapping[str, ActivationGrid] | None = None,
    kernels: Mapping[str, LayerKernel] | None = None,
    gates: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The report as plain data.

    Args:
        float_model: the compressed architecture in plain float layers (``float_copy``).
        example_inputs: inputs for one forward (FLOPs are for this batch).
        layers: integer forms of the compressed layers.
        prune_report: rows of channel pruning's report (for the channels before pruning), or None.
        file_sizes: artifact file name -> bytes.
        float_state_dict_bytes: size of the float model's saved ``state_dict``.
        notes: remarks to list.
        outputs: grids of the output quantizers, by the module they follow.
        kernels: how ONNX Runtime runs each quantized layer of the deploy model.
        gates: the gate sites, module → function of its gate value (:mod:`~lightning_amct.plan.gates`).
    """
    stats = model_stats(float_model, example_inputs)
    before = original_out_channels(prune_report)
    kernels = kernels or {}
    rows = [
        _layer_row(name, entry, layers.get(name), before.get(name), kernels.get(name))
        for name, entry in stats["layers"].items()
    ]
    files = {
        name: {"bytes": size, "ratio_to_float": round(size / float_state_dict_bytes, 4)}
        for name, size in file_sizes.items()
    }
    return {
        "layers": rows,
        "totals": {"params": stats["params"], "flops": stats["flops"]},
        "float_state_dict_bytes": float_state_dict_bytes,
        "outputs": [{"module": site, **asdict(grid)} for site, grid in (outputs or {}).items()],
        "gates": [{"module": site, "function": function} for site, function in (gates or {}).items()],
        "float_in_deployment": [
            {"layer": name, "operator": kernel.operator, "reason": kernel.float_reason}
            for name, kernel in kernels.items()
            if not kernel.integer
        ],
        "files": files,
        "notes": list(notes),
    }


def _layer_row(
    name: str, stats: Mapping[str, Any], data: IntegerLayer | None, out_before: int | None, kernel: LayerKernel | None
) -> dict:
    row: dict[str, Any] = {
        "layer": name,
        "type": stats["type"],
        "out": stats["out"],
        "out_before_pruning": out_before,
        "in": stats["in"],
        "params": stats["params"],
        "flops": stats["flops"],
        "sparsity": stats["zeros"] / stats["weights"] if stats["weights"] else 0.0,
        "act_bits": None,
        "clip_max": None,
        "clip_min": None,
        "act_scale": None,
        "act_offset": None,
        "weight_bits": None,
        "weight_scales": None,
        "folded_batchnorm": None,
        "ort_kernel": kernel.operator if kernel is not None else None,
    }
    if data is not None:
        row.update(sparsity=data.sparsity(), weight_bits=data.weight_bits, folded_batchnorm=data.folded_batchnorm)
        if data.weight_scale is not None:
            row["weight_scales"] = data.weight_scale.numel()
        if data.activation is not None:
            grid = data.activation
            row.update(act_bits=grid.bits, clip_max=grid.clip_max, clip_min=grid.clip_min,
                       act_scale=grid.scale, act_offset=grid.offset)  # fmt: skip
    return row


_COLUMNS = (
    ("layer", "layer"), ("type", "type"), ("out", "out"), ("in", "in"), ("params", "params"), ("FLOPs", "flops"),
    ("act", "act_bits"), ("clip_max", "clip_max"), ("clip_min", "clip_min"), ("weight", "weight_bits"),
    ("zero weights", "sparsity"), ("folded BN", "folded_batchnorm"), ("ONNX Runtime", "ort_kernel"),
)  # fmt: skip


_ZERO_WEIGHTS = (
    "zero weights: share of a layer's stored weights that are exactly 0 (`sparsity` in the JSON): weights "
    "the 4:2 masks removed and, for integer weights, those that round to 0. The run summary's non-zero "
    "weights are counted before rounding."
)


def format_markdown(report: Mapping[str, Any], title: str) -> str:
    """The report as Markdown: a layer table, a file table, the notes."""
    lines = [f"# {title}", "", "## Layers", ""]
    lines.append("| " + " | ".join(header for header, _ in _COLUMNS) + " |")
    lines.append("|" + "---|" * len(_COLUMNS))
    for row in report["layers"]:
        lines.append("| " + " | ".join(_cell(key, row) for _, key in _COLUMNS) + " |")
    totals = report["totals"]
    total = f"Total: {totals['params']:,} parameters, {totals['flops']:,} FLOPs per forward on the example inputs."
    lines += ["", total, "", _ZERO_WEIGHTS]
    if report["outputs"]:
        lines += ["", "## Output quantizers", "", "| output of | act | clip_max | clip_min |", "|---|---|---|---|"]
        for row in report["outputs"]:
            lines.append(f"| {row['module']} | INT{row['bits']} | {row['clip_max']:.4g} | {row['clip_min']:.4g} |")
    if report["gates"]:
        lines += ["", "## Gates", "", _GATES, "", "| module | gate value |", "|---|---|"]
        lines += [f"| {row['module']} | {row['function']} |" for row in report["gates"]]
    if report["float_in_deployment"]:
        lines += ["", "## Better left float in deployment", "", _FLOAT_IN_DEPLOYMENT, ""]
        for row in report["float_in_deployment"]:
            lines.append(f"- `{row['layer']}` ({row['operator']}): {row['reason']}")
    lines += ["", "## Files", "", "| file | bytes | of the float state_dict |", "|---|---|---|"]
    lines.append(f"| float `state_dict` (same architecture) | {report['float_state_dict_bytes']:,} | 100% |")
    for name, size in report["files"].items():
        lines.append(f"| `{name}` | {size['bytes']:,} | {size['ratio_to_float']:.1%} |")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


_GATES = (
    "The gate value of these modules (a sigmoid or hard sigmoid, or the sigmoid a SiLU multiplies its input by) "
    "is on the fixed INT8 grid of [0, 1] (UINT8, zero point 0, scale 1/255 in the deploy model), in training "
    "and deployment alike."
)
_FLOAT_IN_DEPLOYMENT = (
    "ONNX Runtime computes these quantized layers in float on dequantized values: their quantization "
    "costs accuracy and a dequantize of the weight at every run, and saves only file size. Unless "
    "file size is what matters, leave them float in deployment (`quant_skip_layers`), or remove the reason "
    "each line gives."
)


def _cell(key: str, row: Mapping[str, Any]) -> str:
    value = row[key]
    if value is None:
        return "-"
    if key == "out" and row["out_before_pruning"] not in (None, value):
        return f"{row['out_before_pruning']} → {value}"
    if key in ("act_bits", "weight_bits"):
        return f"INT{value}"
    if key == "sparsity":
        return f"{value:.1%}"
    if key in ("clip_max", "clip_min"):
        return f"{value:.4g}"
    if key in ("params", "flops"):
        return f"{value:,}"
    return str(value)
