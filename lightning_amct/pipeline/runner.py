"""Running a recipe end to end: float model, compression training, artifacts, plots, summary.

Everything lands in the recipe's ``output_dir``::

    float.ckpt, compressed.ckpt          Lightning checkpoints of both stages
    float_model.onnx                     the float model, for the latency comparison
    model_compressed.pt, model_*.onnx,   the artifacts of lightning_amct.export.save_compressed
    model_record.txt, model_report.*
    clip_ranges.png, layers.png          lightning_amct.plots
    summary.md, summary.json             the closing table
    float/, compress/                    each stage's logs

Example:
    >>> from lightning_amct.pipeline import load_recipe
    >>> result = run_recipe(load_recipe("recipes/quant.yaml").with_budget(epochs=1, limit_batches=2))  # doctest: +SKIP
    >>> print(result.summary().to_markdown())  # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden

from lightning_amct.export.atomic import directory_obstacle, write_files_atomically
from lightning_amct.modules.apply import compression_state
from lightning_amct.pipeline.build import instantiate
from lightning_amct.pipeline.measure import (
    ModelNumbers,
    measure_model,
    onnx_latencies,
    save_float_onnx,
    state_dict_bytes,
)
from lightning_amct.pipeline.findings import budget_caveat, headline, settings_behind, step_time_caveat
from lightning_amct.pipeline.recipe import DEFAULT_DATA, ClassSpec, Recipe
from lightning_amct.pipeline.stages import StageResult, compress_stage, compression_callback, float_stage
from lightning_amct.pipeline.step_time import StepTimingError, paired_step_seconds, step_clock
from lightning_amct.pipeline.summary import Row, Summary
from lightning_amct.plan import CompressionPlan
from lightning_amct.plots import plot_clip_history, plot_layer_compression

FLOAT_ONNX = "float_model.onnx"
CLIP_PLOT = "clip_ranges.png"


@dataclass(frozen=True)
class RunResult:
    """What a recipe run measured and wrote.

    Attributes:
        recipe: the recipe as run (budget applied).
        float_result: the float stage's test metric, step time and checkpoint.
        compressed_result: the same for the compression stage.
        float_numbers: parameters, non-zero weights and FLOPs of the float model.
        compressed_numbers: the same for the compressed model.
        float_state_bytes: size of the float model's ``torch.save(state_dict)``.
        latency: median ONNX Runtime seconds per batch, by model: ``float``, ``deploy``,
            ``fake_quant``.
        artifacts: name → path of every file written (checkpoints, ONNX, export artifacts,
            pictures, summary).
        plan: the plan the compression stage applied.
        step_seconds: median seconds of a training step of the ``float`` and the ``compressed``
            model, taking turns after training (:mod:`~lightning_amct.pipeline.step_time`); None
            where a model could not step outside its Trainer (the summary then shows the stages'
            own medians).
        step_clock: how ``step_seconds`` were timed
            (:func:`~lightning_amct.pipeline.step_time.step_clock`); None without them.
        remarks: what the run could not do and why (a picture not drawn), for the summary.
        ranks: the processes that trained and tested (DDP: one per device).
    """

    recipe: Recipe
    float_result: StageResult
    compressed_result: StageResult
    float_numbers: ModelNumbers
    compressed_numbers: ModelNumbers
    float_state_bytes: int
    latency: dict[str, float]
    artifacts: dict[str, Path]
    plan: CompressionPlan
    step_seconds: dict[str, float] | None = None
    step_clock: str | None = None
    remarks: tuple[str, ...] = ()
    ranks: int = 1

    def summary(self) -> Summary:
        """The closing table, float against compressed, and what it means."""
        before, after = self.float_numbers, self.compressed_numbers
        start, end = self.float_result, self.compressed_result
        evaluate = self.recipe.evaluate
        checkpoint, deploy = _size(self.artifacts["checkpoint"]), _size(self.artifacts["deploy_onnx"])
        batch = f"ONNX Runtime, batch {evaluate.latency_batch_size}"
        if self.step_seconds is None:  # the stages' medians, minutes apart
            step_caveat = step_time_caveat(start.timed_steps, end.timed_steps)
            steps = start.step_seconds, end.step_seconds
        else:
            step_caveat = None
            steps = self.step_seconds["float"], self.step_seconds["compressed"]
        speedup = self.latency["float"] / self.latency["deploy"]
        change = end.metric - start.metric
        notes = [
            headline(speedup, evaluate.latency_batch_size, evaluate.latency_threads,
                     checkpoint / self.float_state_bytes, evaluate.metric, change),
            settings_behind(self.plan, self.recipe.compress_stage.quantize_outputs),
            *([budget] if (budget := budget_caveat(self.recipe.trainer, evaluate.metric, self.ranks)) else []),
            *([step_caveat] if step_caveat else []),
            *self.remarks,
        ]
        return Summary(
            self.recipe.name,
            [
                Row(evaluate.metric, start.metric, end.metric, "metric"),
                Row("parameters", before.params, after.params, "count"),
                Row("non-zero weights (before rounding)", before.nonzero_weights, after.nonzero_weights, "count"),
                Row("FLOPs per sample", before.flops_per_sample, after.flops_per_sample, "count"),
                Row("train step (median)", *steps, "seconds", not step_caveat),
                Row("PyTorch file (state_dict / compressed.pt)", self.float_state_bytes, checkpoint, "bytes"),
                Row("ONNX file (float / deploy)", _size(self.artifacts["float_onnx"]), deploy, "bytes"),
                Row(f"{batch} (float / deploy)", self.latency["float"], self.latency["deploy"], "seconds"),
                Row(f"{batch} (float / fake-quant)", self.latency["float"], self.latency["fake_quant"], "seconds"),
            ],
            notes,
        )  # fmt: skip


def run_recipe(recipe: Recipe) -> RunResult | None:
    """Run ``recipe`` end to end (see the module docstring for what it writes).

    Under DDP (``trainer: {devices: 2}``: Lightning starts the command once per device) every
    rank trains and tests, and rank 0 alone writes the checkpoints, measures, exports and
    summarises; the other ranks return None once the compression stage is over.

    Raises:
        RecipeError: the model or data cannot be built as written, the model has no
            ``example_input_array`` or ``test_step``, the data no ``test_dataloader``, or the
            test stage does not log the recipe's metric.
        ConfigError: the retrain config names a layer or type the model lacks (found before
            anything trains).
    """
    out = recipe.output_dir
    pl.seed_everything(recipe.seed, workers=True)
    module = instantiate(recipe.model, pl.LightningModule, "model", recipe.source)
    datamodule = _data(recipe, module)
    example = module.example_input_array
    if example is None:
        raise recipe.error(
            f"{type(module).__name__} has no example_input_array; set it in __init__ "
            "(it traces shapes for pruning, counts FLOPs and exports ONNX)",
            "model",
        )
    _check_test_stage(recipe, module, datamodule)
    callback = compression_callback(recipe)
    callback.resolve(module)  # the config against the model, before anything trains
    obstacle = directory_obstacle(out)
    if obstacle is not None:
        raise recipe.error(f"cannot write into {out}: {obstacle}", "output_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise recipe.error(f"cannot create {out}: {exc.strerror or exc}", "output_dir") from exc

    float_result = float_stage(recipe, module, datamodule)
    float_numbers = measure_model(module, example)
    float_bytes = state_dict_bytes(module)
    writes = module.global_rank == 0  # under DDP, rank 0 alone measures and writes
    float_onnx = save_float_onnx(module, example, out / FLOAT_ONNX) if writes else None

    compressed_result = compress_stage(recipe, module, datamodule, callback)
    if not writes:  # another rank: it trained and tested
        return None
    compressed_numbers = measure_model(module, example)
    exported = callback.artifacts  # written by the callback at the end of fit

    plan = compression_state(module).plan
    layers = plot_layer_compression(plan, float_numbers.stats, compressed_numbers.stats, out / "layers.png")
    pictures = {"layers_png": layers}
    remarks = []
    clips = plot_clip_history(callback.history, out / CLIP_PLOT)
    if clips is not None:
        pictures["clip_ranges_png"] = clips
    elif plan.quantized:  # said in the summary's notes
        remarks.append(_no_clip_plot(recipe, compressed_result))

    evaluate = recipe.evaluate
    onnx_models = {"float": float_onnx, "deploy": exported["deploy_onnx"], "fake_quant": exported["fake_quant_onnx"]}
    latency = onnx_latencies(
        onnx_models, example, evaluate.latency_batch_size, evaluate.latency_runs, evaluate.latency_threads
    )
    steps = _steps_in_turns(recipe, module, datamodule, float_result.checkpoint)
    if steps.remark:
        remarks.append(steps.remark)
    artifacts = {
        "float_ckpt": float_result.checkpoint,
        "compressed_ckpt": compressed_result.checkpoint,
        "float_onnx": float_onnx,
        **exported,
        **pictures,
    }
    result = RunResult(
        recipe,
        float_result,
        compressed_result,
        float_numbers,
        compressed_numbers,
        float_bytes,
        latency,
        artifacts,
        plan,
        steps.seconds,
        steps.clock,
        tuple(remarks),
        module.trainer.world_size,
    )
    artifacts.update(_write_summary(result))
    return result


def _data(recipe: Recipe, module: pl.LightningModule) -> pl.LightningDataModule | None:
    """The recipe's ``data``; without it, None where ``module`` defines its own dataloaders (the
    Trainer then calls them), else the demo digits."""
    if recipe.data is not None:
        return instantiate(recipe.data, pl.LightningDataModule, "data", recipe.source)
    if is_overridden("train_dataloader", module):
        return None
    return instantiate(ClassSpec(DEFAULT_DATA), pl.LightningDataModule, "data", recipe.source)


def _check_test_stage(recipe: Recipe, module: pl.LightningModule, datamodule: pl.LightningDataModule | None) -> None:
    """Both stages end in ``Trainer.test``, which measures ``evaluate.metric``: a module without
    ``test_step``, or data without ``test_dataloader``, is refused before anything trains."""
    data, data_key = (module, "model") if datamodule is None else (datamodule, "data")
    for owner, hook, key in ((module, "test_step", "model"), (data, "test_dataloader", data_key)):
        if not is_overridden(hook, owner):
            raise recipe.error(
                f"{type(owner).__name__} has no {hook}: the run measures {recipe.evaluate.metric} "
                "(evaluate.metric) in Lightning's test loop, after each stage",
                key,
            )


class _StepsInTurns(NamedTuple):
    """The training steps timed in turns: their medians and how they were timed, or why not."""

    seconds: dict[str, float] | None
    clock: str | None
    remark: str | None


def _steps_in_turns(
    recipe: Recipe, compressed: pl.LightningModule, datamodule: pl.LightningDataModule | None, float_checkpoint: Path
) -> _StepsInTurns:
    """The float model (built again, with the float checkpoint's weights) and ``compressed`` timed
    in turns on the first training batch (:mod:`~lightning_amct.pipeline.step_time`); their weights
    change, so this comes after everything else that reads ``compressed``.

    Returns the medians and how they were timed, or None and why not (for the summary's notes).
    """
    threads = recipe.evaluate.latency_threads
    try:
        float_module = _float_module_again(recipe, float_checkpoint, compressed.device)
        batch = next(iter((compressed if datamodule is None else datamodule).train_dataloader()))
        seconds = paired_step_seconds({"float": float_module, "compressed": compressed}, batch, threads=threads)
    except StepTimingError as error:
        why = f"train step: each stage's own median, timed minutes apart (no steps in turns: {error})."
        return _StepsInTurns(None, None, why)
    return _StepsInTurns(seconds, step_clock(compressed.device, threads)[1], None)


def _float_module_again(recipe: Recipe, checkpoint: Path, device: torch.device) -> pl.LightningModule:
    """The recipe's model as the float stage built it (``configure_model`` included), with the
    weights of ``checkpoint``.

    Raises:
        StepTimingError: it cannot be built so (a model that needs its Trainer for it, weights of
            another model).
    """
    try:
        module = instantiate(recipe.model, pl.LightningModule, "model", recipe.source)
        module.configure_model()
        module.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=False)["state_dict"])
    except Exception as error:  # whatever the user's code raises outside its Trainer
        raise StepTimingError(f"the float model could not be built again: {type(error).__name__}: {error}") from error
    return module.to(device)


def _no_clip_plot(recipe: Recipe, stage: StageResult) -> str:
    every = recipe.compress_stage.log_every_n_steps or recipe.trainer.get("log_every_n_steps")
    when = f"every {every} steps" if every else "every log_every_n_steps of the Trainer (50 by default)"
    return (
        f"{CLIP_PLOT} not drawn: the callback records clips {when}, and the compression stage trained "
        f"{stage.trained_steps} step(s) (--fast, or lower compress.log_every_n_steps)"
    )


def _size(path: Path) -> int:
    return path.stat().st_size


def _shown(path: Path, out: Path) -> str:
    return str(path.relative_to(out)) if path.is_relative_to(out) else str(path)


def _write_summary(result: RunResult) -> dict[str, Path]:
    """Write ``summary.md`` (table, notes, files, pictures) and ``summary.json``."""
    out, evaluate, artifacts = result.recipe.output_dir, result.recipe.evaluate, result.artifacts
    summary = result.summary()
    steps = (
        "median wall time of one training step (forward, backward, optimizer) in each stage"
        if result.step_clock is None
        else f"median {result.step_clock}, of one training step (forward, backward, optimizer) on one "
        "training batch, the two models taking turns after training"
    )
    lines = [
        f"# {summary.name}",
        "",
        summary.to_markdown(),
        "",
        f"ONNX Runtime: CPU execution provider, batch {evaluate.latency_batch_size}, "
        f"{evaluate.latency_threads or 'default'} intra-op thread(s), median of {evaluate.latency_runs} runs "
        f"({'CPU time of the computing thread' if evaluate.latency_threads == 1 else 'wall time'}), the models "
        f"taking turns. Train step: {steps}. "
        "Change: difference for the metric, compressed / float otherwise.",
        "",
        "## Files",
        "",
        *(f"- `{_shown(path, out)}` ({_size(path):,} bytes)" for path in artifacts.values()),
    ]
    pictures = [path for path in artifacts.values() if path.suffix == ".png"]
    if pictures:
        lines += ["", "## Pictures", "", *(f"![{path.stem}]({path.name})" for path in pictures)]
    markdown, data = out / "summary.md", out / "summary.json"
    write_files_atomically({
        markdown: ("\n".join(lines) + "\n").encode(),
        data: (json.dumps(summary.to_dict(), indent=2) + "\n").encode(),
    })  # fmt: skip
    return {"summary_md": markdown, "summary_json": data}
