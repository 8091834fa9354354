"""The rules a parsed config must meet before anything reads it (see the config reference).

Only what can be judged from the config alone is checked here; names and types are checked
against a model later, by the plan resolver (placeholders like ``"Opname"`` pass this stage).
Each broken rule raises a :class:`ConfigError` placed by the config's :class:`SourceMap`:

- required fields present (``layer_name``, ``layer_type``, ``prune_ratio``, ``clip_max``,
  ``clip_min``), reported at the message that lacks them;
- float values finite; ``0 < prune_ratio < 1``; ``clip_max > 0 > clip_min``; ``batch_num >= 1``;
- no value this version refuses (``dst_type: INT16``);
- a pruning config names its algorithm (nothing to default to);
- no layer name (type) overridden twice; one pruning feature per file;
- at least one feature enabled.

A name repeated in a skip list is harmless and only warned about.

Example:
    >>> from lightning_amct.config.errors import ConfigError
    >>> from lightning_amct.proto.retrain_config_pytorch_pb2 import AMCTRetrainConfig
    >>> config = AMCTRetrainConfig()
    >>> config.retrain_weight_quant_config.arq_retrain.dst_type = 2
    >>> try:
    ...     validate_config(config, SourceMap())
    ... except ConfigError as error:
    ...     print(error)
    retrain_weight_quant_config.arq_retrain.dst_type: INT16 is not supported in this version (expected INT4, INT8)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from lightning_amct.config.errors import UNSUPPORTED_ENUM_VALUES, FieldPath, supported_enum_names
from lightning_amct.config.locations import SourceMap
from lightning_amct.proto import retrain_config_pytorch_pb2 as pb

_FEATURES = ("retrain_data_quant_config", "retrain_weight_quant_config", "prune_config")
_OVERRIDES = (("override_layer_configs", "layer_name", "layer"), ("override_layer_types", "layer_type", "layer type"))


def validate_config(config: pb.AMCTRetrainConfig, source_map: SourceMap) -> None:
    """Check ``config`` against every rule; warn about repeated skip-list names and empty overrides.

    Args:
        config: the parsed config.
        source_map: where its fields were written (an empty map for a mapping or message).

    Raises:
        ConfigError: the first rule broken, at the field that breaks it.
    """
    for message, field_path in _messages(config, ()):
        _check_required(message, field_path, source_map)
        _check_values(message, field_path, source_map)
        rule = _MESSAGE_RULES.get(message.DESCRIPTOR.full_name)
        if rule is not None:
            rule(message, field_path, source_map)
    for list_name, key_name, what in _OVERRIDES:
        _check_overridden_once(config, list_name, key_name, what, source_map)
    _check_one_pruning_feature(config, source_map)
    _check_enables_something(config, source_map)
    _warn_repeated_skips(config, source_map)
    _warn_empty_overrides(config, source_map)


def _messages(message: Message, field_path: FieldPath) -> Iterator[tuple[Message, FieldPath]]:
    """``message`` and every message set inside it, each with its field path."""
    yield message, field_path
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if field.is_repeated:
            for index, item in enumerate(value):
                yield from _messages(item, (*field_path, field.name, index))
        else:
            yield from _messages(value, (*field_path, field.name))


def _check_required(message: Message, field_path: FieldPath, source_map: SourceMap) -> None:
    for field in message.DESCRIPTOR.fields:
        if field.is_required and not message.HasField(field.name):
            raise source_map.error(
                f"missing required field {field.name} in {message.DESCRIPTOR.name}", (*field_path, field.name)
            )


def _check_values(message: Message, field_path: FieldPath, source_map: SourceMap) -> None:
    """Floats finite, enum values supported: rules that hold wherever the field sits."""
    for field, value in message.ListFields():
        path = (*field_path, field.name)
        if field.type == FieldDescriptor.TYPE_FLOAT and not math.isfinite(value):
            raise source_map.error(f"{field.name} must be a finite number (got {value})", path)
        if field.enum_type is not None:
            name = field.enum_type.values_by_number[value].name
            if name in UNSUPPORTED_ENUM_VALUES.get(field.enum_type.full_name, ()):
                expected = ", ".join(supported_enum_names(field.enum_type))
                raise source_map.error(f"{name} is not supported in this version (expected {expected})", path)


def _check_batch_num(config: pb.AMCTRetrainConfig, field_path: FieldPath, source_map: SourceMap) -> None:
    if config.HasField("batch_num") and config.batch_num < 1:
        raise source_map.error(f"batch_num must be at least 1 (got {config.batch_num})", (*field_path, "batch_num"))


def _check_clip(clip: pb.ClipMaxMin, field_path: FieldPath, source_map: SourceMap) -> None:
    if clip.clip_max <= 0:
        raise source_map.error(f"clip_max must be > 0 (got {clip.clip_max:g})", (*field_path, "clip_max"))
    if clip.clip_min >= 0:
        raise source_map.error(f"clip_min must be < 0 (got {clip.clip_min:g})", (*field_path, "clip_min"))


def _check_prune_ratio(pruner: pb.BalancedL2NormFilterPruner, field_path: FieldPath, source_map: SourceMap) -> None:
    if not 0 < pruner.prune_ratio < 1:
        message = f"prune_ratio must be between 0 and 1, exclusive (got {pruner.prune_ratio:g}; 0.2 is typical)"
        raise source_map.error(message, (*field_path, "prune_ratio"))


def _check_algorithm_chosen(message: Message, field_path: FieldPath, source_map: SourceMap) -> None:
    """A pruning config names its algorithm: unlike quantization, pruning has no default one."""
    (oneof,) = message.DESCRIPTOR.oneofs
    if message.WhichOneof(oneof.name) is None:
        choices = " or ".join(field.name for field in oneof.fields)
        raise source_map.error(f"{message.DESCRIPTOR.name} names no algorithm: add {choices}", field_path)


_MESSAGE_RULES: dict[str, Callable[..., None]] = {
    pb.AMCTRetrainConfig.DESCRIPTOR.full_name: _check_batch_num,
    pb.ClipMaxMin.DESCRIPTOR.full_name: _check_clip,
    pb.BalancedL2NormFilterPruner.DESCRIPTOR.full_name: _check_prune_ratio,
    pb.PruneConfig.DESCRIPTOR.full_name: _check_algorithm_chosen,
    pb.FilterPruner.DESCRIPTOR.full_name: _check_algorithm_chosen,
    pb.NOutOfMPruner.DESCRIPTOR.full_name: _check_algorithm_chosen,
}


def _check_overridden_once(
    config: pb.AMCTRetrainConfig, list_name: str, key_name: str, what: str, source_map: SourceMap
) -> None:
    first: dict[str, int] = {}
    for index, entry in enumerate(getattr(config, list_name)):
        key = getattr(entry, key_name)
        if key in first:
            earlier = source_map.where((list_name, first[key], key_name))
            raise source_map.error(
                f'{what} "{key}" is overridden twice (first at {earlier}): merge the two entries',
                (list_name, index, key_name),
            )
        first[key] = index


def _check_one_pruning_feature(config: pb.AMCTRetrainConfig, source_map: SourceMap) -> None:
    first: dict[str, FieldPath] = {}
    for holder, field_path in _feature_holders(config):
        if not holder.HasField("prune_config"):
            continue
        kind = holder.prune_config.WhichOneof("prune_algo")
        here = (*field_path, "prune_config", kind)
        for other, other_path in first.items():
            if other != kind:
                message = f"one pruning feature per file: {kind} here, {other} at {source_map.where(other_path)}"
                raise source_map.error(message, here)
        first.setdefault(kind, here)


def _check_enables_something(config: pb.AMCTRetrainConfig, source_map: SourceMap) -> None:
    if not any(holder.HasField(feature) for holder, _ in _feature_holders(config) for feature in _FEATURES):
        raise source_map.error(
            "enables nothing: add retrain_data_quant_config/retrain_weight_quant_config or prune_config"
        )


def _feature_holders(config: pb.AMCTRetrainConfig) -> Iterator[tuple[Message, FieldPath]]:
    """The messages that may enable features: the config itself, then each override entry."""
    yield config, ()
    for list_name, _, _ in _OVERRIDES:
        for index, entry in enumerate(getattr(config, list_name)):
            yield entry, (list_name, index)


def _warn_repeated_skips(config: pb.AMCTRetrainConfig, source_map: SourceMap) -> None:
    for field in config.DESCRIPTOR.fields:
        if not (field.is_repeated and field.type == FieldDescriptor.TYPE_STRING):
            continue
        first: dict[str, int] = {}
        for index, name in enumerate(getattr(config, field.name)):
            if name in first:
                earlier = source_map.where((field.name, first[name]))
                message = f'"{name}" is already listed (first at {earlier}): the repeat changes nothing'
                source_map.warn(message, (field.name, index))
            first.setdefault(name, index)


def _warn_empty_overrides(config: pb.AMCTRetrainConfig, source_map: SourceMap) -> None:
    for list_name, key_name, _ in _OVERRIDES:
        for index, entry in enumerate(getattr(config, list_name)):
            if not any(entry.HasField(feature) for feature in _FEATURES):
                message = (
                    f'"{getattr(entry, key_name)}" is overridden with nothing: the entry changes nothing '
                    f"(give it {', '.join(_FEATURES[:-1])} or {_FEATURES[-1]})"
                )
                source_map.warn(message, (list_name, index))
