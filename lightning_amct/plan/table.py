"""``str(plan)``: the plan as a readable table, one row a layer."""

from __future__ import annotations

from lightning_amct.plan.specs import CompressionPlan, LayerPlan

_HEADERS = ("layer", "type", "activation", "weight", "pruning", "decided by / note")


def _activation(lp: LayerPlan) -> str:
    q = lp.quant
    if q is None:
        return "-"
    init = "IFMR" if q.act_clip is None else f"[{q.act_clip[1]:g}, {q.act_clip[0]:g}]"
    calls = f" ({q.calls} calls)" if q.calls > 1 else ""
    return f"INT{q.act_bits} {init}{' fixed_min' if q.fixed_min else ''}{calls}"


def _weight(lp: LayerPlan) -> str:
    q = lp.quant
    if q is None:
        return "-"
    return f"{q.weight_algo.upper()} INT{q.weight_bits} {'per-channel' if q.channel_wise else 'per-tensor'}"


def _pruning(lp: LayerPlan) -> str:
    p = lp.prune
    if p is None:
        return "-"
    if p.kind == "n_out_of_m":
        return f"4:2 every {p.update_freq} batches" if p.update_freq else "4:2 first batch"
    return f"filter {p.prune_ratio:g}{' ascend16' if p.ascend_optimized else ''}"


def _note(lp: LayerPlan) -> str:
    sources = sorted({s.decided_by for s in (lp.quant, lp.prune) if s is not None})
    parts = [", ".join(sources)] if sources else []
    if lp.skip_reason:
        parts.append(lp.skip_reason)
    parts += [f"not {feature}: {why}" for feature, why in lp.declined]
    return "; ".join(parts)


def _declined(plan: CompressionPlan) -> str:
    """``; planned but not possible: 2 not filter-pruned, 1 not 4:2-pruned (see notes)``, or nothing."""
    counts: dict[str, int] = {}
    for lp in plan.values():
        for feature, _ in lp.declined:
            counts[feature] = counts.get(feature, 0) + 1
    if not counts:
        return ""
    listed = ", ".join(f"{n} not {feature}" for feature, n in counts.items())
    return f"; planned but not possible: {listed} (see notes)"


def format_plan(plan: CompressionPlan) -> str:
    """Render ``plan`` as an aligned text table followed by the file-wide settings."""
    rows = [(lp.name, lp.layer_type, _activation(lp), _weight(lp), _pruning(lp), _note(lp)) for lp in plan.values()]
    widths = [max(len(str(row[i])) for row in [_HEADERS, *rows]) for i in range(len(_HEADERS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [_HEADERS, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    summary = f"{len(plan.quantized)} of {len(plan)} layers quantized"
    summary += f", {len(plan.pruned('filter'))} filter-pruned, {len(plan.pruned('n_out_of_m'))} 4:2-pruned"
    summary += _declined(plan)
    summary += f"; IFMR over {plan.batch_num} batch(es)" if any(
        lp.quant.act_clip is None for lp in plan.quantized.values()
    ) else ""
    if plan.force_fp16_quant:
        summary += "; FORCE_FP16_QUANT"
    sections = [*_uncovered(plan), *_outputs(plan), *_gates(plan)]
    sections += [*_input_relus(plan), *_input_norms(plan), *_input_pools(plan)]
    return "\n".join([*lines, "", summary, *sections])


#: The share of the model's parameters from which a type that stays float is named.
_NAMED_SHARE = 0.01


def _uncovered(plan: CompressionPlan) -> list[str]:
    """``left float (types no config compresses): LSTM 18,944 parameters (98%)``, for the types
    that hold 1 % of the model's parameters or more, or nothing."""
    total = plan.uncovered.get("", 0)
    large = sorted(
        ((count, kind) for kind, count in plan.uncovered.items() if kind and count >= _NAMED_SHARE * total),
        reverse=True,
    )
    if not large:
        return []
    listed = ", ".join(f"{kind} {count:,} parameters ({count / total:.0%})" for count, kind in large)
    return [f"left float (types no config compresses): {listed}"]


def _outputs(plan: CompressionPlan) -> list[str]:
    if not plan.outputs:
        return []
    lines = [f"{len(plan.outputs)} output quantizer(s) (quantize_outputs):"]
    for site, spec in plan.outputs.items():
        how = f"the input quantizer of {spec.shared_with}" if spec.shared_with else f"INT{spec.bits} IFMR"
        fixed = " fixed_min" if spec.fixed_min and not spec.shared_with else ""
        source = "" if spec.after == site else f" (output of {spec.after})"
        lines.append(f"  {site}{source}: {how}{fixed}")
    return lines


_GATE_FORMULAS = {
    "sigmoid": "Q(sigmoid(x))", "hardsigmoid": "Q(hardsigmoid(x))", "silu": "x * Q(sigmoid(x))"
}


def _gates(plan: CompressionPlan) -> list[str]:
    entries = [f"{site}: {_GATE_FORMULAS[function]}" for site, function in plan.gates.items()]
    return _section(f"{len(entries)} gate(s) on the fixed INT8 grid of [0, 1] (quantize_outputs):", entries)


def _input_relus(plan: CompressionPlan) -> list[str]:
    entries = [f"{relu} -> {layer}" for layer, relu in plan.input_relus.items()]
    return _section(f"{len(entries)} ReLU(s) that the layer reading them applies in training (input_relus):", entries)


def _input_norms(plan: CompressionPlan) -> list[str]:
    entries = [f"{norm} -> {layer}" for layer, norm in plan.input_norms.items()]
    return _section(
        f"{len(entries)} BatchNorm(s) that the layer reading their ReLU applies in training (input_norms):", entries
    )


def _input_pools(plan: CompressionPlan) -> list[str]:
    entries = [f"{pool} -> {layer}" for layer, pool in plan.input_pools.items()]
    heading = f"{len(entries)} max-pool(s) that the layer reading them applies in training (input_pools):"
    return _section(heading, entries)


def _section(heading: str, entries: list[str]) -> list[str]:
    """``heading`` and its entries indented below it; nothing without entries."""
    return [heading, *(f"  {entry}" for entry in entries)] if entries else []
