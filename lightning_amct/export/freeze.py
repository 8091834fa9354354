"""Freezing a compressed model for export: integer layers, BatchNorm folded, no training state.

:func:`freeze_model` works on a copy (the trained model is left as it is) and returns a
:class:`FrozenModel`: the copy in eval mode on the CPU, with every compressed layer replaced by a
:class:`~lightning_amct.export.fake_quant_layer.FakeQuantLayer`, every folded BatchNorm by
``nn.Identity`` (a BatchNorm subclass with its own ``forward`` stays, as an identity normalization)
and every output quantizer by a fixed-grid one (gate quantizers, on a fixed grid already, stay),
plus the integer form of each compressed layer. Both ONNX files are exported from that module and the checkpoint is written
from those integers, so all artifacts describe one model. :func:`float_copy` gives the same
architecture in plain float layers: the baseline for file sizes and the graph that FLOPs and
channel groups are read from.

Example:
    >>> import torch
    >>> from lightning_amct import compress_model
    >>> from lightning_amct.demo import DemoNet
    >>> cfg = "retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 6 clip_min: -6 } } }"
    >>> model = compress_model(DemoNet(), cfg, torch.zeros(1, 1, 8, 8))
    >>> frozen = freeze_model(model, torch.zeros(1, 1, 8, 8))
    >>> type(frozen.module.block.conv1).__name__, type(frozen.module.block.bn1).__name__
    ('FakeQuantLayer', 'Identity')
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from lightning_amct.export.fake_quant_layer import FakeQuantLayer
from lightning_amct.export.fold import (
    batchnorm_successors,
    clamped_by_folding,
    fold_batchnorm,
    fold_problem,
    has_plain_forward,
    neutralize_batchnorm,
)
from lightning_amct.export.grid_quantizer import GridQuantizer
from lightning_amct.export.integer import ActivationGrid, IntegerLayer, activation_grid, integer_layer
from lightning_amct.graph import GraphError, capture_graph, cpu_inputs, model_inputs
from lightning_amct.modules.compressed_layers import CompressedLayer
from lightning_amct.modules.gate_quant import detach_gate_quantizers
from lightning_amct.modules.input_norm import restore_norms
from lightning_amct.modules.input_pool import restore_pools
from lightning_amct.modules.input_relu import restore_relus
from lightning_amct.modules.output_quant import attach_output_quantizer, detach_output_quantizers
from lightning_amct.modules.replace import replace_module
from lightning_amct.quant.functional import int_range


@dataclass
class FrozenModel:
    """A compressed model ready for export.

    Attributes:
        module: the frozen copy (eval mode, CPU, float32).
        layers: integer form of each compressed layer, by module name, in model order.
        outputs: grids of the output quantizers, by the module whose output they quantize.
        notes: what the report should say (BatchNorms left unfolded and why, layer notes).
    """

    module: nn.Module
    layers: dict[str, IntegerLayer]
    outputs: dict[str, ActivationGrid] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def folded_batchnorms(self) -> list[str]:
        """Names of the BatchNorms folded into a layer (now ``nn.Identity`` in ``module``)."""
        return [data.folded_batchnorm for data in self.layers.values() if data.folded_batchnorm]


def freeze_model(model: nn.Module, example_inputs: object = None) -> FrozenModel:
    """Freeze a copy of a compressed (or already frozen) model.

    Args:
        model: a model compressed by ``compress_model`` or the callback, trained or not; a model
            returned by ``load_compressed`` works too.
        example_inputs: inputs to capture the graph with, which says which BatchNorm follows which
            layer; default: the model's ``example_input_array``. Without any, or where the graph
            cannot be captured, no BatchNorm is folded (the notes say so).
    """
    successors, graph_note = _batchnorm_successors(model, example_inputs)
    frozen = _eval_copy(model)
    layers = _integer_layers(frozen)
    notes = [f"{name}: {note}" for name, data in layers.items() for note in data.notes]
    notes += [graph_note] if graph_note else []
    outputs = {}
    for site, quantizer in detach_output_quantizers(frozen).items():
        grid = quantizer.grid if isinstance(quantizer, GridQuantizer) else activation_grid(quantizer)
        if grid is None:
            notes.append(f"{site}: output quantizer never calibrated: output left in float, as the model runs it")
        else:
            outputs[site] = grid
    for name, bn_name in successors.items():
        if name not in layers:
            continue
        bn = frozen.get_submodule(bn_name)
        problem = fold_problem(layers[name], bn)
        if problem is not None:
            notes.append(f"{bn_name} left unfolded after {name}: {problem}")
            continue
        clamped = clamped_by_folding(layers[name], bn)
        if clamped:
            q_lo, q_hi = int_range(layers[name].weight_bits)
            notes.append(
                f"{bn_name} folded into {name}: {clamped} weight integer(s) {q_lo} in channels with gamma < 0 "
                f"became {q_hi}, one step off ({-q_lo} does not fit)"
            )
        layers[name] = fold_batchnorm(layers[name], bn_name, bn)
        remove_folded_batchnorm(frozen, bn_name)
    for name, data in layers.items():
        module = frozen.get_submodule(name)
        if isinstance(module, CompressedLayer):
            replace_module(frozen, name, FakeQuantLayer(module.to_float(), data))
    attach_grids(frozen, outputs)
    return FrozenModel(frozen, layers, outputs, notes)


def _batchnorm_successors(model: nn.Module, example_inputs: object) -> tuple[dict[str, str], str | None]:
    """Quantized layer -> the BatchNorm that alone reads its output, from the graph of the model in
    plain layers; and a note when there is no graph to read."""
    inputs = model_inputs(model, example_inputs)
    layers = list(_outermost(model, (CompressedLayer, FakeQuantLayer)))
    if not inputs:
        return {}, "no example inputs to capture the graph with: no BatchNorm folded"
    plain = float_copy(model)
    inputs = cpu_inputs(inputs)
    try:
        graph = capture_graph(plain, inputs)
    except GraphError as exc:
        return {}, f"no BatchNorm folded: {exc}"
    return batchnorm_successors(graph, layers), None


def attach_grids(model: nn.Module, grids: dict[str, ActivationGrid]) -> None:
    """Give each module named in ``grids`` a frozen output quantizer on that grid.

    Freezing detaches the training-time output quantizers first: a BatchNorm folded into its conv
    becomes ``nn.Identity``, and the quantizer of its output moves to that Identity.
    """
    for site, grid in grids.items():
        attach_output_quantizer(model.get_submodule(site), GridQuantizer(grid))


def float_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode, CPU, float32) with every compressed layer as its plain layer.

    The weights stay the float training weights (no mask, no quantization; a frozen layer gives
    its dequantized weight): this is the model a float deployment would ship, the baseline that
    file sizes are compared with, and the graph that FLOPs and channel groups are read from.
    """
    plain = _eval_copy(model)
    detach_output_quantizers(plain)
    detach_gate_quantizers(plain)
    for name, module in _outermost(plain, (CompressedLayer, FakeQuantLayer)).items():
        layer = module.layer if isinstance(module, FakeQuantLayer) else module
        replace_module(plain, name, layer.to_float())
    return plain


