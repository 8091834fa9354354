"""The checkpoint a running ``fit/validate/test/predict`` call restores, and the record it holds.

The callback rebuilds the compressed structure (kept channels, quantizers, masks) from the
checkpoint's record before Lightning loads the checkpoint's weights, and under
``ModelParallelStrategy`` before ``configure_model`` shards the model: that is, in ``setup``.
Lightning 2.6 passes the ``ckpt_path`` of those calls to ``Trainer._run`` and sets
``trainer.ckpt_path`` only when it loads the file, after ``setup`` (where it is still None, or
the value of an earlier call). :func:`checkpoint_to_restore` therefore reads the argument of the
``Trainer._run`` call of this trainer that is running on the stack (its value is already
resolved: ``"last"`` and ``"best"`` are paths by then), and falls back to ``trainer.ckpt_path``,
which a user may set before calling ``fit``. ``tests/callback/test_restore.py`` runs every entry
point, so a Lightning release that passes the path differently fails there, not silently.

The record is ``checkpoint["lightning_amct"]`` (plan, kept channel indices, config text) in a
checkpoint file, or in the ``meta.pt`` of a distributed checkpoint directory, where Lightning
keeps everything but the sharded tensors. Only the record is read: a file is memory-mapped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem

CHECKPOINT_KEY = "lightning_amct"
_SHARDED_METADATA = "meta.pt"  # in a distributed checkpoint directory: all but the sharded tensors


def checkpoint_to_restore(trainer: pl.Trainer) -> str | None:
    """The checkpoint path the Trainer will restore after ``setup``, or None when it restores none."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is pl.Trainer._run.__code__ and frame.f_locals.get("self") is trainer:
            path = frame.f_locals.get("ckpt_path")
            return str(path) if path else None
        frame = frame.f_back
    return str(trainer.ckpt_path) if trainer.ckpt_path else None


#: Names that only a compressed layer's state has (its quantizers, 4:2 mask and counters).
_COMPRESSED_STATE = (".act_quant.", ".weight_quant.", ".output_quant.", ".weight_mask", ".mask_batches")


def read_record(path: str) -> dict[str, Any] | None:
    """The compression record of the checkpoint at ``path`` (a file or a distributed checkpoint
    directory), or None for a checkpoint trained without the callback."""
    return _load(path).get(CHECKPOINT_KEY)


def checkpoint_problem(path: str) -> str | None:
    """Why the local file at ``path`` is no Lightning checkpoint (unreadable, truncated, another
    kind of file), or None where it is one, or where only Lightning's own loading can tell (a
    checkpoint whose hyperparameters hold objects that a weights-only load refuses)."""
    try:
        checkpoint = _load(path)
    except Exception as error:  # the unpickler and the zip reader fail in many ways
        if "Weights only load failed" in str(error):
            return None
        return f"{path} cannot be read as a checkpoint ({type(error).__name__}: {str(error).splitlines()[0]})"
    if isinstance(checkpoint, dict) and "pytorch-lightning_version" in checkpoint:
        return None
    if isinstance(checkpoint, dict) and "model_class" in checkpoint:
        return f"{path} is save_compressed's checkpoint, not a Lightning one: load_compressed reads it"
    return f"{path} is not a Lightning checkpoint (it holds no 'pytorch-lightning_version')"


def compressed_without_record(path: str, module: torch.nn.Module) -> str | None:
    """Where a checkpoint without a record shows that it holds a compressed model, what shows it
    (its state names a quantizer, or its weights have other shapes than ``module``'s); None where
    it looks like a float checkpoint of ``module``.

    Lightning writes a weights-only checkpoint (``ModelCheckpoint(save_weights_only=True)``)
    without the callbacks' state, so without the record that rebuilds the compressed structure.
    A distributed checkpoint directory is not looked into.
    """
    if Path(path).is_dir():
        return None
    state = _load(path).get("state_dict") or {}
    compressed = [name for name in state if any(part in name for part in _COMPRESSED_STATE)]
    if compressed:
        return f"its state holds compressed layers ('{compressed[0]}', ...)"
    own = module.state_dict()
    for name, value in state.items():
        if name in own and isinstance(value, torch.Tensor) and value.shape != own[name].shape:
            shapes = f"{tuple(value.shape)}, the module's {tuple(own[name].shape)}"
            return f"its '{name}' has shape {shapes} (pruned, unless it is another model's)"
    return None


def _load(path: str) -> dict[str, Any]:
    """The checkpoint at ``path`` (a distributed checkpoint directory's metadata), memory-mapped where local."""
    filesystem = get_filesystem(path)
    if isinstance(filesystem, LocalFileSystem):
        file = Path(path) / _SHARDED_METADATA if Path(path).is_dir() else Path(path)
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    with filesystem.open(path, "rb") as stream:
        return torch.load(stream, map_location="cpu", weights_only=True)
