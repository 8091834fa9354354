"""Channel pruning on whole architectures: ResNet, MobileNetV2, Inception/DenseNet, transformer.

Each model comes with its wiring, written by hand from the architecture: for every layer with
parameters, which channel group (named by its first producer) indexes its output and its input
channels, and at which offsets. The wiring is the oracle: from it and the keep counts the test
derives every pruned tensor (a slice of the original) and the exact parameter count.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from lightning_amct.plan.specs import PruneSpec
from lightning_amct.prune import apply_kept_channels, keep_count, prune_model
from lightning_amct.zoo import LogitsOnly

from patches_model import Patches

UNTOUCHED = "untouched"


def seg(key: str | None, channels: int, width: int = 1) -> tuple[str | None, int, int]:
    """``channels`` channels of group ``key`` (None: never pruned), ``width`` positions each."""
    return key, channels, width


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act=nn.ReLU) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act()


def downsample(cin: int, cout: int, stride: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = downsample(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + self.downsample(x))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, 4 * mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * mid)
        self.relu = nn.ReLU()
        self.downsample = downsample(cin, 4 * mid, stride) if stride != 1 or cin != 4 * mid else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.downsample(x))


class ResNetStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 32)
        self.layer1 = BasicBlock(32, 32, 1)
        self.layer2 = BasicBlock(32, 64, 2)
        self.layer3 = Bottleneck(64, 32, 2)
        self.layer4 = Bottleneck(128, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(self.flatten(self.pool(x)))


def conv_bn(wiring: dict, prefix: str, conv: str, bn: str, out: list, inp: list | None) -> None:
    wiring[f"{prefix}{conv}"] = (out, inp)
    wiring[f"{prefix}{bn}"] = (out, None)


def resnet_wiring() -> dict:
    stem, d2, d3 = [seg("stem.conv", 32)], [seg("layer2.conv2", 64)], [seg("layer3.conv3", 128)]
    w: dict = {}
    conv_bn(w, "stem.", "conv", "bn", stem, [seg(None, 3)])
    conv_bn(w, "layer1.", "conv1", "bn1", [seg("layer1.conv1", 32)], stem)
    conv_bn(w, "layer1.", "conv2", "bn2", stem, [seg("layer1.conv1", 32)])
    conv_bn(w, "layer2.", "conv1", "bn1", [seg("layer2.conv1", 64)], stem)
    conv_bn(w, "layer2.", "conv2", "bn2", d2, [seg("layer2.conv1", 64)])
    conv_bn(w, "layer2.downsample.", "0", "1", d2, stem)
    conv_bn(w, "layer3.", "conv1", "bn1", [seg("layer3.conv1", 32)], d2)
    conv_bn(w, "layer3.", "conv2", "bn2", [seg("layer3.conv2", 32)], [seg("layer3.conv1", 32)])
    conv_bn(w, "layer3.", "conv3", "bn3", d3, [seg("layer3.conv2", 32)])
    conv_bn(w, "layer3.downsample.", "0", "1", d3, d2)
    conv_bn(w, "layer4.", "conv1", "bn1", [seg("layer4.conv1", 32)], d3)
    conv_bn(w, "layer4.", "conv2", "bn2", [seg("layer4.conv2", 32)], [seg("layer4.conv1", 32)])
    conv_bn(w, "layer4.", "conv3", "bn3", d3, [seg("layer4.conv2", 32)])
    w["fc"] = ([seg(None, 10)], d3)
    return w


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = ConvBNAct(cin, hidden, 1, act=nn.ReLU6) if expand != 1 else nn.Identity()
        self.dw = ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
        self.project = ConvBNAct(hidden, cout, 1, act=nn.Identity)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return x + out if self.residual else out


class MobileNetV2Style(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 32, 3, 2, act=nn.ReLU6)
        self.b1 = InvertedResidual(32, 16, 1, 1)
        self.b2 = InvertedResidual(16, 24, 2, 6)
        self.b3 = InvertedResidual(24, 24, 1, 6)
        self.b4 = InvertedResidual(24, 32, 2, 6)
        self.head = ConvBNAct(32, 128, 1, act=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.b4(self.b3(self.b2(self.b1(self.stem(x))))))
        return self.classifier(torch.flatten(self.pool(x), 1))


def mobilenet_wiring() -> dict:
    stem, p2 = [seg("stem.conv", 32)], [seg("b2.project.conv", 24)]
    w: dict = {}
    conv_bn(w, "stem.", "conv", "bn", stem, [seg(None, 3)])
    conv_bn(w, "b1.dw.", "conv", "bn", stem, None)
    conv_bn(w, "b1.project.", "conv", "bn", [seg("b1.project.conv", 16)], stem)
    for block, cin, hidden, out in (
        ("b2", [seg("b1.project.conv", 16)], 96, p2),
        ("b3", p2, 144, p2),
        ("b4", p2, 144, [seg("b4.project.conv", 32)]),
    ):
        expanded = [seg(f"{block}.expand.conv", hidden)]
        conv_bn(w, f"{block}.expand.", "conv", "bn", expanded, cin)
        conv_bn(w, f"{block}.dw.", "conv", "bn", expanded, None)
        conv_bn(w, f"{block}.project.", "conv", "bn", out, expanded)
    conv_bn(w, "head.", "conv", "bn", [seg("head.conv", 128)], [seg("b4.project.conv", 32)])
    w["classifier.1"] = ([seg(None, 10)], [seg("head.conv", 128)])
    return w


class DenseLayer(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(cin)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=False)


class InceptionDense(nn.Module):
    """An Inception block (3 branches concatenated), 2 DenseNet layers, a transition, an MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, 32)
        self.b1 = ConvBNAct(32, 16, 1)
        self.b2a = ConvBNAct(32, 16, 1)
        self.b2b = ConvBNAct(16, 32, 3)
        self.b3pool = nn.MaxPool2d(3, 1, 1)
        self.b3 = ConvBNAct(32, 16, 1)
        self.d1 = DenseLayer(64, 16)
        self.d2 = DenseLayer(80, 16)
        self.trans = DenseLayer(96, 64, 1)
        self.down = nn.AvgPool2d(2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(64 * 4, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2b(self.b2a(x)), self.b3(self.b3pool(x))], dim=1)
        x = torch.cat([x, self.d1(x)], dim=1)
        x = torch.cat((x, self.d2(x)), 1)
        x = torch.flatten(self.pool(self.down(self.trans(x))), 1)
        return self.fc2(self.act(self.fc1(x)))


