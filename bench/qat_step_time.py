"""What does quantization-aware training cost per step? Float vs lightning-amct vs torch.ao, eager and compiled.

One training step (zero_grad, forward, cross-entropy, backward, optimizer step) on each case of
:data:`CASES`: ``DemoNet`` (1x8x8 input), :func:`models.small_cnn` (1x28x28, at two batch sizes)
and :func:`models.resnet_style` (3x32x32). Copies of each model, from the same initial weights:

* ``float``: the model as it is;
* ``int8``: ``compress_model`` with :data:`INT8`: INT8 on every Conv2d and Linear (ULQ activations
  with IFMR-initialised clips, ARQ weights per channel, per tensor for Linear, as
  ``recipes/quant.cfg``), calibrated on one training batch before timing;
* ``a8w4``: the same with INT4 weights (:data:`A8W4`);
* ``4:2+int8``: the same as ``int8`` with 4:2 structured sparsity on every layer (:data:`SPARSE_INT8`);
* ``int8, torch BN+pool``: ``int8`` with torch's BatchNorm and max-pool everywhere
  (``restore_norms``, ``restore_pools``). In the other compressed variants, a layer applies the
  training-mode BatchNorm and ReLU before it (:mod:`lightning_amct.modules.input_norm`), or the
  max-pool before it (:mod:`lightning_amct.modules.input_pool`), in its own passes where it can;
  torch's CPU BatchNorm computes its batch statistics slowly, and its max-pool over small planes
  is slower still, so part of what that saves is time the float step spends too. This row shows
  the step without it: what the quantizers alone cost;
* ``torch.ao``: ``prepare_qat_fx`` with ``get_default_qat_qconfig_mapping("x86")`` (its default
  QAT: Conv/BN/ReLU fused, observers updated and fake-quant applied on activations and weights at
  every step).

Compiled (``torch.compile``, inductor, default mode): ``float``, ``int8`` and ``torch.ao`` once
more, each compiled model timed against the compiled float model.

Step time: ``torch.set_num_threads(--threads)``, ``--warmup`` untimed steps (compilation
included), then at least ``--repeats`` timed steps, and more while the timed rounds of the case
have taken less than ``--seconds`` (a small model's step of a few milliseconds gets a hundred or
so, whose median varies less from run to run than that of 30); the variants take turns step by
step, so a change in machine load hits all of them alike; the table shows the median. The load
average is printed before and after: other work on the machine slows the many small operations
of the quantized steps more than the float step, so trust a run whose load stayed below the
number of CPUs. A virtual machine also has slow phases of its own, in which the float step takes
a fifth longer or more and the ratios move by a few hundredths: compare runs of similar float
times.

Peak memory: each variant runs in a fresh process. On the CPU its allocator maps every block above 64 KiB
on allocation and unmaps it on free (glibc ``M_MMAP_THRESHOLD`` fixed), so that its resident size
follows the live tensors. After the warm-up steps the process returns freed heap to the system
(``malloc_trim``), its resident size is read, its peak resident size is reset
(``/proc/self/clear_refs``), and one step runs; the figure is the peak minus the size before the
step: what a training step adds (activations kept for backward, gradients, temporaries). Median
over three such steps. Needs Linux with glibc; without /proc/self/clear_refs the column says n/a.
On CUDA (``--device cuda``) the figure is the CUDA allocator's peak during the step minus its
allocation before it, and each timed step ends with a device synchronisation.

Targets: every compressed variant at most 1.15x the float step time and 1.25x its step memory;
the compiled ``int8`` step at most 1.1x the compiled float step; ``int8`` faster than ``torch.ao``.

Usage (from the repository root)::

    python bench/qat_step_time.py [--models demo small_cnn resnet] [--repeats 30] [--seconds 10] [--warmup 5]
        [--optimizer sgd|adamw] [--device cpu|cuda] [--no-compile] [--no-memory] [--results bench/results.md]
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import random
import statistics
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from models import resnet_style, small_cnn
from results_file import finish_timing_run
from torch import nn
from torch.ao.quantization import get_default_qat_qconfig_mapping
from torch.ao.quantization.quantize_fx import prepare_qat_fx

from lightning_amct import compress_model
from lightning_amct.demo import DemoNet
from lightning_amct.modules.input_norm import restore_norms
from lightning_amct.modules.input_pool import restore_pools

#: INT8 everywhere: recipes/quant.cfg without its skipped input layer and with IFMR clip initialisation.
INT8 = """
retrain_data_quant_config: { ulq_quantize: { dst_type: INT8 } }
retrain_weight_quant_config: { arq_retrain: { channel_wise: true dst_type: INT8 } }
override_layer_types: {
    layer_type: "Linear"
    retrain_weight_quant_config: { arq_retrain: { channel_wise: false dst_type: INT8 } }
}
"""
#: INT8 activations, INT4 per-channel weights everywhere (recipes/a8w4.cfg without its skip).
A8W4 = """
retrain_data_quant_config: { ulq_quantize: { dst_type: INT8 } }
retrain_weight_quant_config: { arq_retrain: { channel_wise: true dst_type: INT4 } }
"""
#: :data:`INT8` with 4:2 sparsity on every layer, the masks chosen once (recipes/compressed2.cfg's pruner).
SPARSE_INT8 = INT8 + """
prune_config: { n_out_of_m_pruner: { l1_selective_prune: { n_out_of_m_type: M4N2 update_freq: 0 } } }
"""
CONFIGS = {"int8": INT8, "a8w4": A8W4, "4:2+int8": SPARSE_INT8}

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "demo": (DemoNet, (1, 8, 8)),
    "small_cnn": (small_cnn, (1, 28, 28)),
    "resnet": (resnet_style, (3, 32, 32)),
}
#: (model, batch size) pairs measured by default.
CASES = [("demo", 64), ("small_cnn", 32), ("small_cnn", 64), ("resnet", 64)]
TORCH_OPS = "int8, torch BN+pool"
EAGER = ("float", *CONFIGS, TORCH_OPS, "torch.ao")
COMPILED = ("float", "int8", "torch.ao")
MAX_RATIO = 1.15
MAX_COMPILED_RATIO = 1.1
MAX_MEMORY_RATIO = 1.25
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def batch_for(model_name: str, size: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of inputs in [0, 1) and labels, on ``device``."""
    generator = torch.Generator().manual_seed(0)
    shape = MODELS[model_name][1]
    x, y = torch.rand(size, *shape, generator=generator), torch.randint(0, 10, (size,), generator=generator)
    return x.to(device), y.to(device)


