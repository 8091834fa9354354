"""Compression of architectures this project did not write: the transformers model zoo.

For each zoo model: INT8 with ``recipes/int8.cfg`` (the config for any model, each layer's
settings the schema's defaults) trains; channel pruning at 0.3 with INT8 on top gives the exact
parameter count of the keep counts and trains; 4:2 holds its pattern on every planned layer. One
run goes through a real Lightning Trainer with ``CompressionCallback``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_amct import CompressionCallback, compress_model, compression_state, load_config, resolve_plan
from lightning_amct.export import freeze_model, load_compressed
from lightning_amct.modules.compressed_layers import CompressedConv1D, CompressedLayer
from lightning_amct.plan.layers import filter_prune_obstacle, weight_axes
from lightning_amct.prune import find_channel_groups, keep_count

pytest.importorskip("transformers")
from lightning_amct import zoo  # noqa: E402  (needs transformers)

RECIPES = Path(__file__).parents[2] / "recipes"
PRUNE_03 = (
    "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.3 ascend_optimized: false } } }\n"
)
SELECTIVE = "prune_config { n_out_of_m_pruner { l1_selective_prune { update_freq: 0 } } }"
CNNS = ("resnet", "resnet_bottleneck", "convnext", "mobilenet_v2", "regnet", "efficientnet")
#: GPT-2's Conv1D layers: c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj in each of the tiny model's 2 blocks.
GPT2_CONV1D = 4 * 2


def quant_config() -> object:
    """``recipes/int8.cfg``: the config for any model."""
    return load_config(RECIPES / "int8.cfg")


def test_int8_recipe_gives_each_layer_the_defaults_of_what_it_is_and_what_feeds_it() -> None:
    """``fixed_min`` only after a ReLU (a signed input keeps its negative values), per-channel
    weights for convolutions, per tensor for Linear, IFMR clips; a model without a Linear too."""
    convs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1))
    plan = resolve_plan(convs, quant_config(), torch.randn(2, 3, 8, 8))
    assert [plan[name].quant.fixed_min for name in ("0", "2", "3")] == [False, True, False]
    assert all(plan[name].quant.channel_wise and plan[name].quant.act_clip is None for name in ("0", "2", "3"))
    plan = resolve_plan(nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)), quant_config(), torch.randn(2, 6))
    assert [(plan[name].quant.fixed_min, plan[name].quant.channel_wise) for name in ("0", "2")] == [(False, False)] * 2


def train_steps(model: nn.Module, inputs: tuple[torch.Tensor], steps: int = 2, lr: float = 0.05) -> list[float]:
    """A few SGD steps on one batch with fixed random labels; the losses."""
    labels = torch.arange(inputs[0].shape[0]) % zoo.NUM_LABELS
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(*inputs), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def quietly(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the analysis names what it does not understand
        return function(*args, **kwargs)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_int8_quantization_trains(name: str) -> None:
    model, inputs = zoo.build(name)
    quietly(compress_model, model, quant_config(), inputs)
    plan = compression_state(model).plan
    quantized = [n for n, m in model.named_modules() if isinstance(m, CompressedLayer)]
    assert quantized and sorted(quantized) == sorted(plan.quantized)
    if name == "gpt2":
        assert sum(isinstance(model.get_submodule(n), CompressedConv1D) for n in quantized) == GPT2_CONV1D
    losses = train_steps(model, inputs)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(int(model.get_submodule(n).act_quant.calibrated_batches) == 1 for n in quantized)


def planned_producers(model: nn.Module, output_layer: str) -> dict[str, int]:
    """The convs, Linears and Conv1Ds that filter pruning may prune, with their output-channel axis."""
    return {
        n: weight_axes(m)[0] for n, m in model.named_modules() if n != output_layer and filter_prune_obstacle(m) is None
    }


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_channel_pruning_with_int8_gives_the_keep_counts_and_trains(name: str) -> None:
    model, inputs = zoo.build(name)
    original = {n: tuple(p.shape) for n, p in model.named_parameters()}
    outputs = model(*inputs).shape
    quietly(compress_model, model, PRUNE_03 + str(quant_config()), inputs)
    state = compression_state(model)
    groups = {group.key: group for group in quietly(find_channel_groups, zoo.build(name)[0], inputs)}
    # every pruned group keeps its keep count; every tensor axis of its members shrinks by the rest
    # (a grouped conv's weight holds the input channels of one block on axis 1), of each group at
    # its offset (a conv reading a concatenation: MobileViT's fusion)
    removed: dict[tuple[str, int], dict[int, int]] = {}
    for key, kept in state.kept_channels.items():
        group = groups[key]
        assert len(kept) == keep_count(group.num_channels, 0.3, False, group.blocks)
        for member in group.members:
            blocks = getattr(model.get_submodule(member.module), "groups", 1) if member.axis == 1 else 1
            cut = (group.num_channels - len(kept)) * member.width // blocks
            removed.setdefault((f"{member.module}.{member.tensor}".lstrip("."), member.axis), {})[member.offset] = cut
    expected = 0
    for param_name, shape in original.items():
        shape = [size - sum(removed.get((param_name, axis), {}).values()) for axis, size in enumerate(shape)]
        assert tuple(model.get_parameter(param_name).shape) == tuple(shape), param_name
        expected += torch.Size(shape).numel()
    assert sum(model.get_parameter(param_name).numel() for param_name in original) == expected
    # every conv/Linear the config plans loses channels in a CNN; the MLPs do in a transformer
    planned = planned_producers(zoo.build(name)[0], zoo.ZOO[name].output_layer)
    pruned = {
        n for n, axis in planned.items() if model.get_parameter(f"{n}.weight").shape[axis] < original[f"{n}.weight"][axis]
    }
    if name in CNNS:
        assert set(planned) <= pruned
    elif name == "mobilevit":  # convs, and each transformer with the conv before it; q, k, v split into heads
        assert pruned == {n for n in planned if not n.endswith(("query", "key", "value"))}
    elif name in ("vit", "bert"):
        assert {n for n in planned if n.endswith(("intermediate.dense", "mlp.fc1"))} <= pruned
    elif name == "gpt2":  # the MLP and residual widths; c_attn's output is split into q, k, v and stays whole
        assert len(planned) == GPT2_CONV1D and pruned == {n for n in planned if not n.endswith("attn.c_attn")}
    elif name == "llama":  # the residual stream through its RMSNorms and the SwiGLU MLPs; q, k, v split into heads
        assert pruned == {n for n in planned if not n.endswith(("q_proj", "k_proj", "v_proj"))}
        assert model.get_parameter("model.model.norm.weight").shape[0] < original["model.model.norm.weight"][0]
    assert model(*inputs).shape == outputs
    losses = train_steps(model, inputs, steps=2)
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_four_two_sparsity_holds_on_every_planned_layer(name: str) -> None:
    model, inputs = zoo.build(name)
    quietly(compress_model, model, SELECTIVE, inputs)
    planned = compression_state(model).plan.pruned("n_out_of_m")
    assert planned
    if name == "gpt2":
        assert sum(isinstance(model.get_submodule(n), CompressedConv1D) for n in planned) == GPT2_CONV1D
    model.train()
    model(*inputs)  # the first training batch chooses the masks
    for layer_name in planned:
        layer = model.get_submodule(layer_name)
        channels = layer.weight.shape[layer.in_axis]
        padding = (0, -channels % 4)  # a short last run of 3 keeps 2 too
        mask = nn.functional.pad(layer.weight_mask.movedim(layer.in_axis, -1), padding)
        runs = mask.reshape(*mask.shape[:-1], -1, 4)
        assert torch.all(runs.sum(-1) == 2), layer_name
        magnitude = nn.functional.pad(layer.weight.detach().abs().movedim(layer.in_axis, -1), padding, value=-1.0)
        magnitude = magnitude.reshape(runs.shape)
        kept = torch.where(runs == 1, magnitude, torch.inf).amin(-1)
        dropped = torch.where(runs == 0, magnitude, -torch.inf).amax(-1)
        assert torch.all(kept >= dropped), layer_name  # the two kept are the largest of their four


class ZooClassifier(pl.LightningModule):
    """A zoo model as a LightningModule: random batches of its input kind, fixed labels."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.model, (self.example_input_array,) = zoo.build(name)
        self.name = name

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(self(inputs), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        inputs = torch.cat([zoo.example_inputs(self.name, batch=2, seed=seed)[0] for seed in range(3)])
        labels = torch.arange(len(inputs)) % zoo.NUM_LABELS
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, labels), batch_size=2)


