"""The activation quantizer: ULQ with learnable clips, initialised by IFMR on the first batches.

State (all in the ``state_dict``, so it checkpoints and resumes with the model):

* ``clip_max``, ``clip_min``: Parameters of shape ``(1,)``, trained by the task loss through
  :func:`~lightning_amct.quant.functional.ulq_fake_quant`'s gradients;
* ``calibrated_batches``: how many training batches initialised the clips (``batch_num`` from the
  start when ``init_clip`` is given). Once it reaches ``batch_num`` calibration never runs again,
  also after a resume. It counts calls: for a layer that the model runs several times a forward
  (shared across depth), :func:`~lightning_amct.compress_model` sets ``batch_num`` to the config's
  times the calls;
* ``valid_clip_max``, ``valid_clip_min``: the last valid clips, for the validity restore.

Every forward, before quantizing: with ``fixed_min`` the lower clip is set to 0; then the validity
restore (``docs/algorithms.md``, ULQ step 2): if ``clip_max <= clip_min`` both clips go back to the
last valid values, else a negative ``clip_max`` or a positive ``clip_min`` does. Both run in place
under ``no_grad`` and without host synchronisation.

Calibration (training mode only, while ``calibrated_batches < batch_num``): each forward counts one
batch; before the last one the clips follow the batch range (``max(batch max, 0)``,
``min(batch min, 0)``); at the ``batch_num``-th, IFMR over all the collected batches sets them
(:class:`~lightning_amct.quant.functional.IfmrObserver`: bounded memory). Under
``torch.distributed`` the statistics of all ranks are reduced, so every rank gets the same clips.
Calibration synchronises with the host (to check the values are finite); training after it does
not. Until a first calibration batch has run (and without ``init_clip``) the clips mean nothing and
the quantizer passes its input through unchanged.
"""

from __future__ import annotations

import functools
import math
import weakref
import zlib

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_amct.quant.functional import cpu_kernels
from lightning_amct.quant.functional.ifmr import IfmrObserver
from lightning_amct.quant.functional.precision import validate_num_bits
from lightning_amct.quant.functional.ulq import ulq_fake_quant, ulq_grid, ulq_scale_offset
from lightning_amct.quant.recompute import recomputing


