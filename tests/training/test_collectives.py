"""The broadcast that may end a fit waits until the backend has let go of the tensors it sent.

The premise is torch's: a tensor made in Python stays alive in Python while a collective's work
holds it. A one-rank gloo process group (not the default group, which the other tests own) holds
a tensor in the work of a broadcast until that work is dropped.
"""

from __future__ import annotations

import threading
import time
import weakref

import torch
import torch.distributed as dist

from lightning_amct.training.collectives import broadcast_released, wait_until_gone


def _held_by_a_broadcast() -> tuple[weakref.ref, object]:
    """A weak reference to a tensor whose only holder is the work of a gloo broadcast, and that work."""
    group = dist.ProcessGroupGloo(dist.HashStore(), 0, 1)
    tensor = torch.arange(4.0)
    work = group.broadcast([tensor])
    work.wait()
    ref = weakref.ref(tensor)
    del tensor
    return ref, work


def test_waits_until_the_work_of_a_collective_lets_go_of_its_tensor() -> None:
    ref, work = _held_by_a_broadcast()
    assert ref() is not None  # the work keeps it alive
    dropped = threading.Event()

    def drop_later() -> None:
        nonlocal work
        time.sleep(0.2)
        dropped.set()
        work = None

    thread = threading.Thread(target=drop_later)
    start = time.monotonic()
    thread.start()
    assert wait_until_gone([ref], timeout_s=10.0)
    assert dropped.is_set() and time.monotonic() - start >= 0.2
    thread.join()


def test_gives_up_after_the_timeout() -> None:
    ref, work = _held_by_a_broadcast()
    start = time.monotonic()
    assert not wait_until_gone([ref], timeout_s=0.05)
    assert 0.05 <= time.monotonic() - start < 5 and ref() is not None
    del work
    assert ref() is None


def test_without_a_process_group_the_object_is_returned_as_it_is() -> None:
    payload = {"checkpoint": "out/model_compressed.pt"}
    assert broadcast_released(payload) is payload
