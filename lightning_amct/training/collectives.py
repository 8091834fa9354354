"""The callback's own collectives: the device they run on, and a broadcast that may end a fit.

A broadcast can be the last collective of a process: the callback's, at the end of fit, tells
every rank what rank 0 wrote, and the script may end right after. torch's gloo backend runs a
collective on a worker thread, which wakes the waiting rank first and lets go of the
collective's tensors after. A tensor made in Python is then still alive in Python, and letting
go of it takes the interpreter's lock: where the waiting rank's interpreter is shutting down by
then, the worker thread is stopped in the middle of a C++ destructor and the process aborts
("terminate called without an active exception"), after a run that did everything right. It
happens when the worker thread waits for a core, one run in ten on two busy cores.

:func:`broadcast_released` sends a picklable object as Lightning's ``strategy.broadcast`` does,
and returns only once the backend has let go of its tensors: it drops its own references and
waits (at most :data:`RELEASE_TIMEOUT_S`) until the tensors are gone.

Example:
    >>> broadcast_released({"model.onnx": "out/model.onnx"})  # one process: the object itself
    {'model.onnx': 'out/model.onnx'}
"""

from __future__ import annotations

import pickle
import time
import weakref
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

#: The longest :func:`broadcast_released` waits for the backend to let go of its tensors, in seconds.
RELEASE_TIMEOUT_S = 10.0


def collective_device() -> torch.device:
    """The device collectives of the default process group run on (CPU for gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def several_ranks() -> bool:
    """Whether a default process group of more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_released(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank of the default process group (``obj`` itself without
    one), once the backend holds none of the tensors that carried it."""
    if not several_ranks():
        return obj
    device, sending = collective_device(), dist.get_rank() == src
    payload = pickle.dumps(obj) if sending else b""
    size = torch.tensor([len(payload)], dtype=torch.long, device=device)
    dist.broadcast(size, src)
    if sending:
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    else:
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(data, src)
    result = obj if sending else pickle.loads(data.cpu().numpy().tobytes())
    carriers = [weakref.ref(size), weakref.ref(data)]
    del size, data
    wait_until_gone(carriers, RELEASE_TIMEOUT_S)
    return result


def wait_until_gone(refs: list[weakref.ref], timeout_s: float) -> bool:
    """Wait until the objects of ``refs`` are gone, at most ``timeout_s`` seconds; whether they are."""
    deadline = time.monotonic() + timeout_s
    while any(ref() is not None for ref in refs):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True