def inception_wiring() -> dict:
    stem = [seg("stem.conv", 32)]
    cat1 = [seg("b1.conv", 16), seg("b2b.conv", 32), seg("b3.conv", 16)]
    cat2 = [*cat1, seg("d1.conv", 16)]
    cat3 = [*cat2, seg("d2.conv", 16)]
    w: dict = {}
    conv_bn(w, "stem.", "conv", "bn", stem, [seg(None, 3)])
    conv_bn(w, "b1.", "conv", "bn", [seg("b1.conv", 16)], stem)
    conv_bn(w, "b2a.", "conv", "bn", [seg("b2a.conv", 16)], stem)
    conv_bn(w, "b2b.", "conv", "bn", [seg("b2b.conv", 32)], [seg("b2a.conv", 16)])
    conv_bn(w, "b3.", "conv", "bn", [seg("b3.conv", 16)], stem)
    for layer, cin, out in (("d1", cat1, "d1.conv"), ("d2", cat2, "d2.conv"), ("trans", cat3, "trans.conv")):
        w[f"{layer}.bn"] = (cin, None)
        w[f"{layer}.conv"] = ([seg(out, 64 if layer == "trans" else 16)], cin)
    w["fc1"] = ([seg("fc1", 32)], [seg("trans.conv", 64, width=4)])
    w["fc2"] = ([seg(None, 10)], [seg("fc1", 32)])
    return w


