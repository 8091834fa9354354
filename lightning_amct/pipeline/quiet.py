"""Building a Trainer without its INFO lines (the GPU/TPU lines, tips), where they were said already."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def lightning_info_silenced() -> Iterator[None]:
    """No INFO records in the block: a second Trainer's GPU/TPU lines and tips, said by the first.

    Example:
        >>> with lightning_info_silenced():
        ...     logging.getLogger("lightning.pytorch").info("GPU available: False")
    """
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(previous)
