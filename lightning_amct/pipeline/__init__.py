"""The main job: one recipe from float training to compressed artifacts and a summary table.

``lightning-amct run recipes/quant.yaml`` trains the float model (or loads it), trains it again
with :class:`~lightning_amct.CompressionCallback`, writes the artifacts of
:func:`lightning_amct.export.save_compressed`, draws the pictures of :mod:`lightning_amct.plots`
and ends with float vs compressed: test metric, parameters, FLOPs, step time, file sizes and
ONNX Runtime latency. The same from Python::

    from lightning_amct.pipeline import load_recipe, run_recipe

    result = run_recipe(load_recipe("recipes/quant.yaml"))
    print(result.summary().to_markdown())

Modules: :mod:`~.recipe` (the YAML schema), :mod:`~.build` (model and data from class paths),
:mod:`~.stages` (the two Lightning runs), :mod:`~.measure` (sizes, FLOPs, latency),
:mod:`~.summary` (the table), :mod:`~.runner` (the whole run), :mod:`~.command` (the shell).
"""

from lightning_amct.pipeline.command import run_command
from lightning_amct.pipeline.recipe import Recipe, RecipeError, load_recipe, parse_recipe
from lightning_amct.pipeline.runner import RunResult, run_recipe
from lightning_amct.pipeline.summary import Summary

__all__ = ["Recipe", "RecipeError", "RunResult", "Summary", "load_recipe", "parse_recipe", "run_command", "run_recipe"]