class ActivationQuantizer(nn.Module):
    """ULQ fake quantization of a layer's input, per tensor and asymmetric.

    One instance may serve several layers that read the same tensor (shared input): called again
    with the very same tensor object, unchanged, while the clips are unchanged too, it returns the
    cached output without recomputing it and without counting another calibration batch. Called
    with that output itself (a layer reading a tensor an output quantizer already quantized with
    this quantizer), it returns it as it is: the values lie on the grid already. Input and output
    are held through weak references, so the cache keeps no memory alive.

    Args:
        num_bits: activation bits (4 or 8 in the config).
        fixed_min: the input is non-negative (e.g. after a ReLU): ``clip_min`` is pinned to 0.
        init_clip: ``(clip_max, clip_min)`` to start from, which skips IFMR calibration; None to
            calibrate on the first ``batch_num`` training batches.
        batch_num: training batches used for calibration.
        force_fp16: round the scale to float16 precision
            (``fakequant_precision_mode: FORCE_FP16_QUANT``).

    Attributes:
        layer_name: the layer this quantizer serves, for error messages; set by the caller.
        checkpointed: under ``torch.compile``, compute the output again in the backward from the
            input instead of keeping it (see :meth:`_traced_forward`); set by the caller.

    Raises:
        ValueError: bad ``num_bits``, ``batch_num`` < 1, or an ``init_clip`` that is not finite
            with ``clip_max > clip_min``, ``clip_max >= 0`` and ``clip_min <= 0``.

    Example:
        >>> quantizer = ActivationQuantizer(num_bits=8, fixed_min=True, init_clip=(1.0, 0.0))
        >>> quantizer(torch.tensor([0.5, 2.0]))
        tensor([0.4980, 1.0000], grad_fn=<_UlqFakeQuantBackward>)
        >>> quantizer.scale_offset()
        (tensor([0.0039]), tensor([-128.]))
    """

    def __init__(
        self,
        num_bits: int,
        fixed_min: bool,
        init_clip: tuple[float, float] | None = None,
        batch_num: int = 1,
        force_fp16: bool = False,
    ) -> None:
        super().__init__()
        validate_num_bits(num_bits)
        if isinstance(batch_num, bool) or not isinstance(batch_num, int) or batch_num < 1:
            raise ValueError(f"batch_num must be an int >= 1, got {batch_num!r}")
        if init_clip is not None:
            _validate_init_clip(init_clip)
        self.num_bits = num_bits
        self.fixed_min = fixed_min
        self.batch_num = batch_num
        self.force_fp16 = force_fp16
        self.layer_name = "<unnamed>"
        self.checkpointed = True
        start_max, start_min = (float(init_clip[0]), float(init_clip[1])) if init_clip is not None else (0.0, 0.0)
        if fixed_min:
            start_min = 0.0
        self.clip_max = nn.Parameter(torch.tensor([start_max]))
        # With fixed_min the lower clip is never learned: no gradient, so no optimizer moves it.
        self.clip_min = nn.Parameter(torch.tensor([start_min]), requires_grad=not fixed_min)
        done = batch_num if init_clip is not None else 0
        self.register_buffer("calibrated_batches", torch.tensor(done, dtype=torch.int64))
        self.register_buffer("valid_clip_max", torch.tensor([start_max]))
        self.register_buffer("valid_clip_min", torch.tensor([start_min]))
        self._batches_seen: int | None = done  # host copy of calibrated_batches; None: read it
        self._observer: IfmrObserver | None = None
        self._cache: _OutputCache | None = None
        self._calibrating = False  # the last training forward (not a checkpoint's second run) calibrated
        self.register_load_state_dict_post_hook(_forget_host_state)

    @property
    def calibrated(self) -> bool:
        """Whether calibration is over (``calibrated_batches >= batch_num``)."""
        return self._seen() >= self.batch_num

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x``; in training, calibrate first while calibration is not over.

        In training the output keeps its integer codes, which the compressed layers save for
        their backward instead of the output itself
        (:mod:`~lightning_amct.quant.functional.saved_codes`). Activation checkpointing's second
        run of a forward (:mod:`~lightning_amct.quant.recompute`) calibrates nothing: it
        quantizes with the clips the first run left, on the path the first run took.

        Raises:
            ValueError: during calibration, ``x`` is empty or has non-finite values (the message
                names ``layer_name``).
        """
        if torch.compiler.is_compiling():
            return self._traced_forward(x)
        stamp = self._stamp(x)
        cache = self._cache
        repeat = cache is not None and cache.matches(x, stamp)
        if repeat:
            cached = cache.output()
            if cached is not None:
                return cached
        elif cache is not None and cache.is_output(x, stamp):
            return x
        first_run = self.training and not recomputing()  # not a checkpoint's second run
        if first_run:
            self._calibrating = not self.calibrated  # the path that second run must take again
        if first_run and not repeat and not self.calibrated:
            self._calibrate(x)
        elif self._seen() == 0:
            return x
        self._settle_clips()
        parameters = self._parameters  # direct: nn.Module's attribute lookup costs more on this path
        clip_max, clip_min = parameters["clip_max"], parameters["clip_min"]
        keep_codes = self.training and torch.is_grad_enabled()  # codes serve a backward only
        y = ulq_fake_quant(x, clip_max, clip_min, self.num_bits, self.force_fp16, keep_codes=keep_codes)
        self._cache = _OutputCache(x, y, self._stamp(x), self._stamp(y)) if stamp is not None else None
        return y

    def can_quantize_in_layer(self, x: Tensor) -> bool:
        """Whether a layer may apply this quantizer to ``x`` inside its own autograd node.

        Such a layer (:mod:`~lightning_amct.quant.functional.ulq_layer`) runs this quantizer's
        forward and backward itself, on :meth:`settled_host_grid`, without calling the module.
        That needs training with gradients recorded, calibration over, fused CPU kernels for ``x``
        and the clips, no ``torch.compile``, no autocast (it would cast the layer's operation
        inside the node, whose backward then meets gradients of another dtype), and no hook on
        this module, which the module's call would run (FSDP2's record of Parameter writes is one).
        """
        if not (self.training and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        if self._forward_hooks or self._forward_pre_hooks or self._seen() < self.batch_num:
            return False
        if self._calibrating and recomputing():  # the first run took the module's path
            return False
        parameters = self._parameters
        return cpu_kernels.applies_elementwise(x, parameters["clip_max"], parameters["clip_min"])

    def calibration_statistics(self) -> dict[str, object] | None:
        """What calibration has collected so far
        (:meth:`~lightning_amct.quant.functional.ifmr.IfmrObserver.state`), for a checkpoint saved
        while it runs; None outside calibration."""
        return None if self._observer is None else self._observer.state()

    def resume_calibration(self, statistics: dict[str, object]) -> None:
        """Go on calibrating from :meth:`calibration_statistics` (after the state dict's load, which
        drops a calibration in progress)."""
        self._observer = IfmrObserver.from_state(statistics, self.clip_max.device)

    def settled_host_grid(self) -> tuple[float, ...]:
        """The clips settled as :meth:`forward` settles them, and their grid as Python floats
        (:func:`~lightning_amct.quant.functional.ulq.ulq_grid` on the host), for a layer that
        :meth:`can_quantize_in_layer`."""
        self.__dict__["_calibrating"] = False  # direct: nn.Module's __setattr__ costs more on this path
        grid = self._settle_clips()
        if grid is not None and not self.force_fp16:
            return grid
        parameters = self._parameters
        return ulq_grid(parameters["clip_max"], parameters["clip_min"], self.num_bits, self.force_fp16, on_host=True)

    def _traced_forward(self, x: Tensor) -> Tensor:
        """:meth:`forward` as ``torch.compile`` traces it: no output cache, clips settled with tensors,
        the quantization checkpointed where :attr:`checkpointed`.

        The cache's weak references and version counters, and reading the clips as Python floats,
        would each break the compiled graph. Calibration runs eagerly (a graph break on the first
        ``batch_num`` training batches; the end of calibration recompiles once).

        Not checkpointed, the compiler keeps the output wherever a layer's weight gradient reads
        it (it never computes again a tensor that a backward must materialise), beside ``x``
        wherever something else keeps that (a residual add's other reader, the quantizer's own
        backward): a feature map more per layer, 1.30x the compiled float step's memory on the
        ResNet-style benchmark model. Checkpointed (``torch.utils.checkpoint``), the backward
        computes the output again from ``x``, in a few element-wise operations fused into it:
        0.78x with every quantizer checkpointed. Where the layer alone reads ``x``, after a ReLU
        (:mod:`~lightning_amct.modules.input_relu`), the caller turns it off: after a
        Conv-BN-ReLU the compiler then keeps the output and computes ``x`` again, and
        checkpointing measured worse there (the small CNN's compiled step at 1.09x time and 1.20x
        memory of compiled float, against 1.07x and 1.06x).
        """
        if self.training and not self.calibrated:
            self._calibrate(x)
        elif self._seen() == 0:
            return x
        clip_max, clip_min = self._settled_clips()
        with torch.no_grad():
            for target, value in ((self.clip_max, clip_max), (self.clip_min, clip_min)):
                target.copy_(value)
            self.valid_clip_max.copy_(clip_max)
            self.valid_clip_min.copy_(clip_min)
        quantize = functools.partial(ulq_fake_quant, num_bits=self.num_bits, force_fp16=self.force_fp16)
        if not self.checkpointed:
            return quantize(x, self.clip_max, self.clip_min)
        # the checkpoint keeps its inputs for the second run: copies of the clips, which a shared
        # quantizer's next call in this forward does not rewrite (the clips are rewritten in place)
        clips = self.clip_max.clone(), self.clip_min.clone()
        return checkpoint(quantize, x, *clips, use_reentrant=False, preserve_rng_state=False)

    @torch.no_grad()
    def scale_offset(self) -> tuple[Tensor, Tensor]:
        """``(scale, offset)`` that the next forward uses (after ``fixed_min`` and validity), for export.

        Returns:
            float32 tensors of shape ``(1,)``; the offset holds an integer.

        Raises:
            RuntimeError: the clips were never set (no ``init_clip`` and no calibration batch).
        """
        if self._seen() == 0:
            raise RuntimeError(
                f"activation quantizer of {self.layer_name} was never calibrated: run at least one "
                "training batch or give init_clip"
            )
        clip_max, clip_min = self._settled_clips()
        return ulq_scale_offset(clip_max, clip_min, self.num_bits, self.force_fp16)

    def extra_repr(self) -> str:
        return (
            f"num_bits={self.num_bits}, fixed_min={self.fixed_min}, batch_num={self.batch_num}, "
            f"force_fp16={self.force_fp16}"
        )

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_cache"] = None  # weak references do not pickle, and a copy has other tensors
        return state

    def _seen(self) -> int:
        if self._batches_seen is None:
            self._batches_seen = int(self.calibrated_batches)
        return self._batches_seen

    def _stamp(self, x: Tensor) -> tuple | None:
        """What must not change for a cached output to stay valid (None: do not cache)."""
        if x.is_inference():  # inference tensors have no version counter
            return None
        parameters = self._parameters
        clip_versions = parameters["clip_max"]._version, parameters["clip_min"]._version
        return (x._version, *clip_versions, self.training, torch.is_grad_enabled())

    @torch.compiler.disable
    @torch.no_grad()
    def _calibrate(self, x: Tensor) -> None:
        values = x.detach()
        if values.numel() == 0:
            raise ValueError(f"activation quantizer of {self.layer_name}: cannot calibrate on an empty tensor")
        batch_min, batch_max = torch.aminmax(values)
        stats = torch.stack([(~torch.isfinite(values)).any().float(), batch_max.float(), -batch_min.float()])
        distributed = _is_distributed()
        if distributed:  # with this quantizer's tag: every rank must reduce the same quantizer's
            tag = float(zlib.crc32(self.layer_name.encode()) % _TAGS)
            stats = torch.cat([stats, stats.new_tensor([tag, -tag])])
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
            if stats[3] != -stats[4]:
                raise RuntimeError(
                    f"activation quantizer of {self.layer_name}: the ranks calibrated different layers at once, "
                    "so their statistics cannot be gathered: under DDP every rank must run the same quantized "
                    "layers in each calibration batch; give a layer that only some ranks run (a data-routed "
                    "expert) its clips in the config (clip_max_min), which skips its calibration"
                )
        if stats[0] > 0:
            raise ValueError(
                f"activation quantizer of {self.layer_name}: non-finite input values (inf or nan) during "
                f"calibration batch {self._seen() + 1} of {self.batch_num}"
            )
        if self._observer is None:
            self._observer = IfmrObserver(self.num_bits, seed=dist.get_rank() if distributed else 0)
        self._observer.update(values)
        self._batches_seen = self._seen() + 1
        self.calibrated_batches.fill_(self._batches_seen)
        if self._batches_seen < self.batch_num:
            clip_max, clip_min = stats[1].clamp(min=0.0), (-stats[2]).clamp(max=0.0)
        else:
            observer = _gather_observer(self._observer) if distributed else self._observer
            clip_max, clip_min = observer.compute()
            self._observer = None
        self.clip_max.copy_(clip_max.reshape(self.clip_max.shape))
        self.clip_min.copy_(clip_min.reshape(self.clip_min.shape))

    @torch.no_grad()
    def _settled_clips(self) -> tuple[Tensor, Tensor]:
        """The clips after ``fixed_min`` and the validity restore, computed without writing them."""
        clip_max, clip_min = self.clip_max.detach(), self.clip_min.detach()
        if self.fixed_min:
            clip_min = torch.zeros_like(clip_min)
        crossed = clip_max <= clip_min
        # When not crossed, a negative max implies min < max < 0 and a positive min implies
        # max > min > 0, so these two masks are the doc's if/elif chain.
        clip_max_out = torch.where(crossed | (clip_max < 0), self.valid_clip_max, clip_max)
        clip_min_out = torch.where(crossed | (clip_min > 0), self.valid_clip_min, clip_min)
        return clip_max_out, clip_min_out

    def _settle_clips(self) -> tuple[float, ...] | None:
        """Apply ``fixed_min`` and the validity restore to the clips, then record them as the valid ones.

        On the CPU, where the clips need no change (the common case), one kernel call
        (:func:`~lightning_amct.quant.functional.cpu_kernels.ulq_settled_grid_at`) checks them,
        records them and returns their grid (without ``force_fp16``): reading a CPU tensor costs
        no synchronisation, and it spares the dozen one-element tensor operations of
        :meth:`_settled_clips`, which cost more than the quantization of a small activation.
        Elsewhere, or where a clip changes, those run (they never wait for a device), and this
        returns None.
        """
        parameters, buffers = self._parameters, self._buffers
        clip_max, clip_min = parameters["clip_max"], parameters["clip_min"]
        valid_max, valid_min = buffers["valid_clip_max"], buffers["valid_clip_min"]
        if cpu_kernels.applies(clip_max, clip_min, valid_max, valid_min):
            addresses = clip_max.data_ptr(), clip_min.data_ptr(), valid_max.data_ptr(), valid_min.data_ptr()
            settled = cpu_kernels.ulq_settled_grid_at(*addresses, self.fixed_min, self.num_bits)
            if settled[0]:
                return settled[1:]
        with torch.no_grad():
            clip_max, clip_min = self._settled_clips()
            self.clip_max.copy_(clip_max)
            self.clip_min.copy_(clip_min)
            self.valid_clip_max.copy_(clip_max)
            self.valid_clip_min.copy_(clip_min)
        return None


class _OutputCache:
    """The last input and output of a quantizer, by weak reference, with the input's stamp."""

    def __init__(self, x: Tensor, y: Tensor, stamp: tuple, output_stamp: tuple) -> None:
        self._input = weakref.ref(x)
        self._output = weakref.ref(y)
        self._stamp = stamp
        self._output_stamp = output_stamp

    def matches(self, x: Tensor, stamp: tuple | None) -> bool:
        return self._input() is x and stamp == self._stamp

    def is_output(self, x: Tensor, stamp: tuple | None) -> bool:
        return self._output() is x and stamp == self._output_stamp

    def output(self) -> Tensor | None:
        return self._output()


