"""Does channel pruning make inference faster? Eager CPU latency before and after, in one run.

Prunes every conv of :func:`models.resnet_style` (BCP, ``ascend_optimized``) at 0.3 and 0.5 and
times eager inference of the unpruned and the pruned copies on the same batch: ``torch.set_num_threads``
threads, warm-up passes, then the median of timed passes. Prints parameters, FLOPs per image,
latency and speedup side by side.

Usage (from the repository root)::

    python bench/prune_latency.py [--batch 64] [--threads 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from models import resnet_style
from torch import nn

from lightning_amct.plan.specs import PruneSpec
from lightning_amct.prune import model_stats, prune_model


def median_latencies(models: dict[str, nn.Module], batch: torch.Tensor, warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds of one eager forward pass per model (eval, inference mode).

    The models take turns pass by pass, so a change in machine load hits all of them alike.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for step in range(warmup + repeats):
            for name, model in models.items():
                model.eval()
                start = time.perf_counter()
                model(batch)
                if step >= warmup:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def pruned_copy(model: nn.Module, ratio: float, example: torch.Tensor) -> nn.Module:
    pruned = copy.deepcopy(model)
    specs = {name: PruneSpec("filter", ratio, True) for name, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    prune_model(pruned, specs, example)
    return pruned


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = resnet_style(num_classes=10)
    example, batch = torch.randn(1, 3, 32, 32), torch.randn(args.batch, 3, 32, 32)
    variants = {"unpruned": base}
    variants.update({f"pruned {ratio}": pruned_copy(base, ratio, example) for ratio in (0.3, 0.5)})

    latencies = median_latencies(variants, batch, args.warmup, args.repeats)
    print(f"resnet_style, eager CPU, batch {args.batch}, {args.threads} threads, median of {args.repeats}")
    print(f"{'model':<12}{'params':>12}{'MFLOPs/img':>12}{'latency ms':>12}{'speedup':>9}")
    for name, model in variants.items():
        stats = model_stats(model, example)
        print(
            f"{name:<12}{stats['params']:>12,}{stats['flops'] / 1e6:>12.1f}"
            f"{latencies[name] * 1e3:>12.1f}{latencies['unpruned'] / latencies[name]:>8.2f}x"
        )

if __name__ == "__main__":
    main()
