"""The quantization math as pure functions and custom autograd Functions.

One file per algorithm of ``docs/algorithms.md``: :mod:`.ulq` (activations), :mod:`.arq` and
:mod:`.wts_ulq` (weights), :mod:`.ifmr` (clip initialisation), :mod:`.precision` (integer grids,
the smallest scale, float16 scales). Everything is vectorised and free of host synchronisation
in forward and backward, on CPU and CUDA; on the CPU, contiguous float32 tensors take the fused
kernels of :mod:`.cpu_kernels` (one pass per op, bit-identical results), large tensors on torch's
threads (:mod:`.ulq_passes`, :mod:`.arq_passes`, :mod:`.omp_team`). Layers save the integer
codes of their quantized input for backward (:mod:`.saved_codes`). Under ``torch.compile`` the
fake-quant ops are ``torch.library`` custom operators (:mod:`.library`) whose plain tensor
operations the compiler traces and fuses.
"""

from lightning_amct.quant.functional.arq import arq_fake_quant, arq_scale
from lightning_amct.quant.functional.ifmr import IfmrObserver, ifmr_clip
from lightning_amct.quant.functional.precision import SCALE_EPS, int_range, round_scale_fp16
from lightning_amct.quant.functional.ulq import ulq_fake_quant, ulq_scale_offset
from lightning_amct.quant.functional.wts_ulq import wts_ulq_effective_scale, wts_ulq_fake_quant

__all__ = [
    "SCALE_EPS",
    "IfmrObserver",
    "arq_fake_quant",
    "arq_scale",
    "ifmr_clip",
    "int_range",
    "round_scale_fp16",
    "ulq_fake_quant",
    "ulq_scale_offset",
    "wts_ulq_effective_scale",
    "wts_ulq_fake_quant",
]
