"""What differs between two plans in what they do to the model (not in which config entry decided it).

A checkpoint's record holds the plan it was trained with; a callback resuming from it, or
evaluating it, refuses another plan and says how they differ. Two configs written differently
(a setting given by an override instead of globally, comments) that do the same thing agree.

Example:
    >>> from lightning_amct.plan.specs import CompressionPlan, LayerPlan, QuantSpec
    >>> int8 = QuantSpec(8, None, False, "arq", 8, True)
    >>> saved = CompressionPlan({"fc": LayerPlan("fc", "Linear", quant=int8)})
    >>> here = CompressionPlan({"fc": LayerPlan("fc", "Linear", quant=QuantSpec(8, None, False, "arq", 4, True))})
    >>> plan_differences(saved, here)
    ['fc: weight_bits 8 in the checkpoint, 4 here']
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields

from lightning_amct.plan.specs import CompressionPlan, LayerPlan, PruneSpec, QuantSpec

_NOT_COMPRESSED = LayerPlan("", "")


def plan_differences(saved: CompressionPlan, current: CompressionPlan) -> list[str]:
    """One line per difference between ``saved`` (the checkpoint's) and ``current``, in model order.

    Compared: the file-wide settings, each layer's quantization and pruning settings (a layer
    missing from a plan counts as not compressed), the output quantizers and the gates. Where one
    plan quantizes outputs and the other none (the callback's ``quantize_outputs``, not the
    config, differs), that comes first.
    """
    differences = [
        f"{name}: {saved_value} in the checkpoint, {current_value} here"
        for name, saved_value, current_value in (
            ("batch_num", saved.batch_num, current.batch_num),
            ("fakequant_precision_mode FORCE_FP16_QUANT", saved.force_fp16_quant, current.force_fp16_quant),
        )
        if saved_value != current_value
    ]
    names = list(saved) + [name for name in current if name not in saved.layers]
    for name in names:
        before, after = saved.layers.get(name, _NOT_COMPRESSED), current.layers.get(name, _NOT_COMPRESSED)
        differences += [f"{name}: {text}" for text in _layer_differences(before, after)]
    saved_flag, current_flag = (bool(plan.outputs or plan.gates) for plan in (saved, current))
    if saved_flag != current_flag:
        differences.insert(0, f"quantize_outputs={saved_flag} in the checkpoint, {current_flag} here")
    differences += _site_differences("output quantizer of", saved.outputs, current.outputs)
    differences += _site_differences("gate", saved.gates, current.gates)
    return differences


def _site_differences(kind: str, saved: Mapping[str, object], current: Mapping[str, object]) -> list[str]:
    """``"{kind} {site}: ... in the checkpoint, ... here"`` for each site whose entry differs."""
    sites = list(saved) + [site for site in current if site not in saved]
    return [
        f"{kind} {site}: {_shown(saved.get(site))} in the checkpoint, {_shown(current.get(site))} here"
        for site in sites
        if saved.get(site) != current.get(site)
    ]


def _layer_differences(saved: LayerPlan, current: LayerPlan) -> list[str]:
    if saved.layer_type and current.layer_type and saved.layer_type != current.layer_type:
        return [f"a {saved.layer_type} in the checkpoint, a {current.layer_type} here"]
    found = []
    for feature, before, after in (("quantization", saved.quant, current.quant), ("pruning", saved.prune, current.prune)):
        if (before is None) != (after is None):
            found.append(f"{feature} {'on' if before else 'off'} in the checkpoint, {'on' if after else 'off'} here")
        elif before is not None:
            found += [
                f"{key} {value} in the checkpoint, {_settings(after)[key]} here"
                for key, value in _settings(before).items()
                if value != _settings(after)[key]
            ]
    return found


def _settings(spec: QuantSpec | PruneSpec) -> dict[str, object]:
    """The spec's settings without ``decided_by``, which names the rule, not what it does."""
    values = asdict(spec)
    return {f.name: values[f.name] for f in fields(spec) if f.name != "decided_by"}


def _shown(value: object) -> str:
    return "none" if value is None else str(value)
