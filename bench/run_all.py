"""Every recipe in one run: accuracy, training step time, artifact sizes, ONNX Runtime latency.

For each ``recipes/*.yaml`` (or those named with ``--recipes``):

1. The recipe runs end to end through :func:`lightning_amct.pipeline.run_recipe`: float model,
   compression training, artifacts, summary (in ``--output-dir``/<recipe>). The float model is
   trained once, by the first recipe; the others start from its checkpoint (they share model,
   data and float stage).
2. Accuracy: the float model and the compressed one on the test split, and a second float
   baseline fine-tuned as many epochs as the compression stage (``bench/accuracy.py``'s
   ``train``/``test_accuracy``), since the compressed model also trained longer. The drop is
   measured from that fine-tuned baseline and checked against ``accuracy.TARGETS``.
3. Step time: one training step (forward, loss, backward, AdamW step) at batch 64, timed with
   ``bench/qat_step_time.py``'s functions, every variant taking turns: the float network, the
   network compressed by each recipe, and torch.ao QAT (``prepare_qat_fx``, its x86 default).
4. Sizes and latency, from each run: ``model_compressed.pt`` against the float ``state_dict``,
   the deploy ONNX against the float ONNX, and ONNX Runtime CPU latency at batch 64 (float,
   deploy and fake-quant ONNX taking turns, median).

Writes its section of ``bench/results.md`` (``--results`` elsewhere).

Usage (from the repository root)::

    python bench/run_all.py [--recipes quant prune] [--epochs N] [--limit-batches N] [--repeats 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import accuracy
import lightning.pytorch as pl
import qat_step_time
from results_file import write_section
import torch

from lightning_amct import compress_model
from lightning_amct.pipeline import Recipe, RunResult, load_recipe, run_recipe
from lightning_amct.pipeline.build import instantiate
from lightning_amct.pipeline.stages import load_float_checkpoint

BENCH = Path(__file__).resolve().parent
RECIPES = BENCH.parent / "recipes"
NAMES = ["quant", "a8w4", "prune", "selective_prune", "compressed1", "compressed2"]
BATCH = 64
OPTIMIZER = "adamw"  # the demo classifier's own optimizer


def run_recipes(names: list[str], args: argparse.Namespace) -> dict[str, RunResult]:
    """Each recipe end to end; the first trains the float model, the others reuse it."""
    results: dict[str, RunResult] = {}
    first: RunResult | None = None
    for name in names:
        recipe = load_recipe(RECIPES / f"{name}.yaml").with_budget(
            args.epochs, args.limit_batches, Path(args.output_dir) / name
        )
        recipe = dataclasses.replace(recipe, trainer={**recipe.trainer, "enable_progress_bar": False})
        if first is not None and _same_float(first.recipe, recipe):
            recipe = recipe.with_budget(float_ckpt=str(first.float_result.checkpoint))
        print(f"[{name}] running {recipe.compress_stage.config}", flush=True)
        results[name] = run_recipe(recipe)
        first = first or results[name]
    return results


def _same_float(a: Recipe, b: Recipe) -> bool:
    return (a.model, a.data, a.float_stage, a.seed) == (b.model, b.data, b.float_stage, b.seed)


def finetuned_float_accuracy(result: RunResult) -> float:
    """Test accuracy (0..1) of the float model after as many more epochs as the compression stage."""
    recipe = result.recipe
    module = instantiate(recipe.model, pl.LightningModule, "model")
    load_float_checkpoint(module, result.float_result.checkpoint)
    data = instantiate(recipe.data, pl.LightningDataModule, "data")
    trained = accuracy.train(module, data, recipe.compress_stage.epochs, recipe.seed, [])
    return accuracy.test_accuracy(trained, data) / 100


def step_times(results: dict[str, RunResult], args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per training step: ``float``, ``torch.ao`` and one entry per recipe."""
    x, y = qat_step_time.batch_for("demo", BATCH)
    models = {variant: qat_step_time.build("demo", variant, x) for variant in ("float", "torch.ao")}
    for name, result in results.items():
        models[name] = _compressed_network(result.recipe, x)
    steps = {name: qat_step_time.training_step(model, OPTIMIZER, x, y) for name, model in models.items()}
    return qat_step_time.median_step_times(steps, args.warmup, args.repeats)