class SelfAttention(nn.Module):
    """Multi-head self-attention written out: the head split is a view that pins q, k and v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.heads, 16).transpose(1, 2) for f in (self.q, self.k, self.v))
        attn = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, -1))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, attention: nn.Module) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = attention
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.attn, nn.MultiheadAttention):
            return self.attn(x, x, x, need_weights=False)[0]
        return self.attn(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """(B, T, 16) tokens -> Linear embedding -> one pre-norm encoder block -> LayerNorm -> mean -> head."""

    def __init__(self, builtin_attention: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        attention = nn.MultiheadAttention(64, 4, batch_first=True) if builtin_attention else SelfAttention(64, 4)
        self.block = EncoderBlock(64, attention)
        self.norm = nn.LayerNorm(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.block(self.embed(x))).mean(dim=1))


def transformer_wiring() -> dict:
    """The residual stream is one group (embed, attn.proj, fc2) running through every LayerNorm."""
    stream, hidden, fixed = [seg("embed", 64)], [seg("block.fc1", 256)], [seg(None, 64)]
    w = {"embed": (stream, [seg(None, 16)]), "block.fc1": (hidden, stream), "block.fc2": (stream, hidden)}
    w.update({f"block.attn.{name}": (fixed, stream) for name in "qkv"})
    w["block.attn.proj"] = (stream, fixed)
    w.update({name: (stream, None) for name in ("block.ln1", "block.ln2", "norm")})
    w["head"] = ([seg(None, 10)], stream)
    return w


def mha_transformer_wiring() -> dict:
    """nn.MultiheadAttention is not understood: the residual stream stays whole, the MLP is pruned."""
    fixed, hidden = [seg(None, 64)], [seg("block.fc1", 256)]
    w = {"embed": (fixed, [seg(None, 16)]), "block.fc1": (hidden, fixed), "block.fc2": (fixed, hidden)}
    w.update({name: (fixed, None) for name in ("block.ln1", "block.ln2", "norm")})
    w["block.attn"] = w["block.attn.out_proj"] = UNTOUCHED
    w["head"] = ([seg(None, 10)], fixed)
    return w


CASES = {
    "resnet": (ResNetStyle, resnet_wiring, (2, 3, 16, 16)),
    "mobilenetv2": (MobileNetV2Style, mobilenet_wiring, (2, 3, 16, 16)),
    "inception_densenet": (InceptionDense, inception_wiring, (2, 3, 16, 16)),
    "transformer": (TinyTransformer, transformer_wiring, (2, 5, 16)),
    "transformer_mha": (lambda: TinyTransformer(builtin_attention=True), mha_transformer_wiring, (2, 5, 16)),
}


def positions(segments: list, kept: dict[str, list[int]]) -> list[int]:
    """Positions along an axis that survive, from the wiring's segments and the kept channels."""
    result, offset = [], 0
    for key, channels, width in segments:
        for c in kept.get(key, range(channels)) if key is not None else range(channels):
            result += range(offset + c * width, offset + (c + 1) * width)
        offset += channels * width
    return result


def expected_tensor(name: str, tensor: torch.Tensor, wiring_entry, kept: dict[str, list[int]]) -> torch.Tensor:
    if wiring_entry == UNTOUCHED:
        return tensor
    out_segments, in_segments = wiring_entry
    expected = tensor[positions(out_segments, kept)]
    if name == "weight" and in_segments is not None:
        expected = expected[:, positions(in_segments, kept)]
    return expected


def group_sizes(wiring: dict) -> dict[str, int]:
    entries = [e for e in wiring.values() if e != UNTOUCHED]
    return {key: n for out, inp in entries for key, n, _ in [*out, *(inp or [])] if key is not None}


def filter_specs(model: nn.Module, ratio: float, ascend: bool) -> dict[str, PruneSpec]:
    layers = (nn.Conv2d, nn.Linear)
    return {n: PruneSpec("filter", ratio, ascend) for n, m in model.named_modules() if isinstance(m, layers)}


