"""Reading a recipe's YAML with the line and column of every key, so errors point at the line.

:func:`read_recipe_file` returns the data and a :class:`RecipeSource` that places a
:class:`RecipeError` at the key it concerns, as :mod:`lightning_amct.config.locations` does for
``.cfg`` files: ``quant.yaml:14:3: compress: unknown key 'epoch', did you mean 'epochs'? (...)``.
A key the file leaves out is placed at the nearest enclosing key it does write.

Example:
    >>> source = RecipeSource("r.yaml", recipe_positions("compress:\\n  config: q.cfg\\n  epoch: 6\\n"))
    >>> print(source.error("unknown key 'epoch'", ("compress",), at=("compress", "epoch")))
    r.yaml:3:3: compress: unknown key 'epoch'
    >>> print(source.error("missing key 'epochs'", ("compress",), at=("compress", "epochs")))
    r.yaml:1:1: compress: missing key 'epochs'
    >>> print(source.error("expected a .cfg path", ("compress", "config"), value=True))
    r.yaml:2:11: compress.config: expected a .cfg path
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import yaml

from lightning_amct.config import ConfigError, FieldPath, SourceMap, TextOrigin
from lightning_amct.config.errors import format_field_path


#: The last part of the key path under which :func:`recipe_positions` places a key's scalar value.
VALUE = "<value>"


class RecipeError(ConfigError):
    """A recipe that cannot run as written.

    Like a :class:`~lightning_amct.ConfigError` (whose attributes it has), it names the file,
    line and column where the recipe came from a file, the key (``compress.epochs``) and what
    would be valid.
    """


class RecipeSource:
    """Where the keys of a recipe were written (nothing is located for a recipe given as data).

    Args:
        path: the recipe file, or None.
        positions: the position of each key path, as :func:`recipe_positions` finds them.
    """

    def __init__(
        self, path: str | None = None, positions: SourceMap | None = None, blocks: dict | None = None
    ) -> None:
        self.path = path
        self.positions = positions or SourceMap(path)
        self.blocks: dict[FieldPath, TextOrigin] = blocks or {}

    def text_origin(self, key_path: FieldPath) -> TextOrigin | None:
        """Where the text of the literal block scalar (``key: |``) at ``key_path`` starts in the
        file, as :func:`literal_blocks` finds it; None for any other value."""
        return self.blocks.get(tuple(key_path))

    def error(self, message: str, key_path: FieldPath, at: FieldPath | None = None, value: bool = False) -> RecipeError:
        """A :class:`RecipeError` about ``key_path`` (the recipe itself when empty), placed at ``at``.

        ``at`` defaults to ``key_path``; give the unknown or missing key there when the message
        is about the section that holds it. ``value``: the message is about the key's value, which
        it is placed at where that is a plain scalar (``devices: banana`` at ``banana``).
        """
        if at is None:
            at = (*key_path, VALUE) if value else key_path
        line, column = self.positions.nearest(at)
        return RecipeError(message, self.path, line, column, format_field_path(key_path) or "the recipe")


def read_recipe_file(path: str | Path) -> tuple[object, RecipeSource]:
    """The YAML data of the recipe at ``path`` and where each key sits in it.

    Raises:
        RecipeError: the file cannot be read or is not valid YAML (at the line of the problem).
    """
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 text ({exc.reason})"
        raise RecipeError(f"cannot read the recipe: {reason}", shown) from exc
    try:
        return yaml.safe_load(text), RecipeSource(shown, recipe_positions(text, shown), literal_blocks(text, shown))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"not valid YAML: {problem}", shown, line, column) from exc


def recipe_positions(text: str, path: str | None = None) -> SourceMap:
    """The 1-based line and column of every mapping key in the YAML ``text``, by key path, and of
    each key's value where it is a scalar, under the key path and :data:`VALUE`.

    Raises:
        RecipeError: a key given twice in one mapping (YAML's loader would keep the last).
    """
    positions: dict[FieldPath, tuple[int, int]] = {}
    pending = [((), yaml.compose(text, Loader=yaml.SafeLoader))]
    while pending:
        key_path, node = pending.pop()
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = (*key_path, str(key.value))
                at = (key.start_mark.line + 1, key.start_mark.column + 1)
                if child in positions:  # YAML's loader keeps the last silently
                    name = format_field_path(child)
                    message = f"{name}: given twice (also at line {positions[child][0]}), the last would win"
                    raise RecipeError(message, path, *at)
                positions[child] = at
                if isinstance(value, yaml.ScalarNode):
                    positions[(*child, VALUE)] = (value.start_mark.line + 1, value.start_mark.column + 1)
                pending.append((child, value))
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                positions[(*key_path, index)] = (item.start_mark.line + 1, item.start_mark.column + 1)
                pending.append(((*key_path, index), item))
    return SourceMap(path, positions)


def literal_blocks(text: str, path: str) -> dict[FieldPath, TextOrigin]:
    """Key path → where the text of each literal block scalar (``config: |``) starts in the YAML
    ``text``: the line after the ``|`` and the column of the block's indentation, which YAML
    strips from every line of it.

    Example:
        >>> literal_blocks("compress:\\n  config: |\\n    skip_layers: fc\\n", "r.yaml")
        {('compress', 'config'): TextOrigin(path='r.yaml', line=3, column=5)}
    """
    lines = text.split("\n")
    found = {}
    pending = [((), yaml.compose(text, Loader=yaml.SafeLoader))]
    while pending:
        key_path, node = pending.pop()
        if isinstance(node, yaml.MappingNode):
            pending += [((*key_path, str(key.value)), value) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            pending += [((*key_path, index), item) for index, item in enumerate(node.value)]
        elif isinstance(node, yaml.ScalarNode) and node.style == "|":
            first = node.start_mark.line + 1  # 0-based: the line after the "|"
            content = next((line for line in lines[first:] if line.strip()), "")
            found[key_path] = TextOrigin(path, first + 1, len(content) - len(content.lstrip(" ")) + 1)
    return found


def unknown_key_message(name: object, valid: Sequence[str]) -> str:
    """``unknown key 'epoch', did you mean 'epochs'? (valid keys: config, epochs)``."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    hint = f", did you mean {close[0]!r}?" if close else ""
    return f"unknown key {name!r}{hint} (valid keys: {', '.join(valid)})"
