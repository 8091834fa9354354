"""How config errors and warnings read: one line, location first, then field, then what is wrong."""

from __future__ import annotations

import doctest
import pickle

import pytest

import lightning_amct.config
from lightning_amct.config import ConfigError, ConfigWarning, errors, loader, locations, validate
from lightning_amct.config.errors import format_field_path, unknown_field_message
from lightning_amct.proto.retrain_config_pytorch_pb2 import RetrainDataQuantConfig


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("bad", "quant.cfg", 7, 21, "a.b"), "quant.cfg:7:21: a.b: bad"),
        (("bad", "quant.cfg", 7, None, "a.b"), "quant.cfg:7: a.b: bad"),
        (("bad", "quant.cfg", None, None, None), "quant.cfg: bad"),
        (("bad", None, 3, 5, "a"), "<text>:3:5: a: bad"),
        (("bad", None, None, None, "a[0].b"), "a[0].b: bad"),
        (("bad",), "bad"),
    ],
)
def test_str_omits_unknown_parts(args: tuple, expected: str) -> None:
    assert str(ConfigError(*args)) == expected
    assert str(ConfigWarning(*args)) == expected


def test_attributes_and_types() -> None:
    error = ConfigError("bad", "quant.cfg", 7, 21, "a.b")
    assert (error.message, error.path, error.line, error.column, error.field) == ("bad", "quant.cfg", 7, 21, "a.b")
    assert isinstance(error, ValueError)
    assert issubclass(ConfigWarning, UserWarning)


def test_survives_pickling() -> None:
    error = pickle.loads(pickle.dumps(ConfigError("bad", "quant.cfg", 7, 21, "a.b")))
    assert (str(error), error.line, error.column) == ("quant.cfg:7:21: a.b: bad", 7, 21)


@pytest.mark.parametrize(
    ("field_path", "expected"),
    [
        ((), ""),
        (("batch_num",), "batch_num"),
        (("skip_layers", 2), "skip_layers[2]"),
        (("override_layer_configs", 0, "layer_name"), "override_layer_configs[0].layer_name"),
    ],
)
def test_format_field_path(field_path: tuple, expected: str) -> None:
    assert format_field_path(field_path) == expected


def test_unknown_field_suggests_the_closest_and_lists_all() -> None:
    message = unknown_field_message(RetrainDataQuantConfig.DESCRIPTOR, "ulq_quantise")
    assert message == (
        'unknown field "ulq_quantise" in RetrainDataQuantConfig, did you mean "ulq_quantize"? '
        "(valid fields: ulq_quantize)"
    )


@pytest.mark.parametrize("module", [lightning_amct.config, errors, locations, loader, validate])
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module)
    assert result.attempted > 0
    assert result.failed == 0