def build(model_name: str, variant: str, x: torch.Tensor, compiled: bool = False) -> nn.Module:
    """The ``variant`` of a freshly initialised model (the same weights for every variant), on ``x``'s device."""
    torch.manual_seed(0)
    model = MODELS[model_name][0]().train().to(x.device)
    if variant in CONFIGS or variant == TORCH_OPS:
        compress_model(model, CONFIGS.get(variant, INT8), x[:1])
        if variant == TORCH_OPS:
            restore_norms(model)
            restore_pools(model)
        with torch.no_grad():
            model(x)  # the calibration batch: IFMR sets the activation clips
    elif variant == "torch.ao":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization announces its deprecation
            model = prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (x,))
    return torch.compile(model) if compiled else model


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
        if x.is_cuda:
            torch.cuda.synchronize(x.device)

    return step


def median_step_times(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, seconds: float = 0.0
) -> dict[str, float]:
    """Median seconds per step over at least ``repeats`` timed rounds, and more while the timed
    rounds have taken less than ``seconds`` in all; the steps take turns, so load changes hit every
    variant alike.

    Each round runs the variants in a new order (seeded shuffle), so that no variant always runs
    at the same place of a round (say, always right after the float step).
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    order, shuffle = list(steps), random.Random(0).shuffle
    index, timed = 0, 0.0
    while index < warmup + repeats or timed < seconds:
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            steps[name]()
            if index >= warmup:
                elapsed = time.perf_counter() - start
                times[name].append(elapsed)
                timed += elapsed
        index += 1
    return {name: statistics.median(values) for name, values in times.items()}


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _step_peak_kib(model_name: str, variant: str, compiled: bool, batch: int, args: argparse.Namespace) -> int:
    """Runs in a fresh process: memory a training step adds at its peak, in KiB (resident, or CUDA's)."""
    torch.set_num_threads(args.threads)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    x, y = batch_for(model_name, batch, args.device)
    step = training_step(build(model_name, variant, x, compiled), args.optimizer, x, y)
    for _ in range(args.warmup):
        step()
    peaks = []
    for _ in range(3):
        if x.is_cuda:
            before = torch.cuda.memory_allocated(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            step()
            peaks.append((torch.cuda.max_memory_allocated(x.device) - before) // 1024)
            continue
        libc.malloc_trim(0)
        before = _proc_status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM, the peak resident size
        step()
        peaks.append(_proc_status_kib("VmHWM") - before)
    return int(statistics.median(peaks))


def step_peak_mib(model_name: str, variant: str, compiled: bool, batch: int, args: argparse.Namespace) -> float | None:
    """:func:`_step_peak_kib` in a fresh process, in MiB; None where /proc cannot tell."""
    if args.device == "cpu" and not Path("/proc/self/clear_refs").exists():
        return None
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_step_peak_kib, model_name, variant, compiled, batch, args).result() / 1024


def measure_case(model_name: str, batch: int, compiled: bool, args: argparse.Namespace) -> dict[str, dict]:
    """Step time and peak memory of every variant of one case, eager or compiled."""
    x, y = batch_for(model_name, batch, args.device)
    variants = COMPILED if compiled else EAGER
    steps = {v: training_step(build(model_name, v, x, compiled), args.optimizer, x, y) for v in variants}
    times = median_step_times(steps, args.warmup, args.repeats, args.seconds)
    return {
        v: {
            "time": times[v],
            "memory": None if args.no_memory else step_peak_mib(model_name, v, compiled, batch, args),
        }
        for v in variants
    }


def table_rows(case: str, mode: str, results: dict[str, dict]) -> list[str]:
    """Markdown rows: one per variant, time and memory with their ratio to float."""
    base = results["float"]
    rows = []
    for variant, result in results.items():
        memory = "n/a"
        if result["memory"] is not None:
            memory = f"{result['memory']:.1f} MiB ({result['memory'] / base['memory']:.2f}x)"
        rows.append(
            f"| {case} | {mode} | {variant} | {result['time'] * 1e3:.2f} | {result['time'] / base['time']:.2f}x "
            f"| {memory} |"
        )
    return rows


def verdicts(case: str, eager: dict[str, dict], compiled: dict[str, dict] | None) -> list[str]:
    """One line per target, met or MISSED, with the measured figure."""
    lines = []
    float_time, float_memory = eager["float"]["time"], eager["float"]["memory"]
    for variant in CONFIGS:
        ratio = eager[variant]["time"] / float_time
        lines.append(f"{case} {variant}: step {ratio:.3f}x float <= {MAX_RATIO}x: {_verdict(ratio <= MAX_RATIO)}")
        if float_memory is not None:
            memory = eager[variant]["memory"] / float_memory
            lines.append(
                f"{case} {variant}: memory {memory:.2f}x float <= {MAX_MEMORY_RATIO}x: "
                f"{_verdict(memory <= MAX_MEMORY_RATIO)}"
            )
    ours, ao = eager["int8"]["time"], eager["torch.ao"]["time"]
    lines.append(f"{case} int8 faster than torch.ao ({ours * 1e3:.2f} vs {ao * 1e3:.2f} ms): {_verdict(ours < ao)}")
    if compiled is not None:
        ratio = compiled["int8"]["time"] / compiled["float"]["time"]
        lines.append(
            f"{case} int8 compiled: step {ratio:.3f}x compiled float <= {MAX_COMPILED_RATIO}x: "
            f"{_verdict(ratio <= MAX_COMPILED_RATIO)}"
        )
    return lines


def device_name(device: str) -> str:
    """``cpu``, or the CUDA device's name."""
    return torch.cuda.get_device_name() if device == "cuda" else device


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batch", type=int, help="one batch size for every model (default: those of CASES)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the models train")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30, help="the fewest timed steps of each variant")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="time steps of a case while its timed rounds took less than this"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--results", help="also write the table into this markdown file (its own section)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device")
    torch.set_num_threads(args.threads)
    cases = [(m, args.batch or b) for m, b in CASES if m in args.models]
    cases = list(dict.fromkeys(cases))

    setup = (
        f"training step (forward, cross-entropy, backward, {args.optimizer} step), {args.threads} threads, median of "
        f"at least {args.repeats} steps (more while a case's timed steps took under {args.seconds:g} s in all) after "
        f"{args.warmup} warm-up steps, variants taking turns, on {device_name(args.device)}; "
        f"torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs at start"
    )
    print(setup)
    rows = ["| model | mode | variant | ms/step | x float | step peak memory (x float) |", "|---|---|---|---|---|---|"]
    targets = []
    for model_name, batch in cases:
        case = f"{model_name} b{batch}"
        eager = measure_case(model_name, batch, False, args)
        compiled = None if args.no_compile else measure_case(model_name, batch, True, args)
        new_rows = table_rows(case, "eager", eager)
        if compiled is not None:
            new_rows += table_rows(case, "compiled", compiled)
        print("\n".join(new_rows), flush=True)
        rows += new_rows
        targets += verdicts(case, eager, compiled)
    finish_timing_run(args.results, "qat_step_time", "QAT step: time and memory", setup, rows, targets)


if __name__ == "__main__":
    main()
