"""Applying a plan to a model: prune first, then swap in compressed layers.

``compress_model`` is the library entry point for use without Lightning; the callback calls
:func:`apply_plan` in ``setup``. Both leave a :class:`CompressionState` on the model (read it with
:func:`compression_state`): the plan, the kept channel indices of channel pruning and the config
text, in the plain form a checkpoint stores.

Example:
    >>> import torch
    >>> from lightning_amct.demo import DemoNet
    >>> model = compress_model(DemoNet(), "retrain_data_quant_config { ulq_quantize {} }", torch.zeros(1, 1, 8, 8))
    >>> type(model.fc).__name__, compression_state(model).plan["fc"].quant.act_bits
    ('CompressedLinear', 8)
"""

from __future__ import annotations

import collections
import difflib
import itertools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_amct.bulk import collection_paused
from lightning_amct.config import config_source_text
from lightning_amct.graph import model_inputs
from lightning_amct.modules.compressed_layers import CompressedLayer, compressed_class
from lightning_amct.modules.gate_quant import attach_gate_quantizer
from lightning_amct.modules.input_norm import defer_norms
from lightning_amct.modules.input_pool import defer_pools
from lightning_amct.modules.input_relu import defer_relus
from lightning_amct.modules.output_quant import attach_output_quantizer
from lightning_amct.modules.replace import replace_module
from lightning_amct.plan import CompressionPlan, LayerPlan, resolve_plan
from lightning_amct.plan.gates import gate_function
from lightning_amct.prune import apply_kept_channels, prune_model
from lightning_amct.quant import ActivationQuantizer, ArqWeightQuantizer, GateQuantizer, UlqWeightQuantizer

_STATE_ATTR = "_lightning_amct_state"
RECORD_FORMAT = 1


@dataclass
class CompressionState:
    """What was done to a model: enough to rebuild its structure and to export it.

    Attributes:
        plan: the resolved plan.
        kept_channels: channel-pruning groups (by key) → kept output-channel indices.
        config_text: the source config, as protobuf text.
        prune_report: per-layer before/after figures of channel pruning (plain data).
        kept_rows: layer -> its kept output channels, numbered as before pruning (the AMCT
            record's lists; see :meth:`~lightning_amct.prune.PruneResult.kept_rows`).
    """

    plan: CompressionPlan
    kept_channels: dict[str, list[int]] = field(default_factory=dict)
    config_text: str = ""
    prune_report: Any = None
    kept_rows: dict[str, list[int]] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """Plain data for a checkpoint (``torch.load(weights_only=True)`` reads it)."""
        return {
            "format": RECORD_FORMAT,
            "plan": self.plan.to_dict(),
            "kept_channels": {k: [int(i) for i in v] for k, v in self.kept_channels.items()},
            "config_text": self.config_text,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> CompressionState:
        if record.get("format") != RECORD_FORMAT:
            raise ValueError(f"unknown lightning-amct record format {record.get('format')!r} (expected {RECORD_FORMAT})")
        return cls(
            plan=CompressionPlan.from_dict(record["plan"]),
            kept_channels={k: list(v) for k, v in record["kept_channels"].items()},
            config_text=record["config_text"],
        )


def compression_state(model: nn.Module) -> CompressionState | None:
    """The state :func:`apply_plan` left on ``model``, or None for a model not compressed."""
    return model.__dict__.get(_STATE_ATTR)


def compress_model(
    model: nn.Module, config: object, example_inputs: object = None, *, quantize_outputs: bool = False
) -> nn.Module:
    """Compress ``model`` in place as ``config`` says, and return it.

    For use without Lightning: afterwards train the model as usual (activation clips initialise
    themselves on the first ``batch_num`` training forwards; 4:2 masks refresh on schedule).

    Args:
        model: a float model.
        config: a ``.cfg`` path, config text, mapping or message.
        example_inputs: inputs to capture the model's graph with (see
            :func:`~lightning_amct.plan.resolve_plan`); required for channel pruning. Default: the
            model's ``example_input_array``.
        quantize_outputs: also quantize layer outputs that do not go into quantized layers, for a
            deploy model that ONNX Runtime runs in integers throughout (see
            :func:`~lightning_amct.plan.resolve_plan`).
    """
    plan = resolve_plan(model, config, example_inputs, quantize_outputs=quantize_outputs)
    _warn_of_layers_left_as_they_are(plan)
    apply_plan(model, plan, example_inputs, config_text=config_source_text(config))
    return model


def _warn_of_layers_left_as_they_are(plan: CompressionPlan) -> None:
    """Warn where the config asks to compress layers that cannot be swapped (a Lightning run
    prints the whole plan; a call of :func:`compress_model` would otherwise say nothing)."""
    declined = {name: why for name, lp in plan.items() for feature, why in lp.declined if feature == "compressed"}
    if not declined:
        return
    name, why = next(iter(declined.items()))
    others = f" and {len(declined) - 1} more" if len(declined) > 1 else ""
    warnings.warn(
        f"{len(declined)} of {len(plan)} layers stay as they are although the config compresses them: "
        f"'{name}' ({why}){others}; print(resolve_plan(model, config, example_inputs)) shows each reason",
        stacklevel=3,
    )


@collection_paused()
def apply_plan(
    model: nn.Module,
    plan: CompressionPlan,
    example_inputs: object = None,
    kept_channels: Mapping[str, list[int]] | None = None,
    config_text: str = "",
) -> CompressionState:
    """Prune (choosing channels, or rebuilding ``kept_channels`` exactly), then swap layers in."""
    if compression_state(model) is not None:
        raise RuntimeError(f"{type(model).__name__} is already compressed")
    modules = dict(model.named_modules())
    for name, layer_plan in plan.items():
        _check_layer(name, layer_plan, modules)
    state = CompressionState(plan, config_text=config_text)
    filter_specs = {name: lp.prune for name, lp in plan.pruned("filter").items()}
    example_inputs = model_inputs(model, example_inputs)
    if filter_specs:
        if not example_inputs:
            raise ValueError(
                "channel pruning needs example inputs to trace shapes: set the LightningModule's "
                "example_input_array or pass example_inputs"
            )
        if kept_channels is None:
            result = prune_model(model, filter_specs, example_inputs)
        else:
            result = apply_kept_channels(model, dict(kept_channels), example_inputs)
        state.kept_channels = {k: list(v) for k, v in result.kept.items()}
        state.prune_report = result.report
        state.kept_rows = result.kept_rows(model)
    owners = plan.shared_inputs
    quantizers: dict[str, ActivationQuantizer] = {}
    for name, layer_plan in plan.items():
        if layer_plan.quant is None and layer_plan.prune is None or _is_filter_only(layer_plan):
            continue
        layer = model.get_submodule(name)
        act_quant = None
        if layer_plan.quant is not None:
            owner = owners.get(name, name)
            act_quant = quantizers.get(owner)
            if act_quant is None:
                act_quant = quantizers[owner] = _activation_quantizer(name, layer_plan, plan)
        replace_module(model, name, _placed(_compressed(layer, layer_plan, act_quant), layer.weight.device))
    modules = dict(model.named_modules())  # after pruning and the swaps
    model_device = _device_of(model, torch.device("cpu"))
    for site, function in plan.gates.items():  # before output quantizers: a gate runs first
        module = _module(site, modules, "quantizes the gate of")
        if gate_function(module) != function:
            raise ValueError(f"the plan expects '{site}' to be a {function} gate, the model has a {type(module).__name__}")
        attach_gate_quantizer(module, _placed(GateQuantizer(), _device_of(module, model_device)))
    for site, spec in plan.outputs.items():
        if spec.shared_with:
            quantizer = quantizers[owners.get(spec.shared_with, spec.shared_with)]
        else:
            quantizer = ActivationQuantizer(
                spec.bits, spec.fixed_min, batch_num=plan.batch_num, force_fp16=plan.force_fp16_quant
            )
            quantizer.layer_name = f"{site} (output of {spec.after})"
        module = _module(site, modules, "quantizes the output of")
        attach_output_quantizer(module, _placed(quantizer, _device_of(module, model_device)))
    # A site that reuses a layer's quantizer quantizes the tensor those layers read (or the one it
    # is a max-pool or a flatten of) already: the layers take it as it comes.
    upstream = {owners.get(spec.shared_with, spec.shared_with) for spec in plan.outputs.values() if spec.shared_with}
    readers = collections.Counter(owners.get(name, name) for name in plan.quantized)
    for name in plan.quantized:
        owner = owners.get(name, name)
        modules[name].input_on_grid = owner in upstream
        modules[name].input_shared = readers[owner] > 1
    defer_relus(model, plan.input_relus)
    defer_norms(model, {norm: layer for layer, norm in plan.input_norms.items()}, plan.input_relus)
    defer_pools(model, plan.input_pools)
    model.__dict__[_STATE_ATTR] = state
    return state


def _is_filter_only(layer_plan: LayerPlan) -> bool:
    return layer_plan.quant is None and layer_plan.prune is not None and layer_plan.prune.kind == "filter"


def _check_layer(name: str, layer_plan: LayerPlan, modules: dict[str, nn.Module]) -> None:
    if name not in modules:
        close = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"the plan names layer '{name}' but the model has no such layer{hint}")
    actual = type(modules[name]).__name__
    if actual != layer_plan.layer_type:
        raise ValueError(f"the plan expects layer '{name}' to be a {layer_plan.layer_type}, the model has a {actual}")


