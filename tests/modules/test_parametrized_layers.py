"""A layer whose weight a parametrization computes (``weight_norm``: wav2vec2's positional
convolution, EnCodec's and HiFi-GAN's convolutions) is compressed: it quantizes the weight the
parametrization computes, the gradient reaches the parametrization's tensors, and it exports and
loads like any other layer."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from lightning_amct import compress_model, load_compressed, save_compressed
from lightning_amct.modules.compressed_layers import CompressedLayer

INT8 = "retrain_data_quant_config { ulq_quantize {} } retrain_weight_quant_config { arq_retrain {} }"


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        weight_norm(nn.Conv1d(2, 8, 3, padding=1)),
        nn.ReLU(),
        weight_norm(nn.Conv1d(8, 8, 3, padding=1), dim=0),
        nn.Flatten(),
        nn.Linear(8 * 16, 4),
    )


def test_a_layer_whose_weight_weight_norm_computes_is_compressed_trains_exports_and_loads(tmp_path) -> None:
    model, x = _model(), torch.randn(4, 2, 16)
    conv = model[2]
    magnitude, direction = conv.parametrizations.weight.original0, conv.parametrizations.weight.original1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "layers stay as they are"
        compress_model(model, INT8, x)
    conv = model[2]
    assert isinstance(conv, CompressedLayer) and isinstance(conv, nn.Conv1d)
    assert conv.parametrizations.weight.original1 is direction  # the optimizer's Parameters, as they were

    model.train()
    inputs = torch.relu(model[0](x))
    expected = F.conv1d(
        conv.act_quant(inputs),
        conv.weight_quant(magnitude * direction / direction.norm(dim=(1, 2), keepdim=True)),
        conv.bias,
        padding=1,
    )
    torch.testing.assert_close(conv(inputs), expected, rtol=0, atol=1e-6)
    model(x).square().mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (magnitude, direction, conv.act_quant.clip_max))

    assert type(conv.to_float()).__name__ == "ParametrizedConv1d" and type(copy.deepcopy(conv)) is type(conv)
    model.eval()
    with torch.no_grad():
        trained = model(x).numpy()
    paths = save_compressed(model, tmp_path, x)
    session = ort.InferenceSession(str(paths["fake_quant_onnx"]), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"input": x.numpy()})[0]
    # the deployed bias is rounded to its int32 grid (act. scale x weight scale): a step's flip at most
    np.testing.assert_allclose(exported, trained, atol=0.01 * np.abs(trained).max())
    with torch.no_grad():
        loaded = load_compressed(paths["checkpoint"], _model()).eval()(x).numpy()
    np.testing.assert_allclose(loaded, exported, rtol=0, atol=1e-5)


def test_without_a_trainer_the_mask_schedule_counts_a_parametrization_s_updates() -> None:
    layer = nn.Sequential(weight_norm(nn.Linear(8, 8)))
    every_batch = "prune_config { n_out_of_m_pruner { l1_selective_prune { update_freq: 1 } } }"
    compress_model(layer, every_batch, torch.zeros(1, 8))
    (compressed,) = (m for m in layer.modules() if isinstance(m, CompressedLayer))
    x = torch.randn(2, 8)
    layer.train()(x)
    layer(x)  # the same weights: the same batch
    assert int(compressed.mask_batches) == 1
    with torch.no_grad():
        compressed.parametrizations.weight.original1.mul_(-1.5)  # what an optimizer step does
    layer(x)
    assert int(compressed.mask_batches) == 2
