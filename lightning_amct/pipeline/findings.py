"""What a run's numbers mean, in words under the summary table.

:func:`headline` says what compression bought (deploy speed-up in ONNX Runtime, checkpoint size,
metric change); :func:`settings_behind` names the plan's settings that produce it, and those that
hold it back (a layer left in float, outputs not quantized, INT4 weights ONNX Runtime has no
kernel for); :func:`step_time_caveat` says when the stages' own step times, the summary's
fallback where the models could not take steps in turns (:mod:`~lightning_amct.pipeline.step_time`),
are too few for their ratio to mean anything (``--fast``); :func:`budget_caveat` says when the
metric comes from a few batches (``--fast`` again), so that nobody takes it for the model's.

Example:
    >>> from lightning_amct.plan import CompressionPlan, LayerPlan, QuantSpec
    >>> int8 = QuantSpec(8, None, True, "arq", 8, True)
    >>> plan = CompressionPlan({"fc": LayerPlan("fc", "Linear", quant=int8),
    ...                         "conv": LayerPlan("conv", "Conv2d", skip_reason="quant skipped by skip_layers")})
    >>> print(settings_behind(plan))
    Settings: INT8 activations and INT8 weights on 1 of 2 layers; left in float: conv (quant skipped by skip_layers); quantize_outputs off: a layer whose output goes anywhere but into a quantized layer (a residual add, a pooling) runs in float in ONNX Runtime.
    >>> step_time_caveat(2, 40)
    'train step: 2 and 40 steps timed after warm-up, too few for a ratio (at least 20 each); a full run compares them.'
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from lightning_amct.plan import CompressionPlan

#: Timed training steps each stage needs before the summary compares their median step times.
MIN_TIMED_STEPS = 20


def headline(speedup: float, batch_size: int, threads: int, checkpoint_share: float, metric: str, change: float) -> str:
    """One sentence: the deploy model's speed-up over float, the checkpoint's size, the metric's change.

    Args:
        speedup: float latency / deploy latency in ONNX Runtime.
        batch_size: the batch the latency was measured at.
        threads: ONNX Runtime intra-op threads (0: its default; 1: timed by CPU time).
        checkpoint_share: compressed checkpoint bytes / float ``state_dict`` bytes.
        metric: the test metric's name.
        change: compressed minus float test metric.
    """
    if round(speedup, 2) == 1 or round(1 / speedup, 2) == 1:  # "1.00x slower" says nothing
        pace = "as fast as"
    else:
        pace = f"{speedup:.2f}x faster than" if speedup > 1 else f"{1 / speedup:.2f}x slower than"
    threading = {0: "its default threads", 1: "1 thread, CPU time"}.get(threads, f"{threads} threads")
    return (
        f"Deploy model: {pace} float in ONNX Runtime (batch {batch_size}, {threading}); compressed "
        f"checkpoint {checkpoint_share:.0%} of the float state_dict; {metric} {change:+.4f}."
    )


def settings_behind(plan: CompressionPlan, quantize_outputs: bool = False) -> str:
    """The plan's settings that decide size and speed, in one sentence (``quantize_outputs``: the
    plan was resolved with that option)."""
    quantized = plan.quantized
    parts = []
    if quantized:
        bits = Counter(f"INT{q.act_bits} activations and INT{q.weight_bits} weights" for q in _specs(plan))
        described = "; ".join(f"{kind} on {count} of {len(plan)} layers" for kind, count in bits.items())
        parts.append(described)
        floating = [f"{name} ({lp.skip_reason})" for name, lp in plan.items() if lp.quant is None]
        if floating:
            parts.append(f"left in float: {', '.join(floating)}")
        if plan.outputs:
            gates = f", and {len(plan.gates)} gate(s) on the fixed grid of [0, 1]" if plan.gates else ""
            parts.append(
                f"quantize_outputs: {len(plan.outputs)} output quantizer(s){gates}, so ONNX Runtime runs every "
                "quantized layer with integer kernels"
            )
        elif quantize_outputs:
            parts.append("quantize_outputs: no output needed a quantizer (each goes into quantized layers only)")
        else:
            parts.append(
                "quantize_outputs off: a layer whose output goes anywhere but into a quantized layer (a residual "
                "add, a pooling) runs in float in ONNX Runtime"
            )
        if any(q.weight_bits == 4 for q in _specs(plan)):
            parts.append(
                "INT4 weights shrink the files, but ONNX Runtime has no INT4 convolution kernel: those layers "
                "run on dequantized float weights, slower than float"
            )
    for kind, label in (("filter", "channel pruning"), ("n_out_of_m", "4:2 sparsity")):
        if plan.pruned(kind):
            parts.append(f"{label} on {len(plan.pruned(kind))} layer(s)")
    return f"Settings: {'; '.join(parts) or 'nothing compressed'}."


def step_time_caveat(float_steps: int, compressed_steps: int) -> str | None:
    """Why the ratio of the stages' own median steps is left out, or None when both timed enough steps.

    Only for a run whose models could not be timed in turns. A stage that did not train (a float
    model loaded from a checkpoint) has nothing to compare.
    """
    if not float_steps or not compressed_steps:
        return None
    if min(float_steps, compressed_steps) >= MIN_TIMED_STEPS:
        return None
    return (
        f"train step: {float_steps} and {compressed_steps} steps timed after warm-up, too few for a ratio "
        f"(at least {MIN_TIMED_STEPS} each); a full run compares them."
    )


def budget_caveat(trainer: Mapping[str, object], metric: str, ranks: int = 1) -> str | None:
    """What a run on a budget of batches (``--fast``, ``--limit-batches`` or the recipe's own
    ``limit_*_batches``) measured its metric on, or None where it trained and tested on every batch.
    Lightning's limits count each rank's batches: with ``ranks`` above 1, the caveat says so.

    Example:
        >>> caveat = budget_caveat({"limit_train_batches": 4, "limit_test_batches": 4}, "test_acc")
        >>> caveat.split(": ")[:2]
        ['A budget run', '4 training batches an epoch and test_acc over 4 test batches']
        >>> budget_caveat({"limit_train_batches": 4}, "test_acc", ranks=2).split(": ")[1]
        '4 training batches an epoch on each of 2 ranks'
        >>> budget_caveat({"limit_test_batches": 1.0}, "test_acc") is None  # every batch
        True
    """
    limits = {split: trainer.get(f"limit_{split}_batches") for split in ("train", "test")}
    shares = {split: _share(value, split) for split, value in limits.items()}
    shown = {split: share for split, share in shares.items() if share}
    if not shown:
        return None
    each = f" on each of {ranks} ranks" if ranks > 1 else ""
    parts = []
    if "train" in shown:
        parts.append(f"{shown['train']} an epoch{each}")
    if "test" in shown:
        parts.append(f"{metric} over {shown['test']}{each}")
    return (
        f"A budget run: {' and '.join(parts)}: a check that every step runs, not what the compression costs "
        f"in {metric}; a run on every batch measures that."
    )


def _share(limit: object, split: str) -> str | None:
    """Lightning's ``limit_{split}_batches`` in words (a count, or a fraction of the batches); None: every batch."""
    noun = "training" if split == "train" else split
    if limit is None or isinstance(limit, bool) or (isinstance(limit, float) and limit >= 1.0):
        return None
    if isinstance(limit, float):
        return f"{limit:.0%} of the {noun} batches"
    return f"{limit} {noun} batch{'' if limit == 1 else 'es'}"


def _specs(plan: CompressionPlan) -> list:
    return [lp.quant for lp in plan.quantized.values()]
