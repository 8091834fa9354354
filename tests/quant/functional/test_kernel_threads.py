"""Fused-kernel passes split over threads: the same values as one pass, in any process."""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from lightning_amct.quant.functional import ulq_fake_quant
from lightning_amct.quant.functional.kernel_threads import MIN_PART, split_pass
from lightning_amct.quant.functional.saved_codes import saving_codes


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_parts_cover_the_range_in_order(two_threads) -> None:
    assert split_pass(MIN_PART, lambda start, stop: (start, stop)) == [(0, MIN_PART)]
    size = 2 * MIN_PART + 3
    assert split_pass(size, lambda start, stop: (start, stop)) == [(0, size // 2), (size // 2, size)]


def _train_step(threads: int, bits: int) -> tuple[torch.Tensor, ...]:
    """y, the conv input rebuilt from saved codes (its weight gradient), dL/dx and the clip gradients
    of a quantizer on 6.3 parts' worth of elements, with torch on ``threads`` threads."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(bits)
    x = (torch.randn(16, 8, 64, 50, generator=gen) * 2).requires_grad_(True)
    clip_max, clip_min = torch.tensor([2.5], requires_grad=True), torch.tensor([-1.5], requires_grad=True)
    weight = torch.randn(4, 8, 1, 1, generator=gen, requires_grad=True)
    with saving_codes():
        y = ulq_fake_quant(x, clip_max, clip_min, bits, keep_codes=True)
        out = torch.nn.functional.conv2d(y, weight)
    out.backward(torch.randn(out.shape, generator=gen))
    return y.detach(), weight.grad, x.grad, clip_max.grad, clip_min.grad


@pytest.mark.parametrize("bits", [8, 16])
def test_split_passes_equal_one_pass(bits: int) -> None:
    threads = torch.get_num_threads()
    try:
        split, whole = _train_step(2, bits), _train_step(1, bits)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split[0], whole[0]) and torch.equal(split[2], whole[2])
    torch.testing.assert_close(split[1], whole[1])  # torch's own conv on 1 or 2 threads
    for a, b in zip(split[3:], whole[3:]):  # sums added part by part
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(split[2].abs().sum()))


def _quantized_sum(x: torch.Tensor) -> float:
    """The sum of ``x`` fake-quantized (summed by NumPy: a forked child must run no parallel torch
    operator, which hangs in OpenMP after a fork whatever this package does)."""
    return float(ulq_fake_quant(x, torch.tensor([2.5]), torch.tensor([-1.5]), 8).numpy().sum(dtype="float64"))


def _in_child(x: torch.Tensor, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(2)
    queue.put(_quantized_sum(x))


def test_a_forked_process_splits_passes_with_its_own_pool(two_threads) -> None:
    x = torch.randn(16, 8, 64, 50, generator=torch.Generator().manual_seed(0))
    expected = _quantized_sum(x)  # the parent's pool exists now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_in_child, args=(x, queue))
    child.start()
    child.join(timeout=60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0 and queue.get(timeout=1) == expected
