"""Training under activation checkpointing (``torch.utils.checkpoint``, both styles): a block's
second run in the backward pass is no new batch (calibration and the 4:2 schedule count once) and
computes what the first run computed, on the same path, from the first, calibrating batch on."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from lightning_amct import compress_model
from lightning_amct.modules.input_norm import InputBatchNorm2d, restore_norms

CONFIG = """
batch_num: 2
retrain_data_quant_config { ulq_quantize {} }
retrain_weight_quant_config { arq_retrain { dst_type: INT8 } }
prune_config { n_out_of_m_pruner { l1_selective_prune { n_out_of_m_type: M4N2 update_freq: 1 } } }
"""


class Blocks(nn.Module):
    """Two Conv-BN-ReLU blocks and a head; ``style`` None runs them plainly, else checkpointed."""

    def __init__(self, style: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for c_in in (4, 8)
        )
        self.head = nn.Linear(8 * 6 * 6, 3)
        self.style = style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x) if self.style is None else checkpoint(block, x, use_reentrant=self.style == "reentrant")
        return self.head(x.flatten(1))


def _train(style: str | None, fused_norm: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = Blocks(style)
    x, y = torch.randn(6, 4, 6, 6), torch.randint(0, 3, (6,))
    compress_model(model, CONFIG, x)
    assert type(model.blocks[1][1]) is InputBatchNorm2d  # the head applies it, where it can
    if not fused_norm:
        restore_norms(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(4):  # the first two calibrate
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x.requires_grad_()), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model.state_dict()


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # the graph capture runs without gradients
@pytest.mark.parametrize("style", ["non-reentrant", "reentrant"])
def test_a_checkpointed_model_trains_as_the_plain_one_counters_included(style: str) -> None:
    # The last block's BatchNorm, which the head applies: non-reentrant, the block's second run
    # (outside the head's forward) hands its input on again, as the first did; reentrant, the
    # first run records no gradients, so torch's BatchNorm runs there (equal within rounding
    # only to the head's): compared with the plain model running torch's too.
    fused_norm = style == "non-reentrant"
    plain_losses, plain_state = _train(None, fused_norm)
    losses, state = _train(style, fused_norm)
    assert losses == plain_losses
    assert state["blocks.0.0.mask_batches"].item() == 4 and state["blocks.1.0.act_quant.calibrated_batches"].item() == 2
    for name, value in plain_state.items():
        if ".1.running_" in name or name.endswith("num_batches_tracked"):
            continue  # BatchNorm's statistics: torch's second run updates them again, in float training too
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("fused_norm", [True, False], ids=["batchnorm-and-relu-applied-by-the-head", "relu-only"])
def test_a_second_run_that_is_not_stopped_early_saves_what_the_first_saved(fused_norm: bool) -> None:
    """Without early stopping, the second run runs the whole block and torch counts the tensors it
    saves: the ReLU and the BatchNorm that the head applies hand their input on again."""
    with set_checkpoint_early_stop(False):
        losses, _ = _train("non-reentrant", fused_norm)
    plain_losses, _ = _train(None, fused_norm)
    assert losses == plain_losses
