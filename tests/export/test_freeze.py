"""Freezing: what the frozen copy computes with, whatever state the training model is in."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lightning_amct import compress_model
from lightning_amct.export import freeze_model

if TYPE_CHECKING:
    from conftest import Levit


def test_the_frozen_copy_does_not_keep_values_cached_by_an_earlier_eval_forward(levit: Levit) -> None:
    """Lightning's validation runs LeViT in eval mode, which fills its attention-bias cache, and
    puts the modes back without LeViT's ``train()``, which would empty the cache."""
    model = compress_model(levit.model, "retrain_data_quant_config { ulq_quantize {} }", levit.inputs)
    model(levit.inputs)  # the calibration batch
    with torch.no_grad():
        model.eval()(levit.inputs)  # validation: the cache holds these biases
    _training_as_lightning_puts_it_back(model)
    levit.train_biases()
    with torch.no_grad():
        cached = model.eval()(levit.inputs).logits
        assert not torch.allclose(cached, levit.emptied(model).eval()(levit.inputs).logits), "the cache is stale"
        _training_as_lightning_puts_it_back(model)
        output = freeze_model(model, levit.inputs).module(levit.inputs).logits
        expected = freeze_model(levit.emptied(model), levit.inputs).module(levit.inputs).logits
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert all(levit.caches(model)), "the training model's own state is left as it is"


def _training_as_lightning_puts_it_back(model: torch.nn.Module) -> None:
    for module in model.modules():
        module.training = True