def test_bert_trains_pruned_and_quantized_in_a_lightning_trainer(trainer_factory) -> None:
    pl.seed_everything(0)
    module = ZooClassifier("bert")
    callback = CompressionCallback(PRUNE_03 + str(quant_config()), export=False)
    trainer = trainer_factory(max_epochs=1, callbacks=[callback])
    quietly(trainer.fit, module)
    state = compression_state(module)
    assert trainer.global_step == 3 and state.kept_channels
    intermediate = module.model.model.bert.encoder.layer[0].intermediate.dense
    assert isinstance(intermediate, CompressedLayer) and intermediate.out_features == 256 - round(256 * 0.3)
    assert int(intermediate.act_quant.calibrated_batches) == 1


def test_gpt2_resumes_pruned_and_quantized_from_a_checkpoint_and_loads_from_its_artifacts(
    trainer_factory, tmp_path: Path
) -> None:
    config = PRUNE_03 + str(quant_config())
    pl.seed_everything(0)
    module = ZooClassifier("gpt2")
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="trained")
    callbacks = [CompressionCallback(config, output_dir=tmp_path), checkpoint]
    trainer = trainer_factory(max_epochs=1, callbacks=callbacks, enable_checkpointing=True)
    quietly(trainer.fit, module)
    c_fc = module.model.model.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, CompressedConv1D) and c_fc.nf == c_fc.weight.shape[1] == 256 - round(256 * 0.3)
    assert int(c_fc.act_quant.calibrated_batches) == 1
    # the checkpoint's structure is rebuilt on a fresh module before its weights load
    resumed = ZooClassifier("gpt2")
    trainer = trainer_factory(max_epochs=2, callbacks=[CompressionCallback(config, export=False)])
    quietly(trainer.fit, resumed, ckpt_path=tmp_path / "trained.ckpt")
    assert trainer.global_step == 6
    assert compression_state(resumed).kept_channels == compression_state(module).kept_channels
    assert resumed.model.model.transformer.h[0].mlp.c_fc.weight.shape == c_fc.weight.shape
    # the compressed checkpoint of the first run loads into a fresh module and computes what was exported
    loaded = quietly(load_compressed, tmp_path / "model_compressed.pt", ZooClassifier("gpt2"))
    (inputs,) = zoo.example_inputs("gpt2", batch=4, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs), freeze_model(module).module(inputs), rtol=0, atol=0)
