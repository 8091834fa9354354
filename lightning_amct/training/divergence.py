"""Stopping a diverged run before anything is written from it: a finiteness check every step.

One NaN in one input batch makes the weights NaN at that step's optimizer update, and the
activation clips need not follow: once every activation is NaN, ULQ's clip gradients are sums
over no element (a NaN input lies neither above nor below the clip range), so the clips stay
finite forever. The check therefore covers every trainable parameter, weights, clips and learned
scales alike, after every training step, whatever ``log_every_n_steps`` is. It costs one read
of the parameters (the largest absolute value of each, in one fused kernel on an accelerator),
and one value read on the host:

* on the CPU at once: the value is in host memory already;
* on an accelerator one step later, so that the host never waits for the device inside a step:
  the flag of step ``n`` is read after step ``n + 1`` has been queued, when the device has
  usually computed it already. A divergence is then reported at most one step late, and the
  checks before a checkpoint or an export read the pending flag first.

Under sharding (FSDP2) each rank holds a part of every parameter: the ranks add their flags in
one all-reduce, so that all of them stop together. Under DDP the parameters are the same on
every rank after each step, and so are the flags: no communication.

Only when the check fails is anything looked at parameter by parameter, to name the first
non-finite one in model order.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> guard = DivergenceGuard()
    >>> guard.after_step(model, step=1)
    >>> with torch.no_grad():
    ...     model[0].weight[0, 0] = float("nan")
    >>> guard.after_step(model, step=2)
    Traceback (most recent call last):
    ...
    FloatingPointError: training diverged at step 2: the weight of layer '0' is not finite (nan or inf); ...
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import get_total_norm

from lightning_amct.training.collectives import collective_device, several_ranks

_NAMED_PARTS = ((".act_quant", ""), (".weight_quant", "weight "), (".output_quant", "output "))
_NONE = 2**62  # no index: larger than any rank's


class DivergenceGuard:
    """Raises ``FloatingPointError`` naming the layer and the step once a trainable parameter is not finite.

    The first call finds where ``model``'s parameters are registered (module and attribute);
    later calls read them from there, which costs far less than walking the module tree every
    step, and still sees a parameter a strategy swapped for another object (FSDP2 registers
    sharded and whole versions in turn).
    """

    def __init__(self) -> None:
        self._pending: tuple[int, Tensor] | None = None  # accelerators: the flag of the last step, unread
        self._model: nn.Module | None = None
        self._slots: list[tuple[str, nn.Module, str]] = []

    def after_step(self, model: nn.Module, step: int) -> None:
        """Check the trainable parameters after training step ``step`` (every rank calls this)."""
        named = self._trainable(model)
        flag = _nonfinite_flag([local for _, local in _local(named)], _is_sharded(named))
        if flag is None:
            return
        if flag.device.type == "cpu":
            self._raise_if_set(flag, step, named)
            return
        pending, self._pending = self._pending, (step, flag)
        if pending is not None:
            self._raise_if_set(pending[1], pending[0], named)

    def flush(self, model: nn.Module) -> None:
        """Read the flag still pending (accelerators): call before writing anything from ``model``."""
        if self._pending is not None:
            (step, flag), self._pending = self._pending, None
            self._raise_if_set(flag, step, self._trainable(model))

    def _trainable(self, model: nn.Module) -> list[tuple[str, Tensor]]:
        if model is not self._model:
            self._model = model
            self._slots = [
                (f"{prefix}.{name}" if prefix else name, module, name)
                for prefix, module in model.named_modules()
                for name, param in module._parameters.items()
                if param is not None
            ]
        found = ((label, module._parameters.get(name)) for label, module, name in self._slots)
        return [(label, param) for label, param in found if param is not None and param.requires_grad]

    @staticmethod
    def _raise_if_set(flag: Tensor, step: int, named: list[tuple[str, Tensor]]) -> None:
        if flag.item():
            name = _first_nonfinite(named, _is_sharded(named))
            raise FloatingPointError(
                f"training diverged at step {step}: {describe(name)} is not finite (nan or inf); "
                "no checkpoint or artifact is written from it"
            )


#: Buffers that a finite model keeps finite: a norm's running statistics (a NaN batch puts NaN
#: there in its forward, before any weight changes). Other buffers may hold ``-inf`` on purpose
#: (an attention mask).
_STATISTICS = (".running_mean", ".running_var")


def written_state(module: nn.Module, state: Mapping[str, object] | None = None) -> dict[str, object]:
    """What :func:`check_finite` checks before ``module`` is written: its parameters and its norms'
    running statistics, from ``state`` (a state dict about to be written) or the module itself."""
    names = {name for name, _ in module.named_parameters()}
    source = dict(module.state_dict(keep_vars=True)) if state is None else state
    return {name: value for name, value in source.items() if name in names or name.endswith(_STATISTICS)}


def check_finite(tensors: Mapping[str, object], what: str, step: int | None, distributed: bool = False) -> None:
    """Raise ``FloatingPointError`` if a floating-point tensor of ``tensors`` is not finite.

    Args:
        tensors: what is about to be written (:func:`written_state`); values that are not
            floating-point tensors are ignored, a sharded tensor is checked in the part this
            rank holds.
        what: what is about to be written, for the message (``"the checkpoint"``).
        step: the training step, for the message; None outside training.
        distributed: every rank calls this with its part: the ranks agree (one all-reduce),
            so that all of them raise together.
    """
    named = [(name, t) for name, t in tensors.items() if isinstance(t, Tensor) and t.is_floating_point()]
    agree = distributed and several_ranks()
    flag = _nonfinite_flag([local for _, local in _local(named)], agree)
    if flag is not None and flag.item():
        name = _first_nonfinite(named, agree)
        when = "" if step is None else f" at step {step}: training diverged"
        raise FloatingPointError(f"not writing {what}: {describe(name)} is not finite (nan or inf){when}")


def describe(name: str | None) -> str:
    """``"the clip_max of layer 'net.fc'"`` for the parameter or buffer named ``net.fc.act_quant.clip_max``.

    Example:
        >>> describe("net.block.bn2.output_quant.clip_max"), describe("net.fc.weight_quant.scale")
        ("the output clip_max of layer 'net.block.bn2'", "the weight scale of layer 'net.fc'")
    """
    if name is None:
        return "a value held by another rank"
    layer, _, what = name.rpartition(".")
    for part, label in _NAMED_PARTS:
        if layer.endswith(part):
            layer, what = layer[: -len(part)], f"{label}{what}"
    return f"the {what} of layer '{layer}'"


def _local(named: Iterable[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """Each tensor as the part this rank holds (a sharded DTensor's local shard), without a copy."""
    return [(name, t.to_local() if isinstance(t, DTensor) else t) for name, t in named]


def _is_sharded(named: list[tuple[str, Tensor]]) -> bool:
    return any(isinstance(t, DTensor) for _, t in named) and dist.is_initialized()


def _nonfinite_flag(tensors: list[Tensor], agree: bool) -> Tensor | None:
    """1.0 if any value of ``tensors`` is not finite, else 0.0 (summed over ranks when ``agree``),
    on the tensors' device, or None when there is nothing to check on any rank."""
    tensors = [t.detach() for t in tensors if t.numel()]
    if not tensors and not agree:
        return None
    if tensors:
        flag = torch.isfinite(_largest_magnitude(tensors)).logical_not().float()
    else:  # this rank holds no part of any parameter, the others do: it still takes part
        flag = torch.zeros((), device=collective_device())
    if agree:
        dist.all_reduce(flag)  # a sum: NaN does not survive a MAX reduction on every backend
    return flag


def _largest_magnitude(tensors: list[Tensor]) -> Tensor:
    """``max |x|`` over all values (NaN if any is NaN), as a 0-d tensor on the tensors' device.

    On an accelerator one fused kernel per dtype (``torch._foreach_norm``); on the CPU that
    kernel runs tensor by tensor, slower than ``abs().amax()`` per tensor, which it uses instead.
    """
    if tensors[0].device.type == "cpu":
        return torch.stack([t.abs().amax() for t in tensors]).amax()
    return get_total_norm(tensors, float("inf"), foreach=True)


def _first_nonfinite(named: list[tuple[str, Tensor]], agree: bool) -> str | None:
    """The name of the first tensor (in ``named``'s order) with a value that is not finite.

    With ``agree`` the ranks take the smallest index any of them found (one all-reduce).
    """
    index = next((i for i, (_, t) in enumerate(_local(named)) if not torch.isfinite(t.detach()).all()), _NONE)
    if agree:
        found = torch.tensor(index, device=collective_device())
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        index = int(found)
    return named[index][0] if index < len(named) else None
