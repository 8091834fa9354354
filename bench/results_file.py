"""``bench/results.md`` is made of sections, each written by one benchmark, that replace only their own.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "results.md"
    >>> write_section(path, "one", "# One\\n")
    >>> write_section(path, "two", "# Two\\n")
    >>> write_section(path, "one", "# One again\\n")
    >>> print(path.read_text())
    <!-- begin one -->
    # One again
    <!-- end one -->
    <BLANKLINE>
    <!-- begin two -->
    # Two
    <!-- end two -->
    <BLANKLINE>
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the markers of section ``name`` in ``path`` (appended when new), atomically."""
    block = f"<!-- begin {name} -->\n{text.rstrip()}\n<!-- end {name} -->\n"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->\n.*?<!-- end {re.escape(name)} -->\n", re.DOTALL)
    if pattern.search(old):
        new = pattern.sub(lambda _: block, old)
    else:
        new = f"{old.rstrip()}\n\n{block}" if old.strip() else block
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(new)
    os.replace(temporary, path)


def finish_timing_run(
    results: str | None, name: str, title: str, setup: str, rows: list[str], targets: list[str]
) -> None:
    """The end of a timing benchmark: the load average now, the targets printed, and, with
    ``results`` (a markdown path), the section ``name``: ``title``, the command that ran, ``setup``
    with the load average, the table ``rows`` and the targets."""
    end = f"load average {os.getloadavg()[0]:.1f} at the end"
    print(end)
    print("\n".join(["targets:", *targets]))
    if results:
        command = " ".join([f"python bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])
        lines = [f"## {title}", "", f"`{command}`", "", f"- {setup}; {end}", "", *rows, "", "Targets:", ""]
        write_section(Path(results), name, "\n".join([*lines, *(f"- {t}" for t in targets)]))
