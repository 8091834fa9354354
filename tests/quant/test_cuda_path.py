"""The CUDA path of the fake-quant ops and of a compressed training run, against the CPU.

CUDA runs the tensor operations that the CPU runs with ``fused_cpu_kernels(False)``: values and
input gradients are the same bits on both; clip and scale gradients are sums over the whole
tensor, added in another order on the GPU, so they agree within float32 rounding of the sum.
These tests need a CUDA device (CI has none); on a GPU machine:
``python -m pytest tests/quant/test_cuda_path.py``.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lightning_amct import CompressionCallback, compress_model
from lightning_amct.demo import DemoClassifier, DigitsDataModule
from lightning_amct.quant import ActivationQuantizer
from lightning_amct.quant.functional import arq_fake_quant, ulq_fake_quant, wts_ulq_fake_quant
from lightning_amct.quant.functional.cpu_kernels import fused_cpu_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RECIPES = Path(__file__).parents[2] / "recipes"


def _values_and_gradients(op, x: torch.Tensor, params: list[torch.Tensor], args: tuple, device: str):
    """``op(x, *params, *args)`` on ``device``: its value, then the gradients of x and of each parameter."""
    torch.manual_seed(1)
    grad = torch.randn(op(x, *params, *args).shape)
    x = x.detach().to(device).requires_grad_(True)
    params = [p.detach().to(device).requires_grad_(True) for p in params]
    y = op(x, *params, *args)
    y.backward(grad.to(device))
    return [t.detach().cpu() for t in (y, x.grad, *(p.grad for p in params))]


def _compare(op, x: torch.Tensor, params: list[torch.Tensor], args: tuple) -> None:
    with fused_cpu_kernels(False):
        on_cpu = _values_and_gradients(op, x, params, args, "cpu")
    on_cuda = _values_and_gradients(op, x, params, args, "cuda")
    assert torch.equal(on_cuda[0], on_cpu[0])
    assert torch.equal(on_cuda[1], on_cpu[1])
    for cuda_sum, cpu_sum in zip(on_cuda[2:], on_cpu[2:]):
        torch.testing.assert_close(cuda_sum, cpu_sum, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("clip_min", [0.0, -2.5])
def test_ulq_matches_the_cpu(bits: int, clip_min: float) -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 16, 12, 12) * 2
    _compare(ulq_fake_quant, x, [torch.tensor([3.0]), torch.tensor([clip_min])], (bits, True))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("channel_axis", [0, None])
def test_weight_quantizers_match_the_cpu(bits: int, channel_axis: int | None) -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 16, 3, 3) * 0.1
    _compare(arq_fake_quant, w, [], (bits, channel_axis))
    scale_shape = (24, 1, 1, 1) if channel_axis == 0 else (1,)
    _compare(wts_ulq_fake_quant, w, [torch.full(scale_shape, 0.01)], (bits, channel_axis))


def test_a_compressed_demo_trains_on_the_gpu_and_agrees_with_the_cpu(tmp_path: Path) -> None:
    """INT8 ``quant.cfg`` on the demo, fitted on CUDA; the trained model then gives the same answers on the CPU."""
    pl.seed_everything(0)
    module = DemoClassifier(width=16)
    data = DigitsDataModule(batch_size=64)
    trainer = pl.Trainer(
        accelerator="cuda", devices=1, max_epochs=2, limit_train_batches=8, limit_val_batches=1,
        default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
        callbacks=[CompressionCallback(RECIPES / "quant.cfg")],
    )  # fmt: skip
    trainer.fit(module, data)
    callback = next(c for c in trainer.callbacks if isinstance(c, CompressionCallback))
    assert callback.artifacts and all(path.is_file() for path in callback.artifacts.values())
    quantizers = [m for m in module.modules() if isinstance(m, ActivationQuantizer)]
    assert quantizers and all(q.calibrated and torch.isfinite(q.clip_max).all() for q in quantizers)
    data.setup("test")
    x = next(iter(data.test_dataloader()))[0]
    module.eval()
    with torch.no_grad(), torch.backends.cudnn.flags(allow_tf32=False):
        on_cuda = module.cuda()(x.cuda()).cpu()
        with fused_cpu_kernels(False):
            on_cpu = module.cpu()(x)
    assert torch.equal(on_cuda.argmax(1), on_cpu.argmax(1))
    assert (on_cuda - on_cpu).abs().median() < 1e-4


def test_a_model_already_on_the_gpu_gets_its_quantizers_there() -> None:
    pl.seed_everything(0)
    model = DemoClassifier(width=16).cuda()
    x = torch.rand(8, 1, 8, 8, device="cuda")
    compress_model(model, RECIPES / "quant.cfg", x[:1], quantize_outputs=True)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    model(x).sum().backward()
