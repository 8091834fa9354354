"""The summary's closing sentence: how the deploy model's speed reads."""

from __future__ import annotations

import pytest

from lightning_amct.pipeline.findings import headline


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
