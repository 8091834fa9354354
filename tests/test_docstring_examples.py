"""Every example in the package's docstrings runs and shows what it claims."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_amct

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(lightning_amct.__path__, prefix="lightning_amct.")
    if not info.name.endswith("_pb2")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples of {name} failed"
