"""lightning-amct: model compression for PyTorch Lightning, driven by the AMCT retrain config.

One line turns a Lightning training run into quantization-aware training (INT8/INT4 with learned
activation clip ranges), channel pruning that really shrinks the network, and/or 4:2 structured
sparsity::

    trainer = Trainer(callbacks=[CompressionCallback("recipes/quant.cfg")])

Without Lightning: ``compress_model(model, "recipes/quant.cfg", example_inputs)``. Before
training, ``print(resolve_plan(model, "recipes/quant.cfg"))`` shows what each layer will get.
After it, ``save_compressed(model, "out")`` writes the artifacts and ``load_compressed(path,
MyModel())`` turns the compressed checkpoint back into a runnable model.

The names below are imported on first use, so ``import lightning_amct`` (and the
``lightning-amct plan`` and ``--help`` commands) do not pay for importing Lightning.

Example:
    >>> import lightning_amct
    >>> lightning_amct.load_compressed.__module__
    'lightning_amct.export.load'
"""

from __future__ import annotations

from lightning_amct.lazy import lazy_exports

__version__ = "0.1.0"

#: Public name -> the module that defines it.
_EXPORTS = {
    "CompressionCallback": "lightning_amct.callback",
    "CompressionPlan": "lightning_amct.plan",
    "CompressionState": "lightning_amct.modules.apply",
    "ConfigError": "lightning_amct.config",
    "ConfigWarning": "lightning_amct.config",
    "LayerPlan": "lightning_amct.plan",
    "PruneSpec": "lightning_amct.plan",
    "QuantSpec": "lightning_amct.plan",
    "compress_model": "lightning_amct.modules.apply",
    "compression_state": "lightning_amct.modules.apply",
    "load_compressed": "lightning_amct.export",
    "load_config": "lightning_amct.config",
    "resolve_plan": "lightning_amct.plan",
    "save_compressed": "lightning_amct.export",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