def _forget_host_state(module: ActivationQuantizer, incompatible_keys: object) -> None:
    """After ``load_state_dict``: re-read the counter, drop the cache and any partial calibration."""
    module._batches_seen = None
    module._observer = None
    module._cache = None


def _validate_init_clip(init_clip: tuple[float, float]) -> None:
    clip_max, clip_min = (float(v) for v in init_clip)
    finite = math.isfinite(clip_max) and math.isfinite(clip_min)
    if not finite or clip_max <= clip_min or clip_max < 0 or clip_min > 0:
        raise ValueError(
            f"init_clip must be finite (clip_max, clip_min) with clip_max > clip_min, clip_max >= 0 "
            f"and clip_min <= 0, got {tuple(init_clip)}"
        )


#: Distinct quantizer tags in a calibration collective: integers that float32 holds exactly.
_TAGS = 1 << 24


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_observer(observer: IfmrObserver) -> IfmrObserver:
    """Every rank's collected values as one observer, identical on all ranks (rank order)."""
    world = dist.get_world_size()
    parts = (observer.largest, observer.smallest, observer.sample, observer.sample_keys)
    device = observer.sample.device
    sizes = torch.tensor([observer.count, *(p.numel() for p in parts)], dtype=torch.int64, device=device)
    all_sizes = [torch.empty_like(sizes) for _ in range(world)]
    dist.all_gather(all_sizes, sizes)
    rank_sizes = torch.stack(all_sizes).tolist()
    widths = [max(row[i + 1] for row in rank_sizes) for i in range(len(parts))]
    # float64 carries the float32 values and the float64 keys exactly, in one collective.
    payload = torch.cat([nn.functional.pad(p.double(), (0, w - p.numel())) for p, w in zip(parts, widths)])
    gathered = [torch.empty_like(payload) for _ in range(world)]
    dist.all_gather(gathered, payload)
    merged = IfmrObserver(observer.num_bits, observer.sample_cap, observer.tail_cap, observer.seed)
    for (count, *lengths), data in zip(rank_sizes, gathered):
        largest, smallest, sample, keys = (chunk[:n] for chunk, n in zip(data.split(widths), lengths))
        merged.absorb(count, largest.float(), smallest.float(), sample.float(), keys)
    return merged
