"""Where each field of a text config sits: the :class:`SourceMap`, and the scan that builds it.

protobuf's text parser (version 7) keeps no positions, so :func:`scan_text` walks the same token
stream with ``text_format.Tokenizer`` and the schema, records the line and column of every field
name by its field path, and reports each syntax problem as a :class:`ConfigError` that names the
field. Anything that later finds fault with a field it knows only by path (the validation here, the
plan resolver against a model) asks the map for the position.

The scan follows protobuf's merge semantics, so the text it accepts is exactly what
``text_format.Merge`` accepts: ``name: value``, ``name { }``, ``name: { }``, ``name < >``, ``#``
comments, ``name: [a, b]`` lists, repeated fields written once per value, optional ``,``/``;``
separators. A non-repeated field given twice is legal there (the last value wins, two blocks of a
message merge) and gets a :class:`ConfigWarning` here.

Example:
    >>> from lightning_amct.proto.retrain_config_pytorch_pb2 import AMCTRetrainConfig
    >>> source_map = scan_text('skip_layers: "fc"\\n  skip_layers: "conv"', AMCTRetrainConfig.DESCRIPTOR)
    >>> source_map.locate(("skip_layers", 1))
    (2, 3)
    >>> print(source_map.error('no layer "conv" in Net', ("skip_layers", 1)))
    <text>:2:3: skip_layers[1]: no layer "conv" in Net
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence

from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from lightning_amct.config.errors import (
    ConfigError,
    ConfigWarning,
    FieldPath,
    expected_value_message,
    format_field_path,
    oneof_conflict_message,
    quoted,
    unknown_field_message,
    unknown_value_message,
)

Position = tuple[int, int]
"""1-based ``(line, column)``."""

_NAME = re.compile(r"\w+")
_CLOSING = {"{": "}", "<": ">"}


class SourceMap:
    """The line and column of every field a text config wrote, by field path.

    Use it to put a position on an error about a field known only by its path. A config given as a
    mapping or a message has no positions: its map locates nothing, and its errors name the field
    alone.

    Args:
        path: the file name as given, or None for a config that did not come from a file.
        locations: position of each field path: a field's name token; for an element of a
            ``name: [a, b]`` list, the element. A repeated field's path without an index locates
            where the field is first named.

    Example:
        >>> source_map = SourceMap("quant.cfg", {("override_layer_configs", 0): (14, 1)})
        >>> print(source_map.error('no layer "fc1"', ("override_layer_configs", 0, "layer_name")))
        quant.cfg:14:1: override_layer_configs[0].layer_name: no layer "fc1"
    """

    def __init__(self, path: str | None = None, locations: Mapping[FieldPath, Position] | None = None) -> None:
        self.path = path
        self._locations = dict(locations or {})

    def within(self, prefix: Sequence[str | int]) -> SourceMap:
        """The positions under ``prefix``, their paths relative to it: where a config that a larger
        file holds as a mapping (a recipe's ``compress.config``) wrote each of its fields.

        Example:
            >>> recipe = SourceMap("r.yaml", {("compress", "config", "skip_layers"): (4, 5)})
            >>> recipe.within(("compress", "config")).locate(("skip_layers",))
            (4, 5)
        """
        start = tuple(prefix)
        inner = {path[len(start) :]: at for path, at in self._locations.items() if path[: len(start)] == start}
        return SourceMap(self.path, inner)

    def locate(self, field_path: Sequence[str | int]) -> Position | None:
        """Where the config wrote ``field_path`` (e.g. ``("skip_layers", 2)``), or None."""
        return self._locations.get(tuple(field_path))

    def error(self, message: str, field_path: Sequence[str | int] = ()) -> ConfigError:
        """A :class:`ConfigError` about ``field_path``, to raise.

        A field the config left out (a missing required field, a default) is placed at the
        nearest enclosing field the config did write.
        """
        return ConfigError(message, self.path, *self.nearest(field_path), format_field_path(field_path) or None)

    def warn(self, message: str, field_path: Sequence[str | int] = ()) -> None:
        """Emit a :class:`ConfigWarning` about ``field_path``, placed like :meth:`error` places errors."""
        field = format_field_path(field_path) or None
        warnings.warn(ConfigWarning(message, self.path, *self.nearest(field_path), field), stacklevel=2)

    def where(self, field_path: Sequence[str | int]) -> str:
        """``line 14`` when ``field_path`` is located, else its dotted path: for "first at ..." notes."""
        position = self.locate(field_path)
        return f"line {position[0]}" if position else format_field_path(field_path)

    def nearest(self, field_path: Sequence[str | int]) -> tuple[int | None, int | None]:
        """Where ``field_path`` was written, or the nearest enclosing field that was; ``(None, None)`` if none."""
        path = tuple(field_path)
        for end in range(len(path), 0, -1):
            position = self._locations.get(path[:end])
            if position is not None:
                return position
        return None, None


def scan_text(
    text: str, descriptor: Descriptor, path: str | None = None, origin: Position = (1, 1)
) -> SourceMap:
    """Check the syntax of config ``text`` against ``descriptor`` and locate every field in it.

    Args:
        text: the protobuf text.
        descriptor: the top-level message type (``AMCTRetrainConfig.DESCRIPTOR``).
        path: the file name to put in errors, or None for text given directly.
        origin: where the text's first line and column stand in ``path``: a config that a larger
            file holds as an indented block (a recipe's ``compress.config: |``), every line of it
            indented alike.

    Raises:
        ConfigError: an unknown field or enum value, a malformed value, a missing ``:``, ``{`` or
            ``}``, or two members of one oneof in one message.
    """
    scanner = _Scanner(text, path, origin)
    scanner.message(descriptor, (), None, None)
    return SourceMap(path, scanner.locations)


class _Scanner:
    """One pass over the tokens, mirroring ``text_format``'s parser, recording positions."""

    def __init__(self, text: str, path: str | None, origin: Position) -> None:
        self.tokens = text_format.Tokenizer(text.split("\n"))
        self.path = path
        self.origin = origin
        self.locations: dict[FieldPath, Position] = {}
        self.counts: dict[FieldPath, int] = {}  # repeated field -> entries so far
        self.chosen: dict[tuple[FieldPath, str], tuple[str, Position]] = {}  # (message, oneof) -> member

    def position(self) -> Position:
        # The tokenizer exposes its position only through the errors it builds.
        error = self.tokens.ParseError("")
        return error.GetLine() + self.origin[0] - 1, error.GetColumn() + self.origin[1] - 1

    def got(self) -> str:
        return quoted(self.tokens.token) if self.tokens.token else "end of input"

    def fail(self, message: str, position: Position, field_path: FieldPath) -> ConfigError:
        return ConfigError(message, self.path, *position, format_field_path(field_path) or None)

    def message(
        self, descriptor: Descriptor, field_path: FieldPath, opener: str | None, opened: Position | None
    ) -> None:
        closer = _CLOSING.get(opener)
        while not (closer and self.tokens.TryConsume(closer)):
            if self.tokens.AtEnd():
                if opened is None:
                    return
                raise self.fail(f'"{opener}" opened here is never closed (expected "{closer}")', opened, field_path)
            self.field(descriptor, field_path)

    def field(self, descriptor: Descriptor, parent: FieldPath) -> None:
        at = self.position()
        name = self.tokens.token
        field = descriptor.fields_by_name.get(name)
        if field is None:
            if _NAME.fullmatch(name):
                raise self.fail(unknown_field_message(descriptor, name), at, (*parent, name))
            raise self.fail(f"expected a field name of {descriptor.name}, got {self.got()}", at, parent)
        self.tokens.NextToken()
        self.check_oneof(field, parent, at)
        if field.is_repeated:
            self.locations.setdefault((*parent, name), at)
        if field.message_type is not None:
            self.tokens.TryConsume(":")
        elif not self.tokens.TryConsume(":"):
            raise self.fail(f'expected ":" after {name}, got {self.got()}', self.position(), (*parent, name))
        if field.is_repeated and self.tokens.TryConsume("["):
            self.value_list(field, parent)
        else:
            self.value(field, self.entry_path(field, parent, at), at)
        if not self.tokens.TryConsume(","):
            self.tokens.TryConsume(";")

    def check_oneof(self, field: FieldDescriptor, parent: FieldPath, at: Position) -> None:
        if field.containing_oneof is None:
            return
        earlier, earlier_at = self.chosen.setdefault((parent, field.containing_oneof.name), (field.name, at))
        if earlier != field.name:
            raise self.fail(oneof_conflict_message(field, earlier, earlier_at[0]), at, (*parent, field.name))

    def entry_path(self, field: FieldDescriptor, parent: FieldPath, at: Position) -> FieldPath:
        """Record where ``field`` was written and return the path its value goes to."""
        path = (*parent, field.name)
        if field.is_repeated:
            index = self.counts.get(path, 0)
            self.counts[path] = index + 1
            path = (*path, index)
        elif path in self.locations:
            merges = field.message_type is not None
            outcome = "the two blocks merge" if merges else "the last value wins"
            message = f"given twice (also at line {self.locations[path][0]}): {outcome}"
            warnings.warn(ConfigWarning(message, self.path, *at, format_field_path(path)))
            if merges:
                return path  # keep the first block's position
        self.locations[path] = at
        return path

    def value_list(self, field: FieldDescriptor, parent: FieldPath) -> None:
        if self.tokens.TryConsume("]"):
            return
        while True:
            at = self.position()
            self.value(field, self.entry_path(field, parent, at), at)
            if self.tokens.TryConsume("]"):
                return
            if not self.tokens.TryConsume(","):
                message = f'expected "," or "]" in the list of {field.name}, got {self.got()}'
                raise self.fail(message, self.position(), (*parent, field.name))

    def value(self, field: FieldDescriptor, field_path: FieldPath, at: Position) -> None:
        if field.message_type is not None:
            opener = self.tokens.token
            if opener not in _CLOSING:
                raise self.fail(f'expected "{{" to open {field.name}, got {self.got()}', self.position(), field_path)
            self.tokens.NextToken()
            self.message(field.message_type, field_path, opener, at)
            return
        value_at = self.position()
        try:
            if field.enum_type is not None:
                self.tokens.ConsumeEnum(field)
            elif field.type == FieldDescriptor.TYPE_UINT32:
                text_format.ParseInteger(self.tokens.token, is_signed=False, is_long=False)
                self.tokens.NextToken()
            elif field.type == FieldDescriptor.TYPE_FLOAT:
                self.tokens.ConsumeFloat()
            elif field.type == FieldDescriptor.TYPE_BOOL:
                self.tokens.ConsumeBool()
            else:
                self.tokens.ConsumeString()
        except (text_format.ParseError, ValueError) as exc:
            if field.enum_type is not None:
                message = unknown_value_message(field.enum_type, self.got())
            else:
                message = expected_value_message(field, self.got())
            raise self.fail(message, value_at, field_path) from exc
