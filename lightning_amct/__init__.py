"""lightning-amct: model compression for PyTorch Lightning, driven by the AMCT retrain config.

One line turns a Lightning training run into quantization-aware training (INT8/INT4 with learned
activation clip ranges), channel pruning that really shrinks the network, and/or 4:2 structured
sparsity::

    trainer = Trainer(callbacks=[CompressionCallback("quant.cfg")])

Without Lightning: ``compress_model(model, "quant.cfg", example_inputs)``. Before training,
``print(resolve_plan(model, "quant.cfg"))`` shows what each layer will get.
"""

from lightning_amct.callback import CompressionCallback
from lightning_amct.config import ConfigError, ConfigWarning, load_config
from lightning_amct.modules.apply import CompressionState, compress_model, compression_state
from lightning_amct.plan import CompressionPlan, LayerPlan, PruneSpec, QuantSpec, resolve_plan

__version__ = "0.1.0"

__all__ = [
    "CompressionCallback",
    "CompressionPlan",
    "CompressionState",
    "ConfigError",
    "ConfigWarning",
    "LayerPlan",
    "PruneSpec",
    "QuantSpec",
    "compress_model",
    "compression_state",
    "load_config",
    "resolve_plan",
]
