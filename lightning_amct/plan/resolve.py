"""Resolving a config against a real model: one :class:`LayerPlan` per compressible layer.

Rules (see the config reference): quantization and pruning resolve separately; for each,
``override_layer_configs`` (by name) > ``override_layer_types`` (by type) > the global config. An
override entry is atomic: what it leaves out takes the schema defaults, not the global config.
Skips are unions of the shared and the feature's own lists. A quantization override beats a skip
list; for pruning the skip list wins. Both cases are noted in the plan and warned about.

Defaults that depend on the model (``fixed_min`` for a layer reading a ReLU output, layers that
read one tensor sharing an activation quantizer) come from the model's graph, captured with the
example inputs (:mod:`lightning_amct.graph`). A model whose graph cannot be captured is still
quantized, as the config says: ``fixed_min`` is then false where the config leaves it unset and
every layer has an activation quantizer of its own, and one warning says so. Channel pruning and
``quantize_outputs`` cannot do without the graph: they fail with one line naming what stopped it.

Example:
    >>> import torch
    >>> from lightning_amct.demo import DemoNet
    >>> plan = resolve_plan(DemoNet(), "retrain_data_quant_config { ulq_quantize {} }", torch.zeros(1, 1, 8, 8))
    >>> plan["fc"].quant.fixed_min, plan["fc"].quant.channel_wise, plan["stem.conv"].quant.channel_wise
    (True, False, True)
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from lightning_amct.bulk import collection_paused
from lightning_amct.config import ConfigWarning, SourceMap, load_config_with_locations
from lightning_amct.graph import (
    HOW_TO_GIVE_INPUTS,
    DataDependentError,
    GraphError,
    GraphWarning,
    ModelGraph,
    capture_graph,
    model_inputs,
)
from lightning_amct.plan.layers import (
    FILTER_PRUNABLE_TYPES,
    default_channel_wise,
    filter_prune_obstacle,
    forward_obstacle,
    layer_type,
    n_out_of_m_obstacle,
    quantize_obstacle,
    supported_base,
    type_names,
)
from lightning_amct.plan.gates import gate_sites
from lightning_amct.plan.outputs import output_sites
from lightning_amct.plan.pool_inputs import pools_read_only_by
from lightning_amct.plan.relu_inputs import (
    layers_reading_relu_output,
    norms_before_relus,
    relu_call,
    relus_read_only_by,
)
from lightning_amct.plan.sharing import shared_quantizers
from lightning_amct.plan.specs import CompressionPlan, LayerPlan, OutputSpec, PruneSpec, QuantSpec
from lightning_amct.proto import retrain_config_pytorch_pb2 as pb

_NAME_LISTS = ("skip_layers", "quant_skip_layers", "regular_prune_skip_layers")
_TYPE_LISTS = ("skip_layer_types", "quant_skip_types", "regular_prune_skip_types")


@collection_paused()
def resolve_plan(
    model: nn.Module,
    config: object,
    example_inputs: object = None,
    *,
    quantize_outputs: bool = False,
    locations: SourceMap | None = None,
) -> CompressionPlan:
    """Resolve ``config`` (path, text, mapping or message) against ``model``.

    Args:
        model: the float model, before any compression.
        config: anything :func:`lightning_amct.load_config` accepts.
        example_inputs: a tensor or tuple of tensors the model accepts, to capture its graph
            (shapes matter, values do not); default: the model's ``example_input_array`` (a
            LightningModule's). Without any the plan does without the graph.
        quantize_outputs: also quantize the outputs of quantized layers that go anywhere but into
            quantized layers (residual adds, pooling), and put the gate values of sigmoid, SiLU
            and hard sigmoid modules on a fixed grid, so that ONNX Runtime runs every quantized
            layer of the deploy model with integer kernels, and its gates too. Not part of the AMCT
            dialect, which quantizes layer inputs only; see :mod:`~lightning_amct.plan.outputs`
            and :mod:`~lightning_amct.plan.gates`.
        locations: where the fields of ``config`` were written, when it is a message read
            earlier with :func:`lightning_amct.config.load_config_with_locations`: an error about
            a layer the model lacks then names the file, line and column (a path or text finds
            its own).

    Raises:
        ConfigError: the config names a layer or type the model lacks (with close matches), or
            overrides a type or layer that cannot be compressed that way.
        GraphError: ``quantize_outputs`` or channel pruning needs the graph, and example inputs
            were given but the graph cannot be captured with them.
    """
    message, source = load_config_with_locations(config, locations)
    return _Resolver(model, message, source, model_inputs(model, example_inputs), quantize_outputs).resolve()


@dataclass(frozen=True)
class _Override:
    """An override entry that matched a layer, with the label the plan shows for it."""

    entry: pb.RetrainOverrideLayer | pb.RetrainOverrideLayerType
    label: str


class _Resolver:
    def __init__(
        self, model: nn.Module, message: pb.AMCTRetrainConfig, source, example_inputs, quantize_outputs: bool
    ) -> None:
        self.model = model
        self.quantize_outputs = quantize_outputs
        self.msg = message
        self.source = source
        self.example_inputs = example_inputs
        self.modules = {name: module for name, module in model.named_modules() if name}
        self.warnings: list[str] = []
        self._graph: ModelGraph | None = None
        self._graph_error: GraphError | None = None
        self._relu_inputs: set[str] | None = None
        # Indexes of the config's lists, so that each layer looks its entries up in constant time.
        self._overrides_by_name = _index(message.override_layer_configs, lambda entry: entry.layer_name)
        self._overrides_by_type = _index(message.override_layer_types, lambda entry: entry.layer_type)
        self._skip_lists = {field: set(getattr(message, field)) for field in (*_NAME_LISTS, *_TYPE_LISTS)}

    # -- checks of what the config names ---------------------------------------------------
    def _unknown(self, what: str, value: str, choices: list[str], path: tuple) -> Exception:
        lowered = {choice.lower(): choice for choice in choices}  # NET.FC finds net.fc
        close = [lowered[match] for match in difflib.get_close_matches(value.lower(), list(lowered), n=3, cutoff=0.5)]
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return self.source.error(f'no {what} "{value}" in {type(self.model).__name__}{hint}', path)

    def _check_references(self) -> None:
        names = list(self.modules)
        by_type: dict[str, list[nn.Module]] = {}
        for module in self.modules.values():
            for kind in type_names(module):
                by_type.setdefault(kind, []).append(module)
        types = sorted(by_type)
        for field in _NAME_LISTS:
            for i, name in enumerate(getattr(self.msg, field)):
                if name not in self.modules:
                    raise self._unknown("layer", name, names, (field, i))
                self._check_skip_target(f'layer "{name}" ({layer_type(self.modules[name])})', [name], (field, i))
        for field in _TYPE_LISTS:
            for i, kind in enumerate(getattr(self.msg, field)):
                if kind not in types:
                    raise self._unknown("layer type", kind, types, (field, i))
                members = set(map(id, by_type[kind]))
                named = [name for name, module in self.modules.items() if id(module) in members]
                self._check_skip_target(f'layer type "{kind}"', named, (field, i))
        for i, entry in enumerate(self.msg.override_layer_configs):
            path = ("override_layer_configs", i, "layer_name")
            if entry.layer_name not in self.modules:
                raise self._unknown("layer", entry.layer_name, names, path)
            module = self.modules[entry.layer_name]
            self._check_override_target(entry, f'layer "{entry.layer_name}" ({layer_type(module)})', module, path)
        for i, entry in enumerate(self.msg.override_layer_types):
            path = ("override_layer_types", i, "layer_type")
            if entry.layer_type not in by_type:
                raise self._unknown("layer type", entry.layer_type, types, path)
            modules = by_type[entry.layer_type]
            example = next((m for m in modules if quantize_obstacle(m) is None), modules[0])
            self._check_override_target(entry, f'layer type "{entry.layer_type}"', example, path)

    def _check_skip_target(self, label: str, named: list[str], path: tuple) -> None:
        """A skip list entry must name what the config could compress: skipping anything else
        changes nothing (a BatchNorm, a block whose layers have names of their own)."""
        if any(quantize_obstacle(self.modules[name]) is None for name in named):
            return
        inside = [
            name
            for name, module in self.modules.items()
            if quantize_obstacle(module) is None and any(name.startswith(f"{outer}.") for outer in named)
        ]
        shown = f": the layers in it are {', '.join(inside[:5])}{', ...' if len(inside) > 5 else ''}" if inside else ""
        raise self.source.error(
            f"{label} is no layer the config compresses, so skipping it changes nothing; skip lists name "
            f"layers (Linear, Conv...){shown}",
            path,
        )

    def _check_override_target(self, entry, label: str, module: nn.Module, path: tuple) -> None:
        obstacle = quantize_obstacle(module)
        if obstacle:
            raise self.source.error(f"{label} cannot be compressed: {obstacle}", path)
        if entry.prune_config.WhichOneof("prune_algo") != "filter_pruner":
            return
        by_type = isinstance(entry, pb.RetrainOverrideLayerType)
        if by_type and supported_base(module).__name__ in FILTER_PRUNABLE_TYPES:
            return  # some instances of the type may still be unprunable (depthwise): the plan notes them
        obstacle = filter_prune_obstacle(module)
        if obstacle:
            raise self.source.error(f"{label} cannot be filter-pruned: {obstacle}", path)

    # -- helpers -------------------------------------------------------------------------
    def _override(self, name: str, kinds: tuple[str, ...], wants) -> _Override | None:
        """The override for layer ``name``: by name, else by type (its own class before its base)."""
        for entry in self._overrides_by_name.get(name, ()):
            if wants(entry):
                return _Override(entry, f"override_layer_configs[{name}]")
        for kind in kinds:
            for entry in self._overrides_by_type.get(kind, ()):
                if wants(entry):
                    return _Override(entry, f"override_layer_types[{kind}]")
        return None

    def _skip_rule(
        self, name: str, kinds: tuple[str, ...], name_lists: tuple[str, str], type_lists: tuple[str, str]
    ) -> str | None:
        for field in name_lists:
            if name in self._skip_lists[field]:
                return field
        for field in type_lists:
            if any(kind in self._skip_lists[field] for kind in kinds):
                return field
        return None

    def _captured(self) -> ModelGraph | None:
        """The model's graph, captured on first use; None when it cannot be (the error is kept)."""
        if self._graph is None and self._graph_error is None:
            try:
                self._graph = capture_graph(self.model, self.example_inputs)
            except GraphError as exc:
                self._graph_error = exc
        return self._graph

    def _required_graph(self, needed_for: str) -> ModelGraph:
        graph = self._captured()
        if graph is None:
            remedy = ""
            if isinstance(self._graph_error.__cause__, DataDependentError):
                remedy = (
                    f"; quantization alone works without it: for {needed_for}, make forward capturable "
                    "(no Python branch on tensor values, no NumPy round trip) or leave it out"
                )
            elif self.example_inputs:  # the model's own code failed on them
                remedy = (
                    f"; quantization alone works without it: for {needed_for}, give example inputs that forward "
                    "runs on (their number, shape and dtype) or leave it out"
                )
            raise GraphError(f"{needed_for} needs the model's graph: {self._graph_error}{remedy}") from (
                self._graph_error.__cause__
            )
        return graph

    def _relu_fed(self, name: str) -> bool:
        graph = self._captured()
        if graph is None:
            return False
        if self._relu_inputs is None:
            self._relu_inputs = layers_reading_relu_output(graph)
        return name in self._relu_inputs

    def _warn(self, text: str, category: type[Warning] = ConfigWarning) -> None:
        self.warnings.append(text)
        warnings.warn(text, category, stacklevel=4)

    # -- quantization ----------------------------------------------------------------------
    def _quant(self, name: str, kinds: tuple[str, ...], notes: list[str]) -> QuantSpec | None:
        override = self._override(
            name,
            kinds,
            lambda e: e.HasField("retrain_data_quant_config") or e.HasField("retrain_weight_quant_config"),
        )
        skip = self._skip_rule(
            name, kinds, ("skip_layers", "quant_skip_layers"), ("skip_layer_types", "quant_skip_types")
        )
        if override is None:
            if skip:
                notes.append(f"quant skipped by {skip}")
                return None
            globally_on = self.msg.HasField("retrain_data_quant_config") or self.msg.HasField(
                "retrain_weight_quant_config"
            )
            if not globally_on:
                return None
            act, wts, label = self.msg.retrain_data_quant_config, self.msg.retrain_weight_quant_config, "global"
        else:
            if skip:
                notes.append(f"quant by {override.label} despite {skip}")
                self._warn(f"layer '{name}' is in {skip} but {override.label} quantizes it (the override wins)")
            act = override.entry.retrain_data_quant_config
            wts = override.entry.retrain_weight_quant_config
            label = override.label
        return self._quant_spec(name, kinds[-1], act, wts, label)

    def _quant_spec(self, name: str, base: str, act, wts, label: str) -> QuantSpec:
        ulq = act.ulq_quantize  # ULQ is the only activation algorithm; unset = schema defaults
        clip = (ulq.clip_max_min.clip_max, ulq.clip_max_min.clip_min) if ulq.HasField("clip_max_min") else None
        fixed_min = ulq.fixed_min if ulq.HasField("fixed_min") else self._relu_fed(name)
        algo = "ulq" if wts.WhichOneof("wts_algo") == "ulq_retrain" else "arq"
        weight = wts.ulq_retrain if algo == "ulq" else wts.arq_retrain
        channel_wise = weight.channel_wise if weight.HasField("channel_wise") else default_channel_wise(base)
        graph = self._captured()
        return QuantSpec(
            act_bits=_bits(ulq.dst_type),
            act_clip=clip,
            fixed_min=fixed_min,
            weight_algo=algo,
            weight_bits=_bits(weight.dst_type),
            channel_wise=channel_wise,
            decided_by=label,
            calls=max(1, len(graph.calls(name))) if graph is not None else 1,
        )

    # -- pruning ---------------------------------------------------------------------------
    def _prune(self, name: str, module: nn.Module, notes: list[str], declined: list) -> PruneSpec | None:
        kinds = type_names(module)
        override = self._override(name, kinds, lambda e: e.HasField("prune_config"))
        config, label = (override.entry.prune_config, override.label) if override else (self.msg.prune_config, "global")
        algo = config.WhichOneof("prune_algo")
        if algo is None:
            return None
        skip = self._skip_rule(
            name, kinds, ("skip_layers", "regular_prune_skip_layers"), ("skip_layer_types", "regular_prune_skip_types")
        )
        if skip:
            notes.append(f"prune skipped by {skip}")
            if override:
                self._warn(f"layer '{name}' is in {skip}: {override.label} does not prune it (the skip list wins)")
            return None
        if algo == "n_out_of_m_pruner":
            obstacle = n_out_of_m_obstacle(module)
            if obstacle:
                declined.append(("4:2-pruned", obstacle))
                return None
            selective = config.n_out_of_m_pruner.l1_selective_prune
            return PruneSpec("n_out_of_m", update_freq=selective.update_freq, decided_by=label)
        obstacle = filter_prune_obstacle(module)
        if obstacle and "depthwise" in obstacle:
            notes.append(f"not filter-pruned: {obstacle}")  # it shrinks with its input's group
            return None
        if obstacle:
            declined.append(("filter-pruned", obstacle))
            return None
        bcp = config.filter_pruner.balanced_l2_norm_filter_prune
        return PruneSpec(
            "filter", prune_ratio=bcp.prune_ratio, ascend_optimized=bcp.ascend_optimized, decided_by=label
        )

    # -- all layers ------------------------------------------------------------------------
    def resolve(self) -> CompressionPlan:
        self._check_references()
        layers = {}
        for name, module in self.modules.items():
            if supported_base(module) is None:
                continue
            notes: list[str] = []
            declined: list[tuple[str, str]] = []
            quant = self._quant(name, type_names(module), notes)
            prune = self._prune(name, module, notes, declined)
            obstacle = quantize_obstacle(module) or forward_obstacle(module, name, self._captured())
            if obstacle and (quant or prune or declined):
                quant, prune, declined = None, None, [("compressed", obstacle)]
            if quant is None and prune is None and not notes and not declined:
                notes.append("no feature configured for it")
            layers[name] = LayerPlan(name, layer_type(module), quant, prune, "; ".join(notes) or None, tuple(declined))
        self._drop_filter_pruning_that_removes_nothing(layers)
        specs = {name: lp.quant for name, lp in layers.items() if lp.quant is not None}
        outputs, gates, shared = {}, {}, {}
        if self.quantize_outputs and specs:
            graph = self._required_graph("quantize_outputs")
            gates = gate_sites(graph)
            outputs = output_sites(graph, specs, gates)
        elif self.quantize_outputs:
            self._warn("quantize_outputs has no effect: the config quantizes no layer, so no output is quantized")
        if len(specs) > 1 and self._captured() is not None:
            shared = {name: owner for name, owner in shared_quantizers(self._graph, specs).items() if owner != name}
        alone, quantized_outputs = self._alone(specs, shared, outputs), {*outputs, *gates}
        pools = self._input_pools(alone, quantized_outputs)
        relus = self._input_relus([name for name in alone if specs[name].fixed_min], quantized_outputs, pools)
        # a layer applies a BatchNorm before its ReLU, or a max-pool after it, not both
        before_relus = norms_before_relus(self._graph, relus).items()
        norms = {layer: norm for layer, norm in before_relus if norm not in outputs and layer not in pools}
        # a ReLU module called more than once leaves a call to its layer only after a BatchNorm that did
        relus = {layer: relu for layer, relu in relus.items() if relu_call(relu)[1] is None or layer in norms}
        if specs and self._graph_error is not None:
            cause = self._graph_error.__cause__
            inputs_failed = cause is not None and not isinstance(cause, DataDependentError)
            check = " (are these the inputs forward takes?)" if inputs_failed else ""
            self._warn(
                f"{self._graph_error}{check}; quantizing without the graph: fixed_min is false where the config "
                "leaves it unset, and every layer has an activation quantizer of its own",
                GraphWarning,
            )
        return CompressionPlan(
            layers,
            batch_num=self.msg.batch_num,
            force_fp16_quant=self.msg.HasField("fakequant_precision_mode"),
            outputs=outputs,
            gates=gates,
            shared_inputs=shared,
            input_relus=relus,
            input_norms=norms,
            input_pools=pools,
            warnings=tuple(self.warnings),
            uncovered=self._uncovered(),
        )

    def _uncovered(self) -> dict[str, int]:
        """Parameters of modules of types no config compresses, by type; the model's under ``""``."""
        counts: dict[str, int] = {"": 0}
        seen: set[int] = set()

        def count(parameters: Iterable[nn.Parameter], kind: str | None) -> None:
            for parameter in parameters:
                if id(parameter) not in seen:  # a tied parameter once
                    seen.add(id(parameter))
                    counts[""] += parameter.numel()
                    if kind is not None:
                        counts[kind] = counts.get(kind, 0) + parameter.numel()

        supported = {name for name, module in self.modules.items() if supported_base(module) is not None}
        for name in supported:  # with its parametrizations' parameters
            count(self.modules[name].parameters(), None)
        for name, module in self.modules.items():
            if name not in supported:
                count(module.parameters(recurse=False), type(module).__name__)
        return counts

    def _input_relus(self, layers: list[str], quantized_outputs: set[str], pools: dict[str, str]) -> dict[str, str]:
        """Layer → the ReLU module it can apply itself (:func:`relus_read_only_by`, through the
        max-pool it applies, of ``pools``), for ``layers`` (those of :meth:`_alone` with
        ``fixed_min``): ReLUs that quantize no output and hold no gate (``quantized_outputs``)."""
        relus = relus_read_only_by(self._graph, layers, pools) if layers else {}
        return {layer: relu for layer, relu in relus.items() if relu_call(relu)[0] not in quantized_outputs}

    def _input_pools(self, layers: list[str], quantized_outputs: set[str]) -> dict[str, str]:
        """Layer → the max-pool module it can apply itself (:func:`pools_read_only_by`), for
        ``layers`` (:meth:`_alone`): pools that quantize no output and hold no gate."""
        pools = pools_read_only_by(self._graph, layers) if layers else {}
        return {layer: pool for layer, pool in pools.items() if pool not in quantized_outputs}

    def _alone(self, specs: dict[str, QuantSpec], shared: dict[str, str], outputs: dict[str, OutputSpec]) -> list[str]:
        """The quantized layers with a quantizer of their own that no output quantizer shares (none
        without the graph)."""
        if not specs or self._captured() is None:
            return []
        sharing = {*shared, *shared.values(), *(spec.shared_with for spec in outputs.values())}
        return [name for name in specs if name not in sharing]

    def _drop_filter_pruning_that_removes_nothing(self, layers: dict[str, LayerPlan]) -> None:
        """Turn filter pruning off, with the reason, where the layer would keep all its channels.

        A classifier's outputs are the model's outputs; a layer sharing channels with one the plan
        skips must keep them too. Without example inputs (shapes) the groups cannot be traced:
        the plan then lists what the config asks for.
        """
        # Imported here: the pruning package reads the plan's specs, so it cannot be imported
        # while this package initialises.
        from lightning_amct.prune.dependency import channel_groups
        from lightning_amct.prune.surgery import layers_kept_whole, tied_weights

        specs = {name: lp.prune for name, lp in layers.items() if lp.prune is not None and lp.prune.kind == "filter"}
        if not specs:
            return
        if not self.example_inputs:
            self._warn(
                "without example inputs the channels that pruning can remove are not traced: this plan lists "
                f"what the config asks for (a classifier keeps its outputs, for one); {HOW_TO_GIVE_INPUTS}",
                GraphWarning,
            )
            return
        groups = channel_groups(self._required_graph("channel pruning"))
        for name, reason in layers_kept_whole(groups, specs, tied_weights(self.model)).items():
            declined = (*layers[name].declined, ("filter-pruned", reason))
            layers[name] = dataclasses.replace(layers[name], prune=None, declined=declined)


def _index(entries, key) -> dict[str, list]:
    """The entries by ``key(entry)``, each list in config order."""
    index: dict[str, list] = {}
    for entry in entries:
        index.setdefault(key(entry), []).append(entry)
    return index


def _bits(dst_type: int) -> int:
    return {pb.INT4: 4, pb.INT8: 8}[dst_type]
