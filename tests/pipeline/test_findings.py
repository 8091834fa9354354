"""The summary's sentences: how the deploy model's speed reads, and the settings behind it."""

from __future__ import annotations

import pytest

from lightning_amct.pipeline.findings import budget_caveat, headline, settings_behind
from lightning_amct.plan import CompressionPlan, LayerPlan, QuantSpec


@pytest.mark.parametrize(
    ("speedup", "pace"),
    [
        (2.5, "2.50x faster than"),
        (0.5, "2.00x slower than"),
        (1.004, "as fast as"),
        (0.996, "as fast as"),
        (1.0, "as fast as"),
        (1.006, "1.01x faster than"),
        (0.994, "1.01x slower than"),
    ],
)
def test_the_pace_is_never_a_speedup_of_one(speedup: float, pace: str) -> None:
    sentence = headline(speedup, 64, 1, 0.27, "test_acc", 0.0)
    assert sentence.startswith(f"Deploy model: {pace} float in ONNX Runtime (batch 64, 1 thread, CPU time);")


def test_quantize_outputs_that_placed_no_quantizer_is_not_called_off() -> None:
    plan = CompressionPlan({"fc": LayerPlan("fc", "Linear", quant=QuantSpec(8, None, True, "arq", 8, True))})
    assert "quantize_outputs off" in settings_behind(plan)
    assert "quantize_outputs: no output needed a quantizer" in settings_behind(plan, quantize_outputs=True)


@pytest.mark.parametrize(
    ("trainer", "words"),
    [
        ({"limit_train_batches": 4, "limit_val_batches": 4, "limit_test_batches": 4}, "4 training batches an epoch and test_acc over 4 test batches"),
        ({"limit_test_batches": 1}, "test_acc over 1 test batch:"),
        ({"limit_train_batches": 0.1, "limit_test_batches": 1.0}, "10% of the training batches an epoch:"),
        ({"limit_val_batches": 2}, None),  # validation alone does not decide the test metric
        ({"accelerator": "cpu"}, None),
    ],
)  # fmt: skip
def test_a_budget_run_says_what_its_metric_was_measured_on(trainer: dict, words: str | None) -> None:
    caveat = budget_caveat(trainer, "test_acc")
    assert caveat is None if words is None else words in caveat
