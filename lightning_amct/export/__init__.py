"""Finalize and deploy: integer weights, BatchNorm folded, ONNX models, the AMCT record, a report.

After training, one call writes every artifact::

    paths = save_compressed(model, "export/")     # model compressed by compress_model / the callback
    model = load_compressed(paths["checkpoint"], DemoClassifier())

* ``<prefix>_compressed.pt``: integer weights (INT4 two per byte, 4:2 weights as kept values and
  2-bit positions), per-channel scales, activation grids, the plan and config; ``weights_only``.
* ``<prefix>_fake_quant_model.onnx``: QuantizeLinear/DequantizeLinear around each quantized layer.
* ``<prefix>_deploy_model.onnx``: integer weight initializers and int32 biases for every layer
  ONNX Runtime runs with integer kernels (float weights holding exactly the dequantized values
  elsewhere, see :mod:`lightning_amct.export.deploy`).
* ``<prefix>_record.txt``: the AMCT record (scale_d, offset_d, scale_w, offset_w, prune records).
* ``<prefix>_report.md`` / ``.json``: per-layer bits, clips, sparsity, channels, FLOPs, file sizes.

The pieces are usable alone: :func:`freeze_model` (the frozen copy every artifact comes from),
:func:`export_onnx`, :func:`deploy_model`, :func:`write_files_atomically`.
"""

from lightning_amct.export.atomic import ArtifactWriteError, write_files_atomically
from lightning_amct.export.deploy import deploy_model
from lightning_amct.export.fake_quant_layer import FakeQuantLayer
from lightning_amct.export.freeze import FrozenModel, float_copy, freeze_model
from lightning_amct.export.integer import ActivationGrid, IntegerLayer, integer_layer
from lightning_amct.export.load import CheckpointMismatchError, load_compressed
from lightning_amct.export.onnx_export import OnnxExportError, export_onnx
from lightning_amct.export.save import save_compressed

__all__ = [
    "ActivationGrid",
    "ArtifactWriteError",
    "CheckpointMismatchError",
    "FakeQuantLayer",
    "FrozenModel",
    "IntegerLayer",
    "OnnxExportError",
    "deploy_model",
    "export_onnx",
    "float_copy",
    "freeze_model",
    "integer_layer",
    "load_compressed",
    "save_compressed",
    "write_files_atomically",
]