def _compressed_network(recipe: Recipe, x: torch.Tensor) -> torch.nn.Module:
    """The recipe's model, freshly initialised, compressed by its config and calibrated on ``x``."""
    torch.manual_seed(0)
    module = instantiate(recipe.model, pl.LightningModule, "model").train()
    compress_model(module, recipe.compress_stage.config, module.example_input_array)
    with torch.no_grad():
        module(x)  # the calibration batch: IFMR sets the activation clips
    return module


def results_table(
    results: dict[str, RunResult], baseline: dict[str, float], steps: dict[str, float], args: argparse.Namespace
) -> str:
    """``bench/results.md``: the setup, then one row per recipe."""
    first = next(iter(results.values()))
    recipe = first.recipe
    float_onnx = first.artifacts["float_onnx"].stat().st_size
    lines = [
        "# All recipes, one run",
        "",
        f"`{' '.join(['python bench/run_all.py', *sys.argv[1:]])}`",
        "",
        f"- model `{recipe.model.class_path}` {dict(recipe.model.init_args)}, data `{recipe.data.class_path}` "
        f"{dict(recipe.data.init_args)}; float stage {recipe.float_stage.epochs} epochs, compression "
        f"{recipe.compress_stage.epochs} epochs, limit batches {args.limit_batches or 'none'}; seed {recipe.seed}",
        f"- torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs",
        f"- float: test acc {first.float_result.metric:.4f} after its float stage, "
        f"{baseline[next(iter(baseline))]:.4f} fine-tuned {recipe.compress_stage.epochs} more epochs (the baseline "
        f"of the drop); state_dict {first.float_state_bytes:,} B, ONNX {float_onnx:,} B; "
        f"step {steps['float'] * 1e3:.2f} ms, torch.ao QAT step {steps['torch.ao'] * 1e3:.2f} ms",
        f"- step: forward, cross-entropy, backward, {OPTIMIZER} step at batch {BATCH}, median of {args.repeats} "
        f"after {args.warmup} warm-up steps, all variants taking turns; ONNX Runtime: CPU provider, batch "
        f"{recipe.evaluate.latency_batch_size}, {recipe.evaluate.latency_threads or 'default'} intra-op thread(s), "
        f"median of {recipe.evaluate.latency_runs} runs, models taking turns",
        "",
        "| recipe | float acc (fine-tuned) | compressed acc | drop (pts) | target | step x float | step x torch.ao "
        "| compressed.pt | deploy.onnx | ORT float ms | ORT deploy ms | ORT fake-quant ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        drop = 100 * (baseline[name] - result.compressed_result.metric)
        target = accuracy.TARGETS.get(name)
        verdict = "reported" if target is None else f"<= {target}: {'pass' if drop <= target else 'FAIL'}"
        checkpoint = result.artifacts["checkpoint"].stat().st_size
        deploy = result.artifacts["deploy_onnx"].stat().st_size
        latency = result.latency
        lines.append(
            f"| {name} | {baseline[name]:.4f} | {result.compressed_result.metric:.4f} | {drop:+.2f} | {verdict} "
            f"| {steps[name] / steps['float']:.2f}x | {steps[name] / steps['torch.ao']:.2f}x "
            f"| {checkpoint:,} B ({checkpoint / result.float_state_bytes:.0%}) "
            f"| {deploy:,} B ({deploy / float_onnx:.0%}) | {latency['float'] * 1e3:.2f} "
            f"| {latency['deploy'] * 1e3:.2f} | {latency['fake_quant'] * 1e3:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", choices=NAMES, default=NAMES)
    parser.add_argument("--epochs", type=int, help="epochs of each stage (default: the recipes')")
    parser.add_argument("--limit-batches", type=int, help="train, validation and test batches per epoch")
    parser.add_argument("--output-dir", default="runs/bench", help="where each recipe's run goes")
    parser.add_argument("--results", default=str(BENCH / "results.md"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    start = time.perf_counter()

    results = run_recipes(args.recipes, args)
    finetuned: dict[tuple[Path, int], float] = {}  # by float checkpoint and epochs: computed once
    baseline = {}
    for name, result in results.items():
        key = (result.float_result.checkpoint, result.recipe.compress_stage.epochs)
        if key not in finetuned:
            finetuned[key] = finetuned_float_accuracy(result)
        baseline[name] = finetuned[key]
    steps = step_times(results, args)
    table = results_table(results, baseline, steps, args)
    write_section(Path(args.results), "run_all", table)
    print(table)
    print(f"written to {args.results}; total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
