"""What does INT8 quantization-aware training cost per step? Float vs lightning-amct vs torch.ao, in one run.

One training step (zero_grad, forward, cross-entropy, backward, optimizer step) at batch 64 on two
models: ``DemoNet`` (1x8x8 input) and :func:`models.resnet_style` (3x32x32). Three copies of each,
from the same initial weights:

* ``float``: the model as it is;
* ``ours``: ``compress_model`` with :data:`CONFIG`, INT8 on every Conv2d and Linear (ULQ activations
  with IFMR-initialised clips, ARQ weights per channel, per tensor for Linear, as
  ``recipes/quant.cfg``), calibrated on one training batch before timing;
* ``torch.ao``: ``prepare_qat_fx`` with ``get_default_qat_qconfig_mapping("x86")`` (its default
  QAT: Conv/BN/ReLU fused, observers updated and fake-quant applied on activations and weights at
  every step).

Step time: ``torch.set_num_threads(--threads)``, ``--warmup`` untimed steps, then ``--repeats``
timed steps; the variants take turns step by step, so a change in machine load hits all of them
alike; the table shows the median. The load average is printed before and after: other work on
the machine slows the many small operations of the quantized steps more than the float step, so
trust a run whose load stayed below the number of CPUs.

Peak memory: each variant runs in a fresh process whose allocator maps every block above 64 KiB
on allocation and unmaps it on free (glibc ``M_MMAP_THRESHOLD`` fixed), so that its resident size
follows the live tensors. After the warm-up steps the process returns freed heap to the system
(``malloc_trim``), its resident size is read, its peak resident size is reset
(``/proc/self/clear_refs``), and one step runs; the figure is the peak minus the size before the
step: what a training step adds (activations kept for backward, gradients, temporaries). Median
over three such steps. Needs Linux with glibc; without /proc/self/clear_refs the column says n/a.

Targets: ``ours`` at most 1.3x the float step time, and faster than ``torch.ao``.

Usage (from the repository root)::

    python bench/qat_step_time.py [--repeats 30] [--warmup 5] [--optimizer sgd|adamw]
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import statistics
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from models import resnet_style
from torch import nn
from torch.ao.quantization import get_default_qat_qconfig_mapping
from torch.ao.quantization.quantize_fx import prepare_qat_fx

from lightning_amct import compress_model
from lightning_amct.demo import DemoNet

#: INT8 everywhere: recipes/quant.cfg without its skipped input layer and with IFMR clip initialisation.
CONFIG = """
retrain_data_quant_config: { ulq_quantize: { dst_type: INT8 } }
retrain_weight_quant_config: { arq_retrain: { channel_wise: true dst_type: INT8 } }
override_layer_types: {
    layer_type: "Linear"
    retrain_weight_quant_config: { arq_retrain: { channel_wise: false dst_type: INT8 } }
}
"""

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "demo": (DemoNet, (1, 8, 8)),
    "resnet": (resnet_style, (3, 32, 32)),
}
VARIANTS = ("float", "ours", "torch.ao")
MAX_RATIO = 1.3
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def batch_for(model_name: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of inputs in [0, 1) and labels."""
    generator = torch.Generator().manual_seed(0)
    shape = MODELS[model_name][1]
    return torch.rand(size, *shape, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def build(model_name: str, variant: str, x: torch.Tensor) -> nn.Module:
    """The ``variant`` of a freshly initialised model (the same weights for every variant)."""
    torch.manual_seed(0)
    model = MODELS[model_name][0]().train()
    if variant == "ours":
        compress_model(model, CONFIG, x[:1])
        with torch.no_grad():
            model(x)  # the calibration batch: IFMR sets the activation clips
    elif variant == "torch.ao":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation
            model = prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (x,))
    return model


def training_step(model: nn.Module, optimizer_name: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step on the fixed batch ``(x, y)``, as a function to call repeatedly."""
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    return step


def median_step_times(steps: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per step; the steps take turns, so load changes hit every variant alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for index in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _step_peak_kib(model_name: str, variant: str, batch: int, optimizer_name: str, threads: int, warmup: int) -> int:
    """Runs in a fresh process: resident memory a training step adds at its peak, in KiB."""
    torch.set_num_threads(threads)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    x, y = batch_for(model_name, batch)
    step = training_step(build(model_name, variant, x), optimizer_name, x, y)
    for _ in range(warmup):
        step()
    peaks = []
    for _ in range(3):
        libc.malloc_trim(0)
        before = _proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak resident size
        step()
        peaks.append(_proc_status_kib("VmHWM") - before)
    return int(statistics.median(peaks))


def step_peak_mib(model_name: str, variant: str, args: argparse.Namespace) -> float | None:
    """:func:`_step_peak_kib` in a fresh process, in MiB; None where /proc cannot tell."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        job = pool.submit(_step_peak_kib, model_name, variant, args.batch, args.optimizer, args.threads, args.warmup)
        return job.result() / 1024


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(
        f"training step (forward, backward, {args.optimizer} step), batch {args.batch}, "
        f"{args.threads} threads, median of {args.repeats} after {args.warmup} warm-up steps; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start"
    )
    print(f"{'model':<8}{'variant':<10}{'ms/step':>9}{'x float':>9}{'step peak MiB':>15}{'x float':>9}")
    verdicts = []
    for model_name in args.models:
        x, y = batch_for(model_name, args.batch)
        models = {variant: build(model_name, variant, x) for variant in VARIANTS}
        steps = {variant: training_step(model, args.optimizer, x, y) for variant, model in models.items()}
        times = median_step_times(steps, args.warmup, args.repeats)
        peaks = {v: None if args.no_memory else step_peak_mib(model_name, v, args) for v in VARIANTS}
        for variant in VARIANTS:
            memory = f"{'n/a':>15}{'':>9}"
            if peaks[variant] is not None:
                memory = f"{peaks[variant]:>15.1f}{peaks[variant] / peaks['float']:>8.2f}x"
            ratio = times[variant] / times["float"]
            print(f"{model_name:<8}{variant:<10}{times[variant] * 1e3:>9.2f}{ratio:>8.2f}x{memory}")
        ratio = times["ours"] / times["float"]
        verdicts.append(f"{model_name}: ours/float {ratio:.3f}x <= {MAX_RATIO}x: {_verdict(ratio <= MAX_RATIO)}")
        ours_ms, ao_ms = times["ours"] * 1e3, times["torch.ao"] * 1e3
        verdicts.append(
            f"{model_name}: ours faster than torch.ao ({ours_ms:.2f} vs {ao_ms:.2f} ms): {_verdict(ours_ms < ao_ms)}"
        )
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(["targets:", *verdicts]))


if __name__ == "__main__":
    main()
