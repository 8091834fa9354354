"""Every rule of the config reference, broken once by a small config, reported where it is broken."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

from lightning_amct.config import ConfigError, ConfigWarning, load_config, load_config_with_locations

WEIGHTS = "retrain_weight_quant_config { arq_retrain {} }\n"  # enables a feature, so the file is valid


def clip(clip_max: str, clip_min: str) -> str:
    return (
        "retrain_data_quant_config {\n"
        "  ulq_quantize {\n"
        "    clip_max_min {\n"
        f"      clip_max: {clip_max}\n"
        f"      clip_min: {clip_min}\n"
        "    }\n"
        "  }\n"
        "}\n"
    )


def prune_ratio(value: str) -> str:
    return (
        "prune_config {\n"
        "  filter_pruner {\n"
        "    balanced_l2_norm_filter_prune {\n"
        f"      prune_ratio: {value}\n"
        "    }\n"
        "  }\n"
        "}\n"
    )


CLIP = "retrain_data_quant_config.ulq_quantize.clip_max_min"
RATIO = "prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio"
FILTER = "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.2 } } }"
N_OUT_OF_M = "prune_config { n_out_of_m_pruner { l1_selective_prune {} } }"

CASES = {
    "missing-layer-name": (
        "override_layer_configs {\n  retrain_data_quant_config {}\n}\n",
        (1, 1, "override_layer_configs[0].layer_name", "missing required field layer_name in RetrainOverrideLayer"),
    ),
    "missing-layer-type": (
        WEIGHTS + "override_layer_types {\n  retrain_data_quant_config {}\n}\n",
        (2, 1, "override_layer_types[0].layer_type", "missing required field layer_type"),
    ),
    "missing-prune-ratio": (
        "prune_config {\n  filter_pruner {\n    balanced_l2_norm_filter_prune { ascend_optimized: false }\n  }\n}\n",
        (3, 5, RATIO, "missing required field prune_ratio"),
    ),
    "missing-clip-max": (
        clip("1", "-1").replace("      clip_max: 1\n", ""),
        (3, 5, f"{CLIP}.clip_max", "missing required field clip_max in ClipMaxMin"),
    ),
    "missing-clip-min": (
        clip("1", "-1").replace("      clip_min: -1\n", ""),
        (3, 5, f"{CLIP}.clip_min", "missing required field clip_min in ClipMaxMin"),
    ),
    "prune-ratio-zero": (prune_ratio("0"), (4, 7, RATIO, "prune_ratio must be between 0 and 1, exclusive (got 0")),
    "prune-ratio-one": (prune_ratio("1.0"), (4, 7, RATIO, "between 0 and 1, exclusive (got 1;")),
    "prune-ratio-negative": (prune_ratio("-0.5"), (4, 7, RATIO, "(got -0.5;")),
    "prune-ratio-nan": (prune_ratio("nan"), (4, 7, RATIO, "prune_ratio must be a finite number (got nan)")),
    "prune-ratio-inf": (prune_ratio("inf"), (4, 7, RATIO, "prune_ratio must be a finite number (got inf)")),
    "clip-max-not-positive": (clip("0", "-1"), (4, 7, f"{CLIP}.clip_max", "clip_max must be > 0 (got 0)")),
    "clip-min-not-negative": (clip("6", "0.5"), (5, 7, f"{CLIP}.clip_min", "clip_min must be < 0 (got 0.5)")),
    "clip-max-below-min": (clip("-6", "6"), (4, 7, f"{CLIP}.clip_max", "clip_max must be > 0 (got -6)")),
    "clip-max-inf": (clip("inf", "-1"), (4, 7, f"{CLIP}.clip_max", "clip_max must be a finite number (got inf)")),
    "clip-min-nan": (clip("1", "nan"), (5, 7, f"{CLIP}.clip_min", "clip_min must be a finite number (got nan)")),
    "int16-weights": (
        "retrain_weight_quant_config {\n  ulq_retrain { dst_type: INT16 }\n}\n",
        (
            2,
            17,
            "retrain_weight_quant_config.ulq_retrain.dst_type",
            "INT16 is not supported in this version (expected INT4, INT8)",
        ),
    ),
    "int16-by-number-in-override": (
        WEIGHTS + 'override_layer_configs {\n  layer_name: "fc"\n'
        "  retrain_data_quant_config { ulq_quantize { dst_type: 2 } }\n}\n",
        (
            4,
            46,
            "override_layer_configs[0].retrain_data_quant_config.ulq_quantize.dst_type",
            "INT16 is not supported in this version (expected INT4, INT8)",
        ),
    ),
    "batch-num-zero": (WEIGHTS + "batch_num: 0\n", (2, 1, "batch_num", "batch_num must be at least 1 (got 0)")),
    "layer-overridden-twice": (
        WEIGHTS + 'override_layer_configs { layer_name: "fc" }\noverride_layer_configs {\n  layer_name: "fc"\n}\n',
        (
            4,
            3,
            "override_layer_configs[1].layer_name",
            'layer "fc" is overridden twice (first at line 2): merge the two entries',
        ),
    ),
    "type-overridden-twice": (
        WEIGHTS + 'override_layer_types { layer_type: "Conv2d" }\n\noverride_layer_types { layer_type: "Conv2d" }\n',
        (4, 24, "override_layer_types[1].layer_type", 'layer type "Conv2d" is overridden twice (first at line 2)'),
    ),
    "two-pruning-features-global-and-override": (
        f"{FILTER}\noverride_layer_configs {{\n  layer_name: \"fc\"\n  {N_OUT_OF_M}\n}}\n",
        (
            4,
            18,
            "override_layer_configs[0].prune_config.n_out_of_m_pruner",
            "one pruning feature per file: n_out_of_m_pruner here, filter_pruner at line 1",
        ),
    ),
    "two-pruning-features-across-overrides": (
        f'override_layer_configs {{ layer_name: "fc" {N_OUT_OF_M} }}\n'
        f'override_layer_types {{ layer_type: "Conv2d" {FILTER} }}\n',
        (
            2,
            60,
            "override_layer_types[0].prune_config.filter_pruner",
            "one pruning feature per file: filter_pruner here, n_out_of_m_pruner at line 1",
        ),
    ),
    "two-pruning-features-in-one-prune-config": (
        "prune_config {\n  filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.2 } }\n"
        "  n_out_of_m_pruner {}\n}\n",
        (
            3,
            3,
            "prune_config.n_out_of_m_pruner",
            "conflicts with filter_pruner (line 2): PruneConfig takes only one of filter_pruner, n_out_of_m_pruner",
        ),
    ),
    "prune-config-without-algorithm": (
        WEIGHTS + "prune_config {}\n",
        (2, 1, "prune_config", "PruneConfig names no algorithm: add filter_pruner or n_out_of_m_pruner"),
    ),
    "filter-pruner-without-algorithm": (
        "prune_config {\n  filter_pruner {}\n}\n",
        (2, 3, "prune_config.filter_pruner", "FilterPruner names no algorithm: add balanced_l2_norm_filter_prune"),
    ),
}


@pytest.mark.parametrize(("text", "expected"), list(CASES.values()), ids=list(CASES))
def test_broken_rule_is_reported_at_its_field(
    load_file: Callable[[str], object], text: str, expected: tuple[int, int, str, str]
) -> None:
    line, column, field, message = expected
    with pytest.raises(ConfigError) as info:
        load_file(text)
    error = info.value
    assert (error.path, error.line, error.column, error.field) == ("quant.cfg", line, column, field)
    assert message in error.message
    assert str(error) == f"quant.cfg:{line}:{column}: {field}: {error.message}"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# nothing but a comment\n",
        'skip_layers: "fc"\nbatch_num: 4\n',
        'override_layer_configs { layer_name: "fc" }\noverride_layer_types { layer_type: "Conv2d" }\n',
    ],
    ids=["empty", "comment", "skips-only", "overrides-enabling-nothing"],
)
def test_a_file_that_enables_nothing_is_refused(load_file: Callable[[str], object], text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_file(text)
    assert str(info.value) == (
        "quant.cfg: enables nothing: add retrain_data_quant_config/retrain_weight_quant_config or prune_config"
    )


@pytest.mark.parametrize(
    "text",
    [
        "retrain_data_quant_config {}\n",
        "retrain_weight_quant_config {}\n",
        N_OUT_OF_M,
        'override_layer_configs { layer_name: "fc" retrain_data_quant_config {} }',
        f'override_layer_types {{ layer_type: "Conv2d" {FILTER} }}',
    ],
    ids=["activations", "weights", "pruning", "name-override", "type-override"],
)
def test_any_enabled_feature_is_enough(text: str) -> None:
    load_config(text)


def test_a_name_repeated_in_a_skip_list_only_warns(load_file: Callable[[str], object]) -> None:
    with pytest.warns(ConfigWarning) as record:
        load_file(WEIGHTS + 'quant_skip_types: "Conv2d"\nquant_skip_types: ["Linear", "Conv2d"]\n')
    (warning,) = [w.message for w in record]
    assert (warning.path, warning.line, warning.column, warning.field) == ("quant.cfg", 3, 30, "quant_skip_types[2]")
    assert warning.message == '"Conv2d" is already listed (first at line 2): the repeat changes nothing'


def test_an_override_with_nothing_in_it_warns(load_file: Callable[[str], object]) -> None:
    with pytest.warns(ConfigWarning) as record:
        load_file(WEIGHTS + 'override_layer_configs { layer_name: "fc" }\n')
    (warning,) = [w.message for w in record]
    assert (warning.line, warning.field) == (2, "override_layer_configs[0]")
    assert warning.message.startswith('"fc" is overridden with nothing: the entry changes nothing')


def test_a_message_read_earlier_warns_again_where_its_file_said_it(tmp_path: Path) -> None:
    """The callback reads its config once, then resolves the message: the warning names the line again."""
    path = tmp_path / "quant.cfg"
    path.write_text(WEIGHTS + 'quant_skip_types: "Conv2d"\nquant_skip_types: "Conv2d"\n')
    with pytest.warns(ConfigWarning):
        message, locations = load_config_with_locations(path)
    with pytest.warns(ConfigWarning) as record:
        load_config_with_locations(message, locations)
    (warning,) = [w.message for w in record]
    assert (warning.path, warning.line, warning.field) == (str(path), 3, "quant_skip_types[1]")


def test_placeholder_names_pass_this_stage() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        override = 'override_layer_types { layer_type: "Optype" retrain_weight_quant_config { arq_retrain {} } }\n'
        config = load_config(WEIGHTS + 'skip_layers: "Opname"\n' + override)
    assert config.skip_layers == ["Opname"]


def test_mapping_errors_name_the_field_without_a_position() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"override_layer_configs": [{"layer_name": "a", "prune_config": {}}, {"layer_name": "a"}]})
    assert (info.value.path, info.value.line, info.value.column) == (None, None, None)
    assert str(info.value) == (
        "override_layer_configs[0].prune_config: PruneConfig names no algorithm: add filter_pruner or n_out_of_m_pruner"
    )
