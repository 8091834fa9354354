"""Classes named by path on a command line or in a recipe: importing them, checking their arguments.

Both fail with a :class:`ClassPathError` whose one-line message says what was not found and what
would be valid, so the command line and the recipe runner can print it as it is.

Example:
    >>> import_object("lightning_amct.demo:DemoNet").__name__
    'DemoNet'
    >>> import_object("lightning_amct.demo.DemoNett")
    Traceback (most recent call last):
    ...
    lightning_amct.class_path.ClassPathError: module 'lightning_amct.demo' has no attribute 'DemoNett'; did you mean 'DemoNet'?
    >>> from lightning_amct.demo.model import DemoNet
    >>> check_arguments(DemoNet, {"widht": 8})
    Traceback (most recent call last):
    ...
    lightning_amct.class_path.ClassPathError: DemoNet takes no argument 'widht'; did you mean 'width'? (valid: num_classes, width)
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
from collections.abc import Mapping
from types import ModuleType


class ClassPathError(ValueError):
    """A class path that names nothing importable, or arguments its class does not take."""


def import_object(spec: str) -> object:
    """``package.module:Name`` or ``package.module.Name`` (``Name`` may be dotted after ``:``) → the object.

    Raises:
        ClassPathError: the path is malformed, its module does not exist, or the module has no
            such attribute (the message suggests close names).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ClassPathError(f"expected package.module.Name or package.module:Name, got {spec!r}")
    obj: object = _import_module(module_name)
    for part in attr.split("."):
        obj = _attribute(obj, part)
    return obj


def check_arguments(cls: type, arguments: Mapping[str, object]) -> None:
    """Check that ``cls(**arguments)`` names only parameters ``cls`` takes (values are not checked).

    Raises:
        ClassPathError: an argument it does not take (with close names and every valid one).
    """
    parameters = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    valid = [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for name in arguments:
        if name not in valid:
            hint = _did_you_mean(name, valid)
            raise ClassPathError(f"{cls.__name__} takes no argument {name!r}{hint} (valid: {', '.join(valid)})")


def build(cls: type, arguments: Mapping[str, object]) -> object:
    """``cls(**arguments)``, after :func:`check_arguments`.

    Raises:
        ClassPathError: an argument ``cls`` does not take, or ``cls`` raised while being built
            (its error in the message: the command line and a recipe print one line).
    """
    check_arguments(cls, arguments)
    try:
        return cls(**arguments)
    except Exception as exc:  # the user's constructor raises any type
        shown = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
        raise ClassPathError(f"{cls.__name__}({shown}) failed: {type(exc).__name__}: {exc}") from exc


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(f"{exc.name}.")):
            raise ClassPathError(f"no module named {exc.name!r}") from exc
        raise ClassPathError(f"importing {name} failed: {exc}") from exc


def _attribute(obj: object, name: str) -> object:
    """``obj.name``; for a package, also a submodule not imported yet."""
    if hasattr(obj, name):
        return getattr(obj, name)
    package = isinstance(obj, ModuleType) and hasattr(obj, "__path__")  # a plain module has no submodules
    if package and importlib.util.find_spec(f"{obj.__name__}.{name}") is not None:
        return importlib.import_module(f"{obj.__name__}.{name}")
    raise ClassPathError(f"{_describe(obj)} has no attribute {name!r}{_did_you_mean(name, dir(obj))}")


def _describe(obj: object) -> str:
    return f"module {obj.__name__!r}" if isinstance(obj, ModuleType) else repr(obj)


def _did_you_mean(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, [c for c in choices if not c.startswith("_")], n=3, cutoff=0.6)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
