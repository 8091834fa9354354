"""Damaged configs: loading gives a valid message or a ConfigError, never any other exception.

The text cases mutate the sample configs the way editing goes wrong (a line dropped or doubled, a
value retyped, a file cut short, stray characters); the mapping cases put odd values where a YAML
recipe could. A config that loads must also survive a round trip through text and through a dict,
so what a checkpoint stores reads back the same.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

from google.protobuf import json_format, text_format
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_amct.config import ConfigError, ConfigWarning, load_config
from lightning_amct.proto.retrain_config_pytorch_pb2 import AMCTRetrainConfig

SEED_TEXTS = [path.read_text() for path in sorted((Path(__file__).parent / "data").glob("*.cfg"))]
VALUES = [
    "INT4", "INT9", "INT16", "2", "M4N2", "FORCE_FP16_QUANT", "-1", "0", "0.5", "1", "1e40", "0x10", "6.0f",
    "nan", "-inf", "true", "True", "t", "yes", '"Opname"', "'x'", '"open', '"\\q"', "{", "}", "{ }", "<", ">",
    "[", "]", '["a", "b"]', "[]", ":", ",", ";", "", "# comment",
]  # fmt: skip
SETTINGS = settings(max_examples=200, deadline=None, database=None)


def _drop(draw: st.DrawFn, lines: list[str]) -> list[str]:
    index = draw(st.integers(0, len(lines) - 1))
    return lines[:index] + lines[index + 1 :]


def _duplicate(draw: st.DrawFn, lines: list[str]) -> list[str]:
    index = draw(st.integers(0, len(lines) - 1))
    return lines[: index + 1] + lines[index:]


def _retype(draw: st.DrawFn, lines: list[str]) -> list[str]:
    index = draw(st.integers(0, len(lines) - 1))
    name, colon, _ = lines[index].partition(":")
    value = draw(st.sampled_from(VALUES) | st.text(max_size=6))
    return [*lines[:index], f"{name}{colon or ':'} {value}", *lines[index + 1 :]]


def _truncate(draw: st.DrawFn, lines: list[str]) -> list[str]:
    text = "\n".join(lines)
    return text[: draw(st.integers(0, len(text)))].split("\n")


def _insert_garbage(draw: st.DrawFn, lines: list[str]) -> list[str]:
    text = "\n".join(lines)
    at = draw(st.integers(0, len(text)))
    garbage = draw(st.sampled_from(VALUES) | st.text(max_size=12))
    return (text[:at] + garbage + text[at:]).split("\n")


MUTATIONS: list[Callable[[st.DrawFn, list[str]], list[str]]] = [
    _drop,
    _duplicate,
    _retype,
    _truncate,
    _insert_garbage,
]


@st.composite
def mutated_configs(draw: st.DrawFn) -> str:
    lines = draw(st.sampled_from(SEED_TEXTS)).split("\n")
    for mutate in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)):
        if lines:
            lines = mutate(draw, lines)
    return "\n".join(lines)


def _leaf_paths(value: object, path: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [path] + [leaf for key, item in value.items() for leaf in _leaf_paths(item, (*path, key))]
    if isinstance(value, list):
        return [path] + [leaf for index, item in enumerate(value) for leaf in _leaf_paths(item, (*path, index))]
    return [path]


SCALARS = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8)
ODD_VALUES = st.recursive(
    SCALARS | st.binary(max_size=4),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def mutated_mappings(draw: st.DrawFn) -> dict:
    config = text_format.Parse(draw(st.sampled_from(SEED_TEXTS)), AMCTRetrainConfig())
    mapping = json_format.MessageToDict(config, preserving_proto_field_name=True)
    path = draw(st.sampled_from(_leaf_paths(mapping)[1:]))
    parent = mapping
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = draw(ODD_VALUES)
    return mapping


def _assert_loads_or_refuses(source: object) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        try:
            config = load_config(source)
        except ConfigError as error:
            assert error.message
            return
        assert isinstance(config, AMCTRetrainConfig)
        assert load_config(text_format.MessageToString(config)) == config
        assert load_config(json_format.MessageToDict(config)) == config



@SETTINGS
@given(mutated_configs())
def test_mutated_text_loads_or_raises_config_error(text: str) -> None:
    _assert_loads_or_refuses(text)


@settings(max_examples=100, deadline=None, database=None)
@given(mutated_mappings())
def test_mutated_mapping_loads_or_raises_config_error(mapping: dict) -> None:
    _assert_loads_or_refuses(mapping)
