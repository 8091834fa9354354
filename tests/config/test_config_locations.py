"""Positions of fields in config text, and syntax errors reported at the token and field at fault."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest

from lightning_amct.config import ConfigError, ConfigWarning, SourceMap, load_config, load_config_with_locations

WEIGHTS = "retrain_weight_quant_config { arq_retrain {} }\n"  # enables a feature, so the file is valid


def locate(text: str, *field_path: str | int) -> tuple[int, int] | None:
    return load_config_with_locations(text)[1].locate(field_path)


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("retrain_data_quant_config {\n  ulq_quantize {\n    dst_type: INT4\n  }\n}", 1),
        ("retrain_data_quant_config: {\n  ulq_quantize: {\n    dst_type: INT4\n  }\n}", 1),
        ("retrain_data_quant_config <\n  ulq_quantize <\n    dst_type: INT4\n  >\n>", 1),
        (
            "# a comment { : }\nretrain_data_quant_config { # ulq_quantize {\n"
            "  ulq_quantize {\n    dst_type: INT4;\n  },\n}",
            2,
        ),
    ],
    ids=["braces", "colon-braces", "angle-brackets", "comments-and-separators"],
)
def test_nested_fields_are_located_in_every_syntax(text: str, first: int) -> None:
    assert locate(text, "retrain_data_quant_config") == (first, 1)
    assert locate(text, "retrain_data_quant_config", "ulq_quantize") == (first + 1, 3)
    assert locate(text, "retrain_data_quant_config", "ulq_quantize", "dst_type") == (first + 2, 5)


def test_repeated_fields_are_located_by_index() -> None:
    text = (
        WEIGHTS
        + 'skip_layers: "a"\n'
        + 'skip_layers: ["b", "c"]\n'
        + 'override_layer_configs { layer_name: "fc1" }\n'
        + 'override_layer_configs {\n  layer_name: "fc2"\n}\n'
    )
    assert locate(text, "skip_layers") == (2, 1)
    assert locate(text, "skip_layers", 0) == (2, 1)
    assert locate(text, "skip_layers", 1) == (3, 15)
    assert locate(text, "skip_layers", 2) == (3, 20)
    assert locate(text, "override_layer_configs", 1) == (5, 1)
    assert locate(text, "override_layer_configs", 1, "layer_name") == (6, 3)
    assert locate(text, "override_layer_configs", 0, "layer_name") == (4, 26)
    assert locate(text, "override_layer_configs", 2) is None


def test_windows_line_endings_keep_positions() -> None:
    text = WEIGHTS.replace("\n", "\r\n") + 'skip_layers: "a"\r\n  skip_layers: "b"\r\n'
    assert locate(text, "skip_layers", 1) == (3, 3)


def test_source_map_error_falls_back_to_the_enclosing_field() -> None:
    source_map = SourceMap("quant.cfg", {("override_layer_configs", 0): (4, 1)})
    error = source_map.error("missing", ("override_layer_configs", 0, "layer_name"))
    assert (error.path, error.line, error.column) == ("quant.cfg", 4, 1)
    assert error.field == "override_layer_configs[0].layer_name"


def test_source_map_without_positions_names_the_field_only() -> None:
    source_map = SourceMap()
    assert source_map.locate(("skip_layers", 0)) is None
    assert str(source_map.error('no layer "fc"', ("skip_layers", 0))) == 'skip_layers[0]: no layer "fc"'
    assert source_map.where(("skip_layers", 0)) == "skip_layers[0]"


def test_source_map_warn_emits_a_located_config_warning() -> None:
    with pytest.warns(ConfigWarning) as record:
        SourceMap("quant.cfg", {("skip_layers", 1): (3, 1)}).warn("repeated", ("skip_layers", 1))
    assert str(record[0].message) == "quant.cfg:3:1: skip_layers[1]: repeated"


@pytest.mark.parametrize(
    ("text", "line", "column", "field", "message"),
    [
        (
            "retrain_weight_quant_config {\n  arq_retrain {\n    dst_type: INT9\n  }\n}\n",
            3,
            15,
            "retrain_weight_quant_config.arq_retrain.dst_type",
            'unknown value "INT9" (expected INT4, INT8)',
        ),
        (
            "retrain_data_quant_config {\n  ulq_quantze {}\n}\n",
            2,
            3,
            "retrain_data_quant_config.ulq_quantze",
            'unknown field "ulq_quantze" in RetrainDataQuantConfig, did you mean "ulq_quantize"? '
            "(valid fields: ulq_quantize)",
        ),
        (
            WEIGHTS + "batch_nm: 2\n",
            2,
            1,
            "batch_nm",
            'unknown field "batch_nm" in AMCTRetrainConfig, did you mean "batch_num"?',
        ),
        (WEIGHTS + "batch_num 2\n", 2, 11, "batch_num", 'expected ":" after batch_num, got "2"'),
        (WEIGHTS + "batch_num: -1\n", 2, 12, "batch_num", 'expected an integer from 0 to 4294967295, got "-1"'),
        (
            WEIGHTS + "batch_num: 4294967296\n",
            2,
            12,
            "batch_num",
            'expected an integer from 0 to 4294967295, got "4294967296"',
        ),
        (WEIGHTS + "skip_layers: fc\n", 2, 14, "skip_layers[0]", 'expected a string, got "fc"'),
        (
            WEIGHTS + 'skip_layers: "fc\n',
            2,
            14,
            "skip_layers[0]",
            'unterminated string "fc: close it with " on the same line',
        ),
        (WEIGHTS + 'skip_layers: ["a"; "b"]\n', 2, 18, "skip_layers", 'expected "," or "]" in the list'),
        (WEIGHTS + "prune_config: 3\n", 2, 15, "prune_config", 'expected "{" to open prune_config, got "3"'),
        (WEIGHTS + "}\n", 2, 1, None, 'expected a field name of AMCTRetrainConfig, got "}"'),
        (
            "retrain_data_quant_config {\n  ulq_quantize { fixed_min: yes }\n}\n",
            2,
            29,
            "retrain_data_quant_config.ulq_quantize.fixed_min",
            'expected true or false, got "yes"',
        ),
        (
            "prune_config {\n  filter_pruner {\n    balanced_l2_norm_filter_prune { prune_ratio: abc }\n",
            3,
            50,
            "prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio",
            'expected a number, got "abc"',
        ),
        (
            "prune_config {\n  filter_pruner {\n    balanced_l2_norm_filter_prune { prune_ratio: 0.2 }\n",
            2,
            3,
            "prune_config.filter_pruner",
            '"{" opened here is never closed (expected "}")',
        ),
        (
            "retrain_weight_quant_config {\n  arq_retrain {}\n  ulq_retrain {}\n}\n",
            3,
            3,
            "retrain_weight_quant_config.ulq_retrain",
            "ulq_retrain conflicts with arq_retrain (line 2): RetrainWeightQuantConfig takes only one of "
            "arq_retrain, ulq_retrain",
        ),
    ],
    ids=[
        "unknown-enum-value",
        "unknown-field",
        "unknown-field-suggestion",
        "missing-colon",
        "negative-uint",
        "uint-too-large",
        "unquoted-string",
        "unterminated-string",
        "bad-list",
        "scalar-for-message",
        "stray-brace",
        "bad-bool",
        "bad-float",
        "unclosed-brace",
        "two-oneof-members",
    ],
)
def test_syntax_errors_name_file_position_and_field(
    load_file: Callable[[str], object], text: str, line: int, column: int, field: str | None, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(text)
    error = info.value
    assert (error.path, error.line, error.column, error.field) == ("quant.cfg", line, column, field)
    assert message in error.message
    assert str(error).startswith(f"quant.cfg:{line}:{column}: ")


def test_text_errors_show_text_as_their_source() -> None:
    with pytest.raises(ConfigError) as info:
        load_config("retrain_weight_quant_config {\n  arq_retrain { dst_type: INT9 }\n}")
    assert info.value.path is None
    assert str(info.value) == (
        '<text>:2:27: retrain_weight_quant_config.arq_retrain.dst_type: unknown value "INT9" (expected INT4, INT8)'
    )


def test_a_scalar_given_twice_warns_and_the_last_value_wins() -> None:
    with pytest.warns(ConfigWarning) as record:
        config = load_config(WEIGHTS + "batch_num: 2\nbatch_num: 3\n")
    assert config.batch_num == 3
    warning = record[0].message
    assert (warning.line, warning.column, warning.field) == (3, 1, "batch_num")
    assert "given twice (also at line 2): the last value wins" in warning.message


def test_a_message_given_twice_warns_and_the_blocks_merge() -> None:
    text = "retrain_data_quant_config {\n  ulq_quantize { fixed_min: true }\n}\n" * 2
    with pytest.warns(ConfigWarning) as record:
        config, source_map = load_config_with_locations(
            text.replace("fixed_min: true }\n}\n", "dst_type: INT4 }\n}\n", 1)
        )
    assert config.retrain_data_quant_config.ulq_quantize.dst_type == 0
    assert config.retrain_data_quant_config.ulq_quantize.fixed_min
    assert [(w.message.line, w.message.field) for w in record] == [
        (4, "retrain_data_quant_config"),
        (5, "retrain_data_quant_config.ulq_quantize"),
    ]
    assert source_map.locate(("retrain_data_quant_config",)) == (1, 1)


def test_valid_text_gives_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(WEIGHTS + 'skip_layers: "a" "b"\nbatch_num: 0x10\n')