def _activation_quantizer(name: str, layer_plan: LayerPlan, plan: CompressionPlan) -> ActivationQuantizer:
    spec = layer_plan.quant
    quantizer = ActivationQuantizer(
        num_bits=spec.act_bits,
        fixed_min=spec.fixed_min,
        init_clip=spec.act_clip,
        batch_num=plan.batch_num * spec.calls,  # it counts calls: a shared layer's every call calibrates
        force_fp16=plan.force_fp16_quant,
    )
    quantizer.layer_name = name
    return quantizer


def _compressed(layer: nn.Module, layer_plan: LayerPlan, act_quant: ActivationQuantizer | None) -> CompressedLayer:
    cls = compressed_class(layer)
    weight_quant = None
    spec = layer_plan.quant
    if spec is not None:
        axis = cls.out_axis if spec.channel_wise else None
        if spec.weight_algo == "ulq":
            channels = layer.weight.shape[cls.out_axis] if spec.channel_wise else 1
            weight_quant = UlqWeightQuantizer(spec.weight_bits, axis, channels)
        else:
            weight_quant = ArqWeightQuantizer(spec.weight_bits, axis)
    update_freq = None
    if layer_plan.prune is not None and layer_plan.prune.kind == "n_out_of_m":
        update_freq = layer_plan.prune.update_freq
    return cls.from_float(layer, act_quant, weight_quant, update_freq)


def _placed(new: nn.Module, device: torch.device) -> nn.Module:
    """``new`` (made on the CPU) moved to ``device``: compressing a model already on a GPU."""
    return new if device.type == "cpu" else new.to(device)


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    """Where ``module`` keeps its tensors (``default`` when it has none)."""
    tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
    return default if tensor is None else tensor.device


def _module(name: str, modules: dict[str, nn.Module], what: str) -> nn.Module:
    if name not in modules:
        raise ValueError(f"the plan {what} '{name}' but the model has no such module")
    return modules[name]

