"""Whether a forward is activation checkpointing's second run of a block, inside the backward pass.

``torch.utils.checkpoint`` (and ``transformers``' ``gradient_checkpointing_enable()``, built on it)
keeps a block's inputs instead of its activations and runs the block's forward again when the
backward pass reaches it. The quantizers and 4:2 masks count training forwards (calibration
batches, the mask schedule): that second run is not a new batch, and must compute what the first
computed, on the same path, so that it saves the same tensors. It runs inside the backward pass,
for both checkpoint styles, which is how it is told apart.

Example:
    >>> import torch
    >>> from torch.utils.checkpoint import checkpoint
    >>> runs = []
    >>> x = torch.ones(2, requires_grad=True)
    >>> checkpoint(lambda t: runs.append(recomputing()) or t.sin(), x, use_reentrant=False).sum().backward()
    >>> runs
    [False, True]
"""

from __future__ import annotations

import torch


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: a checkpointed block computed again."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1
