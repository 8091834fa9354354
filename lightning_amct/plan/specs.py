"""The resolved per-layer plan: plain, immutable data.

A :class:`CompressionPlan` is what :func:`lightning_amct.resolve_plan` returns and what a
checkpoint stores to rebuild the compressed structure. It is a read-only mapping from layer name
(as in ``model.named_modules()``) to :class:`LayerPlan`, and it round-trips through plain Python
data (``to_dict`` / ``from_dict``), so ``torch.load(weights_only=True)`` can read it back.

Example:
    >>> plan = CompressionPlan({"fc": LayerPlan("fc", "Linear", quant=QuantSpec(8, None, False, "arq", 8, False))})
    >>> plan["fc"].quant.weight_bits
    8
    >>> CompressionPlan.from_dict(plan.to_dict()) == plan
    True
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

WeightAlgo = Literal["arq", "ulq"]
PruneKind = Literal["filter", "n_out_of_m"]


@dataclass(frozen=True)
class QuantSpec:
    """How one layer is quantized.

    Attributes:
        act_bits: activation bits (4 or 8), ULQ.
        act_clip: ``(clip_max, clip_min)`` to start from, or None to initialise by IFMR.
        fixed_min: clip_min pinned to 0 (the layer's input is non-negative).
        weight_algo: ``"arq"`` (scale from the current weights) or ``"ulq"`` (learned scale).
        weight_bits: weight bits (4 or 8).
        channel_wise: one weight scale per output channel instead of one per tensor.
        decided_by: which config entry gave these settings (``global``,
            ``override_layer_types[Conv2d]``, ``override_layer_configs[fc]``).
        calls: how many times one forward of the model runs the layer (more than once where a
            layer is shared across depth, as ALBERT's are): its one activation grid serves every
            call, and IFMR calibrates it on all of them, ``batch_num`` batches of ``calls`` inputs.
    """

    act_bits: int
    act_clip: tuple[float, float] | None
    fixed_min: bool
    weight_algo: WeightAlgo
    weight_bits: int
    channel_wise: bool
    decided_by: str = "global"
    calls: int = 1


@dataclass(frozen=True)
class PruneSpec:
    """How one layer is pruned.

    Attributes:
        kind: ``"filter"`` (BalancedL2NormFilterPruner: output channels removed) or
            ``"n_out_of_m"`` (L1SelectivePruner: 2 of every 4 input-channel weights kept).
        prune_ratio: share of output channels removed (filter pruning only).
        ascend_optimized: kept channel count rounded up to a multiple of 16 (filter pruning only).
        update_freq: 4:2 mask refresh period in training batches; 0 = first batch only.
        decided_by: which config entry gave these settings.
    """

    kind: PruneKind
    prune_ratio: float | None = None
    ascend_optimized: bool = True
    update_freq: int | None = None
    decided_by: str = "global"


@dataclass(frozen=True)
class OutputSpec:
    """An output quantizer (``quantize_outputs``): ULQ on the output of a layer's chain.

    Attributes:
        after: the quantized layer whose output (after its BatchNorm/ReLU) this quantizes; for a
            tensor quantized only because a quantized layer reads it among other readers, the
            module that produces it.
        bits: activation bits of the grid.
        fixed_min: the output is non-negative (the chain ends in a ReLU): clip_min pinned to 0.
        shared_with: a quantized layer reading this tensor whose activation quantizer is reused,
            or None for a quantizer of its own.
    """

    after: str
    bits: int
    fixed_min: bool
    shared_with: str | None = None


@dataclass(frozen=True)
class LayerPlan:
    """One layer's resolved settings; ``quant``/``prune`` are None for a feature left off.

    ``skip_reason`` says why the config left a feature off (or which rule overrode a skip list),
    ``declined`` what the config asks for that the layer cannot be, and why:
    ``("filter-pruned", "group 'fc' cannot be pruned: feeds the model output")``; the first item
    is ``"compressed"``, ``"filter-pruned"`` or ``"4:2-pruned"``. So the printed plan explains
    every decision, and a plan entry never silently does nothing.
    """

    name: str
    layer_type: str
    quant: QuantSpec | None = None
    prune: PruneSpec | None = None
    skip_reason: str | None = None
    declined: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerPlan:
        quant = data.get("quant")
        prune = data.get("prune")
        if quant is not None:
            quant = dict(quant)
            if quant.get("act_clip") is not None:
                quant["act_clip"] = tuple(float(v) for v in quant["act_clip"])
            quant = QuantSpec(**quant)
        return cls(
            name=data["name"],
            layer_type=data["layer_type"],
            quant=quant,
            prune=PruneSpec(**prune) if prune is not None else None,
            skip_reason=data.get("skip_reason"),
            declined=tuple((str(feature), str(why)) for feature, why in data.get("declined", ())),
        )


@dataclass(frozen=True)
class CompressionPlan(Mapping[str, LayerPlan]):
    """Read-only mapping from layer name to :class:`LayerPlan`, plus the file-wide settings.

    Attributes:
        batch_num: training batches used to initialise activation clips (IFMR).
        force_fp16_quant: ``fakequant_precision_mode: FORCE_FP16_QUANT``.
        outputs: output quantizers by the module whose output they quantize (empty unless the
            plan was resolved with ``quantize_outputs``; see :mod:`~lightning_amct.plan.outputs`).
        gates: gate sites, module name → the function of its gate value (``"sigmoid"``,
            ``"silu"``, ``"hardsigmoid"``), whose gate value is on the fixed grid of ``[0, 1]``
            (empty unless resolved with ``quantize_outputs``; see :mod:`~lightning_amct.plan.gates`).
        shared_inputs: quantized layer → the layer whose activation quantizer it uses, for the
            layers that read the same tensor as an earlier one with the same settings (see
            :mod:`~lightning_amct.plan.sharing`); a layer not listed has a quantizer of its own.
        input_relus: quantized layer → the ``nn.ReLU`` module whose output only it reads, which
            the layer applies itself in training where it can (see
            :mod:`~lightning_amct.modules.input_relu`).
        input_norms: quantized layer → the BatchNorm whose output only its input ReLU reads,
            which the layer applies too in training where it can (see
            :mod:`~lightning_amct.modules.input_norm`).
        input_pools: quantized layer → the ``nn.MaxPool2d`` whose output only it reads, which
            the layer applies itself in training where it can (see
            :mod:`~lightning_amct.modules.input_pool`).
        warnings: notes raised while resolving (an override that beat a skip list, ...).
        uncovered: parameters that stay float in modules of types no config compresses, by type
            name (``{"LSTM": 18944}``), with the model's parameter count under ``""``: where a
            model keeps its weights (a recurrent layer, an embedding table).
    """

    layers: Mapping[str, LayerPlan]
    batch_num: int = 1
    force_fp16_quant: bool = False
    outputs: Mapping[str, OutputSpec] = field(default_factory=dict)
    gates: Mapping[str, str] = field(default_factory=dict)
    shared_inputs: Mapping[str, str] = field(default_factory=dict)
    input_relus: Mapping[str, str] = field(default_factory=dict)
    input_norms: Mapping[str, str] = field(default_factory=dict)
    input_pools: Mapping[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = field(default=(), compare=False)
    uncovered: Mapping[str, int] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", dict(self.layers))
        object.__setattr__(self, "outputs", dict(self.outputs))
        object.__setattr__(self, "gates", dict(self.gates))
        object.__setattr__(self, "shared_inputs", dict(self.shared_inputs))
        object.__setattr__(self, "input_relus", dict(self.input_relus))
        object.__setattr__(self, "input_norms", dict(self.input_norms))
        object.__setattr__(self, "input_pools", dict(self.input_pools))
        object.__setattr__(self, "uncovered", dict(self.uncovered))

    def __getitem__(self, name: str) -> LayerPlan:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __hash__(self) -> int:
        return hash((tuple(self.layers.items()), tuple(self.outputs.items()), tuple(self.gates.items()),
                     tuple(self.shared_inputs.items()), tuple(self.input_relus.items()),
                     tuple(self.input_norms.items()), tuple(self.input_pools.items())))

    @property
    def quantized(self) -> dict[str, LayerPlan]:
        """The layers that are quantized, in model order."""
        return {name: lp for name, lp in self.layers.items() if lp.quant is not None}

    def pruned(self, kind: PruneKind) -> dict[str, LayerPlan]:
        """The layers pruned by ``kind`` (``"filter"`` or ``"n_out_of_m"``), in model order."""
        return {n: lp for n, lp in self.layers.items() if lp.prune is not None and lp.prune.kind == kind}

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, int, float, bool, None, list, dict): safe for ``weights_only`` loads."""
        return {
            "batch_num": self.batch_num,
            "force_fp16_quant": self.force_fp16_quant,
            "layers": [lp.to_dict() for lp in self.layers.values()],
            "outputs": {site: asdict(spec) for site, spec in self.outputs.items()},
            "gates": dict(self.gates),
            "shared_inputs": dict(self.shared_inputs),
            "input_relus": dict(self.input_relus),
            "input_norms": dict(self.input_norms),
            "input_pools": dict(self.input_pools),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionPlan:
        layers = [LayerPlan.from_dict(item) for item in data["layers"]]
        return cls(
            layers={lp.name: lp for lp in layers},
            batch_num=int(data.get("batch_num", 1)),
            force_fp16_quant=bool(data.get("force_fp16_quant", False)),
            outputs={site: OutputSpec(**spec) for site, spec in data.get("outputs", {}).items()},
            gates=dict(data.get("gates", {})),
            shared_inputs=dict(data.get("shared_inputs", {})),
            input_relus=dict(data.get("input_relus", {})),
            input_norms=dict(data.get("input_norms", {})),
            input_pools=dict(data.get("input_pools", {})),
            warnings=tuple(data.get("warnings", ())),
        )

    def __str__(self) -> str:
        from lightning_amct.plan.table import format_plan

        return format_plan(self)


__all__ = ["CompressionPlan", "LayerPlan", "OutputSpec", "PruneSpec", "QuantSpec"]
