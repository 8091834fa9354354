"""Real architectures from Hugging Face ``transformers``, built from small configs: the model zoo.

Tests and benchmarks use these to check that compression works on model code this project did not
write: ResNet (basic and bottleneck blocks), ConvNeXt (LayerNorm subclass over channels, depthwise
7x7, layer scale), MobileNetV2 (ReLU6, depthwise, TF-style padding), RegNet-Y (grouped convs,
squeeze-excite gates), EfficientNet (a depthwise ``Conv2d`` subclass, SiLU, squeeze-excite), ViT
(attention), MobileViT (convs and attention over patches of the feature map), BERT, a GPT-2
decoder (``Conv1D`` layers) and a Llama decoder (RMSNorm, SwiGLU, grouped-query attention).
Weights are randomly initialised from a fixed seed and nothing is downloaded. ``transformers`` is
an optional dependency (the ``zoo`` extra); importing this module does not import it, :func:`build`
does.

``transformers`` has no MobileNetV3: :class:`MobileNetV3` is written here, in the layout of the
common implementations (hard-swish, squeeze-excite gates ``x * hardsigmoid(se(x))``, depthwise
convs with 3x3 and 5x5 kernels).

Each model is wrapped so that ``forward`` returns the logits tensor, as a LightningModule would use
it (``self.model(x).logits``). Two sizes: ``"tiny"`` (fast enough for unit tests) and ``"bench"``
(the published architecture's widths and depths, e.g. ResNet-18, RegNetX-200MF, ConvNeXt-atto,
EfficientNet-B0, MobileNetV3-small, MobileViT-XXS), for benchmarks.

Example:
    >>> from lightning_amct import zoo
    >>> model, inputs = zoo.build("resnet")
    >>> model(*inputs).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Size = Literal["tiny", "bench"]

NUM_LABELS = 10
IMAGE = 64
VOCAB = 128
SEQUENCE = 16


@dataclass(frozen=True)
class ZooEntry:
    """How to build one zoo model.

    Attributes:
        kind: ``"image"`` (inputs ``(B, 3, H, W)`` float) or ``"text"`` (token ids ``(B, T)``).
        make: ``make(size)`` returns the ``transformers`` model (with ``num_labels`` heads).
        image_size: input height and width of an image model.
        output_layer: the name, inside the wrapper, of the layer that produces the logits.
        tensor_output: the model returns the logits tensor (a model written here), not an object.
    """

    kind: Literal["image", "text"]
    make: Callable[[Size], nn.Module]
    output_layer: str
    image_size: int = IMAGE
    tensor_output: bool = False


class LogitsOnly(nn.Module):
    """A classification model whose ``forward`` returns only the logits.

    Args:
        model: the model.
        tensor_output: the model returns the logits tensor itself (else an output object with
            ``logits``, as ``transformers`` models do).
    """

    def __init__(self, model: nn.Module, tensor_output: bool = False) -> None:
        super().__init__()
        self.model = model
        self.tensor_output = tensor_output

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = self.model(inputs)
        return outputs if self.tensor_output else outputs.logits


def _resnet(layer_type: str) -> Callable[[Size], nn.Module]:
    def make(size: Size) -> nn.Module:
        from transformers import ResNetConfig, ResNetForImageClassification

        if size == "bench":  # ResNet-18 / ResNet-50
            widths = [64, 128, 256, 512] if layer_type == "basic" else [256, 512, 1024, 2048]
            depths = [2, 2, 2, 2] if layer_type == "basic" else [3, 4, 6, 3]
            embedding = 64
        else:
            widths = [16, 32, 64, 128] if layer_type == "basic" else [32, 64, 128, 256]
            depths, embedding = [1, 1, 1, 1], 16
        config = ResNetConfig(
            embedding_size=embedding, hidden_sizes=widths, depths=depths, layer_type=layer_type, num_labels=NUM_LABELS
        )
        return ResNetForImageClassification(config)

    return make


def _convnext(size: Size) -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    # ConvNeXt-atto; the layer scale starts at 0.1 (not 1e-6) so the blocks are not near-identities
    widths, depths = ([40, 80, 160, 320], [2, 2, 6, 2]) if size == "bench" else ([16, 32, 64, 128], [1, 1, 1, 1])
    config = ConvNextConfig(hidden_sizes=widths, depths=depths, layer_scale_init_value=0.1, num_labels=NUM_LABELS)
    return ConvNextForImageClassification(config)


def _unit_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm scales at 1 and shifts at 0, as torch initialises them.

    ``transformers`` draws the BatchNorm scales of its EfficientNet from N(0, 0.02): at random init
    every layer then shrinks the activations fifty-fold, and every input gives the same logits.
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def _mobilenet_v2(size: Size) -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(
        depth_multiplier=1.0 if size == "bench" else 0.35, image_size=IMAGE, num_labels=NUM_LABELS
    )
    return MobileNetV2ForImageClassification(config)


def _regnet(size: Size) -> nn.Module:
    from transformers import RegNetConfig, RegNetForImageClassification

    if size == "bench":  # RegNetY-200MF
        config = RegNetConfig(
            embedding_size=32, hidden_sizes=[24, 56, 152, 368], depths=[1, 1, 4, 7], groups_width=8, layer_type="y"
        )
    else:
        config = RegNetConfig(
            embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], groups_width=8, layer_type="y"
        )
    config.num_labels = NUM_LABELS
    return RegNetForImageClassification(config)


def _efficientnet(size: Size) -> nn.Module:
    from transformers import EfficientNetConfig, EfficientNetForImageClassification

    # B0: width 1.0, depth 1.0, head 1280 channels; the head width must be round_filters(1280)
    width, depth, head = (1.0, 1.0, 1280) if size == "bench" else (0.25, 0.2, 320)
    config = EfficientNetConfig(
        width_coefficient=width, depth_coefficient=depth, hidden_dim=head, image_size=IMAGE, num_labels=NUM_LABELS
    )
    return _unit_batchnorm(EfficientNetForImageClassification(config))


def _make_divisible(channels: float, divisor: int = 8) -> int:
    """``channels`` rounded to a multiple of ``divisor``, never below 90% of it (the MobileNet rule)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


