"""The AMCT record file: per-layer quantization factors and pruning records, as text protobuf.

The schema is ``proto/scale_offset_record_pytorch.proto`` (``ScaleOffsetRecord``), so the result
can enter the Ascend toolchain. One ``record`` entry per layer that is quantized or pruned, keyed
by module name:

* ``value`` (quantized layers): ``scale_d``/``offset_d`` of the input grid (absent when the
  activation quantizer never calibrated), ``scale_w`` one per output channel (one per tensor when
  not channel-wise) with BatchNorm folded in, ``offset_w`` zeros (symmetric weights),
  ``act_type``/``wts_type`` as ``"INT8"``/``"INT4"``, and ``dst_type`` = ``act_type`` (the data
  type the layer's input is quantized to);
* ``prune``: ``FILTER_PRUNE`` with the kept output channels in the original numbering and the
  original count, or ``SELECTIVE_PRUNE`` with the 4:2 mask bit-packed (one bit a weight, row-major,
  least significant bit first) and its shape.

Example:
    >>> import torch
    >>> from lightning_amct.export.integer import ActivationGrid, IntegerLayer
    >>> data = IntegerLayer("fc", "Linear", 0, 1, 8, torch.ones(2, 4, dtype=torch.int8), torch.tensor([0.5, 0.25]),
    ...                     None, None, ActivationGrid(8, 0.125, -128, 31.875, 0.0), None)
    >>> print(build_record({"fc": data}, {}, {}))  # doctest: +NORMALIZE_WHITESPACE
    record {
      key: "fc"
      value {
        scale_d: 0.125
        offset_d: -128
        scale_w: 0.5
        scale_w: 0.25
        offset_w: 0
        offset_w: 0
        dst_type: "INT8"
        act_type: "INT8"
        wts_type: "INT8"
      }
    }
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import text_format

from lightning_amct.export.integer import IntegerLayer
from lightning_amct.prune import pack_mask_bits
from lightning_amct.proto import scale_offset_record_pytorch_pb2 as record_pb2


def build_record(
    layers: Mapping[str, IntegerLayer],
    kept_channels: Mapping[str, list[int]],
    original_channels: Mapping[str, int],
) -> str:
    """The record file's text.

    Args:
        layers: the compressed layers' integer forms, by name, in model order.
        kept_channels: filter-pruned layer -> kept output channels, numbered as before pruning
            (:meth:`~lightning_amct.prune.PruneResult.kept_rows`).
        original_channels: filter-pruned layer -> output channels before pruning.
    """
    record = record_pb2.ScaleOffsetRecord()
    names = list(layers) + [name for name in kept_channels if name not in layers]
    for name in names:
        entry = record.record.add()
        entry.key = name
        data = layers.get(name)
        if data is not None and data.weight_int is not None:
            _fill_quant(entry.value, data)
        if name in kept_channels:
            entry.prune.prune_type = record_pb2.PruneRecord.FILTER_PRUNE
            entry.prune.kept_channels.extend(kept_channels[name])
            if name in original_channels:
                entry.prune.original_channels = original_channels[name]
        elif data is not None and data.mask is not None:
            entry.prune.prune_type = record_pb2.PruneRecord.SELECTIVE_PRUNE
            entry.prune.mask = pack_mask_bits(data.mask.float()).numpy().tobytes()
            entry.prune.mask_shape.extend(data.weight_shape)
    return text_format.MessageToString(record)


def _fill_quant(value: Any, data: IntegerLayer) -> None:
    if data.activation is not None:
        value.scale_d = data.activation.scale
        value.offset_d = data.activation.offset
        value.act_type = value.dst_type = f"INT{data.activation.bits}"
    value.scale_w.extend(data.weight_scale.tolist())
    value.offset_w.extend([0] * data.weight_scale.numel())
    value.wts_type = f"INT{data.weight_bits}"


def original_out_channels(prune_report: list[Mapping[str, Any]] | None) -> dict[str, int]:
    """Layer -> output channels before pruning, from the pruning report's rows."""
    return {row["layer"]: row["out_before"] for row in prune_report or () if row.get("out_before") is not None}
