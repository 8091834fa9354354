"""Pictures of a compression run: activation clip trajectories and what each layer became.

Both functions draw on a bare :class:`matplotlib.figure.Figure` rendered by the Agg canvas, so
they work on machines without a display and leave pyplot's global state (and the caller's
backend) alone.

- :func:`plot_clip_history`: one panel per activation quantizer (a layer's input, and with
  ``quantize_outputs`` a module's output), ``clip_max`` and ``clip_min`` against the training
  step, from :attr:`lightning_amct.CompressionCallback.history`. Each on an axis of its own that
  spans only the values it took: read it to see whether the clips settled (flat ends) or were
  still moving when training stopped.
- :func:`plot_layer_compression`: per layer, the activation and weight bits of the plan, and the
  share of output channels, parameters and non-zero weights kept (channel pruning shrinks the
  first two, 4:2 sparsity the last).

Example:
    >>> import tempfile, pathlib
    >>> history = [{"step": 1.0, "amct/fc/clip_max": 6.0, "amct/fc/clip_min": 0.0},
    ...            {"step": 2.0, "amct/fc/clip_max": 5.5, "amct/fc/clip_min": 0.0}]
    >>> path = plot_clip_history(history, pathlib.Path(tempfile.mkdtemp()) / "clips.png")
    >>> path.suffix
    '.png'
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lightning_amct.export.atomic import write_files_atomically
from lightning_amct.plan import CompressionPlan

FLOAT_BITS = 32
_COLUMNS = 3
_MAX = "clip_max"


def plot_clip_history(history: Sequence[Mapping[str, float]], path: Path) -> Path | None:
    """Draw each quantizer's ``clip_max``/``clip_min`` against the step; None when nothing was logged.

    Args:
        history: the callback's records, ``{"step": s, "amct/<layer>/clip_max": v, ...}``, with
            output quantizers as ``amct/<module>/output_clip_max``.
        path: the PNG to write.
    """
    figure = clip_history_figure(history)
    if figure is None:
        return None
    return _saved(figure, path)


def clip_history_figure(history: Sequence[Mapping[str, float]]) -> Figure | None:
    """The figure of :func:`plot_clip_history`, one panel per quantizer, or None without records.

    A panel's two axes (``clip_max`` left, ``clip_min`` right) each span only the values the clip
    took, not zero: a drift of a few percent fills the panel instead of a pixel.
    """
    series = list(dict.fromkeys(key[: -len(_MAX)] for record in history for key in record if key.endswith(_MAX)))
    if not series:
        return None
    columns = min(_COLUMNS, len(series))
    rows = math.ceil(len(series) / columns)
    figure = Figure(figsize=(4.4 * columns, 2.6 * rows + 0.8), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False, sharex=True)
    handles = []
    for ax, prefix in zip(axes.flat, series):
        points = [r for r in history if prefix + _MAX in r]
        steps = [r["step"] for r in points]
        highs = [r[prefix + _MAX] for r in points]
        lows = [r[prefix + "clip_min"] for r in points]
        low_ax = ax.twinx()
        handles = ax.plot(steps, highs, color="tab:blue", marker=".", label="clip_max (left axis)")
        handles += low_ax.plot(steps, lows, color="tab:orange", linestyle="--", marker=".", label="clip_min (right axis)")
        ax.tick_params(axis="y", labelcolor="tab:blue")
        low_ax.tick_params(axis="y", labelcolor="tab:orange")
        start, end = f"[{lows[0]:.3g}, {highs[0]:.3g}]", f"[{lows[-1]:.3g}, {highs[-1]:.3g}]"
        ax.set_title(f"{_quantizer_name(prefix)}: {start} → {end}", fontsize=9)
        ax.grid(alpha=0.3)
    for index, ax in enumerate(axes.flat):
        ax.set_visible(index < len(series))
        if index + columns >= len(series):  # the lowest panel of its column
            ax.set_xlabel("training step")
            ax.xaxis.set_tick_params(labelbottom=True)
    figure.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    figure.suptitle("Activation clip ranges during compression training (each axis spans the values taken)")
    return figure


def _quantizer_name(prefix: str) -> str:
    """``amct/net.fc/`` → ``net.fc``; ``amct/net.block.bn2/output_`` → ``net.block.bn2 (output)``."""
    module = prefix.split("/")[1]
    return f"{module} (output)" if prefix.endswith("output_") else module


def plot_layer_compression(
    plan: CompressionPlan, before: Mapping[str, Any], after: Mapping[str, Any], path: Path
) -> Path:
    """Draw the bits and the kept share of every layer in ``plan``.

    Args:
        plan: the resolved plan (bits per layer; layers left in float show 32).
        before: :func:`lightning_amct.prune.report.model_stats` of the float model.
        after: the same of the compressed model, with its 4:2 masks.
        path: the PNG to write.
    """
    old, new = before["layers"], after["layers"]
    names = [name for name in plan if name in old and name in new]
    act_bits = [plan[n].quant.act_bits if plan[n].quant else FLOAT_BITS for n in names]
    weight_bits = [plan[n].quant.weight_bits if plan[n].quant else FLOAT_BITS for n in names]
    channels = [_share(new[n]["out"], old[n]["out"]) for n in names]
    params = [_share(new[n]["params"], old[n]["params"]) for n in names]
    nonzero = [_share(new[n]["weights"] - new[n]["zeros"], old[n]["weights"]) for n in names]
    figure = Figure(figsize=(11, 0.6 * len(names) + 1.8), layout="constrained")
    bits_ax, kept_ax = figure.subplots(1, 2, sharey=True)
    _grouped_bars(bits_ax, names, [("activation bits", act_bits), ("weight bits", weight_bits)], "{:.0f}")
    bits_ax.set_xlim(0, FLOAT_BITS * 1.15)
    bits_ax.set_xticks([0, 4, 8, 16, FLOAT_BITS])
    bits_ax.set_title("bits (32 = left in float)")
    kept = [("output channels", channels), ("parameters", params), ("non-zero weights", nonzero)]
    _grouped_bars(kept_ax, names, kept, "{:.0f}%")
    kept_ax.set_xlim(0, 118)
    kept_ax.set_title("kept, % of the float layer")
    bits_ax.invert_yaxis()  # model order, top to bottom
    figure.suptitle("What each layer became")
    return _saved(figure, path)


def _saved(figure: Figure, path: Path) -> Path:
    """``figure`` as a PNG at ``path``, written atomically like every other file of a run."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    write_files_atomically({Path(path): buffer.getvalue()})
    return path


def _share(after: int | None, before: int | None) -> float:
    return 100.0 * after / before if before else 100.0


def _grouped_bars(ax: Any, names: list[str], series: list[tuple[str, list[float]]], label: str) -> None:
    height = 0.8 / len(series)
    for i, (title, values) in enumerate(series):
        offsets = [y - 0.4 + height * (i + 0.5) for y in range(len(names))]
        bars = ax.barh(offsets, values, height=height, label=title)
        ax.bar_label(bars, labels=[label.format(v) for v in values], padding=2, fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncols=len(series), frameon=False)
    ax.grid(axis="x", alpha=0.3)
