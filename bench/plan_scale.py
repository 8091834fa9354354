"""Do plan resolution and model transformation stay linear in the number of layers? Timed in one run.

Models of ``N`` blocks ``Linear(16, 16) → ReLU`` in one ``nn.Sequential`` (``N`` quantizable
layers, ``2N`` graph nodes), with a config of ``N`` entries in ``override_layer_configs``, one per
layer (INT4 and INT8 weights alternating, over a global INT8 config). For each size, in a fresh
process so that peak memory is the size's own:

* ``load``: :func:`lightning_amct.config.load_config_with_locations` of the config text (done once
  by the callback at construction);
* ``resolve``: :func:`lightning_amct.resolve_plan` with the loaded message; it captures the
  model's graph (:func:`lightning_amct.graph.capture_graph`: one run of the model recording its
  ATen operators) for the ``fixed_min`` defaults and shared inputs, and ``graph alone`` times that
  capture by itself (after ``first capture``, the one-off cost of the process's first capture,
  on a 1-layer model);
* ``compress``: :func:`lightning_amct.modules.apply.apply_plan` of that plan (what
  ``compress_model`` does after resolving);
* peak resident memory of the process.

The baseline is linear growth from the smallest size: the ``x linear`` columns divide each time by
the smallest size's CPU time scaled by the ratio of layers, so 1.0 is exactly linear and quadratic
growth shows as the ratio of sizes. Each stage is shown as wall and CPU seconds: on a machine
busy with other work the wall time grows, the CPU time much less. Target: 10,000 layers resolve and compress in under 3 s each.

Usage (from the repository root)::

    python bench/plan_scale.py [--sizes 1000 2000 10000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch import nn

from lightning_amct.config import load_config_with_locations
from lightning_amct.graph import capture_graph
from lightning_amct.modules.apply import apply_plan
from lightning_amct.plan import resolve_plan

TARGET_SECONDS = 3.0


def deep_model(layers: int) -> nn.Sequential:
    """``layers`` blocks of ``Linear(16, 16)`` and ``ReLU``; the Linear of block ``i`` is named ``str(2 * i)``."""
    return nn.Sequential(*(module for _ in range(layers) for module in (nn.Linear(16, 16), nn.ReLU())))


def per_layer_config(layers: int) -> str:
    """Global INT8 quantization plus one ``override_layer_configs`` entry per Linear of :func:`deep_model`."""
    overrides = "".join(
        f'override_layer_configs {{ layer_name: "{2 * i}" '
        f"retrain_weight_quant_config {{ arq_retrain {{ dst_type: {'INT4' if i % 2 else 'INT8'} }} }} }}\n"
        for i in range(layers)
    )
    return (
        "retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }\n"
        "retrain_weight_quant_config { arq_retrain { dst_type: INT8 } }\n" + overrides
    )


def measure(layers: int, threads: int) -> dict[str, tuple[float, float]]:
    """``(wall s, CPU s)`` of each stage at ``layers`` layers, and the peak resident memory in MB."""
    torch.set_num_threads(threads)
    model, text, example = deep_model(layers), per_layer_config(layers), torch.zeros(1, 16)
    timed: dict[str, tuple[float, float]] = {}

    def run(stage: str, function, *args):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function(*args)
        timed[stage] = (time.perf_counter() - wall, time.process_time() - cpu)
        return result

    config, _ = run("load", load_config_with_locations, text)
    run("first", capture_graph, deep_model(1), example)  # once per process: torch sets up its dispatch
    run("graph", capture_graph, model, example)  # the capture resolve_plan runs, timed on its own
    plan = run("resolve", resolve_plan, model, config, example)
    run("compress", apply_plan, model, plan, example)
    assert len(plan.quantized) == layers and plan["0"].quant.weight_bits == 8 and plan["2"].quant.weight_bits == 4
    timed["peak_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0.0)
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 10000])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    results = {}
    for layers in sizes:  # one fresh process per size, one at a time
        with ProcessPoolExecutor(max_workers=1) as pool:
            results[layers] = pool.submit(measure, layers, args.threads).result()
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"models: N x (Linear(16, 16), ReLU); config: N override_layer_configs; target < {TARGET_SECONDS:.0f} s")
    print("each stage: wall s / CPU s (CPU time is what a machine without other work would take)")
    print()
    stages = "load | first capture | resolve | graph alone | compress"
    print(f"| layers | {stages} | peak MB | resolve x linear | compress x linear |")
    print("|---|---|---|---|---|---|---|---|---|")
    base_layers, base = sizes[0], results[sizes[0]]
    for layers in sizes:
        r = results[layers]
        scale = layers / base_layers
        cells = " | ".join(f"{r[stage][0]:.2f} / {r[stage][1]:.2f}" for stage in ("load", "first", "resolve", "graph", "compress"))
        linear = " | ".join(f"{r[stage][1] / (base[stage][1] * scale):.2f}" for stage in ("resolve", "compress"))
        print(f"| {layers:,} | {cells} | {r['peak_mb'][0]:.0f} | {linear} |")
    largest = results[sizes[-1]]
    wall = max(largest["resolve"][0], largest["compress"][0])
    cpu = max(largest["resolve"][1], largest["compress"][1])
    print(
        f"\n{sizes[-1]:,} layers: resolve {largest['resolve'][0]:.2f} s, compress {largest['compress'][0]:.2f} s "
        f"(CPU {largest['resolve'][1]:.2f} s, {largest['compress'][1]:.2f} s): "
        f"{'pass' if wall < TARGET_SECONDS else 'FAIL'} by wall time, {'pass' if cpu < TARGET_SECONDS else 'FAIL'} by CPU time"
    )


if __name__ == "__main__":
    main()
