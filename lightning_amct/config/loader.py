"""Reading a retrain config from wherever it comes: a ``.cfg`` file, its text, a mapping, a message.

Every entry point returns a validated ``AMCTRetrainConfig`` or raises :class:`ConfigError`, so
the callback, the CLI and the plan resolver trust what they get. Text goes through
:func:`~lightning_amct.config.locations.scan_text` (syntax, positions) and then
``text_format.Merge`` (the reference's merge semantics); a mapping (from a YAML recipe) goes
field by field through ``json_format.ParseDict`` so each error names its field.

Example:
    >>> config = load_config({"retrain_data_quant_config": {"ulq_quantize": {"dst_type": "INT4"}}})
    >>> config.retrain_data_quant_config.ulq_quantize.dst_type
    0
    >>> print(config_source_text(config), end="")
    retrain_data_quant_config {
      ulq_quantize {
        dst_type: INT4
      }
    }
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from google.protobuf import json_format, text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from lightning_amct.config.errors import (
    ConfigError,
    FieldPath,
    expected_value_message,
    format_field_path,
    oneof_conflict_message,
    quoted,
    unknown_field_message,
    unknown_value_message,
)
from lightning_amct.config.locations import SourceMap, scan_text
from lightning_amct.config.validate import validate_config
from lightning_amct.proto.retrain_config_pytorch_pb2 import AMCTRetrainConfig

ConfigSource = str | os.PathLike | Mapping | AMCTRetrainConfig
"""A ``.cfg`` path, config text, a mapping of the same structure, or the message itself."""


class TextOrigin(NamedTuple):
    """Where config text given directly stands in a larger file: its first line and column there."""

    path: str
    line: int
    column: int

_TEXT_MARKERS = ("\n", "{", ":")


def load_config(source: ConfigSource) -> AMCTRetrainConfig:
    """Read and validate a retrain config.

    Args:
        source: a path (``str`` or ``os.PathLike``) to a ``.cfg`` file; the config text itself (a
            ``str`` that is not an existing file and is empty or contains a newline, ``{`` or
            ``:``); a mapping with the same structure (nested dicts, lists for repeated fields,
            enum names as strings; None for a message means an empty one, as YAML reads
            ``retrain_data_quant_config:``); or an ``AMCTRetrainConfig`` (validated, returned as a
            copy).

    Returns:
        The config message.

    Raises:
        ConfigError: the file cannot be read, or the config breaks the schema or a rule of the
            config reference; the error says where and what would be valid.
        TypeError: ``source`` is none of the above.

    Example:
        >>> load_config("prune_config { n_out_of_m_pruner { l1_selective_prune {} } }").HasField("prune_config")
        True
    """
    return load_config_with_locations(source)[0]


def load_config_with_locations(
    source: ConfigSource, locations: SourceMap | None = None, origin: TextOrigin | None = None
) -> tuple[AMCTRetrainConfig, SourceMap]:
    """Like :func:`load_config`, and also where each field was written.

    Use the :class:`SourceMap` to report a later problem (a layer the model lacks) at its line.
    Configs given as a mapping or message get a map that locates nothing, or ``locations``: where
    the fields of a message read earlier were written, which the warnings of its validation then
    name too (as those of the first reading did). Config text given directly is placed in
    ``origin``'s file, from its line and column, where given (a larger file that holds the text),
    else at ``<text>``.

    Example:
        >>> config, source_map = load_config_with_locations('skip_layers: "fc"\\nprune_config {\\n'
        ...     '  n_out_of_m_pruner { l1_selective_prune {} }\\n}')
        >>> source_map.locate(("prune_config", "n_out_of_m_pruner"))
        (3, 3)
    """
    config, source_map = _parse(source, locations, origin)
    if locations is not None and isinstance(source, (AMCTRetrainConfig, Mapping)):
        source_map = locations
    validate_config(config, source_map)
    return config, source_map


def config_source_text(source: ConfigSource) -> str:
    """The config as protobuf text, to store with a checkpoint.

    A file's or a text's own text, comments and layout kept; a mapping or message printed with
    ``text_format.MessageToString``. Nothing is validated beyond what printing needs.

    Raises:
        ConfigError: the file cannot be read, or a mapping does not fit the schema.
    """
    if isinstance(source, AMCTRetrainConfig):
        return text_format.MessageToString(source)
    if isinstance(source, Mapping):
        return text_format.MessageToString(_parse_mapping(source))
    return _read_text(source)[0]


def _parse(
    source: ConfigSource, locations: SourceMap | None = None, origin: TextOrigin | None = None
) -> tuple[AMCTRetrainConfig, SourceMap]:
    if isinstance(source, AMCTRetrainConfig):
        config = AMCTRetrainConfig()
        config.CopyFrom(source)
        return config, SourceMap()
    if isinstance(source, Mapping):
        try:
            return _parse_mapping(source), SourceMap()
        except _MappingError as exc:  # placed where the mapping's file wrote the field, if known
            raise (locations or SourceMap()).error(exc.message, exc.field_path) from None
    text, path = _read_text(source)
    start = (1, 1)
    if origin is not None and path is None:
        path, start = origin.path, (origin.line, origin.column)
    source_map = scan_text(text, AMCTRetrainConfig.DESCRIPTOR, path, start)
    config = AMCTRetrainConfig()
    try:
        text_format.Merge(text, config)
    except text_format.ParseError as exc:  # the scan reports the same problems first, with the field
        reason = str(exc).partition(" : ")[2] or str(exc)
        raise ConfigError(reason, path, exc.GetLine() + start[0] - 1, exc.GetColumn() + start[1] - 1) from exc
    return config, source_map


def _read_text(source: str | os.PathLike) -> tuple[str, str | None]:
    """The config text and the file it came from (None for a config given as text)."""
    if _is_config_text(source):
        return source, None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            "a config is a .cfg path, config text, a mapping or an AMCTRetrainConfig, "
            f"not {type(source).__name__}"
        )
    path = os.fspath(source)
    try:
        return Path(path).read_text(encoding="utf-8-sig"), path
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc.reason})"
        raise ConfigError(f"cannot read the config file: {reason}", path) from exc


def _is_config_text(source: object) -> bool:
    """A ``str`` naming no file is the config itself when empty or shaped like protobuf text."""
    if not isinstance(source, str) or os.path.isfile(source):
        return False
    return not source or any(marker in source for marker in _TEXT_MARKERS)


def _parse_mapping(mapping: Mapping) -> AMCTRetrainConfig:
    config = AMCTRetrainConfig()
    _merge_mapping(mapping, config, ())
    return config


def _merge_mapping(mapping: Mapping, message: Message, field_path: FieldPath) -> None:
    descriptor = message.DESCRIPTOR
    for key, value in mapping.items():
        field = descriptor.fields_by_name.get(key) or descriptor.fields_by_camelcase_name.get(key)
        if field is None:
            raise _MappingError(unknown_field_message(descriptor, key), (*field_path, str(key)))
        path = (*field_path, field.name)
        oneof = field.containing_oneof
        chosen = oneof and message.WhichOneof(oneof.name)
        if chosen and chosen != field.name:
            raise _MappingError(oneof_conflict_message(field, chosen, None), path)
        if not field.is_repeated:
            _merge_value(value, message, field, path)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                _merge_value(item, message, field, (*path, index))
        else:
            raise _MappingError(f"expected a list of {field.name} entries, got {type(value).__name__}", path)


def _merge_value(value: object, message: Message, field: FieldDescriptor, field_path: FieldPath) -> None:
    if field.message_type is not None:
        value = {} if value is None else value
        if not isinstance(value, Mapping):
            message_type = field.message_type.name
            raise _MappingError(f"expected a mapping of {message_type} fields, got {type(value).__name__}", field_path)
        target = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
        target.SetInParent()
        _merge_mapping(value, target, field_path)
        return
    if value is None or isinstance(value, bool) != (field.type == FieldDescriptor.TYPE_BOOL):
        # ParseDict would read None as "unset" and True as 1
        raise _MappingError(_invalid_value_message(field, value), field_path)
    scratch = type(message)()
    try:
        json_format.ParseDict({field.name: [value] if field.is_repeated else value}, scratch)
    except json_format.ParseError as exc:
        raise _MappingError(_invalid_value_message(field, value), field_path) from exc
    message.MergeFrom(scratch)


def _invalid_value_message(field: FieldDescriptor, value: object) -> str:
    shown = quoted(value) if isinstance(value, str) else repr(value)
    if field.enum_type is not None:
        return unknown_value_message(field.enum_type, shown)
    return expected_value_message(field, shown)


class _MappingError(ConfigError):
    """A field of a config given as a mapping that does not fit the schema, with its path."""

    def __init__(self, message: str, field_path: FieldPath) -> None:
        super().__init__(message, field=format_field_path(field_path))
        self.field_path = tuple(field_path)

