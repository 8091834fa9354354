"""IFMR against a direct evaluation of all 61 candidates, and the bounded observer against IFMR."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_amct.quant.functional import IfmrObserver, ifmr_clip

F32 = np.float32


def ref_ifmr(values: np.ndarray, bits: int) -> tuple[np.float32, np.float32]:
    """algorithms.md, IFMR steps 1-3, each candidate's MSE computed on its own."""
    x = np.asarray(values, dtype=F32).ravel()
    n = x.size
    k = n - int(0.999999 * n) or 1
    ordered = np.sort(x)
    max_value = max(ordered[n - k], F32(0))
    min_value = min(ordered[k - 1], F32(0))
    a = max(abs(max_value), abs(min_value))
    divisor = F32(2 ** (bits - 1)) if abs(min_value) > abs(max_value) else F32(2 ** (bits - 1) - 1)
    losses, scales = [], []
    for i in range(61):
        c = F32((70 + i) / 100) * F32(a)
        s = c / divisor
        quantized = np.round(np.clip(x, -c, c) / s) * s if s > 0 else np.zeros_like(x)
        losses.append(np.mean(np.square((quantized - x).astype(np.float64))))
        scales.append(s)
    best = min(range(61), key=lambda i: (losses[i], i))  # first minimum
    return F32(2 ** (bits - 1) - 1) * scales[best], F32(-(2 ** (bits - 1))) * scales[best]


def _data(kind: str, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(n, generator=gen)
    if kind == "relu":
        return torch.randn(n, generator=gen).relu() * 3
    if kind == "skewed_negative":  # |min| > |max|: the 2^(n-1) divisor
        return -torch.distributions.Exponential(1.0).sample((n,)) + 0.2
    if kind == "heavy_tail":
        return torch.randn(n, generator=gen) ** 3
    raise AssertionError(kind)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("kind", ["normal", "relu", "skewed_negative", "heavy_tail"])
def test_ifmr_clip_matches_direct_search(bits: int, kind: str) -> None:
    torch.manual_seed(1)
    values = _data(kind, 5000, seed=bits)
    clip_max, clip_min = ifmr_clip(values, bits)
    assert clip_max.dtype == clip_min.dtype == torch.float32 and clip_max.shape == ()
    assert (clip_max.item(), clip_min.item()) == ref_ifmr(values.numpy(), bits)


def test_percentile_rank_above_one() -> None:
    """N = 1e6 + 1: k = N - int(0.999999 N) = 2, so the largest and the smallest value are outliers."""
    values = torch.rand(1_000_001, generator=torch.Generator().manual_seed(0)) * 2 - 1
    values[0] = 50.0
    values[1] = -40.0
    clip_max, clip_min = ifmr_clip(values, 8)
    assert (clip_max.item(), clip_min.item()) == ref_ifmr(values.numpy(), 8)
    assert clip_max.item() < 2.0


def test_all_zero_values_give_zero_clips() -> None:
    assert ifmr_clip(torch.zeros(100), 8) == (0.0, 0.0)


def _observe(batches: list[torch.Tensor], **kwargs) -> IfmrObserver:
    observer = IfmrObserver(kwargs.pop("bits", 8), **kwargs)
    for batch in batches:
        observer.update(batch)
    return observer


@pytest.mark.parametrize("bits", [4, 8])
def test_observer_equals_ifmr_clip_under_the_cap(bits: int) -> None:
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(4, 3, 8, 8, generator=gen) * (i + 1) for i in range(4)] + [torch.randn(1)]
    observer = _observe(batches, bits=bits, sample_cap=4 * 768 + 1)
    assert observer.count == 4 * 768 + 1
    expected = ifmr_clip(torch.cat([b.reshape(-1) for b in batches]), bits)
    assert observer.compute() == expected


def test_observer_over_the_cap_keeps_exact_percentile_and_a_bounded_sample() -> None:
    gen = torch.Generator().manual_seed(6)
    batches = [torch.rand(700_000, generator=gen) for _ in range(3)]
    batches[1][5] = 100.0  # beyond the sample's reach, but k = 3: outliers 100, 90, then 1.0-ish
    batches[2][7] = 90.0
    observer = _observe(batches, sample_cap=1000, tail_cap=16)
    everything = torch.cat(batches)
    assert observer.sample.numel() == 1000 and observer.largest.numel() == 16
    k = 2_100_000 - int(0.999999 * 2_100_000)
    assert k == 3
    assert torch.equal(observer.largest[:k], torch.topk(everything, k).values)
    assert torch.equal(observer.smallest[:k], torch.topk(everything, k, largest=False).values)
    clip_max, _ = observer.compute()
    assert abs(clip_max.item() - 1.0) < 0.35  # symmetric search around the 3rd largest (~1.0)
    again = _observe(batches, sample_cap=1000, tail_cap=16)
    assert torch.equal(again.sample, observer.sample) and again.compute() == observer.compute()


def test_observer_merge_equals_single_observer() -> None:
    gen = torch.Generator().manual_seed(7)
    first, second = torch.randn(300, generator=gen), torch.randn(200, generator=gen) * 2
    merged = _observe([first])
    merged.merge(_observe([second], seed=1))
    assert merged.count == 500
    assert merged.compute() == ifmr_clip(torch.cat([first, second]), 8)


def test_observer_merge_over_the_cap_is_bounded() -> None:
    parts = [_observe([torch.randn(800)], sample_cap=500, seed=s) for s in range(3)]
    for part in parts[1:]:
        parts[0].merge(part)
    assert parts[0].count == 2400 and parts[0].sample.numel() == 500


def test_observer_errors() -> None:
    with pytest.raises(ValueError, match="at least one value"):
        ifmr_clip(torch.zeros(0), 8)
    with pytest.raises(ValueError, match="at least one value"):
        IfmrObserver(8).compute()
    observer = _observe([torch.zeros(2_000_000)], tail_cap=1)
    with pytest.raises(RuntimeError, match="tail_cap >= 2"):
        observer.compute()
    with pytest.raises(ValueError, match="sample_cap"):
        IfmrObserver(8, sample_cap=0)
