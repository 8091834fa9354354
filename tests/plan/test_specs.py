"""The plan is plain data: it round-trips and prints as a table."""

from __future__ import annotations

import torch

from lightning_amct import CompressionPlan, resolve_plan
from lightning_amct.demo import DemoClassifier

COMBINED = """
retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 6 clip_min: -6 } } }
retrain_weight_quant_config { ulq_retrain { dst_type: INT4 } }
prune_config { n_out_of_m_pruner { l1_selective_prune { update_freq: 2 } } }
quant_skip_layers: "net.stem.conv"
"""


def test_round_trip_through_plain_data() -> None:
    plan = resolve_plan(DemoClassifier(), COMBINED)
    data = plan.to_dict()
    # only plain types: what a weights_only checkpoint can hold
    torch.save(data, buffer := __import__("io").BytesIO())
    buffer.seek(0)
    assert CompressionPlan.from_dict(torch.load(buffer, weights_only=True)) == plan


def test_table_lists_every_layer_and_decision() -> None:
    text = str(resolve_plan(DemoClassifier(), COMBINED))
    header, rule, *rows = text.splitlines()
    assert header.split() == ["layer", "type", "activation", "weight", "pruning", "decided", "by", "/", "note"]
    assert set(rule) == {"-", " "}
    by_layer = {row.split()[0]: row for row in rows if row.startswith("net.")}
    assert set(by_layer) == {"net.stem.conv", "net.block.conv1", "net.block.conv2", "net.depthwise.conv",
                             "net.pointwise.conv", "net.fc"}  # fmt: skip
    assert "INT8 [-6, 6] fixed_min" in by_layer["net.fc"]
    assert "ULQ INT4 per-tensor" in by_layer["net.fc"]
    assert "4:2 every 2 batches" in by_layer["net.fc"]
    assert "quant skipped by quant_skip_layers" in by_layer["net.stem.conv"]
    assert "5 of 6 layers quantized" in text
