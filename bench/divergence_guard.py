"""What does the per-step divergence check cost? A training step with and without it, in one run.

The demo model (``DemoClassifier``, width 64) compressed with ``recipes/quant.cfg`` and calibrated, at
batch 64: one step is zero_grad, forward, cross-entropy, backward, AdamW step; the check is
:meth:`~lightning_amct.training.divergence.DivergenceGuard.after_step`, as the callback runs it
after every step. The two variants take turns step by step (the check is timed on its own right
after each checked step, so both columns come from the same steps), ``--warmup`` untimed steps
first, then the median of ``--repeats``.

Usage (from the repository root)::

    python bench/divergence_guard.py [--repeats 200] [--warmup 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from lightning_amct import compress_model
from lightning_amct.demo import DemoClassifier
from lightning_amct.training.divergence import DivergenceGuard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in {"--repeats": 200, "--warmup": 20, "--threads": 2}.items():
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = DemoClassifier(width=64)
    compress_model(model, "recipes/quant.cfg", torch.zeros(1, 1, 8, 8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    guard, loss_fn = DivergenceGuard(), nn.CrossEntropyLoss()
    steps, checks = [], []
    for i in range(args.warmup + args.repeats):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(images), labels).backward()
        optimizer.step()
        stepped = time.perf_counter()
        guard.after_step(model, step=i)
        checked = time.perf_counter()
        if i >= args.warmup:
            steps.append(stepped - start)
            checks.append(checked - stepped)
    step, check = statistics.median(steps), statistics.median(checks)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"DemoClassifier(width=64), recipes/quant.cfg, batch 64, {parameters:,} trainable values checked")
    print(f"| training step | divergence check | check / step |\n|---|---|---|\n| {step * 1e3:.2f} ms | {check * 1e6:.0f} us | {check / step:.1%} |")


if __name__ == "__main__":
    main()
