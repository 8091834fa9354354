"""Building many objects at once without paying for Python's cyclic garbage collector meanwhile.

Resolving a plan and compressing a model create a few objects per layer (specs, quantizer modules,
their Parameters and buffers). Every 700 new container objects Python runs a collection, and the
occasional full one walks every object alive, the whole model included: for a model of 10,000
layers these collections cost as much as the work itself. Nothing built here forms garbage
cycles worth collecting early, so collection waits until the block ends, where the usual
thresholds apply again.

Example:
    >>> import gc
    >>> with collection_paused():
    ...     gc.isenabled()
    False
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Disable the cyclic garbage collector inside the block (if it was enabled), then restore it."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
