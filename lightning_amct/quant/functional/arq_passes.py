"""ARQ's fused CPU pass by tensor address: on the calling thread, or channel runs on torch's threads.

A large per-channel weight is quantized by torch's team (:mod:`.omp_team`), each thread taking a
contiguous run of channels: the run of the weight that the optimizer's step, split the same way,
last wrote from that thread's core. Channels are independent, so the result is the calling
thread's bit for bit. One scale for the whole tensor runs on the calling thread.

Example:
    >>> import torch
    >>> w, out = torch.tensor([[0.5, -1.0], [0.25, 0.1]]), torch.empty(2, 2)
    >>> quantize(w.data_ptr(), out.data_ptr(), 1, 2, 2, 4)
    >>> out
    tensor([[ 0.5000, -1.0000],
            [ 0.2500,  0.1071]])
"""

from __future__ import annotations

import numba
import numpy as np

from lightning_amct.quant.functional import cpu_kernels, omp_team
from lightning_amct.quant.functional.cpu_kernels import compiled, pointer


def quantize(w: int, out: int, outer: int, channels: int, inner: int, num_bits: int, mask: int = 0) -> None:
    """:func:`~lightning_amct.quant.functional.cpu_kernels.arq_quantize` of float32
    ``(outer, channels, inner)`` weights at ``w`` into ``out``, every channel; of ``w`` times the
    mask of that shape at ``mask`` where not 0."""
    threads = min(omp_team.team_threads(outer * channels * inner), channels)
    if threads == 1:
        cpu_kernels.arq_quantize_at(w, out, outer, channels, inner, num_bits, 0, channels, mask)
    else:
        _TEAM_PASS.run(np.array([w, out, outer, channels, inner, num_bits, mask], dtype=np.int64), threads)


@compiled()
def _channel_run(block: int) -> None:
    """This thread's run of channels of the pass the block describes: ``w, out, outer, channels, inner, bits, mask``."""
    w, out, outer, channels, inner, num_bits, mask = numba.carray(pointer(block, np.int64), 7)
    first, last = omp_team.member_run(channels)
    cpu_kernels.arq_quantize_at(w, out, outer, channels, inner, num_bits, first, last, mask)


def _team_body(block: int) -> None:
    """:func:`_channel_run` as the body of the team's parallel region (compiled as a C callback)."""
    _channel_run(block)


_TEAM_PASS = omp_team.TeamPass(_team_body)
