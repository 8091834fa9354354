"""A model whose compiled submodules are seen, for a while, as the modules they compile.

``torch.compile(module)`` wraps a module in an ``OptimizedModule`` that holds it as ``_orig_mod``.
A LightningModule that compiles its network in ``configure_model``
(``self.net = torch.compile(self.net)``) then names every layer ``net._orig_mod.stem.conv``: not
as the plan (resolved before ``configure_model``) and the uncompiled class name them, so a
checkpoint written under those names fits no model. :func:`compiled_modules_unwrapped` puts each
wrapped module in its wrapper's place while the artifacts are written or loaded, and the wrappers
back afterwards (they hold the same module objects, changed in place where a load changed them).

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> model[0] = torch.compile(model[0])
    >>> with compiled_modules_unwrapped(model) as plain:
    ...     [name for name, _ in plain.named_modules()]
    ['', '0']
    >>> [name for name, _ in model.named_modules()]
    ['', '0', '0._orig_mod']
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def compiled_modules_unwrapped(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` (or the module it compiles) with each compiled submodule replaced by the module it
    compiles, until the block ends."""
    root = _compiled(model) or model
    swapped = []
    for parent in list(root.modules()):  # listed first: a compiled module inside a compiled one too
        for name, child in list(parent._modules.items()):
            original = _compiled(child)
            if original is not None:
                parent._modules[name] = original
                swapped.append((parent, name, child))
    try:
        yield root
    finally:
        for parent, name, child in reversed(swapped):
            parent._modules[name] = child


def _compiled(module: nn.Module | None) -> nn.Module | None:
    """The module that ``module`` compiles (an ``OptimizedModule``'s ``_orig_mod``), or None.

    By the class's name: importing ``torch._dynamo`` to name the class costs seconds."""
    if module is None or type(module).__name__ != "OptimizedModule":
        return None
    return module._modules.get("_orig_mod")
