"""Compressed layers: a torch layer plus an activation quantizer, a weight quantizer and a 4:2 mask.

Each class subclasses the layer it replaces (``CompressedConv2d`` is an ``nn.Conv2d``), so code
that checks ``isinstance(m, nn.Conv2d)`` keeps working, and it holds the **same** weight and bias
Parameter objects as the original (an optimizer built before the swap still updates them). The
state-dict keys of the weights do not change; the quantizers add their own entries
(``conv.act_quant.clip_max``, ...). A subclass of a torch layer (a library's depthwise
``Conv2d``) is wrapped by the class of its torch base, keeping its attributes; the plan swaps one
only where its forward computes what the base does (see :mod:`lightning_amct.plan.layers`).
``to_float()`` gives back a layer of the original class. A layer whose weight a parametrization
computes (``weight_norm``) keeps its parametrization modules and their Parameters, and the
compressed layer quantizes the weight they compute (see ``_parametrized``).

GPT-2's ``Conv1D`` is not a torch class (and ``transformers`` is not imported here):
:class:`CompressedConv1D` is a plain module holding the same attributes and Parameters, with the
output channels on weight axis 1 and the input channels on axis 0, as a transposed conv.

Forward: ``y = op(Qa(x), Qw(W ⊙ mask), b)``: prune first, then quantize, as the reference does.
Where an output quantizer upstream already quantizes the input with the layer's own activation
quantizer (``input_on_grid``; see :mod:`~lightning_amct.plan.outputs`), the input arrives on the
grid, through a max-pool or a flatten, say, and the layer does not quantize it again: the tensor
is calibrated and trained once. (A dropout in between scales it in training, as dropout does.)
A 4:2 mask is re-chosen from the dense weights on the scheduled training batches (the first one
when ``update_freq`` is 0, else every ``update_freq``-th): with the callback, the batches the Trainer
starts (:meth:`CompressedLayer.start_mask_batch`); without one, a training forward counts a batch
where the layer's weights changed since the last one counted (an optimizer step in between). A
second call of the layer in one batch (a shared layer) does not count, nor do eval forwards or
activation checkpointing's second run of a forward (:mod:`~lightning_amct.quant.recompute`).

Three things keep the training step close to the float step in time and memory:

* a layer that alone reads its input runs ``Qa`` and its own operation as one autograd node in
  training on the CPU (:mod:`~lightning_amct.quant.functional.ulq_layer`): it keeps ``x``, not
  ``Qa(x)``, and writes ``Qa(x)`` again in its backward, in the quantizer's backward pass; the
  node applies an ARQ weight quantizer and the 4:2 mask too
  (:mod:`~lightning_amct.quant.functional.node_weight`);
* elsewhere the op saves the integer codes of ``Qa(x)`` for its backward, not ``Qa(x)`` itself
  (:mod:`~lightning_amct.quant.functional.saved_codes`);
* a convolution over a few input channels whose input needs no gradient (the first layer on
  images or raw audio) computes its input quantizer's clip gradients from a weight-gradient pass
  instead of a backward-data pass (:mod:`~lightning_amct.quant.functional.clip_adjoint`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from lightning_amct.quant import ArqWeightQuantizer
    >>> conv = nn.Conv2d(3, 8, 3)
    >>> q = CompressedConv2d.from_float(conv, weight_quant=ArqWeightQuantizer(8, channel_axis=0))
    >>> q.weight is conv.weight, isinstance(q, nn.Conv2d), type(q.to_float()).__name__
    (True, True, 'Conv2d')
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from lightning_amct.modules.layer_ops import Affine, Convolution, LayerOp
from lightning_amct.plan.layers import CONV1D, is_conv1d
from lightning_amct.prune.selective import n_out_of_m_mask
from lightning_amct.quant.activation import ActivationQuantizer
from lightning_amct.quant.functional import cpu_kernels
from lightning_amct.quant.functional.arq import ArqSettings
from lightning_amct.quant.functional.clip_adjoint import conv_with_clip_gradients
from lightning_amct.quant.functional.pool_passes import MaxPoolInput
from lightning_amct.quant.functional.saved_codes import saving_codes
from lightning_amct.quant.functional.ulq_layer import BatchNormInput, ulq_layer
from lightning_amct.quant.recompute import recomputing
from lightning_amct.quant.weight import ArqWeightQuantizer

_ADDED_SUBMODULES = ("act_quant", "weight_quant")
_ADDED_BUFFERS = ("weight_mask", "mask_batches")
# What a copy's state holds for the mask schedule's recorded versions where the original's Parameters
# did not change since its last counted batch (CompressedLayer.__getstate__).
_UNCHANGED_SINCE_COUNTED = "unchanged since the last counted batch"
#: Set for the next forward where the ReLU before the layer left itself to the layer (``defer_relu``).
RELU_DEFERRED = "_relu_deferred"
#: ``(input, BatchNormInput)`` for the next forward where the BatchNorm before that ReLU left itself to the layer.
NORM_DEFERRED = "_norm_deferred"
#: ``(address, size, BatchNormInput)`` of the last BatchNorm the layer applied, for activation
#: checkpointing's second run of the layer alone (:meth:`CompressedLayer._deferred_input`).
_NORM_APPLIED = "_norm_applied"
#: ``(input, MaxPoolInput)`` for the next forward where the max-pool before the layer left itself to the layer.
POOL_DEFERRED = "_pool_deferred"
#: ``(address, size, MaxPoolInput)`` of the last max-pool the layer applied (as ``_NORM_APPLIED``).
_POOL_APPLIED = "_pool_applied"
#: The input for which a module before the layer asked, in this forward, whether the layer quantizes in
#: its node, where it does (:meth:`CompressedLayer._applies_in_node`): the forward need not ask again.
IN_NODE = "_in_node"


class CompressedLayer:
    """Mixin holding the compression state; subclasses say how the layer applies a weight."""

    #: axis of the weight's output channels (per-channel scales) and of its input channels (4:2).
    out_axis: int = 0
    in_axis: int = 1
    float_class: type[nn.Module]

    act_quant: nn.Module | None
    #: the input was quantized upstream by ``act_quant`` already (set by ``apply_plan``).
    input_on_grid: bool = False
    #: ``act_quant`` serves other layers too, which read the same input (set by ``apply_plan``).
    input_shared: bool = False
    weight_quant: nn.Module | None
    weight_mask: torch.Tensor | None
    mask_update_freq: int | None

    @classmethod
    def from_float(
        cls,
        layer: nn.Module,
        act_quant: nn.Module | None = None,
        weight_quant: nn.Module | None = None,
        mask_update_freq: int | None = None,
    ) -> CompressedLayer:
        """Wrap ``layer`` (sharing its Parameters); ``mask_update_freq`` enables 4:2 masking."""
        if not cls.wraps(layer) or isinstance(layer, CompressedLayer):
            raise TypeError(f"{cls.__name__}.from_float expects {cls.base_name()}, got {type(layer).__name__}")
        target = _parametrized(cls, type(layer)) if parametrize.is_parametrized(layer) else cls
        new = instance_like(layer, target)
        new._original_class = type(layer)
        new.act_quant = act_quant
        new.weight_quant = weight_quant
        new.mask_update_freq = mask_update_freq
        if mask_update_freq is None:
            new.weight_mask = None
            new.mask_batches = None
        else:
            new.register_buffer("weight_mask", torch.ones_like(layer.weight, requires_grad=False))
            new.register_buffer("mask_batches", torch.zeros((), dtype=torch.long))
            new._mask_batches_seen = None
            new._mask_parameter_versions = None
            new._mask_batch_pending = None
            new._mask_hook_id = new.register_load_state_dict_post_hook(cls._forget_mask_mirror).id
        return new

    @classmethod
    def wraps(cls, layer: nn.Module) -> bool:
        """Whether this class compresses ``layer``."""
        return isinstance(layer, cls.float_class)

    @classmethod
    def base_name(cls) -> str:
        """The name of the layer class this class compresses (``"Conv2d"``), as the artifacts record it."""
        return cls.float_class.__name__

    def to_float(self) -> nn.Module:
        """A layer of the original class with the same Parameter objects (masks and quantizers dropped)."""
        original = self.__dict__.get("_original_class") or self.float_class
        plain = instance_like(self, original)
        plain.__dict__.pop("_original_class", None)
        for name in _ADDED_SUBMODULES:
            plain._modules.pop(name, None)
        for name in _ADDED_BUFFERS:
            plain._buffers.pop(name, None)
        plain.__dict__.pop("mask_update_freq", None)
        deferred = (RELU_DEFERRED, NORM_DEFERRED, _NORM_APPLIED, POOL_DEFERRED, _POOL_APPLIED, IN_NODE)
        for name in ("input_on_grid", "input_shared", "layer_op", *deferred):
            plain.__dict__.pop(name, None)
        plain.__dict__.pop("_mask_batches_seen", None)
        plain.__dict__.pop("_mask_parameter_versions", None)
        plain.__dict__.pop("_mask_batch_pending", None)
        plain._load_state_dict_post_hooks.pop(plain.__dict__.pop("_mask_hook_id", None), None)
        return plain

    @torch.no_grad()
    def refresh_mask(self) -> None:
        """Re-choose the 4:2 mask from the current dense weights (2 largest |w| of every 4 inputs)."""
        self.weight_mask.copy_(n_out_of_m_mask(self.weight, self.in_axis))

    def start_mask_batch(self) -> None:
        """Say that a training batch begins: the next training forward counts it, a second call of
        the layer in that batch does not (a Trainer's callback says so at every batch)."""
        self._mask_batch_pending = True

    def _advance_mask_schedule(self) -> None:
        # One count a training batch, and never a new mask between two calls of one forward (the
        # first call saved the mask for its backward). The batches are those a Trainer starts
        # (start_mask_batch); without one, a training forward counts a batch where the layer's own
        # Parameters (weight, bias, a parametrization's; not the quantizers', which calibration
        # writes in the forward) changed since the last one counted: an optimizer step.
        # This runs for every layer at every training forward: the module's dicts are read and
        # written directly (nn.Module's attribute access costs a microsecond or more a call).
        state = self.__dict__
        pending = state["_mask_batch_pending"]
        if pending is None:
            versions = self._parameter_versions()
            if versions == state["_mask_parameter_versions"]:
                return
            state["_mask_parameter_versions"] = versions
        elif pending:
            state["_mask_batch_pending"] = False
        else:
            return
        # The counter lives in a buffer (so it checkpoints); a host-side mirror of it avoids a
        # device sync on every batch. It is re-read once after creation or a state-dict load.
        counter = self._buffers["mask_batches"]
        batch = state["_mask_batches_seen"]
        if batch is None:
            batch = int(counter)
        if batch == 0 or (self.mask_update_freq > 0 and batch % self.mask_update_freq == 0):
            self.refresh_mask()
        state["_mask_batches_seen"] = batch + 1
        counter.add_(1)

    def _parameter_versions(self) -> tuple[int, ...]:
        """The version counters of the layer's own Parameters (weight, bias, a parametrization's)."""
        parameters = [*self._parameters.values()]
        parametrizations = self._modules.get("parametrizations")  # torch.nn.utils.parametrize's
        if parametrizations is not None:
            parameters += parametrizations.parameters()
        return tuple(parameter._version for parameter in parameters if parameter is not None)

    def __getstate__(self) -> dict[str, Any]:
        # A copy (copy.deepcopy, pickle) gets new Parameters, whose version counters start again:
        # the versions recorded for the mask schedule would read as an optimizer step there, and the
        # copy would count a batch that the original does not, or, by chance, miss one it does. The
        # copy is told instead whether the Parameters changed since the last count: where they did,
        # it counts the next batch (no record, as after a state-dict load), else it records its own.
        state = super().__getstate__()
        recorded = state.get("_mask_parameter_versions")
        if recorded is not None:
            unchanged = recorded == self._parameter_versions()
            state["_mask_parameter_versions"] = _UNCHANGED_SINCE_COUNTED if unchanged else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if state.get("_mask_parameter_versions") == _UNCHANGED_SINCE_COUNTED:
            self.__dict__["_mask_parameter_versions"] = self._parameter_versions()

    @staticmethod
    def _forget_mask_mirror(module: nn.Module, incompatible_keys: Any) -> None:
        module._mask_batches_seen = None
        module._mask_parameter_versions = None

    def compressed_weight(self) -> torch.Tensor:
        """``Qw(W ⊙ mask)``: the weight the forward uses."""
        weight = self._masked_weight()
        if self.weight_quant is not None:
            weight = self.weight_quant(weight)
        return weight

    def _masked_weight(self) -> torch.Tensor:
        """``W ⊙ mask`` (``W`` without a mask), the mask chosen again on schedule in training."""
        mask = self._scheduled_mask()
        return self.weight if mask is None else self.weight * mask

    def _scheduled_mask(self) -> torch.Tensor | None:
        """The 4:2 mask (None without one), chosen again first where the schedule says so in training."""
        mask = self._buffers.get("weight_mask")  # direct: nn.Module's attribute lookup costs more on this path
        if mask is not None and self.training and not recomputing():  # a checkpoint's second run is no new batch
            self._advance_mask_schedule()
        return mask

    def _node_weight(self) -> tuple[torch.Tensor, torch.Tensor | None, ArqSettings | None]:
        """For the nodes that run the layer with its input quantizer: ``(W, mask, arq)``, the
        weight, the 4:2 mask and the ARQ settings that the node applies itself
        (:mod:`~lightning_amct.quant.functional.node_weight`), where the weight quantizer is ARQ
        without hooks, or none; else ``(compressed weight, None, None)``."""
        weight_quant = self._modules.get("weight_quant")
        arq = None
        if isinstance(weight_quant, ArqWeightQuantizer) and not (
            weight_quant._forward_hooks or weight_quant._forward_pre_hooks
        ):
            arq = (weight_quant.num_bits, weight_quant.channel_axis)
        elif weight_quant is not None:
            return self.compressed_weight(), None, None
        return self.weight, self._scheduled_mask(), arq

    def forward(self, x: torch.Tensor, *args: Any) -> torch.Tensor:
        # The modules' registries are read directly on this path: nn.Module's attribute lookup costs
        # more, and this runs for every layer at every step.
        state = self.__dict__
        relu = state.pop(RELU_DEFERRED, False)
        norm = self._deferred_input(x, NORM_DEFERRED, _NORM_APPLIED)
        pool = self._deferred_input(x, POOL_DEFERRED, _POOL_APPLIED)
        relu = relu or norm is not None
        act_quant = self._modules.get("act_quant")
        in_node = state.pop(IN_NODE, None) is x and self.training and torch.is_grad_enabled()
        grid = act_quant.settled_host_grid() if in_node or self._quantizes_in_node(x) else None
        if grid is not None and (in_node or not self._clip_gradients_by_adjoint(x)):
            weight, mask, arq = self._node_weight()
            clips = act_quant._parameters
            node_args = (self.layer_op, x, weight, self.bias, clips["clip_max"], clips["clip_min"], grid)
            return _eagerly(ulq_layer, *node_args, act_quant.num_bits, relu, arq, mask, norm, pool)
        if pool is not None:
            x = pool.apply(x)
        if norm is not None:
            x = norm.apply(x)
        if relu:
            x = torch.relu(x)
        if grid is not None:
            return _eagerly(self._conv_with_clip_gradients, x, None, *self._node_weight(), grid)
        weight = self.compressed_weight()
        if act_quant is None:
            return self.apply_weight(x, weight, *args)
        if self.input_on_grid:  # quantized by a shared output quantizer, with its codes
            return self._apply_saving_codes(x, weight, *args)
        quantized = act_quant(x)
        if quantized.requires_grad and self._clip_gradients_by_adjoint(x):
            return self._conv_with_clip_gradients(x, quantized.detach(), weight, None, None, None)
        return self._apply_saving_codes(quantized, weight, *args)

    def defer_relu(self, x: torch.Tensor, replay: bool = False) -> bool:
        """Whether this layer applies the ReLU before it to ``x`` itself, in this forward (asked by an
        :class:`~lightning_amct.modules.input_relu.InputReLU` whose output only this layer reads).

        Yes where the layer quantizes in its own node with ``fixed_min`` (not as a first layer):
        the node's passes apply ReLU at no cost; always where ``replay`` (activation
        checkpointing's second run of a forward whose first run deferred). The layer's next
        forward then takes ReLU's input.
        """
        deferred = replay or self._applies_relu_in_node(x)
        if deferred:
            self.__dict__[RELU_DEFERRED] = True
        return deferred

    def normalizes(self, x: torch.Tensor) -> bool:
        """Whether ``x`` is the input of a BatchNorm that left itself to this layer in this forward
        (:meth:`defer_norm`): the ReLU between them then leaves itself to the layer too."""
        pending = self.__dict__.get(NORM_DEFERRED)
        if pending is None or pending[0] is not x:
            return False
        self.__dict__[RELU_DEFERRED] = True
        return True

    def defer_norm(self, norm: BatchNormInput, x: torch.Tensor, replay: bool = False) -> bool:
        """Whether this layer applies the BatchNorm before its input ReLU to ``x``, in this
        forward (asked by an :class:`~lightning_amct.modules.input_norm.InputBatchNorm`, whose
        ReLU will leave itself to the layer too): where it would apply that ReLU, or always where
        ``replay`` (activation checkpointing's second run of a forward whose first run deferred).
        The layer's next forward then takes the BatchNorm's input."""
        deferred = replay or self._applies_relu_in_node(x)
        self.__dict__[NORM_DEFERRED] = (x, norm) if deferred else None
        return deferred

    def defer_pool(self, pool: MaxPoolInput, x: torch.Tensor, replay: bool = False) -> bool:
        """Whether this layer applies the 2-D max-pool before it to ``x`` itself, in this forward
        (asked by an :class:`~lightning_amct.modules.input_pool.InputMaxPool2d` whose output only
        this layer reads): where the layer quantizes in its own node, or always where ``replay``
        (activation checkpointing's second run of a forward whose first run deferred). The layer's
        next forward then takes the pool's input."""
        deferred = replay or self._applies_in_node(x)
        self.__dict__[POOL_DEFERRED] = (x, pool) if deferred else None
        return deferred

    def _applies_relu_in_node(self, x: torch.Tensor) -> bool:
        """Whether the layer would apply the ReLU before it in its node: where it would apply an
        operation before it (:meth:`_applies_in_node`) and its quantizer's grid starts at 0."""
        return self._applies_in_node(x) and self.act_quant.fixed_min

    def _applies_in_node(self, x: torch.Tensor) -> bool:
        """Whether the layer would apply an operation before it in its node; not with a forward hook
        on the layer (before or after it), which must see that operation's output as the layer's input.
        Where it would, the layer's forward on ``x`` in this step takes its node without asking again."""
        hooked = self._forward_pre_hooks or self._forward_hooks
        applies = not hooked and self._quantizes_in_node(x) and not self._clip_gradients_by_adjoint(x)
        if applies:
            self.__dict__[IN_NODE] = x
        return applies

    def _deferred_input(self, x: torch.Tensor, pending_key: str, applied_key: str) -> Any:
        """The BatchNorm (:meth:`defer_norm`) or max-pool (:meth:`defer_pool`) that this forward
        applies, as the record under ``pending_key`` holds it: where ``x`` is the tensor that
        module handed on, or a reshape of it. A record left by a forward that never reached this
        layer (an exception between) holds another tensor, alive, so another address: ignored.

        Activation checkpointing may run the layer a second time without that module (the
        reentrant style, a region that starts at the layer): where that second run reads the
        tensor the first one took, it applies the module again (``applied_key`` keeps it), a
        BatchNorm's running statistics left alone."""
        pending = self.__dict__.pop(pending_key, None)
        if pending is not None and _same_values(x, pending[0]):
            deferred = pending[1]
            self.__dict__[applied_key] = (x.data_ptr(), x.numel(), deferred.replayed())
            return deferred
        applied = self.__dict__.get(applied_key)
        if applied is not None and recomputing() and applied[:2] == (x.data_ptr(), x.numel()):
            return applied[2]
        return None

    @functools.cached_property
    def layer_op(self) -> LayerOp | None:
        """The layer's operation in parts (:mod:`~lightning_amct.modules.layer_ops`), or None where it has none."""
        return None

    def _quantizes_in_node(self, x: torch.Tensor) -> bool:
        """Whether the layer quantizes ``x`` inside its own autograd node.

        One node for the quantizer and the layer (:mod:`~lightning_amct.quant.functional.ulq_layer`,
        or :mod:`~lightning_amct.quant.functional.clip_adjoint` for a first layer) costs less than
        the quantizer's node and the layer's, where the layer has a :attr:`layer_op` and alone reads
        its input (a quantizer shared by several layers quantizes once for all of them), and where
        the quantizer allows it (:meth:`~lightning_amct.quant.ActivationQuantizer.can_quantize_in_layer`).
        """
        act_quant = self._modules.get("act_quant")
        return (
            self.layer_op is not None
            and not (self.input_shared or self.input_on_grid)
            and isinstance(act_quant, ActivationQuantizer)
            and act_quant.can_quantize_in_layer(x)
        )

    def _apply_saving_codes(self, x: torch.Tensor, weight: torch.Tensor, *args: Any) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: the compiler decides what the backward keeps
            return self.apply_weight(x, weight, *args)
        return _with_saved_codes(self.apply_weight, x, weight, *args)

    def _clip_gradients_by_adjoint(self, x: torch.Tensor) -> bool:
        """Whether the layer runs as :func:`~lightning_amct.quant.functional.clip_adjoint.conv_with_clip_gradients`
        (its input quantizer's clip gradients without ``dL/dy``): not under autocast, which that
        node's convolution would not follow."""
        return (
            self._weight_gradient_is_cheaper()
            and not x.requires_grad
            and not torch.is_autocast_enabled(x.device.type)
            and isinstance(self._modules.get("act_quant"), ActivationQuantizer)
            and (x.is_cpu if torch.compiler.is_compiling() else cpu_kernels.applies(x))
        )

    def _conv_with_clip_gradients(
        self,
        x: torch.Tensor,
        quantized: torch.Tensor | None,
        weight: torch.Tensor,
        mask: torch.Tensor | None,
        arq: ArqSettings | None,
        grid: tuple[float, ...] | None,
    ) -> torch.Tensor:
        act_quant = self.act_quant
        return conv_with_clip_gradients(
            x,
            quantized,
            weight,
            self.bias,
            act_quant.clip_max,
            act_quant.clip_min,
            act_quant.num_bits,
            act_quant.force_fp16,
            (self.stride, self.padding, self.dilation),
            grid,
            arq,
            mask,
        )

    def _weight_gradient_is_cheaper(self) -> bool:
        """Whether weight-gradient passes cost less than the layer's backward-data pass (layers that have them)."""
        return False

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor, *args: Any) -> torch.Tensor:
        raise NotImplementedError


