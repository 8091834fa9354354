"""Channel pruning of the zoo models: ours (BCP on the captured graph) against Torch-Pruning, in one run.

For each zoo model at the benchmark size (``zoo.build(name, "bench")``: ResNet-18, ResNet-50,
ConvNeXt-atto, MobileNetV2, RegNetY-200MF, EfficientNet-B0, ViT-Ti, MobileViT-XXS, BERT-tiny, a 2-block
GPT-2, a 2-block Llama),
the planned layers are its ``Conv2d``, ``Linear`` and ``Conv1D`` (GPT-2's) layers except the
depthwise convs (they shrink with their input) and the output layer, which both sides leave
alone. Then, on fresh copies of the same weights:

* ours: ``compress_model`` with ``prune_config { filter_pruner { balanced_l2_norm_filter_prune
  { prune_ratio: 0.3 ascend_optimized: false } } }``; BCP keeps ``N - round(0.3 N)`` channels of a
  group of N (algorithms.md);
* ours at Torch-Pruning's keep counts: the same groups and BCP scores, keeping ``floor(0.7 N)``
  (rounded down to whole blocks), applied with ``apply_kept_channels``: the structures compared
  at equal counts, which is how the target reads "the same channel ratio" (the two tools round
  ``r N`` differently, so at one ``prune_ratio`` they keep different counts);
* Torch-Pruning (a bench-only dependency): ``MetaPruner`` with ``MagnitudeImportance(p=2)``,
  ``pruning_ratio=0.3``, ``global_pruning=False``, the output layer ignored. On the transformers
  it prunes q/k/v too, which breaks the head reshape of the attention; a second run ignores the
  q/k/v layers as well (GPT-2's ``c_attn``, which makes all three; ours pins them). It has no
  pruner for GPT-2's ``Conv1D`` (a ``transformers`` class, not a torch one): on GPT-2 it prunes
  nothing. A run that takes more than :data:`TP_SECONDS` is stopped and reported so (on the Llama
  decoder, Torch-Pruning's search for dependency groups ran past 5 minutes in a trial).

Per model and method: the planned layers that lost output channels, the parameters removed, and
whether the pruned model still runs; and the time of our analysis (graph capture and channel
groups). Writes its section of ``bench/results.md`` (``--results`` elsewhere).

Usage (from the repository root, Torch-Pruning installed by ``pip install -e .[bench]``)::

    python bench/prune_zoo.py [--models resnet vit] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
import torch_pruning as tp
from results_file import write_section
from torch import nn

from lightning_amct import compress_model, zoo
from lightning_amct.graph import capture_graph
from lightning_amct.plan.layers import filter_prune_obstacle, is_conv1d, weight_axes
from lightning_amct.prune import apply_kept_channels, group_scores, select_channels
from lightning_amct.prune.dependency import channel_groups

BENCH = Path(__file__).parent
SECTION = "# Channel pruning of the zoo: ours against Torch-Pruning"
RATIO = 0.3
CONFIG = (
    f"prune_config {{ filter_pruner {{ balanced_l2_norm_filter_prune {{ prune_ratio: {RATIO} "
    "ascend_optimized: false } } }"
)
FLOOR = "ours, floor(0.7N) kept"
MODELS = (
    "resnet", "resnet_bottleneck", "convnext", "mobilenet_v2", "regnet", "efficientnet", "vit", "mobilevit", "bert",
    "gpt2", "llama",
)  # fmt: skip
CNNS = MODELS[:6]
ATTENTION = ("query", "key", "value", "q_proj", "k_proj", "v_proj", "c_attn")
#: Seconds a Torch-Pruning run may take (on the Llama decoder its dependency search ran past 5 minutes).
TP_SECONDS = 60


@dataclass
class Outcome:
    """What one method did to one model."""

    pruned: int  # planned layers that lost output channels
    removed: int  # parameters removed
    runs: bool  # the pruned model still runs forward
    note: str = ""


def planned_layers(model: nn.Module, output_layer: str) -> list[str]:
    """The convs, Linears and Conv1Ds that filter pruning may prune (depthwise convs and the output layer aside)."""
    modules = model.named_modules()
    return [name for name, module in modules if name != output_layer and filter_prune_obstacle(module) is None]


def outcome(model: nn.Module, original: nn.Module, planned: list[str], inputs: tuple, note: str = "") -> Outcome:
    axes = {name: weight_axes(original.get_submodule(name))[0] for name in planned}  # axis 1 for a Conv1D
    widths = {name: original.get_submodule(name).weight.shape[axes[name]] for name in planned}
    pruned = sum(model.get_submodule(name).weight.shape[axes[name]] < widths[name] for name in planned)
    removed = sum(p.numel() for p in original.parameters()) - sum(p.numel() for p in model.parameters())
    try:
        with torch.no_grad():
            runs = model.eval()(*inputs).shape == original.eval()(*inputs).shape
    except RuntimeError as exc:
        runs, note = False, note or f"forward fails: {str(exc).splitlines()[0][:70]}"
    return Outcome(pruned, removed, runs, note)


def ours(model: nn.Module, inputs: tuple) -> nn.Module:
    pruned = copy.deepcopy(model)
    compress_model(pruned, CONFIG, inputs)
    return pruned


def ours_at_floor_counts(model: nn.Module, inputs: tuple, groups: list, planned: set[str]) -> nn.Module:
    """Our groups and BCP scores, keeping ``floor((1 - RATIO) N)`` channels as Torch-Pruning does."""
    kept = {}
    for group in groups:
        if not group.prunable or not set(group.producers) <= planned:
            continue
        keep = max(math.floor((1 - RATIO) * group.num_channels) // group.blocks * group.blocks, group.blocks)
        if keep < group.num_channels:
            kept[group.key] = select_channels(group_scores(model, group), keep, group.blocks)
    pruned = copy.deepcopy(model)
    apply_kept_channels(pruned, kept, inputs)
    return pruned


class OutOfTime(Exception):
    """A Torch-Pruning run went past :data:`TP_SECONDS`."""


@contextlib.contextmanager
def time_budget(seconds: int) -> Iterator[None]:
    """Raise :class:`OutOfTime` in the block after ``seconds`` (Torch-Pruning's graph search is Python,
    which the alarm interrupts)."""

    def expire(signum: int, frame: object) -> None:
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def torch_pruning(model: nn.Module, inputs: tuple, ignored: list[str], planned: list[str]) -> Outcome:
    pruned = copy.deepcopy(model)
    try:
        with time_budget(TP_SECONDS):
            pruner = tp.pruner.MetaPruner(
                pruned,
                inputs[0],
                importance=tp.importance.MagnitudeImportance(p=2),
                pruning_ratio=RATIO,
                ignored_layers=[pruned.get_submodule(name) for name in ignored],
                global_pruning=False,
            )
            pruner.step()
    except OutOfTime:
        return Outcome(0, 0, False, f"no result in {TP_SECONDS} s (still searching its dependency groups)")
    return outcome(pruned, model, planned, inputs)


def measure(name: str) -> tuple[dict[str, Outcome], float, int, int]:
    """Outcomes by method, our analysis time (s), the parameter count and the planned layer count."""
    model, inputs = zoo.build(name, "bench")
    output_layer = zoo.ZOO[name].output_layer
    planned = planned_layers(model, output_layer)
    start = time.perf_counter()
    groups = channel_groups(capture_graph(model, inputs))
    analysis = time.perf_counter() - start
    results = {
        "ours": outcome(ours(model, inputs), model, planned, inputs),
        FLOOR: outcome(ours_at_floor_counts(model, inputs, groups, set(planned)), model, planned, inputs),
        "Torch-Pruning": torch_pruning(model, inputs, [output_layer], planned),
    }
    if name not in CNNS:
        qkv = [n for n in planned if n.rsplit(".", 1)[-1] in ATTENTION]
        results["Torch-Pruning, q/k/v ignored"] = torch_pruning(model, inputs, [output_layer, *qkv], planned)
    if any(is_conv1d(model.get_submodule(n)) for n in planned):
        for method in ("Torch-Pruning", "Torch-Pruning, q/k/v ignored"):
            if results[method].removed == 0:
                results[method].note = "Torch-Pruning has no pruner for transformers' Conv1D: nothing pruned"
    return results, analysis, sum(p.numel() for p in model.parameters()), len(planned)


def section(measured: dict[str, tuple]) -> str:
    lines = [
        SECTION,
        "",
        f"`{' '.join(['python bench/prune_zoo.py', *sys.argv[1:]])}`",
        "",
        f"- torch {torch.__version__}, torch-pruning {version('torch-pruning')}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; zoo models at the benchmark size, random init (seed 0), inputs of batch 2",
        f"- ratio {RATIO}, `ascend_optimized: false`; planned: every Conv2d/Linear/Conv1D but depthwise convs and the "
        "output layer; pruned: planned layers that lost output channels; removed: parameters of the whole model",
        "- analysis: graph capture (one recorded run, lightning_amct.graph) and channel groups, once, on the unpruned model",
        "- at a ratio r, BCP keeps N - round(r N) channels of a group of N (algorithms.md), Torch-Pruning "
        "floor((1 - r) N): one channel more where r N has a fraction under one half; the row 'ours, floor(0.7N) kept' "
        "applies our groups and scores at Torch-Pruning's counts",
        "",
        "| model | params | analysis s | method | pruned / planned | removed | runs | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (results, analysis, params, planned) in measured.items():
        for method, result in results.items():
            head = f"{name} | {params:,} | {analysis:.2f}" if method == "ours" else " | | "
            lines.append(
                f"| {head} | {method} | {result.pruned}/{planned} ({result.pruned / planned:.0%}) "
                f"| {result.removed:,} ({result.removed / params:.1%}) | {'yes' if result.runs else 'no'} "
                f"| {result.note} |"
            )
    lines += ["", "Targets:", ""] + [f"- {line}" for line in verdicts(measured)]
    return "\n".join(lines) + "\n"


def verdicts(measured: dict[str, tuple]) -> list[str]:
    cnns = {name: value for name, value in measured.items() if name in CNNS}
    lines = []
    if cnns:
        share = {name: r["ours"].pruned / planned for name, (r, _, _, planned) in cnns.items()}
        lowest = min(share, key=share.get)
        lines.append(
            f"at least 80 % of the planned layers pruned on every zoo CNN: {_verdict(share[lowest] >= 0.8)} "
            f"(lowest {share[lowest]:.0%}, {lowest})"
        )
        short = [n for n, (r, _, _, _) in cnns.items() if r[FLOOR].removed < r["Torch-Pruning"].removed]
        fewer = f" (fewer on {', '.join(short)})" if short else ""
        lines.append(
            "parameters removed >= Torch-Pruning's on every zoo CNN at the same channel ratio (the same channels "
            f"kept per group, the row '{FLOOR}'): {_verdict(not short)}{fewer}"
        )
        gaps = {
            n: (r["Torch-Pruning"].removed - r["ours"].removed) / params
            for n, (r, _, params, _) in cnns.items()
            if r["ours"].removed < r["Torch-Pruning"].removed
        }
        if gaps:
            listed = ", ".join(f"{n} ({gap:.1%} of the model)" for n, gap in gaps.items())
            lines.append(
                f"at prune_ratio {RATIO} with each tool's own rounding of r N, ours removes fewer parameters on "
                f"{listed}: there Torch-Pruning keeps one channel fewer in some groups (floor((1 - r) N) against "
                "N - round(r N)), not a better structure"
            )
    slowest = max(measured, key=lambda name: measured[name][1])
    seconds = measured[slowest][1]
    verdict = _verdict(seconds < 10)
    lines.append(f"analysis of every zoo model under 10 s: {verdict} (slowest {slowest}, {seconds:.2f} s)")
    return lines


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(BENCH / "results.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the analysis names what it does not understand; the table says it
    start = time.perf_counter()
    measured = {}
    for name in args.models:
        measured[name] = measure(name)
        print(f"{name}: done after {time.perf_counter() - start:.0f} s", flush=True)
    text = section(measured)
    write_section(Path(args.results), "prune_zoo", text)
    print(text)
    print(f"written to {args.results}; total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
