"""Compression under FSDP2 (``fully_shard``), where every rank holds only a part of each parameter.

Lightning's ``ModelParallelStrategy`` calls the LightningModule's ``configure_model`` after the
callbacks' ``setup``: the callback has pruned the model and swapped its layers in by then, and
``fully_shard`` shards the clips and learned scales like any other parameter. Two things then
need help:

* **Writes in a forward.** A quantizer sets its own Parameters while it runs (IFMR calibration
  sets the clips, a learned weight scale initialises itself, the validity restore moves a clip
  back), under ``no_grad``. Inside a forward FSDP2 hands the module whole, all-gathered copies of
  its parameters and drops them afterwards: a value written there never reaches the shards.
  :class:`ForwardWrites` watches the quantizers' Parameters (their version counters, around each
  quantizer's forward), keeps what was written, and :meth:`ForwardWrites.apply` copies it into
  each rank's shard before the optimizer step, so that the step updates the written value, as
  it does without sharding.
* **The artifacts** come from the whole model, which no rank holds: :func:`meta_copy` keeps the
  compressed structure without its tensors before the model is sharded (on the ``meta`` device,
  no memory), and :func:`gathered_model` fills it on rank zero with the full state dict at the
  end (every rank takes part).

Example:
    >>> from lightning_amct.quant import ActivationQuantizer
    >>> quantizer = ActivationQuantizer(8, fixed_min=False, batch_num=1)
    >>> writes = ForwardWrites(quantizer)
    >>> _ = quantizer.train()(torch.tensor([-1.0, 3.0]))  # calibrates: writes the clips
    >>> sorted(name for _, name in writes.pending)
    ['clip_max', 'clip_min']
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_amct.quant import ActivationQuantizer, UlqWeightQuantizer

_WRITING_MODULES = (ActivationQuantizer, UlqWeightQuantizer)


def is_sharded(model: nn.Module) -> bool:
    """Whether a parameter of ``model`` is a DTensor (``fully_shard`` or another DTensor plan)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


class ForwardWrites:
    """The values quantizers of ``model`` write into their own Parameters during forwards.

    Hooks on every quantizer record, after its forward, each of its Parameters whose version
    counter moved (an in-place write), as a copy. :meth:`apply` writes them into the sharded
    Parameters; :meth:`remove` takes the hooks off.
    """

    def __init__(self, model: nn.Module) -> None:
        self.pending: dict[tuple[nn.Module, str], Tensor] = {}
        self._versions: dict[nn.Module, dict[str, int]] = {}
        self._handles = []
        for module in model.modules():
            if isinstance(module, _WRITING_MODULES):
                self._handles.append(module.register_forward_pre_hook(self._before))
                # prepend: before a hook that reshards a module sharded on its own, not after it
                self._handles.append(module.register_forward_hook(self._after, prepend=True))

    def _before(self, module: nn.Module, args: tuple) -> None:
        self._versions[module] = {name: p._version for name, p in module.named_parameters(recurse=False)}

    def _after(self, module: nn.Module, args: tuple, output: object) -> None:
        before = self._versions.pop(module, {})
        for name, param in module.named_parameters(recurse=False):
            if param._version != before.get(name, param._version):
                self.pending[module, name] = param.detach().clone()

    @torch.no_grad()
    def apply(self) -> None:
        """Copy the recorded values into this rank's part of each (sharded) Parameter."""
        for (module, name), value in self.pending.items():
            param = getattr(module, name)
            if isinstance(param, DTensor):
                # Every rank holds the whole value (the forward saw all-gathered copies):
                # src_data_rank=None takes this rank's part of it, without communication.
                part = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
                param.to_local().copy_(part.to_local())
            else:
                param.copy_(value)
        self.pending.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers live on the ``meta`` device (no memory).

    The copy keeps the structure, the attributes and the hooks; :func:`gathered_model` fills it.
    A LightningModule's device mesh is not copied (the copy runs on one process).
    """
    memo: dict[int, object] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for buffer in model.buffers():
        memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    mesh = model.__dict__.get("_device_mesh")
    if mesh is not None:
        memo[id(mesh)] = None
    return copy.deepcopy(model, memo)


def gathered_model(sharded: nn.Module, skeleton: nn.Module) -> nn.Module | None:
    """``skeleton`` (a :func:`meta_copy` of the model before sharding) holding ``sharded``'s full
    state, on the CPU of rank zero; None on the other ranks. Every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(sharded, options=options)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    skeleton.to_empty(device="cpu")
    skeleton.load_state_dict(state)
    return skeleton
