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

import importlib
import inspect
from typing import TypeVar

from lightning_amct.pipeline.recipe import ClassSpec, RecipeError

T = TypeVar("T")


def instantiate(spec: ClassSpec, base: type[T], key: str) -> T:
    """``spec.class_path(**spec.init_args)``, checked to be a ``base``.

    Args:
        spec: the class path (``package.module.Class``) and keyword arguments.
        base: the class it must derive from (LightningModule, LightningDataModule).
        key: the recipe key, for error messages (``model``, ``data``).

    Raises:
        RecipeError: the class cannot be imported, is not a ``base``, or does not take one of
            the arguments (the message lists those it takes).
    """
    cls = _import_class(spec.class_path, key)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise RecipeError(f"{key}.class_path: {spec.class_path} is not a {base.__name__}")
    parameters = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    valid = [name for name, p in parameters.items() if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD]
    for name in spec.init_args:
        if name not in valid and not takes_any:
            raise RecipeError(f"{key}.init_args: {cls.__name__} takes no argument {name!r} (valid: {', '.join(valid)})")
    return cls(**spec.init_args)


def _import_class(class_path: str, key: str) -> object:
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise RecipeError(f"{key}.class_path: expected package.module.Class, got {class_path!r}")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise RecipeError(f"{key}.class_path: cannot import {class_path}: {exc}") from exc
