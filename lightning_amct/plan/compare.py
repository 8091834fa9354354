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

from dataclasses import asdict, fields

from lightning_amct.plan.specs import CompressionPlan, LayerPlan, PruneSpec, QuantSpec

_NOT_COMPRESSED = LayerPlan("", "")


def plan_differences(saved: CompressionPlan, current: CompressionPlan) -> list[str]:
    """One line per difference between ``saved`` (the checkpoint's) and ``current``, in model order.

    Compared: the file-wide settings, each layer's quantization and pruning settings (a layer
    missing from a plan counts as not compressed), the output quantizers and the gates.
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
    for site in list(saved.outputs) + [site for site in current.outputs if site not in saved.outputs]:
        before, after = saved.outputs.get(site), current.outputs.get(site)
        if before != after:
            differences.append(f"output quantizer of {site}: {_shown(before)} in the checkpoint, {_shown(after)} here")
    for site in list(saved.gates) + [site for site in current.gates if site not in saved.gates]:
        before, after = saved.gates.get(site), current.gates.get(site)
        if before != after:
            differences.append(f"gate {site}: {_shown(before)} in the checkpoint, {_shown(after)} here")
    return differences


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