def remove_folded_batchnorm(model: nn.Module, bn_name: str) -> None:
    """Take a BatchNorm folded into the conv before it out of the computation: ``nn.Identity`` in
    its place, or, for a subclass with a ``forward`` of its own, the same module with an identity
    normalization (:func:`~lightning_amct.export.fold.neutralize_batchnorm`)."""
    bn = model.get_submodule(bn_name)
    if has_plain_forward(bn):
        replace_module(model, bn_name, nn.Identity())
    else:
        neutralize_batchnorm(bn)


def _eval_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of ``model`` in eval mode, with plain ReLUs (the training model's stay).

    The copy switches to training mode first, through the modules' own ``train()``: LeViT's
    attention keeps its biases in a cache in eval mode and empties it only there, and Lightning
    sets modes without calling it, so a cache filled at validation would hold the biases of that
    time. A LightningModule that Lightning trained compiled gets its own methods back.
    """
    copied = copy.deepcopy(model).cpu().float().train().eval()
    if vars(copied).get("_compiler_ctx"):  # trainer.fit(torch.compile(module)): the exporters trace eager code
        from lightning.pytorch.utilities.compile import to_uncompiled

        to_uncompiled(copied)
    restore_norms(copied)
    restore_pools(copied)
    restore_relus(copied)
    return copied


def _integer_layers(model: nn.Module) -> dict[str, IntegerLayer]:
    """The compressed layers' integer forms (a frozen layer already holds its own)."""
    return {
        name: module.data if isinstance(module, FakeQuantLayer) else integer_layer(name, module)
        for name, module in _outermost(model, (CompressedLayer, FakeQuantLayer)).items()
    }


def _outermost(model: nn.Module, types: tuple[type, ...]) -> dict[str, nn.Module]:
    """Modules of ``types`` by name, in model order, leaving out those inside another one."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, types) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    return found
