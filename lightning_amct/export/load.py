"""``load_compressed``: a runnable model from a compressed checkpoint.

The checkpoint holds tensors and plain data only (it loads with ``weights_only=True``), no code,
so the architecture comes from a model instance the caller constructs, as for any ``state_dict``.
On that fresh instance the loader replays what training did to the structure (the recorded plan
and kept channels, through :func:`~lightning_amct.modules.apply.apply_plan`: the same channels are
physically pruned), then swaps each compressed layer for a
:class:`~lightning_amct.export.fake_quant_layer.FakeQuantLayer` built from the stored integers, and
takes each BatchNorm that export folded into the conv before it out as export did (``nn.Identity``,
or an identity normalization for a subclass with its own ``forward``): the checkpoint's weights
and biases have it folded in, so this is the one structure they are consistent with. The
remaining float tensors load strictly. The result computes what the fake-quant model computes (up
to the rounding differences :mod:`~lightning_amct.export.fake_quant_layer` describes), in eval mode.

Example::

    model = load_compressed("export/model_compressed.pt", DemoClassifier())
    logits = model(images)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_amct.export.checkpoint import DIGEST, FORMAT, VERSION, content_digest, decode_layer, inputs_from_specs
from lightning_amct.export.fake_quant_layer import FakeQuantLayer
from lightning_amct.export.freeze import attach_grids, remove_folded_batchnorm
from lightning_amct.export.integer import ActivationGrid
from lightning_amct.export.uncompiled import compiled_modules_unwrapped
from lightning_amct.modules.apply import CompressionState, apply_plan, compression_state
from lightning_amct.modules.compressed_layers import CompressedLayer
from lightning_amct.modules.input_norm import restore_norms
from lightning_amct.modules.input_pool import restore_pools
from lightning_amct.modules.input_relu import restore_relus
from lightning_amct.modules.output_quant import detach_output_quantizers
from lightning_amct.modules.replace import replace_module


class CheckpointMismatchError(ValueError):
    """The compressed checkpoint does not fit the model instance it is loaded into."""


def load_compressed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Load a ``<prefix>_compressed.pt`` written by ``save_compressed`` into ``model``.

    Args:
        path: the checkpoint file.
        model: a freshly constructed, uncompressed instance of the class that was saved
            (e.g. ``DemoClassifier()`` with the same constructor arguments); it, or modules in it,
            may be wrapped by ``torch.compile`` (:mod:`~lightning_amct.export.uncompiled`). It is
            changed in place and returned.

    Returns:
        ``model``, physically pruned, with frozen quantized layers, in eval mode.

    Raises:
        TypeError: ``model`` is not a module (a class name, say).
        ValueError: the file is not a compressed checkpoint of a known version, or is damaged
            (truncated, or its contents do not match the digest saved with them); ``model`` is
            None (the checkpoint holds no code to build one) or already compressed.
        CheckpointMismatchError: the checkpoint was saved from another model or config (layer
            names, types, channel counts or tensor shapes differ); the message says what differs.
    """
    path = Path(path)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"load_compressed loads into a model instance (a freshly constructed nn.Module), got a "
            f"{type(model).__name__}: {model!r}"
        )
    checkpoint = _read(path)
    if model is None:
        raise ValueError(
            f"{path}: load_compressed needs a model instance to rebuild the architecture: pass a "
            f"freshly constructed {checkpoint['model_class']} (with the constructor arguments it was trained with) "
            "as model=...; the checkpoint stores tensors only, no code"
        )
    with compiled_modules_unwrapped(model) as uncompiled:
        _load(uncompiled, path, checkpoint)
    return model.eval()


def _load(model: nn.Module, path: Path, checkpoint: dict[str, Any]) -> None:
    """:func:`load_compressed` into ``model``, its compiled submodules unwrapped."""
    saved_class = checkpoint["model_class"]
    if compression_state(model) is not None:
        raise ValueError(f"{path}: pass a freshly constructed {type(model).__name__}; this one is already compressed")
    mismatch = f"{path} (saved from {saved_class}) does not fit this {type(model).__name__}"
    state = CompressionState.from_record(checkpoint["compression"])
    try:
        apply_plan(model, state.plan, inputs_from_specs(checkpoint["example_inputs"]), state.kept_channels,
                   state.config_text)  # fmt: skip
        _freeze_layers(model, checkpoint)
    except (ValueError, RuntimeError, AttributeError) as exc:
        raise CheckpointMismatchError(f"{mismatch}: {exc}") from exc
    _load_float_state(model, checkpoint["float_state"], mismatch)


def _read(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # torch.load's errors on a damaged file: EOFError, OSError, KeyError...
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'the file ends early'}"
        raise ValueError(f"{path} cannot be read as a compressed checkpoint, truncated or damaged? ({reason})") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"{path} is not a lightning-amct compressed checkpoint (written by save_compressed)")
    if checkpoint.get("version") != VERSION:
        raise ValueError(
            f"{path}: compressed checkpoint version {checkpoint.get('version')!r}, this loader reads {VERSION}"
        )
    saved = checkpoint.get(DIGEST)  # (none in checkpoints written before it was added)
    if saved is not None and saved != content_digest(checkpoint):
        raise ValueError(
            f"{path} is damaged: its contents do not match the SHA-256 saved with them (changed on disk or in a "
            "copy after it was written); export it again from the trained model or its training checkpoint"
        )
    return checkpoint


def _freeze_layers(model: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Folded BatchNorms -> Identity; compressed layers -> FakeQuantLayer from the stored integers;
    output quantizers -> fixed grids (none where the saved model's never calibrated)."""
    sites = set(detach_output_quantizers(model))
    restore_norms(model)
    restore_pools(model)
    restore_relus(model)
    for bn_name in checkpoint["folded_batchnorms"]:
        found = model.get_submodule(bn_name)
        if not isinstance(found, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"'{bn_name}' was a folded BatchNorm, the model has a {type(found).__name__}")
        remove_folded_batchnorm(model, bn_name)
    compressed = {name for name, module in model.named_modules() if isinstance(module, CompressedLayer)}
    stored = set(checkpoint["layers"])
    if compressed != stored:
        raise ValueError(f"compressed layers differ: model {sorted(compressed)}, checkpoint {sorted(stored)}")
    for name, entry in checkpoint["layers"].items():
        layer = model.get_submodule(name)
        replace_module(model, name, FakeQuantLayer(layer.to_float(), decode_layer(name, entry)))
    grids = {site: ActivationGrid(**grid) for site, grid in checkpoint.get("outputs", {}).items()}
    if not set(grids) <= sites:
        raise ValueError(f"output quantizers differ: model {sorted(sites)}, checkpoint {sorted(grids)}")
    attach_grids(model, grids)


def _load_float_state(model: nn.Module, float_state: dict[str, torch.Tensor], mismatch: str) -> None:
    """Load the float tensors strictly; the frozen layers' own tensors come from the integers."""
    frozen = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, FakeQuantLayer))
    try:
        result = model.load_state_dict(float_state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointMismatchError(f"{mismatch}: {exc}") from exc
    missing = [key for key in result.missing_keys if not key.startswith(frozen)]
    if missing or result.unexpected_keys:
        raise CheckpointMismatchError(
            f"{mismatch}: tensors missing from the checkpoint: {missing[:5]}, "
            f"unexpected in it: {result.unexpected_keys[:5]}"
        )
