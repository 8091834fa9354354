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
:mod:`~.step_time` (the two models' training steps, timed in turns),
:mod:`~.summary` (the table), :mod:`~.runner` (the whole run), :mod:`~.command` (the shell).
"""

from lightning_amct.lazy import lazy_exports

# Imported on first use: a recipe error is reported before Lightning is imported.
__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "lightning_amct.pipeline.command": ("run_command",),
        "lightning_amct.pipeline.recipe": ("Recipe", "RecipeError", "load_recipe", "parse_recipe"),
        "lightning_amct.pipeline.runner": ("RunResult", "run_recipe"),
        "lightning_amct.pipeline.summary": ("Summary",),
    },
    globals(),
)
