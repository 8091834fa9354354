"""Per-layer numbers before and after compression: channels, parameters, FLOPs, sparsity.

Take :func:`model_stats` of the model before and after a change, then :func:`compare_stats` turns
the two into rows of plain data (one dict per layer, a ``"total"`` row last) that a checkpoint or a
JSON file can hold, and :func:`format_report` prints them as a table.

FLOPs are what :class:`torch.utils.flop_counter.FlopCounterMode` counts for one forward pass on
``example_inputs``: matrix multiplies and convolutions, 2 per multiply-add; elementwise ops,
normalisation and pooling count 0. Sparsity is the share of exactly-zero weight entries, after
applying a 4:2 mask where one is given.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> stats = model_stats(model, torch.zeros(1, 4))
    >>> rows = compare_stats(stats, stats)
    >>> rows[-1]["params_before"], rows[-1]["flops_before"]
    (58, 96)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_amct.graph import as_input_tuple

_COLUMNS = ("layer", "type", "out", "in", "params", "FLOPs", "params kept", "sparsity")


def _first_attribute(module: nn.Module, names: tuple[str, ...]) -> int | None:
    return next((getattr(module, name) for name in names if hasattr(module, name)), None)


def _channels(module: nn.Module) -> tuple[int | None, int | None]:
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1], module.normalized_shape[-1]
    out = _first_attribute(module, ("out_channels", "out_features", "nf", "num_features"))  # nf, nx: GPT-2's Conv1D
    return out, _first_attribute(module, ("in_channels", "in_features", "nx", "num_features"))


@torch.no_grad()
def _flops(model: nn.Module, example_inputs: object) -> tuple[dict[str, int], int]:
    # FlopCounterMode hooks the backward of every module input that needs a gradient, and a slice
    # of a Parameter taken under no_grad (DeBERTa's relative embeddings) needs one without having a
    # grad_fn, which that hook refuses: the parameters count frozen. torch's attention layers run
    # fused inference operators in eval mode without gradients, which the counter does not count:
    # here they run operator by operator, as in training
    counter = FlopCounterMode(display=False)
    was_training = model.training
    trained = [p for p in model.parameters() if p.requires_grad]
    fused_attention = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    try:
        for parameter in trained:
            parameter.requires_grad_(False)
        torch.backends.mha.set_fastpath_enabled(False)
        with counter:
            model(*as_input_tuple(example_inputs))
    finally:
        torch.backends.mha.set_fastpath_enabled(fused_attention)
        for parameter in trained:
            parameter.requires_grad_(True)
        model.train(was_training)
    prefix = type(model).__name__ + "."
    per_module = {
        name.removeprefix(prefix): sum(counts.values())
        for name, counts in counter.get_flop_counts().items()
        if name.startswith(prefix)
    }
    return per_module, counter.get_total_flops()


def model_stats(
    model: nn.Module, example_inputs: object, masks: Mapping[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Channels, parameters, FLOPs and zeros of every module that owns parameters.

    Args:
        model: the model, measured as it is now (run once in eval mode, without gradients).
        example_inputs: a tensor or tuple of tensors; FLOPs are for this batch.
        masks: optional 0/1 masks by module name, multiplied into the weight before counting zeros.

    Returns:
        ``{"layers": {name: {...}}, "params": int, "flops": int}``.
    """
    per_module, total_flops = _flops(model, example_inputs)
    masks = masks or {}
    layers = {}
    for name, module in model.named_modules():
        params = sum(p.numel() for p in module.parameters(recurse=False))
        if params == 0:
            continue
        weight = getattr(module, "weight", None)
        weight = weight.detach() * masks[name] if name in masks else weight
        out, inp = _channels(module)
        layers[name] = {
            "type": type(module).__name__,
            "out": out,
            "in": inp,
            "params": params,
            "flops": per_module.get(name, 0),
            "weights": weight.numel() if isinstance(weight, torch.Tensor) else 0,
            "zeros": int((weight == 0).sum()) if isinstance(weight, torch.Tensor) else 0,
        }
    return {"layers": layers, "params": sum(p.numel() for p in model.parameters()), "flops": total_flops}


def _row(name: str, kind: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "layer": name,
        "type": kind,
        "out_before": before.get("out"),
        "out_after": after.get("out"),
        "in_before": before.get("in"),
        "in_after": after.get("in"),
        "params_before": before["params"],
        "params_after": after["params"],
        "flops_before": before["flops"],
        "flops_after": after["flops"],
        "sparsity": after["zeros"] / after["weights"] if after["weights"] else 0.0,
    }


def compare_stats(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per layer of ``before`` (measured again in ``after``), and a ``"total"`` row last."""
    rows = [
        _row(name, stats["type"], stats, after["layers"][name])
        for name, stats in before["layers"].items()
        if name in after["layers"]
    ]
    zeros = sum(layer["zeros"] for layer in after["layers"].values())
    weights = sum(layer["weights"] for layer in after["layers"].values())
    totals_before = {"params": before["params"], "flops": before["flops"]}
    totals_after = {"params": after["params"], "flops": after["flops"], "zeros": zeros, "weights": weights}
    return [*rows, _row("total", "", totals_before, totals_after)]


def _human(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _change(before: object, after: object, human: bool = False) -> str:
    if before is None:
        return "-"
    text = _human if human else str
    return text(before) if before == after else f"{text(before)} -> {text(after)}"


def format_report(rows: list[Mapping[str, Any]]) -> str:
    """The rows of :func:`compare_stats` as an aligned text table."""
    table = [list(_COLUMNS)]
    for row in rows:
        kept = row["params_after"] / row["params_before"] if row["params_before"] else 1.0
        table.append([
            row["layer"],
            row["type"],
            _change(row["out_before"], row["out_after"]),
            _change(row["in_before"], row["in_after"]),
            _change(row["params_before"], row["params_after"], human=True),
            _change(row["flops_before"], row["flops_after"], human=True),
            f"{kept:.1%}",
            f"{row['sparsity']:.1%}",
        ])  # fmt: skip
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
