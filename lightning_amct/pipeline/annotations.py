"""Whether a value read from YAML fits a parameter's type annotation, for checks before a run starts.

A recipe's ``trainer:`` section goes to Lightning's ``Trainer``, which checks some arguments when it
is built and others only when it trains (``log_every_n_steps: many`` fails in the float stage's
first logging step). :func:`fits` compares a YAML value (None, bool, int, float, str, list, dict)
with the annotation of the parameter it is for, so that the recipe's loader can say so at the
value's line instead. Classes that YAML cannot produce (a ``Logger``, a ``timedelta``) neither
match nor rule a value out: :func:`fits` then answers None, and the Trainer decides.

Example:
    >>> from typing import Literal, Optional, Union
    >>> fits("many", Optional[int]), fits(5, Optional[int]), fits(True, int)
    (False, True, False)
    >>> fits("maybe", Union[bool, Literal["warn"], None]), describe(Union[bool, Literal["warn"], None])
    (False, "bool, 'warn' or None")
"""

from __future__ import annotations

import collections.abc
import types
import typing
from pathlib import Path
from typing import Any

#: Annotations that YAML values can match, and the test for each (bool is no int here, as in YAML).
_SCALARS: dict[Any, typing.Callable[[object], bool]] = {
    type(None): lambda value: value is None,
    bool: lambda value: isinstance(value, bool),
    int: lambda value: isinstance(value, int) and not isinstance(value, bool),
    float: lambda value: isinstance(value, (int, float)) and not isinstance(value, bool),
    str: lambda value: isinstance(value, str),
    Path: lambda value: isinstance(value, str),
}
_SEQUENCES = (list, collections.abc.Iterable, collections.abc.Sequence)


def fits(value: object, annotation: Any) -> bool | None:
    """Whether ``value`` fits ``annotation``; None where the annotation names a class that YAML
    cannot produce and nothing else fits (only building the object can tell)."""
    if annotation in _SCALARS:
        return _SCALARS[annotation](value)
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return any(value == option and type(value) is type(option) for option in arguments)
    if origin in (typing.Union, types.UnionType):
        answers = [fits(value, member) for member in arguments]
        return True if True in answers else (None if None in answers else False)
    if origin in _SEQUENCES or annotation in _SEQUENCES:
        return isinstance(value, list) and (not arguments or _every_item_fits(value, arguments[0]))
    if origin is dict or annotation is dict:
        return isinstance(value, dict) and (not arguments or _every_item_fits(value.values(), arguments[1]))
    return None


def _every_item_fits(items: collections.abc.Iterable, annotation: Any) -> bool | None:
    """:func:`fits` of every item: False where one does not, None where one cannot be told."""
    answers = [fits(item, annotation) for item in items]
    return False if False in answers else (None if None in answers else True)


def describe(annotation: Any) -> str:
    """``annotation`` in words, for an error message: ``"int or None"``."""
    parts = _options(annotation)
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} or {parts[-1]}"


def _options(annotation: Any) -> list[str]:
    """The alternatives of ``annotation`` in words, unions and literals flattened."""
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return [option for member in arguments for option in _options(member)]
    if origin is typing.Literal:
        return [repr(option) for option in arguments]
    if annotation is type(None):
        return ["None"]
    if origin in _SEQUENCES or annotation in _SEQUENCES:
        return ["a list"]
    if origin is dict or annotation is dict:
        return ["a mapping"]
    return [getattr(annotation, "__name__", str(annotation))]
