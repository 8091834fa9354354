"""IFMR: the activation clips that the first training batches initialise.

With n bits, ``[q_lo, q_hi] = [-2^(n-1), 2^(n-1) - 1]``, over N collected values:

1. ``k = N - int(0.999999 * N)`` (1 if that is 0); ``max_value`` = the k-th largest value,
   clamped ``>= 0``; ``min_value`` = the k-th smallest, clamped ``<= 0``.
2. ``A = max(|max_value|, |min_value|)``; 61 candidates ``c_i = r_i * A`` with
   ``r_i = 0.70, 0.71, ..., 1.30``; ``s_i = c_i / q_hi`` (``c_i / 2^(n-1)`` if
   ``|min_value| > |max_value|``); ``loss_i = mean((round(clamp(x, -c_i, c_i) / s_i) * s_i - x)^2)``;
   the first ``i`` with the smallest loss wins.
3. ``clip_max = q_hi * s``, ``clip_min = q_lo * s``.

Candidates and scales are float32; the squared errors are summed in float64. When ``A = 0`` every
candidate is 0 and the clips are ``(0, 0)``.

:func:`ifmr_clip` computes this from all the values at once. :class:`IfmrObserver` collects them
batch by batch in bounded memory: the percentile needs only the ``k`` most extreme values (kept
exactly), and the MSE search runs on a bounded sample that is all the values while they fit.

Example:
    >>> import torch
    >>> clip_max, clip_min = ifmr_clip(torch.linspace(-1.0, 2.0, 301), num_bits=8)
    >>> round(clip_max.item(), 4), round(clip_min.item(), 4)
    (2.0, -2.0157)
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_amct.quant.functional.precision import int_range, validate_num_bits

PERCENTILE = 0.999999
NUM_CANDIDATES = 61
_SEARCH_CHUNK = 2**14  # values per step of the search: 61 x 16384 floats (4 MiB) at a time
_UPDATE_CHUNK = 2**22


def percentile_rank(count: int) -> int:
    """``k = N - int(0.999999 * N)``, at least 1: the rank of IFMR's max/min value.

    Example:
        >>> percentile_rank(1000), percentile_rank(10**9)
        (1, 1000)
    """
    return max(count - int(PERCENTILE * count), 1)


def candidate_ratios(device: torch.device | str | None = None) -> Tensor:
    """The 61 search ratios ``r_i = (70 + i) / 100`` as float32."""
    return ((torch.arange(NUM_CANDIDATES, dtype=torch.float64) + 70) / 100).to(torch.float32).to(device)


def ifmr_search(values: Tensor, max_value: Tensor, min_value: Tensor, num_bits: int) -> tuple[Tensor, Tensor]:
    """Steps 2-3 of IFMR: the symmetric MSE search over 61 clip candidates.

    Args:
        values: finite values the MSE is measured on (flattened; float32 math).
        max_value: the percentile maximum, ``>= 0``.
        min_value: the percentile minimum, ``<= 0``.
        num_bits: bits of the grid.

    Returns:
        ``(clip_max, clip_min)`` as float32 scalars.
    """
    q_lo, q_hi = int_range(num_bits)
    x = values.detach().reshape(-1).float()
    abs_max, abs_min = max_value.float().abs(), min_value.float().abs()
    divisor = torch.where(abs_min > abs_max, float(-q_lo), float(q_hi))
    clips = (candidate_ratios(x.device) * torch.maximum(abs_max, abs_min)).unsqueeze(1)
    scales = clips / divisor
    safe_scales = torch.where(scales > 0, scales, 1.0)
    squared_error = torch.zeros(NUM_CANDIDATES, dtype=torch.float64, device=x.device)
    for chunk in x.split(_SEARCH_CHUNK):
        row = chunk.unsqueeze(0)
        err = torch.clamp(row, -clips, clips).div_(safe_scales).round_().mul_(safe_scales).sub_(row)
        squared_error += err.double().square_().sum(dim=1)
    best = torch.argmin(squared_error / max(x.numel(), 1))
    scale = scales[best, 0]
    return q_hi * scale, q_lo * scale


def ifmr_clip(values: Tensor, num_bits: int) -> tuple[Tensor, Tensor]:
    """IFMR clips ``(clip_max, clip_min)`` of all ``values`` (finite), float32 scalars.

    Raises:
        ValueError: ``values`` is empty.

    Example:
        >>> ifmr_clip(torch.tensor([0.0, 1.0, 2.0, 3.0]), num_bits=4)
        (tensor(3.5100), tensor(-4.0114))
    """
    x = values.detach().reshape(-1).float()
    if x.numel() == 0:
        raise ValueError("ifmr_clip needs at least one value")
    k = percentile_rank(x.numel())
    max_value = torch.topk(x, k).values[-1].clamp(min=0.0)
    min_value = torch.topk(x, k, largest=False).values[-1].clamp(max=0.0)
    return ifmr_search(x, max_value, min_value, num_bits)


class IfmrObserver:
    """Collects values batch by batch for :func:`ifmr_clip`, in bounded memory.

    Keeps the ``tail_cap`` largest and smallest values seen (exact percentile for up to
    ``N`` values with ``N - int(0.999999 N) <= tail_cap``: about 2.0e9 values with the default
    2048) and a sample of at most ``sample_cap`` values for the MSE search (2**20 by default:
    4 MiB of float32 plus 8 MiB of sampling keys). Memory is bounded by
    ``O(tail_cap + sample_cap + 2**22)`` elements whatever the number of batches.

    While the total stays within ``sample_cap`` the sample is every value in arrival order and
    :meth:`compute` equals :func:`ifmr_clip` of the concatenated batches exactly. Beyond it the
    sample is uniform without replacement: every value gets a random key (float64, from a
    generator seeded with ``seed``) and the ``sample_cap`` smallest keys are kept, so the sample
    is deterministic given the batches, their order and the seed. :meth:`merge` unites two
    observers (e.g. gathered from several processes) the same way.

    Args:
        num_bits: bits of the grid.
        sample_cap: most values kept for the MSE search.
        tail_cap: most extreme values kept on each side for the percentile.
        seed: seed of the sampling keys.

    Example:
        >>> observer = IfmrObserver(num_bits=8)
        >>> for batch in torch.linspace(-1.0, 2.0, 301).chunk(3):
        ...     observer.update(batch)
        >>> observer.count
        301
        >>> observer.compute()
        (tensor(2.), tensor(-2.0157))
    """

    def __init__(self, num_bits: int, sample_cap: int = 2**20, tail_cap: int = 2048, seed: int = 0) -> None:
        validate_num_bits(num_bits)
        if sample_cap < 1 or tail_cap < 1:
            raise ValueError(f"sample_cap and tail_cap must be >= 1, got {sample_cap} and {tail_cap}")
        self.num_bits = num_bits
        self.sample_cap = sample_cap
        self.tail_cap = tail_cap
        self.seed = seed
        self.count = 0
        self.largest: Tensor | None = None  # descending
        self.smallest: Tensor | None = None  # ascending
        self.sample: Tensor | None = None
        self.sample_keys: Tensor | None = None
        self._generator: torch.Generator | None = None

    def update(self, values: Tensor) -> None:
        """Add a batch of finite values (any shape and float dtype); no host synchronisation."""
        flat = values.detach().reshape(-1).float()
        for chunk in flat.split(_UPDATE_CHUNK):
            generator = self._keys_generator(chunk.device)
            keys = torch.rand(chunk.numel(), generator=generator, dtype=torch.float64, device=chunk.device)
            self.absorb(chunk.numel(), chunk, chunk, chunk, keys)

    def merge(self, other: IfmrObserver) -> None:
        """Add everything ``other`` collected (its values come after this observer's)."""
        if other.count:
            self.absorb(other.count, other.largest, other.smallest, other.sample, other.sample_keys)

    def compute(self) -> tuple[Tensor, Tensor]:
        """IFMR ``(clip_max, clip_min)`` of the collected values, float32 scalars.

        Raises:
            ValueError: nothing was collected.
            RuntimeError: more values than ``tail_cap`` supports for an exact percentile.
        """
        if self.count == 0:
            raise ValueError("IfmrObserver.compute() needs at least one value; call update() first")
        k = percentile_rank(self.count)
        if k > self.tail_cap:
            raise RuntimeError(
                f"{self.count} values need the {k} most extreme ones for the IFMR percentile, but the "
                f"observer keeps {self.tail_cap}: create it with tail_cap >= {k} or calibrate on fewer batches"
            )
        max_value = self.largest[k - 1].clamp(min=0.0)
        min_value = self.smallest[k - 1].clamp(max=0.0)
        return ifmr_search(self.sample, max_value, min_value, self.num_bits)

    def absorb(self, count: int, largest: Tensor, smallest: Tensor, sample: Tensor, keys: Tensor) -> None:
        """Add another collector's content, e.g. received from another process.

        Args:
            count: how many values it saw.
            largest: its most extreme large values (any order).
            smallest: its most extreme small values (any order).
            sample: its sampled values, in its order.
            keys: the sampling keys of ``sample`` (float64).
        """
        self.count += count
        if self.sample is None:
            self.largest = largest.new_empty(0)
            self.smallest = smallest.new_empty(0)
            self.sample = sample.new_empty(0)
            self.sample_keys = keys.new_empty(0)
        self.largest = _extremes(torch.cat([self.largest, largest]), self.tail_cap, largest=True)
        self.smallest = _extremes(torch.cat([self.smallest, smallest]), self.tail_cap, largest=False)
        sample = torch.cat([self.sample, sample])
        keys = torch.cat([self.sample_keys, keys])
        if sample.numel() > self.sample_cap:
            kept = torch.topk(keys, self.sample_cap, largest=False).indices
            sample, keys = sample[kept], keys[kept]
        self.sample, self.sample_keys = sample, keys

    def state(self) -> dict[str, object]:
        """What it collected so far, and where its sampling keys' generator stands: plain data and
        tensors (``torch.load(weights_only=True)`` reads it), for a checkpoint saved mid-calibration."""
        generator = None if self._generator is None else self._generator.get_state()
        settings = {"num_bits": self.num_bits, "sample_cap": self.sample_cap, "tail_cap": self.tail_cap}
        collected = {"largest": self.largest, "smallest": self.smallest, "sample": self.sample}
        return {**settings, "seed": self.seed, "count": self.count, **collected, "sample_keys": self.sample_keys,
                "generator": generator}  # fmt: skip

    @classmethod
    def from_state(cls, state: dict[str, object], device: torch.device) -> IfmrObserver:
        """The observer :meth:`state` describes, its tensors on ``device``: it goes on as that one would have.

        Example:
            >>> observer = IfmrObserver(8, sample_cap=4)
            >>> observer.update(torch.arange(6.0))
            >>> again = IfmrObserver.from_state(observer.state(), torch.device("cpu"))
            >>> for o in (observer, again):
            ...     o.update(torch.arange(6.0, 12.0))
            >>> torch.equal(again.sample, observer.sample), again.compute() == observer.compute()
            (True, True)
        """
        observer = cls(state["num_bits"], state["sample_cap"], state["tail_cap"], state["seed"])
        observer.count = state["count"]
        for name in ("largest", "smallest", "sample", "sample_keys"):
            value = state[name]
            setattr(observer, name, None if value is None else value.to(device))
        if state["generator"] is not None:
            observer._generator = torch.Generator(device=device)
            observer._generator.set_state(state["generator"])
        return observer

    def _keys_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator


def _extremes(values: Tensor, k: int, largest: bool) -> Tensor:
    """The ``k`` largest (descending) or smallest (ascending) of ``values``."""
    return torch.topk(values, min(k, values.numel()), largest=largest).values
