"""YAML values against parameter annotations: what fits, what does not, and what only the object can tell."""

from __future__ import annotations

import collections.abc
import datetime
from pathlib import Path
from typing import Literal, Optional, Union

import pytest

from lightning_amct.pipeline.annotations import describe, fits


@pytest.mark.parametrize(
    ("value", "annotation", "expected"),
    [
        (3, int, True),
        (True, int, False),  # a YAML bool is no count
        (3, float, True),
        ("3", float, False),
        ("runs", Union[str, Path, None], True),
        (None, Optional[int], True),
        ("bf16-mixed", Union[Literal[32, 16], Literal["bf16-mixed"], None], True),
        (16, Literal["16"], False),  # a Literal compares types too
        ([0, 1], list[int], True),
        ([0, "x"], list[int], False),
        ({"hours": 1}, dict[str, int], True),
        ({"hours": "one"}, dict[str, int], False),
        (5, Union[str, datetime.timedelta, None], None),  # a timedelta cannot come from YAML: the object decides
        (["x"], collections.abc.Iterable[datetime.timedelta], None),
        ("x", Union[int, datetime.timedelta], None),
        ("x", Union[int, float], False),
    ],
)  # fmt: skip
def test_a_value_fits_its_annotation_or_cannot_be_told(value: object, annotation: object, expected: object) -> None:
    assert fits(value, annotation) is expected


def test_annotations_in_words() -> None:
    assert describe(Optional[int]) == "int or None"
    assert describe(Union[bool, Literal["warn"], None]) == "bool, 'warn' or None"
    assert describe(Union[list[int], str, int]) == "a list, str or int"
    assert describe(dict[str, int]) == "a mapping"
