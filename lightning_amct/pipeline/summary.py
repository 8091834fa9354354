"""The closing table of a recipe run: float against compressed, one measured quantity per row.

The last column is the change: a difference for the test metric, a ratio (compressed / float)
for everything else, so ``0.27x`` on a file size means the compressed file is 27% as large; a row
whose ratio would mean nothing (too few steps timed) shows ``-`` there and says why in a note.
:meth:`Summary.to_markdown` is what ``lightning-amct run`` prints and writes to ``summary.md``:
the table, then the notes; :meth:`Summary.to_dict` is the same data, unformatted, for
``summary.json`` and benchmarks.

Example:
    >>> summary = Summary("quant", [Row("test_acc", 0.97, 0.96, "metric"), Row("ONNX file", 2048, 1024, "bytes")])
    >>> print(summary.to_markdown())
    | quant     | float   | compressed | change  |
    |-----------|---------|------------|---------|
    | test_acc  | 0.9700  | 0.9600     | -0.0100 |
    | ONNX file | 2.0 KiB | 1.0 KiB    | 0.50x   |
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Unit = Literal["metric", "count", "bytes", "seconds"]


@dataclass(frozen=True)
class Row:
    """One measured quantity; a value is None where it does not apply (a float stage not run).

    ``comparable`` is False where the two values are shown but their ratio would mislead.
    """

    label: str
    float_value: float | None
    compressed_value: float | None
    unit: Unit
    comparable: bool = True


@dataclass(frozen=True)
class Summary:
    """The rows of one run, titled with the recipe's name, and what they mean in words."""

    name: str
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        """The rows as an aligned markdown table (readable as plain text too), then the notes."""
        table = [[self.name, "float", "compressed", "change"]]
        table += [
            [row.label, _format(row.float_value, row.unit), _format(row.compressed_value, row.unit), _change(row)]
            for row in self.rows
        ]
        widths = [max(len(line[i]) for line in table) for i in range(4)]
        lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in table]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        return "\n\n".join(["\n".join(lines), *self.notes])

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the name, the rows (each a dict of its fields) and the notes."""
        return {"name": self.name, "rows": [asdict(row) for row in self.rows], "notes": list(self.notes)}


def _format(value: float | None, unit: Unit) -> str:
    if value is None:
        return "-"
    if unit == "metric":
        return f"{value:.4f}"
    if unit == "seconds":
        return f"{value * 1e3:.2f} ms"
    if unit == "bytes":
        for suffix, size in (("MiB", 2**20), ("KiB", 2**10)):
            if value >= size:
                return f"{value / size:.1f} {suffix}"
        return f"{value:.0f} B"
    for suffix, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{suffix}"
    return f"{value:.0f}"


def _change(row: Row) -> str:
    if row.float_value is None or row.compressed_value is None or not row.comparable:
        return "-"
    if row.unit == "metric":
        return f"{row.compressed_value - row.float_value:+.4f}"
    if not row.float_value:
        return "-"
    return f"{row.compressed_value / row.float_value:.2f}x"