def _same_values(x: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether ``x`` is ``source`` or a reshape of it: the same memory, the same size."""
    return x.data_ptr() == source.data_ptr() and x.numel() == source.numel()


@torch.compiler.disable
def _eagerly(node: Any, *args: Any) -> torch.Tensor:
    """``node(*args)``, a layer node on the fused CPU kernels, which pass the tensors' addresses,
    run eagerly even where a compiled model runs eager code after a graph break (calibration's):
    the compiler would compile the node as a frame of its own, fold the addresses of the tensors
    it traced into it, and the kernels would then write through stale pointers."""
    return node(*args)


@torch.compiler.disable
def _with_saved_codes(apply: Any, *args: Any) -> torch.Tensor:
    """``apply(*args)`` saving the codes of its quantized input
    (:func:`~lightning_amct.quant.functional.saved_codes.saving_codes`), eagerly even where a
    compiled model runs eager code (after a graph break, such as calibration's): the compiler
    would compile ``apply`` as a frame of its own, and cannot trace the hooks that save the codes."""
    with saving_codes():
        return apply(*args)


class CompressedLinear(CompressedLayer, nn.Linear):
    float_class = nn.Linear

    @functools.cached_property
    def layer_op(self) -> LayerOp:
        return Affine(transposed=False)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.layer_op.forward(x, weight, self.bias)


class _CompressedConv(CompressedLayer):
    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, self.bias)

    @functools.cached_property
    def layer_op(self) -> LayerOp | None:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        return Convolution(self.stride, self.padding, self.dilation, self.groups)

    def _weight_gradient_is_cheaper(self) -> bool:
        # Measured on the CPU (oneDNN), batch 64: backward-data over 1 input channel 5x the
        # weight-gradient pass over 2 (28x28 and 8x8), over 3 (32x32) 1.5x that over 6; from 16
        # input channels on the backward-data pass costs less.
        return self.in_channels <= 4 and self.groups == 1 and self.padding_mode == "zeros" and not isinstance(
            self.padding, str
        )


class CompressedConv1d(_CompressedConv, nn.Conv1d):
    float_class = nn.Conv1d


class CompressedConv2d(_CompressedConv, nn.Conv2d):
    float_class = nn.Conv2d


class CompressedConv3d(_CompressedConv, nn.Conv3d):
    float_class = nn.Conv3d


class _CompressedConvTranspose(CompressedLayer):
    # ConvTranspose weights are (Cin, Cout/groups, *kernel).
    out_axis = 1
    in_axis = 0
    spatial_dims: int

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        """The layer's forward, ``output_size`` given by position or by name as torch's layer takes it."""
        return super().forward(x, output_size)

    def apply_weight(
        self, x: torch.Tensor, weight: torch.Tensor, output_size: list[int] | None = None
    ) -> torch.Tensor:
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, self.spatial_dims, self.dilation
        )
        op = F.conv_transpose1d if self.spatial_dims == 1 else F.conv_transpose2d
        return op(x, weight, self.bias, self.stride, self.padding, output_padding, self.groups, self.dilation)


class CompressedConvTranspose1d(_CompressedConvTranspose, nn.ConvTranspose1d):
    float_class = nn.ConvTranspose1d
    spatial_dims = 1


class CompressedConvTranspose2d(_CompressedConvTranspose, nn.ConvTranspose2d):
    float_class = nn.ConvTranspose2d
    spatial_dims = 2


class CompressedConv1D(CompressedLayer, nn.Module):
    """GPT-2's ``Conv1D`` compressed: ``addmm(b, Qa(x).view(-1, nx), Qw(W ⊙ mask))`` viewed back to ``(..., nf)``.

    The weight is ``(nx, nf)``: output channels (per-channel scales) on axis 1, input channels
    (4:2 runs) on axis 0. It is not an instance of the ``Conv1D`` class it replaces (that class
    is not imported); ``to_float()`` gives back an instance of it.
    """

    out_axis = 1
    in_axis = 0

    @classmethod
    def wraps(cls, layer: nn.Module) -> bool:
        return is_conv1d(layer)

    @classmethod
    def base_name(cls) -> str:
        return CONV1D

    @functools.cached_property
    def layer_op(self) -> LayerOp:
        return Affine(transposed=True)

    def apply_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.layer_op.forward(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


def instance_like(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new ``cls`` instance with ``module``'s attributes: the same Parameter, buffer and submodule
    objects, in registries of its own (adding or removing one leaves ``module`` as it is)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: v.copy() if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()})
    return new


#: What every class has of its own, which ``type`` makes for the class it creates.
_CLASS_OWN = ("__module__", "__qualname__", "__doc__", "__dict__", "__weakref__")


@functools.cache
def _parametrized(cls: type[CompressedLayer], parametrized: type[nn.Module]) -> type[CompressedLayer]:
    """``cls`` with what ``parametrized`` (the class that ``torch.nn.utils.parametrize`` made for a
    layer) adds to the layer's class: the properties that compute its parametrized tensors, and
    its deep copy (such a layer refuses pickling).

    A layer whose weight ``weight_norm`` computes (wav2vec2's positional convolution, EnCodec's
    and HiFi-GAN's convolutions) is an instance of a class of its own, ``Parametrized<Layer>``,
    whose ``weight`` property calls ``layer.parametrizations.weight``: the compressed layer keeps
    those modules (they are in its ``__dict__``) and needs the same properties, so that it
    quantizes the weight they compute and the gradient reaches their tensors.
    """
    own = {name: value for name, value in vars(parametrized).items() if name not in _CLASS_OWN}
    return type(f"Parametrized{cls.__name__}", (cls,), own)


def compressed_class(layer: nn.Module) -> type[CompressedLayer]:
    """The compressed class for ``layer``: that of the nearest torch layer class it derives from,
    or :class:`CompressedConv1D` for a layer laid out as GPT-2's ``Conv1D``.

    Raises:
        TypeError: ``layer`` derives from no supported torch layer class.
    """
    if CompressedConv1D.wraps(layer):
        return CompressedConv1D
    for cls in type(layer).__mro__:
        if cls in COMPRESSED_CLASSES:
            return COMPRESSED_CLASSES[cls]
    supported = ", ".join((*(c.__name__ for c in COMPRESSED_CLASSES), CONV1D))
    raise TypeError(f"no compressed layer for {type(layer).__name__} (supported: {supported} and subclasses)")


#: The compressed class for each plain layer class.
COMPRESSED_CLASSES: dict[type[nn.Module], type[CompressedLayer]] = {
    cls.float_class: cls
    for cls in (
        CompressedLinear,
        CompressedConv1d,
        CompressedConv2d,
        CompressedConv3d,
        CompressedConvTranspose1d,
        CompressedConvTranspose2d,
    )
}
