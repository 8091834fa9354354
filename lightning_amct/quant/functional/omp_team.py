"""Passes of the fused CPU kernels on torch's own OpenMP threads.

torch runs a CPU operator on a team of ``torch.get_num_threads()`` OpenMP threads, which spin
for a while after each operator, waiting for the next one. A fused kernel
(:mod:`~lightning_amct.quant.functional.cpu_kernels`) called on the Python thread alone uses one
core of the team's, so its share of a training step grows with the thread count; a pool of
threads of our own fights the spinning ones for the same cores (measured 2-3 % slower over a
step on two cores). A pass over a large tensor therefore runs where torch's operators run:
``GOMP_parallel`` of the OpenMP runtime that torch loaded, with a numba ``cfunc`` as the body of
the parallel region, as ``#pragma omp parallel`` would call it.

A pass is a *driver*: a function of one argument, the address of an int64 *block* that holds the
pass's addresses and scalars. Each thread of the team calls it and takes its own contiguous run of
the pass's items (:func:`member_run`): chunks of :data:`CHUNK` elements (:func:`member_chunks`),
or a weight's channels. The runs follow in thread order, as torch's ``parallel_for`` splits an
element-wise operator's range, so a thread reads the part of an activation that the operator
before ran on the same core, from that core's cache (taking chunks in turn, first come first
served, measured 1-4 % slower over a training step on two cores). Element-wise results do not
depend on who took which chunk; a driver that sums keeps one partial sum per chunk, which the
caller adds in chunk order, so a result is the same on any number of threads, on the calling
thread alone included.

The team runs where torch would run one: more than one torch thread and GNU OpenMP loaded (torch's
Linux builds); elsewhere the driver runs on the calling thread. A process forked after torch used
its team (``ddp_fork``, data-loader workers) must use one thread, as torch's own operators would
otherwise hang there too.

Example:
    >>> team_threads(1000)  # a small pass runs on the calling thread
    1
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Callable

import llvmlite.binding as llvm
import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from lightning_amct.quant.functional.cpu_kernels import compiled, disk_cached, pointer

#: Elements per chunk: 64 KiB of float32, a few microseconds of work, a multiple of a cache line.
CHUNK = 1 << 14
#: Chunks a pass must span to run on the team (98,304 elements): measured over training steps on two
#: cores, 6 was as fast as 20 on a quiet machine and 2-5 % faster under load; 2 to 5 were no better.
MIN_TEAM_CHUNKS = 6


#: The OpenMP runtime's functions that a driver calls, linked by name (:func:`_gomp_parallel`).
_RUNTIME_QUERIES = ("omp_get_thread_num", "omp_get_num_threads")


@intrinsic
def count_up(typingctx: object, counter: types.Type) -> tuple:
    """An atomic fetch-and-add of 1 on the int64 at address ``counter`` (for counts the team raises)."""

    def codegen(context: object, builder: object, signature: object, args: tuple) -> object:
        pointer = builder.inttoptr(args[0], context.get_value_type(types.CPointer(types.int64)))
        return builder.atomic_rmw("add", pointer, context.get_constant(types.int64, 1), "monotonic")

    return types.int64(counter), codegen


def _runtime_query(name: str) -> Callable:
    """An intrinsic that calls the OpenMP runtime's ``int name(void)``, as int64."""

    @intrinsic
    def query(typingctx: object) -> tuple:
        def codegen(context: object, builder: object, signature: object, args: tuple) -> object:
            function_type = ir.FunctionType(ir.IntType(32), [])
            function = cgutils.get_or_insert_function(builder.module, function_type, name)
            return builder.sext(builder.call(function, []), ir.IntType(64))

        return types.int64(), codegen

    return query


_thread_number, _team_size = (_runtime_query(name) for name in _RUNTIME_QUERIES)


@compiled(inline="always")
def member_run(count: int) -> tuple[int, int]:
    """The items ``[first, last)`` of ``count`` that this thread of the team takes.

    Thread ``t`` of ``T`` takes the ``t``-th of ``T`` contiguous runs of ``ceil(count / T)`` items
    (the last run shorter, or empty). Only inside the team's parallel region.
    """
    run = -(-count // _team_size())
    first = min(count, _thread_number() * run)
    return first, min(count, first + run)


@compiled(inline="always")
def member_block_run(block: int, word: int) -> tuple[int, int]:
    """:func:`member_run` of the count in int64 word ``word`` of the block at address ``block``."""
    return member_run(numba.carray(pointer(block, np.int64), word + 1)[word])


@compiled(inline="always")
def member_chunks(size: int) -> tuple[int, int]:
    """The chunks ``[first, last)`` of a pass over ``size`` elements that this thread takes (:func:`member_run`)."""
    return member_run(-(-size // CHUNK))


def team_threads(size: int) -> int:
    """How many of torch's threads a pass over ``size`` elements runs on; 1: the calling thread alone.

    1 where torch has one thread, the runtime is not GNU OpenMP, or ``size`` spans fewer than
    :data:`MIN_TEAM_CHUNKS` chunks (waking the team would cost more than it saves).
    """
    if size < MIN_TEAM_CHUNKS * CHUNK:
        return 1
    threads = torch.get_num_threads()
    if threads < 2 or _gomp_parallel() is None:
        return 1
    return min(threads, -(-size // CHUNK))


class TeamPass:
    """A driver run by every thread of torch's team.

    Args:
        body: a module-level Python function of the block's address that calls a compiled
            driver; compiled into the team's C callback when first run (cached on disk).
    """

    def __init__(self, body: Callable[[int], None]) -> None:
        self.body = body
        self._callback: object | None = None

    def run(self, block: np.ndarray, threads: int) -> None:
        """Run the pass that ``block`` describes on ``threads`` threads (:func:`team_threads`), GIL released."""
        parallel = _gomp_parallel()  # first: it resolves the runtime functions the callback calls
        if self._callback is None:
            self._callback = _callback(self.body)
        parallel(self._callback.address, block.ctypes.data, threads, 0)


def _callback(body: Callable[[int], None]) -> object:
    """``body`` as a C callback ``void(int64)``, cached on disk where numba can write its cache."""
    return disk_cached(functools.partial(numba.cfunc, types.void(types.int64)), body)


@functools.cache
def _gomp_parallel() -> Callable[[int, int, int, int], None] | None:
    """``GOMP_parallel`` of the GNU OpenMP runtime torch loaded, or None (another runtime, none)."""
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:  # only the copy already in the process: torch's
        runtime = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
        parallel = runtime.GOMP_parallel
    except (OSError, AttributeError):
        return None
    for name in _RUNTIME_QUERIES:  # what the compiled drivers call, resolved in this copy
        llvm.add_symbol(name, ctypes.cast(getattr(runtime, name), ctypes.c_void_p).value)
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    return parallel