def prune_quietly(model: nn.Module, specs: dict, example: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prune_model(model, specs, example)


@pytest.mark.parametrize("ascend", [False, True])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("case", list(CASES))
def test_pruned_model_matches_the_wiring(case: str, ratio: float, ascend: bool) -> None:
    build, wiring_of, input_shape = CASES[case]
    torch.manual_seed(0)
    model, example, wiring = build(), torch.randn(input_shape), wiring_of()
    original = copy.deepcopy(model)

    result = prune_quietly(model, filter_specs(model, ratio, ascend), example)

    keeps = {key: keep_count(n, ratio, ascend) for key, n in group_sizes(wiring).items()}
    assert {key: len(channels) for key, channels in result.kept.items()} == {
        key: keep for key, keep in keeps.items() if keep < group_sizes(wiring)[key]
    }
    assert set(wiring) == {name for name, m in model.named_modules() if list(m.parameters(recurse=False))}
    expected_params = 0
    for layer, entry in wiring.items():
        old, new = original.get_submodule(layer), model.get_submodule(layer)
        buffers = [(name, b) for name, b in old.named_buffers(recurse=False) if b.dim() > 0]
        for name, tensor in [*old.named_parameters(recurse=False), *buffers]:
            expected = expected_tensor(name, tensor, entry, result.kept)
            assert torch.equal(getattr(new, name), expected), f"{layer}.{name}"
            expected_params += expected.numel() if isinstance(tensor, nn.Parameter) else 0
    assert sum(p.numel() for p in model.parameters()) == expected_params
    assert result.report[-1]["params_after"] == expected_params

    model.train()
    model(example).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_apply_kept_channels_rebuilds_the_same_model(case: str) -> None:
    build, _, input_shape = CASES[case]
    torch.manual_seed(1)
    model, example = build(), torch.randn(input_shape)
    fresh = copy.deepcopy(model)
    result = prune_quietly(model, filter_specs(model, 0.5, False), example)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        apply_kept_channels(fresh, result.kept, example)

    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    fresh.load_state_dict(model.state_dict())
    model.eval(), fresh.eval()
    assert torch.equal(fresh(example), model(example))


def test_depthwise_convs_shrink_with_their_input() -> None:
    model = MobileNetV2Style()
    prune_quietly(model, filter_specs(model, 0.5, False), torch.randn(2, 3, 16, 16))
    for block, hidden in ((model.b2, 96), (model.b3, 144), (model.b4, 144)):
        dw = block.dw.conv
        assert dw.groups == dw.in_channels == dw.out_channels == block.expand.conv.out_channels == hidden // 2
        assert dw.weight.shape == (hidden // 2, 1, 3, 3)


def warning_texts(model: nn.Module, example: torch.Tensor) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        prune_model(model, {}, example)
    return [str(w.message) for w in record]


def test_attention_is_reported_by_name_and_pins_its_groups() -> None:
    texts = warning_texts(TinyTransformer(builtin_attention=True), torch.randn(2, 5, 16))
    assert texts == [  # the input projection of nn.MultiheadAttention is a bare parameter
        "channel pruning does not understand node 'linear_1' (linear in block.attn): its weight is "
        "'block.attn.in_proj_weight', not a layer's own 'weight'; channel groups ['embed'] stay whole"
    ]
    texts = warning_texts(TinyTransformer(), torch.randn(2, 5, 16))
    assert [t.split(":")[0] for t in texts] == [
        f"channel pruning does not understand node '{node}' (view in block.attn)"
        for node in ("view", "view_1", "view_2")
    ]
    assert [t.split("; ")[-1] for t in texts] == [f"channel groups ['block.attn.{x}'] stay whole" for x in "qkv"]


def test_channels_pruned_through_patches_are_the_ones_removed_everywhere() -> None:
    """Channels that carry zeros through MobileViT-style patches (the conv writes 0, the Linear
    adds 0): the model without them computes the same, so every tensor lost the same channels."""
    torch.manual_seed(0)
    model, example = Patches().eval(), torch.randn(2, 3, 4, 4)
    dropped = [1, 4, 6]
    with torch.no_grad():
        for tensor in (model.a.weight, model.a.bias, model.mix.weight, model.mix.bias):
            tensor[dropped] = 0.0
        expected = model(example)
    kept = [c for c in range(8) if c not in dropped]
    apply_kept_channels(model, {"a": kept}, example)
    assert model.b.weight.shape[1] == model.mix.weight.shape[1] == len(kept)
    torch.testing.assert_close(model(example), expected)


def test_mobilevit_prunes_its_transformer_with_the_conv_before_it() -> None:
    """transformers' MobileViT: each transformer's residual stream is the channels of the 1x1 conv
    before it, unfolded into patches, and is pruned with it; the pruned model runs."""
    from transformers import MobileViTConfig, MobileViTForImageClassification

    config = MobileViTConfig(
        image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 48],
        num_attention_heads=2, num_labels=4, expand_ratio=2.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model, example = LogitsOnly(MobileViTForImageClassification(config)).eval(), torch.randn(2, 3, 32, 32)
    layer = "model.mobilevit.encoder.layer.2"
    prune_quietly(model, filter_specs(model, 0.5, False), example)
    stream = {name: model.get_submodule(f"{layer}.{name}").weight.shape[axis] for name, axis in STREAM.items()}
    assert stream == dict.fromkeys(STREAM, 8)  # of 16
    assert model(example).shape == (2, 4)


#: Layers of a MobileViT layer that read or write its transformer's channels (16 of them in the
#: configuration above), with the weight axis that holds them.
STREAM = {
    "conv_1x1.convolution": 0,
    "transformer.layer.0.attention.attention.query": 1,
    "transformer.layer.0.attention.output.dense": 0,
    "transformer.layer.0.intermediate.dense": 1,
    "transformer.layer.0.output.dense": 0,
    "conv_projection.convolution": 1,
}
