"""Instantiating a recipe's model and data from their class paths, with errors that list options.

Example:
    >>> from lightning_amct.pipeline.recipe import ClassSpec
    >>> import lightning.pytorch as pl
    >>> spec = ClassSpec("lightning_amct.demo.DemoClassifier", {"width": 16})
    >>> module = instantiate(spec, pl.LightningModule, "model")
    >>> module.hparams.width
    16
"""

from __future__ import annotations

from typing import TypeVar

from lightning_amct.class_path import ClassPathError, build, import_object
from lightning_amct.pipeline.recipe import ClassSpec
from lightning_amct.pipeline.recipe_source import RecipeSource

T = TypeVar("T")


def instantiate(spec: ClassSpec, base: type[T], key: str, source: RecipeSource | None = None) -> T:
    """``spec.class_path(**spec.init_args)``, checked to be a ``base``.

    Args:
        spec: the class path (``package.module.Class``) and keyword arguments.
        base: the class it must derive from (LightningModule, LightningDataModule).
        key: the recipe key, for error messages (``model``, ``data``).
        source: where the recipe's keys were written, to put errors at their line.

    Raises:
        RecipeError: the class cannot be imported, is not a ``base``, does not take one of the
            arguments (the message suggests close names and lists those it takes), or raised
            while being built.
    """
    source = source or RecipeSource()
    try:
        cls = import_object(spec.class_path)
    except ClassPathError as exc:
        raise source.error(str(exc), (key, "class_path")) from exc
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise source.error(f"{spec.class_path} is not a {base.__name__}", (key, "class_path"))
    try:
        return build(cls, spec.init_args)
    except ClassPathError as exc:
        raise source.error(str(exc), (key, "init_args")) from exc
