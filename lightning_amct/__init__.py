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

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "lightning_amct.callback": ("CompressionCallback", "SetupError"),
        "lightning_amct.config": ("ConfigError", "ConfigWarning", "load_config"),
        "lightning_amct.export": ("load_compressed", "save_compressed"),
        "lightning_amct.modules.apply": ("CompressionState", "compress_model", "compression_state"),
        "lightning_amct.plan": ("CompressionPlan", "LayerPlan", "PruneSpec", "QuantSpec", "resolve_plan"),
    },
    globals(),
)
