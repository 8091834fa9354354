"""The QAT step of a model trained in channels-last memory order, beside the same model in the default order.

``model.to(memory_format=torch.channels_last)`` is the usual advice for convolutional networks on
CPUs and GPUs: oneDNN's convolutions run faster on it. The fused fake-quant kernels read and write
that order as it is (:func:`lightning_amct.quant.functional.cpu_kernels.applies_elementwise`). This
times, on the models of ``qat_step_time.py``, the float and the INT8 step in both orders (the same
weights, the same batch, all four taking turns step by step), so that each INT8 step stands beside
the float step of its own order. Target: the channels-last INT8 step at most 1.3x the
channels-last float step.

Usage (from the repository root)::

    python bench/channels_last_step.py [--models demo small_cnn resnet] [--repeats 30] [--results bench/results.md]
"""

from __future__ import annotations

import argparse
import os

import torch
from qat_step_time import CASES, MODELS, batch_for, build, median_step_times, training_step
from results_file import finish_timing_run

MAX_RATIO = 1.3
LAYOUTS = {"default": torch.contiguous_format, "channels-last": torch.channels_last}


def measure(model_name: str, batch: int, warmup: int, repeats: int) -> dict[tuple[str, str], float]:
    """Median seconds per step of float and INT8, in each memory order, by ``(order, variant)``."""
    x, y = batch_for(model_name, batch)
    steps = {}
    for order, layout in LAYOUTS.items():
        inputs = x.contiguous(memory_format=layout)
        for variant in ("float", "int8"):
            model = build(model_name, variant, x).to(memory_format=layout)
            steps[(order, variant)] = training_step(model, "sgd", inputs, y)
    return median_step_times(steps, warmup, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--results", help="also write the table into this markdown file (its own section)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup = (
        f"training step (forward, cross-entropy, backward, sgd step), {args.threads} threads, median of {args.repeats} "
        f"after {args.warmup} warm-up steps, the four variants taking turns, on cpu; torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start"
    )
    print(setup)
    rows = ["| model | memory order | float ms | int8 ms | int8 x float (same order) |", "|---|---|---|---|---|"]
    targets = []
    for model_name, batch in dict.fromkeys((m, b) for m, b in CASES if m in args.models):
        times = measure(model_name, batch, args.warmup, args.repeats)
        for order in LAYOUTS:
            ratio = times[(order, "int8")] / times[(order, "float")]
            rows.append(
                f"| {model_name} b{batch} | {order} | {times[(order, 'float')] * 1e3:.2f} | "
                f"{times[(order, 'int8')] * 1e3:.2f} | {ratio:.2f}x |"
            )
            print(rows[-1], flush=True)
        ratio = times[("channels-last", "int8")] / times[("channels-last", "float")]
        verdict = "met" if ratio <= MAX_RATIO else "MISSED"
        target = f"channels-last int8 {ratio:.3f}x channels-last float <= {MAX_RATIO}x: {verdict}"
        targets.append(f"{model_name} b{batch}: {target}")
    title = "QAT step in channels-last memory order"
    finish_timing_run(args.results, "channels_last_step", title, setup, rows, targets)


if __name__ == "__main__":
    main()
