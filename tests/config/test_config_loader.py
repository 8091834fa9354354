"""Reading a config from a file, its text, a mapping or a message: the same message each way."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from google.protobuf import json_format, text_format

from lightning_amct.config import (
    ConfigError,
    ConfigWarning,
    config_source_text,
    load_config,
    load_config_with_locations,
)
from lightning_amct.proto.retrain_config_pytorch_pb2 import AMCTRetrainConfig

DATA = Path(__file__).parent / "data"
SEEDS = sorted(DATA.glob("*.cfg"))
REPEATED_SKIP = {"prune.cfg", "selective_prune.cfg"}  # list "Opname" twice in regular_prune_skip_layers
WEIGHTS = "retrain_weight_quant_config { arq_retrain {} }\n"


def load_quietly(source: object) -> AMCTRetrainConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return load_config(source)


@pytest.mark.parametrize("seed", SEEDS, ids=[seed.name for seed in SEEDS])
def test_seed_samples_load_and_warn_only_about_repeated_skips(seed: Path) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        config = load_config(seed)
    fields = [w.message.field for w in record]
    assert fields == (["regular_prune_skip_layers[1]"] if seed.name in REPEATED_SKIP else [])
    assert config.ByteSize() > 0


@pytest.mark.parametrize("seed", SEEDS, ids=[seed.name for seed in SEEDS])
def test_every_source_form_gives_the_same_message(seed: Path) -> None:
    from_file = load_quietly(seed)
    sources = [
        str(seed),
        seed.read_text(),
        json_format.MessageToDict(from_file),
        json_format.MessageToDict(from_file, preserving_proto_field_name=True),
        from_file,
        config_source_text(seed),
        config_source_text(from_file),
    ]
    for source in sources:
        assert load_quietly(source) == from_file


def test_quant_sample_reads_as_the_reference_documents() -> None:
    config = load_config(DATA / "quant.cfg")
    ulq = config.retrain_data_quant_config.ulq_quantize
    assert (ulq.clip_max_min.clip_max, ulq.clip_max_min.clip_min, ulq.fixed_min) == (6.0, -6.0, True)
    assert config.override_layer_types[0].retrain_weight_quant_config.arq_retrain.dst_type == 0  # INT4
    assert config.override_layer_configs[0].layer_name == "Opname"


def test_a_message_source_is_validated_and_copied() -> None:
    original = load_config(DATA / "quant.cfg")
    copy = load_config(original)
    copy.batch_num = 7
    assert not original.HasField("batch_num")
    original.batch_num = 0
    with pytest.raises(ConfigError, match="batch_num must be at least 1"):
        load_config(original)


def test_file_source_map_carries_the_name_as_given() -> None:
    _, source_map = load_config_with_locations(DATA / "quant.cfg")
    assert source_map.path == str(DATA / "quant.cfg")
    assert source_map.locate(("override_layer_configs", 0, "layer_name")) == (30, 5)


@pytest.mark.parametrize(
    "source",
    [{"retrain_data_quant_config": {}}, AMCTRetrainConfig(batch_num=2, retrain_data_quant_config={})],
    ids=["mapping", "message"],
)
def test_mapping_and_message_sources_have_an_empty_source_map(source: object) -> None:
    _, source_map = load_config_with_locations(source)
    assert source_map.path is None
    assert source_map.locate(("retrain_data_quant_config",)) is None


def test_an_existing_file_wins_over_text_markers(tmp_path: Path) -> None:
    cfg = tmp_path / "odd:name{.cfg"
    cfg.write_text(WEIGHTS)
    _, source_map = load_config_with_locations(str(cfg))
    assert source_map.path == str(cfg)


def test_a_utf8_bom_is_ignored(tmp_path: Path) -> None:
    cfg = tmp_path / "bom.cfg"
    cfg.write_bytes(b"\xef\xbb\xbf" + WEIGHTS.encode())
    assert load_config(cfg).HasField("retrain_weight_quant_config")


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("missing.cfg", None, "No such file or directory"),
        ("latin1.cfg", b"skip_layers: \"caf\xe9\"\n", "not UTF-8 text"),
        ("folder", "dir", "Is a directory"),
    ],
)
def test_an_unreadable_file_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, content: bytes | str | None, reason: str
) -> None:
    monkeypatch.chdir(tmp_path)
    if content == "dir":
        Path(name).mkdir()
    elif content is not None:
        Path(name).write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(name)
    assert info.value.path == name
    assert str(info.value).startswith(f"{name}: cannot read the config file: {reason}")


def test_a_source_of_another_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="a config is a .cfg path, config text, a mapping or an AMCTRetrainConfig"):
        load_config(42)


@pytest.mark.parametrize(
    ("mapping", "field", "message"),
    [
        (
            {"retrain_data_quant_config": {"ulq_quantise": {}}},
            "retrain_data_quant_config.ulq_quantise",
            'unknown field "ulq_quantise" in RetrainDataQuantConfig, did you mean "ulq_quantize"? '
            "(valid fields: ulq_quantize)",
        ),
        (
            {"retrain_data_quant_config": {"ulq_quantize": {"dst_type": "INT9"}}},
            "retrain_data_quant_config.ulq_quantize.dst_type",
            'unknown value "INT9" (expected INT4, INT8)',
        ),
        (
            {"retrain_weight_quant_config": {"arq_retrain": {"dst_type": True}}},
            "retrain_weight_quant_config.arq_retrain.dst_type",
            "unknown value True (expected INT4, INT8)",
        ),
        (
            {"prune_config": {"filter_pruner": {"balanced_l2_norm_filter_prune": {"prune_ratio": "a third"}}}},
            "prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio",
            'expected a number, got "a third"',
        ),
        (
            {"retrain_weight_quant_config": {}, "override_layer_configs": [{"layer_name": "fc"}, {"layer_name": 3}]},
            "override_layer_configs[1].layer_name",
            "expected a string, got 3",
        ),
        ({"batch_num": -1}, "batch_num", "expected an integer from 0 to 4294967295, got -1"),
        ({"skip_layers": "fc"}, "skip_layers", "expected a list of skip_layers entries, got str"),
        (
            {"retrain_data_quant_config": ["ulq_quantize"]},
            "retrain_data_quant_config",
            "expected a mapping of RetrainDataQuantConfig fields, got list",
        ),
        (
            {"retrain_weight_quant_config": {"arq_retrain": {}, "ulq_retrain": {}}},
            "retrain_weight_quant_config.ulq_retrain",
            "ulq_retrain conflicts with arq_retrain: RetrainWeightQuantConfig takes only one of",
        ),
    ],
)
def test_mapping_errors_name_the_field(mapping: dict, field: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(mapping)
    assert (info.value.path, info.value.line, info.value.field) == (None, None, field)
    assert message in info.value.message


def test_yaml_style_mapping_loads() -> None:
    config = load_config(
        {
            "retrain_data_quant_config": {"ulq_quantize": {"clip_max_min": {"clip_max": 6, "clip_min": -6.0}}},
            "retrain_weight_quant_config": {"ulq_retrain": {"dst_type": "INT4", "channel_wise": False}},
            "skip_layers": ["fc"],
            "override_layer_types": [{"layer_type": "Linear", "retrain_weight_quant_config": {}}],
        }
    )
    assert config.retrain_weight_quant_config.ulq_retrain.dst_type == 0
    assert config.retrain_weight_quant_config.ulq_retrain.HasField("channel_wise")
    assert config.override_layer_types[0].HasField("retrain_weight_quant_config")


def test_none_in_a_mapping_is_an_empty_message_but_never_a_scalar() -> None:
    assert load_config({"retrain_data_quant_config": None}).HasField("retrain_data_quant_config")
    with pytest.raises(ConfigError, match="^batch_num: expected an integer from 0 to 4294967295, got None$"):
        load_config({"retrain_data_quant_config": None, "batch_num": None})


def test_source_text_keeps_a_files_text_and_prints_other_forms(tmp_path: Path) -> None:
    cfg = tmp_path / "quant.cfg"
    text = "# my config\n" + WEIGHTS
    cfg.write_text(text)
    assert config_source_text(cfg) == text
    assert config_source_text(str(cfg)) == text
    assert config_source_text(text) == text
    mapping = {"retrain_weight_quant_config": {"arq_retrain": {}}}
    printed = text_format.MessageToString(load_config(mapping))
    assert config_source_text(mapping) == printed
    assert config_source_text(load_config(mapping)) == printed