class ConvNormActivation(nn.Sequential):
    """Conv (no bias), BatchNorm, then an activation module (none for a projection)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: type | None = None):
        layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        super().__init__(*layers, *([act()] if act is not None else []))


class SqueezeExcite(nn.Module):
    """``x * hardsigmoid(fc2(relu(fc1(mean(x)))))``: a gate per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = _make_divisible(channels / 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """Expand (1x1), depthwise (k x k), squeeze-excite, project (1x1); a shortcut where shapes allow."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, se: bool, act: type, stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvNormActivation(cin, expanded, 1, act=act))
        layers.append(ConvNormActivation(expanded, expanded, kernel, stride, groups=expanded, act=act))
        if se:
            layers.append(SqueezeExcite(expanded))
        layers.append(ConvNormActivation(expanded, cout, 1))
        self.block = nn.Sequential(*layers)
        self.shortcut = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.shortcut else y


#: MobileNetV3-small: kernel, expanded channels, output channels, squeeze-excite, hard-swish, stride.
_MOBILENET_V3_SMALL = [
    (3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1),
]  # fmt: skip


class MobileNetV3(nn.Module):
    """MobileNetV3-small (``width`` scales the channels; ``blocks`` picks rows of the block table).

    Example:
        >>> MobileNetV3(width=0.5, blocks=(0, 3), num_classes=10)(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 10])
    """

    def __init__(self, width: float = 1.0, blocks: tuple[int, ...] | None = None, num_classes: int = 1000) -> None:
        super().__init__()
        rows = [_MOBILENET_V3_SMALL[i] for i in blocks] if blocks is not None else _MOBILENET_V3_SMALL
        stem = _make_divisible(16 * width)
        layers: list[nn.Module] = [ConvNormActivation(3, stem, 3, 2, act=nn.Hardswish)]
        cin = stem
        for kernel, expanded, cout, se, hard_swish, stride in rows:
            expanded, cout = _make_divisible(expanded * width), _make_divisible(cout * width)
            act = nn.Hardswish if hard_swish else nn.ReLU
            layers.append(InvertedResidual(cin, kernel, expanded, cout, se, act, stride))
            cin = cout
        last = 6 * cin
        layers.append(ConvNormActivation(cin, last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = _make_divisible(1024 * width) if width < 1 else 1024
        self.classifier = nn.Sequential(
            nn.Linear(last, hidden), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(hidden, num_classes)
        )
        for module in self.modules():  # as torchvision initialises its MobileNetV3
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _mobilenet_v3(size: Size) -> nn.Module:
    if size == "bench":  # MobileNetV3-small
        return MobileNetV3(num_classes=NUM_LABELS)
    return MobileNetV3(width=0.5, blocks=(0, 1, 3, 4, 8), num_classes=NUM_LABELS)


def _vit(size: Size) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    hidden, layers, heads = (192, 12, 3) if size == "bench" else (64, 2, 4)  # ViT-Ti
    config = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        image_size=IMAGE,
        patch_size=8,
        num_labels=NUM_LABELS,
    )
    return ViTForImageClassification(config)


def _mobilevit(size: Size) -> nn.Module:
    from transformers import MobileViTConfig, MobileViTForImageClassification

    if size == "bench":  # MobileViT-XXS
        widths = {"hidden_sizes": [64, 80, 96], "neck_hidden_sizes": [16, 16, 24, 48, 64, 80, 320]}
    else:
        widths = {"hidden_sizes": [16, 24, 32], "neck_hidden_sizes": [8, 8, 16, 16, 24, 24, 48]}
    config = MobileViTConfig(image_size=IMAGE, num_attention_heads=2, expand_ratio=2.0, num_labels=NUM_LABELS, **widths)
    return MobileViTForImageClassification(config)


def _bert(size: Size) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    hidden, layers, heads = (128, 2, 2) if size == "bench" else (64, 2, 4)  # BERT-tiny
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=64,
        num_labels=NUM_LABELS,
    )
    return BertForSequenceClassification(config)


def _gpt2(size: Size) -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    hidden, layers, heads = (128, 2, 2) if size == "bench" else (64, 2, 4)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=64,
        num_labels=NUM_LABELS,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        use_cache=False,
    )
    return GPT2ForSequenceClassification(config)


def _llama(size: Size) -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    width = 128 if size == "bench" else 64
    blocks = {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}  # grouped-query attention
    sizes = {"vocab_size": VOCAB, "hidden_size": width, "intermediate_size": 4 * width, "max_position_embeddings": 64}
    config = LlamaConfig(**sizes, **blocks, num_labels=NUM_LABELS, pad_token_id=0, use_cache=False)
    return LlamaForSequenceClassification(config)


ZOO: dict[str, ZooEntry] = {
    "resnet": ZooEntry("image", _resnet("basic"), "model.classifier.1"),
    "resnet_bottleneck": ZooEntry("image", _resnet("bottleneck"), "model.classifier.1"),
    "convnext": ZooEntry("image", _convnext, "model.classifier"),
    "mobilenet_v2": ZooEntry("image", _mobilenet_v2, "model.classifier"),
    "regnet": ZooEntry("image", _regnet, "model.classifier.1"),
    "efficientnet": ZooEntry("image", _efficientnet, "model.classifier"),
    "mobilenet_v3": ZooEntry("image", _mobilenet_v3, "model.classifier.3", tensor_output=True),
    "vit": ZooEntry("image", _vit, "model.classifier"),
    "mobilevit": ZooEntry("image", _mobilevit, "model.classifier"),
    "bert": ZooEntry("text", _bert, "model.classifier"),
    "gpt2": ZooEntry("text", _gpt2, "model.score"),
    "llama": ZooEntry("text", _llama, "model.score"),
}


def example_inputs(name: str, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor]:
    """Inputs of the shape ``name`` takes: images ``(batch, 3, 64, 64)`` or token ids ``(batch, 16)``."""
    entry = ZOO[name]
    generator = torch.Generator().manual_seed(seed)
    if entry.kind == "text":  # token 0 is the decoders' padding token: keep it out
        return (torch.randint(1, VOCAB, (batch, SEQUENCE), generator=generator),)
    return (torch.randn(batch, 3, entry.image_size, entry.image_size, generator=generator),)


def build(name: str, size: Size = "tiny", seed: int = 0, batch: int = 2) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Build zoo model ``name`` (see :data:`ZOO`) in eval mode, with example inputs.

    BatchNorm running statistics are those of a few batches of random inputs, as a trained model's
    are of its data: with the initial ones (mean 0, variance 1) nothing normalizes in eval mode,
    and in the deeper CNNs the activations shrink layer by layer until every input gives the same
    logits.

    Raises:
        KeyError: ``name`` is not in the zoo (the message lists the names).
        ImportError: ``transformers`` is not installed (``pip install lightning-amct[zoo]``).
    """
    if name not in ZOO:
        raise KeyError(f"no zoo model {name!r} (zoo models: {', '.join(ZOO)})")
    logging.getLogger("transformers").setLevel(logging.ERROR)  # its notes on torchvision and configs
    torch.manual_seed(seed)
    model = LogitsOnly(ZOO[name].make(size), ZOO[name].tensor_output)
    _settle_batchnorm(model, name, seed)
    return model.eval(), example_inputs(name, batch, seed)


@torch.no_grad()
def _settle_batchnorm(model: nn.Module, name: str, seed: int, batches: int = 4) -> None:
    """BatchNorm running statistics: the plain average over ``batches`` batches of random inputs."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average
    model.train()
    for index in range(batches):
        model(*example_inputs(name, 8, seed + 1000 + index))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
