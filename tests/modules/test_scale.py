"""Resolving and compressing stay linear in the number of layers (bench/plan_scale.py goes to 10,000)."""

from __future__ import annotations

import time

import torch
from torch import nn

from lightning_amct.config import load_config
from lightning_amct.modules.apply import apply_plan
from lightning_amct.plan import resolve_plan


def _cpu_seconds(layers: int) -> tuple[float, float]:
    """CPU seconds of ``resolve_plan`` and ``apply_plan`` on ``layers`` Linear/ReLU blocks, one override each."""
    model = nn.Sequential(*(m for _ in range(layers) for m in (nn.Linear(4, 4), nn.ReLU())))
    overrides = "".join(
        f'override_layer_configs {{ layer_name: "{2 * i}" retrain_weight_quant_config {{ arq_retrain {{ }} }} }}\n'
        for i in range(layers)
    )
    config = load_config("retrain_data_quant_config { ulq_quantize { } }\n" + overrides)
    example = torch.zeros(1, 4)
    start = time.process_time()
    plan = resolve_plan(model, config, example)  # captures the graph: fixed_min follows the ReLUs
    resolved = time.process_time()
    apply_plan(model, plan, example)
    assert len(plan.quantized) == layers and plan["2"].quant.fixed_min and not plan["0"].quant.fixed_min
    return resolved - start, time.process_time() - resolved


def test_two_thousand_layers_with_an_override_each_resolve_and_compress_in_linear_time() -> None:
    _cpu_seconds(20)  # first calls import and warm up what the timed ones use
    # the better of two runs at 500 layers: a short run is the noisier one
    small = [min(runs) for runs in zip(*(_cpu_seconds(500) for _ in range(2)))]
    large = _cpu_seconds(2000)
    for stage, seconds_500, seconds_2000 in zip(("resolve", "compress"), small, large):
        # about 0.5 s and 0.25 s on a busy machine; a torch.export capture took 13 s, and growing
        # quadratically, resolving took 10x the time of 500 layers
        assert seconds_2000 < 4.0, f"{stage} of 2,000 layers took {seconds_2000:.1f} s of CPU"
        ratio = seconds_2000 / seconds_500
        assert ratio < 8.0, f"{stage}: 4x the layers took {ratio:.1f}x the CPU time (linear: 4x, quadratic: 16x)"
