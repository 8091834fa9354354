"""What a bad config raises, and the wording its messages share.

Every problem in a config is a :class:`ConfigError` that says where it is (file, line, column),
which field it concerns (``override_layer_configs[0].layer_name``) and what would be valid, so the
user can fix the file without reading the schema. Softer findings (a repeated skip-list entry, a
field given twice) are :class:`ConfigWarning`; they carry the same location.

Example:
    >>> error = ConfigError('unknown value "INT9" (expected INT4, INT8)', "quant.cfg", 7, 21,
    ...                     "retrain_weight_quant_config.arq_retrain.dst_type")
    >>> print(error)
    quant.cfg:7:21: retrain_weight_quant_config.arq_retrain.dst_type: unknown value "INT9" (expected INT4, INT8)
    >>> format_field_path(("override_layer_configs", 0, "layer_name"))
    'override_layer_configs[0].layer_name'
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from lightning_amct.proto.retrain_config_pytorch_pb2 import DataType

FieldPath = tuple[str | int, ...]
"""A field's place in the config: names, with the index of a repeated entry after its name."""

UNSUPPORTED_ENUM_VALUES: dict[str, frozenset[str]] = {DataType.DESCRIPTOR.full_name: frozenset({"INT16"})}
"""Enum values the schema declares but this version refuses, by enum full name."""

_EXPECTED_KINDS = {
    FieldDescriptor.TYPE_FLOAT: "a number",
    FieldDescriptor.TYPE_UINT32: "an integer from 0 to 4294967295",
    FieldDescriptor.TYPE_BOOL: "true or false",
    FieldDescriptor.TYPE_STRING: "a string",
}


class _Located:
    """The location, field and message shared by :class:`ConfigError` and :class:`ConfigWarning`.

    All attributes are also the constructor's positional arguments, so both classes pickle (a
    ``DataLoader`` worker or a spawned process may send one back).
    """

    def __init__(
        self,
        message: str,
        path: str | None = None,
        line: int | None = None,
        column: int | None = None,
        field: str | None = None,
    ) -> None:
        super().__init__(message, path, line, column, field)
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        self.field = field

    def __str__(self) -> str:
        source = self.path if self.path is not None else ("<text>" if self.line is not None else None)
        location = ":".join(str(part) for part in (source, self.line, self.column) if part is not None)
        return ": ".join(part for part in (location, self.field, self.message) if part)


class ConfigError(_Located, ValueError):
    """A config that cannot be used as written.

    Attributes:
        message: what is wrong, with the valid options.
        path: the file name as given, or None for a config given as text, mapping or message.
        line: 1-based line of the offending token, None when unknown (mapping, message, whole file).
        column: 1-based column of that token, None when unknown.
        field: dotted field path such as ``override_layer_configs[1].layer_name``, or None.
    """


class ConfigWarning(_Located, UserWarning):
    """A config that works but likely does not say what its author meant (same attributes)."""


def format_field_path(field_path: Sequence[str | int]) -> str:
    """``("override_layer_configs", 0, "layer_name")`` as ``override_layer_configs[0].layer_name``."""
    text = ""
    for part in field_path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text


def quoted(value: object) -> str:
    """``value`` between double quotes, as a message shows a value the user wrote."""
    text = str(value)
    return text if text[:1] in ('"', "'") else f'"{text}"'


def supported_enum_names(enum: EnumDescriptor) -> list[str]:
    """The names of ``enum`` this version accepts, in schema order (``INT4``, ``INT8``)."""
    refused = UNSUPPORTED_ENUM_VALUES.get(enum.full_name, frozenset())
    return [value.name for value in enum.values if value.name not in refused]


def unknown_value_message(enum: EnumDescriptor, got: str) -> str:
    """``unknown value "INT9" (expected INT4, INT8)``; ``got`` is already quoted."""
    return f"unknown value {got} (expected {', '.join(supported_enum_names(enum))})"


def unknown_field_message(message: Descriptor, name: object) -> str:
    """An unknown field named with the closest valid name and every valid one of ``message``."""
    names = [field.name for field in message.fields]
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f", did you mean {quoted(close[0])}?" if close else ""
    return f"unknown field {quoted(name)} in {message.name}{hint} (valid fields: {', '.join(names)})"


def expected_value_message(field: FieldDescriptor, got: str) -> str:
    """``expected a number, got "abc"`` for a scalar ``field``; ``got`` is already quoted. A string
    that opens a quote and does not close it on its line is called unterminated."""
    quote = got[:1]
    if field.type == FieldDescriptor.TYPE_STRING and quote in ('"', "'") and (len(got) < 2 or got[-1] != quote):
        return f"unterminated string {got}: close it with {quote} on the same line"
    return f"expected {_EXPECTED_KINDS[field.type]}, got {got}"


def oneof_conflict_message(field: FieldDescriptor, earlier: str, earlier_line: int | None) -> str:
    """Two members of one oneof given in one message: say they are alternatives."""
    oneof = field.containing_oneof
    where = f" (line {earlier_line})" if earlier_line is not None else ""
    members = ", ".join(member.name for member in oneof.fields)
    return (
        f"{field.name} conflicts with {earlier}{where}: {field.containing_type.name} takes only one "
        f"of {members}"
    )
