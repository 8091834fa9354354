"""One pass of a fused CPU kernel split over the threads torch uses, for large tensors.

The fused kernels (:mod:`~lightning_amct.quant.functional.cpu_kernels`) are single-threaded numba
functions that release the GIL. torch runs its own operators on ``torch.get_num_threads()``
threads, so a fake-quant pass on one thread weighs more in a training step the more threads torch
has: a small CNN's INT8 step measured 1.17x its float step on one thread and 1.3x on two. A pass
over a large tensor is therefore cut into contiguous parts, one per torch thread: the calling
thread runs the first part, a pool of Python threads the others, each calling the kernel on its
part's addresses. (numba's own parallel loops would need its threading layer, which is neither
fork- nor thread-safe.) Element-wise results are the same bit for bit whatever the parts; results
that are sums come back part by part, for the caller to add.

Parts are at least :data:`MIN_PART` elements: below that, handing a part to another thread (some
tens of microseconds) costs more than it saves. The pool is made per process, so a process forked
after it was made (``ddp_fork``, dataloader workers) makes its own.

Example:
    >>> split_pass(10, lambda start, stop: stop - start)  # too small to split
    [10]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

MIN_PART = 1 << 16
Result = TypeVar("Result")

_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (-1, 0)  # (process id, workers) of the pool


def split_pass(size: int, run: Callable[[int, int], Result]) -> list[Result]:
    """``run(start, stop)`` over ``[0, size)`` in contiguous parts, one per torch thread at most;
    the results in part order (one part, run on the calling thread, for a small ``size``)."""
    parts = min(torch.get_num_threads(), size // MIN_PART)
    if parts <= 1:
        return [run(0, size)]
    bounds = [size * part // parts for part in range(parts + 1)]
    pool = _executor(parts - 1)
    others = [pool.submit(run, bounds[part], bounds[part + 1]) for part in range(1, parts)]
    first = run(bounds[0], bounds[1])
    return [first, *(future.result() for future in others)]


def _executor(workers: int) -> ThreadPoolExecutor:
    """The process's pool of at least ``workers`` threads."""
    global _pool, _pool_key
    pid = os.getpid()
    if _pool is None or _pool_key[0] != pid or _pool_key[1] < workers:
        if _pool is not None and _pool_key[0] == pid:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lightning-amct-kernel")
        _pool_key = (pid, workers)
    return _pool
